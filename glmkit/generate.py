"""Generation over the static KV cache: sampling, stop conditions, beam search, GLM blank filling, chat.

    from glmkit.generate import SamplingParams, generate, stream, fill, infill, chat
    params = SamplingParams(max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0, stop=["\\n\\n"])
    outs = generate(model, [ids_a, ids_b], params, tokenizer=tok)   # left-padded batch, one prefill
    outs[0].token_ids, outs[0].text, outs[0].finish_reason          # "stop" | "length"
    for chunk in stream(model, [ids], params, tokenizer=tok): print(chunk.text, end="")
    fill(model, tok, "床前明月光，[MASK]。", SamplingParams(temperature=0)).text
    chat(model, tok, [{"role": "user", "content": "你好"}], params).text

    glmkit fill "床前明月光，[MASK]。" --model DIR
    glmkit generate --model DIR --prompt "..."      glmkit chat --model DIR

Everything below the public functions works on token ids and tensors; text appears only where a
tokenizer is passed (stop strings, `text`, `fill`, `chat`). Based on gpt-fast's `generate.py`
(preallocated cache, one small decode step that compiles on its own, sampling by an exponential
race so no host sync is needed to draw a token) and nanochat's engine (token ids in, token ids out).

One step of the loop: `Sampler` turns logits (B, V) into tokens (B,) on the device (penalties,
temperature, top-k, top-p, min-p; the order HF and vLLM use), `decode_one` runs the model on them
with static shapes (attention over the whole cache, masked), and once per step, for the whole
batch, the tokens come to the host, only when a stop id, a stop string, a no-repeat n-gram or a
stream needs them. Without any of those the loop never syncs and reads the tokens back at the end.

GLM's blank filling (Du et al. 2022, §2.1-2.3) reads the text with its mask tokens (Part A)
bidirectionally and generates each blank as `<sop> span` at the mask's position with block
positions 1, 2, 3, ... until `<eop>`: exactly the layout `infill.assemble` trains on.

Letters in shape comments: B batch, T prompt length, S cache length, V vocabulary, W beams, N new tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import fused

MASK_STRINGS = {"[MASK]": "mask", "[sMASK]": "smask", "[gMASK]": "gmask"}  # literal text -> tokenizer role


# ---- parameters and results ------------------------------------------------------------------------
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


@dataclass
class Completion:
    """One generated sequence. `text` only when a tokenizer was given (cut at a stop string)."""

    token_ids: list[int]
    finish_reason: str  # "stop" (stop id, stop string, or <eop> in fill) | "length"
    stop_reason: int | str | None = None  # the stop id or stop string that ended it
    text: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    score: float | None = None  # beam search: sum of log-probabilities / length**length_penalty
    prompt_tokens: int = 0


@dataclass
class Chunk:
    """What one step of a stream adds to sequence `index`.

    token_ids is [] on a final chunk that only flushes held-back text (after a stop id). `text`
    is safe to show: never half a UTF-8 character, never the start of a possible stop string.
    """

    index: int
    token_ids: list[int]
    text: str = ""
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None


# ---- sampling: pure tensor functions, no host syncs ---------------------------------------------------
def apply_penalties(logits, params: SamplingParams, counts=None, seen=None):
    """Penalties on logits (B, V) in place. counts (B, V): times each token was generated (OpenAI's
    presence / frequency penalties); seen (B, V) bool: tokens in prompt or output (HF's repetition
    penalty)."""
    if seen is not None and params.repetition_penalty != 1.0:
        r = params.repetition_penalty
        penalized = torch.where(logits > 0, logits / r, logits * r)
        logits.copy_(torch.where(seen, penalized, logits))
    if counts is not None and (params.frequency_penalty or params.presence_penalty):
        logits.sub_(counts * params.frequency_penalty + (counts > 0) * params.presence_penalty)
    return logits


def top_k_filter(logits, k: int):
    """Keep the k largest logits of each row (ties at the k-th value are kept too); -inf elsewhere."""
    if 0 < k < logits.shape[-1]:
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
        logits.masked_fill_(logits < kth, float("-inf"))
    return logits


def top_p_filter(logits, p: float):
    """Keep the smallest set of most likely tokens whose probability mass is >= p."""
    if p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        drop = before >= p  # the set above already reaches p
        drop[..., 0] = False  # the most likely token always stays (p = 5e-324 is 0 in float32: 0 >= 0 dropped it)
        logits.scatter_(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def min_p_filter(logits, min_p: float):
    """Drop tokens whose probability is below min_p times the most likely token's."""
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits.masked_fill_(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def process_logits(logits, params: SamplingParams, counts=None, seen=None):
    """Raw logits (B, V) -> the logits to sample from: penalties, temperature, top-k, top-p, min-p.
    Works in place on `logits` (float32) and returns it. With temperature 0 only penalties apply."""
    apply_penalties(logits, params, counts, seen)
    if params.temperature == 0:
        return logits
    logits.div_(params.temperature)
    top_k_filter(logits, params.top_k)
    top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


class Sampler:
    """Logits (B, V) -> tokens (B,) on the device, with the state penalties need.

    A token is drawn as argmax(probs / E), E ~ Exp(1) i.i.d. (the exponential race, equivalent to
    sampling from probs; gpt-fast): no `torch.multinomial`, no host sync. The noise comes from one
    `torch.Generator` seeded by `params.seed` (or, without a seed, from torch's global RNG, so
    `torch.manual_seed` reproduces a run). The same seed gives the same tokens for the same batch;
    a different batch composition draws different noise for each row.
    """

    def __init__(self, params: SamplingParams, batch: int, vocab: int, device, prompt_ids=None, prompt_mask=None):
        self.params, self.device = params, device
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self.gen = torch.Generator(device=device).manual_seed(seed)
        sampling = params.temperature > 0 and params.num_beams == 1
        self.noise = torch.empty(batch, vocab, device=device) if sampling else None
        self.counts = self.seen = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(batch, vocab, device=device)
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
            if prompt_ids is not None:  # padding positions must not mark token 0 (or whatever pads) as seen
                n = torch.zeros(batch, vocab, device=device)
                n.scatter_add_(1, prompt_ids, prompt_mask.to(n.dtype))
                self.seen |= n > 0

    def __call__(self, logits, banned=None):
        """logits (B, V), any float dtype. banned: (rows, token ids) to forbid, or None.
        Returns tokens (B,), and the chosen tokens' log-probabilities (B,) and top (values, ids)
        (B, n) when asked for (else None)."""
        p = self.params
        logits = logits.float()  # (B, V), a fresh copy unless the model already runs in fp32
        lp = top = None
        if p.logprobs:
            logp = torch.log_softmax(logits, dim=-1)  # before penalties and filters: the model's own
            if p.top_logprobs:
                top = logp.topk(p.top_logprobs, dim=-1)
        if banned is not None:
            logits[banned] = float("-inf")
        logits = process_logits(logits, p, self.counts, self.seen)
        if self.noise is None:
            tok = logits.argmax(-1)
        else:
            probs = logits.softmax(-1)
            tok = probs.div_(self.noise.exponential_(generator=self.gen)).argmax(-1)
        if p.logprobs:
            lp = logp.gather(-1, tok[:, None])[:, 0]
        return tok, lp, top

    def update(self, tok):
        """Count the tokens just chosen (B,)."""
        if self.counts is not None:
            self.counts.scatter_add_(1, tok[:, None], torch.ones_like(tok[:, None], dtype=self.counts.dtype))
        if self.seen is not None:
            self.seen.scatter_(1, tok[:, None], True)

    def reorder(self, idx):
        """Beam search: rows follow their parent beams."""
        if self.counts is not None:
            self.counts.copy_(self.counts[idx])
        if self.seen is not None:
            self.seen.copy_(self.seen[idx])


# ---- model steps -----------------------------------------------------------------------------------------
def _static_step(model, cache, token, position_ids, index):
    """A decode step with static shapes (every row at slot `index` (1,), attention over the whole cache,
    masked), the function `torch.compile` sees: the model and cache as arguments, so a new cache of
    the same shape reuses the compiled code."""
    return model.step(token, position_ids, cache, index.expand(token.shape[0], 1))[:, -1]  # (B, V)


_compiled_step = None


def decode_one(model, cache, token, position_ids, index, compile: bool = False, plan=None):
    """Feed token (B, 1) at position_ids (B, 2, 1) into cache slot `index` (a (1,) long tensor equal
    to cache.length) and return the next logits (B, V). `compile`: through `torch.compile` (the first
    call per model and cache shape compiles). Otherwise `GLM.step` over the slots written so far (one
    native call for a few CPU rows where it applies; `plan`: fused.decode_plan(model), got once per loop)."""
    global _compiled_step
    if compile:
        if _compiled_step is None:
            _compiled_step = torch.compile(_static_step, fullgraph=True, dynamic=False)
        logits = _compiled_step(model, cache, token, position_ids, index)
    else:
        slots = index.expand(token.shape[0], 1)
        logits = model.step(token, position_ids, cache, slots, extent=cache.length + 1, plan=plan)[:, -1]
    cache.length += 1
    return logits


def _device(model):
    return model.embed.weight.device


def _check_prompts(model, prompts, extra: int):
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    out = []
    for n, p in enumerate(prompts):
        if isinstance(p, int):
            raise ValueError("prompts must be a list of token-id lists; wrap a single prompt as [ids]")
        p = [int(i) for i in p]
        if not p:
            raise ValueError(f"prompt {n} is empty; give at least one token (e.g. the bos / [gMASK]<sop> prefix)")
        V = model.cfg.vocab_size
        if min(p) < 0 or max(p) >= V:
            raise ValueError(f"prompt {n} has token ids outside 0..{V - 1}: min {min(p)}, max {max(p)}")
        out.append(p)
    T = max(map(len, out))
    if model.cfg.position == "learned_2d" and T + extra > model.cfg.max_seq_len:
        raise ValueError(f"{T} prompt + {extra} new tokens exceed this model's {model.cfg.max_seq_len} learned positions; "
                         "shorten the prompt or lower max_new_tokens")
    return out


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


def _ngram_bans(histories, n: int):
    """(rows, ids) of tokens that would repeat an n-gram of each row's history, or None."""
    rows, ids = [], []
    for b, h in enumerate(histories):
        if n == 1:
            banned = set(h)
        elif len(h) >= n:
            prefix = tuple(h[len(h) - n + 1 :])
            banned = {h[i + n - 1] for i in range(len(h) - n + 1) if tuple(h[i : i + n - 1]) == prefix}
        else:
            continue
        rows += [b] * len(banned)
        ids += sorted(banned)
    return (torch.tensor(rows), torch.tensor(ids)) if rows else None


# ---- the decode loop ------------------------------------------------------------------------------------
class _Row:
    """Host-side state of one sequence in the loop."""

    def __init__(self, tokenizer, params: SamplingParams, stops=None):
        self.ids: list[int] = []
        self.host = False  # whether the loop fed ids / text token by token
        self.end = None  # number of generated tokens that belong to the output
        self.finish = self.stop_reason = None
        stops = params.stop if stops is None else stops
        self.text = StopText(tokenizer, stops, params.skip_special_tokens) if tokenizer is not None else None


def _decode_loop(model, cache, logits, position, delta, params, sampler, rows, stop_ids, *, compile, stream, feed_last=False):
    """Sample up to params.max_new_tokens tokens for each row after `logits` (B, V).

    position (B, 2, 1): position and block position of the first token to feed; `delta` (1, 2, 1)
    is added after each step ([1, 0]: causal positions; [0, 1]: GLM block positions). Yields lists
    of Chunks when `stream`; returns the rows, finished. `feed_last`: also write the last token of a
    row that ran out of tokens into the cache (fill: later blanks must see the whole span).
    """
    B, N, dev = len(rows), params.max_new_tokens, logits.device
    index = torch.tensor([cache.length], device=dev)
    token = torch.empty(B, 1, dtype=torch.long, device=dev)
    out = torch.empty(B, N, dtype=torch.long, device=dev)
    out_lp = torch.empty(B, N, device=dev) if params.logprobs else None
    n_top = params.top_logprobs
    top_v = torch.empty(B, N, n_top, device=dev) if n_top else None
    top_i = torch.empty(B, N, n_top, dtype=torch.long, device=dev) if n_top else None
    stop_set = set(stop_ids)
    # tokens come to the host each step only when something there needs them
    host = bool(stream or stop_set or params.stop or params.no_repeat_ngram_size)
    steps = 0
    plan = None if compile else fused.decode_plan(model)  # the model does not change during the loop
    for step in range(N):
        banned = _ngram_bans([r.ids for r in rows], params.no_repeat_ngram_size) if params.no_repeat_ngram_size else None
        tok, lp, top = sampler(logits, banned)  # (B,)
        out[:, step] = tok
        if lp is not None:
            out_lp[:, step] = lp
        if top is not None:
            top_v[:, step], top_i[:, step] = top
        sampler.update(tok)
        steps = step + 1
        if host:
            toks = tok.tolist()  # the one host sync of the step, for the whole batch
            step_lp = out_lp[:, step].tolist() if stream and params.logprobs else None
            chunks = []
            for b, (row, t) in enumerate(zip(rows, toks)):
                if row.finish is not None:
                    continue
                chunk = Chunk(b, [t])
                if t in stop_set:
                    row.finish, row.stop_reason, row.end, chunk.token_ids = "stop", t, step, []
                else:
                    row.ids.append(t)
                    if row.text is not None:
                        chunk.text = row.text.add(t)
                        if row.text.matched is not None:
                            row.finish, row.stop_reason, row.end = "stop", row.text.matched, step + 1
                    if row.finish is None and step == N - 1:
                        row.finish, row.end = "length", N
                if row.finish is not None and row.text is not None:
                    chunk.text += row.text.close()
                chunk.finish_reason = row.finish
                if step_lp is not None and chunk.token_ids:
                    chunk.logprobs = [step_lp[b]]
                    if n_top:
                        chunk.top_logprobs = [dict(zip(top_i[b, step].tolist(), top_v[b, step].tolist()))]
                chunks.append(chunk)
            if stream and chunks:
                yield chunks
            if all(r.finish is not None for r in rows):
                break
        if step == N - 1:
            break
        token.copy_(tok[:, None])
        logits = decode_one(model, cache, token, position, index, compile, plan)
        position.add_(delta)
        index.add_(1)

    if feed_last and steps == N and any(r.finish == "length" or r.finish is None for r in rows):
        token.copy_(out[:, N - 1 : N])
        decode_one(model, cache, token, position, index, compile, plan)

    out_ids = out[:, :steps].tolist()  # one read-back at the end
    lps = out_lp[:, :steps].tolist() if out_lp is not None else None
    tops = (top_i[:, :steps].tolist(), top_v[:, :steps].tolist()) if n_top else None
    for b, row in enumerate(rows):
        row.host = host
        if row.finish is None:  # the loop ran without host checks
            row.finish, row.end = "length", steps
            row.ids = out_ids[b][:steps]
        row.logprobs = lps[b][: row.end] if lps is not None else None
        row.top_logprobs = [dict(zip(i, v)) for i, v in zip(tops[0][b][: row.end], tops[1][b][: row.end])] if tops else None
    return rows


def _completion(row: _Row, tokenizer, params, prompt_tokens=0) -> Completion:
    text = None
    if row.text is not None:  # grown token by token when the loop ran host checks, else decoded once here
        text = row.text.text if row.host else tokenizer.decode(row.ids, skip_special_tokens=params.skip_special_tokens)
    return Completion(row.ids, row.finish, row.stop_reason, text, row.logprobs, row.top_logprobs, None, prompt_tokens)


def _left_pad(prompts, device):
    B, T = len(prompts), max(map(len, prompts))
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.tensor(p)
        mask[b, T - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _run_batch(model, prompts, params: SamplingParams, tokenizer, compile, stream):
    if params.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer: pass tokenizer=... (or use stop_ids)")
    prompts = _check_prompts(model, prompts, params.max_new_tokens)
    dev = _device(model)
    B, T = len(prompts), max(map(len, prompts))
    ids, mask = _left_pad(prompts, dev)  # (B, T)
    cache = model.new_cache(B, T + params.max_new_tokens)
    logits = model.prefill(ids, cache, attention_mask=mask, last_only=True)[:, -1]  # (B, V): every row ends at T-1
    position = torch.zeros(B, 2, 1, dtype=torch.long, device=dev)
    position[:, 0, 0] = mask.sum(-1)  # the next token's position: each row's own length
    delta = torch.tensor([[[1], [0]]], device=dev)
    sampler = Sampler(params, B, logits.shape[-1], dev, ids, mask)
    rows = [_Row(tokenizer, params) for _ in prompts]
    rows = yield from _decode_loop(model, cache, logits, position, delta, params, sampler, rows, params.stop_ids,
                                   compile=compile, stream=stream)
    return [_completion(r, tokenizer, params, len(p)) for r, p in zip(rows, prompts)]


def _drain(gen):
    while True:
        try:
            next(gen)
        except StopIteration as e:
            return e.value


@torch.inference_mode()
def generate(model, prompt_ids_list, params: SamplingParams | None = None, tokenizer=None, *, compile: bool = False) -> list[Completion]:
    """Continue each prompt (a list of token ids) causally; one left-padded batch, one prefill.

    Returns one Completion per prompt: token ids (without a final stop id), finish reason, stop
    reason, text (with `tokenizer`; cut at stop strings), logprobs. Greedy output of a batch equals
    that of each prompt alone. `num_beams` > 1 runs `beam_search` on each prompt instead.
    Prompts are read causally (sep = 0); to generate the GLM way after a bidirectional prompt, put a
    [gMASK] at its end and use `fill`. `compile`: run the decode step through torch.compile.
    """
    params = params or SamplingParams()
    if params.num_beams > 1:
        return [beam_search(model, p, params, tokenizer, compile=compile)[0] for p in prompt_ids_list]
    return _drain(_run_batch(model, prompt_ids_list, params, tokenizer, compile, stream=False))


def stream(model, prompt_ids_list, params: SamplingParams | None = None, tokenizer=None, *, compile: bool = False) -> Iterator[Chunk]:
    """As `generate`, yielding a Chunk per sequence per step as tokens come (token ids, safe text,
    logprobs); the last chunk of each sequence carries its finish_reason. Beam search cannot stream."""
    params = params or SamplingParams()
    if params.num_beams > 1:
        raise ValueError("beam search cannot stream: the best beam is known only at the end; use generate()")
    gen = _run_batch(model, prompt_ids_list, params, tokenizer, compile, stream=True)
    while True:
        with torch.inference_mode():  # only while we run: the consumer's code between chunks stays outside
            try:
                chunks = next(gen)
            except StopIteration:
                return
        yield from chunks


# ---- beam search -------------------------------------------------------------------------------------
@torch.inference_mode()
def beam_search(model, prompt_ids, params: SamplingParams, tokenizer=None, *, n_best: int = 1, compile: bool = False) -> list[Completion]:
    """Beam search for one prompt (seq2seq use: the prompt is the source). Returns the `n_best`
    hypotheses, best first, each with its `score` (sum of log-probabilities / length**length_penalty).

    Each step expands every beam by every token (log-softmax of the penalized logits, n-grams
    banned), keeps the 2W best candidates, moves those ending in a stop id (if ranked within the
    first W) to the finished list and continues with the W best others, as HF does. It stops when W
    hypotheses are finished and the best live beam cannot beat the worst of them at its current
    length (HF's `early_stopping=False` heuristic), or after max_new_tokens (live beams then finish
    with reason "length"). The cache is prefilled once and copied to the W beams.
    """
    (prompt,) = _check_prompts(model, [prompt_ids], params.max_new_tokens)
    W, N, lp_pow = params.num_beams, params.max_new_tokens, params.length_penalty
    dev = _device(model)
    T = len(prompt)
    cache = model.new_cache(W, T + N)
    logits = model.prefill(torch.tensor([prompt], device=dev), cache, last_only=True)[:, -1]  # (1, V): row 0
    cache.copy_rows(slice(1, None), cache, slice(0, 1), T)  # the prompt's keys to the other beams
    V = logits.shape[-1]
    logits = logits.expand(W, V)
    prompt_t = torch.tensor([prompt], device=dev).expand(W, T)
    sampler = Sampler(dataclasses.replace(params, temperature=0.0), W, V, dev, prompt_t, torch.ones_like(prompt_t))
    scores = [0.0] + [float("-inf")] * (W - 1)  # all beams start equal: keep only the first alive
    hist: list[list[int]] = [[] for _ in range(W)]
    plan = None if compile else fused.decode_plan(model)
    lps: list[list[float]] = [[] for _ in range(W)]
    finished: list[tuple[float, list[int], list[float], str, int | None]] = []
    stop_set = set(params.stop_ids)
    index = torch.tensor([cache.length], device=dev)
    position = torch.tensor([[[T], [0]]], device=dev).repeat(W, 1, 1)  # (W, 2, 1)
    token = torch.empty(W, 1, dtype=torch.long, device=dev)
    cur = 0
    for step in range(N):
        x = logits.float().clone()  # (W, V)
        if params.no_repeat_ngram_size:
            banned = _ngram_bans(hist, params.no_repeat_ngram_size)
            if banned is not None:
                x[banned] = float("-inf")
        apply_penalties(x, params, sampler.counts, sampler.seen)
        logp = torch.log_softmax(x, dim=-1)
        cand = torch.tensor(scores, device=dev)[:, None] + logp  # (W, V)
        top_s, top_i = cand.flatten().topk(min(2 * W, W * V))
        top_s, top_i = top_s.tolist(), top_i.tolist()  # one host sync per step
        cur = step + 1
        keep = []  # (parent beam, token, score)
        for rank, (s, i) in enumerate(zip(top_s, top_i)):
            if s == float("-inf"):
                break
            w, t = divmod(i, V)
            if t in stop_set:
                if rank < W:
                    finished.append((s / cur**lp_pow, hist[w], lps[w] + [s - scores[w]], "stop", t))
                continue
            keep.append((w, t, s))
            if len(keep) == W:
                break
        if not keep:
            break
        if len(finished) >= W:
            worst = sorted(f[0] for f in finished)[-W]
            if keep[0][2] / cur**lp_pow <= worst:
                keep = []
                break
        if step == N - 1:
            break
        while len(keep) < W:  # fewer live candidates than beams (tiny vocabularies): pad with dead beams
            keep.append((keep[0][0], keep[0][1], float("-inf")))
        parents = [w for w, _, _ in keep]
        hist = [hist[w] + [t] for w, t, _ in keep]
        lps = [lps[w] + [s - scores[w]] for w, _, s in keep]
        scores = [s for _, _, s in keep]
        idx = torch.tensor(parents, device=dev)
        cache.copy_rows(slice(None), cache, idx, cache.length)  # reorder the beams' histories
        sampler.reorder(idx)
        token.copy_(torch.tensor([[t] for _, t, _ in keep], device=dev))
        sampler.update(token[:, 0])
        logits = decode_one(model, cache, token, position, index, compile, plan)
        position[:, 0] += 1
        index.add_(1)
    for w, t, s in keep:  # ran out of tokens: the live beams finish by length
        if s > float("-inf"):
            finished.append((s / cur**lp_pow, hist[w] + [t], lps[w] + [s - scores[w]], "length", None))
    finished.sort(key=lambda f: -f[0])
    outs = []
    for score, ids, lp, reason, stop in finished[:n_best]:
        text = tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens) if tokenizer is not None else None
        outs.append(Completion(ids, reason, stop, text, lp if params.logprobs else None, None, score, T))
    return outs


# ---- GLM blank filling --------------------------------------------------------------------------------
@dataclass
class Span:
    """One filled blank: which mask, the generated text and ids, and where it starts in the result."""

    mask: str  # "[MASK]" | "[sMASK]" | "[gMASK]"
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (<eop> or a stop) | "length"
    start: int = 0  # character offset of the span in FillResult.text


@dataclass
class FillResult:
    text: str
    spans: list[Span] = field(default_factory=list)


def _require_prefix_lm(model, what: str):
    if not model.cfg.prefix_lm:
        raise ValueError(f"{what} needs a model trained with GLM's blank-infilling objective; this one is causal "
                         "(rope_partial, GLM-4 family, which ignores block positions). Use generate() / chat(), or "
                         "infill(), which falls back to continuing the prefix")


@torch.inference_mode()
def _fill_ids(model, tokenizer, pieces: list[list[int]], marks: list[str], params: SamplingParams, compile: bool) -> list[Span]:
    """Part A = pieces[0] marks[0] pieces[1] marks[1] ... pieces[-1] (marks: "[MASK]" etc., taken
    from the tokenizer by name); fill each blank left to right."""
    masks = [tokenizer.special(MASK_STRINGS[m]) for m in marks]
    part_a, mask_pos = [], []
    for i, m in enumerate(masks):
        part_a += pieces[i]
        mask_pos.append(len(part_a))
        part_a.append(m)
    part_a += pieces[-1]
    k, N = len(masks), params.max_new_tokens
    if model.cfg.position == "learned_2d" and max(len(part_a), N + 2) > model.cfg.max_seq_len:
        raise ValueError(f"the text ({len(part_a)} tokens) or max_new_tokens={N} exceeds the model's {model.cfg.max_seq_len} positions")
    dev = _device(model)
    sop, eop = tokenizer.special("sop"), tokenizer.special("eop")
    stop_ids = (eop, *params.stop_ids)
    try:
        stop_ids += (tokenizer.special("eos"),)  # spans never contain a document end
    except KeyError:
        pass
    cache = model.new_cache(1, len(part_a) + k * (N + 1))
    A = len(part_a)
    ids = torch.tensor([part_a], device=dev)
    pos = torch.stack((torch.arange(A, device=dev), torch.zeros(A, dtype=torch.long, device=dev)))[None]  # (1, 2, A)
    model.prefill(ids, cache, position_ids=pos, sep=A, last_only=True)  # Part A, read bidirectionally (logits unused)
    sampler = Sampler(params, 1, model.cfg.vocab_size, dev, ids, torch.ones_like(ids))
    spans = []
    for mark, p in zip(marks, mask_pos):
        start = torch.tensor([[[p], [1]]], device=dev)  # <sop> at the mask's position, block position 1
        logits = model.prefill(torch.tensor([[sop]], device=dev), cache, position_ids=start)[:, -1]  # (1, V)
        position = torch.tensor([[[p], [2]]], device=dev)
        delta = torch.tensor([[[0], [1]]], device=dev)
        rows = _drain(_decode_loop(model, cache, logits, position, delta, params, sampler, [_Row(tokenizer, params)],
                                   stop_ids, compile=compile, stream=False, feed_last=True))
        c = _completion(rows[0], tokenizer, params)
        spans.append(Span(mark, c.text, c.token_ids, c.finish_reason))
    return spans


def _assemble_text(texts: list[str], spans: list[Span]) -> FillResult:
    out = texts[0]
    for span, t in zip(spans, texts[1:]):
        span.start = len(out)
        out += span.text + t
    return FillResult(out, spans)


def fill(model, tokenizer, text: str, params: SamplingParams | None = None, *, compile: bool = False) -> FillResult:
    """Fill every "[MASK]", "[sMASK]" and "[gMASK]" in `text`, left to right (GLM blank infilling).

    The text is split on the literal mask strings, the pieces encoded as plain text and the masks
    taken from the tokenizer by name. Part A (the text with its masks) is prefilled once and read
    bidirectionally (sep = len(Part A)); each blank is then `<sop>` at its mask's position with
    block position 1, decoded at that position with block positions 2, 3, ... until `<eop>` (or a
    stop, or max_new_tokens per blank). A filled span stays in the cache, so later blanks see it:
    Part B spans attend causally to earlier ones, as in training. Needs a model trained with the
    GLM objective (not GLM-4). Returns the filled text and the spans.
    """
    params = params or SamplingParams()
    _require_prefix_lm(model, "fill")
    parts = re.split(r"(\[MASK\]|\[sMASK\]|\[gMASK\])", text)
    texts, marks = parts[0::2], parts[1::2]
    if not marks:
        raise ValueError(f"no [MASK], [sMASK] or [gMASK] in {text[:60]!r}: mark each blank to fill with one of them")
    pieces = [tokenizer.encode(t) if t else [] for t in texts]
    return _assemble_text(texts, _fill_ids(model, tokenizer, pieces, marks, params, compile))


def infill(model, tokenizer, prefix: str, suffix: str, params: SamplingParams | None = None, *,
           mask: str = "[MASK]", compile: bool = False) -> FillResult:
    """Code fill-in-the-middle: the text that goes between `prefix` and `suffix`.

    Prefix-LM models (learned_2d, rope_2d: trained with GLM's objective): Part A = prefix `mask`
    suffix and the single blank is filled as in `fill` (the model sees the suffix). `mask` defaults
    to [MASK], whose training spans are short (Poisson(3), up to 39 tokens); pass "[gMASK]" for long
    middles. Mask-like strings inside prefix / suffix stay plain text.

    Causal models (rope_partial, GLM-4, which has no FIM tokens): the model cannot see the suffix,
    so this continues the prefix and stops where the suffix is likely to begin. If the suffix
    continues the current line (its first line is not blank), the middle is taken to end with the
    line: stop at "\\n" and at that line's text. Otherwise stop at the suffix's first non-blank line
    (leading whitespace dropped). Your own `params.stop` strings apply too. It is a heuristic.
    """
    params = params or SamplingParams()
    if mask not in MASK_STRINGS:
        raise ValueError(f"mask={mask!r}: choose one of {list(MASK_STRINGS)}")
    if model.cfg.prefix_lm:
        pieces = [tokenizer.encode(prefix), tokenizer.encode(suffix)]
        spans = _fill_ids(model, tokenizer, pieces, [mask], params, compile)
        return _assemble_text([prefix, suffix], spans)
    p = dataclasses.replace(params, stop=tuple(params.stop) + causal_infill_stops(suffix))
    try:
        p = dataclasses.replace(p, stop_ids=p.stop_ids + (tokenizer.special("eos"),))
    except KeyError:
        pass
    (c,) = generate(model, [tokenizer.encode(prefix)], p, tokenizer, compile=compile)
    return _assemble_text([prefix, suffix], [Span(mask, c.text, c.token_ids, c.finish_reason)])


def causal_infill_stops(suffix: str) -> tuple[str, ...]:
    """Where a causal model's continuation of the prefix should end, judged from the suffix alone:
    a suffix that continues the current line (its first line is not blank) means the middle ends
    within the line ("\\n", or the start of that line's text); otherwise the middle runs until the
    suffix's first non-blank line would begin (that line, leading whitespace dropped)."""
    first = suffix.partition("\n")[0].strip()
    if first:
        return ("\n", first)
    rest = [ln.strip() for ln in suffix.split("\n") if ln.strip()]
    return tuple(rest[:1])


# ---- chat --------------------------------------------------------------------------------------------
def _chat_params(tokenizer, params: SamplingParams | None) -> SamplingParams:
    params = params or SamplingParams()
    return dataclasses.replace(params, stop_ids=tuple(params.stop_ids) + tuple(tokenizer.chat_stop_ids()))


def chat(model, tokenizer, messages: list[dict], params: SamplingParams | None = None, *, compile: bool = False) -> Completion:
    """The assistant's next reply to `messages` ([{"role": "system"|"user"|"assistant"|"observation",
    "content": str}, ...]), rendered by `tokenizer.render_chat(..., add_generation_prompt=True)` and
    stopped at `tokenizer.chat_stop_ids()` (end of text, next user / observation turn). The
    template puts a newline after `<|assistant|>`; one leading newline is dropped from `text`."""
    ids, _ = tokenizer.render_chat(messages, add_generation_prompt=True)
    (c,) = generate(model, [ids], _chat_params(tokenizer, params), tokenizer, compile=compile)
    if c.text and c.text.startswith("\n"):
        c.text = c.text[1:]
    return c


def chat_stream(model, tokenizer, messages: list[dict], params: SamplingParams | None = None, *, compile: bool = False) -> Iterator[str]:
    """As `chat`, yielding the reply's text as it comes: whole characters only (the incremental
    decoder holds back partial UTF-8), never the start of a stop string."""
    ids, _ = tokenizer.render_chat(messages, add_generation_prompt=True)
    started = False
    for chunk in stream(model, [ids], _chat_params(tokenizer, params), tokenizer, compile=compile):
        t = chunk.text
        if not started and t:
            t, started = (t[1:] if t.startswith("\n") else t), True
        if t:
            yield t


# ---- command line ------------------------------------------------------------------------------------
def add_sampling_args(p: argparse.ArgumentParser, temperature: float = 1.0, max_new_tokens: int = 128):
    d = SamplingParams()
    p.add_argument("--model", default=None, help="checkpoint directory (with tokenizer.json) or preset; "
                   "default: the embedded default model")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or file (default: the model's directory)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps|xpu|npu|mlu|musa (default auto)")
    p.add_argument("--dtype", default="auto", help="auto|fp32|bf16|fp16 (default auto: bf16 on GPUs, fp32 on CPU)")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    g.add_argument("--top-k", type=int, default=d.top_k, help="0 = off")
    g.add_argument("--top-p", type=float, default=d.top_p, help="1 = off")
    g.add_argument("--min-p", type=float, default=d.min_p, help="0 = off")
    g.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    g.add_argument("--presence-penalty", type=float, default=d.presence_penalty)
    g.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--length-penalty", type=float, default=d.length_penalty)
    g.add_argument("--no-repeat-ngram-size", type=int, default=0)
    g.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile")


def params_from_args(a, stop_ids=()) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
        repetition_penalty=a.repetition_penalty, presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty, seed=a.seed, stop=tuple(a.stop), stop_ids=tuple(stop_ids),
        num_beams=a.num_beams, length_penalty=a.length_penalty, no_repeat_ngram_size=a.no_repeat_ngram_size,
    )


def load_for_cli(a, command: str):
    """(model, tokenizer) from --model / --device / --dtype; prints the resolved device and dtype once."""
    from pathlib import Path

    from .config import PRESETS
    from .convert import load
    from .devices import resolve_device, resolve_dtype
    from .tokenizer import load_tokenizer

    if a.model is None:  # the embedded default model (a clear error if this install has none)
        from .convert import default_model_path

        a.model = str(default_model_path())
    preset = a.model in PRESETS and not Path(a.model).exists()
    if preset and a.tokenizer is None:
        raise ValueError(f"--model {a.model} is a preset (random weights) and ships no tokenizer; pass --tokenizer PATH, "
                         "or a checkpoint directory (config.json, weights, tokenizer.json) as --model")
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    tokenizer = load_tokenizer(a.tokenizer or a.model)
    print(f"glmkit {command}: device {device}, dtype {str(dtype).removeprefix('torch.')}", file=sys.stderr)
    model = load(a.model, device=device, dtype=dtype).eval()
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.cfg.vocab_size} "
                         "embeddings; they do not belong together")
    return model, tokenizer


