"""int8 KV cache vs the model's dtype: quality and decode speed, side by side in one run.

    .venv/bin/python bench/kv_int8.py                       # quality (embedded model) + speed (glm-4-9b, 2 layers)
    .venv/bin/python bench/kv_int8.py --model /tmp/bm2      # speed on a checkpoint instead of random weights
    .venv/bin/python bench/kv_int8.py --attention-only      # glm-4-9b's attention, tiny weights: the step is attention
    .venv/bin/python bench/kv_int8.py --contexts 1024 --batches 1 --steps 2 --repeats 1   # smoke run

Quality, on the embedded default model in bf16 (`glmkit.load()`; it is tiny, 6 layers of 256 with
head_dim 32, so these numbers say little about a 9B model): a text (--text, default this repository's
README) read in chunks of 64 tokens through a paged cache with bf16 keys and through one with int8
keys, each chunk attending to the cache: the perplexity of each and the max |logit diff|. Then --gen
greedy tokens after the text's first 64 (native decode step): the bf16-KV run's tokens, the int8-KV
logits teacher-forced on them (max |logit diff|, argmax agreement), and how many tokens a free-running
int8-KV greedy run shares with the bf16 one before they first differ.

Speed: the native decode step (`GLM.step`, one token per row) of rows whose caches hold 1K / 4K / 8K
positions, batch 1 and 4, bf16 keys vs int8 keys, on the glm-4-9b preset sliced to --layers (random
bf16 weights: dim 4096, 32 query heads on 2 KV heads of 128, vocabulary 151552) or --model. The keys
are random (copied in from a contiguous cache, quantized on the way for int8): the speed does not
depend on their values. Every step rewrites the same slot, so the context stays fixed. Timed
alternately (bf16, int8, bf16, int8, ...): --repeats rounds of --steps steps each, the best round
kept; tok/s = batch x steps / time. The growth of a step from the smallest context is what attention
over the extra keys costs. --attention-only keeps glm-4-9b's attention (32 query heads on 2 KV heads of
128) and shrinks everything else (dim 256, FFN 256, vocabulary 1024), so the step is its attention and
the KV read shows through the noise of a shared machine. Compare the ratios, not the absolute figures.
Run from the repository root with it on the path (PYTHONPATH=.) to measure this checkout's glmkit.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from pathlib import Path

import quant_prefill  # beside this script in bench/: the CPU line
import torch

import glmkit
from glmkit import fused, kernels
from glmkit.config import get_preset
from glmkit.model import GLM, BlockPool, PagedKVCache

KV = {"bf16": None, "int8": torch.int8}  # None: the model's dtype (bf16 here)


def cpu_line() -> str:
    return f"{quant_prefill.cpu_line()}; {os.cpu_count()} CPUs; load {' '.join(f'{v:.2f}' for v in os.getloadavg())}"


# ---- quality ------------------------------------------------------------------------------------------------
@torch.no_grad()
def read_text(model, ids: torch.Tensor, kv, chunk: int = 64) -> torch.Tensor:
    """Logits (T, V) of ids (T,) read causally in chunks through a paged cache with keys in `kv`."""
    T = ids.shape[0]
    pool = BlockPool.for_model(model, -(-T // 16), 16, kv)
    cache = PagedKVCache(pool, 1, T)
    out = [model.prefill(ids[None, a:a + chunk], cache, position_ids=torch.arange(a, min(T, a + chunk))[None],
                         sep=0 if a == 0 else None)[0] for a in range(0, T, chunk)]
    cache.release(0)
    return torch.cat(out).float()


@torch.no_grad()
def decode(model, prompt: torch.Tensor, kv, n: int, forced: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens after prompt (T,) (or the logits of `forced` tokens fed instead), decode steps on a
    paged cache with keys in `kv`: (tokens, logits (n, V))."""
    T = prompt.shape[0]
    pool = BlockPool.for_model(model, -(-(T + n) // 16), 16, kv)
    cache = PagedKVCache(pool, 1, T + n)
    logits, toks, out = model.prefill(prompt[None], cache, last_only=True)[0, -1], [], []
    plan = fused.decode_plan(model)
    for k in range(n):
        out.append(logits.float())
        toks.append(int(logits.argmax()) if forced is None else forced[k])
        at = torch.tensor([[T + k]])
        logits = model.step(torch.tensor([[toks[-1]]]), at, cache, at, extent=T + k + 1, plan=plan)[0, -1]
    cache.release(0)
    return toks, torch.stack(out)


def quality(a):
    tok = glmkit.load_tokenizer(glmkit.convert.default_model_path())
    model = glmkit.load(dtype=torch.bfloat16).eval()
    ids = torch.tensor(tok.encode(Path(a.text).read_text(encoding="utf-8")))[: model.cfg.max_seq_len]
    print(f"quality: the embedded model ({model.cfg.n_layers} layers of {model.cfg.dim}, head_dim {model.cfg.head_dim}), "
          f"bf16 weights; {len(ids)} tokens of {a.text}")
    logits = {name: read_text(model, ids, kv) for name, kv in KV.items()}
    nll = {name: torch.nn.functional.cross_entropy(lg[:-1], ids[1:]).item() for name, lg in logits.items()}
    d = (logits["int8"] - logits["bf16"]).abs()
    print(f"  perplexity: bf16 KV {math.exp(nll['bf16']):.4f}, int8 KV {math.exp(nll['int8']):.4f} "
          f"({(math.exp(nll['int8'] - nll['bf16']) - 1) * 100:+.3f}%)")
    print(f"  reading: max |logit diff| {d.max():.4f}, mean {d.mean():.5f} (logits up to {logits['bf16'].abs().max():.1f}); "
          f"next-token argmax agrees at {(logits['int8'].argmax(-1) == logits['bf16'].argmax(-1)).float().mean() * 100:.2f}% of positions")
    prompt = ids[:64]
    ref_toks, ref = decode(model, prompt, None, a.gen)
    _, forced = decode(model, prompt, torch.int8, a.gen, forced=ref_toks)
    free, _ = decode(model, prompt, torch.int8, a.gen)
    same = next((i for i, (x, y) in enumerate(zip(ref_toks, free)) if x != y), a.gen)
    d = (forced - ref).abs()
    print(f"  greedy, {a.gen} tokens after 64 (native decode step): max |logit diff| {d.max():.4f} (teacher-forced), "
          f"argmax agrees at {(forced.argmax(-1) == ref.argmax(-1)).float().mean() * 100:.1f}% of steps, "
          f"free-running int8-KV greedy equals bf16-KV greedy for the first {same} of {a.gen} tokens")


# ---- speed --------------------------------------------------------------------------------------------------
def speed_model(a) -> GLM:
    if a.model:
        return glmkit.load(a.model, dtype=torch.bfloat16).eval()
    cfg = dataclasses.replace(get_preset("glm-4-9b"), n_layers=a.layers)
    if a.attention_only:
        cfg = dataclasses.replace(cfg, dim=256, ffn_dim=256, vocab_size=1024)
    with torch.device("meta"):
        model = GLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)  # no fp32 copy of 2.5 GB of embeddings and head
    model.init_weights(seed=0)
    return model.eval()


@torch.no_grad()
def speed(a):
    model = speed_model(a)
    cfg, plan = model.cfg, fused.decode_plan(model)
    if plan is None:
        raise SystemExit("the native decode step does not take this model: nothing to measure")
    top = max(a.contexts)
    what = a.model or f"glm-4-9b preset, {cfg.n_layers} layers{', attention only' if a.attention_only else ''}, random bf16 weights"
    print(f"\nspeed: {what}; native decode step, "
          f"{torch.get_num_threads()} thread(s), best of {a.repeats} rounds of {a.steps} steps, bf16 and int8 KV alternately")
    print("| batch | context | bf16 KV tok/s | int8 KV tok/s | int8 / bf16 | step growth from "
          f"{min(a.contexts)} bf16 / int8 (ms) | KV bytes per position bf16 / int8 |")
    print("|---|---|---|---|---|---|---|")
    for B in a.batches:
        caches = {}
        for name, kv in KV.items():
            pool = BlockPool.for_model(model, B * (top // 16 + 2), 16, kv)
            caches[name] = PagedKVCache(pool, B, top + 1)
        src = model.new_cache(1, top)  # random keys and values, every slot valid
        gen = torch.Generator().manual_seed(0)
        src.k.copy_(torch.randn(src.k.shape, generator=gen)), src.v.copy_(torch.randn(src.v.shape, generator=gen))
        src.valid.fill_(True)
        base = {}
        for n in sorted(a.contexts):
            for cache in caches.values():
                cache.copy_rows(slice(0, B), src, slice(0, 1), n)  # each row its own copy of the keys
            tok = torch.randint(0, cfg.vocab_size, (B, 1), generator=gen)
            at = torch.full((B, 1), n)
            best = dict.fromkeys(KV, float("inf"))
            for r in range(a.repeats + 1):  # round 0 warms up
                for name, cache in caches.items():
                    t = time.perf_counter()
                    for _ in range(a.steps):
                        model.step(tok, at, cache, at, extent=n + 1, plan=plan)
                    if r:
                        best[name] = min(best[name], time.perf_counter() - t)
            ms = {name: 1000 * t / a.steps for name, t in best.items()}
            base.setdefault("ms", ms)
            per = {name: BlockPool.block_bytes(cfg, 16, kv or torch.bfloat16) / 16 for name, kv in KV.items()}
            print(f"| {B} | {n} | {B * 1000 / ms['bf16']:.2f} | {B * 1000 / ms['int8']:.2f} | {ms['bf16'] / ms['int8']:.3f} | "
                  f"{ms['bf16'] - base['ms']['bf16']:.1f} / {ms['int8'] - base['ms']['int8']:.1f} | "
                  f"{per['bf16']:.0f} / {per['int8']:.0f} |", flush=True)
        for cache in caches.values():
            cache.release(range(B))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint for the speed part (default: the glm-4-9b preset, random)")
    p.add_argument("--layers", type=int, default=2, help="layers of the glm-4-9b preset (default 2)")
    p.add_argument("--attention-only", action="store_true", help="glm-4-9b's attention with tiny weights (see above)")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gen", type=int, default=96, help="greedy tokens compared in the quality part (default 96)")
    p.add_argument("--text", default=str(Path(__file__).resolve().parents[1] / "README.md"))
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--no-speed", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"CPU: {cpu_line()}; native kernels {'on' if kernels.available() else 'OFF'}")
    if not a.no_quality:
        quality(a)
    if not a.no_speed:
        speed(a)


if __name__ == "__main__":
    main()
