"""Upstream vocabularies read into glmkit's Tokenizer with the reference ids: GLM-4's tiktoken rank file
against `tiktoken`, ChatGLM2/3's SentencePiece BPE model against `sentencepiece`, on rank files and
models built here, and checkpoint directories laid out as the releases are (tokenizer.model +
tokenizer_config.json)."""

import base64
import io
import json
import random
import re

import pytest

from glmkit.convert import tokenizer_files
from glmkit.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, load_tokenizer, train_bpe
from glmkit.vocab import CHATGLM2_SPECIALS, CHATGLM3_SPECIALS, GLM4_SPECIALS, byte_level_alphabet

tiktoken = pytest.importorskip("tiktoken")
spm = pytest.importorskip("sentencepiece")

CORPUS = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。", "人民日报：今天，北京举行了新闻发布会（第３次）！",
    "The quick brown fox jumps over the lazy dog. It's 2026; they'll say I'M done.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 递归\n",
    "\tif x:\n\t\treturn {'a': [1, 2, 3]}\r\n", "emoji 😀🦊 family 👨‍👩‍👧‍👦 flag 🇨🇳 and ZWJ",
    "digits 1234567890 0.5 3,141,592 ١٢٣", "\n\n", "   ", "a  b   c    d", " leading and trailing ",
    "「引号」、『书名』……——～", "ｈｅｌｌｏ　ｗｏｒｌｄ", "é̃ combining, ß, ǅ, İstanbul", "\u00a0nbsp\u2009thin",
]
TEXTS = CORPUS + ["", " ", "x", "  hello", "\n \n", "a\n\n\nb", "\t\t", "😀", "中"]


