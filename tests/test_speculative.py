"""Speculative decoding with the MTP layer (glmkit.speculative) against plain decoding (glmkit.generate).

A tiny random GLM-4.5-style MoE model with one MTP layer, built here (odd sizes, qk-norm, half-split
rotary, the first layer dense), its weights scaled up so routing and attention matter. Checked: greedy
output == plain greedy token for token (batches with left padding, k = 1, 2, 3, stop ids and
max_new_tokens landing inside a run of accepted drafts, drafts from the MTP layer and from an oracle
that is always or partly right), logprobs == plain's, both KV caches (the model's and the MTP
layer's) == a fresh prefill of what was accepted, the cached MTP step == mtp_logits, sampling ==
the model's exact distribution of the first tokens (chi-square), and the errors.
"""

import math

import pytest
import torch

from glmkit.config import ModelConfig
from glmkit.generate import generate
from glmkit.model import GLM
from glmkit.sampling import SamplingParams, param_rows, process_logits
from glmkit.speculative import SpecStats, _run, _Speculation, generate_mtp
from tests.helpers import assert_close

V = 13


def tiny(vocab=V, seed=0, n_mtp_layers=1):
    cfg = ModelConfig(vocab_size=vocab, dim=48, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=72, position="rope_partial",
                      rope_interleave=False, qk_norm=True, n_experts=6, n_experts_per_tok=2, n_shared_experts=1,
                      moe_ffn_dim=20, first_dense_layers=1, n_mtp_layers=n_mtp_layers, tie_embeddings=False)
    torch.manual_seed(seed)
    model = GLM(cfg).eval()
    with torch.no_grad():  # larger than the init's, so the distributions are far from uniform
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny()


def prompts(lengths, seed=1, vocab=V):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _with_oracle(monkeypatch, plain, wrong_every=0):
    """Drafts from the known plain greedy output (`plain`: Completions), so they are accepted; with
    `wrong_every` n, every n-th drafted token is replaced by a wrong one, so runs end mid-draft. The
    MTP layer still runs (its cache writes are what is checked), only its drafts are replaced."""
    real = _Speculation._draft
    count = [0]

    def draft(self, logits, g):
        real(self, logits, g)
        d = self.drafts.clone()
        for b, out in enumerate(self.outs):
            seq = plain[b].token_ids + [0] * (self.k + 1)  # past the end: anything
            for j in range(self.k):
                t = seq[min(out.sampled + j, len(seq) - 1)]
                count[0] += 1
                if wrong_every and count[0] % wrong_every == 0:
                    t = (t + 1) % self.model.cfg.vocab_size
                d[b, j] = t
        self.drafts = d

    monkeypatch.setattr(_Speculation, "_draft", draft)


def _check_caches(model, spec, prompt_list):
    """Each row's model cache and MTP cache == a fresh prefill of its prompt and fed tokens (every drawn
    token but the last), in the same slots; later slots invalid and zero."""
    T = spec.T
    for b, (p, out) in enumerate(zip(prompt_list, spec.outs)):
        fed = out.ids[: out.sampled - 1]
        n = T + len(fed)
        ids = torch.tensor([[0] * (T - len(p)) + p + fed])
        mask = torch.tensor([[0] * (T - len(p)) + [1] * (len(p) + len(fed))])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        slots = torch.arange(n)[None]
        ref, ref_mtp = model.new_cache(1, n), model.new_mtp_cache(1, n)
        h = model.step(ids, pos, ref, slots, valid=mask, extent=n, hidden_only=True)
        last = (out.ids + [out.stop_reason])[out.sampled - 1]  # the last drawn token: a stop id is not in ids
        nxt = torch.tensor([p[1:] + fed + [last]])
        nxt = torch.cat((torch.zeros(1, T - len(p), dtype=torch.long), nxt), 1)
        model.mtp_step(h, nxt, pos, ref_mtp, slots, valid=mask, extent=n)
        for name, got, want in (("model", spec.cache, ref), ("mtp", spec.mtp_cache, ref_mtp)):
            assert torch.equal(got.valid[b, :n], want.valid[0]), (name, b, got.valid[b, :n], want.valid[0])
            assert not got.valid[b, n:].any(), f"{name} cache row {b}: slots past {n} still valid"
            assert not got.k[:, b, :, n:].any() and not got.v[:, b, :, n:].any(), f"{name} cache row {b}: keys past {n}"
            real = want.valid[0][None, None, :, None]  # padding slots' keys are never read
            assert_close(got.k[:, b, :, :n] * real, want.k[:, 0] * real, 1e-5, f"{name} cache keys, row {b}")
            assert_close(got.v[:, b, :, :n] * real, want.v[:, 0] * real, 1e-5, f"{name} cache values, row {b}")


