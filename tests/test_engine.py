"""The continuous-batching engine: same tokens as one-by-one generation, whatever joins or leaves.

The token tests run untied random models: their greedy tokens depend on every key, position and mask
entry (the tied `debug` preset repeats the last input token whatever those are), and are checked
against plain full forwards without a cache."""

import pytest
import torch

from glmkit.config import ModelConfig, get_preset
from glmkit.engine import Engine, EngineFull, Request
from glmkit.generate import generate
from glmkit.model import GLM
from glmkit.sampling import SamplingParams
from tests.helpers import run_all


def model_of(position="rope_2d", seed=0):
    torch.manual_seed(seed)
    cfg = get_preset("debug", tie_embeddings=False, init_std=0.2) if position == "rope_2d" else ModelConfig(
        vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, position="rope_partial", max_seq_len=256,
        tie_embeddings=False, init_std=0.2)
    m = GLM(cfg).eval()
    m.init_weights(seed=seed)
    return m


@torch.no_grad()
def full_greedy(model, prompt, n, positions=None, sep=0):
    """n greedy tokens by full forwards over the whole sequence, no cache. positions(T) -> (2, T)
    gives the positions of a T-token sequence (default 0..T-1: the model's own causal path)."""
    ids = list(prompt)
    for _ in range(n):
        pos = None if positions is None else positions(len(ids))[None]
        ids.append(int(model(torch.tensor([ids]), pos, sep=sep)[0, -1].argmax()))
    return ids[len(prompt):]


def glm_greedy(model, prompt, mask_id, sop_id, n, bidirectional=True):
    """The reference for glm_request: Part A = prompt + [gMASK] read bidirectionally, <sop> and the
    span at the mask's position with block positions 1, 2, ..."""
    A = len(prompt) + 1
    span = lambda T: torch.tensor([list(range(A)) + [A - 1] * (T - A), [0] * A + list(range(1, T - A + 1))])
    return full_greedy(model, prompt + [mask_id, sop_id], n, span, sep=A if bidirectional else 0)


def test_staggered_requests_match_one_by_one():
    model = model_of()
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17], [20, 21, 22]]
    want = [full_greedy(model, p, 12) for p in prompts]
    assert [generate(model, [p], greedy)[0].token_ids for p in prompts] == want
    engine = Engine(model, max_batch=3, max_len=64)  # 4 requests, 3 rows: one waits for a free row
    reqs = [Request(p, SamplingParams(max_new_tokens=12 - 4 * (i == 1), temperature=0)) for i, p in enumerate(prompts)]
    run_all(engine, {0: [reqs[0]], 2: [reqs[1], reqs[2]], 5: [reqs[3]]})
    for i, r in enumerate(reqs):
        n = len(r.output_ids)
        assert r.output_ids == want[i][:n], f"request {i}: engine {r.output_ids} vs alone {want[i][:n]}"
        assert r.finish_reason == "length" and n == r.params.max_new_tokens
    assert engine.stats["generated_tokens"] == 12 * 3 + 8


def glm_request(prompt, mask_id, sop_id, **kw):
    """GLM generation: Part A = prompt + [gMASK] (bidirectional), then <sop> at the mask's position."""
    a = prompt + [mask_id]
    T = len(a)
    pos = [list(range(T)) + [T - 1], [0] * T + [1]]
    return Request(a + [sop_id], position_ids=pos, sep=T, gen_start=(T - 1, 2), gen_step=(0, 1), **kw)


