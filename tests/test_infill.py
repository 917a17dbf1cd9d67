"""Blank-infilling examples (glmkit.infill): the worked example of ARCHITECTURE §4 exactly, the
invariants of build_example as hypothesis properties, collate, and a batch through the model.

    .venv/bin/python -m pytest tests/test_infill.py -q

Special-token ids are made up per test (hypothesis draws them from a shuffled id range), so nothing
may depend on their values. Streams are small random token arrays with eos between documents.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, fields

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from glmkit.infill import Example, InfillConfig, SpecialIds, assemble, blank_prompt, build_example, collate

SPECIAL = SpecialIds(mask=90, smask=91, gmask=92, sop=93, eop=94, eos=95, pad=96)
ONLY = {"MASK": (1, 0, 0), "sMASK": (0, 1, 0), "gMASK": (0, 0, 1), "mix": (0.5, 0.3, 0.2)}


def assert_array(got, want, what):
    """Equality of two int/bool arrays; on failure print them side by side, differences marked."""
    __tracebackhide__ = True
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape or not (got == want).all():
        same_shape = got.shape == want.shape
        marks = "".join(" ^" if g != w else "  " for g, w in zip(got.ravel(), want.ravel())) if same_shape else ""
        raise AssertionError(f"{what}:\n  got  {got.tolist()}\n  want {want.tolist()}\n       {marks}")


def make_stream(doc_lengths, vocab, rng, eos):
    """Documents of the given lengths, tokens drawn from `vocab`, each followed by eos."""
    parts = []
    for d in doc_lengths:
        parts += [rng.choice(vocab, size=d), [eos]]
    return np.concatenate(parts).astype(np.int64)


def segments(tokens, eos):
    """(start, end) of the non-empty eos-free runs of tokens."""
    out, start = [], 0
    for i, t in enumerate(list(tokens) + [eos]):
        if t == eos:
            if i > start:
                out.append((start, i))
            start = i + 1
    return out


# ---- the worked example ------------------------------------------------------------------------


def test_worked_example_of_architecture_section_4():
    x = np.array([11, 12, 13, 14, 15, 16])  # x1..x6
    ex = assemble(x, [(2, 3), (4, 6)], [SPECIAL.mask] * 2, [1, 0], SPECIAL)
    M, sop, eop, pad = SPECIAL.mask, SPECIAL.sop, SPECIAL.eop, SPECIAL.pad
    assert_array(ex.input_ids, [11, 12, M, 14, M, sop, 15, 16, sop, 13], "input ids")
    assert_array(ex.targets, [pad, pad, pad, pad, pad, 15, 16, eop, 13, eop], "targets")
    assert_array(ex.position_ids[0], [0, 1, 2, 3, 4, 4, 4, 4, 2, 2], "positions")
    assert_array(ex.position_ids[1], [0, 0, 0, 0, 0, 1, 2, 3, 1, 2], "block positions")
    assert_array(ex.loss_mask, [False] * 5 + [True] * 5, "loss mask")
    assert ex.sep == 5 and ex.mode == "MASK" and ex.spans == [(2, 3), (4, 6)]
    assert ex.input_ids.dtype == ex.targets.dtype == ex.position_ids.dtype == np.int64
    assert ex.position_ids.shape == (2, 10)


def test_assemble_without_spans_is_part_a_only():
    ex = assemble(np.array([5, 6, 7]), [], [], [], SPECIAL)
    assert ex.sep == 3 and not ex.loss_mask.any() and ex.mode == "none"
    assert_array(ex.position_ids, [[0, 1, 2], [0, 0, 0]], "positions")


@pytest.mark.parametrize(
    "spans, mask_ids, order",
    [
        ([(2, 4), (3, 5)], [1, 1], [0, 1]),  # overlap
        ([(3, 4), (0, 1)], [1, 1], [0, 1]),  # not sorted
        ([(4, 7)], [1], [0]),  # past the end
        ([(2, 2)], [1], [0]),  # empty
        ([(0, 1), (2, 3)], [1], [0, 1]),  # one mask id short
        ([(0, 1), (2, 3)], [1, 1], [0, 0]),  # order not a permutation
    ],
)
def test_assemble_rejects_malformed_blanks(spans, mask_ids, order):
    with pytest.raises(ValueError):
        assemble(np.arange(6), spans, mask_ids, order, SPECIAL)


# ---- the prompt generation fills (blank_prompt) is the layout training built ----------------------


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_blank_prompt_is_the_layout_assemble_trains_on(data):
    """For any text with k blanks and any Part B order: blank_prompt's Part A (ids, positions, sep) is
    assemble's, its last token is the first blank's <sop> where assemble puts it, and span_position(j, k)
    is where assemble puts token k of blank j's Part B block (k = 0: its <sop>)."""
    k = data.draw(st.integers(1, 4), "blanks")
    pieces = [data.draw(st.lists(st.integers(0, 89), max_size=4), f"piece {i}") for i in range(k + 1)]
    fillers = [data.draw(st.lists(st.integers(0, 89), min_size=1, max_size=4), f"span {j}") for j in range(k)]
    masks = [data.draw(st.sampled_from([SPECIAL.mask, SPECIAL.smask, SPECIAL.gmask])) for _ in range(k)]
    order = data.draw(st.permutations(range(k)), "Part B order")
    tokens, spans = list(pieces[0]), []
    for filler, piece in zip(fillers, pieces[1:]):
        spans.append((len(tokens), len(tokens) + len(filler)))
        tokens += filler + piece
    ex = assemble(tokens, spans, masks, order, SPECIAL)
    p = blank_prompt(pieces, masks, SPECIAL.sop)
    A = ex.sep
    assert p.sep == A and len(p.ids) == len(p.position_ids[0]) == len(p.position_ids[1]) == A + 1
    assert_array(p.ids[:A], ex.input_ids[:A], "Part A ids")
    assert_array(np.array(p.position_ids)[:, :A], ex.position_ids[:, :A], "Part A positions")
    at, first = A, None
    for j in order:  # assemble's Part B: blank j's block is <sop> and its span
        for t in range(len(fillers[j]) + 1):
            assert tuple(ex.position_ids[:, at]) == p.span_position(j, t), (j, t)
            if j == 0 and t == 0:
                first = at
            at += 1
    assert p.ids[A] == ex.input_ids[first] == SPECIAL.sop
    assert (p.position_ids[0][A], p.position_ids[1][A]) == tuple(ex.position_ids[:, first])


