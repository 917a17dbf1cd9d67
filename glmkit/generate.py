"""Generation over the static KV cache: the decode loop, stop conditions, beam search, GLM blank filling, chat.

    from glmkit.generate import generate, stream, fill, infill, chat
    from glmkit.sampling import SamplingParams
    params = SamplingParams(max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0, stop=["\\n\\n"])
    outs = generate(model, [ids_a, ids_b], params, tokenizer=tok)   # left-padded batch, one prefill
    outs[0].token_ids, outs[0].text, outs[0].finish_reason          # "stop" | "length"
    for chunk in stream(model, [ids], params, tokenizer=tok): print(chunk.text, end="")
    fill(model, tok, "床前明月光，[MASK]。", SamplingParams(temperature=0)).text
    fill(model, tok, '{"day": "[MASK]"}', blanks=[Blank.of(regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}")])  # typed blanks
    chat(model, tok, [{"role": "user", "content": "你好"}], params).text

    glmkit fill "床前明月光，[MASK]。" --model DIR
    glmkit generate --model DIR --prompt "..."      glmkit chat --model DIR

Everything below the public functions works on token ids and tensors; text appears only where a
tokenizer is passed (stop strings, `text`, `fill`, `chat`). Based on gpt-fast's `generate.py`
(preallocated cache, one small decode step that compiles on its own) and nanochat's engine (token
ids in, token ids out).

One step of the loop: `sampling.Sampler` turns logits (B, V) into tokens (B,) on the device (the
sampler the engine uses too), `decode_one` runs `GLM.step` on them (over the slots written so far;
compiled: with static shapes, over the whole cache, masked), and once per step, for the whole
batch, the tokens come to the host, only when a stop id, a stop string, a no-repeat n-gram or a
stream needs them. Without any of those the loop never syncs and reads the tokens back at the end.

GLM's blank filling (Du et al. 2022, §2.1-2.3) reads the text with its mask tokens (Part A)
bidirectionally and generates each blank as `<sop> span` at the mask's position with block
positions 1, 2, 3, ... until `<eop>`: exactly the layout `infill.assemble` trains on.

Letters in shape comments: B batch, T prompt length, S cache length, V vocabulary, W beams, N new tokens.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from . import fused
from .chat import chat_format
from .constrain import Constraint, ConstraintVocab
from .errors import ContextLengthError, ParameterError
from .infill import SPAN_STEP, blank_prompt
from .sampling import Sampler, SamplingParams, StopText, check_constrainable, eos_ids, ngram_bans
from .tools import GLM45, make_parser

MASK_STRINGS = {"[MASK]": "mask", "[sMASK]": "smask", "[gMASK]": "gmask"}  # literal text -> tokenizer role


# ---- results ------------------------------------------------------------------------------------------
@dataclass
class Completion:
    """One generated sequence. `text` only when a tokenizer was given (cut at a stop string)."""

    token_ids: list[int]
    finish_reason: str  # "stop" (stop id, stop string, or <eop> in fill) | "length" | "error" (a constraint failed)
    stop_reason: int | str | None = None  # the stop id or stop string that ended it
    text: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    score: float | None = None  # beam search: sum of log-probabilities / length**length_penalty
    prompt_tokens: int = 0
    error: str | None = None  # why, when finish_reason is "error"


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
        raise ContextLengthError(f"{T} prompt + {extra} new tokens exceed this model's {model.cfg.max_seq_len} learned positions; "
                                 "shorten the prompt or lower max_new_tokens")
    return out


# ---- the decode loop ------------------------------------------------------------------------------------
class _Row:
    """Host-side state of one sequence in the loop."""

    def __init__(self, tokenizer, params: SamplingParams, stops=None):
        self.ids: list[int] = []
        self.host = False  # whether the loop fed ids / text token by token
        self.end = None  # number of generated tokens that belong to the output
        self.finish = self.stop_reason = self.error = None
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
    # tokens come to the host each step only when something there needs them (a constraint's matcher does)
    host = bool(stream or stop_set or params.stop or params.no_repeat_ngram_size or sampler.constrained)
    steps = 0
    plan = None if compile else fused.decode_plan(model)  # the model does not change during the loop
    for step in range(N):
        banned = ngram_bans([r.ids for r in rows], [params.no_repeat_ngram_size] * B)  # None when off
        tok, lp, top, finite = sampler(logits, banned)  # (B,)
        out[:, step] = tok
        if lp is not None:
            out_lp[:, step] = lp
        if top is not None:
            top_v[:, step], top_i[:, step] = top
        errors = list(sampler.errors)  # why a constrained row could not draw (before update feeds its matcher)
        sampler.update(tok)
        steps = step + 1
        if host:
            toks = tok.tolist()  # the one host sync of the step, for the whole batch
            step_lp = out_lp[:, step].tolist() if stream and params.logprobs else None
            ok = finite.tolist() if params.constraint is not None else None  # only a failed constraint empties a row
            chunks = []
            for b, (row, t) in enumerate(zip(rows, toks)):
                if row.finish is not None:
                    continue
                chunk = Chunk(b, [t])
                if ok is not None and not ok[b]:
                    row.finish, row.end, row.error, chunk.token_ids = "error", step, errors[b], []
                elif t in stop_set:
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
    return Completion(row.ids, row.finish, row.stop_reason, text, row.logprobs, row.top_logprobs, None, prompt_tokens,
                      row.error)


def _left_pad(prompts, device):
    B, T = len(prompts), max(map(len, prompts))
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.tensor(p)
        mask[b, T - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _constraint_vocab(model, params: SamplingParams, tokenizer):
    """(params, the ConstraintVocab) for a constrained run: the tokenizer's end of text becomes the stop id
    of params that have none (something must end the sequence once the constraint is complete)."""
    if params.constraint is None:
        return params, None
    if tokenizer is None:
        raise ValueError("a constraint needs the tokenizer (its vocabulary is what the grammar engine masks): "
                         "pass tokenizer=...")
    if not params.stop_ids:
        params = dataclasses.replace(params, stop_ids=eos_ids(tokenizer))
    vocab = ConstraintVocab.of(tokenizer, model.cfg.vocab_size)
    check_constrainable(params, vocab)  # before any model work
    return params, vocab


def _run_batch(model, prompts, params: SamplingParams, tokenizer, compile, stream):
    if params.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer: pass tokenizer=... (or use stop_ids)")
    params, constraint_vocab = _constraint_vocab(model, params, tokenizer)
    prompts = _check_prompts(model, prompts, params.max_new_tokens)
    dev = _device(model)
    B, T = len(prompts), max(map(len, prompts))
    ids, mask = _left_pad(prompts, dev)  # (B, T)
    cache = model.new_cache(B, T + params.max_new_tokens)
    logits = model.prefill(ids, cache, attention_mask=mask, last_only=True)[:, -1]  # (B, V): every row ends at T-1
    position = torch.zeros(B, 2, 1, dtype=torch.long, device=dev)
    position[:, 0, 0] = mask.sum(-1)  # the next token's position: each row's own length
    delta = torch.tensor([[[1], [0]]], device=dev)
    sampler = Sampler.batch(params, prompts, logits.shape[-1], dev, constraint_vocab)
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
    reason, text (with `tokenizer`; cut at stop strings), logprobs. Output of a batch equals that of
    each prompt alone: greedy, or sampled with prompt b seeded params.seed + b. `num_beams` > 1 runs
    `beam_search` on each prompt instead.
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
    sampler = Sampler.batch(params, [prompt] * W, V, dev)  # penalties only: beams rank penalized log-probabilities
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
        banned = ngram_bans(hist, [params.no_repeat_ngram_size] * W)
        logp = torch.log_softmax(sampler.penalized(logits, banned), dim=-1)  # (W, V)
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
        sampler.keep(parents)
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


@dataclass(frozen=True)
class Blank:
    """What one blank may hold (typed blanks): its own `constraint` (a `constrain.Constraint`:
    choices, a regex, a JSON schema), `max_new_tokens` and `stop` strings; None: the fill's params.
    The template around the blanks is never generated, so a constrained form always keeps its shape."""

    constraint: Constraint | None = None
    max_new_tokens: int | None = None
    stop: tuple[str, ...] | None = None

    @classmethod
    def of(cls, choices=None, regex=None, json_schema=None, max_new_tokens=None, stop=None) -> Blank:
        """A Blank from plain values (/v1/fill's and `glmkit fill --blank`'s fields): at most one of
        `choices` (strings), `regex`, `json_schema` (a dict), each checked by the grammar engine now;
        ParameterError naming the field otherwise."""
        given = {k: v for k, v in (("choices", choices), ("regex", regex), ("json_schema", json_schema)) if v is not None}
        if len(given) > 1:
            raise ParameterError(next(iter(given)), f"give at most one of choices, regex, json_schema per blank (got {', '.join(given)})")
        constraint = None
        for field_, value in given.items():
            make = {"choices": Constraint.choice, "regex": Constraint.regex, "json_schema": Constraint.json_schema}[field_]
            try:
                constraint = make(value)
                constraint.check()
            except ValueError as e:
                raise ParameterError(field_, str(e)) from None
        if isinstance(stop, str):
            stop = (stop,)
        return cls(constraint, max_new_tokens, None if stop is None else tuple(stop))


def blank_params(tokenizer, params: SamplingParams, blank: Blank | None, j: int) -> SamplingParams:
    """Blank j's sampling parameters: the fill's, with the blank's own constraint, max_new_tokens and
    stop strings where it gives them; seed + j (as choice j of a request: blanks draw unrelated
    noise); <eop>, the params' stop ids and the end of text as stop ids (a span never contains a
    document end). `fill` and the server's /v1/fill both take each blank's parameters from here."""
    kw = {"stop_ids": (tokenizer.special("eop"), *params.stop_ids, *eos_ids(tokenizer)),
          "seed": None if params.seed is None else params.seed + j}
    if blank is not None:
        if blank.max_new_tokens is not None:
            kw["max_new_tokens"] = blank.max_new_tokens
        if blank.stop is not None:
            kw["stop"] = tuple(blank.stop)
        if blank.constraint is not None:
            kw["constraint"] = blank.constraint
    return dataclasses.replace(params, **kw)


def _require_prefix_lm(model, what: str):
    if not model.cfg.prefix_lm:
        raise ValueError(f"{what} needs a model trained with GLM's blank-infilling objective; this one is causal "
                         "(rope_partial, GLM-4 family, which ignores block positions). Use generate() / chat(), or "
                         "infill(), which falls back to continuing the prefix")


def _check_blanks(blanks, k: int) -> list[Blank | None]:
    blanks = list(blanks or ())
    if len(blanks) > k:
        raise ValueError(f"{len(blanks)} blanks given for a text with {k} masks: give at most one per mask, in order")
    if not all(b is None or isinstance(b, Blank) for b in blanks):
        raise ValueError("blanks must be generate.Blank values (or None for an untyped blank)")
    return blanks + [None] * (k - len(blanks))


@torch.inference_mode()
def _fill_ids(model, tokenizer, pieces: list[list[int]], marks: list[str], params: SamplingParams, compile: bool,
              blanks=None) -> list[Span]:
    """Part A = pieces[0] marks[0] pieces[1] marks[1] ... pieces[-1] (marks: "[MASK]" etc., taken
    from the tokenizer by name; `infill.blank_prompt` lays it out); fill each blank left to right,
    blank j with `blank_params(..., blanks[j], j)` and a sampler of its own that has seen blank j's
    prompt (`BlankPrompt.blank`), as the engine serves it. A constraint in `params` types every blank
    that does not give its own."""
    sop = tokenizer.special("sop")
    prompt = blank_prompt(pieces, [tokenizer.special(MASK_STRINGS[m]) for m in marks], sop)
    blanks = _check_blanks(blanks, len(marks))
    bparams = [blank_params(tokenizer, params, b, j) for j, b in enumerate(blanks)]
    vocab = ConstraintVocab.of(tokenizer, model.cfg.vocab_size) if any(p.constraint for p in bparams) else None
    for p in bparams:
        if p.constraint is not None:
            check_constrainable(p, vocab)  # before any model work
    A, N = prompt.sep, max(p.max_new_tokens for p in bparams)
    if model.cfg.position == "learned_2d" and max(A, N + 2) > model.cfg.max_seq_len:
        raise ContextLengthError(f"the text ({A} tokens) or max_new_tokens={N} exceeds the model's {model.cfg.max_seq_len} positions")
    dev = _device(model)
    cache = model.new_cache(1, A + sum(p.max_new_tokens + 1 for p in bparams))
    ids = torch.tensor([prompt.ids[:A]], device=dev)
    pos = torch.tensor(prompt.position_ids, device=dev)[None, :, :A]  # (1, 2, A)
    model.prefill(ids, cache, position_ids=pos, sep=A, last_only=True)  # Part A, read bidirectionally (logits unused)
    spans, filled = [], []
    delta = torch.tensor(SPAN_STEP, device=dev).view(1, 2, 1)
    for j, (mark, p) in enumerate(zip(marks, bparams)):
        seen, _ = prompt.blank(j, filled)  # what the cache holds once <sop> is in: the sampler's input
        sampler = Sampler.batch(p, [seen], model.cfg.vocab_size, dev, vocab)
        before = cache.length
        start = torch.tensor(prompt.span_position(j, 0), device=dev).view(1, 2, 1)  # <sop>
        logits = model.prefill(torch.tensor([[sop]], device=dev), cache, position_ids=start)[:, -1]  # (1, V)
        position = start + delta
        rows = _drain(_decode_loop(model, cache, logits, position, delta, p, sampler, [_Row(tokenizer, p)],
                                   p.stop_ids, compile=compile, stream=False, feed_last=True))
        c = _completion(rows[0], tokenizer, p)
        spans.append(Span(mark, c.text, c.token_ids, c.finish_reason))
        # the span as the cache holds it: all its tokens, but the last one when a stop string ended it
        filled.append(c.token_ids[: cache.length - before - 1])
    return spans


def _assemble_text(texts: list[str], spans: list[Span]) -> FillResult:
    out = texts[0]
    for span, t in zip(spans, texts[1:]):
        span.start = len(out)
        out += span.text + t
    return FillResult(out, spans)


def fill(model, tokenizer, text: str, params: SamplingParams | None = None, *, blanks=None,
         compile: bool = False) -> FillResult:
    """Fill every "[MASK]", "[sMASK]" and "[gMASK]" in `text`, left to right (GLM blank infilling).

    The text is split on the literal mask strings, the pieces encoded as plain text and the masks
    taken from the tokenizer by name. Part A (the text with its masks) is prefilled once and read
    bidirectionally (sep = len(Part A)); each blank is then `<sop>` at its mask's position with
    block position 1, decoded at that position with block positions 2, 3, ... until `<eop>` (or a
    stop, or max_new_tokens per blank). A filled span stays in the cache, so later blanks see it:
    Part B spans attend causally to earlier ones, as in training. Needs a model trained with the
    GLM objective (not GLM-4). Returns the filled text and the spans.

    `blanks`: typed blanks, one `Blank` (or None) per mask in order, fewer for untyped rest: each
    may constrain its span and set its own max_new_tokens and stop strings. Blank j samples with
    seed params.seed + j (`blank_params`), so a seeded fill gives the server's tokens.
    """
    params = params or SamplingParams()
    _require_prefix_lm(model, "fill")
    parts = re.split(r"(\[MASK\]|\[sMASK\]|\[gMASK\])", text)
    texts, marks = parts[0::2], parts[1::2]
    if not marks:
        raise ValueError(f"no [MASK], [sMASK] or [gMASK] in {text[:60]!r}: mark each blank to fill with one of them")
    pieces = [tokenizer.encode(t) if t else [] for t in texts]
    return _assemble_text(texts, _fill_ids(model, tokenizer, pieces, marks, params, compile, blanks))


def infill(model, tokenizer, prefix: str, suffix: str, params: SamplingParams | None = None, *,
           mask: str = "[MASK]", compile: bool = False) -> FillResult:
    """Code fill-in-the-middle: the text that goes between `prefix` and `suffix`.

    Prefix-LM models (learned_2d, rope_2d: trained with GLM's objective): Part A = prefix `mask`
    suffix and the single blank is filled as in `fill` (the model sees the suffix). `mask` defaults
    to [MASK], whose training spans are short (Poisson(3), up to 39 tokens); pass "[gMASK]" for long
    middles. Mask-like strings inside prefix / suffix stay plain text.

    Causal models whose chat format has a code infilling prompt (CodeGeeX4, `chat.CodeGeeX4.infill`)
    read prefix and suffix through it. Other causal models (rope_partial, GLM-4, which has no FIM
    tokens): the model cannot see the suffix,
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
    fmt = chat_format(model.cfg, tokenizer)
    if fmt.infills:  # a causal model with a code infilling prompt (CodeGeeX4) sees the suffix
        p = dataclasses.replace(params, stop_ids=params.stop_ids + tuple(fmt.stop_ids(tokenizer)))
        ids = fmt.infill(tokenizer, tokenizer.encode(prefix), tokenizer.encode(suffix))
        (c,) = generate(model, [ids], p, tokenizer, compile=compile)
        return _assemble_text([prefix, suffix], [Span(mask, c.text, c.token_ids, c.finish_reason)])
    p = dataclasses.replace(params, stop=params.stop + causal_infill_stops(suffix),
                            stop_ids=params.stop_ids + eos_ids(tokenizer))
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
def _chat_prompt(model, tokenizer, messages: list[dict], params: SamplingParams | None):
    """The model's chat format (`chat.chat_format`), the rendered prompt, and params with its stop ids."""
    fmt = chat_format(model.cfg, tokenizer)
    if fmt.blank and not model.cfg.prefix_lm:
        raise ValueError(f"the {fmt.name} chat format needs a model trained with GLM's blank infilling; this one is causal")
    ids, _ = fmt.render(tokenizer, messages, add_generation_prompt=True)
    params = params or SamplingParams()
    params = dataclasses.replace(params, stop_ids=tuple(params.stop_ids) + tuple(fmt.stop_ids(tokenizer)))
    if params.constraint is not None:  # the reply's own first newline stays allowed; GLM-4.7: after </think>
        params = dataclasses.replace(params, constraint=fmt.reply_constraint(params.constraint))
    return fmt, ids, params


def chat(model, tokenizer, messages: list[dict], params: SamplingParams | None = None, *, compile: bool = False) -> Completion:
    """The assistant's next reply to `messages` ([{"role": "system"|"user"|"assistant"|"observation",
    "content": str}, ...]), rendered in the model's chat format (`chat.chat_format(model.cfg)`; GLM-4's
    `tokenizer.render_chat` unless the checkpoint names another) and stopped at that format's stop ids
    (GLM-4: end of text, next user / observation turn). ChatGLM-6B's prompt ends in [gMASK] <sop> and
    is filled as a GLM blank. GLM-4's template puts a newline after `<|assistant|>`; one leading
    newline is dropped from `text`."""
    fmt, ids, p = _chat_prompt(model, tokenizer, messages, params)
    if fmt.blank:
        (span,) = _fill_ids(model, tokenizer, [ids[:-2], []], ["[gMASK]"], p, compile)
        return Completion(span.token_ids, span.finish_reason, text=span.text, prompt_tokens=len(ids))
    (c,) = generate(model, [ids], p, tokenizer, compile=compile)
    if fmt.strip_newline and c.text and c.text.startswith("\n"):
        c.text = c.text[1:]
    if fmt.tools in GLM45:  # GLM-4.5+: the thinking block is not the reply
        c.text = _reply_text(fmt, c.text)
    return c


def _reply_text(fmt, text: str) -> str:
    """A GLM-4.5+ reply without its thinking block (`tools.Glm45Parser`)."""
    p = make_parser(fmt.tools, [])
    return "".join(d["content"] for d in p.feed(text) + p.finish())


def chat_stream(model, tokenizer, messages: list[dict], params: SamplingParams | None = None, *, compile: bool = False) -> Iterator[str]:
    """As `chat`, yielding the reply's text as it comes: whole characters only (the incremental
    decoder holds back partial UTF-8), never the start of a stop string. A blank-filled (ChatGLM-6B)
    reply comes whole."""
    fmt, ids, p = _chat_prompt(model, tokenizer, messages, params)
    if fmt.blank:
        (span,) = _fill_ids(model, tokenizer, [ids[:-2], []], ["[gMASK]"], p, compile)
        if span.text:
            yield span.text
        return
    started = not fmt.strip_newline
    reply = make_parser(fmt.tools, []) if fmt.tools in GLM45 else None  # GLM-4.5+: the thinking block held out
    for chunk in stream(model, [ids], p, tokenizer, compile=compile):
        t = chunk.text
        if not started and t:
            t, started = (t[1:] if t.startswith("\n") else t), True
        if reply is not None and t:
            t = "".join(d["content"] for d in reply.feed(t))
        if t:
            yield t
    rest = "".join(d["content"] for d in reply.finish()) if reply is not None else ""
    if rest:
        yield rest
