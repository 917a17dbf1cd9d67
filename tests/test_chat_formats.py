"""Each GLM family's chat format (glmkit.chat) against the published format, token for token.

The expected ids are written from the published layouts, with the reference encoders: SentencePiece
itself (`SentencePieceProcessor.encode`, one call per piece exactly as ChatGLM2/3's remote code
calls it) for the SentencePiece families, and for the byte-level BPE ones the published template's
*text* tokenized with its special tokens recognized (what a chat template does). The tokenizers are
trained here: a SentencePiece unigram model with byte fallback (as ChatGLM2/3's "\\n" is a byte
piece) plus each family's special tokens appended after its vocabulary (their ids n_words + i, as
ChatGLM2/3's tokenization_chatglm.py numbers them), and the byte-level BPE of conftest.
"""

import io
import json
from pathlib import Path

import pytest
import torch

from glmkit.chat import FORMATS, chat_format, format_from_config, get_format
from glmkit.config import CHAT_FORMATS, ModelConfig
from glmkit.convert import config_of
from glmkit.model import GLM
from glmkit.tokenizer import Tokenizer
from tests.serving import TEXTS

CHATGLM2_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
CHATGLM3_SPECIALS = CHATGLM2_SPECIALS + ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
CODE_MARKERS = ["<|code_prefix|>", "<|code_middle|>", "<|code_suffix|>"]

# a conversation with every role, a tool result, and non-ASCII text
CONV = [{"role": "system", "content": "简短回答"}, {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "你好！"}, {"role": "observation", "content": '{"temp": 21}'},
        {"role": "user", "content": "再见"}]
QA = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
      {"role": "user", "content": "more"}]


def show(got, want) -> str:
    n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"first difference at {n}: got {got[n:n + 8]} want {want[n:n + 8]} (lengths {len(got)} / {len(want)})"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A SentencePiece unigram model trained here (ChatGLM2/3 normalize nothing and fall back to bytes)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    texts = TEXTS + ["[Round 1]\n\n问：你好\n\n答：你好！有什么可以帮你？\n\n", '简短回答 再见 {"temp": 21}'] * 5
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=400, model_type="unigram",
                                   byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path, spm.SentencePieceProcessor(model_proto=buf.getvalue())


def sp_tokenizer(sp_model, specials) -> tuple[Tokenizer, object, dict]:
    """glmkit's reading of the model plus `specials` appended (ids n_words + i), the reference processor,
    and the specials' ids."""
    path, sp = sp_model
    tok = Tokenizer.from_sentencepiece(path)
    tok.tok.add_special_tokens(specials)
    ids = {s: tok.token_id(s) for s in specials}
    assert list(ids.values()) == list(range(sp.vocab_size(), sp.vocab_size() + len(specials)))
    return tok, sp, ids


def bpe_with(tok, extra=()) -> Tokenizer:
    """A copy of the session BPE (which must not be modified), with `extra` special tokens added."""
    from tokenizers import Tokenizer as HFTokenizer

    t = Tokenizer(HFTokenizer.from_str(tok.tok.to_str()))
    t.tok.add_special_tokens(list(extra))
    return t


# ---- rendering --------------------------------------------------------------------------------------
def test_registry_matches_config():
    assert tuple(FORMATS) == CHAT_FORMATS
    assert chat_format(ModelConfig()) is FORMATS["glm4"]  # None: GLM-4's, as before
    assert chat_format(ModelConfig(chat_format="chatglm3")) is FORMATS["chatglm3"]
    with pytest.raises(ValueError, match="chat_format='chatglm5'.*expected one of"):
        ModelConfig(chat_format="chatglm5")
    with pytest.raises(KeyError, match="known: glm4"):
        get_format("llama")


