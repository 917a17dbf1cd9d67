"""Token shards: a corpus tokenized once into flat numpy memmaps, documents separated by eos.

    glmkit data tokenize --tokenizer tok/ [--corpus ~/.cache/glmkit/corpus] --out shards/
    shards = TokenShards("shards/"); shards.read("train", start, n)   # np.ndarray of ids

Layout of a shard directory:
    index.json            dtype, vocab size, eos id, tokenizer hash, domains, per split: shard
                          files with token counts, documents, characters and tokens per domain
    {split}-00000.bin     raw token ids (uint16 when the vocabulary fits, else uint32)
    {split}-docs.npy      (n_docs, 4) int64: global start, tokens, characters, domain index
The directory is written under a temporary name and renamed when complete, so a killed run never
leaves shards that look finished. Tokenization runs in `tokenizers`' Rust thread pool (all cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

SPLITS = ("train", "heldout")


def _iter_jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: invalid JSON ({e})") from None


def write_shards(corpus_dir: str | Path, tokenizer, out_dir: str | Path, shard_tokens: int = 1 << 27,
                 batch_docs: int = 512, progress: bool = True) -> dict:
    """Tokenize CORPUS/{train,heldout}.jsonl ({"text", "domain", ...} per line) into `out_dir`."""
    from tqdm import tqdm

    corpus_dir, out_dir = Path(corpus_dir), Path(out_dir)
    missing = [s for s in SPLITS if not (corpus_dir / f"{s}.jsonl").exists()]
    if missing:
        raise FileNotFoundError(f"{corpus_dir} has no {', '.join(s + '.jsonl' for s in missing)}; run `glmkit data build` first")
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; choose a new directory (shards are never overwritten in place)")
    V = tokenizer.vocab_size
    dtype = np.uint16 if V <= 1 << 16 else np.uint32
    eos = tokenizer.special("eos")
    tok_json = tokenizer.tok.to_str().encode()
    index = {"dtype": np.dtype(dtype).name, "vocab_size": V, "eos_id": eos,
             "tokenizer_sha256": hashlib.sha256(tok_json).hexdigest(), "domains": [], "splits": {}}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tokenizer.save(tmp)  # the shards are only meaningful with this exact tokenizer
        for split in SPLITS:
            index["splits"][split] = _write_split(corpus_dir / f"{split}.jsonl", tokenizer, tmp, split, dtype, eos,
                                                  shard_tokens, batch_docs, index["domains"], progress, tqdm)
        (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def _write_split(path, tokenizer, out, split, dtype, eos, shard_tokens, batch_docs, domains, progress, tqdm):
    shards, docs = [], []
    stats: dict[str, dict] = {}
    buf: list[np.ndarray] = []
    buffered = total = 0

    def flush():
        nonlocal buf, buffered
        if not buffered:
            return
        name = f"{split}-{len(shards):05d}.bin"
        np.concatenate(buf).astype(dtype).tofile(out / name)
        shards.append({"file": name, "tokens": buffered})
        buf, buffered = [], 0

    def encode(batch):
        nonlocal total, buffered
        for d, ids in zip(batch, tokenizer.encode_batch([d["text"] for d in batch])):
            dom = d.get("domain", "other")
            if dom not in domains:
                domains.append(dom)
            arr = np.asarray(ids + [eos], dtype=np.int64)
            docs.append((total, len(arr), len(d["text"]), domains.index(dom)))
            s = stats.setdefault(dom, {"docs": 0, "chars": 0, "tokens": 0})
            s["docs"] += 1
            s["chars"] += len(d["text"])
            s["tokens"] += len(arr)
            buf.append(arr)
            buffered += len(arr)
            total += len(arr)
            if buffered >= shard_tokens:
                flush()

    batch = []
    for d in tqdm(_iter_jsonl(path), desc=f"tokenize {split}", unit=" docs", disable=not progress):
        if not isinstance(d.get("text"), str):
            raise ValueError(f"{path}: a document without a string 'text' field: {str(d)[:80]}")
        batch.append(d)
        if len(batch) == batch_docs:
            encode(batch)
            batch = []
    if batch:
        encode(batch)
    flush()
    np.save(out / f"{split}-docs.npy", np.asarray(docs, dtype=np.int64).reshape(-1, 4))
    for s in stats.values():
        s["chars_per_token"] = round(s["chars"] / max(1, s["tokens"]), 3)
    return {"shards": shards, "tokens": total, "docs": len(docs), "per_domain": stats}


class TokenShards:
    """Read-only view of a shard directory: memmapped ids and the document table per split."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_file = self.path / "index.json"
        if not index_file.exists():
            raise FileNotFoundError(f"{self.path} has no index.json; create shards with `glmkit data tokenize`")
        self.index = json.loads(index_file.read_text())
        self.dtype = np.dtype(self.index["dtype"])
        self.eos_id = self.index["eos_id"]
        self._maps: dict[str, list[np.ndarray]] = {}
        self._starts: dict[str, np.ndarray] = {}
        for split, info in self.index["splits"].items():
            maps = []
            for s in info["shards"]:
                f = self.path / s["file"]
                if not f.exists() or f.stat().st_size != s["tokens"] * self.dtype.itemsize:
                    raise ValueError(f"{f}: missing or of the wrong size for {s['tokens']} tokens; re-create the shards")
                maps.append(np.memmap(f, dtype=self.dtype, mode="r"))
            self._maps[split] = maps
            self._starts[split] = np.cumsum([0] + [s["tokens"] for s in info["shards"]])

    def num_tokens(self, split: str) -> int:
        return int(self._starts[split][-1])

    def read(self, split: str, start: int, n: int) -> np.ndarray:
        """Tokens [start, start+n) of a split as int64, across shard boundaries."""
        starts, maps = self._starts[split], self._maps[split]
        end = min(start + n, int(starts[-1]))
        out, pos = [], start
        k = int(np.searchsorted(starts, pos, side="right")) - 1
        while pos < end:
            lo = pos - starts[k]
            take = min(end - pos, len(maps[k]) - lo)
            out.append(np.asarray(maps[k][lo : lo + take], dtype=np.int64))
            pos += take
            k += 1
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def docs(self, split: str) -> np.ndarray:
        return np.load(self.path / f"{split}-docs.npy")

    def tokenizer(self):
        from ..tokenizer import load_tokenizer

        return load_tokenizer(self.path)