def test_blank_prompt_needs_a_piece_around_each_mask():
    with pytest.raises(ValueError, match="pieces around"):
        blank_prompt([[1], [2]], [SPECIAL.mask, SPECIAL.mask], SPECIAL.sop)
    with pytest.raises(ValueError, match="pieces around"):
        blank_prompt([[1]], [], SPECIAL.sop)


# ---- invariants of build_example -----------------------------------------------------------------


def check_example(ex: Example, used: int, tokens: np.ndarray, seq_len: int, special: SpecialIds, cfg: InfillConfig,
                  sentence_end: np.ndarray | None = None):
    """Every property the objective promises, for one example built from `tokens`."""
    __tracebackhide__ = True
    src = tokens[:used]
    k, T, sep = len(ex.spans), len(ex.input_ids), ex.sep
    assert 0 < used <= len(tokens)
    assert T == used + 2 * k <= seq_len, f"length {T} = {used} + 2*{k} must be <= seq_len {seq_len}"
    assert ex.targets.shape == ex.loss_mask.shape == (T,) and ex.position_ids.shape == (2, T)

    # spans: sorted, disjoint, never touching, inside one document (never over an eos)
    for (s0, e0), (s1, _) in zip(ex.spans, ex.spans[1:]):
        assert e0 < s1, f"spans {(s0, e0)} and {(s1, _)} overlap or touch"
    for s, e in ex.spans:
        assert 0 <= s < e <= used and not (src[s:e] == special.eos).any(), f"span {(s, e)} leaves its document"

    # Part A: the source with one mask per span; positions 0..sep-1, block positions 0
    mask_id = {"MASK": special.mask, "sMASK->MASK": special.mask, "sMASK": special.smask, "gMASK": special.gmask}
    want_a, prev = [], 0
    for s, e in ex.spans:
        want_a += list(src[prev:s]) + [mask_id[ex.mode]]
        prev = e
    want_a += list(src[prev:])
    assert_array(ex.input_ids[:sep], want_a, "Part A")
    assert_array(ex.position_ids[0, :sep], np.arange(sep), "Part A positions")
    assert_array(ex.position_ids[1, :sep], np.zeros(sep), "Part A block positions")

    # Part B: each block <sop> span -> span <eop>, at its mask's position, block positions 1..len+1
    mask_at = [s - sum(e1 - s1 - 1 for s1, e1 in ex.spans if e1 <= s) for s, _ in ex.spans]  # i-th mask in Part A
    starts = list(np.flatnonzero(ex.position_ids[1, sep:] == 1) + sep) + [T]
    assert len(starts) - 1 == k, f"{len(starts) - 1} blocks in Part B for {k} spans"
    seen = []
    for b0, b1 in zip(starts, starts[1:]):
        p = ex.position_ids[0, b0]
        assert p in mask_at, f"Part B block at {b0} has position {p}, not a mask's ({mask_at})"
        s, e = ex.spans[mask_at.index(p)]
        assert_array(ex.input_ids[b0:b1], [special.sop, *src[s:e]], f"inputs of the block for span {(s, e)}")
        assert_array(ex.targets[b0:b1], [*src[s:e], special.eop], f"targets of the block for span {(s, e)}")
        assert_array(ex.position_ids[0, b0:b1], np.full(b1 - b0, p), "Part B positions")
        assert_array(ex.position_ids[1, b0:b1], np.arange(1, b1 - b0 + 1), "Part B block positions")
        seen.append(p)
    assert sorted(seen) == mask_at, "every span predicted exactly once"
    masked = Counter(int(t) for s, e in ex.spans for t in src[s:e])
    assert Counter(ex.targets[sep:].tolist()) - Counter({special.eop: k}) == masked

    # loss exactly on Part B
    assert_array(ex.loss_mask, np.arange(T) >= sep, "loss mask")
    assert (ex.targets[:sep] == special.pad).all()

    # coverage
    n_masked = sum(e - s for s, e in ex.spans)
    segs = segments(src, special.eos)
    if ex.mode == "none":
        assert not segs, "mode none only when nothing but eos is in view"
    elif ex.mode == "sMASK":
        assert n_masked >= cfg.coverage * used
        if sentence_end is not None:  # whole sentences: from a boundary to a sentence end or document end
            is_end = sentence_end[tokens] & (tokens != special.eos)
            for s, e in ex.spans:
                starts_ok = s == 0 or tokens[s - 1] == special.eos or is_end[s - 1]
                ends_ok = is_end[e - 1] or e == len(tokens) or tokens[e] == special.eos
                assert starts_ok and ends_ok, f"sMASK span {(s, e)} is not a whole sentence"
                assert not is_end[s : e - 1].any(), f"sMASK span {(s, e)} holds more than one sentence"
    elif ex.mode in ("MASK", "sMASK->MASK"):
        # Precondition under which MASK must reach coverage: with D documents in view, spans fit
        # while some document has room for a max_span span. Before the last span is placed they
        # use < 2 * coverage * (used + 2) room, and the documents offer used - #eos + D in all, so
        # room can only run out when  used - #eos + D - 2 * coverage * (used + 2) < D * max_span.
        # (Windows of many documents a few tokens long; there, spans are shortened or dropped.)
        n_eos = int((src == special.eos).sum())
        if used - n_eos + len(segs) - 2 * cfg.coverage * (used + 2) >= len(segs) * cfg.max_span:
            assert n_masked >= cfg.coverage * used, f"{n_masked} of {used} masked, want >= {cfg.coverage:.0%}"
        assert all(e - s <= cfg.max_span for s, e in ex.spans)
    else:
        assert ex.mode == "gMASK" and k == 1
        (s, e), = ex.spans
        a, b = next(seg for seg in segs if seg[0] <= s and e <= seg[1])
        d = b - a
        assert d == max(y - x for x, y in segs), "gMASK masks the longest document in view"
        assert math.ceil(cfg.gmask_min * d) <= e - s <= cfg.gmask_max * d, f"gMASK span {e - s} of a {d}-token document"
        if cfg.gmask_suffix_prob == 1:
            assert e == b, "suffix gMASK must end at the document's end"


