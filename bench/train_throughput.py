"""Training throughput: glmkit vs transformers GlmForCausalLM, same weights, shapes and precision.

    .venv/bin/python bench/train_throughput.py                  # ~10M and ~100M, fp32 and bf16
    .venv/bin/python bench/train_throughput.py --sizes 10M --precisions fp32 --steps 5

Both models are the same GLM-4-shaped network (RMSNorm, SwiGLU, GQA, partial interleaved RoPE,
q/k/v bias): transformers' is built random-init, glmkit's is converted from it. Each step is a
full training step (forward, causal-LM cross-entropy over every token, backward, AdamW) on the
same batch; the two are timed alternately, step by step, so machine noise hits both alike. The
matmul peak of this machine is measured in the same run (before and after the steps, the higher
kept), and model-FLOPs utilisation is
6 * (non-embedding params + head) + 12 * layers * seq * dim FLOPs per token over that peak.
Run it on a quiet machine: the figures are ratios measured side by side, not absolute claims.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

SIZES = {  # name: (dim, layers, heads, kv heads, ffn, vocab)
    "10M": (256, 6, 8, 2, 704, 16384),
    "100M": (768, 12, 12, 4, 2048, 32768),
}


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of an n x n x n product. bf16 through glmkit's Linear, so on a CPU without bf16
    instructions it is the fp32 GEMM of the widened operands (PyTorch's own bf16 GEMM there runs
    at ~0.1 GFLOP/s for square shapes, which would make any utilisation figure meaningless); there
    the peak is the higher of that path and the plain fp32 GEMM (the conversions make the first
    lower), so the bf16 utilisation is not flattered by the conversion cost."""
    from glmkit import kernels

    def rate(dt):
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        for _ in range(2):
            kernels.linear(a, b)
        t = time.perf_counter()
        for _ in range(reps):
            kernels.linear(a, b)
        return 2 * n**3 * reps / (time.perf_counter() - t)

    peak = rate(dtype)
    if dtype == torch.bfloat16 and kernels.cpu_bf16_emulated():
        peak = max(peak, rate(torch.float32))
    return peak


