"""Blank-infilling examples for GLM pretraining: Part A / Part B, 2D positions, sep, targets.

    from glmkit.infill import InfillConfig, SpecialIds, build_example, collate
    ex, used = build_example(window, seq_len, rng, special, sentence_end, InfillConfig())
    batch = collate([ex, ...], pad_id=special.pad)        # torch tensors for GLM.forward
    logits = model(batch["input_ids"], batch["position_ids"], sep=batch["sep"])
    prompt = blank_prompt([before, after], [special.mask], special.sop)   # what generation fills

Pure functions over numpy arrays: no I/O, no global state, all randomness from the caller's
`np.random.Generator` (same seed, same examples). torch is imported only inside `collate`.

The objective is GLM's autoregressive blank infilling (Du et al., ACL 2022, §2.1-2.3).
Three ways of choosing the blanks, drawn per example from `InfillConfig.mixture`:
  MASK   short spans, lengths ~ Poisson(span_lambda) truncated to 1..max_span, until `coverage`
         of the consumed tokens is masked; placed as in THUDM/GLM `blocklm_utils.sample_spans`.
  sMASK  whole sentences (pieces ending in a `sentence_end` token or at a document end) until
         `coverage` is masked.
  gMASK  one span of gmask_min..gmask_max of one document: a suffix (prefix-LM) or inside it.
Unlike the original code (one document per sample), the input here is a window of a packed token
stream, so every mode also keeps spans inside one document: no span covers or crosses an eos.

Layout of one example (x3 and x5 x6 masked, span 2 first):

    input   x1 x2 [M] x4 [M] sop x5 x6  sop x3
    target   -  -   -  -   -  x5 x6 eop  x3 eop        - = special.pad, no loss
    pos      0  1   2  3   4   4  4  4    2  2
    block    0  0   0  0   0   1  2  3    1  2        sep = 5 = len(Part A)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MODES = ("MASK", "sMASK", "gMASK")


@dataclass
class InfillConfig:
    """How blanks are chosen. Plain values only, so `asdict` / JSON round-trip it.

    Derived in __post_init__ as plain attributes rather than fields (they stay out of `asdict`,
    `==` and the constructor): `mode_probs`, the mixture normalized; `span_cdf`, the CDF of the
    truncated Poisson over lengths 1..max_span.
    """

    mixture: tuple[float, float, float] = (0.5, 0.3, 0.2)  # weights of MASK, sMASK, gMASK
    span_lambda: float = 3.0  # MASK span lengths ~ Poisson(span_lambda) ...
    max_span: int = 39  # ... truncated to 1..max_span (the Poisson conditioned on that range)
    coverage: float = 0.15  # MASK / sMASK: mask at least this fraction of the consumed tokens
    gmask_min: float = 0.5  # gMASK span length as a fraction of its document's length in the window
    gmask_max: float = 1.0
    gmask_suffix_prob: float = 0.5  # gMASK: P(span is the document's suffix); else anywhere inside it
    # A plain causal language model in GLM's format, for comparison with the objective (MODEL_CARD.md): every
    # example is one [gMASK] span over the whole window, documents and their separators alike, so Part A is the
    # mask token alone and each token is predicted from the tokens before it. The mixture is then ignored.
    whole_window: bool = False

    def __post_init__(self):
        m = np.asarray(self.mixture, dtype=np.float64)
        if m.shape != (3,) or (m < 0).any() or m.sum() <= 0:
            raise ValueError(
                f"InfillConfig.mixture={self.mixture!r}: want 3 non-negative weights (MASK, sMASK, gMASK), not all 0"
            )
        if self.span_lambda <= 0 or self.max_span < 1:
            raise ValueError(f"InfillConfig: need span_lambda > 0, max_span >= 1; got {self.span_lambda}, {self.max_span}")
        if not 0 < self.coverage < 1:
            raise ValueError(f"InfillConfig.coverage={self.coverage}: want a fraction in (0, 1)")
        if not 0 < self.gmask_min <= self.gmask_max <= 1:
            raise ValueError(f"InfillConfig: want 0 < gmask_min <= gmask_max <= 1; got {self.gmask_min}, {self.gmask_max}")
        if not 0 <= self.gmask_suffix_prob <= 1:
            raise ValueError(f"InfillConfig.gmask_suffix_prob={self.gmask_suffix_prob}: want a probability")
        self.mode_probs = m / m.sum()
        x = np.arange(1, self.max_span + 1)
        logp = x * math.log(self.span_lambda) - np.array([math.lgamma(i + 1) for i in x])  # Poisson up to e^-lambda
        cdf = np.cumsum(np.exp(logp - logp.max()))
        self.span_cdf = cdf / cdf[-1]


@dataclass
class SpecialIds:
    """Ids of GLM's special tokens, looked up by name in the tokenizer (never hard-coded)."""

    mask: int  # [MASK]
    smask: int  # [sMASK]
    gmask: int  # [gMASK]
    sop: int  # <sop>
    eop: int  # <eop>
    eos: int  # <|endoftext|>: separates documents in a packed stream
    pad: int  # targets where there is no loss, and padding in collate