def test_glm4_is_the_published_template(tok):
    """GLM-4's chat_template renders `[gMASK]<sop>` + `<|role|>{metadata}\\n{content}` per message (+
    `<|assistant|>`); tokenizing that text with its special tokens is the reference."""
    fmt = FORMATS["glm4"]
    ids, mask = fmt.render(tok, CONV, add_generation_prompt=True)
    text = ("[gMASK]<sop><|system|>\n简短回答<|user|>\nHello there<|assistant|>\n你好！<|observation|>\n"
            '{"temp": 21}<|user|>\n再见<|assistant|>')
    want = tok.encode(text, allow_special=True)
    assert ids == want, show(ids, want)
    assert (ids, mask) == tok.render_chat(CONV, add_generation_prompt=True)  # Tokenizer.render_chat delegates
    # only the reply and the role token that ends it are learned
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "\n你好！<|observation|>"
    # an assistant turn's metadata (a tool call's name) sits between its role token and the newline
    meta = [{"role": "user", "content": "hi"}, {"role": "assistant", "metadata": "get_weather", "content": '{"city": "x"}'}]
    ids, _ = fmt.render(tok, meta)
    want = tok.encode('[gMASK]<sop><|user|>\nhi<|assistant|>get_weather\n{"city": "x"}<|endoftext|>', allow_special=True)
    assert ids == want, show(ids, want)
    assert fmt.stop_ids(tok) == [tok.token_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    assert tok.chat_stop_ids() == fmt.stop_ids(tok)


def test_chatglm3_encodes_each_piece_separately(sp_model):
    """ChatGLM3's build_single_message: <|role|> + encode(f"{metadata}\\n") + encode(content), each call
    with its own "▁" dummy prefix; [gMASK] sop before; the reply prompted by <|assistant|>."""
    tok, sp, s = sp_tokenizer(sp_model, CHATGLM3_SPECIALS)
    fmt = FORMATS["chatglm3"]
    ids, mask = fmt.render(tok, CONV, add_generation_prompt=True)
    want = [s["[gMASK]"], s["sop"]]
    for m in CONV:
        want += [s[f"<|{m['role']}|>"]] + sp.encode("\n") + sp.encode(m["content"])
    want += [s["<|assistant|>"]]
    assert ids == want, show(ids, want)
    assert sp.encode("\n")[0] == sp.piece_to_id("\u2581"), "the newline after a role is '▁' + a byte piece"
    # a finished conversation (SFT): the last reply ends with </s>, learned with the reply
    done = CONV[:3] + [{"role": "assistant", "metadata": "", "content": "好的"}]
    ids, mask = fmt.render(tok, done)
    tail = [s["<|assistant|>"]] + sp.encode("\n") + sp.encode("好的") + [sp.eos_id()]
    assert ids[-len(tail):] == tail, show(ids[-len(tail):], tail)
    learned = [i for i, m in zip(ids, mask) if m]
    want = sp.encode("\n") + sp.encode("你好！") + [s["<|assistant|>"]] + sp.encode("\n") + sp.encode("好的") + [sp.eos_id()]
    assert learned == want, show(learned, want)
    # the published metadata line: an assistant's tool call is <|assistant|> encode("name\n") encode(args)
    call = fmt.render(tok, [{"role": "assistant", "metadata": "get_weather", "content": "{}"}], True)[0]
    assert call[2:-1] == [s["<|assistant|>"]] + sp.encode("get_weather\n") + sp.encode("{}")
    assert fmt.stop_ids(tok) == [sp.eos_id(), s["<|user|>"], s["<|observation|>"]]


def test_chatglm2_rounds(sp_model):
    """ChatGLM2's build_prompt ("[Round i]\\n\\n问：q\\n\\n答：a\\n\\n", rounds from 1) encoded whole after
    [gMASK] sop; a finished conversation as its fine-tuning script: prompt, encode(answer), </s>."""
    tok, sp, s = sp_tokenizer(sp_model, CHATGLM2_SPECIALS)
    fmt = FORMATS["chatglm2"]
    ids, mask = fmt.render(tok, QA, add_generation_prompt=True)
    want = [s["[gMASK]"], s["sop"]] + sp.encode("[Round 1]\n\n问：hi\n\n答：hello\n\n[Round 2]\n\n问：more\n\n答：")
    assert ids == want, show(ids, want)
    assert not any(mask)
    assert fmt.render(tok, QA[:1])[0] == [s["[gMASK]"], s["sop"]] + sp.encode("[Round 1]\n\n问：hi\n\n答：")
    ids, mask = fmt.render(tok, QA + [{"role": "assistant", "content": "ok"}])
    want = [s["[gMASK]"], s["sop"]] + sp.encode("[Round 1]\n\n问：hi\n\n答：hello\n\n[Round 2]\n\n问：more\n\n答：")
    want += sp.encode("ok") + [sp.eos_id()]
    assert ids == want, show(ids, want)
    assert [i for i, m in zip(ids, mask) if m] == sp.encode("ok") + [sp.eos_id()]
    assert fmt.stop_ids(tok) == [sp.eos_id()]
    with pytest.raises(ValueError, match="chatglm2 chat format has no system turns"):
        fmt.render(tok, CONV, True)
    with pytest.raises(ValueError, match="alternating, starting with user"):
        fmt.render(tok, [{"role": "assistant", "content": "x"}], True)
    with pytest.raises(ValueError, match="only after a user message"):
        fmt.render(tok, QA[:2], add_generation_prompt=True)
    with pytest.raises(ValueError, match="role 'bot'"):
        fmt.render(tok, [{"role": "bot", "content": "x"}], True)


def test_chatglm_6b_rounds_and_blank(tok):
    """ChatGLM-6B: one question alone is the prompt; with history "[Round i]\\n问：q\\n答：a\\n" from 0;
    the tokenizer appends [gMASK] <sop> (a GLM blank at the end); a reply ends with <eop>."""
    fmt = FORMATS["chatglm"]
    g, sop, eop = tok.special("gmask"), tok.special("sop"), tok.special("eop")
    assert fmt.render(tok, QA[:1], True)[0] == tok.encode("hi") + [g, sop]
    ids, mask = fmt.render(tok, QA, True)
    want = tok.encode("[Round 0]\n问：hi\n答：hello\n[Round 1]\n问：more\n答：") + [g, sop]
    assert ids == want, show(ids, want)
    ids, mask = fmt.render(tok, QA[:2])
    assert ids == tok.encode("hi") + [g, sop] + tok.encode("hello") + [eop]
    assert [i for i, m in zip(ids, mask) if m] == tok.encode("hello") + [eop]
    assert fmt.blank and fmt.stop_ids(tok) == [eop, tok.special("eos")]


def test_codegeex4_infill_prompt(tok):
    """CodeGeeX4's infilling guide: <|user|>\\n###PATH:\\n###LANGUAGE:\\n###MODE:BLOCK\\n<|code_suffix|>
    suffix <|code_prefix|> prefix <|code_middle|><|assistant|>\\n, after [gMASK]<sop>."""
    fmt = FORMATS["codegeex4"]
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    text = ("[gMASK]<sop><|user|>\n###PATH:\n###LANGUAGE:\n###MODE:BLOCK\n<|code_suffix|>" + suffix + "<|code_prefix|>"
            + prefix + "<|code_middle|><|assistant|>\n")
    fim = bpe_with(tok, CODE_MARKERS)
    ids = fmt.infill(fim, fim.encode(prefix), fim.encode(suffix))
    want = fim.encode(text, allow_special=True)
    assert ids == want, show(ids, want)
    # a tokenizer without the marker tokens gets their text
    plain = fmt.infill(tok, tok.encode(prefix), tok.encode(suffix))
    assert tok.decode(plain) == text
    assert fmt.render(fim, CONV, True) == FORMATS["glm4"].render(fim, CONV, True)  # GLM-4's chat
    with pytest.raises(ValueError, match="no code infilling"):
        FORMATS["glm4"].infill(tok, [1], [2])


def test_codegeex2_has_no_chat(tok):
    with pytest.raises(ValueError, match="code completion model with no chat format.*# language: Python"):
        FORMATS["codegeex2"].render(tok, QA)


# ---- choosing the format ----------------------------------------------------------------------------
# the fields that matter of each release's config.json as published (THUDM remote code, model_type chatglm)
CHATGLM2_6B = {"_name_or_path": "THUDM/chatglm2-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
               "padded_vocab_size": 65024, "seq_length": 32768, "eos_token_id": 2, "pad_token_id": 0}
CHATGLM3_6B = {**CHATGLM2_6B, "_name_or_path": "THUDM/chatglm3-6b"}
CODEGEEX2_6B = {**CHATGLM2_6B, "_name_or_path": "THUDM/codegeex2-6b", "seq_length": 8192, "interleaved_qkv": False,
                "rotary_percent": 0.5}
GLM4_9B_CHAT = {"_name_or_path": "THUDM/glm-4-9b-chat", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
                "padded_vocab_size": 151552, "vocab_size": 151552, "eos_token_id": [151329, 151336, 151338],
                "pad_token_id": 151329, "seq_length": 131072, "rope_ratio": 500}
# chatglm3-6b's tokenizer_config.json chat_template (the " " after "\n" is SentencePiece's dummy prefix)
CHATGLM3_TEMPLATE = ("{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n "
                     "{{ message['content'] }}{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}"
                     "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHATGLM_6B = {"_name_or_path": "THUDM/chatglm-6b", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
              "vocab_size": 130528, "position_encoding_2d": True, "bos_token_id": 130004, "eos_token_id": 130005}


@pytest.mark.parametrize("config, extra, want", [
    (CHATGLM2_6B, {}, "chatglm2"),
    (CHATGLM3_6B, {}, "chatglm3"),
    (CODEGEEX2_6B, {}, "codegeex2"),
    (GLM4_9B_CHAT, {}, "glm4"),
    ({**GLM4_9B_CHAT, "_name_or_path": "THUDM/glm-4-9b-chat-1m", "seq_length": 1048576}, {}, "glm4"),
    ({**GLM4_9B_CHAT, "_name_or_path": "THUDM/codegeex4-all-9b"}, {}, "codegeex4"),
    (CHATGLM_6B, {}, "chatglm"),
    # a local fine-tune names its own path: the tokenizer decides (ChatGLM3's has the role tokens)
    ({**CHATGLM2_6B, "_name_or_path": "/data/ft/run-7"}, {"token_names": CHATGLM3_SPECIALS}, "chatglm3"),
    ({**CHATGLM2_6B, "_name_or_path": "/data/ft/run-7"}, {"token_names": CHATGLM2_SPECIALS}, "chatglm2"),
    ({**CHATGLM2_6B, "_name_or_path": "/data/chatglm3-6b/"}, {}, "chatglm3"),
    ({**CHATGLM2_6B, "_name_or_path": "x"}, {"tokenizer_config": {"chat_template": CHATGLM3_TEMPLATE}}, "chatglm3"),
    ({**CHATGLM2_6B, "_name_or_path": "x"}, {"tokenizer_config": {"name_or_path": "THUDM/codegeex2-6b"}}, "codegeex2"),
    ({**CHATGLM2_6B, "_name_or_path": "x"}, {}, None),  # nothing tells: the caller decides
])
def test_format_from_config(config, extra, want):
    assert format_from_config(config, **extra) == want


RELEASED = Path(__file__).parent / "fixtures" / "chatglm_remote" / "released_configs"  # the releases' own files


@pytest.mark.skipif(not RELEASED.is_dir(), reason="the released config.json fixtures are not in this tree")
@pytest.mark.parametrize("release, want", [("chatglm2-6b", "chatglm2"), ("chatglm3-6b", "chatglm3"),
                                           ("codegeex2-6b", "codegeex2"), ("glm-4-9b-chat", "glm4"),
                                           ("glm-4-9b-chat-1m", "glm4")])
def test_format_from_released_config(release, want):
    assert format_from_config(json.loads((RELEASED / f"{release}.json").read_text())) == want


def test_format_from_config_refuses_a_non_object():
    with pytest.raises(ValueError, match="config.json must be a JSON object"):
        format_from_config(["not", "a", "dict"])


def test_readers_set_the_format_and_glmkit_keeps_it(tmp_path):
    hf = {"architectures": ["GlmForCausalLM"], "model_type": "glm", "vocab_size": 64, "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    chatglm = {"architectures": ["ChatGLMModel"], "model_type": "chatglm", "vocab_size": 64, "hidden_size": 32,
               "num_layers": 1, "num_attention_heads": 4, "position_encoding_2d": True}
    # the GLM-4.5 family: Glm4Moe is GLM-4.5 / 4.6's layout unless named GLM-4.7; Glm4MoeLite (GLM-4.7-Flash) 4.7's
    moe = {"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "vocab_size": 64, "hidden_size": 32,
           "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 1}
    lite = {"architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite", "vocab_size": 64, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "mlp_layer_types": ["dense"]}
    for d, want in ((hf, "glm4"), (chatglm, "chatglm"), (moe, "glm45"), ({**moe, "_name_or_path": "/m/GLM-4.7"}, "glm47"),
                    (lite, "glm47")):
        (tmp_path / "config.json").write_text(json.dumps(d))
        assert config_of(tmp_path)[1].chat_format == want
    cfg = ModelConfig(chat_format="codegeex4")
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path / "config.json").chat_format == "codegeex4"


# ---- the server and generate use the model's format ---------------------------------------------------
def tiny(vocab: int, chat: str, position: str = "rope_partial") -> GLM:
    torch.manual_seed(0)
    m = GLM(ModelConfig(vocab_size=vocab, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, position=position,
                        max_seq_len=256, chat_format=chat)).eval()
    m.init_weights(seed=0)
    return m


def served(model, tok, monkeypatch):
    """A TestClient on `model` and the engine requests it submits."""
    from fastapi.testclient import TestClient

    from glmkit.server.app import create_app

    app = create_app(model, tok, "tiny")
    seen, submit = [], app.state.server.engine.submit
    monkeypatch.setattr(app.state.server.engine, "submit", lambda req: seen.append(req) or submit(req))
    return TestClient(app), seen


def test_server_chat_renders_the_models_format(sp_model, monkeypatch):
    pytest.importorskip("fastapi")
    tok, sp, s = sp_tokenizer(sp_model, CHATGLM3_SPECIALS)
    client, seen = served(tiny(tok.vocab_size, "chatglm3"), tok, monkeypatch)
    with client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "简短回答"},
                        {"role": "user", "content": "Hello there"}, {"role": "tool", "content": '{"temp": 21}'}],
                        "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    want = [s["[gMASK]"], s["sop"]]
    for role, content in (("system", "简短回答"), ("user", "Hello there"), ("observation", '{"temp": 21}')):
        want += [s[f"<|{role}|>"]] + sp.encode("\n") + sp.encode(content)
    want += [s["<|assistant|>"]]
    (req,) = seen
    assert req.prompt_ids == want, show(req.prompt_ids, want)
    assert r.json()["usage"]["prompt_tokens"] == len(want)
    assert set(req.params.stop_ids) == {sp.eos_id(), s["<|user|>"], s["<|observation|>"]}


