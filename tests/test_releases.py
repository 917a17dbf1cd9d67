"""Directories laid out as the six remote-code releases publish them, served and chatted with no flag.

Each is a tiny random model whose config.json is the release's own (tests/fixtures/chatglm_remote/
released_configs, verbatim) with only the sizes shrunk, its weights under the release's file names
(sharded safetensors for GLM-4, sharded pytorch_model-*.bin for ChatGLM2/3 and CodeGeeX2, both with the
stored `inv_freq`), and its tokenizer files as released: tokenizer.model (GLM-4's tiktoken ranks, or
ChatGLM2/3's SentencePiece BPE), tokenizer_config.json and tokenization_chatglm.py. `glmkit serve` and
`glmkit chat` must pick the family's chat format and stop tokens by themselves.
CodeGeeX4-all-9b's config.json was not available to copy: its directory is glm-4-9b-chat's with the
release name, which is what the two share as published (the same remote code and vocabulary).
"""

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import glmkit
from glmkit.chat import FORMATS
from glmkit.config import ModelConfig
from glmkit.convert import write_checkpoint
from glmkit.model import GLM
from glmkit.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_bpe
from glmkit.vocab import CHATGLM2_SPECIALS, CHATGLM3_SPECIALS, GLM4_SPECIALS, byte_level_alphabet

spm = pytest.importorskip("sentencepiece")
RELEASED = Path(__file__).parent / "fixtures" / "chatglm_remote" / "released_configs"
TEXT = ["你好，今天天气很好。我们去公园散步吧！", "def add(a, b):\n    return a + b\n", "Hello world, the quick brown fox.",
        "床前明月光，疑是地上霜。举头望明月，低头思故乡。", "import os\nprint(os.getcwd())\n", "问：你是谁？\n答：我是一个助手。"]
TINY = {"hidden_size": 32, "ffn_hidden_size": 48, "num_layers": 2, "num_hidden_layers": 2, "num_attention_heads": 4,
        "kv_channels": 8, "seq_length": 256}
# release -> (its config file, name written into it, chat format it must get, tokenizer family)
RELEASES = {
    "chatglm2-6b": ("chatglm2-6b", None, "chatglm2", "sp2"),
    "chatglm3-6b": ("chatglm3-6b", None, "chatglm3", "sp3"),
    "codegeex2-6b": ("codegeex2-6b", None, "codegeex2", "sp2"),
    "glm-4-9b-chat": ("glm-4-9b-chat", None, "glm4", "tiktoken"),
    "glm-4-9b-chat-1m": ("glm-4-9b-chat-1m", None, "glm4", "tiktoken"),
    "codegeex4-all-9b": ("glm-4-9b-chat", "THUDM/codegeex4-all-9b", "codegeex4", "tiktoken"),
}