@st.composite
def windows(draw):
    """A made-up vocabulary and special ids, a packed stream, seq_len, config and seed."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    ids = rng.permutation(48).tolist()  # special ids are made up: anywhere among the first 48
    special = SpecialIds(*ids[:7])
    vocab = np.array(ids[7:])
    sentence_end = np.zeros(64, bool)  # longer than the vocabulary: any lookup table will do
    sentence_end[vocab[: draw(st.sampled_from([0, 1, 4]))]] = True  # 0: no sentence ends at all
    # documents: tiny, short or long (a window of one long document is the common case)
    doc_len = draw(st.sampled_from([st.integers(0, 4), st.integers(0, 40), st.integers(30, 400)]))
    docs = draw(st.lists(doc_len, min_size=1, max_size=8))
    tokens = make_stream(docs, vocab, rng, special.eos)
    tokens = tokens[draw(st.integers(0, max(0, len(tokens) - 1))) :]  # windows start anywhere
    seq_len = draw(st.integers(3, 300))
    mixture = ONLY[draw(st.sampled_from(list(ONLY)))]
    cfg = InfillConfig(mixture=mixture, gmask_suffix_prob=draw(st.sampled_from([0.0, 0.5, 1.0])))
    return tokens, seq_len, special, sentence_end, cfg, seed


@settings(max_examples=200, deadline=None)
@given(windows())
def test_build_example_invariants(w):
    tokens, seq_len, special, sentence_end, cfg, seed = w
    ex, used = build_example(tokens, seq_len, np.random.default_rng(seed), special, sentence_end, cfg)
    check_example(ex, used, tokens, seq_len, special, cfg, sentence_end)
    if not sentence_end.any() and cfg.mixture == ONLY["sMASK"]:
        assert ex.mode in ("sMASK->MASK", "none")


@settings(max_examples=40, deadline=None)
@given(windows())
def test_build_example_is_deterministic_for_a_seed(w):
    tokens, seq_len, special, sentence_end, cfg, seed = w
    a, used_a = build_example(tokens, seq_len, np.random.default_rng(seed), special, sentence_end, cfg)
    b, used_b = build_example(tokens.copy(), seq_len, np.random.default_rng(seed), special, sentence_end, cfg)
    assert used_a == used_b and a.mode == b.mode and a.spans == b.spans and a.sep == b.sep
    for name in ("input_ids", "targets", "position_ids", "loss_mask"):
        assert_array(getattr(a, name), getattr(b, name), name)


def walk(stream, seq_len, cfg, seed, special=SPECIAL, sentence_end=None):
    """Examples over a whole stream, advancing by what each one consumed (as the loader does)."""
    rng = np.random.default_rng(seed)
    sentence_end = np.zeros(100, bool) if sentence_end is None else sentence_end
    pos, out = 0, []
    while pos < len(stream):
        ex, used = build_example(stream[pos : pos + seq_len], seq_len, rng, special, sentence_end, cfg)
        out.append((ex, used, stream[pos : pos + seq_len]))
        pos += used
    return out


def realistic_stream(n_docs=60, seed=0):
    """Documents of 20..1000 tokens (lognormal, median ~150), sentence ends ~1 in 15 tokens."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(5.0, 0.8, n_docs).astype(int), 20, 1000)
    sentence_end = np.zeros(100, bool)
    sentence_end[[0, 1]] = True
    vocab = np.concatenate([np.zeros(3, int), np.arange(1, 80)])  # id 0 often, id 1 once: ~1/15 end
    return make_stream(lengths, vocab, rng, SPECIAL.eos), sentence_end


