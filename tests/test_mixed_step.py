"""The mixed step: decode rows and prefill chunks in one forward, equal to running them apart.

Reference for `GLM.step_many`: the same parts run one by one through `step` / `prefill` (the decode
step on its native path), on twin caches in one pool; logits and the keys written must agree. For the
engine: an engine prefilling whole prompts (itself checked against plain full forwards in
test_engine / test_paged), and counted passes over the weights. The chunk sizer is checked on
synthetic step times, where its fixed point is known."""

import pytest
import torch

from glmkit import fused
from glmkit.config import ModelConfig
from glmkit.engine import ChunkSizer, Engine, Request
from glmkit.model import GLM, BlockPool, PagedKVCache, Part
from glmkit.sampling import SamplingParams
from tests.helpers import assert_close
from tests.test_engine import full_greedy, glm_request, model_of, run_all


def model_for(kind):
    if kind != "learned_2d":
        return model_of(kind)
    torch.manual_seed(0)  # the original GLM's layout: learned 2D positions, LayerNorm, GELU, biases
    m = GLM(ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, position="learned_2d", norm="layernorm",
                        mlp="gelu", qkv_bias=True, out_bias=True, mlp_bias=True, max_seq_len=64, tie_embeddings=False,
                        init_std=0.2)).eval()
    m.init_weights(seed=0)
    return m


def twins(model, pool, gen):
    """Running rows (3, at lengths 7, 7, 6) and two prompts: Q empty (its Part A comes in the mixed step),
    P with 4 tokens already prefilled. The same tokens every call, so two calls give twin caches."""
    rows, Q, P = PagedKVCache(pool, 3, 32), PagedKVCache(pool, 1, 12), PagedKVCache(pool, 1, 10)
    model.prefill(torch.randint(0, 500, (3, 6), generator=gen), rows)
    model.step(torch.randint(0, 500, (2, 1), generator=gen), torch.full((2, 1), 6), rows, torch.full((2, 1), 6), extent=7)
    p = torch.randint(0, 500, (1, 10), generator=gen)
    model.prefill(p[:, :4], P)
    return rows, Q, P, p


@pytest.mark.parametrize("kind", ["rope_2d", "rope_partial", "learned_2d"])
def test_step_many_equals_the_parts_run_apart(kind):
    model = model_for(kind)
    sep = 5 if kind != "rope_partial" else 0  # Q's Part A, read bidirectionally, whole in its first chunk
    pool = BlockPool.for_model(model, 64, 4)
    q = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(2))
    dec = torch.randint(0, 500, (3, 1), generator=torch.Generator().manual_seed(3))
    slots = torch.tensor([[7], [7], [6]])
    parts = lambda rows, Q, P, p: [
        Part(dec, slots, rows, slots, extent=8),
        Part(q[:, :7], torch.arange(7)[None], Q, torch.arange(7)[None], extent=7),
        Part(p[:, 4:9], torch.arange(4, 9)[None], P, torch.arange(4, 9)[None], extent=9)]
    with torch.no_grad():
        apart = twins(model, pool, torch.Generator().manual_seed(4))
        want = [model.step(dec, slots, apart[0], slots, extent=8),
                model.prefill(q[:, :7], apart[1], sep=sep),
                model.step(apart[3][:, 4:9], torch.arange(4, 9)[None], apart[2], torch.arange(4, 9)[None], extent=9)]
        mixed = twins(model, pool, torch.Generator().manual_seed(4))
        mixed[1].sep[0] = sep  # what the first prefill sets, as the engine does
        got = model.step_many(parts(*mixed))
    worst = max(assert_close(g, w, 1e-4, f"{kind} part {i} logits") for i, (g, w) in enumerate(zip(got, want)))
    print(f"{kind}: max |mixed - apart| logits {worst:.2e}")
    for a, m in zip(apart[:3], mixed[:3]):  # the keys and values written through every block table
        for b in range(len(a.blocks)):
            for t in (pool.k, pool.v):
                assert_close(t[:, m.blocks[b]], t[:, a.blocks[b]], 1e-5, f"{kind} cached keys / values")
    if sep:  # Part A is read bidirectionally: a causal read of it gives other logits
        causal = twins(model, pool, torch.Generator().manual_seed(4))
        with torch.no_grad():
            other = model.step_many(parts(*causal))[1]
        assert (other - want[1]).abs().max() > 1e-3


