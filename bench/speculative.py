"""Speculative decoding with the MTP layer vs plain decoding: tok/s and the acceptance rate, in one run.

    PYTHONPATH=. .venv/bin/python bench/speculative.py                    # a random small GLM-4.5-shaped MoE
    PYTHONPATH=. .venv/bin/python bench/speculative.py --model DIR        # a checkpoint with MTP weights
    PYTHONPATH=. .venv/bin/python bench/speculative.py --drafts 1 2 3 --tokens 64 --batch 1

Greedy decoding of --tokens new tokens after a --prompt-len random prompt (a checkpoint: the same), batch
--batch, plain `generate` against `speculative.generate_mtp` with k = each of --drafts; --repeats rounds,
the best kept. Prints tok/s, the ratio to plain, the acceptance rate (accepted / drafted) and the tokens
per verify step, and checks the outputs are identical.

On random weights the MTP layer's drafts are guesses (acceptance about 1 / vocabulary, here ~0), so
each step costs a k + 1-token forward, the MTP layer's k steps and a catch-up for about one token:
the figure is the overhead, not a speed-up. A speed-up needs trained MTP weights (a GLM-4.5 release).
"""

from __future__ import annotations

import argparse
import time

import torch

from glmkit.config import ModelConfig
from glmkit.generate import generate
from glmkit.model import GLM
from glmkit.sampling import SamplingParams
from glmkit.speculative import SpecStats, generate_mtp


def random_model(vocab: int) -> GLM:
    """A small GLM-4.5-shaped MoE (qk-norm, half-split partial rotary, dense first layer, one MTP layer)."""
    cfg = ModelConfig(vocab_size=vocab, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=512, position="rope_partial",
                      rope_interleave=False, qk_norm=True, n_experts=16, n_experts_per_tok=4, n_shared_experts=1,
                      moe_ffn_dim=128, first_dense_layers=1, n_mtp_layers=1, tie_embeddings=False)
    torch.manual_seed(0)
    return GLM(cfg).eval()


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a checkpoint directory whose config has MTP layers (default: random weights)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary of the random model")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32, help="new tokens per row")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--drafts", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    if a.model:
        from glmkit.convert import read_checkpoint
        model = read_checkpoint(a.model).eval()
    else:
        model = random_model(a.vocab)
    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (a.prompt_len,), generator=g).tolist() for _ in range(a.batch)]
    params = SamplingParams(max_new_tokens=a.tokens, temperature=0)
    n = a.tokens * a.batch
    t_plain, plain = timed(lambda: generate(model, prompts, params), a.repeats)
    print(f"{'':16} {'tok/s':>8} {'vs plain':>8} {'accepted':>9} {'tok/step':>8}  same output")
    print(f"{'plain':16} {n / t_plain:8.1f} {1:8.2f} {'':>9} {1:8.2f}")
    for k in a.drafts:
        stats = SpecStats()

        def run(k=k, stats=stats):
            stats.__init__()  # the counts of the last round only
            return generate_mtp(model, prompts, params, num_draft=k, stats=stats)
        t, out = timed(run, a.repeats)
        same = all(x.token_ids == y.token_ids for x, y in zip(out, plain))
        print(f"{f'mtp k={k}':16} {n / t:8.1f} {t_plain / t:8.2f} {stats.acceptance_rate:9.1%} "
              f"{stats.tokens_per_step:8.2f}  {same}")
    if not a.model:
        print(f"random weights: acceptance is chance (~1/{V}); the ratio is speculation's overhead")


if __name__ == "__main__":
    main()
