"""Sampling: request parameters, one batched sampler, stop text; used by `generate` and the engine (so
the server), so a request with a seed gives the same tokens on every path.

    sampler = Sampler(capacity=8, vocab=V, device=dev)
    sampler.join(SamplingParams(temperature=0.8, top_p=0.95), prompt_ids, seed=0)   # row 0
    tokens, logprobs, top, finite = sampler(logits)   # logits (B, V) of rows 0..B-1 -> (B,), on the device
    sampler.update(tokens)                            # penalty counts; each row's stream moves on
    sampler.keep([2, 0])                              # rows 2, 0 become rows 0, 1 (rows leave, beams reorder)

Each row's parameters are a row of a (B, 7) tensor: one pass over the (B, V) logits serves rows with
different temperatures, filters and penalties. A token is drawn by the exponential race,
argmax(probs / E), E ~ Exp(1) (gpt-fast): no `torch.multinomial`, no host sync. E is counter-based,
a hash of (row key, row step, token id) for the whole batch at once: the key comes from the row's
seed, the step counts its draws, so a seeded row draws the same noise alone, in a batch, or among
the engine's rows. A row without a seed takes its key from torch's global RNG when it joins
(`torch.manual_seed` reproduces a run). The hash is murmur3's 32-bit finaliser, exact in int64.

A row whose parameters carry a `constraint` (glmkit.constrain) has a grammar matcher: before
anything else its disallowed tokens get logit -inf (so greedy and sampled rows alike pick allowed
tokens, and logprobs are the masked model's, as vLLM reports them), its stop ids are allowed exactly
when the constraint may end, and `update` feeds it the drawn token. The masks are computed on the
host (llguidance) for the constrained rows only; a batch without one does no mask work.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from . import kernels
from .constrain import Constraint
from .errors import ParameterError

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily
# a seen token's logit is divided or multiplied by the penalty: bounded so that no logit overflows
REPETITION_PENALTY_RANGE = (0.01, 100.0)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. Checked on construction: a bad value is a ValueError.

    temperature 0 is greedy (argmax of the penalized logits), and so is any temperature below
    GREEDY_BELOW (1e-5, as vLLM): dividing logits by 1e-300 makes them infinite. Filters apply in
    this order, each on the output of the previous: penalties, temperature, top_k (0 = off), top_p (1 = off; keeps the
    smallest set of most likely tokens whose mass is >= top_p), min_p (0 = off; drops tokens with
    probability < min_p * the top probability).
    Penalties: `repetition_penalty` as HF / CTRL (over prompt and generated tokens, a seen token's
    logit is divided by it when positive and multiplied when negative); `presence_penalty` and
    `frequency_penalty` as OpenAI (over generated tokens only: logit -= frequency * count +
    presence * [count > 0]).
    `seed`: sequence b of a `generate` batch uses seed + b, as choice i of an API request does, so a
    prompt gives the same tokens with the same seed alone, in a batch, or served.
    `stop` strings are cut exactly from the text (not included, as OpenAI), also when one spans
    tokens; they need a tokenizer. A `stop_ids` token ends the sequence and is not part of the output.
    `logprobs`: the log-probability of each chosen token under the model (log-softmax of the raw
    logits, before penalties and filters, as vLLM reports by default); `top_logprobs` > 0 also
    returns the n most likely tokens at each step (and implies `logprobs`).
    Beam search (`num_beams` > 1) is deterministic: temperature, top-k/p, min-p and seed do not
    apply; penalties do. Hypotheses are ranked by sum of log-probabilities / length**length_penalty,
    length counting generated tokens including the stop token. `no_repeat_ngram_size` n forbids
    any n-gram of generated tokens from occurring twice (the prompt is not counted: it plays the
    part of a seq2seq source); it works with sampling too.
    `constraint` (glmkit.constrain.Constraint): the sequence must match it (a JSON schema, a regex, a
    choice, a grammar); tokens that could not continue it are never drawn, and the sequence ends at
    a stop id once the constraint is complete (only a stop id may follow then). It needs stop ids
    (`generate` adds the tokenizer's end of text when there are none) and cannot go with beam search.
    A sequence cut by max_new_tokens ends "length", unfinished.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    skip_special_tokens: bool = True  # in returned / streamed text
    constraint: Constraint | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop, self.stop_ids = tuple(self.stop or ()), tuple(self.stop_ids or ())

        def bad(name, want):
            raise ParameterError(name, f"SamplingParams.{name}={getattr(self, name)!r}: {want}")

        def whole(v):  # an int, not a bool
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("max_new_tokens", "top_k", "top_logprobs", "num_beams", "no_repeat_ngram_size"):
            if not whole(getattr(self, name)):
                bad(name, "must be an integer")
        lo, hi = REPETITION_PENALTY_RANGE
        for name, ok, want in (
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", 0 <= self.temperature < float("inf"), "must be a finite number >= 0 (0 = greedy)"),  # not NaN
            ("top_k", self.top_k >= 0, "must be >= 0 (0 = no top-k filter)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1] (1 = no nucleus filter)"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1] (0 = no min-p filter)"),
            ("repetition_penalty", lo <= self.repetition_penalty <= hi, f"must be in [{lo}, {hi}] (1 = none; > 1 discourages repeats)"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2], as OpenAI's API allows"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2], as OpenAI's API allows"),
            ("seed", self.seed is None or whole(self.seed) and self.seed >= 0, "must be None or a non-negative integer"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_ids", all(whole(i) and i >= 0 for i in self.stop_ids), "must be non-negative token ids"),
            ("top_logprobs", self.top_logprobs >= 0, "must be >= 0"),
            ("num_beams", self.num_beams >= 1, "must be >= 1 (1 = sampling / greedy)"),
            ("stop", self.num_beams == 1 or not self.stop, "stop strings are not supported with beam search; use stop_ids"),
            ("no_repeat_ngram_size", self.no_repeat_ngram_size >= 0, "must be >= 0 (0 = off)"),
            ("length_penalty", -10 <= self.length_penalty <= 10, "must be in [-10, 10] (1 = average log-probability per token)"),
            ("constraint", self.constraint is None or isinstance(self.constraint, Constraint),
             "must be a glmkit.constrain.Constraint or None"),
            ("constraint", self.num_beams == 1 or self.constraint is None,
             "constrained decoding is not supported with beam search (num_beams > 1): use sampling or greedy"),
        ):
            if not ok:
                bad(name, want)
        if self.temperature < GREEDY_BELOW:  # logits / 1e-300 overflow to inf: a vanishing temperature is greedy
            self.temperature = 0.0
        self.logprobs = self.logprobs or self.top_logprobs > 0


# ---- logits processors: (B, V) float32 in place, one parameter row per logits row -----------------------
# the columns of a parameter tensor (B, 7), in the order process_logits reads them
COLUMNS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def param_rows(params: list[SamplingParams], device=None) -> torch.Tensor:
    """The parameters of each row as a (B, 7) float32 tensor, columns COLUMNS."""
    return torch.tensor([[float(getattr(p, c)) for c in COLUMNS] for p in params], device=device)


def apply_penalties(logits, rows, counts=None, seen=None):
    """Penalties on logits (B, V) in place. rows (B, 7): parameters. counts (B, V): times each token was
    generated (OpenAI's presence / frequency penalties); seen (B, V) bool: tokens in prompt or output
    (HF's repetition penalty). A row whose penalty is neutral (1 or 0) keeps its logits exactly."""
    _, _, _, _, rep, presence, frequency = rows.T[:, :, None]  # each (B, 1)
    if seen is not None:
        logits.copy_(torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits))
    if counts is not None:
        logits.sub_(counts * frequency + (counts > 0) * presence)
    return logits


def top_k_top_p_filter(logits, k, p):
    """Keep each row's k largest logits (k (B, 1), 0 = off; ties at the k-th value are kept), then of
    those the smallest set of most likely tokens whose probability mass is >= p (p (B, 1), 1 = off);
    -inf elsewhere. One sort for both."""
    V = logits.shape[-1]
    ordered, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    kth = ordered.gather(-1, (k.long().clamp(1, V) - 1))  # (B, 1)
    ordered.masked_fill_((ordered < kth) & (k > 0), float("-inf"))
    probs = ordered.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    drop = (before >= p) & (p < 1)  # the set above already reaches p (p = 1: the sum may round past 1)
    drop[:, 0] = False  # the most likely token always stays (p = 5e-324 is 0 in float32: 0 >= 0 dropped it)
    return logits.scatter_(-1, order, ordered.masked_fill_(drop, float("-inf")))


def process_logits(logits, rows, counts=None, seen=None, filters=(True, True)):
    """Raw logits (B, V) float32 -> the logits to sample from, in place: penalties, temperature, top-k,
    top-p, min-p (the order HF and vLLM use), each row with its own parameters rows (B, 7). A greedy
    row (temperature 0) is divided by 1; the filters keep its most likely token, so its argmax is
    that of the penalized logits. `filters`: (any row uses top-k or top-p, any uses min-p); False skips."""
    apply_penalties(logits, rows, counts, seen)
    temperature, k, p, min_p = rows.T[:4, :, None]  # each (B, 1)
    logits.div_(torch.where(temperature > 0, temperature, 1.0))
    if filters[0]:
        top_k_top_p_filter(logits, k, p)
    if filters[1]:  # drop tokens less likely than min_p times the row's most likely token
        probs = logits.softmax(-1)
        logits.masked_fill_(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


# ---- random streams: counter-based, one per row ----------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """x * c mod 2**32 for int64 x in [0, 2**32): two products below 2**48, so int64 never overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """murmur3's finaliser: a bijection of [0, 2**32) whose every output bit depends on every input bit."""
    x = _mul32(x ^ (x >> 16), 0x85EBCA6B)
    x = _mul32(x ^ (x >> 13), 0xC2B2AE35)
    return x ^ (x >> 16)


def stream_key(seed: int) -> tuple[int, int]:
    """Two 32-bit words from any seed, so nearby seeds give unrelated streams."""
    k = random.Random(seed).getrandbits(64)
    return k >> 32, k & _M32


def exponential_noise(key, step, vocab: int):
    """E ~ Exp(1) (B, V) for rows with keys (B, 2) at steps (B,): a function of (key, step, token id) only."""
    row = _mix32(key[:, 1] ^ _mix32(key[:, 0] ^ _mix32(step & _M32)))  # (B,)
    u = kernels.uniform_noise(row, vocab)  # the same bits, natively on a CPU
    if u is not None:
        return u.log_().neg_()
    h = _mix32(row[:, None] ^ _token_hashes(vocab, key.device))  # (B, V) in [0, 2**32)
    return _exponential(h)


_TOKEN_HASHES: dict = {}


def _token_hashes(vocab: int, device) -> torch.Tensor:
    """_mix32 of every token id (V,), the same at every step: computed once per vocabulary size and device
    (a third of the noise's work at GLM-4's 151,552 tokens)."""
    k = (vocab, str(device))
    if k not in _TOKEN_HASHES:
        _TOKEN_HASHES[k] = _mix32(torch.arange(vocab, device=device))
    return _TOKEN_HASHES[k]


def _exponential(h):
    """-log(u) of u uniform in (0, 1) from 32-bit hashes h: 23 bits, (k + 0.5) / 2**23, so that u is exact in
    float32 and below 1 (24 bits put (2**24 - 0.5) / 2**24 on 1.0 once in 2**24 tokens: E = 0 there, and the
    race p / E then drew that token whatever its probability, or NaN for a masked one)."""
    u = ((h >> 9).float() + 0.5) * 2.0**-23
    return u.log_().neg_()


# ---- the sampler -------------------------------------------------------------------------------------------
class Draw(NamedTuple):
    tokens: torch.Tensor  # (B,)
    logprobs: torch.Tensor | None  # (B,) the chosen tokens' model log-probabilities, when a row asks
    top: tuple[torch.Tensor, torch.Tensor] | None  # (values, ids) (B, n): n = the most any row asks for
    finite: torch.Tensor  # (B,) bool: False where the row's processed logits cannot be sampled


class Sampler:
    """Rows of sampling state on the device: parameters (B, 7), random-stream keys and steps, penalty
    counts and seen tokens (B, V). Rows join at the end (`join`); `keep` moves the rows that stay to
    the front (rows leave, beams reorder). `__call__` draws a token for each of the first B rows,
    `update` records them."""

    def __init__(self, capacity: int, vocab: int, device, constraint_vocab=None):
        self.device = device
        self.constraint_vocab = constraint_vocab  # constrain.ConstraintVocab: needed by rows with a constraint
        self.matchers: list = []  # each row's grammar matcher, None for an unconstrained row
        self.errors: list[str | None] = []  # why a constrained row cannot go on (its matcher failed)
        self._bitmask = None  # (capacity, words) int32 on the host: the constrained rows' allowed tokens
        self.params: list[SamplingParams] = []  # host copy of each row's parameters: which work a step needs
        self.rows = torch.zeros(capacity, len(COLUMNS), device=device)
        self.key = torch.zeros(capacity, 2, dtype=torch.long, device=device)
        self.step = torch.zeros(capacity, dtype=torch.long, device=device)
        self.counts = torch.zeros(capacity, vocab, device=device)  # generated tokens
        self.seen = torch.zeros(capacity, vocab, dtype=torch.bool, device=device)  # prompt or generated tokens

    @classmethod
    def batch(cls, params: SamplingParams, prompts: list[list[int]], vocab: int, device, constraint_vocab=None) -> Sampler:
        """One row per prompt; row b seeded params.seed + b."""
        s = cls(len(prompts), vocab, device, constraint_vocab)
        for b, p in enumerate(prompts):
            s.join(params, p, None if params.seed is None else params.seed + b)
        return s

    def join(self, params: SamplingParams, prompt_ids, seed: int | None):
        """A row joins at index n; `seed` keys its random stream (None: a key from torch's global RNG).
        A constrained row gets its matcher here (ValueError without the sampler's constraint_vocab or
        without stop ids: nothing could end it)."""
        matcher = None
        if params.constraint is not None:
            check_constrainable(params, self.constraint_vocab)
            matcher = self.constraint_vocab.matcher(params.constraint)
        b = len(self.params)
        seed = int(torch.randint(0, 2**62, ())) if seed is None else seed
        self.rows[b], self.key[b], self.step[b] = param_rows([params])[0], torch.tensor(stream_key(seed)), 0
        self.counts[b], self.seen[b] = 0, False
        self.seen[b, torch.as_tensor(prompt_ids, dtype=torch.long, device=self.device)] = True
        self.params.append(params)
        self.matchers.append(matcher)
        self.errors.append(f"the constraint failed to start: {matcher.get_error()}" if matcher is not None and matcher.is_error() else None)

    def keep(self, idx: list[int]):
        """Rows idx (in that order) become rows 0..len(idx)-1; the others leave."""
        self.params = [self.params[i] for i in idx]
        self.matchers, self.errors = [self.matchers[i] for i in idx], [self.errors[i] for i in idx]
        m, i = len(idx), torch.tensor(idx, dtype=torch.long, device=self.device)
        for t in (self.rows, self.key, self.step, self.counts, self.seen):
            t[:m] = t[i]

    def penalized(self, logits, banned=None):
        """logits (B, V) of the first B rows, any float dtype -> a float32 copy with n-gram bans
        ((rows, ids) or None) and penalties applied. Beam search ranks these."""
        return self._penalize(logits.to(torch.float32, copy=True), banned)

    def _penalize(self, x, banned=None):
        """n-gram bans and penalties on x (B, V) float32 in place."""
        if banned is not None:
            x[banned] = float("-inf")
        B = x.shape[0]
        counts = self.counts[:B] if self._any("presence_penalty", "frequency_penalty") else None
        seen = self.seen[:B] if any(p.repetition_penalty != 1 for p in self.params) else None
        return apply_penalties(x, self.rows[:B], counts, seen)

    def __call__(self, logits, banned=None) -> Draw:
        """logits (B, V) of rows 0..B-1, any float dtype; banned: (rows, token ids) to forbid, or None."""
        B = logits.shape[0]
        lp = top = None
        if any(m is not None for m in self.matchers[:B]):
            x = self._constrain(logits)  # a float32 copy; the caller's logits (a cached prompt's) stay as they are
        else:
            x = logits.to(torch.float32, copy=True)
        if self._any("logprobs"):
            logp = torch.log_softmax(x, dim=-1)  # before penalties and filters: the (masked) model's own
            n_top = max(p.top_logprobs for p in self.params)
            top = logp.topk(n_top, dim=-1) if n_top else None
        filters = (self._any("top_k") or any(p.top_p < 1 for p in self.params), self._any("min_p"))
        x = process_logits(self._penalize(x, banned), self.rows[:B], None, None, filters)
        tok = x.argmax(-1)
        if self._any("temperature"):
            race = x.softmax(-1).div_(exponential_noise(self.key[:B], self.step[:B], x.shape[-1])).argmax(-1)
            tok = torch.where(self.rows[:B, 0] > 0, race, tok)
        if self._any("logprobs"):
            lp = logp.gather(-1, tok[:, None])[:, 0]
        return Draw(tok, lp, None if top is None else (top.values, top.indices), torch.isfinite(x.amax(-1)))

    def update(self, tok):
        """Record the tokens (B,) just drawn by rows 0..B-1; each constrained row's matcher takes its token
        (a row that drew a stop id is done: its matcher is dropped)."""
        B = tok.shape[0]
        self.step[:B] += 1
        self.counts[:B].scatter_add_(1, tok[:, None], torch.ones_like(tok[:, None], dtype=self.counts.dtype))
        self.seen[:B].scatter_(1, tok[:, None], True)
        rows = [b for b, m in enumerate(self.matchers[:B]) if m is not None]
        if rows:
            for b, t in zip(rows, tok[rows].tolist()):  # one host read for the constrained rows
                m = self.matchers[b]
                if t in self.params[b].stop_ids:
                    self.matchers[b] = None
                elif self.errors[b] is None and not m.consume_token(t):
                    self.errors[b] = f"the constraint could not take token {t}: {m.get_error()}"

    def _constrain(self, logits):
        """logits (B, V) -> a float32 copy where each constrained row's disallowed tokens are -inf. The end of
        the constraint (llguidance's end-of-text bit) becomes the row's stop ids; a row in error allows nothing
        (its draw is not finite: the engine ends it with the error)."""
        B, V = logits.shape
        vocab = self.constraint_vocab
        rows = [b for b, m in enumerate(self.matchers[:B]) if m is not None]
        if self._bitmask is None:
            self._bitmask = torch.zeros(len(self.rows), vocab.words, dtype=torch.int32,
                                        pin_memory=torch.device(self.device).type == "cuda")
        mask = self._bitmask[: len(rows)]  # (n, words)
        vocab.fill([self.matchers[b] for b in rows], mask)
        words = mask.numpy().view(np.uint32)
        w, bit = divmod(vocab.eos, 32)
        ends = (words[:, w] >> bit) & 1
        words[:, w] &= ~np.uint32(1 << bit)
        for k, b in enumerate(rows):
            if self.errors[b] is None and self.matchers[b].is_error():
                self.errors[b] = f"the constraint failed: {self.matchers[b].get_error()}"
            if self.errors[b] is not None:
                words[k] = 0
            elif ends[k]:
                for s in self.params[b].stop_ids:
                    if s < V:
                        words[k, s // 32] |= np.uint32(1 << (s % 32))
        if logits.device.type == "cpu":  # bits to bools: numpy's unpackbits reads the words' bytes, lowest bit first
            allowed = torch.from_numpy(np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :V]).view(torch.bool)
        else:  # the words travel (32x smaller) and are unpacked on the device
            bits = torch.arange(32, dtype=torch.int32, device=logits.device)
            m = mask.to(logits.device, non_blocking=True)
            allowed = ((m[:, :, None] >> bits) & 1).view(len(rows), -1)[:, :V].bool()  # (n, V)
        if len(rows) == B:  # one pass: the float32 copy is the masked one
            return torch.where(allowed, logits.float(), float("-inf"))
        x = logits.to(torch.float32, copy=True)
        idx = torch.tensor(rows, device=logits.device)
        x[idx] = torch.where(allowed, x[idx], float("-inf"))
        return x

    @property
    def constrained(self) -> bool:
        """Whether any row has a constraint still running."""
        return any(m is not None for m in self.matchers)

    def _any(self, *names) -> bool:
        return any(getattr(p, name) for p in self.params for name in names)


def check_constrainable(params: SamplingParams, constraint_vocab) -> None:
    """ValueError unless a row with params.constraint can run: a ConstraintVocab to build its matcher, stop
    ids to end it with, and a constraint the grammar engine accepts."""
    if constraint_vocab is None:
        raise ValueError("a constrained row needs the tokenizer's vocabulary: pass "
                         "constraint_vocab=glmkit.constrain.ConstraintVocab.of(tokenizer, model.cfg.vocab_size)")
    if not params.stop_ids:
        raise ValueError("a constrained sequence needs stop_ids: the tokens that end it once the constraint is complete")
    params.constraint.check()
    constraint_vocab.lltokenizer  # noqa: B018 - built (once) here, or refused: the tokenizer is one llguidance cannot read


def ngram_bans(histories, sizes):
    """(rows, ids) of the tokens that would repeat an n-gram of each row's history (n = sizes[b], 0 = off),
    or None."""
    rows, ids = [], []
    for b, (h, n) in enumerate(zip(histories, sizes)):
        if n == 1:
            banned = set(h)
        elif n and len(h) >= n:
            prefix = tuple(h[len(h) - n + 1 :])
            banned = {h[i + n - 1] for i in range(len(h) - n + 1) if tuple(h[i : i + n - 1]) == prefix}
        else:
            continue
        rows += [b] * len(banned)
        ids += sorted(banned)
    return (torch.tensor(rows), torch.tensor(ids)) if rows else None


# ---- stop ids and stop strings ---------------------------------------------------------------------------
def eos_ids(tokenizer) -> tuple[int, ...]:
    """The tokenizer's end-of-text id, as stop ids (none when it has no "eos")."""
    try:
        return (tokenizer.special("eos"),)
    except KeyError:
        return ()


class StopText:
    """The text of one sequence, grown token by token, cut exactly at the first stop string.

    `add` returns the new text that is safe to show: the incremental decoder holds back half UTF-8
    characters, and we hold back a tail that could still become a stop string. `close` flushes.
    A stop string can span tokens, or start inside one token's text: the cut is at its first
    character either way.
    """

    def __init__(self, tokenizer, stops=(), skip_special_tokens: bool = True):
        self.dec = tokenizer.incremental_decoder(skip_special_tokens)
        self.stops = tuple(stops)
        self.longest = max(map(len, self.stops), default=0)
        self.text, self.sent, self.matched = "", 0, None

    def add(self, token_id: int) -> str:
        return self._push(self.dec.add(token_id), final=False)

    def close(self) -> str:
        return self._push(self.dec.flush(), final=True)

    def _push(self, piece: str, final: bool) -> str:
        if self.matched is not None:
            return ""
        start = max(0, len(self.text) - self.longest + 1)  # a match must end inside the new piece
        self.text += piece
        if self.stops and piece:
            hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                i, self.matched = min(hits)
                self.text, final = self.text[:i], True
        end = max(self.sent, len(self.text) - (0 if final else self._held()))
        out, self.sent = self.text[self.sent : end], end
        return out

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        for k in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
