"""glmkit.sampling: one sampler for `generate`, the engine and the server.

The same request with the same seed gives the same tokens through `generate.generate` (or `fill`),
the Engine alone, the Engine among rows that join and leave around it, and /v1/completions. The
batched filters equal a per-row reference with different parameters in every row, and the draws
follow the filtered distribution, across seeds and across the steps of one row.

Models: random-init with init_std 0.5, so that their distributions are spread (the `debug` preset's
0.02 greedily repeats the last token, and its sampling is close to uniform)."""

import dataclasses

import pytest
import torch

from glmkit.config import ModelConfig
from glmkit.engine import Engine, Request
from glmkit.generate import fill, generate
from glmkit.model import GLM
from glmkit.sampling import (
    COLUMNS,
    Sampler,
    SamplingParams,
    _exponential,
    apply_penalties,
    exponential_noise,
    param_rows,
    process_logits,
    stream_key,
)
from tests.helpers import assert_close, run_all

N = 12
PARAMS = {  # every knob at once, min-p, and greedy with a penalty
    "filters_and_penalties": SamplingParams(max_new_tokens=N, temperature=0.9, top_k=40, top_p=0.9,
                                            repetition_penalty=1.15, presence_penalty=0.4, frequency_penalty=0.3, seed=11),
    "min_p": SamplingParams(max_new_tokens=N, temperature=1.3, min_p=0.05, seed=5),
    "greedy": SamplingParams(max_new_tokens=N, temperature=0, repetition_penalty=1.3),
}


def spread_model(tok, position):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                      max_seq_len=256, position=position, init_std=0.5)
    m = GLM(cfg).eval()
    m.init_weights(seed=1)
    return m


@pytest.fixture(scope="module")
def causal(tok):
    return spread_model(tok, "rope_partial")


@pytest.fixture(scope="module")
def prefix_lm(tok):
    return spread_model(tok, "rope_2d")


def engine_paths(model, request):
    """The request's tokens alone, and joined: a short row ahead of it retires (it moves to row 0),
    two others (one unseeded, one seeded) join mid-generation."""
    fresh = lambda: dataclasses.replace(request, output_ids=[], logprobs=[])
    e = Engine(model, max_batch=4, max_len=128)
    alone = fresh()
    run_all(e, {0: [alone]})
    e = Engine(model, max_batch=4, max_len=128)
    joined = fresh()
    short = Request([7, 8, 9], SamplingParams(max_new_tokens=2, temperature=1.0, seed=3))
    later = [Request([9, 8], SamplingParams(max_new_tokens=N, temperature=1.0)),
             Request(request.prompt_ids[:3], SamplingParams(max_new_tokens=N, temperature=0.7, top_p=0.8, seed=11))]
    run_all(e, {0: [short, joined], 4: later})
    assert short.finish_reason is not None and all(r.output_ids for r in later)
    return alone, joined


