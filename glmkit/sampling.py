"""Sampling: request parameters, the batched sampler, stop text. Used by `generate`, the engine and
(through the engine) the server, so one request with one seed gives the same tokens on every path.

    sampler = Sampler(capacity=8, vocab=V, device=dev)
    sampler.join(SamplingParams(temperature=0.8, top_p=0.95, seed=0), prompt_ids)   # row 0
    draw = sampler(logits[:sampler.n])       # logits (B, V) -> draw.tokens (B,), on the device
    sampler.update(draw.tokens)              # penalty counts, each row's random stream moves on
    sampler.keep([2, 0])                     # rows 2 and 0 become rows 0 and 1 (retire, beam reorder)

Each row's parameters are one row of a (B, 7) tensor, so one pass over the (B, V) logits serves a
batch of rows with different temperatures, filters and penalties, without a host sync.

Randomness per row. A token is drawn by the exponential race, argmax(probs / E) with E ~ Exp(1)
i.i.d. (a draw from probs; gpt-fast): no `torch.multinomial`, no host sync. E comes from a
counter-based generator: u = hash(row key, row step, token id), computed for the whole batch at
once. A row's key is made from its seed, its step counts the tokens it drew, so its draws do not
depend on the batch it is in: alone, in a `generate` batch, or among other rows of the engine, a
seeded row draws the same noise. A row without a seed takes its key from torch's global RNG when it
joins (`torch.manual_seed` reproduces a run). The hash is murmur3's 32-bit finaliser, computed
exactly in int64 (each product split in 16-bit halves, so nothing overflows).

Letters in shape comments: B rows, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

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

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop, self.stop_ids = tuple(self.stop or ()), tuple(self.stop_ids or ())

        def bad(name, want):
            raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r}: {want}")

        for name in ("max_new_tokens", "top_k", "top_logprobs", "num_beams", "no_repeat_ngram_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(name, "must be an integer")
        if self.max_new_tokens < 1:
            bad("max_new_tokens", "must be >= 1")
        if not self.temperature >= 0 or self.temperature == float("inf"):  # also rejects NaN
            bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if self.temperature < GREEDY_BELOW:  # logits / 1e-300 overflow to inf: a vanishing temperature is greedy
            self.temperature = 0.0
        if self.top_k < 0:
            bad("top_k", "must be >= 0 (0 = no top-k filter)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1] (1 = no nucleus filter)")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1] (0 = no min-p filter)")
        if not REPETITION_PENALTY_RANGE[0] <= self.repetition_penalty <= REPETITION_PENALTY_RANGE[1]:
            bad("repetition_penalty", f"must be in {list(REPETITION_PENALTY_RANGE)} (1 = none; > 1 discourages repeats)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                bad(name, "must be in [-2, 2], as OpenAI's API allows")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            bad("seed", "must be None or a non-negative integer")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.stop_ids):
            bad("stop_ids", "must be non-negative token ids")
        if self.top_logprobs < 0:
            bad("top_logprobs", "must be >= 0")
        if self.top_logprobs:
            self.logprobs = True
        if self.num_beams < 1:
            bad("num_beams", "must be >= 1 (1 = sampling / greedy)")
        if self.num_beams > 1 and self.stop:
            bad("stop", "stop strings are not supported with beam search; use stop_ids")
        if self.no_repeat_ngram_size < 0:
            bad("no_repeat_ngram_size", "must be >= 0 (0 = off)")
        if not -10 <= self.length_penalty <= 10:
            bad("length_penalty", "must be in [-10, 10] (1 = average log-probability per token)")


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


def min_p_filter(logits, min_p):
    """Drop tokens whose probability is below min_p (B, 1) times the row's most likely token's."""
    probs = logits.softmax(-1)
    return logits.masked_fill_(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))


def filter_logits(logits, rows, filters=(True, True)):
    """Temperature, top-k, top-p, min-p on logits (B, V) in place, each row with its own parameters
    rows (B, 7). A greedy row (temperature 0) is divided by 1; the filters keep its most likely token,
    so its argmax stays that of the penalized logits. `filters`: (any row uses top-k or top-p, any row
    uses min-p); False skips that work."""
    temperature, k, p, min_p = rows.T[:4, :, None]  # each (B, 1)
    logits.div_(torch.where(temperature > 0, temperature, 1.0))
    if filters[0]:
        top_k_top_p_filter(logits, k, p)
    if filters[1]:
        min_p_filter(logits, min_p)
    return logits


def process_logits(logits, rows, counts=None, seen=None):
    """Raw logits (B, V) float32 -> the logits to sample from, in place: penalties, temperature, top-k,
    top-p, min-p (the order HF and vLLM use), each row with its own parameters rows (B, 7)."""
    return filter_logits(apply_penalties(logits, rows, counts, seen), rows)


# ---- random streams: counter-based, one per row ----------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """x * c mod 2**32 for int64 x in [0, 2**32): two products below 2**48, so int64 never overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """murmur3's finaliser: a bijection of [0, 2**32) whose every output bit depends on every input bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def stream_key(seed: int) -> tuple[int, int]:
    """Two 32-bit words from any seed (splitmix64's mixing), so nearby seeds give unrelated streams."""
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return z >> 32, z & _M32


def exponential_noise(key, step, vocab: int):
    """E ~ Exp(1) (B, V) for rows with keys (B, 2) at steps (B,): a function of (key, step, token id) only."""
    row = _mix32(key[:, 1] ^ _mix32(key[:, 0] ^ _mix32(step & _M32)))  # (B,)
    h = _mix32(row[:, None] ^ _mix32(torch.arange(vocab, device=key.device)))  # (B, V) in [0, 2**32)
    u = ((h >> 8).float() + 0.5) * 2.0**-24  # 24 bits, in (0, 1): never log(0)
    return u.log_().neg_()


# ---- the sampler -------------------------------------------------------------------------------------------
class Draw(NamedTuple):
    tokens: torch.Tensor  # (B,)
    logprobs: torch.Tensor | None  # (B,) the chosen tokens' model log-probabilities, when a row asks
    top: tuple[torch.Tensor, torch.Tensor] | None  # (values, ids) (B, n): n = the most any row asks for
    finite: torch.Tensor  # (B,) bool: False where the row's processed logits cannot be sampled


class Sampler:
    """Rows of sampling state on the device: parameters (B, 7), random-stream keys and steps, penalty
    counts / seen tokens (allocated when a row first needs them). Rows join at the end (`join`), and
    are selected and moved to the front (`keep`) when rows leave or beams reorder. `__call__` draws a
    token for each of the first n rows; `update` records the tokens drawn."""

    def __init__(self, capacity: int, vocab: int, device):
        self.capacity, self.vocab, self.device = capacity, vocab, device
        self.params: list[SamplingParams] = []  # host copy of each row's parameters: which work a step needs
        self.rows = torch.zeros(capacity, len(COLUMNS), device=device)
        self.key = torch.zeros(capacity, 2, dtype=torch.long, device=device)
        self.step = torch.zeros(capacity, dtype=torch.long, device=device)
        self.counts = self.seen = None  # (capacity, V)

    @classmethod
    def batch(cls, params: SamplingParams, prompts: list[list[int]], vocab: int, device) -> Sampler:
        """One row per prompt; row b seeded params.seed + b."""
        s = cls(len(prompts), vocab, device)
        for b, p in enumerate(prompts):
            s.join(params, p, None if params.seed is None else params.seed + b)
        return s

    @property
    def n(self) -> int:
        return len(self.params)

    def join(self, params: SamplingParams, prompt_ids, seed: int | None):
        """A row joins at index n; `seed` keys its random stream (None: a key from torch's global RNG)."""
        b = self.n
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        self.rows[b] = param_rows([params])[0]
        self.key[b] = torch.tensor(stream_key(seed))
        self.step[b] = 0
        if params.presence_penalty or params.frequency_penalty:
            if self.counts is None:
                self.counts = torch.zeros(self.capacity, self.vocab, device=self.device)
            self.counts[b] = 0
        if params.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(self.capacity, self.vocab, dtype=torch.bool, device=self.device)
            self.seen[b] = False
            self.seen[b, torch.as_tensor(prompt_ids, dtype=torch.long, device=self.device)] = True
        self.params.append(params)

    def keep(self, idx: list[int]):
        """Rows idx (in that order) become rows 0..len(idx)-1; the others leave."""
        self.params = [self.params[i] for i in idx]
        m, i = len(idx), torch.tensor(idx, dtype=torch.long, device=self.device)
        for t in (self.rows, self.key, self.step, self.counts, self.seen):
            if t is not None:
                t[:m] = t[i]

    def penalized(self, logits, banned=None):
        """logits (B, V) of the first B rows, any float dtype -> a float32 copy with n-gram bans
        ((rows, ids) or None) and penalties applied. Beam search ranks these."""
        x = logits.float().clone() if logits.dtype == torch.float32 else logits.float()
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
        if self._any("logprobs"):
            logp = torch.log_softmax(logits.float(), dim=-1)  # before penalties and filters: the model's own
            n_top = max(p.top_logprobs for p in self.params)
            top = logp.topk(n_top, dim=-1) if n_top else None
        filters = (self._any("top_k") or any(p.top_p < 1 for p in self.params), self._any("min_p"))
        x = filter_logits(self.penalized(logits, banned), self.rows[:B], filters)
        tok = x.argmax(-1)
        if self._any("temperature"):
            race = x.softmax(-1).div_(exponential_noise(self.key[:B], self.step[:B], x.shape[-1])).argmax(-1)
            tok = torch.where(self.rows[:B, 0] > 0, race, tok)
        if self._any("logprobs"):
            lp = logp.gather(-1, tok[:, None])[:, 0]
        return Draw(tok, lp, None if top is None else (top.values, top.indices), torch.isfinite(x.amax(-1)))

    def update(self, tok):
        """Record the tokens (B,) just drawn by rows 0..B-1."""
        B = tok.shape[0]
        self.step[:B] += 1
        if self.counts is not None:
            self.counts[:B].scatter_add_(1, tok[:, None], torch.ones_like(tok[:, None], dtype=self.counts.dtype))
        if self.seen is not None:
            self.seen[:B].scatter_(1, tok[:, None], True)

    def _any(self, *names) -> bool:
        return any(getattr(p, name) for p in self.params for name in names)


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


# ---- text with stop strings ---------------------------------------------------------------------------
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