def _fuzz(alphabet: str, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def _diff(ours, ref, texts, show=lambda ids: ids):
    """The texts where the id lists differ, with both, for the failure message."""
    bad = [(t, a, b) for t, a, b in zip(texts, ours, ref) if a != b]
    return f"{len(bad)}/{len(texts)} differ; first: " + "; ".join(f"{t!r}: ours {show(a)} ref {show(b)}" for t, a, b in bad[:3])


# ---- tiktoken ------------------------------------------------------------------------------------

def _ranks_from_bpe(texts, vocab_size) -> dict[bytes, int]:
    """A rank file as GLM-4's is made: a byte-level BPE trained here, its tokens as bytes in merge
    order (all 256 single bytes first), specials left out (they follow the ranks)."""
    tok = train_bpe(texts=texts, vocab_size=vocab_size)
    byte_of = {c: b for b, c in enumerate(byte_level_alphabet())}
    vocab = json.loads(tok.tok.to_str())["model"]["vocab"]
    ranks = {}
    for s, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        if s not in SPECIAL_TOKENS:
            ranks.setdefault(bytes(byte_of[c] for c in s), len(ranks))
    return ranks


def _random_ranks(n: int, alphabet: bytes, seed: int = 1) -> dict[bytes, int]:
    """Ranks whose tokens are random concatenations of earlier ones over a tiny alphabet: many ways to
    split each token, so merge order and ties are stressed far more than in a trained vocabulary."""
    rng = random.Random(seed)
    ranks = {bytes([b]): b for b in range(256)}
    toks = [bytes([c]) for c in alphabet]
    while len(ranks) < n:
        a, b = (toks[min(int(rng.expovariate(4 / len(toks))), len(toks) - 1)] for _ in range(2))
        if len(a + b) <= 16 and a + b not in ranks:
            ranks[a + b] = len(ranks)
            toks.append(a + b)
    return ranks


def _write_ranks(path, ranks):
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    return path


def _glm4_dir(tmp_path, ranks, specials=GLM4_SPECIALS, config=True):
    """A checkpoint directory as glm-4-9b-chat ships its tokenizer: tokenizer.model (ranks) and a
    tokenizer_config.json whose added_tokens_decoder places the specials after the ranks."""
    d = tmp_path / "glm4"
    d.mkdir()
    _write_ranks(d / "tokenizer.model", ranks)
    if config:
        added = {str(len(ranks) + k): {"content": s, "special": True} for k, s in enumerate(specials)}
        (d / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "ChatGLM4Tokenizer", "added_tokens_decoder": added,
            "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]}}))
    return d


@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    """(our Tokenizer loaded from a release-style directory, the tiktoken Encoding, the ranks)."""
    ranks = _ranks_from_bpe(CORPUS * 20, 700)
    tok = load_tokenizer(_glm4_dir(tmp_path_factory.mktemp("t"), ranks))
    specials = {s: len(ranks) + k for k, s in enumerate(GLM4_SPECIALS)}
    return tok, tiktoken.Encoding("glm4-test", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials), ranks


def test_byte_level_alphabet_is_the_one_tokenizers_applies():
    from tokenizers import pre_tokenizers

    alphabet = byte_level_alphabet()
    assert sorted(alphabet) == sorted(pre_tokenizers.ByteLevel.alphabet()) and len(set(alphabet)) == 256
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    chars = [chr(c) for c in range(0x800)] + ["中", "\uffff", "😀", "\U0010ffff"]  # every byte a UTF-8 text can hold
    for c in chars:
        assert byte_level.pre_tokenize_str(c)[0][0] == "".join(alphabet[b] for b in c.encode()), repr(c)


def test_tiktoken_ids_equal_tiktoken(glm4):
    tok, enc, _ = glm4
    texts = TEXTS + _fuzz("ab =-._\n\t 19中文，。😀é'sS", 1500)
    ours, ref = tok.encode_batch(texts), [enc.encode_ordinary(t) for t in texts]
    assert ours == ref, _diff(ours, ref, texts)
    for t, ids in zip(texts, ours):
        assert tok.decode(ids) == enc.decode(ids) == t


@pytest.mark.parametrize("alphabet", [b"ab", b"ab =\n"])
def test_tiktoken_merge_order_on_tie_prone_ranks(tmp_path, alphabet):
    ranks = _random_ranks(2500, alphabet)
    tok = Tokenizer.from_tiktoken(_write_ranks(tmp_path / "r.model", ranks), {})
    enc = tiktoken.Encoding("stress", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    texts = _fuzz(alphabet.decode(), 3000, seed=len(alphabet))
    ours, ref = tok.encode_batch(texts), [enc.encode_ordinary(t) for t in texts]
    assert ours == ref, _diff(ours, ref, texts)


def test_tiktoken_takes_a_token_unreachable_by_merges_whole(tmp_path):
    # tiktoken emits a pre-token that is itself a token without merging ("xyz" here has no
    # "xy" or "yz" to be merged from); the BPE must do the same
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"xyz"] = 256
    ranks[b" xyz"] = 257
    tok = Tokenizer.from_tiktoken(_write_ranks(tmp_path / "r.model", ranks), {})
    enc = tiktoken.Encoding("u", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for t in ["xyz", "a xyz", "xyzxyz", "xy"]:
        assert tok.encode(t) == enc.encode_ordinary(t), t
    assert tok.encode("a xyz") == [ord("a"), 257]


def test_tiktoken_specials_at_their_ids_and_never_forged(glm4):
    tok, enc, ranks = glm4
    n = len(ranks)
    assert [tok.token_id(s) for s in GLM4_SPECIALS] == list(range(n, n + len(GLM4_SPECIALS)))
    assert (tok.special("eos"), tok.special("gmask"), tok.special("sop"), tok.special("user"), tok.special("observation")) \
        == (n, n + 2, n + 4, n + 7, n + 9)  # 151329, 151331, 151333, 151336, 151338 in GLM-4
    text = "hi<|user|>\n[gMASK]<sop>ok<|endoftext|>"
    assert tok.encode(text) == enc.encode_ordinary(text)  # user text: specials spelled out, as plain text
    assert tok.encode(text, allow_special=True) == enc.encode(text, allowed_special="all")
    assert tok.decode(tok.encode(text, allow_special=True)) == text
    assert tok.decode(tok.encode(text, allow_special=True), skip_special_tokens=True) == "hi\nok"


def test_converted_tokenizer_saves_and_reloads(glm4, sp_models, tmp_path):
    # glmkit writes tokenizer.json beside what it trains or fine-tunes from these checkpoints
    for k, tok in enumerate((glm4[0], Tokenizer.from_sentencepiece(sp_models["chatglm-nfkc"], CHATGLM3_SPECIALS))):
        tok.save(tmp_path / str(k))
        again = load_tokenizer(tmp_path / str(k))
        texts = TEXTS + ["<|user|>sop[gMASK]"]
        assert again.encode_batch(texts) == tok.encode_batch(texts) and again.vocab_size == tok.vocab_size
        assert again.special("sop") == tok.special("sop")


def test_tiktoken_without_config_uses_glm4_published_specials(tmp_path):
    ranks = _ranks_from_bpe(CORPUS * 5, 400)
    tok = load_tokenizer(_glm4_dir(tmp_path, ranks, config=False) / "tokenizer.model")
    assert tok.vocab_size == len(ranks) + 14
    assert tok.token_id("<|end_of_video|>") == len(ranks) + 13 and tok.special("assistant") == len(ranks) + 8


def test_tiktoken_config_specials_are_read(tmp_path):
    # a checkpoint declaring other specials (CodeGeeX4-style code tokens) gets exactly those
    ranks = _ranks_from_bpe(CORPUS * 5, 400)
    names = list(GLM4_SPECIALS[:10]) + ["<|code_prefix|>", "<|code_middle|>", "<|code_suffix|>"]
    tok = load_tokenizer(_glm4_dir(tmp_path, ranks, names))
    assert tok.token_id("<|code_suffix|>") == len(ranks) + 12 and tok.vocab_size == len(ranks) + 13
    with pytest.raises(KeyError):
        tok.token_id("<|begin_of_image|>")


def test_bare_sop_word_is_not_the_sop_role(tmp_path):
    # "sop" as an ordinary token of a vocabulary is not ChatGLM2/3's special "sop"
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"so"], ranks[b"sop"] = 256, 257
    tok = Tokenizer.from_tiktoken(_write_ranks(tmp_path / "r.model", ranks), {"<|endoftext|>": 258})
    assert tok.token_id("sop") == 257
    with pytest.raises(KeyError, match="no sop token"):
        tok.special("sop")


def test_tiktoken_bad_files_name_the_problem(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(b"aGVsbG8= 0\nnot base64!! x\n")
    with pytest.raises(ValueError, match=r"tokenizer.model: line 2 is not `base64-token rank`"):
        load_tokenizer(d)
    ranks = {bytes([b]): b for b in range(256)}
    _write_ranks(d / "tokenizer.model", ranks)
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"200": {"content": "<|endoftext|>"}}}))
    with pytest.raises(ValueError, match="has id 200, inside the 256 ranks"):
        load_tokenizer(d)
    # a gap in the declared ids holds a placeholder, so every declared token keeps its id
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        "256": {"content": "<|endoftext|>"}, "259": {"content": "<|user|>"}}}))
    tok = load_tokenizer(d)
    assert (tok.special("eos"), tok.special("user"), tok.token_id("<|reserved_257|>"), tok.vocab_size) == (256, 259, 257, 260)
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(d)
    _write_ranks(d / "tokenizer.model", {**ranks, b"<|user|>": 256})
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"257": {"content": "<|user|>"}}}))
    with pytest.raises(ValueError, match=re.escape("special token '<|user|>' is also an ordinary token")):
        load_tokenizer(d)
    del ranks[b"A"]
    (d / "tokenizer_config.json").unlink()
    _write_ranks(d / "tokenizer.model", {t: i for i, t in enumerate(ranks)})
    with pytest.raises(ValueError, match=r"no rank for the single bytes \[65\]"):
        load_tokenizer(d)
    (d / "tokenizer.model").write_bytes(b"\x0a\x0bgarbage\xff\xfe")  # neither ranks nor a protobuf
    with pytest.raises(ValueError, match="tokenizer.model: not a SentencePiece model"):
        load_tokenizer(d)


