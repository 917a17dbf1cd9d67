"""The training loader: deterministic, resumable from a few integers, and sharded by rank exactly."""

import numpy as np
import pytest
import torch

from glmkit.data.loader import InfillLoader
from glmkit.infill import special_ids


@pytest.fixture(scope="module")
def data(shards):
    from glmkit.data.shards import TokenShards

    return TokenShards(shards)


def loader(shards, batch=4, rank=0, world=1, seed=0):
    tok = shards.tokenizer()
    return InfillLoader(shards, "train", 64, batch, special_ids(tok), tok.sentence_end_table(), seed=seed,
                        rank=rank, world_size=world)


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_deterministic_for_a_seed(data):
    a, b, c = loader(data), loader(data), loader(data, seed=1)
    xa, xb, xc = next(a), next(b), next(c)
    assert same(xa, xb) and not same(xa, xc)


def test_resume_gives_identical_next_batches(data):
    run = loader(data)
    n = run.steps_per_epoch + 3  # cross an epoch boundary on the way
    for _ in range(n):
        next(run)
    state = run.state_dict()
    assert state == {"seed": 0, "epoch": 1, "step": 3, "global_batch": 4}
    expected = [next(run) for _ in range(3)]
    resumed = loader(data)
    resumed.load_state_dict(state)
    assert all(same(a, next(resumed)) for a in expected)
    with pytest.raises(ValueError, match="global batch 4; this loader has seed 0 and global batch 8"):
        loader(data, batch=8).load_state_dict(state)


def test_ranks_are_disjoint_and_their_union_is_the_single_rank_batch(data):
    single = loader(data, batch=4)
    ranks = [loader(data, batch=2, rank=r, world=2) for r in range(2)]
    for _ in range(single.steps_per_epoch + 2):  # through an epoch boundary
        whole = next(single)
        parts = [next(r) for r in ranks]
        assert same(whole, {k: torch.cat([p[k] for p in parts]) for k in whole})
    # each window index appears once per epoch across ranks
    seen = []
    for r in ranks:
        lo = [r.perm[s * 4 + r.rank * 2: s * 4 + r.rank * 2 + 2] for s in range(r.steps_per_epoch)]
        seen += list(np.concatenate(lo))
    assert len(seen) == len(set(seen))


def test_epochs_shift_window_edges(data):
    run = loader(data)
    first_offset = run.offset
    for _ in range(run.steps_per_epoch + 1):
        next(run)
    assert run.epoch == 1 and (run.offset != first_offset or run.seq_len == 1)


def test_bad_rank_and_tiny_split(data):
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        loader(data, rank=2, world=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        loader(data, batch=100000)


def test_domain_weights_repeat_and_drop_windows_by_the_domain_they_start_in(data):
    tok = data.tokenizer()
    doms = data.index["domains"]
    docs = data.docs("train")

    def weighted(w, seed=0):
        return InfillLoader(data, "train", 64, 4, special_ids(tok), tok.sentence_end_table(), seed=seed,
                            domain_weights=w)

    def domain_of(ld, windows):
        starts = ld.offset + np.asarray(windows) * ld.seq_len
        return docs[np.searchsorted(docs[:, 0], starts, side="right") - 1, 3]

    plain, ld = loader(data), weighted({doms[0]: 2.0, doms[1]: 0.0})
    n = (ld.n_tokens - ld.offset) // ld.seq_len
    count = np.bincount(ld.perm, minlength=n)
    want = np.choose(domain_of(ld, np.arange(n)), [2, 0] + [1] * (len(doms) - 2))
    assert np.array_equal(count, want), (count.tolist(), want.tolist())
    assert ld.steps_per_epoch == len(ld.perm) // 4 != plain.steps_per_epoch
    # a window shown twice gets different blanks; the weighted loader resumes like the plain one
    twice = int(np.flatnonzero(count == 2)[0])
    a, b = np.flatnonzero(ld.perm == twice)[:2]
    ea, eb = ld.example(twice, int(a)), ld.example(twice, int(b))
    assert not np.array_equal(ea.input_ids, eb.input_ids)
    for _ in range(ld.steps_per_epoch + 2):
        next(ld)
    again = weighted({doms[0]: 2.0, doms[1]: 0.0})
    again.load_state_dict(ld.state_dict())
    assert same(next(ld), next(again))
    # fractional weights: each window kept with that probability
    half = weighted({d: 0.5 for d in doms}, seed=3)
    assert abs(len(half.perm) / n - 0.5) < 0.1 and len(set(half.perm.tolist())) == len(half.perm)
    with pytest.raises(ValueError, match="domain weights"):
        weighted({"klingon": 1.0})
    with pytest.raises(ValueError, match="domain weights"):
        weighted({doms[0]: -1.0})
    with pytest.raises(ValueError, match="fewer than one global batch"):
        weighted({d: 0.0 for d in doms})
