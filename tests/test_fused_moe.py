"""The native decode step (fused.decode_step, csrc/decode.cpp) on GLM-4.7-Flash's layers: latent attention in
the absorbed form over the latent cache, and mixture-of-experts layers with GLM-4.5's router.

Reference: GLM.step's eager layers on a copy of the same prefilled cache (themselves checked against
transformers in test_mla.py / test_moe_lite.py). Tiny models of odd layouts: grouped routing (4 groups, 2
kept), a shared expert, a dense first layer, the low-rank query or a full one, interleaved or half-split
rope pairs, yarn's softmax scale; weights fp32, bf16, int4 (the experts through the one-call MoE kernel) and
int4 in groups of 32 (experts linear by linear); contiguous and paged caches; batch 3, left-padded, GLM Part A.
"""

import copy
import dataclasses

import pytest
import torch

from glmkit import fused, kernels
from glmkit.config import ModelConfig
from glmkit.model import GLM, BlockPool, PagedKVCache
from glmkit.quantize import cast_floats, quantize_model
from tests.helpers import assert_close, scaled

needs_native = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable")

BASE = ModelConfig(vocab_size=301, dim=128, n_layers=3, n_heads=4, ffn_dim=128, position="rope_partial", attention="mla",
                   q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                   n_experts=8, n_experts_per_tok=3, n_shared_experts=1, moe_ffn_dim=64, first_dense_layers=1,
                   n_group=4, topk_group=2, routed_scaling_factor=1.8, tie_embeddings=False, max_seq_len=64)
VARIANTS = {
    "flash": {},
    "full-query-halves": dict(q_lora_rank=None, rope_interleave=False),
    "yarn-no-groups": dict(n_group=1, topk_group=1, norm_topk_prob=False,
                           rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                         "mscale": 0.7, "mscale_all_dim": 1.0}),
}


def model_of(variant: str, kind: str) -> GLM:
    torch.manual_seed(0)
    model = GLM(dataclasses.replace(BASE, **VARIANTS[variant])).eval()
    with torch.no_grad():  # non-trivial norms, a router bias that changes the choice
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
        for layer in model.layers[1:]:
            if kind == "fp32":  # the routing itself is compared exactly here
                bias = 0.05 * torch.randn(BASE.n_experts)
            else:  # int4's activation rounding and bf16 move the router's input by more than a near-tie: a bias
                # spaced wider than any score difference makes the choice, so the numerics are compared. Powers of
                # two: every group's sum differs too (a permutation of 0, 2, .., 14 tied two groups at 14 for
                # int4-bf16, and the second group kept then hung on a rounding, differently on an AMX Xeon)
                perm = torch.randperm(BASE.n_experts, generator=torch.Generator().manual_seed(len(kind)))
                bias = 2.0 * 2.0 ** perm.float()
            layer.mlp.gate.e_score_correction_bias.copy_(bias)
    if kind.startswith("int4"):
        quantize_model(model, 4, 32 if kind == "int4-g32" else 64, head=False)
    return cast_floats(model, torch.bfloat16) if kind in ("bf16", "int4-bf16") else model


def eager_step(model, *args):
    real, fused.decode_step = fused.decode_step, lambda *a, **k: None
    try:
        return model.step(*args)
    finally:
        fused.decode_step = real