# ---- SentencePiece BPE (ChatGLM2/3) --------------------------------------------------------------

# What ChatGLM3's released vocabulary shows of its trainer: byte pieces <0x00>..<0xFF> at ids 3..258
# (byte fallback), whitespace-only pieces such as "▁▁" (so runs of spaces are kept), no piece for
# "\n" (newlines go through byte fallback). Its normalization rule is not visible there: both are tested.
CHATGLM_OPTIONS = dict(model_type="bpe", byte_fallback=True, remove_extra_whitespaces=False,
                       allow_whitespace_only_pieces=True, split_digits=True, add_dummy_prefix=True)
SP_OPTIONS = {
    "chatglm-identity": dict(CHATGLM_OPTIONS, normalization_rule_name="identity"),
    "chatglm-nfkc": dict(CHATGLM_OPTIONS, normalization_rule_name="nmt_nfkc"),
    "defaults": dict(model_type="bpe"),  # NFKC, collapsed whitespace, unknown pieces instead of bytes
    "no-dummy-prefix": dict(model_type="bpe", byte_fallback=True, add_dummy_prefix=False),
}


def _train_sp(**options) -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 30), model_writer=out, vocab_size=700,
                                   hard_vocab_limit=False, minloglevel=2, **options)
    return out.getvalue()


