"""Speculative decoding with the model's own multi-token-prediction (MTP) layer: GLM-4.5's draft head.

    from glmkit.speculative import generate_mtp, SpecStats
    stats = SpecStats()
    outs = generate_mtp(model, [ids_a, ids_b], SamplingParams(max_new_tokens=64), num_draft=2, stats=stats)
    stats.acceptance_rate, stats.tokens_per_step

    python bench/speculative.py        # tok/s plain vs speculative and the acceptance rate

Off by default: `generate.generate` never drafts; this is a loop of its own, opted into by calling it.
It is its own file because its step is not generate's: each step feeds k + 1 tokens per row, rows
advance by different amounts (their own cache lengths), and both the model's and the MTP layer's KV
caches roll back, while generate's loop writes one slot per step at one index for every row (the
static shape its compiled step needs). It reuses generate's results (`Completion`) and prompt checks.

One step, for each row whose next token x (sampled, not yet fed) sits at slot L:
- draft: the MTP layer, from the model's final hidden state at L - 1 and x, drafts d1; a chained
  draft feeds the layer's own output back with d1 for d2, and so on (k = num_draft; GLM-4.5 ships
  one MTP layer, which every chained draft reuses, as vLLM does).
- verify: the model runs [x, d1 .. dk] at slots L .. L + k in one forward (writing its cache).
  Greedy: the longest prefix of drafts equal to the model's argmax is accepted, plus the model's own
  next token, so the output is plain greedy decoding's by construction (up to the summation order of
  a k + 1-token forward against one-token steps). Sampling: draft j is accepted with probability
  min(1, p(dj) / q(dj)), the first rejected one replaced by a draw from norm(max(0, p - q)), and
  all accepted ones followed by a draw from p (Leviathan et al. 2023; Chen et al. 2023), p and q
  the model's and the draft's distributions after the same temperature / top-k / top-p / min-p, so
  tokens follow plain sampling's distribution (not its exact draws: the random streams differ).
- roll back: the model's cache keeps slots up to the last accepted token; the rejected slots are
  invalidated and zeroed, so a row's cache ends as plain decoding leaves it.
- catch up: the MTP layer's cache slot t holds the layer's keys for (h_t, x_{t+1}); the accepted
  positions L .. L + n are (re)written from the model's fresh hidden states (over the chained drafts'
  tentative slots), the rest invalidated; its last output drafts the next step's d1.

Penalties, n-gram bans, beam search and top logprobs are not applied here (a penalty changes p with
every accepted token; a clear error says so). On random weights the draft is a guess: acceptance
is about chance (1 / V greedy), so speculation only costs; with trained MTP weights (GLM-4.5 reports
most first drafts accepted) each verify step yields several tokens for about one step's weight reads.

Letters in shape comments: B batch, T prompt length, K drafts per step (num_draft), V vocabulary, C model dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .generate import Completion, _check_prompts, _left_pad
from .sampling import SamplingParams, StopText, param_rows, process_logits


@dataclass
class SpecStats:
    """Counts of one or more speculative runs: `drafted` tokens proposed to rows still generating,
    `accepted` of them, `steps` verify forwards, `emitted` tokens output."""

    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    emitted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.emitted / self.steps if self.steps else 0.0


_UNSUPPORTED = (  # (field, value that means "off", what to say)
    ("num_beams", 1, "beam search ranks whole beams; use generate() for it"),
    ("repetition_penalty", 1.0, "a penalty changes the model's distribution with every accepted token"),
    ("presence_penalty", 0.0, "a penalty changes the model's distribution with every accepted token"),
    ("frequency_penalty", 0.0, "a penalty changes the model's distribution with every accepted token"),
    ("no_repeat_ngram_size", 0, "n-gram bans depend on every accepted token"),
    ("top_logprobs", 0, "only the chosen tokens' logprobs are reported"),
    ("constraint", None, "a grammar would have to check every drafted token"),
)


def _check(model, params: SamplingParams, num_draft: int):
    if not len(getattr(model, "mtp", ())):
        raise ValueError("speculative decoding with MTP needs a model with a multi-token-prediction layer "
                         "(n_mtp_layers = 0 here): load a GLM-4.5-style checkpoint that ships its MTP weights, "
                         "or use generate()")
    if isinstance(num_draft, bool) or not isinstance(num_draft, int) or num_draft < 1:
        raise ValueError(f"num_draft={num_draft!r}: must be an integer >= 1 (drafted tokens per step)")
    for name, off, why in _UNSUPPORTED:
        if getattr(params, name) != off:
            raise ValueError(f"SamplingParams.{name}={getattr(params, name)!r} is not supported with speculative "
                             f"decoding ({why}); leave it at {off!r} or use generate()")


class _Out:
    """Host-side output of one row: tokens, logprobs, finish, stop text."""

    def __init__(self, tokenizer, params: SamplingParams):
        self.ids: list[int] = []
        self.logprobs: list[float] | None = [] if params.logprobs else None
        self.sampled = 0  # tokens drawn, a final stop id included
        self.finish = self.stop_reason = None
        self.text = StopText(tokenizer, params.stop, params.skip_special_tokens) if tokenizer is not None else None

    def add(self, t: int, lp: float | None, stop_ids, N: int):
        """Record drawn token t as plain decoding's loop does: a stop id ends the row unrecorded, a stop
        string cuts it, the N-th token ends it by length."""
        self.sampled += 1
        if t in stop_ids:
            self.finish, self.stop_reason = "stop", t
            return
        self.ids.append(t)
        if self.logprobs is not None:
            self.logprobs.append(lp)
        if self.text is not None:
            self.text.add(t)
            if self.text.matched is not None:
                self.finish, self.stop_reason = "stop", self.text.matched
                return
        if self.sampled == N:
            self.finish = "length"


class _Speculation:
    """The state of one batch: the model's cache and the MTP layer's, each row's length, next token, drafts.

    Row b's next token `nxt[b]` is at slot L[b] (position L[b] - pad[b]); slots < L[b] of the model's
    cache hold the row's fed tokens, those of the MTP cache the pairs (h_t, x_{t+1}) for t < L[b]."""

    def __init__(self, model, prompts, params: SamplingParams, num_draft: int, tokenizer=None):
        self.model, self.params, self.k = model, params, num_draft
        dev = model.embed.weight.device
        self.dev = dev
        B, T, N = len(prompts), max(map(len, prompts)), params.max_new_tokens
        self.T, self.N = T, N
        size = T + N + num_draft + 1  # a verify writes k + 1 slots past the last fed token
        self.cache, self.mtp_cache = model.new_cache(B, size), model.new_mtp_cache(B, size)
        self.pad = torch.tensor([T - len(p) for p in prompts], device=dev)  # (B,)
        self.outs = [_Out(tokenizer, params) for _ in prompts]
        self.rows = param_rows([params] * B, dev)  # (B, 7)
        self.filters = (params.top_k > 0 or params.top_p < 1, params.min_p > 0)
        self.greedy = params.temperature == 0
        self.gens = []
        for b in range(B):  # one stream per row, seeded params.seed + b as plain sampling's rows
            seed = int(torch.randint(0, 2**62, ())) if params.seed is None else params.seed + b
            self.gens.append(torch.Generator(device=dev).manual_seed(seed))
        self.stats = SpecStats()
        ids, mask = _left_pad(prompts, dev)  # (B, T)
        slots = torch.arange(T, device=dev).expand(B, T)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        # the prompt through the model, keeping the hidden states the MTP layer reads
        h = model.step(ids, pos, self.cache, slots, valid=mask, extent=T, hidden_only=True)  # (B, T, C)
        self.cache.length = T
        logits = model.logits(h[:, -1:])  # (B, 1, V)
        first, _, lp = self._draw_target(logits, None, torch.empty(B, 0, dtype=torch.long, device=dev))
        self.L = torch.full((B,), T, device=dev)  # (B,) slot of each row's next token
        self.nxt = first[:, 0]  # (B,)
        self._emit([[t] for t in first[:, 0].tolist()], lp, counts=None)
        # the MTP layer over the prompt: pairs (h_t, x_{t+1}), the last one with the first drawn token
        nxt_ids = torch.cat((ids[:, 1:], self.nxt[:, None]), 1)  # (B, T)
        dl, g = model.mtp_step(h, nxt_ids, pos, self.mtp_cache, slots, valid=mask, extent=T)
        self._draft(dl[:, -1], g[:, -1])

    # ---- the distributions -----------------------------------------------------------------------------
    def _probs(self, logits):
        """Logits (B, n, V) -> (B, n, V) float32 probabilities after temperature and filters."""
        B, n, V = logits.shape
        x = process_logits(logits.reshape(B * n, V).float(), self.rows.repeat_interleave(n, 0), filters=self.filters)
        return x.softmax(-1).view(B, n, V)

    def _uniform(self, n: int):
        """(B, n) uniforms in [0, 1), row b from its own stream."""
        return torch.stack([torch.rand(n, generator=g, device=self.dev) for g in self.gens])

    @staticmethod
    def _pick(probs, u):
        """Inverse-CDF draws from probs (B, V) (any non-negative weights) with uniforms u (B,) -> (B,)."""
        c = probs.cumsum(-1)
        i = torch.searchsorted(c, (u * c[:, -1])[:, None], right=True)[:, 0]
        return i.clamp_(max=probs.shape[-1] - 1)

    def _draft(self, logits, g):
        """Drafts (B, K) from the MTP layer's logits (B, V) at each row's last pair and its output g (B, C):
        the first from them, the rest chained through the MTP cache at slots L, L + 1, ... (tentative:
        the next catch-up rewrites or invalidates them)."""
        drafts, qs = [], []
        for j in range(self.k):
            if j:
                slot = (self.L + j - 1)[:, None]  # (B, 1)
                out = self.model.mtp_step(g[:, None], drafts[-1][:, None], slot - self.pad[:, None], self.mtp_cache,
                                          slot, extent=int(self.L.max()) + j)
                logits, g = out[0][:, 0], out[1][:, 0]
            if self.greedy:
                d = logits.argmax(-1)
            else:
                q = self._probs(logits[:, None])[:, 0]  # (B, V)
                d = self._pick(q, self._uniform(1)[:, 0])
                qs.append(q)
            drafts.append(d)
        self.drafts = torch.stack(drafts, 1)  # (B, K)
        self.q = torch.stack(qs, 1) if qs else None  # (B, K, V)

    def _draw_target(self, logits, q, drafts):
        """Accept drafts (B, k) against the model's logits (B, k + 1, V) (q (B, k, V): the drafts'
        distributions, None when greedy; k = 0: a plain draw from the model). Returns tokens (B, k + 1):
        the n accepted drafts then the model's token, read up to n + 1 per row; n (B,); and the tokens'
        log-probabilities under the model (B, k + 1) when params.logprobs, else None."""
        B, k = drafts.shape
        lp = torch.log_softmax(logits.float(), -1) if self.params.logprobs else None
        if self.greedy:
            target = logits.argmax(-1)  # (B, k + 1)
            ok = drafts == target[:, :k]
            n = ok.long().cumprod(-1).sum(-1)  # (B,) the accepted prefix
            tokens = torch.cat((drafts, target[:, k:]), 1)
            tokens.scatter_(1, n[:, None], target.gather(1, n[:, None]))
        else:
            p = self._probs(logits)  # (B, k + 1, V)
            u = self._uniform(k + 1)  # (B, k + 1): k acceptance tests, one draw
            if k:
                pd = p[:, :k].gather(-1, drafts[..., None])[..., 0]  # (B, k)
                qd = q.gather(-1, drafts[..., None])[..., 0]
                ok = u[:, :k] * qd < pd  # u < p / q, q > 0 where d was drawn
                n = ok.long().cumprod(-1).sum(-1)
            else:
                n = torch.zeros(B, dtype=torch.long, device=self.dev)
            rows = torch.arange(B, device=self.dev)
            pn = p[rows, n]  # (B, V): the model's distribution at the first unaccepted position
            if k:
                qn = torch.cat((q, torch.zeros_like(q[:, :1])), 1)[rows, n]  # 0 past the drafts: draw from p
                resid = (pn - qn).clamp_(min=0)
                empty = resid.sum(-1, keepdim=True) <= 0  # p == q to rounding: a rejection there has no mass
                pn = torch.where(empty, pn, resid)
            y = self._pick(pn, u[:, k])
            tokens = torch.cat((drafts, y[:, None]), 1)
            tokens.scatter_(1, n[:, None], y[:, None])
        tlp = lp.gather(-1, tokens[..., None])[..., 0] if lp is not None else None
        return tokens, n, tlp

    # ---- output --------------------------------------------------------------------------------------
    def _emit(self, new: list[list[int]], lp, counts):
        """Give each live row its new tokens; count drafts (counts: (drafted, accepted) per row, or None)."""
        stop = set(self.params.stop_ids)
        lps = lp.tolist() if lp is not None else None
        for b, (out, toks) in enumerate(zip(self.outs, new)):
            if out.finish is not None:
                continue
            if counts is not None:
                self.stats.drafted += self.k
                self.stats.accepted += counts[b]
            for j, t in enumerate(toks):
                out.add(t, lps[b][j] if lps else None, stop, self.N)
                self.stats.emitted += 1
                if out.finish is not None:
                    break

    @property
    def done(self) -> bool:
        return all(o.finish is not None for o in self.outs)

    # ---- one step ------------------------------------------------------------------------------------
    def step(self):
        m, B, k, dev = self.model, len(self.outs), self.k, self.dev
        live = [o.finish is None for o in self.outs]
        L = self.L
        j = torch.arange(k + 1, device=dev)
        slots = L[:, None] + j  # (B, K + 1)
        pos = slots - self.pad[:, None]
        extent = int(L.max()) + k + 1
        feed = torch.cat((self.nxt[:, None], self.drafts), 1)  # (B, K + 1): x, d1 .. dk
        h = m.step(feed, pos, self.cache, slots, extent=extent, hidden_only=True)  # (B, K + 1, C)
        tokens, n, lp = self._draw_target(m.logits(h), self.q, self.drafts)
        ns = n.tolist()  # (B,) accepted drafts: the step's one host sync
        toks = tokens.tolist()
        self._emit([toks[b][: ns[b] + 1] for b in range(B)], lp, ns)
        self.stats.steps += 1
        # a finished row keeps its length: later steps rewrite its slots L .. L + k, rolled back at the end
        adv = torch.tensor([ns[b] + 1 if live[b] else 0 for b in range(B)], device=dev)
        keep = torch.where(adv > 0, adv, torch.ones_like(adv))  # fed slots that stay: x and the accepted drafts
        self._rollback(self.cache, L + keep, L + k + 1)
        # MTP catch-up: pairs (h at L + i, token at L + i + 1) for i <= n: the accepted drafts, then the new token
        nxt_ids = tokens  # tokens[:, i] is the token after slot L + i for i <= n
        valid = (j[None] < keep[:, None]).long()  # (B, K + 1): the pairs that exist
        dl, g = m.mtp_step(h, nxt_ids, pos, self.mtp_cache, slots, valid=valid, extent=extent)
        self._rollback(self.mtp_cache, L + keep, L + k + 1)
        last = (keep - 1)[:, None]
        rows = torch.arange(B, device=dev)
        new_nxt = tokens.gather(1, last)[:, 0]
        self.L = L + adv
        self.nxt = torch.where(adv > 0, new_nxt, self.nxt)
        # a finished row drafts from its old state again (ignored)
        self._draft(dl[rows, last[:, 0]], g[rows, last[:, 0]])

    @staticmethod
    def _rollback(cache, lo, hi):
        """Slots [lo[b], hi[b]) of each row: invalid and zeroed, as a cache never written there."""
        for b, (a, z) in enumerate(zip(lo.tolist(), hi.tolist())):
            if z > a:
                cache.k[:, b, :, a:z] = 0
                cache.v[:, b, :, a:z] = 0
                cache.valid[b, a:z] = False

    def finish(self, prompts) -> list[Completion]:
        """Each row's caches cut to what plain decoding feeds (prompt and every drawn token but the last),
        and the completions."""
        fed = torch.tensor([self.T + o.sampled - 1 for o in self.outs], device=self.dev)
        end = torch.full_like(fed, self.cache.max_len)
        self._rollback(self.cache, fed, end)
        self._rollback(self.mtp_cache, fed, end)
        self.L = fed
        out = []
        for o, p in zip(self.outs, prompts):
            text = o.text.text if o.text is not None else None
            out.append(Completion(o.ids, o.finish, o.stop_reason, text, o.logprobs, None, None, len(p)))
        return out