@pytest.fixture(scope="module")
def vocabularies():
    """A ChatGLM-style SentencePiece BPE model and a GLM-4-style tiktoken rank file, trained here."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT * 30), model_writer=out, vocab_size=500, hard_vocab_limit=False,
                                   minloglevel=2, model_type="bpe", byte_fallback=True, remove_extra_whitespaces=False,
                                   allow_whitespace_only_pieces=True, split_digits=True, normalization_rule_name="identity")
    bpe = train_bpe(texts=TEXT * 20, vocab_size=400)
    byte_of = {c: b for b, c in enumerate(byte_level_alphabet())}
    ranks = {}
    for s, _ in sorted(json.loads(bpe.tok.to_str())["model"]["vocab"].items(), key=lambda kv: kv[1]):
        if s not in SPECIAL_TOKENS:
            ranks.setdefault(bytes(byte_of[c] for c in s), len(ranks))
    return {"sp": out.getvalue(), "ranks": ranks}


def write_tokenizer(d: Path, family: str, vocabularies) -> dict[str, int]:
    """The release's tokenizer files; returns the specials' ids."""
    if family == "tiktoken":
        ranks = vocabularies["ranks"]
        (d / "tokenizer.model").write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
        ids = {s: len(ranks) + k for k, s in enumerate(GLM4_SPECIALS)}
        (d / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "ChatGLM4Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
            "added_tokens_decoder": {str(i): {"content": s, "special": True} for s, i in ids.items()},
            "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]}}))
        (d / "tokenization_chatglm.py").write_text("# the release's remote code (tiktoken); glmkit never runs it\n")
        return ids
    model = vocabularies["sp"]
    n = spm.SentencePieceProcessor(model_proto=model).vocab_size()
    specials = CHATGLM3_SPECIALS if family == "sp3" else CHATGLM2_SPECIALS
    ids = {s: n + k for k, s in enumerate(specials)}
    (d / "tokenizer.model").write_bytes(model)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "ChatGLMTokenizer", "eos_token": "</s>", "pad_token": "<unk>", "remove_space": False,
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}))
    (d / "tokenization_chatglm.py").write_text(  # what glmkit reads of it (as text): the special tokens it appends
        f"special_tokens = {list(CHATGLM2_SPECIALS)!r}\n"
        + (f"role_special_token_expression = {list(CHATGLM3_SPECIALS[5:])!r}\n" if family == "sp3" else ""))
    ids["</s>"] = 2
    return ids


def release_dir(tmp_path: Path, release: str, vocabularies) -> Path:
    cfg_name, name, _, family = RELEASES[release]
    d = tmp_path / release
    d.mkdir()
    ids = write_tokenizer(d, family, vocabularies)
    config = json.loads((RELEASED / f"{cfg_name}.json").read_text())
    vocab = max(ids.values()) + 1
    config.update(TINY, padded_vocab_size=vocab)
    if name:
        config["_name_or_path"] = name
    if family == "tiktoken":  # the released eos list (<|endoftext|>, <|user|>, <|observation|>) at this vocabulary's ids
        config.update(eos_token_id=[ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]], pad_token_id=ids["<|endoftext|>"])
    (d / "config.json").write_text(json.dumps(config, indent=2))
    # weights: a random model of that config, in the release's layout, under the release's file names
    torch.manual_seed(0)
    from glmkit.convert import config_of

    model = GLM(ModelConfig.from_dict({**config_of(d)[1].to_dict(), "chat_format": None}))
    model.init_weights(seed=1)
    write_checkpoint(model, tmp_path / "tmp-remote", "chatglm2")
    from safetensors.torch import load_file

    state = load_file(tmp_path / "tmp-remote" / "model.safetensors")
    state["transformer.rotary_pos_emb.inv_freq"] = (1.0 / 10000 ** (torch.arange(0, 4, 2) / 4)).to(torch.bfloat16)
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    bf16 = family == "tiktoken"
    files = {}
    for k, part in enumerate(halves):
        if bf16:
            f = f"model-{k + 1:05d}-of-00002.safetensors"
            save_file({n: state[n].to(torch.bfloat16) for n in part}, str(d / f), metadata={"format": "pt"})
        else:
            f = f"pytorch_model-{k + 1:05d}-of-00002.bin"
            torch.save({n: state[n].half() for n in part}, d / f)
        files.update(dict.fromkeys(part, f))
    index = "model.safetensors.index.json" if bf16 else "pytorch_model.bin.index.json"
    (d / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": files}))
    (d / "configuration_chatglm.py").write_text("# remote code; glmkit never runs it\n")
    (d / "modeling_chatglm.py").write_text("# remote code; glmkit never runs it\n")
    return d


@pytest.mark.parametrize("release", list(RELEASES))
def test_serve_and_chat_a_release_directory_with_no_flag(tmp_path, release, vocabularies, monkeypatch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    import glmkit.server.app as app_module
    from glmkit.cli import chat_main

    d = release_dir(tmp_path, release, vocabularies)
    fmt_name = RELEASES[release][2]
    model, tok = glmkit.load(str(d)), load_tokenizer(d)
    assert model.cfg.source == "chatglm2" and model.cfg.chat_format == fmt_name, model.cfg.chat_format
    fmt = FORMATS[fmt_name]
    msgs = [{"role": "user", "content": "你好"}]

    replies = []

    def fake_serve(app, *args, **kwargs):  # instead of uvicorn on a port: requests in process
        with TestClient(app) as c:
            replies.append(c.post("/v1/chat/completions", json={"model": d.name, "max_tokens": 3, "temperature": 0,
                                                                "messages": msgs}))
            replies.append(c.post("/v1/completions", json={"model": d.name, "max_tokens": 3, "prompt": "def add(a, b):"}))
            replies.append(c.post("/infill", json={"input_prefix": "def add(a, b):\n    return ", "input_suffix": "\n",
                                                   "n_predict": 3}))

    monkeypatch.setattr(app_module, "serve", fake_serve)
    assert app_module.main(["--model", str(d), "--no-auth", "--keys-db", str(tmp_path / "k.db")]) == 0
    chat, completion, infill = replies
    assert completion.status_code == 200, completion.text
    assert infill.status_code == 200, infill.text
    if fmt_name == "codegeex2":  # a code completion model: no chat format to render
        assert chat.status_code == 400 and "complet" in chat.text, chat.text
        return
    assert chat.status_code == 200, chat.text
    want, _ = fmt.render(tok, msgs, add_generation_prompt=True)
    assert chat.json()["usage"]["prompt_tokens"] == len(want), (chat.json()["usage"], len(want))
    # the family's prompt: GLM-4's <sop> or ChatGLM's bare sop, role tokens or ChatGLM2's [Round 1]
    text = tok.decode(want)
    assert {"chatglm2": "[Round 1]", "chatglm3": "<|user|>", "glm4": "<|user|>", "codegeex4": "<|user|>"}[fmt_name] in text, text
    assert ("<sop>" in text) == (fmt_name in ("glm4", "codegeex4")), text
    stops = set(fmt.stop_ids(tok))
    assert tok.special("eos") in stops and (tok.tok.token_to_id("<|user|>") in stops) == (fmt_name != "chatglm2")

    stdout = io.StringIO()
    assert chat_main(["--model", str(d), "--max-new-tokens", "3", "--temperature", "0"], stdin=io.StringIO("你好\n"),
                     stdout=stdout) == 0
    assert stdout.getvalue().endswith("\n"), stdout.getvalue()