@pytest.fixture(scope="module")
def sp_models():
    return {name: _train_sp(**opts) for name, opts in SP_OPTIONS.items()}


@pytest.mark.parametrize("name", list(SP_OPTIONS))
def test_sentencepiece_bpe_ids_equal_sentencepiece(sp_models, name):
    ref = spm.SentencePieceProcessor(model_proto=sp_models[name])
    tok = Tokenizer.from_sentencepiece(sp_models[name], CHATGLM3_SPECIALS)
    texts = TEXTS + _fuzz("ab =-._\n\t 19中文，。😀é　ｈ", 800)
    ours, want = tok.encode_batch(texts), [ref.encode(t) for t in texts]
    assert ours == want, _diff(ours, want, texts, lambda ids: [ref.id_to_piece(i) if i < ref.vocab_size() else i for i in ids])
    for t, ids in zip(texts, ours):
        assert tok.decode(ids) == ref.decode(ids), t
    n = ref.vocab_size()
    assert [tok.token_id(s) for s in CHATGLM3_SPECIALS] == list(range(n, n + len(CHATGLM3_SPECIALS)))


@pytest.mark.parametrize("options", [dict(byte_fallback=True), dict(CHATGLM_OPTIONS, normalization_rule_name="identity"),
                                     dict(byte_fallback=True, add_dummy_prefix=False)])
def test_sentencepiece_bpe_user_defined_pieces(options):
    # SentencePiece takes user-defined pieces whole anywhere in the text (GGUF llama-type vocabularies
    # have them; ChatGLM2/3 do not); one holding a space never matches
    model = _train_sp(**dict(options, model_type="bpe"), user_defined_symbols=["[X]", "<|user|>", "a b"])
    ref = spm.SentencePieceProcessor(model_proto=model)
    tok = Tokenizer.from_sentencepiece(model)
    rng = random.Random(3)
    parts = ["[X]", "<|user|>", "a b", " ", "  ", "a", "b", "中", "\n", "😀", "[", "X]", "<|"]
    texts = ["".join(rng.choice(parts) for _ in range(rng.randint(1, 8))) for _ in range(1500)] + CORPUS
    # left over, said in glmkit.vocab: a text that is, once normalized, exactly one user-defined piece
    leftover = [t for t in texts if ref.encode(t, out_type=str) in (["▁", "[X]"], ["▁", "<|user|>"])]
    assert [tok.encode(t) for t in leftover] == [ref.encode(t)[1:] for t in leftover]
    texts = [t for t in texts if t not in leftover]
    ours, want = tok.encode_batch(texts), [ref.encode(t) for t in texts]
    assert ours == want, _diff(ours, want, texts, lambda ids: [tok.tok.id_to_token(i) for i in ids])
    assert [tok.decode(ids) for ids in ours] == [ref.decode(ids) for ids in ours]