@needs_native
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", ["fp32", "bf16", "int4", "int4-bf16", "int4-g32"])
@torch.no_grad()
def test_fused_step_equals_eager_step(variant, kind, monkeypatch):
    """Five decode steps, native and eager, each from the same cache (one prefill, then the native cache after
    each step): the same logits and the same latents written. The native path must really run: its MoE kernel is counted (int4 in groups of
    64: one glmkit_moe_int4 call per MoE layer per step, from decode.cpp, none from Python)."""
    model = model_of(variant, kind)
    plan = fused.decode_plan(model)
    assert plan is not None, fused._plans.get(model)
    prompts = [[5, 9, 13, 21, 7, 44, 2], [3, 4], [8, 8, 30, 31, 32, 33]]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    cache = model.new_cache(3, T + 8)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    model.prefill(ids, cache, position_ids=torch.stack((pos, torch.zeros_like(pos)), 1), attention_mask=mask,
                  sep=torch.tensor([T - len(p) + 2 for p in prompts]))
    # the reference: the eager layers on the same weights in fp32 (a bf16 model upcast exactly), as the native step
    # computes in fp32 whatever the weights' dtype; the eager bf16 step's own rounding, amplified by int4's
    # activation rounding, moves a logit by up to ~15% of the largest here
    eager_model = cast_floats(copy.deepcopy(model), torch.float32) if kind.endswith("bf16") else model
    ref = eager_model.new_cache(3, cache.max_len)
    ref.copy_rows(slice(None), cache, slice(None), cache.max_len)
    python_moe = []
    real = kernels.moe_int4
    monkeypatch.setattr(kernels, "moe_int4", lambda *a, **k: python_moe.append(1) or real(*a, **k))
    # fp32: summation order (~1e-6); bf16: the latents rounded into the bf16 cache (~3e-3); int4: activations rounded to
    # int8 steps per group, where a float-rounding difference between the two paths moves a value by one step
    # (1/127 of its group's range), and that step the next layers' roundings: a few entries move by up to ~8% of
    # the largest (12% with bf16 weights) while the mean stays below 1%; a wrong index, rotation or expert moves
    # the mean by tens of percent, which the mean's bound catches
    tol = {"fp32": 2e-5, "bf16": 5e-3, "int4": 1.2e-1, "int4-bf16": 1.6e-1, "int4-g32": 1.2e-1}[kind]
    mean_tol = {"fp32": 2e-5, "bf16": 2e-3}.get(kind, 1.5e-2)
    token, last = torch.tensor([[11], [12], [13]]), pos[:, -1]
    for step in range(5):
        index = torch.tensor([T + step]).expand(3)
        position = torch.stack((last + 1 + step, torch.full_like(last, step + 1)), 1)  # (3, 2)
        got = fused.decode_step(model, cache, token[:, 0], position[:, 0], position[:, 1], index, plan)
        n_python = len(python_moe)
        want = eager_step(eager_model, token, position[:, :, None], ref, index[:, None])[:, -1].float()
        assert got is not None and got.shape == want.shape == (3, BASE.vocab_size)
        what = f"{variant} {kind} step {step}"
        mx = assert_close(got, want, atol=scaled(tol, want), what=f"{what} logits")
        mean = (got - want).abs().mean().item()
        assert mean <= scaled(mean_tol, want), f"{what} logits: mean |diff| {mean:.3e} > {scaled(mean_tol, want):.3e}"
        assert torch.equal(cache.valid, ref.valid)
        # a bf16 cache against the fp32 reference's: rounded the same way, up to one bf16 step where the two
        # values straddle a rounding midpoint
        ulp = ref.k.abs().max().item() * 2**-7 if cache.k.dtype == torch.bfloat16 else 0.0
        assert_close(cache.k.float(), ref.k.to(cache.k.dtype).float(), atol=scaled(tol, ref.k) + ulp,
                     what=f"{what} cached latents")
        mean = (cache.k.float() - ref.k.to(cache.k.dtype).float()).abs().mean().item()
        assert mean <= scaled(mean_tol, ref.k) + ulp, f"{what} cached latents: mean |diff| {mean:.3e}"
        token = want.argmax(-1, keepdim=True)
        if kind == "int4":  # the eager step called the Python wrapper, the native one did not
            assert n_python == 2 * step and len(python_moe) == 2 * (step + 1), (step, n_python, len(python_moe))
        # the next step of both from the native cache: each step is compared from one state, the two paths'
        # differences not compounded (int4 rounds activations to int8 steps, where they grow chaotically)
        ref.copy_rows(slice(None), cache, slice(None), cache.max_len)
    print(f"\n{variant} {kind}: native vs eager last step max abs diff {mx:.2e}, mean {mean:.2e}")


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
@torch.no_grad()
def test_latent_attention_heads_split_over_threads(threads):
    """Seven heads over 1-4 threads: the absorbed attention splits heads into one chunk per thread and scores them 4
    at a time, so chunks of 7, 4 + 3, 3 + 3 + 1 and 2 + 2 + 2 + 1 heads run every head-group size (a group that
    dropped or repeated a head would move the logits far past fp32's summation-order tolerance)."""
    torch.manual_seed(0)
    model = GLM(dataclasses.replace(BASE, n_heads=7, n_kv_heads=None, n_experts=0, n_experts_per_tok=0, n_shared_experts=0,
                                    moe_ffn_dim=None, n_group=1, topk_group=1, first_dense_layers=0)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    plan = fused.decode_plan(model)
    assert plan is not None, fused._plans.get(model)
    ids = torch.tensor([[5, 9, 13, 21, 7, 44, 2, 17, 30, 3, 8, 19, 23, 40, 41, 42, 43, 50, 51]])  # > one key tile
    T = ids.shape[1]
    cache = model.new_cache(1, T + 4)
    pos = torch.arange(T)[None]
    model.prefill(ids, cache, position_ids=torch.stack((pos, torch.zeros_like(pos)), 1),
                  attention_mask=torch.ones_like(ids), sep=torch.tensor([2]))
    ref = model.new_cache(1, cache.max_len)
    ref.copy_rows(slice(None), cache, slice(None), cache.max_len)
    index, position = torch.tensor([T]), torch.tensor([[T, 1]])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = fused.decode_step(model, cache, torch.tensor([11]), position[:, 0], position[:, 1], index, plan)
    finally:
        torch.set_num_threads(before)
    want = eager_step(model, torch.tensor([[11]]), position[:, :, None], ref, index[:, None])[:, -1].float()
    assert got is not None
    assert_close(got, want, atol=scaled(2e-5, want), what=f"7 heads, {threads} threads: logits")


@needs_native
@torch.no_grad()
def test_fused_step_on_the_paged_latent_pool():
    """The engine's paged pool (blocks through a table, rows at different lengths): native == eager."""
    model = model_of("flash", "int4")
    pool = BlockPool.for_model(model, n_blocks=12, block=4)
    caches = [PagedKVCache(pool, 2, 24) for _ in range(2)]
    ids = torch.tensor([[7, 8, 9, 10, 11, 12, 13], [0, 0, 0, 20, 21, 22, 23]])
    mask = (ids != 0).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    outs = []
    for i, cache in enumerate(caches):  # the same prompts into two sets of blocks
        slots = torch.arange(7).expand(2, 7)
        model.step(ids, torch.stack((pos, torch.zeros_like(pos)), 1), cache, slots, valid=mask)
        token = torch.tensor([[5], [6]])
        for step in range(4):
            idx = torch.tensor([[7 + step], [7 + step]])
            p = torch.stack((pos[:, -1:] + 1 + step, torch.full((2, 1), step + 1)), 1)
            step_fn = model.step if i == 0 else (lambda *a: eager_step(model, *a))
            logits = step_fn(token, p, cache, idx)[:, -1].float()
            outs.append(logits)
            token = logits.argmax(-1, keepdim=True)
    native, eager = outs[:4], outs[4:]
    # the floor: int4 weights with int8 activations rounded per group, where a change in the last bits of the
    # groups' sums moves this tiny model's logits by up to ~0.1 (measured when int4_activations' sums went from one
    # chain to 8 lanes: the eager path against itself, 0.094-0.105 a step), so native and eager, which round in
    # different places (absorbed against expanded attention), agree to about that; a latent written one slot off
    # gives 0.93
    for s, (a, b) in enumerate(zip(native, eager)):
        assert_close(a, b, atol=scaled(1e-1, b), what=f"paged step {s}")


def test_plan_says_why_it_declines():
    """GLM-5's indexer and an int8 kv_b stay eager, with the reason recorded."""
    dense = dict(n_experts=0, n_experts_per_tok=0, n_shared_experts=0, moe_ffn_dim=None, n_group=1, topk_group=1,
                 first_dense_layers=0, routed_scaling_factor=1.0)
    model = GLM(dataclasses.replace(BASE, n_layers=1, index_n_heads=2, index_head_dim=32, index_topk=4, **dense)).eval()
    assert fused.decode_plan(model) is None and "indexer" in fused._plans[model]
    model = quantize_model(model_of("flash", "fp32"), 8)
    assert fused.decode_plan(model) is None and "kv_b" in fused._plans[model]
