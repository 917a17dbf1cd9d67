"""Tokenizer: lossless round trips, streaming decode, special ids by role, chat template, SentencePiece."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import glmkit
from glmkit.cli import main as cli
from glmkit.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_bpe

SAMPLES = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "人民日报：今天，北京举行了新闻发布会。",
    "The quick brown fox jumps over the lazy dog. It's 2026!",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 递归\n",
    "emoji 😀🦊👨‍👩‍👧 and ZWJ, tabs\tand  double  spaces\r\n",
]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(texts=SAMPLES * 30, vocab_size=400)


@pytest.mark.parametrize("text", SAMPLES + ["", " ", "\n\n", "é̃ combining", "\x00\x7f control", "[MASK] looks special"])
def test_round_trip_is_lossless(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_by_name_and_role(tok):
    assert [tok.token_id(n) for n in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.special("gmask") == tok.token_id("[gMASK]") and tok.special("sop") == tok.token_id("<sop>")
    with pytest.raises(KeyError, match="unknown special role 'cls'"):
        tok.special("cls")
    # special tokens are never produced by plain text, so a user cannot inject a mask by typing it
    assert tok.token_id("[MASK]") not in tok.encode("[MASK]")
    assert tok.encode("a[MASK]b", allow_special=True) == tok.encode("a") + [tok.token_id("[MASK]")] + tok.encode("b")


@settings(max_examples=60, deadline=None)
@given(text=st.sampled_from(SAMPLES) | st.text(max_size=40), cuts=st.lists(st.integers(0, 60), max_size=6))
def test_incremental_decode_equals_full_decode(tok, text, cuts):
    ids = tok.encode(text)
    dec = tok.incremental_decoder()
    pieces = [dec.add(i) for i in ids]
    assert "".join(pieces) + dec.flush() == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text  # never half a character
    # decoding from a restart point (as a stream resumed mid-way would) composes too
    k = min(cuts[0], len(ids)) if cuts else 0
    d1, d2 = tok.incremental_decoder(), tok.incremental_decoder()
    a = "".join(d1.add(i) for i in ids[:k]) + d1.flush()
    b = "".join(d2.add(i) for i in ids[k:]) + d2.flush()
    assert tok.decode(ids[:k]) == a and tok.decode(ids[k:]) == b


def test_incremental_decoder_holds_partial_utf8(tok):
    ids = tok.encode("😀")
    assert len(ids) > 1, "byte-level BPE splits a rare emoji into byte tokens"
    dec = tok.incremental_decoder()
    assert [dec.add(i) for i in ids][:-1] == [""] * (len(ids) - 1)


def test_chat_template_and_loss_mask(tok):
    msgs = [{"role": "system", "content": "简短回答"}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "再见"},
            {"role": "assistant", "content": "再见。"}]
    ids, mask = tok.render_chat(msgs)
    assert ids[:2] == [tok.special("gmask"), tok.special("sop")]
    text = tok.decode(ids)
    assert text == "[gMASK]<sop><|system|>\n简短回答<|user|>\n你好<|assistant|>\n你好！<|user|>\n再见<|assistant|>\n再见。<|endoftext|>"
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    # both replies, the role token that ends the first and the eos that ends the last
    assert learned == "\n你好！<|user|>\n再见。<|endoftext|>"
    prompt, pmask = tok.render_chat(msgs[:4], add_generation_prompt=True)
    assert tok.decode(prompt).endswith("<|user|>\n再见<|assistant|>") and len(pmask) == len(prompt)
    with pytest.raises(ValueError, match="role 'bot'"):
        tok.render_chat([{"role": "bot", "content": "x"}])
    assert set(tok.chat_stop_ids()) == {tok.special("eos"), tok.special("user"), tok.special("observation")}


def test_sentence_end_table(tok):
    table = tok.sentence_end_table()
    assert table.shape == (tok.vocab_size,)
    for i in tok.encode("举头望明月。低头思故乡！"):
        s = tok.decode([i])
        assert table[i] == (s[-1] in "。！"), s


def test_train_cli_and_load(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(SAMPLES * 20), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in SAMPLES * 20), encoding="utf-8")
    assert cli(["tokenizer", "train", "--vocab", "300", "--out", str(tmp_path / "tok"), str(tmp_path / "a.txt")]) == 0
    t = glmkit.load_tokenizer(tmp_path / "tok")
    assert t.decode(t.encode(SAMPLES[0])) == SAMPLES[0] and t.vocab_size <= 300
    assert cli(["tokenizer", "train", "--vocab", "300", "--out", str(tmp_path / "tok2"), str(tmp_path / "b.jsonl")]) == 0
    assert cli(["tokenizer", "train", "--out", str(tmp_path / "tok3"), str(tmp_path / "missing.txt")]) == 1


def test_sentencepiece_unigram_matches_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "hello world this is a test",
            "春眠不觉晓，处处闻啼鸟。 the cat sat on the mat"] * 50
    (tmp_path / "t.txt").write_text("\n".join(text), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "t.txt"), model_prefix=str(tmp_path / "cog-pretrain"), vocab_size=60, model_type="unigram",
        user_defined_symbols=["[MASK]", "[sMASK]", "[gMASK]", "<|startofpiece|>", "<|endofpiece|>", "<|endoftext|>"],
        minloglevel=2, hard_vocab_limit=False,
    )
    ours = load_tokenizer(tmp_path)  # finds cog-pretrain.model, as glm-large-chinese ships it
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "cog-pretrain.model"))
    for s in ["床前明月光 hello", "举头望明月，低头思故乡。test", "  the   cat sat  ", "ｈｅｌｌｏ　world"]:
        assert ours.encode(s) == ref.encode(s), s
        assert ours.decode(ours.encode(s)) == ref.decode(ref.encode(s))
    assert ours.special("sop") == ref.piece_to_id("<|startofpiece|>")
    assert ours.special("eop") == ref.piece_to_id("<|endofpiece|>")
    # SentencePiece always matches user-defined symbols in text, and so do we for these models
    # (the piece lives in the unigram vocab); byte-level BPE tokenizers do not (test above)
    # (whitespace next to a special piece can segment differently: SentencePiece emits a lone "▁")
    assert ref.piece_to_id("[MASK]") in ours.encode("the [MASK] sat", allow_special=True)
    (tmp_path / "bad.model").write_bytes(b"not a protobuf \xff\xff")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")
