"""The paged KV cache: the same logits and tokens as the contiguous cache, blocks accounted for.

Reference: `KVCache` (contiguous, itself checked against full forwards in test_model / test_engine)
for logits, plain full forwards for the engine's greedy tokens. Small blocks (4 slots) so every row
spans several blocks and rows of different lengths end mid-block. The models are untied random ones
whose outputs depend on every key, position and mask entry (see test_engine)."""

import pytest
import torch

from glmkit import fused, kernels
from glmkit.engine import Engine, Request
from glmkit.model import BlockPool, PagedKVCache, PoolExhausted
from glmkit.sampling import SamplingParams
from tests.helpers import assert_close
from tests.test_engine import full_greedy, glm_greedy, glm_request, model_of, run_all
from tests.test_kernels import eager_step, fused_model, scaled


def close(a, b, what):
    d = (a - b).abs()
    assert d.max() < 1e-4, f"{what}: max |diff| {d.max():.3g}, mean {d.mean():.3g}; {a.flatten()[:4].tolist()} vs {b.flatten()[:4].tolist()}"


def pool_is_clean(pool: BlockPool):
    """Every block back in the pool, nothing referenced."""
    assert sorted(pool.free) == list(range(1, pool.n_blocks + 1)), f"{pool.n_blocks - pool.num_free} blocks still held"
    assert not any(pool.refs), [(b, r) for b, r in enumerate(pool.refs) if r]


def steps(model, cache, lengths, n_steps, gen):
    """Decode n_steps tokens for rows at their own lengths (they differ): (n_steps, B, V) logits."""
    out, lengths = [], list(lengths)
    for _ in range(n_steps):
        tok = torch.randint(0, 500, (len(lengths), 1), generator=gen)
        slots = torch.tensor(lengths)[:, None]
        out.append(model.step(tok, slots, cache, slots, extent=max(lengths) + 1)[:, -1])
        lengths = [n + 1 for n in lengths]
    return torch.stack(out)


@pytest.mark.parametrize("position", ["rope_partial", "rope_2d"])  # causal GLM-4; prefix-LM (Part A) GLM
@pytest.mark.parametrize("grad", [False, True])  # no_grad: the contiguous cache takes the native step; grad: eager
def test_paged_equals_contiguous_logits(position, grad):
    model = model_of(position)
    torch.manual_seed(1)
    B, T = 3, 11
    ids = torch.randint(0, 500, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :3] = mask[2, :6] = 0  # left padding of different lengths
    sep = torch.tensor([7, 3, 9]) if position == "rope_2d" else None  # Part A read bidirectionally
    pool = BlockPool.for_model(model, 40, 4)
    paged, ref = PagedKVCache(pool, B, 48), model.new_cache(B, 48)
    with torch.set_grad_enabled(grad):
        a = model.prefill(ids, ref, sep=sep, attention_mask=mask)
        b = model.prefill(ids, paged, sep=sep, attention_mask=mask)
        close(b, a, "prefill")
        assert [len(r) for r in paged.blocks] == [3, 3, 3]
        # rows continue at lengths of their own: 11, 14, 17 (row 2 spans 5 blocks, row 0 stays at 3)
        for cache in (ref, paged):
            cache.copy_rows(1, cache, 1, T)  # a row onto itself keeps its keys (and its blocks)
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        for cache, g in ((ref, g1), (paged, g2)):
            steps(model, cache, [T] * B, 3, g)  # all rows 14
        x, y = steps(model, ref, [14, 15, 17], 6, g1), steps(model, paged, [14, 15, 17], 6, g2)
    assert x.shape == (6, B, 512)
    close(y, x, "decode steps")
    assert [len(r) for r in paged.blocks] == [5, 6, 6]
    paged.release(range(B))
    pool_is_clean(pool)


