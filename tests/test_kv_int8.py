"""The int8 KV cache: a `BlockPool` in torch.int8 (one fp32 scale per key and value vector) behind the
same cache interface as a float one.

References: the same paged cache in the model's dtype for logits (close within int8 rounding, and
not equal: the keys really are quantized); the eager step for the native one on the int8 cache;
rows prefilled on their own for rows sharing a prompt's blocks; a hand-run greedy loop over an
int8 cache for the engine; the tensors the pool allocates for `block_bytes` and the plan. Models are
the small untied random ones of test_engine / test_kernels, blocks of 4 slots."""

import argparse

import pytest
import torch

from glmkit import fused, kernels
from glmkit import plan as plan_mod
from glmkit.cli import describe, kv_dtype_arg, memory_plan
from glmkit.config import get_preset
from glmkit.engine import Engine, Request
from glmkit.model import BlockPool, PagedKVCache, quantize_kv
from glmkit.sampling import SamplingParams
from tests.helpers import assert_close, assert_differs, run_all
from tests.test_engine import glm_request, model_of
from tests.test_kernels import eager_step, fused_model, scaled
from tests.test_paged import pool_is_clean, steps

INT8_LOGITS_REL = 0.05  # of the largest logit: what int8 keys may move the test models' logits by (see below)