def main(argv=None) -> int:
    from ..tokenizer import load_tokenizer

    p = argparse.ArgumentParser(prog="glmkit data tokenize", description="Tokenize a built corpus into memmap shards.")
    p.add_argument("--tokenizer", required=True, help="directory with tokenizer.json (or the file)")
    p.add_argument("--corpus", default=None, help="corpus directory with train.jsonl and heldout.jsonl "
                   "(default: $GLMKIT_CACHE/corpus or ~/.cache/glmkit/corpus)")
    p.add_argument("--out", required=True, help="new directory for the shards")
    p.add_argument("--shard-tokens", type=int, default=1 << 27)
    a = p.parse_args(argv)
    corpus = Path(a.corpus) if a.corpus else Path(os.environ.get("GLMKIT_CACHE", Path.home() / ".cache" / "glmkit")) / "corpus"
    index = write_shards(corpus, load_tokenizer(a.tokenizer), a.out, a.shard_tokens)
    for split, info in index["splits"].items():
        print(f"{split}: {info['docs']:,} docs, {info['tokens']:,} tokens")
        for dom, s in info["per_domain"].items():
            print(f"  {dom:14s} {s['docs']:>8,} docs {s['chars']:>12,} chars {s['tokens']:>11,} tokens  {s['chars_per_token']} chars/token")
    return 0