def forward_passes(model, monkeypatch):
    """A list that gets one entry per pass over the weights: an eager forward (its first block's MLP)
    or a native decode step."""
    passes = []
    model.layers[0].mlp.register_forward_hook(lambda *_: passes.append("eager"))
    native = fused.decode_step

    def counted(*a, **k):
        out = native(*a, **k)
        if out is not None:
            passes.append("native")
        return out
    monkeypatch.setattr(fused, "decode_step", counted)
    return passes


def test_engine_reads_the_weights_once_per_step_and_gives_one_shot_tokens(monkeypatch):
    """Two rows decode while a 40-token prompt is prefilled 8 tokens a step: every step is one forward
    (the rows' tokens beside the chunk), the rows gain a token each step, and every request's tokens
    and logprobs equal an engine prefilling whole prompts."""
    model = model_of("rope_partial")
    p = lambda n: SamplingParams(max_new_tokens=n, temperature=0, logprobs=True)
    long_prompt = list(range(100, 140))
    runs = {}
    for chunk in (None, 8):
        e = Engine(model, max_batch=4, max_len=64, block_size=4, prefill_chunk=chunk)
        reqs = [Request([5, 6, 7], p(12)), Request([9, 10, 11, 12], p(12)), Request(long_prompt, p(4))]
        if chunk is None:  # the reference: the long prompt in one step
            run_all(e, {0: reqs[:2], 2: reqs[2:]})
        else:
            e.submit(reqs[0]), e.submit(reqs[1])
            e.step(), e.step()
            passes = forward_passes(model, monkeypatch)
            e.submit(reqs[2])
            while not reqs[2].output_ids:
                before, n = [len(r.output_ids) for r in reqs[:2]], len(passes)
                e.step()
                assert len(passes) - n == 1, f"a step made {len(passes) - n} passes over the weights: {passes[n:]}"
                assert [len(r.output_ids) for r in reqs[:2]] == [k + 1 for k in before]
            assert passes == ["eager"] * 5, passes  # 40 tokens, 8 a step, each step mixed
            run_all(e, {})
        runs[chunk] = reqs
    for one, mixed in zip(runs[None], runs[8]):
        assert mixed.output_ids == one.output_ids, (mixed.output_ids, one.output_ids)
        assert_close(torch.tensor(mixed.logprobs), torch.tensor(one.logprobs), 1e-4, "logprobs")
    assert runs[8][2].output_ids == full_greedy(model, long_prompt, 4)


def test_auto_chunks_keep_the_streams_going_and_give_one_shot_tokens():
    """prefill_chunk="auto" (measured times, so sizes vary run to run): the rows gain a token every step
    while a long prompt is prefilled, the prompt gains at least the floor each step, and the tokens equal
    whole-prompt prefill; a GLM Part A longer than any chunk still goes whole in the first (the chunks are
    capped small here, so that Part A is longer than any)."""
    model = model_of()
    p = lambda n: SamplingParams(max_new_tokens=n, temperature=0, logprobs=True)
    make = lambda: [Request([5, 6, 7], p(40)), Request([9, 10], p(40)), Request(list(range(100, 220)), p(3)),
                    glm_request(list(range(60, 110)), 3, 4, params=p(3))]
    runs = {}
    for chunk in (None, "auto"):
        e = Engine(model, max_batch=4, max_len=256, block_size=4, prefill_chunk=chunk)
        e.sizer = ChunkSizer(floor=4, idle=12)  # small chunks, so that Part A (51 tokens) is longer than any
        reqs = make()
        e.submit(reqs[0]), e.submit(reqs[1])
        for _ in range(6):  # the rows decode alone first: the sizer times idle steps
            e.step()
        for long in reqs[2:]:
            e.submit(long)
            fed = 0
            while not long.output_ids:
                before, done = [len(r.output_ids) for r in reqs[:2]], e.stats["prefill_tokens"]
                e.step()
                assert [len(r.output_ids) for r in reqs[:2]] == [k + 1 for k in before]
                n = e.stats["prefill_tokens"] - done
                if chunk == "auto":
                    least = min(e.sizer.floor, e.sizer.few_rows - 2, len(long.prompt_ids) - fed)
                    assert n >= least, (n, fed, e.sizer.__dict__)
                    assert fed or n >= long.sep, (n, long.sep)  # Part A whole in the first chunk
                fed += n
        run_all(e, {})
        runs[chunk] = reqs
    for one, auto in zip(runs[None], runs["auto"]):
        assert auto.output_ids == one.output_ids, (auto.output_ids, one.output_ids)
        assert_close(torch.tensor(auto.logprobs), torch.tensor(one.logprobs), 1e-4, "logprobs")