def test_glm_prefix_requests_batched_equal_alone_and_reference():
    model = model_of()
    p = SamplingParams(max_new_tokens=6, temperature=0)
    alone = []
    for prompt in ([30, 31, 32], [40, 41, 42, 43, 44]):
        e = Engine(model, max_batch=2, max_len=64)
        r = e.submit(glm_request(prompt, 3, 4, params=p))
        while e.has_work():
            e.step()
        alone.append(r.output_ids)
    # reference: the same computation with plain full forwards; reading Part A causally gives other tokens
    assert alone == [glm_greedy(model, pr, 3, 4, 6) for pr in ([30, 31, 32], [40, 41, 42, 43, 44])], alone
    assert alone[1] != glm_greedy(model, [40, 41, 42, 43, 44], 3, 4, 6, bidirectional=False)
    e = Engine(model, max_batch=2, max_len=64)
    rs = [e.submit(glm_request(pr, 3, 4, params=p)) for pr in ([30, 31, 32], [40, 41, 42, 43, 44])]
    while e.has_work():
        e.step()
    assert [r.output_ids for r in rs] == alone


def test_prompt_cache_is_scoped_and_exact():
    model = model_of()
    p = SamplingParams(max_new_tokens=5, temperature=0)
    e = Engine(model, max_batch=2, max_len=64)
    runs = []
    for scope in ("key-a", "key-a", "key-b"):
        r = e.submit(glm_request([50, 51, 52], 3, 4, params=p, cache_scope=scope))
        while e.has_work():
            e.step()
        runs.append(r)
    assert [r.cached_tokens for r in runs] == [0, 5, 0]  # the whole prompt (3 + [gMASK] + <sop>); never across keys
    assert runs[0].output_ids == runs[1].output_ids == runs[2].output_ids == glm_greedy(model, [50, 51, 52], 3, 4, 5)
    assert runs[0].output_ids != glm_greedy(model, [50, 51, 52], 3, 4, 5, bidirectional=False)  # Part A counts


def test_causal_models_reuse_a_shared_prefix():
    model = model_of("rope_partial")
    p = SamplingParams(max_new_tokens=4, temperature=0)
    e = Engine(model, max_batch=2, max_len=64)
    first = e.submit(Request([7, 8, 9, 10], p, cache_scope="k"))
    while e.has_work():
        e.step()
    second = e.submit(Request([7, 8, 9, 10, 11, 12], p, cache_scope="k"))
    while e.has_work():
        e.step()
    assert second.cached_tokens == 4
    assert first.output_ids == full_greedy(model, [7, 8, 9, 10], 4)
    assert second.output_ids == full_greedy(model, [7, 8, 9, 10, 11, 12], 4)


def test_cancel_stop_ids_and_limits():
    model = model_of()
    e = Engine(model, max_batch=2, max_len=32, max_waiting=1)
    long = e.submit(Request([1, 2, 3], SamplingParams(max_new_tokens=20, temperature=0)))
    e.step(), e.step()
    e.cancel(long)
    e.step()
    assert long.finish_reason == "cancelled" and e.num_running == 0 and 0 < len(long.output_ids) < 20
    # a stop id ends the request and is not part of the output
    ref = Engine(model, max_batch=1, max_len=32)
    r = ref.submit(Request([1, 2, 3], SamplingParams(max_new_tokens=6, temperature=0)))
    while ref.has_work():
        ref.step()
    stop = r.output_ids[2]
    r2 = ref.submit(Request([1, 2, 3], SamplingParams(max_new_tokens=6, temperature=0, stop_ids=(stop,))))
    while ref.has_work():
        ref.step()
    assert r2.finish_reason == "stop" and r2.output_ids == r.output_ids[: r.output_ids.index(stop)]
    with pytest.raises(ValueError, match="exceeds the context of 32 tokens"):
        e.submit(Request(list(range(30)), SamplingParams(max_new_tokens=5)))
    e.submit(Request([1], SamplingParams(max_new_tokens=2)))
    with pytest.raises(EngineFull):
        e.submit(Request([1], SamplingParams(max_new_tokens=2)))


def test_seeded_sampling_is_reproducible_in_any_batch():
    model = model_of()
    outs = []
    for others in (0, 1):
        e = Engine(model, max_batch=2, max_len=64)
        r = e.submit(Request([5, 6, 7], SamplingParams(max_new_tokens=8, temperature=1.0, seed=123)))
        if others:
            e.submit(Request([9, 9], SamplingParams(max_new_tokens=8, temperature=1.0, seed=7)))
        while e.has_work():
            e.step()
        outs.append(r.output_ids)
    assert outs[0] == outs[1]  # a request's own generator: neighbours do not change its samples