@torch.no_grad()
def test_cached_mtp_step_equals_mtp_logits(model):
    """The MTP layer through its cache, in two chunks, == mtp_logits over the whole sequence."""
    ids = torch.tensor(prompts([9, 9], seed=5))
    h = model(ids, hidden_only=True)
    want = model.mtp_logits(h[:, :-1], ids[:, 1:])  # (2, 8, V)
    cache = model.new_mtp_cache(2, 8)
    pos = torch.arange(8).expand(2, 8)
    a, _ = model.mtp_step(h[:, :5], ids[:, 1:6], pos[:, :5], cache, pos[:, :5], extent=5)
    b, _ = model.mtp_step(h[:, 5:8], ids[:, 6:9], pos[:, 5:], cache, pos[:, 5:], extent=8)
    assert_close(torch.cat((a, b), 1), want, 1e-5, "cached MTP logits vs mtp_logits")


@pytest.mark.parametrize("k,lengths", [(1, [6]), (2, [5, 3, 8]), (3, [5, 3, 8])])
@torch.no_grad()
def test_greedy_equals_plain_with_mtp_drafts(model, k, lengths):
    ps = prompts(lengths)
    params = SamplingParams(max_new_tokens=17, temperature=0, logprobs=True)
    plain = generate(model, ps, params)
    spec, got = _run(model, ps, params, None, k)
    stats = spec.stats
    print(f"k={k} B={len(ps)}: acceptance {stats.acceptance_rate:.2f} ({stats.accepted}/{stats.drafted}), "
          f"{stats.tokens_per_step:.2f} tokens per step (random weights: chance is 1/{V})")
    for b, (want, out) in enumerate(zip(plain, got)):
        assert out.token_ids == want.token_ids, (b, out.token_ids, want.token_ids)
        assert (out.finish_reason, out.stop_reason) == (want.finish_reason, want.stop_reason)
        assert_close(torch.tensor(out.logprobs), torch.tensor(want.logprobs), 1e-4, f"logprobs row {b}")
    # the first token comes from the prefill; each verify step adds its accepted drafts and one more
    assert stats.emitted == 17 * len(ps) and stats.steps == 16 - stats.accepted // len(ps) or len(ps) > 1, stats
    _check_caches(model, spec, ps)


@pytest.mark.parametrize("k,wrong_every", [(3, 0), (3, 4), (2, 3)])
@torch.no_grad()
def test_greedy_equals_plain_with_oracle_drafts(model, monkeypatch, k, wrong_every):
    """Drafts that are right (all accepted: whole runs of k + 1 tokens per step) or partly wrong (runs
    end anywhere): the output, the counts and both caches stay those of plain decoding."""
    ps = prompts([5, 3, 8], seed=2)
    params = SamplingParams(max_new_tokens=19, temperature=0)
    plain = generate(model, ps, params)
    _with_oracle(monkeypatch, plain, wrong_every)
    spec, got = _run(model, ps, params, None, k)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    s = spec.stats
    if not wrong_every:
        # every step but the last (whose drafts run past the end) accepts all k
        assert s.steps == math.ceil((19 - 1) / (k + 1)) and s.accepted >= s.drafted - k * len(ps), s
    else:
        assert 0 < s.accepted < s.drafted, s
    _check_caches(model, spec, ps)


@pytest.mark.parametrize("k,oracle", [(1, False), (3, True)])
@torch.no_grad()
def test_stop_ids_and_max_tokens_inside_a_draft(model, monkeypatch, k, oracle):
    """A stop id, and max_new_tokens, that fall in the middle of a step's accepted tokens end the row
    exactly where plain decoding ends it (other rows go on)."""
    ps = prompts([4, 7], seed=3)
    free = generate(model, ps, SamplingParams(max_new_tokens=20, temperature=0))
    stop = free[0].token_ids[6]  # row 0 meets it at token 6 or before; row 1 maybe not
    for params in (SamplingParams(max_new_tokens=20, temperature=0, stop_ids=(stop,)),
                   SamplingParams(max_new_tokens=7, temperature=0), SamplingParams(max_new_tokens=1, temperature=0)):
        plain = generate(model, ps, params)
        if oracle:
            _with_oracle(monkeypatch, plain)
        spec, got = _run(model, ps, params, None, k)
        monkeypatch.undo()
        for want, out in zip(plain, got):
            assert (out.token_ids, out.finish_reason, out.stop_reason) == (want.token_ids, want.finish_reason, want.stop_reason)
        _check_caches(model, spec, ps)
    assert plain[0].finish_reason == "length"