@pytest.mark.parametrize("name", list(PARAMS))
def test_same_seed_same_tokens_through_generate_engine_and_http(tok, causal, name):
    """Causal model: generate on [gMASK]<sop> + prompt (the server's layout), the Engine alone and
    joined, /v1/completions with the prompt as token ids; n=2 checks choice i = seed + i."""
    fastapi = pytest.importorskip("fastapi.testclient")
    from glmkit.server.app import create_app

    ids = tok.encode("The quick brown fox")
    prompt = [tok.special("gmask"), tok.special("sop")] + ids
    p = dataclasses.replace(PARAMS[name], stop_ids=(tok.special("eos"),), logprobs=True)
    want = generate(causal, [prompt, prompt], p)  # row b draws with seed + b
    if p.temperature:
        other = generate(causal, [prompt], dataclasses.replace(p, seed=p.seed + 100))[0].token_ids
        assert other != want[0].token_ids and want[1].token_ids != want[0].token_ids, "sampling is degenerate"
    assert len(set(want[0].token_ids)) > 3, f"degenerate output {want[0].token_ids}"
    behind = generate(causal, [prompt[:3], prompt], dataclasses.replace(p, seed=p.seed and p.seed - 1))[1]
    assert behind.token_ids == want[0].token_ids, "row 1 of a left-padded batch seeded s - 1 vs row 0 seeded s"

    alone, joined = engine_paths(causal, Request(prompt, p))
    assert alone.output_ids == want[0].token_ids, (alone.output_ids, want[0].token_ids)
    assert joined.output_ids == want[0].token_ids, (joined.output_ids, want[0].token_ids)
    assert_close(torch.tensor(joined.logprobs), torch.tensor(want[0].logprobs), 1e-4, "engine vs generate logprobs")

    body = {"prompt": ids, "max_tokens": N, "n": 2, "logprobs": 0, **{k: getattr(p, k) for k in COLUMNS}}
    if p.seed is not None:
        body["seed"] = p.seed
    with fastapi.TestClient(create_app(causal, tok, "tiny")) as client:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    for choice, w in zip(r.json()["choices"], want):
        assert choice["text"] == tok.decode(w.token_ids, skip_special_tokens=True), (choice["text"], tok.decode(w.token_ids, skip_special_tokens=True))
        got_lp = torch.tensor(choice["logprobs"]["token_logprobs"])
        assert_close(got_lp, torch.tensor(w.logprobs), 1e-4, f"/v1/completions choice {choice['index']} logprobs")


@pytest.mark.parametrize("name", ["filters_and_penalties", "greedy"])
def test_same_seed_same_tokens_through_fill_engine_and_http(tok, prefix_lm, name):
    """GLM prefix-LM model: `fill` on text + [gMASK] (Part A bidirectional, <sop> at the mask) equals
    the engine's blank request, alone and joined, and /v1/completions on the text."""
    fastapi = pytest.importorskip("fastapi.testclient")
    from glmkit.server.app import create_app

    text, p = "Hello there, how", PARAMS[name]
    want = fill(prefix_lm, tok, text + "[gMASK]", p).spans[0].token_ids
    assert len(set(want)) > 3, f"degenerate output {want}"
    with fastapi.TestClient(create_app(prefix_lm, tok, "tiny")) as client:
        server = client.app.state.server
        req = server.blank_request(tok.encode(text), "gmask", [], dataclasses.replace(p, stop_ids=server.completion_stop_ids()))
        body = {"prompt": text, "max_tokens": N, **{k: getattr(p, k) for k in COLUMNS}}
        r = client.post("/v1/completions", json={**body, "seed": p.seed} if p.seed is not None else body)
    alone, joined = engine_paths(prefix_lm, req)
    assert alone.output_ids == want and joined.output_ids == want, (alone.output_ids, joined.output_ids, want)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True), (r.text, tok.decode(want, skip_special_tokens=True))


# ---- the batched filters against a per-row reference ------------------------------------------------------
ROWS = [  # one row each: every filter and penalty, values differing from row to row
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.5, top_k=12, top_p=0.9, min_p=0.05, repetition_penalty=1.4),
    SamplingParams(temperature=0.0, top_k=3, repetition_penalty=0.7, presence_penalty=1.5),
    SamplingParams(temperature=2.0, frequency_penalty=-0.8, presence_penalty=0.3, top_p=0.95),
    SamplingParams(temperature=1.0, top_k=64),  # k >= V: off
    SamplingParams(temperature=0.9, top_k=1),
]