def _eos_ids(tokenizer) -> tuple[int, ...]:
    try:
        return (tokenizer.special("eos"),)
    except KeyError:
        return ()


def fill_main(argv=None) -> int:
    """`glmkit fill TEXT`: fill the [MASK] / [sMASK] / [gMASK] blanks of TEXT."""
    p = argparse.ArgumentParser(prog="glmkit fill", description="Fill the [MASK], [sMASK] and [gMASK] blanks of a text, left to right.")
    p.add_argument("text", help='e.g. "床前明月光，[MASK]。"')
    add_sampling_args(p, temperature=0.0, max_new_tokens=64)
    a = p.parse_args(argv)
    params = params_from_args(a)  # validate flags before loading anything
    model, tok = load_for_cli(a, "fill")
    res = fill(model, tok, a.text, params, compile=a.compile)
    print(res.text)
    for s in res.spans:
        print(f"  {s.mask} -> {s.text!r} ({s.finish_reason})", file=sys.stderr)
    return 0


def generate_main(argv=None) -> int:
    """`glmkit generate --prompt TEXT`: continue a prompt, streaming the text."""
    p = argparse.ArgumentParser(prog="glmkit generate", description="Continue a prompt (causal generation), streaming the text.")
    p.add_argument("--prompt", required=True)
    p.add_argument("--special", action="store_true", help="read special-token strings in the prompt (e.g. [gMASK]<sop>) as tokens")
    add_sampling_args(p)
    a = p.parse_args(argv)
    params_from_args(a)
    model, tok = load_for_cli(a, "generate")
    params = params_from_args(a, _eos_ids(tok))
    ids = tok.encode(a.prompt, allow_special=a.special)
    t0, n, reason = time.perf_counter(), 0, None
    if params.num_beams > 1:
        (c,) = generate(model, [ids], params, tok, compile=a.compile)
        print(c.text)
        n, reason = len(c.token_ids), c.finish_reason
    else:
        for chunk in stream(model, [ids], params, tok, compile=a.compile):
            print(chunk.text, end="", flush=True)
            n += len(chunk.token_ids)
            reason = chunk.finish_reason or reason
        print()
    dt = time.perf_counter() - t0
    print(f"[{reason}: {n} tokens in {dt:.2f} s, {n / dt:.1f} tok/s]", file=sys.stderr)
    return 0


def chat_main(argv=None, stdin=None, stdout=None) -> int:
    """`glmkit chat`: interactive chat over stdin, streaming replies; /reset clears, /exit quits."""
    p = argparse.ArgumentParser(prog="glmkit chat", description="Chat on stdin; /reset clears the history, /exit (or end of input) quits.")
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(p, max_new_tokens=512)
    a = p.parse_args(argv)
    params = params_from_args(a)
    if params.num_beams > 1:
        raise ValueError("glmkit chat streams its replies; beam search cannot stream (drop --num-beams)")
    model, tok = load_for_cli(a, "chat")
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    start = [{"role": "system", "content": a.system}] if a.system else []
    history = list(start)
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = list(start)
            stdout.write("(history cleared)\n")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        for piece in chat_stream(model, tok, history, params, compile=a.compile):
            stdout.write(piece)
            stdout.flush()
            reply += piece
        stdout.write("\n")
        history.append({"role": "assistant", "content": reply})
    return 0