def test_sentencepiece_unigram_still_equal(tmp_path):
    model = _train_sp(model_type="unigram")
    ref = spm.SentencePieceProcessor(model_proto=model)
    tok = Tokenizer.from_sentencepiece(model)
    texts = [t for t in CORPUS if t.strip()]
    assert tok.encode_batch(texts) == [ref.encode(t) for t in texts]


def _chatglm_dir(tmp_path, model: bytes, declared=None, code=None, name="chatglm"):
    """A checkpoint directory as chatglm2-6b / chatglm3-6b ship their tokenizer."""
    d = tmp_path / name
    d.mkdir()
    (d / "tokenizer.model").write_bytes(model)
    config = {"tokenizer_class": "ChatGLMTokenizer", "eos_token": "</s>", "pad_token": "<unk>",
              "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}
    if declared is not None:
        config["added_tokens_decoder"] = {str(i): {"content": s, "special": False} for s, i in declared.items()}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    if code is not None:
        (d / "tokenization_chatglm.py").write_text(code)
    return d


def test_chatglm3_release_dir(sp_models, tmp_path):
    model = sp_models["chatglm-identity"]
    n = spm.SentencePieceProcessor(model_proto=model).vocab_size()
    # chatglm3-6b's tokenizer_config.json declares four of its specials, as here
    declared = {"[gMASK]": n + 1, "sop": n + 3, "<|user|>": n + 6, "<|assistant|>": n + 7}
    tok = load_tokenizer(_chatglm_dir(tmp_path, model, declared))
    assert (tok.special("gmask"), tok.special("sop"), tok.special("eop")) == (n + 1, n + 3, n + 4)
    assert (tok.special("system"), tok.special("observation"), tok.special("eos")) == (n + 5, n + 8, 2)
    ref = spm.SentencePieceProcessor(model_proto=model)
    text = "<|user|>\n你好 sop [gMASK]"
    assert tok.encode(text) == ref.encode(text)  # user text never becomes a special token
    ids = [tok.special("gmask"), tok.special("sop"), tok.special("user")] + tok.encode("\n你好")
    assert tok.decode(ids) == "[gMASK]sop<|user|> \n你好"  # each id's text; see the report on spaces


def test_chatglm2_and_old_chatglm3_dirs(sp_models, tmp_path):
    model = sp_models["chatglm-identity"]
    n = spm.SentencePieceProcessor(model_proto=model).vocab_size()
    glm2 = load_tokenizer(_chatglm_dir(tmp_path, model, name="chatglm2"))
    assert [glm2.token_id(s) for s in CHATGLM2_SPECIALS] == list(range(n, n + 5)) and glm2.vocab_size == n + 5
    with pytest.raises(KeyError, match="no user token"):
        glm2.special("user")
    # an older chatglm3-6b revision declares nothing; its remote code (read as text) lists the roles
    code = 'role_special_tokens = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]\n'
    glm3 = load_tokenizer(_chatglm_dir(tmp_path, model, code=code, name="chatglm3-old"))
    assert glm3.vocab_size == n + 9 and glm3.special("user") == n + 6


def test_chatglm_dir_checks(sp_models, tmp_path):
    model = sp_models["chatglm-identity"]
    n = spm.SentencePieceProcessor(model_proto=model).vocab_size()
    with pytest.raises(ValueError, match=r"declares 'sop' as id 7, but the model gives"):
        load_tokenizer(_chatglm_dir(tmp_path, model, {"sop": 7}, name="bad"))
    # another family's SentencePiece checkpoint: the tokens its config adds after the pieces are added
    d = tmp_path / "llama-like"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(model)
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        "0": {"content": "<unk>"}, str(n): {"content": "<pad>"}, str(n + 2): {"content": "<|im_end|>"}}}))
    tok = load_tokenizer(d)
    assert (tok.token_id("<pad>"), tok.token_id("<|im_end|>"), tok.vocab_size) == (n, n + 2, n + 3)
    # a tokenizer.json beside the model is not what the remote code reads: tokenizer.model wins
    d = _chatglm_dir(tmp_path, model, name="both")
    train_bpe(texts=CORPUS, vocab_size=300).save(d)
    assert load_tokenizer(d).special("sop") == n + 3
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["auto_map"]["AutoTokenizer"][1] = "tokenization_chatglm.ChatGLMTokenizerFast"  # then it is the json
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(d).special("sop") == 4
    (d / "tokenization_chatglm.py").write_text("# remote code\n")
    assert {p.name for p in tokenizer_files(d)} >= {"tokenizer.model", "tokenizer_config.json", "tokenization_chatglm.py"}