def test_server_chatglm_6b_reads_its_prompt_as_a_blank(tok, monkeypatch):
    pytest.importorskip("fastapi")
    client, seen = served(tiny(tok.vocab_size, "chatglm", position="rope_2d"), tok, monkeypatch)
    with client:
        r = client.post("/v1/chat/completions", json={"messages": QA, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    (req,) = seen
    body = tok.encode("[Round 0]\n问：hi\n答：hello\n[Round 1]\n问：more\n答：")
    assert req.prompt_ids == body + [tok.special("gmask"), tok.special("sop")]
    assert req.sep == len(body) + 1, "Part A (through [gMASK]) is read bidirectionally"
    assert set(req.params.stop_ids) >= {tok.special("eop")}


def test_server_codegeex4_sees_the_suffix(tok, monkeypatch):
    pytest.importorskip("fastapi")
    fim = bpe_with(tok, CODE_MARKERS)
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    want = FORMATS["codegeex4"].infill(fim, fim.encode(prefix), fim.encode(suffix))
    client, seen = served(tiny(fim.vocab_size, "codegeex4"), fim, monkeypatch)
    with client:
        a = client.post("/infill", json={"input_prefix": prefix, "input_suffix": suffix, "n_predict": 2})
        b = client.post("/v1/completions", json={"prompt": prefix, "suffix": suffix, "max_tokens": 2})
        c = client.post("/v1/completions", json={"prompt": prefix, "max_tokens": 2})
    assert a.status_code == b.status_code == c.status_code == 200, (a.text, b.text, c.text)
    infill, completion, plain = seen
    for req in (infill, completion):
        assert req.prompt_ids == want, show(req.prompt_ids, want)
        assert req.params.stop == (), "the model sees the suffix: no guessed stop strings"
        assert set(req.params.stop_ids) == {fim.token_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}
    assert plain.prompt_ids == [fim.special("gmask"), fim.special("sop")] + fim.encode(prefix)
    assert a.json()["tokens_evaluated"] == len(want)


def test_server_refuses_chat_for_codegeex2(sp_model, monkeypatch):
    pytest.importorskip("fastapi")
    tok, _, _ = sp_tokenizer(sp_model, CHATGLM2_SPECIALS)
    client, seen = served(tiny(tok.vocab_size, "codegeex2"), tok, monkeypatch)
    with client:
        r = client.post("/v1/chat/completions", json={"messages": QA, "max_tokens": 3})
    assert r.status_code == 400 and "no chat format" in r.json()["error"]["message"], r.text
    assert not seen


def test_generate_chat_uses_the_models_format(sp_model):
    """`glmkit chat`'s path (generate.chat / chat_stream) renders and stops as the model's format does."""
    from glmkit.generate import chat, chat_stream, generate
    from glmkit.sampling import SamplingParams

    tok, sp, s = sp_tokenizer(sp_model, CHATGLM2_SPECIALS)
    model = tiny(tok.vocab_size, "chatglm2")
    p = SamplingParams(max_new_tokens=4, temperature=0)
    ids, _ = FORMATS["chatglm2"].render(tok, QA, True)
    (ref,) = generate(model, [ids], SamplingParams(max_new_tokens=4, temperature=0, stop_ids=(sp.eos_id(),)), tok)
    c = chat(model, tok, QA, p)
    assert c.token_ids == ref.token_ids and c.text == ref.text
    assert "".join(chat_stream(model, tok, QA, p)) == ref.text


def test_generate_infill_reads_codegeex4s_prompt(tok):
    """`generate.infill` on a CodeGeeX4 model generates from its infilling prompt (it sees the suffix)."""
    from glmkit.generate import generate, infill
    from glmkit.sampling import SamplingParams

    fim = bpe_with(tok, CODE_MARKERS)
    model = tiny(fim.vocab_size, "codegeex4")
    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    ids = FORMATS["codegeex4"].infill(fim, fim.encode(prefix), fim.encode(suffix))
    stops = tuple(FORMATS["codegeex4"].stop_ids(fim))
    (ref,) = generate(model, [ids], SamplingParams(max_new_tokens=5, temperature=0, stop_ids=stops), fim)
    res = infill(model, fim, prefix, suffix, SamplingParams(max_new_tokens=5, temperature=0))
    assert res.spans[0].token_ids == ref.token_ids and res.text == prefix + ref.text + suffix