@pytest.mark.parametrize("mode", ["MASK", "sMASK", "gMASK"])
def test_a_whole_stream_is_consumed_with_little_padding(mode):
    """Walking a stream covers every token once; MASK and gMASK fill seq_len exactly, sMASK nearly."""
    stream, sentence_end = realistic_stream()
    cfg, seq_len = InfillConfig(mixture=ONLY[mode]), 256
    walked = walk(stream, seq_len, cfg, 1, sentence_end=sentence_end)
    assert sum(used for _, used, _ in walked) == len(stream)
    full = walked[:-1]  # the stream's last window may be short
    pad = sum(seq_len - len(ex.input_ids) for ex, _, _ in full) / (seq_len * len(full))
    for ex, used, window in full:
        check_example(ex, used, window, seq_len, SPECIAL, cfg, sentence_end)
        if mode != "sMASK":
            assert len(ex.input_ids) == seq_len, f"{mode}: {len(ex.input_ids)} tokens, want exactly {seq_len}"
        if ex.mode in ("MASK", "sMASK"):  # realistic documents: coverage holds beyond the precondition
            assert sum(e - s for s, e in ex.spans) >= cfg.coverage * used
    assert pad < 0.02, f"{mode}: mean padding {pad:.2%}"
    if mode == "sMASK":
        assert sum(ex.mode == "sMASK" for ex, _, _ in full) > 0.9 * len(full)