@dataclass
class Example:
    """One training sequence, length T = len(Part A) + len(Part B), unpadded."""

    input_ids: np.ndarray  # (T,) int64
    targets: np.ndarray  # (T,) int64; target i is what the logit at i predicts; special.pad in Part A
    position_ids: np.ndarray  # (2, T) int64: position, block position
    sep: int  # len(Part A): keys before it are visible to every query
    loss_mask: np.ndarray  # (T,) bool, True exactly on Part B
    mode: str = ""  # MASK | sMASK | gMASK | sMASK->MASK (no usable sentences) | none (nothing maskable)
    spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) in the source, sorted


# ---- the deterministic core ------------------------------------------------------------------------


def assemble(tokens, spans, mask_ids, order, special: SpecialIds, *, mode: str | None = None) -> Example:
    """Build the example for given blanks.

    tokens: the source (1-D ints); spans: [start, end) pairs, sorted and disjoint; mask_ids: the
    mask token standing for each span in Part A; order: a permutation of range(len(spans)), the
    Part B order (order[0] is the span generated first). `mode` defaults to the mask token's name.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    n, k = len(tokens), len(spans)
    spans = [(int(s), int(e)) for s, e in spans]
    starts = np.array([s for s, _ in spans], dtype=np.int64).reshape(k)
    ends = np.array([e for _, e in spans], dtype=np.int64).reshape(k)
    if k and not ((starts < ends).all() and starts[0] >= 0 and ends[-1] <= n and (ends[:-1] <= starts[1:]).all()):
        raise ValueError(f"spans {spans} must be non-empty, sorted, disjoint and inside 0..{n}")
    order = np.asarray(order, dtype=np.int64).reshape(-1)
    if len(mask_ids) != k or not np.array_equal(np.sort(order), np.arange(k)):
        raise ValueError(
            f"need one mask id per span and order a permutation of 0..{k - 1}; got {list(mask_ids)}, {order.tolist()}"
        )

    # Part A: each span collapses to its mask token, which lands at start - (tokens removed before it)
    lens = ends - starts
    inside = np.cumsum(np.bincount(starts, minlength=n + 1)[:n] - np.bincount(ends, minlength=n + 1)[:n]) > 0
    a = tokens.copy()
    a[starts] = np.asarray(mask_ids, dtype=np.int64)
    keep = ~inside
    keep[starts] = True
    a = a[keep]
    sep = len(a)
    mask_pos = starts - np.concatenate(([0], np.cumsum(lens - 1)[:-1]))[:k]

    # Part B: block j (span order[j]) is <sop> span -> span <eop>, at its mask's position,
    # block positions 1..len+1. Every index below is (len(Part B),): one entry per Part B token.
    blen = lens[order] + 1
    block = np.repeat(np.arange(k), blen)
    offset = np.arange(blen.sum()) - np.repeat(np.cumsum(blen) - blen, blen)  # 0 at each <sop>
    src = starts[order][block] + offset  # source index of the target; of the input, minus one
    last = offset == blen[block] - 1
    b_ids = np.where(offset == 0, special.sop, tokens[np.clip(src - 1, 0, max(n - 1, 0))])
    b_tgt = np.where(last, special.eop, tokens[np.clip(src, 0, max(n - 1, 0))])
    input_ids = np.concatenate((a, b_ids)).astype(np.int64)
    targets = np.concatenate((np.full(sep, special.pad), b_tgt)).astype(np.int64)
    position_ids = np.stack((
        np.concatenate((np.arange(sep), mask_pos[order][block])),
        np.concatenate((np.zeros(sep, np.int64), offset + 1)),
    )).astype(np.int64)  # (2, T)
    if mode is None:
        names = {special.mask: "MASK", special.smask: "sMASK", special.gmask: "gMASK"}
        kinds = {names.get(int(m), "custom") for m in mask_ids}
        mode = kinds.pop() if len(kinds) == 1 else ("none" if not kinds else "mixed")
    return Example(
        input_ids=input_ids,
        targets=targets,
        position_ids=position_ids,
        sep=sep,
        loss_mask=np.arange(len(input_ids)) >= sep,
        mode=mode,
        spans=spans,
    )


# ---- prompts to fill -------------------------------------------------------------------------------
SPAN_STEP = (0, 1)  # from one token of a span to the next: same position, next block position


@dataclass
class BlankPrompt:
    """What generation reads to fill blanks: `assemble`'s layout with Part B still to come.

    Part A = ids[:sep], positions 0..sep-1, block positions 0, read bidirectionally; ids[sep] is the
    first blank's `<sop>`. Blank j's span sits at its mask's position mask_pos[j], token k of it
    (k = 0 the `<sop>`) at block position k + 1 (`span_position`).
    """

    ids: list[int]
    position_ids: list[list[int]]  # (2, len(ids)): position, block position
    sep: int
    mask_pos: list[int]

    def span_position(self, j: int, k: int) -> tuple[int, int]:
        """(position, block position) of token k of blank j's span (k = 0: its `<sop>`)."""
        return self.mask_pos[j], k + 1

    def blank(self, j: int, filled: list[list[int]]) -> tuple[list[int], list[list[int]]]:
        """Blank j's prompt when blanks 0..j-1 were filled left to right: (ids, position_ids (2, T)).

        Part A, then each earlier blank i as `<sop> filled[i]` at its mask's position (block
        positions 1, 2, ...), then blank j's `<sop>`: what a decoder that filled them in order holds in
        its cache (`filled[i]`: the span tokens it fed, without the ending <eop>), the Part B order
        training uses too. Read with sep = self.sep: the spans attend to Part A and causally to each other.
        """
        if not 0 <= j < len(self.mask_pos) or len(filled) != j:
            raise ValueError(f"blank {j} of {len(self.mask_pos)} needs the {j} spans before it, got {len(filled)}")
        sop, A = self.ids[self.sep], self.sep
        ids, pos, block = self.ids[:A], list(range(A)), [0] * A
        for i, span in enumerate([*filled, []]):
            ids = ids + [sop, *span]
            pos += [self.mask_pos[i]] * (len(span) + 1)
            block += list(range(1, len(span) + 2))
        return ids, [pos, block]


