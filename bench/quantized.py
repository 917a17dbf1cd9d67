"""Weight-only int8 / int4 against bf16: decode speed, model bytes, and held-out quality, one run.

    .venv/bin/python bench/quantized.py                                   # 120m speed + embedded-model quality
    .venv/bin/python bench/quantized.py --size 500m --corpus ~/.cache/glmkit/corpus --docs 64

Speed: a random-init GLM-4-shaped model (the `bench/decode.py` shapes, vocabulary 16,384) in bf16,
then quantized to int8 (per channel) and int4 (group 64, 32); greedy decode of --new-tokens tokens
at batch 1 through `glmkit.generate.generate`, median of --repeats, all variants timed in turn.
Quality: the embedded default model (or --model) in bf16, int8 and int4, held-out bits per
character per domain on the corpus's heldout.jsonl (GLM generation from nothing, see
evaluate.py); perplexity ratios follow from bits/char differences: ppl ratio = 2**(delta bpc *
chars/token). Random weights say nothing about quality, so quality uses a trained model.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode import SIZES  # noqa: E402  (same shapes as the decode benchmark)

import glmkit  # noqa: E402
from glmkit.config import ModelConfig  # noqa: E402
from glmkit.generate import SamplingParams, generate  # noqa: E402
from glmkit.model import GLM  # noqa: E402
from glmkit.quantize import quantize_model  # noqa: E402

VARIANTS = (("bf16", None, None), ("int8", 8, None), ("int4 g64", 4, 64), ("int4 g32", 4, 32))


def nbytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def variant(model, bits, group):
    m = copy.deepcopy(model)
    if bits:
        quantize_model(m, bits, group or 64)
        for t in list(m.parameters()) + [b for _, b in m.named_buffers() if b.is_floating_point()]:
            t.data = t.data.to(torch.bfloat16)
    return m.eval()


def speed(size: str, new_tokens: int, repeats: int):
    s = SIZES[size]
    cfg = ModelConfig(vocab_size=16384, dim=s["hidden_size"], n_layers=s["num_hidden_layers"], n_heads=s["num_attention_heads"],
                      n_kv_heads=2, head_dim=s["head_dim"], ffn_dim=s["intermediate_size"], position="rope_partial",
                      qkv_bias=True, tie_embeddings=False, max_seq_len=1024)
    torch.manual_seed(0)
    base = GLM(cfg).to(torch.bfloat16).eval()
    models = {name: variant(base, bits, group) for name, bits, group in VARIANTS}
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8]]
    times = {n: [] for n in models}
    for n, m in models.items():
        generate(m, prompt, SamplingParams(max_new_tokens=4, temperature=0))  # warm-up
    for _ in range(repeats):
        for n, m in models.items():
            t = time.perf_counter()
            generate(m, prompt, params)
            times[n].append(time.perf_counter() - t)
    out = {}
    for n, m in models.items():
        out[n] = {"tok_s": new_tokens / statistics.median(times[n]), "bytes": nbytes(m)}
    return out


def quality(model_path, corpus: Path, docs: int, seq_len: int):
    from glmkit.evaluate import bits_per_char_texts

    tok = glmkit.load_tokenizer(model_path or glmkit.convert.default_model_path())
    base = glmkit.load(model_path, dtype=torch.float32).eval()
    texts: dict[str, list[str]] = {}
    with open(corpus / "heldout.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            if len(texts.setdefault(d["domain"], [])) < docs:
                texts[d["domain"]].append(d["text"])
    out = {}
    for name, bits, group in VARIANTS:
        m = variant(base, bits, group)
        with torch.no_grad():
            out[name] = {k: v["bpc"] for k, v in bits_per_char_texts(m, tok, texts, seq_len).items()}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="120m", choices=[k for k in SIZES])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default=None, help="trained checkpoint for quality (default: the embedded model)")
    p.add_argument("--corpus", default=str(Path(os.environ.get("GLMKIT_CACHE", Path.home() / ".cache" / "glmkit")) / "corpus"))
    p.add_argument("--docs", type=int, default=32, help="held-out documents per domain")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--skip-quality", action="store_true")
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    sp = speed(a.size, a.new_tokens, a.repeats)
    print(f"\n| {a.size} variant | decode tok/s (batch 1) | vs bf16 | model MiB |")
    print("|---|---|---|---|")
    for n, r in sp.items():
        print(f"| {n} | {r['tok_s']:.1f} | {r['tok_s'] / sp['bf16']['tok_s']:.2f}x | {r['bytes'] / 2**20:.0f} |")
    if a.skip_quality or not (Path(a.corpus) / "heldout.jsonl").exists():
        print("\n(quality skipped: no corpus; run `glmkit data build` or pass --corpus)")
        return
    q = quality(a.model, Path(a.corpus), a.docs, a.seq_len)
    domains = list(q["bf16"])
    print("\n| variant | " + " | ".join(f"{d} bits/char" for d in domains) + " |")
    print("|---|" + "---|" * len(domains))
    for n, r in q.items():
        print(f"| {n} | " + " | ".join(f"{r[d]:.4f} ({(r[d] / q['bf16'][d] - 1) * 100:+.2f}%)" for d in domains) + " |")


if __name__ == "__main__":
    main()