# ---- edge cases -------------------------------------------------------------------------------------


def test_smask_without_sentence_ends_falls_back_to_mask():
    tokens = np.arange(1, 81)  # one document, no sentence ends
    cfg = InfillConfig(mixture=(0, 1, 0))
    ex, used = build_example(tokens, 64, np.random.default_rng(0), SPECIAL, np.zeros(100, bool), cfg)
    assert ex.mode == "sMASK->MASK" and SPECIAL.mask in ex.input_ids and SPECIAL.smask not in ex.input_ids
    check_example(ex, used, tokens, 64, SPECIAL, InfillConfig())


def test_window_of_only_eos_gives_an_example_without_loss():
    tokens = np.full(10, SPECIAL.eos)
    for mixture in ONLY.values():
        ex, used = build_example(tokens, 8, np.random.default_rng(0), SPECIAL, np.zeros(100, bool), InfillConfig(mixture=mixture))
        assert ex.mode == "none" and used == 8 and not ex.loss_mask.any() and ex.spans == []


def test_tiny_documents_are_masked_whole_and_never_joined():
    """1-token documents: spans shrink to one token; each still stays inside its document."""
    x = np.array([3, SPECIAL.eos] * 40)
    cfg = InfillConfig(mixture=(1, 0, 0))
    for seed in range(20):
        ex, used = build_example(x, 50, np.random.default_rng(seed), SPECIAL, np.zeros(100, bool), cfg)
        check_example(ex, used, x, 50, SPECIAL, cfg)
        assert ex.spans and all(e - s == 1 for s, e in ex.spans)


def test_short_stream_end_is_consumed():
    tokens = np.array([4, 5, 6, 7])  # the stream ends long before seq_len
    for mixture in ONLY.values():
        cfg = InfillConfig(mixture=mixture)
        ex, used = build_example(tokens, 100, np.random.default_rng(1), SPECIAL, np.zeros(100, bool), cfg)
        check_example(ex, used, tokens, 100, SPECIAL, cfg)
        assert used == 4