def blank_prompt(pieces: list[list[int]], mask_ids: list[int], sop: int) -> BlankPrompt:
    """Part A = pieces[0] mask_ids[0] pieces[1] ... mask_ids[-1] pieces[-1], then the first blank's `<sop>`."""
    if len(pieces) != len(mask_ids) + 1 or not mask_ids:
        raise ValueError(f"{len(pieces)} pieces around {len(mask_ids)} masks: want at least one mask, one piece more than masks")
    part_a, mask_pos = list(pieces[0]), []
    for m, piece in zip(mask_ids, pieces[1:]):
        mask_pos.append(len(part_a))
        part_a += [m, *piece]
    A = len(part_a)
    return BlankPrompt(part_a + [sop], [list(range(A)) + [mask_pos[0]], [0] * A + [1]], A, mask_pos)


# ---- choosing the blanks ---------------------------------------------------------------------------
# Length budget. The output is n + 2k tokens (n consumed source tokens, k spans: each span's tokens
# move to Part B and cost one mask in Part A plus one <sop>), so for a fixed seq_len every span
# added takes two source tokens off the window. Each mode therefore decides its spans first and the
# window second, aiming at n = seq_len - 2k exactly (no padding):
#   MASK   draws span lengths until they cover `coverage` of n(k) = min(L, seq_len - 2k), then
#          fixes n = n(k) and places the spans in tokens[:n].
#   gMASK  has k = 1: n = min(L, seq_len - 2).
#   sMASK  cannot choose lengths freely (sentences are what they are): it picks sentences for a
#          window n, shrinks n to seq_len - 2k if they do not fit, repeats, and finally grows n back
#          as far as seq_len - 2k allows while the coverage still holds. What is left is padding.
# Padding then comes only from a stream's last window (L < seq_len), dropped MASK spans in windows
# of tiny documents, and sMASK's granularity.