def test_a_poisoned_row_ends_alone_and_the_others_finish():
    """A row whose numbers go bad (here: parameters forced past validation, as a hostile tenant's
    1e-300 temperature once did) ends with "error"; the rows beside it run to the end, unchanged."""
    model = model_of()
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    alone = [generate(model, [p], greedy)[0].token_ids for p in ([5, 6, 7], [9, 10, 11, 12])]
    e = Engine(model, max_batch=4, max_len=64)
    good = [e.submit(Request(p, SamplingParams(max_new_tokens=8, temperature=0))) for p in ([5, 6, 7], [9, 10, 11, 12])]
    bad_params = SamplingParams(max_new_tokens=8, temperature=1.0, repetition_penalty=1.5)
    bad_params.temperature, bad_params.repetition_penalty = 1e-300, 1e-308  # past the checks: logits overflow
    bad = e.submit(Request([20, 21, 22], bad_params))
    while e.has_work():
        e.step()
    assert bad.finish_reason == "error" and "not finite" in bad.error, (bad.finish_reason, bad.error)
    assert [r.finish_reason for r in good] == ["length", "length"]
    assert [r.output_ids for r in good] == alone


def test_sampling_params_bound_what_would_overflow():
    p = SamplingParams(temperature=1e-300)
    assert p.temperature == 0.0  # a vanishing temperature is greedy
    for bad in (1e-308, 0.0, 1e308, float("nan")):
        with pytest.raises(ValueError, match="repetition_penalty"):
            SamplingParams(repetition_penalty=bad)
    model = model_of()
    tiny = generate(model, [[5, 6, 7]], SamplingParams(max_new_tokens=6, temperature=1e-300, seed=1))[0].token_ids
    assert tiny == generate(model, [[5, 6, 7]], SamplingParams(max_new_tokens=6, temperature=0))[0].token_ids


def test_prompt_cache_entries_are_per_key():
    """One key's new prompts never evict another key's entries (eviction would reveal activity)."""
    model = model_of()
    p = SamplingParams(max_new_tokens=1, temperature=0)
    e = Engine(model, max_batch=1, max_len=64, prompt_cache_entries=2)

    def run(prompt, scope):
        r = e.submit(glm_request(prompt, 3, 4, params=p, cache_scope=scope))
        while e.has_work():
            e.step()
        return r

    run([50, 51], "victim")
    for i in range(5):  # another key sends more new prompts than a key's whole LRU holds
        run([60 + i, 61], "attacker")
    assert run([50, 51], "victim").cached_tokens == 4
    assert run([60, 61], "attacker").cached_tokens == 0  # its own LRU did evict its own oldest


def test_a_kv_cache_that_cannot_fit_is_refused_before_allocating():
    from glmkit.plan import check_kv_fits, kv_cache_bytes

    model = model_of()
    cfg = model.cfg
    with pytest.raises(MemoryError) as err:
        check_kv_fits(cfg, 8, 4096, torch.float32, "cpu", available=kv_cache_bytes(cfg, 8, 1024, torch.float32))
    msg = str(err.value)
    assert "--max-len 921 (at --max-batch 8)" in msg and "--max-batch 1 (at --max-len 4096)" in msg, msg
    check_kv_fits(cfg, 8, 512, torch.float32, "cpu", available=kv_cache_bytes(cfg, 8, 1024, torch.float32))
    with pytest.raises(MemoryError, match="needs .* GiB"):  # the real machine: a context no memory holds
        Engine(model, max_batch=8, max_len=1 << 40)


def test_a_vanishing_top_p_keeps_the_most_likely_token():
    from glmkit.sampling import param_rows, process_logits

    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0]])
    out = process_logits(logits.clone(), param_rows([SamplingParams(top_p=5e-324)]))  # 0 once in float32
    assert torch.isfinite(out).tolist() == [[False, True, False, False]], out
