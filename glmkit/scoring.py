"""Scoring: numbers read off a model through GLM's blank-infilling objective, for training and evaluation.

    objective = GLMObjective(model)                       # (summed NLL of Part B) for a collated batch
    losses = objective_losses(objective, shards, special, sentence_end, seq_len, batch_size, batches)
    bpc = bits_per_char(objective, shards, special, seq_len, docs_per_domain=32)
    run = model_objective(model)                          # (summed NLL, predicted tokens) for a bare model

`objective` in the two measures is a callable taking a collated batch and returning (summed NLL,
number of predicted tokens); training passes its (possibly DDP/FSDP-wrapped) loss module so
evaluation runs through the same code path on every rank.

Bits per character: each held-out document (up to seq_len-2 tokens) is scored as GLM generation
from nothing: Part A is a lone `[gMASK]`, Part B is `<sop>` + the document. Total NLL over the
document's tokens (the closing `<eop>` excluded), in bits, divided by the characters those tokens
decode to: the model's unconditional likelihood of the text, comparable across tokenizers.

train, evaluate and finetune import from here; this module imports none of them.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .infill import InfillConfig, SpecialIds, assemble, collate


class GLMObjective(nn.Module):
    """Summed cross-entropy over the predicted (Part B) tokens of a batch.

    A module of its own so DDP/FSDP wrap the whole computation, head included: the head is applied
    only to the selected positions (Part B is 15-100% of a sequence), saving its FLOPs elsewhere.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    ROWS = 128  # the head's row count is rounded up to a multiple of this (see forward)

    def forward(self, input_ids, position_ids, sep, targets, loss_mask):
        h = self.model(input_ids, position_ids, sep=sep, hidden_only=True)  # (B, T, C)
        rows, want = h[loss_mask], targets[loss_mask]  # (N, C), (N,)
        # N changes with every batch; a CPU bf16 product of a new shape makes oneDNN build (and cache, up to 1,024 of
        # them) a new primitive with its own copy of the head's weights: ~12 MB of memory per distinct N, which grew a
        # bf16 pretraining run by ~13 MB a step. Zero rows up to a multiple of ROWS, their targets ignored: a few
        # shapes recur, the sum is the same.
        pad = -len(rows) % self.ROWS
        if pad:
            rows = torch.cat((rows, rows.new_zeros(pad, rows.shape[1])))
            want = torch.cat((want, want.new_full((pad,), -100)))
        logits = self.model.logits(rows)  # (N + pad, V)
        return F.cross_entropy(logits.float(), want, reduction="sum", ignore_index=-100)


MODES = {"MASK": (1.0, 0.0, 0.0), "sMASK": (0.0, 1.0, 0.0), "gMASK": (0.0, 0.0, 1.0)}


@torch.no_grad()
def objective_losses(objective, shards, special: SpecialIds, sentence_end, seq_len: int, batch_size: int,
                     batches: int, cfg: InfillConfig | None = None, seed: int = 1234) -> dict:
    """Mean held-out loss (nats/token) of each objective, on fixed held-out windows."""
    from .data.loader import InfillLoader

    out = {}
    batch_size = min(batch_size, shards.num_tokens("heldout") // seq_len)
    if batch_size == 0:  # a held-out split shorter than one window: nothing to measure this way
        return out
    for mode, mix in MODES.items():
        loader = InfillLoader(shards, "heldout", seq_len, batch_size, special, sentence_end,
                              replace(cfg or InfillConfig(), mixture=mix), seed=seed)
        nll = n = 0.0
        for _ in range(min(batches, loader.steps_per_epoch)):
            s, c = objective(next(loader))
            nll, n = nll + float(s), n + float(c)
        out[mode] = nll / max(n, 1.0)
    return out


def _gmask_bits(objective, docs, special: SpecialIds, seq_len: int, batch_size: int, tokenizer) -> tuple[float, int, int]:
    """(total bits, characters, tokens) of documents (token id arrays) scored as [gMASK] generation."""
    examples, chars, tokens = [], 0, 0
    for ids in docs:
        ids = np.asarray(ids)[: seq_len - 2]  # fit [gMASK] <sop>
        if len(ids) == 0:
            continue
        ex = assemble(ids, [(0, len(ids))], [special.gmask], [0], special, mode="gMASK")
        ex.loss_mask[-1] = False  # the closing <eop> is not text
        examples.append(ex)
        chars += len(tokenizer.decode(ids.tolist()))
        tokens += len(ids)
    nll = 0.0
    for i in range(0, len(examples), batch_size):
        s, _ = objective(collate(examples[i : i + batch_size], special.pad))
        nll += float(s)
    return nll / math.log(2), chars, tokens


@torch.no_grad()
def bits_per_char(objective, shards, special: SpecialIds, seq_len: int, batch_size: int = 8,
                  docs_per_domain: int = 32, tokenizer=None) -> dict:
    """Bits per character per domain of the first `docs_per_domain` held-out documents."""
    tokenizer = tokenizer or shards.tokenizer()
    docs = shards.docs("heldout")
    domains = shards.index["domains"]
    result = {}
    for d, name in enumerate(domains):
        rows = docs[docs[:, 3] == d][:docs_per_domain]
        if len(rows) == 0:
            continue
        ids = [shards.read("heldout", int(start), int(n))[:-1] for start, n, _, _ in rows]  # drop eos
        bits, chars, _ = _gmask_bits(objective, ids, special, seq_len, batch_size, tokenizer)
        result[name] = bits / max(chars, 1)
    return result


def model_objective(model):
    """The training loop's objective (summed NLL, predicted tokens) for a bare model."""
    obj = GLMObjective(model)

    def run(batch):
        b = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
        return obj(**b), b["loss_mask"].sum()

    return run