def build(size: str, seq_len: int):
    import transformers

    import glmkit

    C, L, H, K, Fd, V = SIZES[size]
    cfg = transformers.GlmConfig(vocab_size=V, hidden_size=C, intermediate_size=Fd, num_hidden_layers=L,
                                 num_attention_heads=H, num_key_value_heads=K, head_dim=C // H,
                                 max_position_embeddings=seq_len, pad_token_id=0, eos_token_id=1,
                                 partial_rotary_factor=0.5, attention_bias=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.GlmForCausalLM(cfg)
    hf.config._attn_implementation = "sdpa"
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = glmkit.load(d)
    return hf, ours


def flops_per_token(model, seq_len: int) -> float:
    cfg = model.cfg
    n = cfg.num_params(embeddings=False) + cfg.vocab_size * cfg.dim  # the head is a matmul; the embedding a lookup
    return 6 * n + 12 * cfg.n_layers * seq_len * cfg.dim


def glm_objective_rows(a) -> list:
    """glmkit's own pretraining step on GLM-objective batches (what `glmkit pretrain` runs), glmkit only: fp32, bf16,
    and bf16 with attention left in bf16 (kernels.attention's choice before it ran attention with a backward in fp32
    on every CPU), timed alternately. FLOPs: 6 x (non-embedding parameters) + 12 x layers x T x dim per token, plus the
    head (6 x vocab x dim) on the predicted tokens only, as GLMObjective computes it."""
    import numpy as np

    from glmkit import kernels
    from glmkit.config import get_preset
    from glmkit.infill import InfillConfig, SpecialIds, build_example, collate
    from glmkit.model import GLM
    from glmkit.scoring import GLMObjective

    rows = []
    for size in a.sizes:
        C, L, H, K, Fd, V = SIZES[size]  # the same shape as the rows above, as glmkit's own preset builds it (rope_2d)
        cfg = get_preset("glm-tiny", vocab_size=V, dim=C, n_layers=L, n_heads=H, n_kv_heads=K, ffn_dim=Fd)
        ours = GLM(cfg)
        ours.init_weights(seed=0)
        V = cfg.vocab_size
        sp = SpecialIds(mask=V - 7, smask=V - 6, gmask=V - 5, sop=V - 4, eop=V - 3, eos=V - 2, pad=V - 2)
        rng = np.random.default_rng(0)
        # documents of 50-400 tokens, a sentence end every ~20 tokens: all three blank kinds occur
        stream = np.concatenate([np.append(rng.integers(0, V - 8, int(rng.integers(50, 400))), sp.eos) for _ in range(200)])
        ends = np.zeros(V, bool)
        ends[:V // 20] = True
        exs, pos = [], 0
        while len(exs) < a.batch:
            ex, used = build_example(stream[pos:pos + a.seq_len], a.seq_len, rng, sp, ends, InfillConfig())
            exs.append(ex)
            pos += used
        batch = collate(exs, sp.pad, a.seq_len)
        predicted = int(batch["loss_mask"].sum()) / batch["loss_mask"].numel()
        obj = GLMObjective(ours)
        flops = 6 * cfg.num_params(embeddings=False) + 12 * cfg.n_layers * a.seq_len * cfg.dim + 6 * V * cfg.dim * predicted
        opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
        native_backward = kernels._bf16_cpu_backward

        def step(amp, attn_fp32):
            kernels._bf16_cpu_backward = native_backward if attn_fp32 else (lambda q: False)
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    s = obj(**batch)
                (s / batch["loss_mask"].sum()).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            finally:
                kernels._bf16_cpu_backward = native_backward

        kinds = {"fp32": (False, True)} if "fp32" in a.precisions else {}
        if "bf16" in a.precisions:
            kinds |= {"bf16, attention bf16": (True, False), "bf16": (True, True)}
        times = {k: [] for k in kinds}
        for i in range(a.steps + 1):
            for k, (amp, attn) in kinds.items():
                t = time.perf_counter()
                step(amp, attn)
                if i > 0:
                    times[k].append(time.perf_counter() - t)
        for k, v in times.items():
            tps = a.batch * a.seq_len / statistics.median(v)
            print(f"{size} GLM objective {k}: glmkit {tps:.0f} tok/s ({predicted:.0%} of tokens predicted)", flush=True)
            rows.append((f"{size} GLM objective", f"{cfg.num_params() / 1e6:.1f}M", k, None, tps, None, tps * flops))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="+", default=list(SIZES))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--compile", action="store_true", help="glmkit's model through torch.compile (as `pretrain --compile`)")
    p.add_argument("--no-hf", action="store_true", help="glmkit only (transformers' CPU bf16 training takes minutes a step)")
    p.add_argument("--glm", action="store_true",
                   help="also glmkit's pretraining step (GLM objective: blank-infilling batches of the default mixture, "
                        "prefix mask, head on the predicted tokens only), with bf16 attention in bf16 and in fp32")
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {a.batch} x {a.seq_len}")

    def measure_peaks(when):
        peaks = {pr: matmul_peak(torch.float32 if pr == "fp32" else torch.bfloat16) for pr in a.precisions}
        print(f"matmul peak {when}: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()), flush=True)
        return peaks

    before = measure_peaks("before")
    rows = []
    for size in a.sizes:
        hf, ours = build(size, a.seq_len)
        ids = torch.randint(0, ours.cfg.vocab_size, (a.batch, a.seq_len))
        run_ours = torch.compile(ours) if a.compile else ours  # compiled in the untimed first step

        def step_ours(opt, amp):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                h = run_ours(ids[:, :-1], hidden_only=True)
                loss = F.cross_entropy(ours.logits(h).flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def step_hf(opt, amp):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                logits = hf(input_ids=ids[:, :-1]).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for pr in a.precisions:
            amp = pr == "bf16"
            runs = (("ours", ours, step_ours),) + (() if a.no_hf else (("hf", hf, step_hf),))
            opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for n, m, _ in runs}
            times = {n: [] for n, _, _ in runs}
            for i in range(a.steps + 1):
                for name, _, fn in runs:
                    t = time.perf_counter()
                    fn(opts[name], amp)
                    if i > 0:  # the first step warms caches and allocators
                        times[name].append(time.perf_counter() - t)
            tokens = a.batch * (a.seq_len - 1)
            tps = {n: tokens / statistics.median(v) for n, v in times.items()}
            rate = tps["ours"] * flops_per_token(ours, a.seq_len)  # model FLOP/s
            h = tps.get("hf")
            rows.append((size, f"{ours.cfg.num_params() / 1e6:.1f}M", pr, h, tps["ours"], tps["ours"] / h if h else None, rate))
            print(f"{size} {pr}: transformers {f'{h:.0f}' if h else '-'} tok/s, glmkit {tps['ours']:.0f} tok/s", flush=True)
    if a.glm:
        rows += glm_objective_rows(a)
    # the peak is measured again after the steps and the higher of the two kept: the machine's clock and
    # its neighbours drift over a run, and a low peak would flatter the utilisation
    after = measure_peaks("after")
    peaks = {pr: max(before[pr], after[pr]) for pr in a.precisions}
    rows = [(*r[:6], r[6] / peaks[r[2].split(",")[0]]) for r in rows]
    print("\n| size | params | precision | transformers tok/s | glmkit tok/s | ratio | glmkit MFU |")
    print("|---|---|---|---|---|---|---|")
    for size, n, pr, h, o, r, m in rows:
        print(f"| {size} | {n} | {pr} | {f'{h:.0f}' if h else '-'} | {o:.0f} | {f'{r:.2f}x' if r else '-'} | {m:.0%} |")


if __name__ == "__main__":
    main()