def reference_row(x, p: SamplingParams, counts, seen):
    """One row, float64, the documented order: penalties, temperature, top-k, top-p, min-p."""
    x = x.double().clone()
    for i in range(len(x)):
        if seen[i]:
            x[i] = x[i] / p.repetition_penalty if x[i] > 0 else x[i] * p.repetition_penalty
        x[i] -= counts[i] * p.frequency_penalty + (counts[i] > 0) * p.presence_penalty
    if p.temperature:
        x /= p.temperature
    order = sorted(range(len(x)), key=lambda i: -x[i].item())
    if 0 < p.top_k < len(x):
        kth = x[order[p.top_k - 1]]
        x[x < kth] = float("-inf")
    if p.top_p < 1:
        probs, mass = x.softmax(-1), 0.0
        for i in order:
            if mass >= p.top_p:
                x[i] = float("-inf")
            mass += probs[i].item()
    if p.min_p:
        probs = x.softmax(-1)
        x[probs < p.min_p * probs.max()] = float("-inf")
    return x


def test_batched_filters_equal_a_per_row_reference():
    g = torch.Generator().manual_seed(0)
    B, V = len(ROWS), 50
    logits = torch.randn(B, V, generator=g) * 3
    counts = torch.randint(0, 3, (B, V), generator=g).float()
    seen = torch.rand(B, V, generator=g) < 0.3
    got = process_logits(logits.clone(), param_rows(ROWS), counts, seen)
    for b, p in enumerate(ROWS):
        want = reference_row(logits[b], p, counts[b], seen[b])
        assert torch.isfinite(got[b]).tolist() == torch.isfinite(want).tolist(), (b, p)
        keep = torch.isfinite(want)
        assert_close(got[b][keep], want[keep], 1e-5, f"row {b} kept logits")
        assert 1 <= int(keep.sum()) < V or p.top_k >= V or p.top_k == 0, (b, int(keep.sum()))
        alone = process_logits(logits[b : b + 1].clone(), param_rows([p]), counts[b : b + 1], seen[b : b + 1])
        assert torch.equal(alone[0], got[b]), f"row {b}: alone differs from in the batch"
    # the draws: greedy rows take the penalized argmax, every draw is a kept token
    s = Sampler(B, V, "cpu")
    for p in ROWS:
        s.join(p, [], seed=1)
    s.counts[:B], s.seen[:B] = counts, seen
    tok = s(logits).tokens
    for b, p in enumerate(ROWS):
        want = reference_row(logits[b], p, counts[b], seen[b])
        assert torch.isfinite(want[tok[b]]), (b, tok[b])
        if p.temperature == 0:
            assert tok[b] == want.argmax(), (b, tok[b], want.argmax())


def test_penalties_leave_neutral_rows_exact():
    x = torch.randn(3, 20)
    rows = param_rows([SamplingParams(), SamplingParams(repetition_penalty=2.0), SamplingParams(presence_penalty=1.0)])
    got = apply_penalties(x.clone(), rows, torch.ones(3, 20), torch.ones(3, 20, dtype=torch.bool))
    assert torch.equal(got[0], x[0]) and not torch.equal(got[1], x[1]) and torch.equal(got[2], x[2] - 1)


# ---- the draws: the right distribution, each row its own stream ---------------------------------------------
LOGITS = torch.tensor([[2.0, -1.0, 0.5, 3.1, -2.2, 1.7, 0.0, -0.3, 2.6, 1.1]])


def test_draws_follow_the_filtered_distribution_across_seeds_and_steps():
    """4000 rows seeded 0..3999 (alternating two parameter sets), and one row over 4000 steps."""
    a, b = SamplingParams(temperature=0.7, top_k=3), SamplingParams(temperature=1.5, min_p=0.1)
    n = 4000
    s = Sampler(n, 10, "cpu")
    for i in range(n):
        s.join(a if i % 2 == 0 else b, [], seed=i)
    tok = s(LOGITS.expand(n, 10)).tokens
    one = Sampler(1, 10, "cpu")
    one.join(a, [], seed=0)
    steps = []
    for _ in range(n):
        t = one(LOGITS).tokens
        one.update(t)
        steps.append(int(t))
    for what, draws, p in (("seeds, top-k", tok[0::2], a), ("seeds, min-p", tok[1::2], b), ("steps, top-k", torch.tensor(steps), a)):
        freq = torch.bincount(draws, minlength=10).double() / len(draws)
        probs = process_logits(LOGITS.clone(), param_rows([p])).double().softmax(-1)[0]
        assert_close(freq, probs, 0.035, f"{what}: empirical frequencies vs the filtered softmax")


