"""Quantized prefill speed: int8 / int4 weights against the bf16 model they came from, one run.

    .venv/bin/python bench/quant_prefill.py                      # 127M GLM-4 shape, 512-token prefill
    .venv/bin/python bench/quant_prefill.py --prompt-len 2048 --rounds 3
    .venv/bin/python bench/quant_prefill.py --layers 2 --rounds 2 --rows 17,512   # smoke run, seconds

A random-init glmkit model of GLM-4 shape (the glm-4-9b preset scaled down as bench/decode.py's 120m:
dim 768, 12 layers, 12 heads of 64, 2 KV heads, ffn 3072, vocab 16384, untied head) runs a forward
over --prompt-len tokens (every position's logits, as GLM.prefill returns them) in bf16, and
quantized from it to int8 (per channel) and int4 (group 64) with bf16 activations, each two ways:
  tiles     the quantized linears' many-row path: the weight dequantized a tile of output rows at a
            time into the GEMM's dtype (kernels.gemm_dtype) and multiplied by PyTorch's GEMM
  pytorch   PyTorch's weight-only kernels (torch._weight_int8pack_mm, _weight_int4pack_mm_for_cpu),
            the path before the tiles and the one taken without glmkit's native library
The variants run interleaved, round after round, and each keeps its best time, so the ratios to bf16
compare runs that met the same machine load (the machines are shared: compare ratios, not absolute
numbers across runs). A second table times single linears of the model's shapes at --rows
activation rows (batched decode above kernels.MAX_ROWS uses the same path) the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glmkit import kernels
from glmkit.config import get_preset
from glmkit.model import GLM
from glmkit.quantize import Int4Linear, Int8Linear, quantize_int4, quantize_int8, quantize_model


@contextlib.contextmanager
def weight_only_kernels():
    """The quantized linears as before the tiled path: PyTorch's weight-only kernels for many rows."""
    usable = kernels.dequant_usable
    kernels.dequant_usable = lambda x: False
    try:
        yield
    finally:
        kernels.dequant_usable = usable


def quantized(model, bits: int, group: int):
    """A weight-only quantized copy of a bf16 model, activations (and scales) in bf16."""
    m = quantize_model(copy.deepcopy(model).float(), bits, group)
    for t in list(m.parameters()) + [b for _, b in m.named_buffers() if b.is_floating_point()]:
        t.data = t.data.to(torch.bfloat16)
    return m.eval()


def interleaved_best(fns: dict, rounds: int) -> dict:
    """Best wall time of each function over `rounds` rounds, one call of each per round (after a warm-up)."""
    for f in fns.values():
        f()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, f in fns.items():
            t = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def cpu_line() -> str:
    name, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key.strip() == "model name":
                name = val.strip()
            elif key.strip() == "flags":
                flags = set(val.split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in flags]
    return f"{name}; {' '.join(isa) or 'no AVX2'}; bf16 GEMM in {str(kernels.gemm_dtype(torch.bfloat16)).split('.')[-1]}"


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def table(head: tuple, rows: list[tuple]):
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print("| " + " | ".join(str(c).ljust(w) for c, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |")


def model_table(a):
    cfg = get_preset("glm-4-9b", dim=a.dim, n_layers=a.layers, n_heads=a.dim // 64, head_dim=64, ffn_dim=a.ffn,
                     vocab_size=a.vocab, max_seq_len=max(4096, a.prompt_len))
    torch.manual_seed(0)
    base = GLM(cfg).to(torch.bfloat16).eval()
    n_params = sum(p.numel() for p in base.parameters())
    models = {"bf16": base, "int8": quantized(base, 8, 64), "int4": quantized(base, 4, a.group)}
    ids = torch.randint(2, cfg.vocab_size, (1, a.prompt_len))

    def run(model, before=False):
        def f():
            with torch.inference_mode(), weight_only_kernels() if before else contextlib.nullcontext():
                model(ids)
        return f
    fns = {"bf16": run(base)}
    for q in ("int8", "int4"):
        fns[f"{q} tiles"] = run(models[q])
        fns[f"{q} pytorch"] = run(models[q], before=True)
    best = interleaved_best(fns, a.rounds)
    print(f"\nprefill {a.prompt_len} tokens, {n_params / 1e6:.0f}M parameters (dim {a.dim}, {a.layers} layers, ffn {a.ffn}, "
          f"vocab {a.vocab}), best of {a.rounds} interleaved rounds:")
    rows = [(name, f"{a.prompt_len / t:.0f}", f"{best['bf16'] / t:.2f}") for name, t in best.items()]
    table(("variant", "tok/s", "vs bf16"), rows)


def linear_table(a):
    torch.manual_seed(0)
    H, Fd, V = a.dim, a.ffn, a.vocab
    shapes = {"qkv": (H, H + 2 * 2 * 64), "out": (H, H), "up": (H, 2 * Fd), "down": (Fd, H), "head": (H, V)}
    tiles = [int(t) for t in a.tile_kib.split(",")] if a.tile_kib else [kernels.TILE_BYTES >> 10]
    rows_out = []
    for M in (int(r) for r in a.rows.split(",")):
        for name, (K, N) in shapes.items():
            w = torch.randn(N, K) * 0.02
            x = torch.randn(M, K).to(torch.bfloat16)
            wb = w.to(torch.bfloat16)
            l8 = Int8Linear(K, N, False)
            q, s = quantize_int8(w)
            l8.weight.copy_(q), l8.scales.copy_(s)
            l4 = Int4Linear(K, N, False, a.group)
            p, s4, m4 = quantize_int4(w, a.group)
            l4.weight.copy_(p), l4.scales.copy_(s4), l4.mins.copy_(m4)
            l8, l4 = l8.to(torch.bfloat16), l4.to(torch.bfloat16)

            def call(f, before=False, tile=None):
                def g():
                    old = kernels.TILE_BYTES
                    kernels.TILE_BYTES = tile or old
                    try:
                        with torch.inference_mode(), weight_only_kernels() if before else contextlib.nullcontext():
                            f(x)
                    finally:
                        kernels.TILE_BYTES = old
                return g
            fns = {"bf16": call(lambda x: F.linear(x, wb))}
            for q_name, lin in (("int8", l8), ("int4", l4)):
                for t in tiles:
                    fns[f"{q_name} tiles {t}K"] = call(lin, tile=t << 10)
                fns[f"{q_name} pytorch"] = call(lin, before=True)
            best = interleaved_best(fns, a.rounds)
            rows_out.append((f"{name} {K}->{N}", M, *(f"{best['bf16'] / best[k]:.2f}" for k in fns if k != "bf16"),
                             f"{2 * M * K * N / best['bf16'] / 1e9:.0f}"))
    print(f"\nsingle linears, bf16 activations, speed vs bf16 F.linear (>1: faster), best of {a.rounds} interleaved rounds:")
    table(("linear K->N", "rows", *(k for k in fns if k != "bf16"), "bf16 GFLOP/s"), rows_out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--group", type=int, default=64, help="int4 group size")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each variant keeps its best")
    p.add_argument("--rows", default="17,64,512", help="activation rows for the single-linear table ('' to skip)")
    p.add_argument("--tile-kib", default="", help="comma-separated tile budgets to compare in the single-linear table")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not kernels.available():
        print(f"glmkit native kernels unavailable ({kernels.why_unavailable()}): the tiles and the pytorch rows are the same path")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {cpu_line()}; load average {load()}")
    model_table(a)
    if a.rows:
        linear_table(a)
    print(f"\nload average after: {load()}")


if __name__ == "__main__":
    main()