@pytest.mark.parametrize("position", ["rope_partial", "rope_2d"])
def test_shared_prompt_blocks_copy_on_write(position):
    """Two rows take one prompt's blocks (refcounts 3: the prompt and both rows), then decode
    different tokens: the shared, partly filled last block is copied at each row's first write, the
    prompt's keys stay as they were, and both match rows copied into a contiguous cache."""
    model = model_of(position)
    torch.manual_seed(2)
    T = 10  # 2.5 blocks of 4
    ids = torch.randint(0, 500, (1, T))
    sep = 6 if position == "rope_2d" else None
    pool = BlockPool.for_model(model, 16, 4)
    prompt, paged = PagedKVCache(pool, 1, T), PagedKVCache(pool, 2, 32)
    ref_prompt, ref = model.new_cache(1, T), model.new_cache(2, 32)
    with torch.no_grad():
        close(model.prefill(ids, prompt, sep=sep), model.prefill(ids, ref_prompt, sep=sep), "prompt")
        before = pool.k.clone()
        paged.copy_rows(slice(0, 2), prompt, slice(0, 1), T)
        ref.copy_rows(slice(0, 2), ref_prompt, slice(0, 1), T)
        assert paged.blocks[0] == paged.blocks[1] == prompt.blocks[0]
        assert [pool.refs[b] for b in prompt.blocks[0]] == [3, 3, 3] and pool.num_free == 13
        x = steps(model, ref, [T, T], 5, torch.Generator().manual_seed(3))
        y = steps(model, paged, [T, T], 5, torch.Generator().manual_seed(3))
    close(y, x, "decode after sharing")
    assert paged.blocks[0][:2] == paged.blocks[1][:2] == prompt.blocks[0][:2]  # full blocks still shared
    assert len({paged.blocks[0][2], paged.blocks[1][2], prompt.blocks[0][2]}) == 3  # the partial one: copied
    assert torch.equal(pool.k[:, prompt.blocks[0]], before[:, prompt.blocks[0]])  # the prompt is untouched
    assert [pool.refs[b] for b in prompt.blocks[0]] == [3, 3, 1]
    paged.release([0, 1])
    assert [pool.refs[b] for b in prompt.blocks[0]] == [1, 1, 1]
    prompt.release(0)
    pool_is_clean(pool)


def test_copy_from_a_contiguous_cache_and_exhaustion():
    model = model_of("rope_partial")
    ids = torch.randint(0, 500, (1, 9), generator=torch.Generator().manual_seed(4))
    ref = model.new_cache(1, 16)
    with torch.no_grad():
        model.prefill(ids, ref)
    pool = BlockPool.for_model(model, 3, 4)
    paged = PagedKVCache(pool, 1, 16)
    paged.copy_rows(0, ref, 0, 9)
    assert len(paged.blocks[0]) == 3 and pool.num_free == 0
    tok = torch.tensor([[7]])
    with torch.no_grad():  # slot 9 is in block 2: it fits
        close(model.step(tok, torch.tensor([[9]]), paged, torch.tensor([[9]]), extent=10),
              model.step(tok, torch.tensor([[9]]), ref, torch.tensor([[9]]), extent=10), "step after copy")
    with pytest.raises(PoolExhausted, match="pool is full"):
        paged.reserve(0, 12, 13)  # a fourth block
    paged.release(0)
    pool_is_clean(pool)


def test_engine_paged_tokens_with_rows_joining_and_leaving():
    """Causal and GLM prefix requests of different lengths join and leave a paged engine of 4-slot
    blocks; every request gets the tokens of plain full forwards, and every block comes back."""
    model = model_of()
    greedy = lambda n: SamplingParams(max_new_tokens=n, temperature=0)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17], [20, 21, 22]]
    e = Engine(model, max_batch=3, max_len=64, block_size=4)
    reqs = [Request(p, greedy(12 - 4 * (i == 1))) for i, p in enumerate(prompts)]
    glm = [glm_request([30, 31, 32], 3, 4, params=greedy(7)), glm_request([40, 41, 42, 43, 44], 3, 4, params=greedy(9))]
    run_all(e, {0: [reqs[0], glm[0]], 2: [reqs[1], reqs[2]], 5: [reqs[3]], 6: [glm[1]]})
    for i, r in enumerate(reqs):
        want = full_greedy(model, prompts[i], r.params.max_new_tokens)
        assert r.output_ids == want, f"request {i}: paged engine {r.output_ids} vs full forwards {want}"
    for r, p in zip(glm, ([30, 31, 32], [40, 41, 42, 43, 44])):
        assert r.output_ids == glm_greedy(model, p, 3, 4, r.params.max_new_tokens), (r.output_ids, p)
    pool_is_clean(e.pool)


