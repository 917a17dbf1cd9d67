"""Latent attention's per-head products with an int4 kv_b, side by side in one run: the key rows (W_UK) in fp32 read
in place (kernels.heads_gemv_int4, trans) against the integer form on the regrouped codes (kernels.heads_uk_int4, what
fused.py's plan uses), and the value rows (W_UV) for scale.

    PYTHONPATH=. .venv/bin/python bench/kv_b_heads.py                 # GLM-4.7-Flash's kv_b: 47 layers, 2 threads
    PYTHONPATH=. .venv/bin/python bench/kv_b_heads.py --rows 1 4 --steps 20 --groups 64 128

Shapes: transformers' Glm4MoeLiteConfig() defaults, GLM-4.7-Flash's (20 heads of 192 key rows and 256 value rows,
kv_lora_rank 512), one kv_b per layer, random codes with bf16 scales and mins (as bench/moe.py writes them). The C
functions are called through ctypes with their arguments prepared once, as decode.cpp calls them, so the times are
the kernels' own (kernels.py's checks cost ~20 us a call). A decode step streams ~2 GB of weights, so kv_b comes
from memory, not from this VM's 300 MiB L3: before each timed pass a 512 MiB buffer is read (--warm skips that). The
passes alternate (old, new, W_UV, old, ...), --steps of each; the median pass is reported per step of all layers, with
the ratio to the old key-row form measured in the same run. A busy machine moves the figures; compare the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from glmkit import kernels


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=47)
    p.add_argument("--heads", type=int, default=20)
    p.add_argument("--nope", type=int, default=192)
    p.add_argument("--v-dim", type=int, default=256)
    p.add_argument("--rank", type=int, default=512)
    p.add_argument("--groups", type=int, nargs="+", default=[64])
    p.add_argument("--rows", type=int, nargs="+", default=[1])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warm", action="store_true", help="no cache flush between passes (kv_b from L3)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    assert kernels.available(), kernels.why_unavailable()
    lib = kernels._lib
    H, Dn, Dv, R = a.heads, a.nope, a.v_dim, a.rank
    flush = torch.ones(128 << 20)  # 512 MiB
    print(f"kv_b {H} heads x ({Dn} key + {Dv} value rows) x {R}, {a.layers} layers, {a.threads} threads, "
          f"{kernels.variant()} build, {'warm (L3)' if a.warm else 'cold (512 MiB read before each pass)'}")
    print("| group | rows | W_UK fp32 in place (ms) | W_UK integer (ms) | ratio | W_UV (ms) |")
    print("|---|---|---|---|---|---|")
    for gs in a.groups:
        g = torch.Generator().manual_seed(gs)
        layers = []
        for _ in range(a.layers):
            packed = torch.randint(0, 256, (H * (Dn + Dv), R // 2), dtype=torch.uint8, generator=g)
            sc = (torch.rand(H * (Dn + Dv), R // gs, generator=g) * 0.01).to(torch.bfloat16)
            mn = (-7.5 * sc.float()).to(torch.bfloat16)
            layers.append((packed, sc, mn, kernels.heads_uk_codes(packed, H, Dn)))
        uk_bytes = sum(c.numel() for *_, c in layers)
        for M in a.rows:
            xk, xv = torch.randn(M, H, Dn), torch.randn(M, H, R)
            yk, yv = torch.empty(M, H, R), torch.empty(M, H, Dv)
            vs_ = Dn * (R // gs) * 2  # bytes to the value rows' scales

            def old():
                for packed, sc, mn, _ in layers:
                    lib.glmkit_heads_gemv_int4(xk.data_ptr(), M, H, packed.data_ptr(), sc.data_ptr(), mn.data_ptr(), 1,
                                               gs, Dn, R, Dn + Dv, 1, yk.data_ptr(), a.threads)

            def new():
                for _, sc, mn, codes in layers:
                    lib.glmkit_heads_uk_int4(xk.data_ptr(), M, H, codes.data_ptr(), sc.data_ptr(), mn.data_ptr(), 1, gs,
                                             Dn, R, Dn + Dv, yk.data_ptr(), a.threads)

            def uv():
                for packed, sc, mn, _ in layers:
                    lib.glmkit_heads_gemv_int4(xv.data_ptr(), M, H, packed[Dn].data_ptr(), sc.data_ptr() + vs_,
                                               mn.data_ptr() + vs_, 1, gs, Dv, R, Dn + Dv, 0, yv.data_ptr(), a.threads)

            times = {f: [] for f in (old, new, uv)}
            for step in range(a.steps + 1):
                for f in times:
                    if not a.warm:
                        flush.sum()
                    t0 = time.perf_counter()
                    f()
                    if step:  # the first round warms up
                        times[f].append(time.perf_counter() - t0)
            ms = {f: statistics.median(t) * 1e3 for f, t in times.items()}
            print(f"| {gs} | {M} | {ms[old]:.2f} | {ms[new]:.2f} | {ms[old] / ms[new]:.2f}x | {ms[uv]:.2f} |")
        print(f"regrouped key codes: {uk_bytes / 2**20:.1f} MiB for {a.layers} layers "
              f"({uk_bytes / a.layers / 2**20:.2f} MiB a layer)")


if __name__ == "__main__":
    main()