def test_quantize_kv_roundtrip():
    x = torch.randn(3, 5, 64) * torch.logspace(-3, 2, 5)[:, None]  # vectors of very different sizes
    x[1, 2] = 0
    q, s = quantize_kv(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (3, 5)
    assert s[1, 2] == 0 and not q[1, 2].any()  # a zero vector: zeros, no NaN
    nonzero = s > 0
    assert (q.abs().amax(-1)[nonzero] == 127).all()  # the largest entry takes the full range
    err = (q.float() * s[..., None] - x).abs()
    assert (err <= s[..., None] / 2 * (1 + 1e-5)).all(), f"error {(err / s[..., None].clamp_min(1e-30)).max():.3f} steps"


class FakeQuantPool(BlockPool):
    """An fp32 pool that stores what an int8 pool reads back: each key and value rounded through
    quantize_kv. The eager path on it computes exactly what it does on an int8 pool."""

    def write(self, index, k, v):
        super().write(index, *((q.float() * s[..., None]) for q, s in (quantize_kv(k), quantize_kv(v))))


def run_rows(model, pool, position, grad):
    """Prefill 3 left-padded rows (a Part A each for rope_2d), then 6 decode steps at their own lengths."""
    torch.manual_seed(1)
    B, T = 3, 11
    ids = torch.randint(0, 500, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = mask[2, :6] = 0
    sep = torch.tensor([7, 3, 9]) if position == "rope_2d" else None
    cache = PagedKVCache(pool, B, 48)
    with torch.set_grad_enabled(grad):
        a = model.prefill(ids, cache, sep=sep, attention_mask=mask)
        b = steps(model, cache, [T, T + 3, T + 6], 6, torch.Generator().manual_seed(5))
    cache.release(range(B))
    pool_is_clean(pool)
    return a.detach(), b.detach()


@pytest.mark.parametrize("position", ["rope_partial", "rope_2d"])  # causal GLM-4-style; GLM with a Part A
def test_int8_cache_is_exactly_the_dequantized_keys(position):
    """The eager path (grad on) on an int8 pool equals it on an fp32 pool holding the dequantized keys."""
    model = model_of(position)
    pool = BlockPool.for_model(model, 40, 4, torch.int8)
    assert pool.dtype == torch.int8 and pool.k_scale.shape == pool.k.shape[:-1]
    got, want = run_rows(model, pool, position, True), run_rows(model, FakeQuantPool.for_model(model, 40, 4), position, True)
    for g, w, what in zip(got, want, ("prefill", "decode steps")):
        assert_close(g, w, 1e-5, f"{position} {what}: int8 pool vs fp32 pool of dequantized keys")


@pytest.mark.parametrize("position", ["rope_partial", "rope_2d"])
@pytest.mark.parametrize("grad", [False, True])  # no_grad: decode steps take the native step; grad: eager
def test_int8_cache_logits_close_to_the_model_dtype_cache(position, grad):
    """int8 keys move these random models' logits (|x| up to ~7, init_std 0.2: every error grows through
    the layers) by up to ~2.7% of the largest (measured); a wrong scale, or int7-sized steps, would not
    stay under INT8_LOGITS_REL, and the logits must move at all (the keys really are int8)."""
    model = model_of(position)
    got = run_rows(model, BlockPool.for_model(model, 40, 4, torch.int8), position, grad)
    want = run_rows(model, BlockPool.for_model(model, 40, 4), position, grad)
    for g, w, what in zip(got, want, ("prefill", "decode steps")):
        tol = INT8_LOGITS_REL * w.abs().max().item()
        d = assert_close(g, w, tol, f"{position} {what}: int8 KV vs fp32 KV")
        print(f"{position} grad={grad} {what}: int8 vs fp32 KV max |logit diff| {d:.3g}, tolerance {tol:.3g}")
        assert_differs(g, w, 1e-3, f"{position} {what}: int8 KV must not equal fp32 KV")


@pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("variant", ["glm4", "chatglm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_equals_eager_on_the_int8_cache(variant, dtype):
    """The native decode step on an int8 pool (it quantizes the new keys itself and reads int8 keys
    times their scales) equals the eager step on a copy of the same cache (which dequantizes), logits
    and stored keys, rows at their own lengths, one with a Part A."""
    model = fused_model(variant, dtype)
    pool = BlockPool.for_model(model, 32, 4, torch.int8)
    with torch.inference_mode():
        cache, ref = PagedKVCache(pool, 3, 24), PagedKVCache(pool, 3, 24)
        for b, (n, sep) in enumerate([(3, 0), (7, 2), (5, 5)]):
            one = PagedKVCache(pool, 1, n)
            model.prefill(torch.arange(2, 2 + n)[None] + b, one, sep=sep)
            cache.copy_rows(b, one, 0, n), ref.copy_rows(b, one, 0, n)
            one.release(0)
        idx, tokens = torch.tensor([3, 7, 5]), torch.tensor([[9], [10], [11]])
        for step in range(6):  # row 1 crosses into its third block
            pos = torch.stack((idx, torch.zeros_like(idx)), 1)
            for r in range(3):  # what GLM.step does before the native step: blocks, copied on write
                cache.reserve(r, int(idx[r]), int(idx[r]) + 1)
            got = fused.decode_step(model, cache, tokens[:, 0], pos[:, 0], pos[:, 1], idx)
            assert got is not None, "the native step must take an int8 pool"
            want = eager_step(model, tokens, pos[:, :, None], ref, idx[:, None], extent=int(idx.max()) + 1)[:, -1].float()
            tol = 1e-3 if dtype == torch.float32 else 2e-2
            assert_close(got, want, atol=scaled(tol, want), what=f"{variant} {dtype} step {step}: logits, native vs eager")
            rows = torch.arange(3)
            blk = lambda c: torch.tensor([c.blocks[r][int(idx[r]) // 4] for r in range(3)])
            for layer in range(model.cfg.n_layers):  # the keys each wrote: one int8 step apart at most, mostly equal
                k, kr = (pool.read(layer, blk(c), torch.float32)[rows, :, idx % 4] for c in (cache, ref))  # (3, K, D)
                step_size = pool.k_scale[layer, blk(ref)][rows, :, idx % 4].amax()
                assert_close(k, kr, atol=float(step_size) * 1.01 + scaled(tol, kr), what=f"{variant} {dtype} layer {layer} keys")
                for t in (pool.k, pool.v):
                    same = (t[layer, blk(cache)][rows, :, idx % 4] == t[layer, blk(ref)][rows, :, idx % 4]).float().mean()
                    # bf16: the eager step quantizes keys already rounded to bf16, the native one its fp32 keys
                    assert same > (0.98 if dtype == torch.float32 else 0.7), f"{variant} {dtype} layer {layer}: only {same:.1%} of the int8 codes equal the eager step's"
            tokens, idx = want.argmax(-1, keepdim=True), idx + 1
        cache.release(range(3)), ref.release(range(3))
    pool_is_clean(pool)


@pytest.mark.parametrize("position", ["rope_partial", "rope_2d"])
def test_shared_int8_blocks_copy_on_write_with_their_scales(position):
    """Two rows share a prompt's int8 blocks, then decode different tokens: the shared, partly filled
    block is copied (keys and scales) at each row's first write, the prompt's blocks stay as they were,
    and the logits equal rows prefilled on their own. A contiguous cache copied into the pool is
    quantized on the way in: the same keys as a prefill into the pool."""
    model = model_of(position)
    T = 10  # 2.5 blocks of 4
    ids = torch.randint(0, 500, (1, T), generator=torch.Generator().manual_seed(2))
    sep = 6 if position == "rope_2d" else None
    pool = BlockPool.for_model(model, 24, 4, torch.int8)
    prompt, shared, alone = PagedKVCache(pool, 1, T), PagedKVCache(pool, 2, 32), PagedKVCache(pool, 2, 32)
    with torch.no_grad():
        model.prefill(ids, prompt, sep=sep)
        model.prefill(ids.expand(2, T), alone, sep=sep)  # the same prompt in rows of their own
        before = [t.clone() for t in (pool.k, pool.v, pool.k_scale, pool.v_scale)]
        shared.copy_rows(slice(0, 2), prompt, slice(0, 1), T)
        assert [pool.refs[b] for b in prompt.blocks[0]] == [3, 3, 3]
        x = steps(model, alone, [T, T], 5, torch.Generator().manual_seed(3))
        y = steps(model, shared, [T, T], 5, torch.Generator().manual_seed(3))
        assert_close(y, x, 1e-4, "decode after sharing int8 blocks vs rows prefilled alone")
        assert len({shared.blocks[0][2], shared.blocks[1][2], prompt.blocks[0][2]}) == 3  # the partial block: copied
        for t, b in zip((pool.k, pool.v, pool.k_scale, pool.v_scale), before):
            assert torch.equal(t[:, prompt.blocks[0]], b[:, prompt.blocks[0]])  # the prompt is untouched
        shared.release([0, 1]), alone.release([0, 1])
        prompt.release(0)
        ref = model.new_cache(1, 16)  # contiguous, fp32
        model.prefill(ids, ref, sep=sep)
        copied = PagedKVCache(pool, 1, 16)
        copied.copy_rows(0, ref, 0, T)
        for j, b in enumerate(copied.blocks[0]):  # each block holds the quantized keys and values, with their scales
            lo, hi = 4 * j, min(T, 4 * j + 4)
            for q, s, full in ((pool.k, pool.k_scale, ref.k), (pool.v, pool.v_scale, ref.v)):
                want_q, want_s = quantize_kv(full[:, 0, :, lo:hi])
                assert torch.equal(q[:, b, :, : hi - lo], want_q) and torch.equal(s[:, b, :, : hi - lo], want_s), j
        at, tok = torch.tensor([[T]]), torch.tensor([[7]])
        assert_close(model.step(tok, at, copied, at, extent=T + 1), model.step(tok, at, ref, at, extent=T + 1),
                     0.5, "a step after copying a contiguous cache into the int8 pool vs on the contiguous cache")
        copied.release(0)
    pool_is_clean(pool)


def test_block_bytes_is_what_the_pool_allocates():
    cfg = get_preset("glm-4-9b")  # 2 KV heads of 128: int8 holds 128 + 4 bytes per vector to bf16's 256
    model = model_of("rope_partial")
    small = model.cfg
    for dt in (torch.float32, torch.bfloat16, torch.int8):
        pool = BlockPool(small.n_layers, 5, small.n_kv_heads, 4, small.head_dim, dt)
        real = sum(t.untyped_storage().nbytes() for t in (pool.k, pool.v, pool.valid, pool.k_scale, pool.v_scale)
                   if t is not None)
        assert real == 6 * BlockPool.block_bytes(small, 4, dt), (dt, real)  # 5 blocks and the null block
        # the plan counts per position what the pool holds per block
        assert plan_mod.kv_cache_bytes(cfg, 1, 16 * 7, dt) - 8 == 7 * BlockPool.block_bytes(cfg, 16, dt)
    ratio = BlockPool.block_bytes(cfg, 16, torch.bfloat16) / BlockPool.block_bytes(cfg, 16, torch.int8)
    assert 1.9 < ratio < 2.0, ratio
    per = {dt: BlockPool.block_bytes(model.cfg, 16, dt) for dt in (torch.float32, torch.int8)}
    e = Engine(model, max_batch=2, max_len=64, kv_memory=21 * per[torch.int8], kv_dtype=torch.int8)
    assert e.pool.dtype == torch.int8 and e.pool.n_blocks == 20
    assert Engine(model, max_batch=2, max_len=64, kv_memory=21 * per[torch.int8]).pool.n_blocks == 21 * per[torch.int8] // per[torch.float32] - 1
    with pytest.raises(ValueError, match="model's dtype .* or torch.int8"):
        Engine(model, kv_dtype=torch.float16)
    with pytest.raises(ValueError, match="float dtype or torch.int8"):
        BlockPool(1, 2, 1, 4, 8, torch.int32)


def _greedy_over_int8_cache(model, req: Request, n: int) -> tuple[list[int], list[float]]:
    """The engine's computation for one request, by hand: prefill, then decode steps, on an int8 pool."""
    pool = BlockPool.for_model(model, 32, 4, torch.int8)
    T = len(req.prompt_ids)
    cache = PagedKVCache(pool, 1, T + n)
    pos = torch.tensor(req.position_ids) if req.position_ids else torch.stack((torch.arange(T), torch.zeros(T, dtype=torch.long)))
    start = req.gen_start or (T, 0)
    toks, lps = [], []
    with torch.no_grad():
        logits = model.prefill(torch.tensor([req.prompt_ids]), cache, position_ids=pos[None], sep=req.sep, last_only=True)[0, -1]
        for k in range(n):
            lp = logits.float().log_softmax(-1)
            toks.append(int(lp.argmax()))
            lps.append(float(lp.max()))
            p = torch.tensor([[[start[0] + k * req.gen_step[0]], [start[1] + k * req.gen_step[1]]]])
            at = torch.tensor([[T + k]])
            logits = model.step(torch.tensor([[toks[-1]]]), p, cache, at, extent=T + k + 1)[0, -1]
    cache.release(0)
    pool_is_clean(pool)
    return toks, lps


def test_engine_with_int8_kv_equals_greedy_over_an_int8_cache():
    """Causal and GLM prefix requests join and leave an engine with an int8 pool: each gets the tokens
    and log-probabilities of its own greedy loop over an int8 cache (an fp32 cache gives log-probs
    ~1e-3 away: the tolerance tells them apart), and every block comes back."""
    model = model_of()
    p = lambda n: SamplingParams(max_new_tokens=n, temperature=0, logprobs=True)
    reqs = [Request([5, 6, 7, 8], p(10)), Request([9, 10], p(6)), glm_request([30, 31, 32], 3, 4, params=p(8)),
            Request(list(range(11, 24)), p(9)), glm_request([40, 41, 42, 43, 44], 3, 4, params=p(7))]
    e = Engine(model, max_batch=3, max_len=64, block_size=4, kv_dtype=torch.int8)
    run_all(e, {0: reqs[:2], 1: [reqs[2]], 3: reqs[3:]})
    for i, r in enumerate(reqs):
        toks, lps = _greedy_over_int8_cache(model, r, r.params.max_new_tokens)
        assert r.output_ids == toks, f"request {i}: engine {r.output_ids} vs greedy over an int8 cache {toks}"
        assert_close(torch.tensor(r.logprobs), torch.tensor(lps), 2e-5, f"request {i}: log-probs")
    pool_is_clean(e.pool)


def test_kv_dtype_int8_doubles_what_kv_memory_holds(monkeypatch, capsys):
    """serve --kv-memory 2GiB --kv-dtype int8 plans a pool of about twice the tokens of bf16's, the
    plan's pool line counts int8 bytes, and `glmkit info`'s description names int8 KV per 1K tokens."""
    monkeypatch.setattr(plan_mod, "available_bytes", lambda device: 1 << 40)
    cfg = get_preset("glm-4-9b")
    tokens = {}
    for kv in ("auto", "int8"):
        a = argparse.Namespace(dtype="bf16", kv_memory="2GiB", kv_dtype=kv, max_batch=16, max_len=None)
        plan, _ = memory_plan(a, "serve", cfg, torch.bfloat16, torch.device("cpu"))
        tokens[kv] = plan.kv_tokens
        pool_line = next(n for name, n, _ in plan.lines if name.startswith("KV pool"))
        assert pool_line <= 2 << 30 and pool_line == plan_mod.kv_pool_bytes(cfg, plan.kv_blocks, kv_dtype_arg(kv) or torch.bfloat16)
    assert 1.9 < tokens["int8"] / tokens["auto"] < 2.0, tokens
    assert "in int8 (serve --kv-dtype int8)" in describe(cfg, "preset glm-4-9b")
    with pytest.raises(ValueError, match="choose auto or int8"):
        kv_dtype_arg("int4")


def test_serve_passes_kv_dtype_to_the_engine(tok):
    """create_app (what `glmkit serve --kv-dtype int8` calls) builds its engine on an int8 pool."""
    from glmkit.server.app import create_app

    model = model_of("rope_partial")
    app = create_app(model, tok, "tiny", max_batch=2, max_len=64, kv_dtype=kv_dtype_arg("int8"))
    assert app.state.server.engine.pool.dtype == torch.int8
    assert create_app(model, tok, "tiny", max_batch=2, max_len=64).state.server.engine.pool.dtype == torch.float32