def _segments(tokens: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends of the non-empty runs between eos tokens: the documents (or their parts) in view."""
    at = np.flatnonzero(tokens == eos)
    starts = np.concatenate(([0], at + 1))
    ends = np.concatenate((at, [len(tokens)]))
    keep = ends > starts
    return starts[keep], ends[keep]


def _mask_spans(tokens, seq_len, cfg: InfillConfig, rng, eos) -> tuple[list, int]:
    # Draw lengths until the first k with sum(lengths[:k]) >= coverage * n(k), or until one more
    # span would leave no room for source tokens. Drawn in chunks (one numpy call, not one per span).
    L, per_chunk = len(tokens), 8 + int(cfg.coverage * seq_len / cfg.span_lambda)
    lengths = np.zeros(0, np.int64)
    while True:
        drawn = np.searchsorted(cfg.span_cdf, rng.random(per_chunk), side="right") + 1
        lengths = np.concatenate((lengths, np.minimum(drawn, cfg.max_span)))  # min: float rounding at cdf[-1]
        k = np.arange(1, len(lengths) + 1)
        done = (np.cumsum(lengths) >= cfg.coverage * np.minimum(L, seq_len - 2 * k)) | (seq_len - 2 * (k + 1) < 1)
        if done.any():
            k = int(np.argmax(done)) + 1
            break
    lengths = lengths[:k].tolist()
    n = min(L, seq_len - 2 * k)

    starts, ends = _segments(tokens[:n], eos)
    if not len(starts):
        return [], n
    # A span of length l placed in a document uses l + 1 of its "room" (itself and the gap that
    # keeps it from touching the next one); a document of d tokens has d + 1 room. Each span goes to
    # a document where it fits, chosen with probability proportional to the room left, so blanks
    # spread over the documents in proportion to their length.
    # Documents too short to mask: a span that fits nowhere is shortened to the largest room left
    # (a 1-token document can still be masked whole); once no document has room for even one token,
    # the remaining spans are dropped (their 2 tokens each become padding, coverage falls short).
    # Only windows made of many documents a few tokens long get there; see test_infill for the
    # precondition under which coverage is guaranteed.
    # (Plain Python ints here: a handful of documents per window, and numpy's per-call cost would
    # dominate.)
    room = (ends - starts + 1).tolist()
    chosen = [[] for _ in room]
    for l, u in zip(lengths, rng.random(len(lengths)).tolist()):
        if max(room) < l + 1:
            l = max(room) - 1
            if l < 1:
                break
        x = u * sum(r for r in room if r > l)
        for j, r in enumerate(room):
            if r > l:
                fit, x = j, x - r
                if x < 0:
                    break
        chosen[fit].append(l)  # (`fit`, the last document that fits, also guards float rounding)
        room[fit] -= l + 1

    spans = []
    for a, b, ls in zip(starts, ends, chosen):
        if not ls:
            continue
        # THUDM/GLM sample_spans: the slack (room not taken by spans and their gaps) is split at
        # sorted uniform points, so the spans land anywhere in the document without touching.
        ls = np.array(ls)
        slack = (b - a) - ls.sum() - (len(ls) - 1)
        places = np.sort(rng.integers(0, slack + 1, size=len(ls)))
        s = a + places + np.concatenate(([0], np.cumsum(ls + 1)[:-1]))
        spans += [(int(x), int(x + l)) for x, l in zip(s, ls)]
    return sorted(spans), n


def _sentence_spans(tokens, seq_len, cfg: InfillConfig, rng, eos, sentence_end) -> tuple[list, int] | None:
    """Whole sentences covering >= cfg.coverage, or None when the window has no usable sentences."""
    L = len(tokens)
    is_eos = tokens == eos
    ends = sentence_end[tokens] & ~is_eos
    if not ends.any():
        return None  # no sentence ends in view: caller falls back to MASK
    # Sentences: pieces cut after each sentence end and around each eos. The window's first piece
    # may start mid-sentence (the previous window ended there); nothing here can know that.
    at = np.flatnonzero(is_eos)
    bounds = np.unique(np.concatenate(([0, L], np.flatnonzero(ends) + 1, at, at + 1)))
    pieces = [(int(s), int(e)) for s, e in zip(bounds[:-1], bounds[1:]) if not is_eos[s]]
    order = rng.permutation(len(pieces))
    # touching[i]: piece i ends where piece i+1 starts (same document, consecutive)
    touching = np.append(np.array(pieces)[:-1, 1] == np.array(pieces)[1:, 0], False)

    def select(n):
        """Greedy in random order: pieces that end inside the window and touch no chosen piece."""
        chosen, masked, target = np.zeros(len(pieces), bool), 0, cfg.coverage * n
        for i in order:
            s, e = pieces[i]
            if e > n or (i > 0 and touching[i - 1] and chosen[i - 1]) or (touching[i] and chosen[i + 1]):
                continue
            chosen[i], masked = True, masked + e - s
            if masked >= target:
                return np.flatnonzero(chosen), masked
        return None, masked

    n = min(L, seq_len - 2)
    while True:  # n strictly decreases, so this ends
        sel, masked = select(n)
        if sel is None:
            return None  # the sentences in view cannot cover enough: caller falls back to MASK
        k = len(sel)
        if n + 2 * k <= seq_len:
            break
        n = seq_len - 2 * k
    # grow the window back over tokens the chosen spans leave room for, keeping coverage
    n = max(n, min(L, seq_len - 2 * k, math.floor(masked / cfg.coverage)))
    while masked < cfg.coverage * n:  # floor() above may round up by one in floating point
        n -= 1
    return [pieces[i] for i in sel], n


def _gmask_span(tokens, seq_len, cfg: InfillConfig, rng, eos) -> tuple[list, int]:
    n = min(len(tokens), seq_len - 2)
    starts, ends = _segments(tokens[:n], eos)
    if not len(starts):
        return [], n
    # The longest document in view (the first on ties): the longest piece of text to generate,
    # rather than a short neighbour that happens to share the window.
    j = int(np.argmax(ends - starts))
    a, b = int(starts[j]), int(ends[j])
    d = b - a
    lo = max(1, math.ceil(cfg.gmask_min * d))
    hi = max(lo, min(d, math.floor(cfg.gmask_max * d)))
    length = int(rng.integers(lo, hi + 1))
    if rng.random() < cfg.gmask_suffix_prob:
        start = b - length  # prefix-LM: generate the document's end from its beginning
    else:
        start = a + int(rng.integers(0, d - length + 1))  # uniform over all placements in the document
    return [(start, start + length)], n


def build_example(
    tokens: np.ndarray,
    seq_len: int,
    rng: np.random.Generator,
    special: SpecialIds,
    sentence_end: np.ndarray,
    cfg: InfillConfig,
) -> tuple[Example, int]:
    """One example from the front of `tokens`, and how many tokens of it were consumed.

    tokens: a window of a packed stream (documents separated by special.eos), at least seq_len
    long unless the stream ends. sentence_end: bool lookup table over the vocabulary, True for
    tokens that end a sentence. The example has len(input_ids) <= seq_len; the loader advances by
    the returned count and calls again.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype} with shape {tokens.shape}")
    if len(tokens) == 0:
        raise ValueError("tokens is empty: the stream is exhausted, there is nothing to build an example from")
    if seq_len < 3:
        raise ValueError(f"seq_len={seq_len}: the smallest example ([MASK] <sop> x) needs 3")
    tokens = tokens[:seq_len].astype(np.int64)  # nothing past seq_len can be consumed
    sentence_end = np.asarray(sentence_end, dtype=bool)
    if sentence_end.ndim != 1 or tokens.min() < 0 or tokens.max() >= len(sentence_end):
        raise ValueError(
            f"sentence_end has {len(sentence_end)} entries but the tokens use ids {tokens.min()}..{tokens.max()}; "
            "build it as a bool table over the whole vocabulary"
        )

    if cfg.whole_window:
        n = min(len(tokens), seq_len - 2)
        return assemble(tokens[:n], [(0, n)], [special.gmask], [0], special, mode="causal"), n
    mode = MODES[int(rng.choice(3, p=cfg.mode_probs))]
    mask_id = {"MASK": special.mask, "sMASK": special.smask, "gMASK": special.gmask}[mode]
    chosen = None
    if mode == "sMASK":
        chosen = _sentence_spans(tokens, seq_len, cfg, rng, special.eos, sentence_end)
        if chosen is None:  # no sentence ends in view, or too few sentences: [MASK] spans instead
            mode, mask_id = "sMASK->MASK", special.mask
    if mode == "gMASK":
        chosen = _gmask_span(tokens, seq_len, cfg, rng, special.eos)
    elif chosen is None:
        chosen = _mask_spans(tokens, seq_len, cfg, rng, special.eos)
    spans, n = chosen
    if not spans:
        # Nothing but eos where the blanks could go (empty documents, or a tiny seq_len): consume
        # just the run of eos tokens at the front, as an example with no loss, so that the text
        # after it starts the next window and gets masked there.
        text = np.flatnonzero(tokens != special.eos)
        mode, n = "none", int(text[0]) if len(text) else len(tokens)
    order = rng.permutation(len(spans))
    return assemble(tokens[:n], spans, [mask_id] * len(spans), order, special, mode=mode), n