def test_a_rows_draws_do_not_depend_on_its_batch():
    """Row X alone, and X behind another row, moved to the front when that one leaves, joined by a third."""
    g = torch.Generator().manual_seed(1)
    V, steps = 40, 8
    seq = torch.randn(steps, 3, V, generator=g) * 2  # logits per step for up to 3 rows
    x = SamplingParams(temperature=1.0, top_p=0.95, frequency_penalty=0.5, seed=42)
    alone = Sampler(1, V, "cpu")
    alone.join(x, [1, 2], x.seed)
    want = []
    for t in range(steps):
        tok = alone(seq[t, :1]).tokens
        alone.update(tok)
        want.append(int(tok[0]))
    s = Sampler(3, V, "cpu")
    s.join(SamplingParams(temperature=1.0, seed=42), [3], 7)  # same parameters but another stream
    s.join(x, [1, 2], x.seed)
    got = []
    for t in range(steps):
        if t == 3:
            s.keep([1])  # the first row leaves: X becomes row 0
            s.join(SamplingParams(temperature=0.5, presence_penalty=1.0), [5], None)
        rows = seq[t, :1] if t >= 3 else torch.stack((seq[t, 1], seq[t, 0]))
        logits = torch.cat((rows, seq[t, 2:3])) if t >= 3 else rows
        tok = s(logits).tokens
        s.update(tok)
        got.append(int(tok[0 if t >= 3 else 1]))
    assert got == want, (got, want)


def test_streams_are_keyed_by_seed_and_step_only():
    key = torch.tensor([stream_key(5), stream_key(6)])
    e = exponential_noise(key, torch.tensor([0, 3]), 64)
    assert torch.equal(e[1], exponential_noise(key[1:], torch.tensor([3]), 64)[0])
    assert not torch.equal(e[0], exponential_noise(key[:1], torch.tensor([1]), 64)[0])
    assert (e > 0).all() and torch.isfinite(e).all()


def test_the_noise_is_positive_at_the_extreme_hashes():
    """E = 0 would make the race p / E draw its token whatever p (one token in 2**24 per step did: about one
    step in 110 at GLM-4's 151,552 tokens), or NaN where p = 0 (a token a constraint masks)."""
    h = torch.tensor([0, 1, 2**31, 2**32 - 512, 2**32 - 2, 2**32 - 1])
    e = _exponential(h)
    assert (e > 0).all() and torch.isfinite(e).all(), e.tolist()
    p = torch.tensor([0.0, 0.5, 0.0, 0.25, 0.0, 0.25])
    assert not torch.isnan(p / e).any() and int((p / e).argmax()) in (1, 3, 5), (p / e).tolist()


def test_the_native_noise_is_the_pytorch_noise_bit_for_bit():
    """csrc/noise.cpp computes the uniforms of `exponential_noise` in uint32; the PyTorch path (other devices,
    no compiler) in int64 with split products: a seeded row must draw the same tokens on both."""
    from glmkit import kernels
    from glmkit.sampling import _exponential, _mix32, _token_hashes

    if not kernels.available():
        pytest.skip(f"native kernels unavailable: {kernels.why_unavailable()}")
    key = torch.tensor([stream_key(s) for s in (0, 1, 2**40 + 3)])
    step = torch.tensor([0, 7, 2**33 + 1])
    V = 151552 + 5  # GLM-4's vocabulary, and a tail past a multiple of the kernel's 4096-token chunks
    native = exponential_noise(key, step, V)
    row = _mix32(key[:, 1] ^ _mix32(key[:, 0] ^ _mix32(step & 0xFFFFFFFF)))
    reference = _exponential(_mix32(row[:, None] ^ _token_hashes(V, key.device)))
    assert torch.equal(native, reference), (native != reference).sum().item()