def test_engine_prompt_reuse_shares_blocks_within_a_scope_only():
    model = model_of("rope_partial")
    p = SamplingParams(max_new_tokens=6, temperature=0)
    e = Engine(model, max_batch=4, max_len=64, block_size=4)
    prompt = list(range(100, 110))  # 2.5 blocks
    first = e.submit(Request(prompt, p, cache_scope="a"))
    e.step()  # admitted: the entry and the row share 3 blocks (the row copied the partial one to write)
    (entry,) = e.prompt_cache["a"].values()
    held = entry[1].blocks[0]
    assert [e.pool.refs[b] for b in held] == [2, 2, 1], [e.pool.refs[b] for b in held]
    same = e.submit(Request(prompt, p, cache_scope="a"))
    longer = e.submit(Request(prompt + [7, 8, 9], p, cache_scope="a"))  # causal: reuses the 10-token prefix
    other = e.submit(Request(prompt, p, cache_scope="b"))
    e.step()
    assert (same.cached_tokens, longer.cached_tokens) == (10, 10)
    # the entry, first, same, longer and longer's own entry (its first 2 blocks): never `other`
    assert [e.pool.refs[b] for b in held] == [5, 5, 1], [e.pool.refs[b] for b in held]
    assert other.cached_tokens == 0 and not set(e.cache.blocks[3]) & set(held), (e.cache.blocks, held)
    run_all(e, {})
    want = full_greedy(model, prompt, 6)
    assert first.output_ids == same.output_ids == other.output_ids == want, (first.output_ids, same.output_ids, want)
    assert longer.output_ids == full_greedy(model, prompt + [7, 8, 9], 6)
    # the two scopes' entries hold their blocks; dropping them empties the pool
    assert e.pool.n_blocks - e.pool.num_free == 3 + 2 + 3  # a: 10 tokens, 13 tokens (2 blocks shared); b: 10 tokens
    with torch.inference_mode():  # the entries were made in the engine's step
        for entries in e.prompt_cache.values():
            for entry in entries.values():
                entry[1].release(0)
    pool_is_clean(e.pool)


def test_engine_admission_waits_for_blocks_and_a_starved_row_ends_alone():
    model = model_of("rope_partial")
    greedy = lambda n: SamplingParams(max_new_tokens=n, temperature=0)
    # 6 blocks of 4: a 7-token prompt takes 2 (+1 free for admission); two cannot start together
    e = Engine(model, max_batch=4, max_len=64, kv_blocks=6, block_size=4)
    a, b = e.submit(Request(list(range(20, 27)), greedy(3))), e.submit(Request(list(range(40, 47)), greedy(3)))
    c = e.submit(Request(list(range(60, 67)), greedy(3)))
    e.step()
    assert e.num_running == 2 and e.num_waiting == 1  # c waits: 2 free blocks, it needs 2 + 1
    run_all(e, {})
    for r, p in ((a, range(20, 27)), (b, range(40, 47)), (c, range(60, 67))):
        assert r.finish_reason == "length" and r.output_ids == full_greedy(model, list(p), 3), (r.finish_reason, r.output_ids)
    pool_is_clean(e.pool)
    # two long generations outgrow the pool: one ends with a clear error, the other runs to the end unchanged
    long = [e.submit(Request(list(range(20, 27)), greedy(12))), e.submit(Request(list(range(40, 47)), greedy(12)))]
    run_all(e, {})
    reasons = sorted(r.finish_reason for r in long)
    assert reasons == ["error", "length"], [(r.finish_reason, r.error) for r in long]
    bad, good = sorted(long, key=lambda r: r.finish_reason)
    assert "KV block pool is full" in bad.error and 0 < len(bad.output_ids) < 12, bad.error
    assert good.output_ids == full_greedy(model, good.prompt_ids, 12)
    assert bad.output_ids == full_greedy(model, bad.prompt_ids, 12)[: len(bad.output_ids)]
    pool_is_clean(e.pool)
    with pytest.raises(ValueError, match="needs 7 KV blocks; the pool holds 6"):
        e.submit(Request(list(range(25)), greedy(1)))