def test_chunk_sizer_settles_at_twice_an_idle_step():
    """Synthetic times: a decode step 0.1 s, a mixed step 0.1 + 0.02 + 1 ms per chunk token. The chunk
    that makes a step 2x idle is 80 tokens; it starts at the floor, at most doubles, and settles there."""
    s = ChunkSizer(few_rows=0)  # no few-row kernels: the line alone
    assert s.size(0) == 512  # nobody decoding: big chunks
    s.record(5.0, 3, 0)  # the first decode-only step pays one-time work: not counted
    assert s.size(3) == 16  # no idle step timed yet: the floor
    for _ in range(3):
        s.record(0.1, 3, 0)
    sizes = []
    for _ in range(40):
        sizes.append(s.size(3))
        s.record(0.1 + 0.02 + 0.001 * sizes[-1], 3, sizes[-1])
    assert sizes[:2] == [16, 32] and all(b <= 2 * a for a, b in zip(sizes, sizes[1:])), sizes
    assert all(abs(n - 80) <= 2 for n in sizes[-10:]), sizes
    assert 0.1 + 0.02 + 0.001 * sizes[-1] <= 2 * 0.1 + 0.003


@pytest.mark.parametrize("pass_s, many_fixed, want", [(0.1, 0.3, "few"), (0.1, 0.02, "line"), (0.25, 0.6, "few")])
def test_chunk_sizer_takes_the_few_row_step_when_it_is_cheaper(pass_s, many_fixed, want):
    """3 rows decode (0.1 s a step). Within 16 rows the native kernels read the weights once per 4 rows
    (`pass_s` a pass); past them a step pays `many_fixed` (the dequantized GEMM) + 1 ms a token.
    int4-like (dequantizing costs 3 decode steps): a few-row chunk that keeps the step within 2x;
    bf16-like (cheap GEMM): the line's 80 tokens; neither within 2x: the shorter step, one token."""
    step = lambda n: pass_s * -(-(3 + n) // 4) if 3 + n <= 16 else 0.1 + many_fixed + 0.001 * n
    s = ChunkSizer(few_rows=16)
    for _ in range(3):
        s.record(0.1, 3, 0)
    sizes = []
    for _ in range(40):
        sizes.append(s.size(3))
        s.record(step(sizes[-1]), 3, sizes[-1])
    assert sizes[:2] == [13, 16], sizes  # each kind of step timed once
    last = sizes[-5:]
    if want == "line":
        assert all(abs(n - 80) <= 2 for n in last), sizes
    elif pass_s == 0.1:
        assert all(n <= 13 and step(n) <= 0.2 + 1e-9 for n in last), (sizes, [step(n) for n in last])
    else:
        assert last == [1] * 5, sizes


def test_a_prompt_that_breaks_the_mixed_forward_fails_alone():
    """A prompt whose tokens the model cannot embed (out of its vocabulary) breaks the forward it is in:
    the step's parts run again one by one, it ends with "error", and the decoding rows and the prompt
    prefilled beside it go on, unchanged."""
    model = model_of("rope_partial")
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    e = Engine(model, max_batch=4, max_len=64, prefill_chunk=16)
    good = [e.submit(Request(p, greedy)) for p in ([5, 6, 7], [9, 10, 11, 12])]
    e.step(), e.step()
    bad = e.submit(Request([1, 2, 3, 4, 5, 10_000], greedy))
    good.append(e.submit(Request([20, 21, 22], greedy)))  # in the same step as the bad one
    run_all(e, {})
    assert bad.finish_reason == "error" and "could not start: IndexError" in bad.error, (bad.finish_reason, bad.error)
    assert [r.output_ids for r in good] == [full_greedy(model, p, 8) for p in ([5, 6, 7], [9, 10, 11, 12], [20, 21, 22])]
    assert sorted(e.pool.free) == list(range(1, e.pool.n_blocks + 1))  # the failed prompt's blocks came back


def test_prefill_chunk_values():
    from glmkit.server.app import _prefill_chunk

    model = model_of()
    for bad in (0, -1, "fast", 2.5):
        with pytest.raises(ValueError, match="prefill_chunk"):
            Engine(model, max_batch=1, max_len=32, prefill_chunk=bad)
    assert Engine(model, max_batch=1, max_len=32).prefill_chunk == "auto"
    assert [_prefill_chunk(t) for t in ("auto", "0", "256")] == ["auto", 0, 256]
    with pytest.raises(Exception, match="give auto"):
        _prefill_chunk("-3")