def collate(examples: list[Example], pad_id: int, seq_len: int | None = None) -> dict:
    """Stack examples into the tensors GLM.forward takes, padded after Part B to seq_len (default:
    the longest example).

    Returns input_ids (B, T), position_ids (B, 2, T), sep (B,), targets (B, T) (pad_id where there
    is no loss), all int64, and loss_mask (B, T) bool. Padding after Part B needs no attention mask:
    pad keys sit after every real query and after sep, so real tokens never see them.
    """
    import torch

    if not examples:
        raise ValueError("collate needs at least one example")
    lengths = [len(ex.input_ids) for ex in examples]
    T = max(lengths) if seq_len is None else seq_len
    if max(lengths) > T:
        raise ValueError(f"an example has {max(lengths)} tokens, more than seq_len={T}")
    B = len(examples)
    input_ids = np.full((B, T), pad_id, np.int64)
    targets = np.full((B, T), pad_id, np.int64)
    position_ids = np.zeros((B, 2, T), np.int64)
    loss_mask = np.zeros((B, T), bool)
    for b, ex in enumerate(examples):
        t = lengths[b]
        input_ids[b, :t] = ex.input_ids
        targets[b, :t] = np.where(ex.loss_mask, ex.targets, pad_id)
        position_ids[b, :, :t] = ex.position_ids
        loss_mask[b, :t] = ex.loss_mask
    sep = np.array([ex.sep for ex in examples], np.int64)
    out = dict(input_ids=input_ids, position_ids=position_ids, sep=sep, targets=targets, loss_mask=loss_mask)
    return {k: torch.from_numpy(v) for k, v in out.items()}


def special_ids(tokenizer) -> SpecialIds:
    """The GLM special ids of a tokenizer, by role (padding uses eos: it is never a target)."""
    eos = tokenizer.special("eos")
    return SpecialIds(mask=tokenizer.special("mask"), smask=tokenizer.special("smask"), gmask=tokenizer.special("gmask"),
                      sop=tokenizer.special("sop"), eop=tokenizer.special("eop"), eos=eos, pad=eos)
