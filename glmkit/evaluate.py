"""Evaluation on held-out data: loss per GLM objective and bits per character per domain.

    losses = objective_losses(objective, shards, tok_special, sentence_end, seq_len, batches=4)
    bpc = bits_per_char(objective, shards, special, seq_len, docs_per_domain=32)

`objective` is a callable taking a collated batch and returning (summed NLL, number of predicted
tokens); training passes its (possibly DDP/FSDP-wrapped) loss module so evaluation runs through
the same code path on every rank.

Bits per character: each held-out document (up to seq_len-2 tokens) is scored as GLM generation
from nothing: Part A is a lone `[gMASK]`, Part B is `<sop>` + the document. Total NLL over the
document's tokens (the closing `<eop>` excluded), in bits, divided by the characters those tokens
decode to. This is the model's unconditional likelihood of the text, comparable across
tokenizers.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .infill import InfillConfig, SpecialIds, assemble, collate

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
        examples, chars = [], 0
        for start, n, _, _ in rows:
            ids = shards.read("heldout", int(start), int(n))[:-1][: seq_len - 2]  # drop eos; fit [gMASK] <sop>
            if len(ids) == 0:
                continue
            ex = assemble(ids, [(0, len(ids))], [special.gmask], [0], special, mode="gMASK")
            ex.loss_mask[-1] = False  # the closing <eop> is not text
            examples.append(ex)
            chars += len(tokenizer.decode(ids.tolist()))
        nll = 0.0
        for i in range(0, len(examples), batch_size):
            s, _ = objective(collate(examples[i : i + batch_size], special.pad))
            nll += float(s)
        result[name] = nll / math.log(2) / max(chars, 1)
    return result


def special_ids(tokenizer) -> SpecialIds:
    """The GLM special ids of a tokenizer, by role (padding uses eos: it is never a target)."""
    eos = tokenizer.special("eos")
    return SpecialIds(mask=tokenizer.special("mask"), smask=tokenizer.special("smask"), gmask=tokenizer.special("gmask"),
                      sop=tokenizer.special("sop"), eop=tokenizer.special("eop"), eos=eos, pad=eos)