def test_kv_memory_sizes_the_pool():
    model = model_of("rope_partial")
    cfg = model.cfg
    per_block = BlockPool.block_bytes(cfg, 16, torch.float32)
    assert per_block == 2 * cfg.n_layers * cfg.n_kv_heads * 16 * cfg.head_dim * 4 + 16  # keys, values, valid flags
    e = Engine(model, max_batch=8, max_len=256, kv_memory=11 * per_block + per_block // 2)  # 10 and the null block
    assert e.pool.n_blocks == 10 and e.pool.k.shape == (cfg.n_layers, 11, cfg.n_kv_heads, 16, cfg.head_dim)
    assert Engine(model, max_batch=2, max_len=40).pool.n_blocks == 2 * 3  # default: every row at full length
    with pytest.raises(ValueError, match="holds no block"):
        Engine(model, kv_memory=per_block - 1)
    with pytest.raises(MemoryError, match="needs .* GiB"):
        Engine(model, kv_blocks=1 << 40)


def test_copying_a_prefix_hides_the_source_keys_after_it():
    """Rows take the first 9 of a 10-token prompt (a prefix ending mid-block): slot 9 of the shared
    block must not be seen by them, so that block is copied and its later slot cleared at once."""
    model = model_of("rope_partial")
    ids = torch.randint(0, 500, (1, 10), generator=torch.Generator().manual_seed(6))
    pool = BlockPool.for_model(model, 8, 4)
    prompt, paged, ref_prompt, ref = PagedKVCache(pool, 1, 10), PagedKVCache(pool, 1, 16), model.new_cache(1, 10), model.new_cache(1, 16)
    with torch.no_grad():
        model.prefill(ids, prompt), model.prefill(ids, ref_prompt)
        paged.copy_rows(0, prompt, 0, 9)
        ref.copy_rows(0, ref_prompt, 0, 9)
        assert paged.blocks[0][:2] == prompt.blocks[0][:2] and paged.blocks[0][2] != prompt.blocks[0][2]
        # a step that attends over slot 9 without writing it (slot 10): the hidden key must stay hidden
        tok, at = torch.tensor([[3]]), torch.tensor([[10]])
        close(model.step(tok, at, paged, at, extent=11), model.step(tok, at, ref, at, extent=11), "step after a prefix copy")
    paged.release(0), prompt.release(0)
    pool_is_clean(pool)


@pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("variant", ["glm4", "chatglm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_reads_the_paged_cache(variant, dtype):
    """The native decode step through the block table equals the eager step on a copy of the same
    paged cache (logits and cached keys), rows at their own lengths, one with a Part A, blocks of 4."""
    model = fused_model(variant, dtype)
    pool = BlockPool.for_model(model, 32, 4)
    with torch.inference_mode():
        cache, ref = PagedKVCache(pool, 3, 24), PagedKVCache(pool, 3, 24)
        for b, (n, sep) in enumerate([(3, 0), (7, 2), (5, 5)]):
            one = PagedKVCache(pool, 1, n)
            model.prefill(torch.arange(2, 2 + n)[None] + b, one, sep=sep)
            cache.copy_rows(b, one, 0, n), ref.copy_rows(b, one, 0, n)  # shared: both copy on write
            one.release(0)
        idx, tokens = torch.tensor([3, 7, 5]), torch.tensor([[9], [10], [11]])
        for step in range(6):  # row 1 crosses into its third block
            pos = torch.stack((idx, torch.zeros_like(idx)), 1)
            assert model.step(tokens, pos[:, :, None], cache, idx[:, None], extent=int(idx.max()) + 1) is not None
            got = fused.decode_step(model, cache, tokens[:, 0], pos[:, 0], pos[:, 1], idx)  # slot written again: same
            want = eager_step(model, tokens, pos[:, :, None], ref, idx[:, None], extent=int(idx.max()) + 1)[:, -1].float()
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            assert_close(got, want, atol=scaled(tol, want), what=f"{variant} {dtype} step {step}: logits")
            for c in (cache, ref):
                assert all(pool.refs[row[-1]] == 1 for row in c.blocks)  # the written blocks: copied on write
            k, kr = (pool.k[:, torch.tensor(c.blocks[1])].float() for c in (cache, ref))
            assert_close(k, kr, atol=scaled(tol, kr), what=f"{variant} {dtype} step {step}: cached keys")
            tokens, idx = want.argmax(-1, keepdim=True), idx + 1
        cache.release(range(3)), ref.release(range(3))
    pool_is_clean(pool)


# ---- chunked prefill ------------------------------------------------------------------------------------
@pytest.mark.parametrize("position", ["rope_partial", "rope_2d"])
def test_chunked_prefill_logits_equal_one_shot(position):
    """A prompt prefilled in chunks of 3 (Part A whole in the first) gives every position's logits of
    a one-shot prefill, and the same keys in the cache."""
    model = model_of(position)
    T, sep = 14, (5 if position == "rope_2d" else 0)
    ids = torch.randint(0, 500, (1, T), generator=torch.Generator().manual_seed(8))
    pos = torch.arange(T)[None]
    pool = BlockPool.for_model(model, 16, 4)
    whole, chunked = PagedKVCache(pool, 1, T), PagedKVCache(pool, 1, T)
    with torch.no_grad():
        want = model.prefill(ids, whole, sep=sep)
        got, a = [], 0
        for b in [max(3, sep)] + list(range(max(3, sep) + 3, T, 3)) + [T]:
            got.append(model.prefill(ids[:, a:b], chunked, position_ids=pos[:, a:b], sep=sep if a == 0 else None))
            a = b
    close(torch.cat(got, 1), want, "chunked prefill logits")
    for t in (pool.k, pool.v):
        close(t[:, chunked.blocks[0]], t[:, whole.blocks[0]], "cached keys and values")


def test_engine_chunked_prefill_interleaves_and_equals_one_shot():
    """A long prompt prefilled 4 tokens a step while two rows decode: the rows gain a token every
    step meanwhile, and every request's tokens and logprobs equal an engine prefilling at once."""
    model = model_of()
    p = lambda n: SamplingParams(max_new_tokens=n, temperature=0, logprobs=True)
    long_prompt = list(range(100, 127))  # 27 tokens: 7 steps of 4
    make = lambda: [Request([5, 6, 7], p(14)), glm_request([40, 41, 42, 43, 44, 45, 46], 3, 4, params=p(14)),
                    Request(long_prompt, p(5)), glm_request(list(range(60, 80)), 3, 4, params=p(5))]
    runs = {}
    for chunk in (None, 4):
        e = Engine(model, max_batch=4, max_len=64, block_size=4, prefill_chunk=chunk)
        reqs = make()
        e.submit(reqs[0]), e.submit(reqs[1])
        e.step(), e.step()
        e.submit(reqs[2])
        before, steps = [len(r.output_ids) for r in reqs[:2]], 0
        while not reqs[2].output_ids:
            e.step()
            steps += 1
        assert [len(r.output_ids) for r in reqs[:2]] == [n + steps for n in before]  # they never waited
        assert steps == (7 if chunk else 1), steps
        e.submit(reqs[3])  # Part A of 21 tokens: one chunk however small the chunk
        run_all(e, {})
        runs[chunk] = reqs
        assert e.stats["prefill_tokens"] == 3 + 9 + 27 + 22
        pool_is_clean(e.pool)
    for one, chunked in zip(runs[None], runs[4]):
        assert chunked.output_ids == one.output_ids, (chunked.output_ids, one.output_ids)
        close(torch.tensor(chunked.logprobs), torch.tensor(one.logprobs), "logprobs")
    assert runs[4][2].output_ids == full_greedy(model, long_prompt, 5)
    assert runs[4][3].output_ids == glm_greedy(model, list(range(60, 80)), 3, 4, 5)