@pytest.mark.parametrize(
    "tokens, seq_len, table",
    [
        (np.array([], dtype=np.int64), 16, 100),  # empty
        (np.arange(10), 2, 100),  # seq_len below the smallest example
        (np.arange(10).reshape(2, 5), 16, 100),  # not 1-D
        (np.linspace(0, 1, 10), 16, 100),  # not integers
        (np.arange(10), 16, 5),  # sentence_end table shorter than the vocabulary
    ],
)
def test_degenerate_inputs_raise_value_error(tokens, seq_len, table):
    with pytest.raises(ValueError):
        build_example(tokens, seq_len, np.random.default_rng(0), SPECIAL, np.zeros(table, bool), InfillConfig())


@pytest.mark.parametrize(
    "kwargs",
    [dict(mixture=(0, 0, 0)), dict(mixture=(1, -1, 1)), dict(mixture=(1, 1)), dict(coverage=0), dict(max_span=0),
     dict(gmask_min=0.8, gmask_max=0.5), dict(gmask_suffix_prob=1.5), dict(span_lambda=0)],
)
def test_bad_config_raises_value_error(kwargs):
    with pytest.raises(ValueError):
        InfillConfig(**kwargs)


def test_whole_window_is_a_causal_lm_in_glm_format():
    # the comparison objective: one [gMASK] span over the whole window, eos separators included, so every token
    # is predicted from the ones before it; the model then attends causally over Part B (checked with a model)
    rng = np.random.default_rng(0)
    tokens = make_stream([5, 9, 3, 30], np.arange(1, 80), rng, SPECIAL.eos)
    ex, used = build_example(tokens, 32, rng, SPECIAL, np.zeros(100, bool), InfillConfig(whole_window=True))
    assert ex.mode == "causal" and used == 30 and ex.sep == 1
    assert_array(ex.input_ids, [SPECIAL.gmask, SPECIAL.sop, *tokens[:30]], "input ids")
    assert_array(ex.targets[1:], [*tokens[:30], SPECIAL.eop], "targets")
    assert_array(ex.position_ids, [[0] * 32, [0, *range(1, 32)]], "positions")
    assert ex.loss_mask.sum() == 31
    # no bidirectional context: changing a later token leaves every earlier prediction as it was
    from glmkit.config import ModelConfig
    from glmkit.model import GLM

    torch.manual_seed(0)
    model = GLM(ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)).eval()
    b = collate([ex], SPECIAL.pad)
    later = {k: v.clone() for k, v in b.items()}
    later["input_ids"][0, 20] = 7 if int(later["input_ids"][0, 20]) != 7 else 8
    with torch.no_grad():
        y0 = model(b["input_ids"], b["position_ids"], sep=b["sep"])
        y1 = model(later["input_ids"], later["position_ids"], sep=later["sep"])
    print(f"\nearlier positions max diff {(y0[0, :20] - y1[0, :20]).abs().max():.2e}, later {(y0[0, 20:] - y1[0, 20:]).abs().max():.2e}")
    assert torch.equal(y0[0, :20], y1[0, :20]) and not torch.equal(y0[0, 20:], y1[0, 20:])


def test_config_round_trips_through_asdict():
    cfg = InfillConfig(mixture=(1, 2, 1), coverage=0.2)
    assert InfillConfig(**asdict(cfg)) == cfg and set(asdict(cfg)) == {f.name for f in fields(InfillConfig)}
    assert np.allclose(cfg.mode_probs, [0.25, 0.5, 0.25])


def test_mask_span_lengths_follow_the_truncated_poisson():
    """Mean of Poisson(3) conditioned on 1..39 is 3 / (1 - e^-3) = 3.157; long documents, no clipping."""
    stream, _ = realistic_stream(n_docs=40, seed=5)
    lens = [e - s for ex, _, _ in walk(stream, 512, InfillConfig(mixture=(1, 0, 0)), 0) for s, e in ex.spans]
    want = 3 / (1 - math.exp(-3))
    assert abs(np.mean(lens) - want) < 0.15, f"mean span length {np.mean(lens):.3f} over {len(lens)} spans, want {want:.3f}"
    assert min(lens) >= 1 and max(lens) <= 39