def test_streaming_decode_on_upstream_vocabularies(glm4, sp_models):
    # byte-level tokens and byte-fallback pieces both end inside characters; the stream never shows
    # half of one and adds up to the full decode
    for tok in (glm4[0], Tokenizer.from_sentencepiece(sp_models["chatglm-identity"], CHATGLM3_SPECIALS)):
        for text in CORPUS:
            ids = tok.encode(text)
            dec = tok.incremental_decoder()
            pieces = [dec.add(i) for i in ids]
            assert "".join(pieces) + dec.flush() == tok.decode(ids), text
            assert not any("\ufffd" in p for p in pieces), (text, pieces)


@pytest.mark.parametrize("family", ["glm4", "chatglm3"])
def test_server_chats_through_an_upstream_tokenizer(tmp_path, sp_models, family):
    # what `glmkit serve --model DIR` does with such a directory's tokenizer: chat, stream, stop
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from glmkit.server.app import create_app
    from tests.serving import make_model, sse

    if family == "glm4":
        d = _glm4_dir(tmp_path, _ranks_from_bpe(CORPUS * 5, 400))
    else:
        d = _chatglm_dir(tmp_path, sp_models["chatglm-identity"], code='["<|system|>", "<|observation|>"]')
    tok = load_tokenizer(d)
    msgs = [{"role": "system", "content": "简短回答"}, {"role": "user", "content": "你好 😀 <|assistant|>"}]
    with TestClient(create_app(make_model(tok), tok, family)) as client:
        r = client.post("/v1/chat/completions", json={"model": family, "messages": msgs, "max_tokens": 6})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] > len(msgs) * 2 and r.json()["choices"][0]["message"]["role"] == "assistant"
        r = client.post("/v1/chat/completions", json={"model": family, "messages": msgs, "max_tokens": 6, "stream": True})
        assert r.status_code == 200 and sse(r.text)[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_tokenizer_side_files_stay_inside_the_checkpoint(sp_models, tmp_path):
    # tokenizer_config.json and tokenization_chatglm.py are read (as data) only from inside the directory
    from glmkit.convert import CheckpointError

    outside = tmp_path / "elsewhere.py"
    outside.write_text('"<|observation|>"')
    d = _chatglm_dir(tmp_path, sp_models["chatglm-identity"], name="linked")
    (d / "tokenization_chatglm.py").symlink_to(outside)
    with pytest.raises(CheckpointError, match="'tokenization_chatglm.py' points outside"):
        load_tokenizer(d)
    (d / "tokenization_chatglm.py").unlink()
    (d / "tokenizer_config.json").unlink()
    (d / "tokenizer_config.json").symlink_to(outside)
    with pytest.raises(CheckpointError, match="'tokenizer_config.json' points outside"):
        load_tokenizer(d)
