"""Quantized decode, this tree's native kernels against an earlier commit's, side by side in one process.

    .venv/bin/python bench/quant_decode.py /tmp/bm2.int4 /tmp/bm2.int8          # before = merge-base with main
    .venv/bin/python bench/quant_decode.py /tmp/bm2.int4 --before HEAD~3 --batches 1,4 --threads 2

The "before" library is compiled from the commit's csrc/ (AVX2 flags, as kernels.py then built it) into a
temporary directory and swapped in for this tree's (`kernels._lib`) between runs, A B A B, so both see the
same machine load; the commit's decode.cpp must have this tree's C structs (the default, the merge-base, does
when only the kernels changed). For each checkpoint and batch size B:
  decode    B * (N - 1) / (time for N new tokens - time for 1) with `generate`, greedy, 32-token prompts:
            the engine's whole step (the fused native step, the head, sampling, Python)
  linears   one pass of every quantized linear (the layers and the head) at B rows, the kernels alone
  bound     decode / (B * bandwidth / bytes of weights read per step), bandwidth of a torch sum over 1 GiB
Each figure is the best of --repeats rounds, before and after back to back for each batch size. With one
thread the clock is the process's CPU time (`--clock cpu`, the default there), so that time the scheduler
gives other processes on a shared machine is not counted; memory stalls still are. The machine may be
shared: compare the ratios (after / before, bN / b1), measured in the same run, not figures across runs.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import glmkit
from glmkit import kernels
from glmkit.generate import generate
from glmkit.quantize import Int4Linear, Int8Linear
from glmkit.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
CLOCK = time.perf_counter  # main() sets it from --clock


def build_before(ref: str, out: Path) -> ctypes.CDLL:
    """The commit's kernel library, compiled as its kernels.py did (AVX2 + FMA) and typed like kernels._open."""
    srcs = []
    for name in ("gemv.cpp", "decode.cpp", "simd.h"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:glmkit/csrc/{name}"], capture_output=True,
                              text=True, check=True).stdout
        (out / name).write_text(text)
        srcs += [str(out / name)] if name.endswith(".cpp") else []
    so = out / "before.so"
    subprocess.run(["c++", "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-o", str(so), *srcs], check=True)
    return kernels._typed(ctypes.CDLL(str(so)))


def bandwidth_gbs() -> float:
    """Read bandwidth of a torch sum over 1 GiB of fp32 (best of 3), on the same clock as the rest."""
    x = torch.ones(1 << 28)
    x.sum()
    best = float("inf")
    for _ in range(3):
        t = CLOCK()
        x.sum()
        best = min(best, CLOCK() - t)
    return x.numel() * 4 / best / 1e9


def linears_seconds(model, B: int) -> float:
    """One call of every quantized linear at B rows through kernels._lib, as the fused step calls them."""
    lib, threads, total = kernels._lib, torch.get_num_threads(), 0.0
    for mod in model.modules():
        if isinstance(mod, Int4Linear):
            N, K = mod.out_features, mod.in_features
            sc, mn, code = kernels.int4_scales(mod.scales, mod.mins)
            x, y = torch.randn(B, K), torch.empty(B, N)
            t = CLOCK()
            lib.glmkit_gemv_int4(x.data_ptr(), B, K, mod.weight.data_ptr(), sc.data_ptr(), mn.data_ptr(), code,
                                 mod.group_size, N, y.data_ptr(), threads)
        elif isinstance(mod, Int8Linear):
            N, K = mod.out_features, mod.in_features
            s = mod.scales.float().contiguous()
            x, y = torch.randn(B, K), torch.empty(B, N)
            t = CLOCK()
            lib.glmkit_gemv_q8(x.data_ptr(), B, K, mod.weight.data_ptr(), s.data_ptr(), N, y.data_ptr(), threads)
        else:
            continue
        total += CLOCK() - t
    return total


def decode_tok_s(model, B: int, new_tokens: int) -> float:
    V = model.cfg.vocab_size
    prompts = [torch.randint(0, V, (32,)).tolist() for _ in range(B)]

    def run(n):
        t = CLOCK()
        generate(model, prompts, SamplingParams(max_new_tokens=n, temperature=0))
        return CLOCK() - t

    return B * (new_tokens - 1) / (run(new_tokens) - run(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path, help="quantized glmkit checkpoints (e.g. /tmp/bm2.int4)")
    ap.add_argument("--before", default=None, help="commit whose kernels are 'before' (default: merge-base with main)")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default=None, help="default: cpu with one thread, else wall")
    a = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if (a.clock or ("cpu" if a.threads == 1 else "wall")) == "cpu" else time.perf_counter
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    batches = [int(b) for b in a.batches.split(",")]
    ref = a.before or subprocess.run(["git", "-C", str(ROOT), "merge-base", "HEAD", "main"], capture_output=True,
                                     text=True, check=True).stdout.strip()
    assert kernels.available(), kernels.why_unavailable()
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"before": build_before(ref, Path(tmp)), "after": kernels._lib}
        bw = bandwidth_gbs()
        print(f"# before = {ref[:10]} (AVX2), after = this tree ({kernels.variant()}); {a.threads} thread(s), "
              f"{'CPU' if CLOCK is time.process_time else 'wall'} time; "
              f"bandwidth {bw:.1f} GB/s; best of {a.repeats}; the machine may be shared: read the ratios")
        print("| model | B | decode before | decode after | after/before | linears ms before | linears ms after "
              "| step ms after | bound before | bound after |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for path in a.models:
            model = glmkit.load(path, dtype=torch.bfloat16).eval()
            weight_bytes = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n != "embed.weight")
            best: dict[tuple[str, int, str], float] = {}
            with torch.no_grad():
                for lib in libs.values():  # warm-up: fused plan, caches, both libraries' first calls
                    kernels._lib = lib
                    decode_tok_s(model, 1, 3)
                for B in batches:
                    for _ in range(a.repeats):
                        for name, lib in libs.items():
                            kernels._lib = lib
                            tok = decode_tok_s(model, B, a.new_tokens)
                            lin = linears_seconds(model, B)
                            best[name, B, "tok"] = max(best.get((name, B, "tok"), 0.0), tok)
                            best[name, B, "lin"] = min(best.get((name, B, "lin"), float("inf")), lin)
            kernels._lib = libs["after"]
            for B in batches:
                tb, ta = best["before", B, "tok"], best["after", B, "tok"]
                bound = B * bw * 1e9 / weight_bytes
                print(f"| {path.name} | {B} | {tb:.1f} | {ta:.1f} | {ta / tb:.2f} | {best['before', B, 'lin'] * 1e3:.1f} | "
                      f"{best['after', B, 'lin'] * 1e3:.1f} | {B / ta * 1e3:.1f} | {tb / bound:.2f} | {ta / bound:.2f} |")
            for name in libs:
                print(f"# {path.name} {name}: " + ", ".join(
                    f"b{B}/b1 {best[name, B, 'tok'] / best[name, 1, 'tok']:.2f}" for B in batches if B != 1))
            del model


if __name__ == "__main__":
    main()
