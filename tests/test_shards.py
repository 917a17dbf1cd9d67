"""Token shards: what goes in comes out, per-domain statistics, atomic creation, corruption caught.\nThe tokenizer is conftest's `tok` (byte-level: it encodes any text)."""

import json

import numpy as np
import pytest

from glmkit.data.shards import TokenShards, write_shards

DOCS = [("床前明月光，疑是地上霜。", "zh_classical"), ("The cat sat on the mat.", "en"),
        ("def f(x):\n    return x\n", "code"), ("今天天气很好。我们去公园吧！", "zh_modern")]


def make_corpus(path, n=40):
    path.mkdir(parents=True, exist_ok=True)
    for split, k in (("train", n), ("heldout", 4)):
        with open(path / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i in range(k):
                text, dom = DOCS[i % len(DOCS)]
                f.write(json.dumps({"text": f"{i} {text}", "domain": dom, "source": "t", "id": i}, ensure_ascii=False) + "\n")
    return path


def test_shards_round_trip(tmp_path, tok):
    corpus = make_corpus(tmp_path / "corpus")
    index = write_shards(corpus, tok, tmp_path / "shards", shard_tokens=100, progress=False)
    sh = TokenShards(tmp_path / "shards")
    assert sh.dtype == np.uint16 and len(index["splits"]["train"]["shards"]) > 3  # really sharded
    docs = sh.docs("train")
    eos = tok.special("eos")
    lines = (corpus / "train.jsonl").read_text(encoding="utf-8").splitlines()
    for (start, n, chars, dom), line in zip(docs, lines):
        ids = sh.read("train", int(start), int(n))  # may span two shard files
        assert ids[-1] == eos and tok.decode(ids[:-1]) == json.loads(line)["text"]
        assert chars == len(json.loads(line)["text"]) and index["domains"][dom] == json.loads(line)["domain"]
    assert sh.num_tokens("train") == int(docs[:, 1].sum()) == index["splits"]["train"]["tokens"]
    per = index["splits"]["train"]["per_domain"]
    assert set(per) == {d for _, d in DOCS} and sum(s["docs"] for s in per.values()) == 40
    assert sh.tokenizer().encode("床前") == tok.encode("床前")  # the tokenizer travels with the shards
    assert len(sh.read("train", sh.num_tokens("train") - 3, 10)) == 3  # reads stop at the end


def test_shards_refuse_overwrite_and_missing_corpus(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="run `glmkit data build` first"):
        write_shards(tmp_path / "nothing", tok, tmp_path / "s")
    corpus = make_corpus(tmp_path / "corpus", n=4)
    write_shards(corpus, tok, tmp_path / "s", progress=False)
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_shards(corpus, tok, tmp_path / "s", progress=False)


def test_interrupted_write_leaves_nothing(tmp_path, tok):
    corpus = make_corpus(tmp_path / "corpus", n=4)
    with open(corpus / "heldout.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"heldout.jsonl:5: invalid JSON"):
        write_shards(corpus, tok, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.*"))


def test_truncated_shard_is_caught(tmp_path, tok):
    write_shards(make_corpus(tmp_path / "corpus"), tok, tmp_path / "s", progress=False)
    f = tmp_path / "s" / "train-00000.bin"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(ValueError, match="train-00000.bin: missing or of the wrong size"):
        TokenShards(tmp_path / "s")