def _run(model, prompt_ids_list, params, tokenizer, num_draft):
    if params.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer: pass tokenizer=... (or use stop_ids)")
    _check(model, params, num_draft)
    prompts = _check_prompts(model, prompt_ids_list, params.max_new_tokens + num_draft + 1)
    spec = _Speculation(model, prompts, params, num_draft, tokenizer)
    while not spec.done:
        spec.step()
    return spec, spec.finish(prompts)


@torch.inference_mode()
def generate_mtp(model, prompt_ids_list, params: SamplingParams | None = None, tokenizer=None, *, num_draft: int = 1,
                 stats: SpecStats | None = None) -> list[Completion]:
    """As `generate.generate` (one left-padded batch; stop ids, stop strings with `tokenizer`, max_new_tokens,
    temperature / top-k / top-p / min-p, logprobs), drafting `num_draft` tokens per step with the model's
    MTP layer and verifying them in one forward. Greedy output equals `generate`'s token for token;
    sampled output follows its distribution. `stats`: a SpecStats to add this run's counts to."""
    params = params or SamplingParams()
    spec, out = _run(model, prompt_ids_list, params, tokenizer, num_draft)
    if stats is not None:
        for f in ("drafted", "accepted", "steps", "emitted"):
            setattr(stats, f, getattr(stats, f) + getattr(spec.stats, f))
    return out