def test_mixture_is_followed():
    stream, sentence_end = realistic_stream(n_docs=200, seed=3)
    modes = Counter(ex.mode for ex, _, _ in walk(stream, 64, InfillConfig(), 0, sentence_end=sentence_end))
    total = sum(modes.values())
    for mode, p in zip(("MASK", "sMASK", "gMASK"), (0.5, 0.3, 0.2)):
        share = (modes[mode] + (modes["sMASK->MASK"] if mode == "sMASK" else 0)) / total
        assert abs(share - p) < 0.05, f"{mode}: {share:.3f} of {total} examples, want {p} ({dict(modes)})"


# ---- collate and the model ----------------------------------------------------------------------


def some_examples(seq_len=48, n=6, seed=0):
    stream, sentence_end = realistic_stream(n_docs=10, seed=seed)
    return [ex for ex, _, _ in walk(stream, seq_len, InfillConfig(), seed, sentence_end=sentence_end)][:n]


def test_collate_shapes_dtypes_and_padding_after_part_b():
    exs = some_examples()
    exs[1] = assemble(np.array([5, 6, 7, 8]), [(1, 2)], [SPECIAL.gmask], [0], SPECIAL)  # a short one
    batch = collate(exs, pad_id=SPECIAL.pad, seq_len=50)
    B, T = len(exs), 50
    want = {"input_ids": ((B, T), torch.long), "position_ids": ((B, 2, T), torch.long), "sep": ((B,), torch.long),
            "targets": ((B, T), torch.long), "loss_mask": ((B, T), torch.bool)}
    assert {k: (tuple(v.shape), v.dtype) for k, v in batch.items()} == want
    for b, ex in enumerate(exs):
        t = len(ex.input_ids)
        assert_array(batch["input_ids"][b, :t], ex.input_ids, "input ids")
        assert_array(batch["position_ids"][b, :, :t], ex.position_ids, "positions")
        assert_array(batch["loss_mask"][b, :t], ex.loss_mask, "loss mask")
        assert batch["sep"][b] == ex.sep <= t
        assert (batch["input_ids"][b, t:] == SPECIAL.pad).all() and (batch["targets"][b, t:] == SPECIAL.pad).all()
        assert not batch["loss_mask"][b, t:].any() and (batch["position_ids"][b, :, t:] == 0).all()
        assert (batch["targets"][b][~batch["loss_mask"][b]] == SPECIAL.pad).all()
    assert collate(exs, pad_id=SPECIAL.pad)["input_ids"].shape[1] == max(len(ex.input_ids) for ex in exs)
    with pytest.raises(ValueError):
        collate(exs, pad_id=SPECIAL.pad, seq_len=10)
    with pytest.raises(ValueError):
        collate([], pad_id=SPECIAL.pad)


def test_collated_batch_trains_the_model():
    """The tensors fit GLM.forward; padding after Part B leaves every real logit unchanged."""
    from glmkit.config import get_preset
    from glmkit.model import GLM

    torch.manual_seed(0)
    model = GLM(get_preset("debug")).eval()
    exs = some_examples(seq_len=64, n=4)
    batch = collate(exs, pad_id=SPECIAL.pad, seq_len=64)
    logits = model(batch["input_ids"], batch["position_ids"], sep=batch["sep"])  # (B, T, V)
    mask = batch["loss_mask"]
    loss = F.cross_entropy(logits[mask], batch["targets"][mask])
    V = model.cfg.vocab_size
    assert torch.isfinite(loss) and abs(loss.item() - math.log(V)) < 0.5, f"loss {loss.item():.3f}, ~ln V = {math.log(V):.3f}"
    loss.backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for b, ex in enumerate(exs):
            t = len(ex.input_ids)
            alone = model(torch.from_numpy(ex.input_ids)[None], torch.from_numpy(ex.position_ids)[None], sep=ex.sep)
            diff = (alone[0] - logits[b, :t]).abs().max().item()
            assert diff < 1e-5, f"example {b}: padding changed real logits by {diff:.3e}"
