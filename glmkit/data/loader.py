"""The training loader: blank-infilling batches from token shards, deterministic, sharded, resumable.

    loader = InfillLoader(TokenShards("shards/"), "train", seq_len=512, batch_size=8,
                          special=SpecialIds(...), sentence_end=tok.sentence_end_table(),
                          seed=0, rank=0, world_size=1)
    batch = next(loader)              # dict of tensors: input_ids, position_ids, sep, targets, loss_mask
    state = loader.state_dict()       # {"seed", "epoch", "step", "global_batch"}: a few integers
    loader.load_state_dict(state)     # the next batch is the one that would have come

How data is laid out: epoch e cuts the split's token stream into windows of `seq_len` tokens,
starting at an offset drawn from (seed, e) so window edges move between epochs, and visits them in
a permutation drawn from (seed, e). Global step s takes windows [s*G, (s+1)*G) of the permutation,
G = batch_size * world_size; rank r takes its contiguous slice of `batch_size`. So the union of
all ranks' batches is exactly the 1-rank batch of size G, and the state is just (epoch, step).
Each window becomes one GLM example through `infill.build_example` with an rng seeded by
(seed, epoch, window): the example does not depend on which rank builds it. An example consumes
up to `seq_len` source tokens minus two per span (Part B adds `<sop>`/`<eop>`); the window's
unconsumed tail is skipped this epoch and, with the moving offsets, seen in others.

`domain_weights` ({"zh_classical": 2.0, "code": 0.5, ...}; domains not named weigh 1) reweights the
mixture of domains without re-tokenizing: a window belongs to the domain of the document it starts
in, and each epoch visits it floor(w) times plus once more with probability w - floor(w), drawn from
(seed, epoch) like the permutation. So a weight of 2 shows every such window twice an epoch (with
different blanks: the example's rng depends on its position in the epoch), 0.5 half of them, 0 none.
"""

from __future__ import annotations

import math

import numpy as np

from ..infill import InfillConfig, SpecialIds, build_example, collate
from .shards import TokenShards


class InfillLoader:
    def __init__(self, shards: TokenShards, split: str, seq_len: int, batch_size: int, special: SpecialIds,
                 sentence_end: np.ndarray, cfg: InfillConfig | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, domain_weights: dict[str, float] | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.shards, self.split, self.seq_len, self.batch_size = shards, split, seq_len, batch_size
        self.special, self.sentence_end, self.cfg = special, sentence_end, cfg or InfillConfig()
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.global_batch = batch_size * world_size
        self.n_tokens = shards.num_tokens(split)
        self.domain_weights = dict(domain_weights or {})
        self._doc_starts = self._doc_domains = None
        if self.domain_weights:
            known = shards.index.get("domains", [])
            bad = {k: v for k, v in self.domain_weights.items() if k not in known or not (v >= 0 and math.isfinite(v))}
            if bad:
                raise ValueError(f"domain weights {bad}: want non-negative weights of the shards' domains {known}")
            docs = shards.docs(split)
            self._doc_starts, self._doc_domains = docs[:, 0], docs[:, 3]
            self._weight_of = np.array([self.domain_weights.get(d, 1.0) for d in known] or [1.0])
        if self.n_tokens < seq_len * self.global_batch:
            raise ValueError(f"split {split!r} has {self.n_tokens} tokens, fewer than one global batch "
                             f"({self.global_batch} x {seq_len}); use a smaller batch or sequence length")
        self.epoch, self.step = 0, 0
        self._plan_epoch()

    def _plan_epoch(self):
        rng = np.random.default_rng([self.seed, self.epoch, 0x5EED])
        self.offset = int(rng.integers(0, self.seq_len)) if self.epoch > 0 else 0
        n_windows = (self.n_tokens - self.offset) // self.seq_len
        if self._doc_starts is None:
            self.perm = rng.permutation(n_windows)
        else:
            starts = self.offset + np.arange(n_windows, dtype=np.int64) * self.seq_len
            doc = np.searchsorted(self._doc_starts, starts, side="right") - 1
            w = self._weight_of[self._doc_domains[doc]]
            times = np.floor(w).astype(np.int64) + (rng.random(n_windows) < w - np.floor(w))
            self.perm = rng.permutation(np.repeat(np.arange(n_windows), times))
        self.steps_per_epoch = len(self.perm) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"split {self.split!r}: {len(self.perm)} windows an epoch after domain weighting, fewer "
                             f"than one global batch of {self.global_batch}")

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "step": self.step, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict):
        if state["seed"] != self.seed or state["global_batch"] != self.global_batch:
            raise ValueError(f"loader state is for seed {state['seed']} and global batch {state['global_batch']}; "
                             f"this loader has seed {self.seed} and global batch {self.global_batch}")
        self.epoch, self.step = state["epoch"], state["step"]
        self._plan_epoch()

    def example(self, window: int, slot: int):
        start = self.offset + int(window) * self.seq_len
        tokens = self.shards.read(self.split, start, self.seq_len)
        # seeded by the window, or with domain weights by its slot in the epoch, so a window shown twice
        # gets different blanks
        rng = np.random.default_rng([self.seed, self.epoch, int(window) if self._doc_starts is None else int(slot)])
        ex, _ = build_example(tokens, self.seq_len, rng, self.special, self.sentence_end, self.cfg)
        return ex

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
            self._plan_epoch()
        lo = self.step * self.global_batch + self.rank * self.batch_size
        windows = self.perm[lo : lo + self.batch_size]
        self.step += 1
        return collate([self.example(w, lo + i) for i, w in enumerate(windows)], self.special.pad, self.seq_len)