def _exact_first_tokens(model, prompt, params, n):
    """The model's exact probability of every sequence of its first n tokens under params' temperature
    and filters: {tokens: p}."""
    rows = param_rows([params])
    out = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for seq, pr in out.items():
            logits = model(torch.tensor([prompt + list(seq)]))[:, -1].float()
            probs = process_logits(logits, rows, filters=(True, False)).softmax(-1)[0].tolist()
            for t, q in enumerate(probs):
                if q > 0:
                    nxt[seq + (t,)] = pr * q
        out = nxt
    return out


def _chi_square(counts: dict, exact: dict, total: int) -> tuple[float, int]:
    """Pearson's statistic over the outcomes (those expected fewer than 5 times pooled) and its degrees of freedom."""
    stat, pool_obs, pool_exp, cells = 0.0, 0, 0.0, 0
    for seq, p in exact.items():
        e, o = p * total, counts.get(seq, 0)
        if e < 5:
            pool_obs, pool_exp = pool_obs + o, pool_exp + e
            continue
        stat, cells = stat + (o - e) ** 2 / e, cells + 1
    if pool_exp > 0:
        stat, cells = stat + (pool_obs - pool_exp) ** 2 / pool_exp, cells + 1
    unseen = sum(c for s, c in counts.items() if s not in exact)  # a token the filters drop: impossible
    assert unseen == 0, f"{unseen} draws of tokens with probability 0"
    return stat, cells - 1


def _chi2_quantile(df: int, z: float = 3.72) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at standard normal z (3.72: 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@torch.no_grad()
def test_sampling_keeps_the_target_distribution():
    """3000 rows, each its own seed, draw their first 3 tokens with temperature and top-k; the
    frequencies of the 3-token sequences match the model's exact probabilities (chi-square at 1e-4),
    as plain sampling's do. Drafts following the MTP layer's q alone would not, nor would a wrong
    acceptance rule (a residual drawn from p, not max(0, p - q)). k = 2: the second draft's test too."""
    m = tiny(vocab=5, seed=9)
    prompt = prompts([4], seed=6, vocab=5)[0]
    params = SamplingParams(max_new_tokens=3, temperature=0.9, top_k=4, seed=0)
    exact = _exact_first_tokens(m, prompt, params, 3)
    R = 3000
    stats = SpecStats()
    for name, outs in (("plain", generate(m, [prompt] * R, params)),
                       ("speculative", generate_mtp(m, [prompt] * R, params, num_draft=2, stats=stats))):
        counts = {}
        for o in outs:
            counts[tuple(o.token_ids)] = counts.get(tuple(o.token_ids), 0) + 1
        stat, df = _chi_square(counts, exact, R)
        tv = 0.5 * sum(abs(counts.get(s, 0) / R - p) for s, p in exact.items())
        print(f"{name}: chi-square {stat:.1f} on {df} df (limit {_chi2_quantile(df):.1f}), total variation {tv:.3f}")
        assert stat < _chi2_quantile(df), (name, stat, df, tv)
    print(f"acceptance {stats.acceptance_rate:.2f}")
    assert 0.3 < stats.acceptance_rate < 0.9  # the rule was exercised both ways


def test_errors(model):
    with pytest.raises(ValueError, match="multi-token-prediction layer"):
        generate_mtp(tiny(n_mtp_layers=0), [[1, 2]])
    with pytest.raises(ValueError, match="num_draft"):
        generate_mtp(model, [[1, 2]], num_draft=0)
    with pytest.raises(ValueError, match="repetition_penalty.*not supported with speculative"):
        generate_mtp(model, [[1, 2]], SamplingParams(repetition_penalty=1.2))
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        generate_mtp(model, [[1, 2]], SamplingParams(stop=["x"]))
