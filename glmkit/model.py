"""The GLM family as one config-driven Transformer, with its KV cache and one cached step.

    from glmkit.config import get_preset
    from glmkit.model import GLM
    model = GLM(get_preset("debug"))
    logits = model(input_ids)                          # causal, (B, T, V), no cache
    logits = model(input_ids, position_ids, sep=sep)   # GLM prefix-LM: keys < sep seen by all
    cache = model.new_cache(B, max_len)
    logits = model.prefill(input_ids, cache, sep=sep)  # the next T slots of every row
    logits = model.step(tokens, position_ids, cache, slots)   # any slots: a decode step, rows at own lengths

One module covers the original GLM (learned 2D positions, LayerNorm, GELU), ChatGLM-6B (2D RoPE,
alpha-scaled residual on the normed input), GLM-4 (partial interleaved RoPE, RMSNorm, SwiGLU, GQA,
q/k/v bias) and GLM-4-0414 (sandwich norms); the switches live in `ModelConfig`, the blocks in `layers`.

Attention follows GLM's blank-infilling mask, written once (`visible`): key k is visible to the query
at slot q when it is valid (not padding) and `k < sep` (Part A, read bidirectionally) or `k <= q`
(causal). `sep = 0` is a plain causal LM. The mask is built once per forward and shared by all layers.
Positions are either (B, T) or (B, 2, T) = (position, block position). Block positions matter for
`learned_2d` and `rope_2d`; `rope_partial` (GLM-4) reads only the first row.

The cache interface. `GLM.step` is the one cached forward (prefill is a step at a row's next T slots;
a decode step writes one slot per row, anywhere), and a cache is whatever has its two methods, indexed
by slot tensors (n, T) for rows [:n]: `begin(slots, valid, extent)`, once per step, records which new
keys are real and returns what the mask reads, the valid flags of slots [0, extent) and each row's
Part A length `sep`; `update(layer, slots, k, v, extent)` writes a layer's new keys and values at
`slots` and returns those of slots [0, extent) for attention (extent None: every slot, static shapes
for torch.compile). `KVCache` holds them in preallocated tensors; a paged cache would map slots through
each row's block table in both (allocating blocks on demand in `begin`) and gather in `update`, and
implement `copy_rows` (beams, prompt reuse, compaction) by sharing blocks.

Letters in shape comments: B batch, T query length, S key length, C model dim, H query heads,
K key/value heads, D head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import fused, kernels
from .config import ModelConfig
from .layers import Block, Norm, Rotary


class KVCache:
    """Preallocated keys and values of every layer, k and v (L, B, K, S_max, D), with what the mask
    needs: `valid` (B, S_max) marks real (non-padding) keys, `sep` (B,) each row's Part A length,
    set by its first prefill. `length` counts the slots `GLM.prefill` has filled when all rows share
    it (generate's left-padded batches); the serving engine keeps each row's length itself."""

    def __init__(self, k, v, valid, sep):
        self.k, self.v, self.valid, self.sep = k, v, valid, sep
        self.max_len, self.length = valid.shape[1], 0
        self._rows = torch.arange(valid.shape[0], device=valid.device)[:, None]

    def begin(self, slots: torch.Tensor, valid: torch.Tensor | None = None, extent: int | None = None):
        n = slots.shape[0]
        self.valid[:n].scatter_(1, slots, True if valid is None else valid.bool())
        return self.valid[:n, :extent], self.sep[:n]

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extent: int | None = None):
        n, rows = slots.shape[0], self._rows[: slots.shape[0]]
        self.k[layer].transpose(1, 2)[rows, slots] = k.transpose(1, 2).to(self.k.dtype)  # (n, T, K, D)
        self.v[layer].transpose(1, 2)[rows, slots] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[layer, :n, :, :extent], self.v[layer, :n, :, :extent]

    def copy_rows(self, rows, src: KVCache, src_rows, n: int):
        """Rows `rows` take slots [:n] of `src`'s rows `src_rows` (keys, values, valid flags, sep); their
        later slots become free. Rows are an int, a slice or a long tensor, as many on both sides
        (or one source row as slice(i, i + 1), copied to all)."""
        self.k[:, rows, :, :n] = src.k[:, src_rows, :, :n]
        self.v[:, rows, :, :n] = src.v[:, src_rows, :, :n]
        self.valid[rows, :n] = src.valid[src_rows, :n]
        self.valid[rows, n:] = False
        self.sep[rows] = src.sep[src_rows]


def visible(valid: torch.Tensor, sep: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """GLM's attention mask (B, 1, T, S) for queries at slots (B, T) over keys 0..S-1 of valid (B, S):
    key k is visible to the query at slot q when valid[b, k] and (k < sep[b] or k <= q). A query
    always sees itself, so a padding query gets a finite, ignored output instead of NaN."""
    k, q = torch.arange(valid.shape[1], device=valid.device), slots[:, :, None]
    seen = (valid[:, None] & ((k < sep[:, None, None]) | (k <= q))) | (k == q)
    return seen[:, None]


class GLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.position == "learned_2d":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim)
            self.block_pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = Norm(cfg.dim, cfg.norm, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.head = kernels.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """N(0, init_std) for matrices, the residual-branch outputs scaled by 1/sqrt(2L) (GPT-2);
        zero biases, unit norms. Does nothing on the meta device (weights come from a checkpoint)."""
        if self.embed.weight.is_meta:
            return
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name:
                p.fill_(1.0)
            else:
                s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("attn.out.weight", "mlp.down.weight")) else std
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * s)

    # ---- inputs -------------------------------------------------------------------------------
    @staticmethod
    def _positions(input_ids, position_ids=None, attention_mask=None):
        """(positions, block positions), each (B, T); by default 0..T-1, counting only real tokens
        when `attention_mask` marks left padding."""
        if position_ids is None:
            B, T = input_ids.shape
            if attention_mask is not None:
                pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                pos = torch.arange(T, device=input_ids.device).expand(B, T)
            return pos, torch.zeros_like(pos)
        if position_ids.dim() == 3:  # (B, 2, T): positions and block positions
            return position_ids[:, 0], position_ids[:, 1]
        return position_ids, torch.zeros_like(position_ids)

    @staticmethod
    def _sep(sep, B, device):
        if sep is None:
            return torch.zeros(B, dtype=torch.long, device=device)
        if isinstance(sep, int):
            return torch.full((B,), sep, dtype=torch.long, device=device)
        return sep.to(device=device, dtype=torch.long).reshape(B)

    def _run(self, input_ids, pos, block, mask, cache=None, slots=None, extent=None, hidden_only=False, last_only=False):
        x = self.embed(input_ids)  # (B, T, C)
        if self.cfg.position == "learned_2d":
            x = x + self.pos_embed(pos) + self.block_pos_embed(block)
        rotary = Rotary(self.cfg, pos, block, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rotary, mask, cache, i, slots, extent)
        x = self.norm(x)
        if last_only:  # generation needs the next-token logits only: skip the head elsewhere
            x = x[:, -1:]
        return x if hidden_only else self.logits(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output head over final hidden states (..., C) -> (..., V)."""
        # a tied model has no `head` unless quantization gave it a quantized copy of the embedding
        return self.head(h) if hasattr(self, "head") else kernels.linear(h, self.embed.weight)

    # ---- entry points -------------------------------------------------------------------------
    def forward(self, input_ids, position_ids=None, sep=None, attention_mask=None, hidden_only=False):
        """Logits (B, T, V) for a whole sequence, no cache (final hidden states (B, T, C) with
        `hidden_only`, so training can apply the head to the loss positions only).

        input_ids (B, T); position_ids (B, T) or (B, 2, T), default 0..T-1 (counting only real
        tokens when `attention_mask` is given); sep: int or (B,) prefix lengths, indices into the
        given (possibly padded) rows, default 0 (causal); attention_mask (B, T): 1 for real tokens,
        0 for padding keys that nobody may attend to.
        """
        B, T = input_ids.shape
        pos, block = self._positions(input_ids, position_ids, attention_mask)
        mask = None  # causal, no padding: SDPA's fused causal path, no mask to build (checked without a host sync)
        if attention_mask is not None or not (sep is None or (isinstance(sep, int) and sep == 0)):
            dev = input_ids.device
            valid = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
            mask = visible(valid, self._sep(sep, B, dev), torch.arange(T, device=dev).expand(B, T))
        return self._run(input_ids, pos, block, mask, hidden_only=hidden_only)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p, cfg, S = self.embed.weight, self.cfg, max_len or self.cfg.max_seq_len
        kv = torch.zeros(2, cfg.n_layers, batch_size, cfg.n_kv_heads, S, cfg.head_dim, device=p.device, dtype=p.dtype)
        return KVCache(kv[0], kv[1], torch.zeros(batch_size, S, dtype=torch.bool, device=p.device),
                       torch.zeros(batch_size, dtype=torch.long, device=p.device))

    def step(self, input_ids, position_ids, cache, slots, *, valid=None, extent=None, last_only=False, plan=None):
        """The one cached forward: input_ids (n, T) of rows [:n] of `cache` at position_ids (n, T) or
        (n, 2, T), their keys and values written at `slots` (n, T) long, each row its own (prefill: T
        consecutive slots; a decode step: one per row). `valid` (n, T): 0 marks padding; `extent`:
        attend over slots [0, extent) only, which must hold every slot written (None: the whole cache,
        static shapes). Returns logits (n, T, V), or (n, 1, V) with `last_only`.

        A decode step (T = 1) of a few rows on CPU runs as one native call (`fused.decode_step`) when
        it applies; `plan`: fused.decode_plan(model), got once by a loop whose model does not change.
        Only for a GLM itself and a KVCache: a subclass may change what a step computes, another
        cache keeps its keys elsewhere.
        """
        pos, block = self._positions(input_ids, position_ids)
        if input_ids.shape[1] == 1 and valid is None and type(self) is GLM and type(cache) is KVCache:
            logits = fused.decode_step(self, cache, input_ids[:, 0], pos[:, 0], block[:, 0], slots[:, 0], plan)
            if logits is not None:
                return logits[:, None]
        mask = visible(*cache.begin(slots, valid, extent), slots)
        return self._run(input_ids, pos, block, mask, cache, slots, extent, last_only=last_only)

    def prefill(self, input_ids, cache: KVCache, position_ids=None, sep=None, attention_mask=None, last_only=False):
        """Run `input_ids` (B, T) after what `cache` holds (its `length`), writing their keys and values.

        The first call on an empty cache sets `sep`; later calls (a second chunk, a decode step, the
        `<sop>` of the next blank) continue causally after it and need explicit position_ids. Returns
        logits (B, T, V), or (B, 1, V) for the last position only with `last_only`.
        """
        B, T = input_ids.shape
        offset, dev = cache.length, input_ids.device
        if offset + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {offset} used, {T} more requested")
        if offset == 0:
            sep_t = self._sep(sep, B, dev)
            if int(sep_t.max()) > T:  # Part A keys must exist before any query attends to them
                raise ValueError(f"sep={sep_t.tolist()} exceeds the {T} tokens of the first prefill; prefill all of Part A at once")
            cache.sep[:B] = sep_t
        elif sep is not None:
            raise ValueError("sep can only be set by the first prefill of a cache")
        elif position_ids is None:
            raise ValueError("continuing a cache needs explicit position_ids")
        if position_ids is None:
            position_ids = self._positions(input_ids, None, attention_mask)[0]
        slots = torch.arange(offset, offset + T, device=dev).expand(B, T)
        logits = self.step(input_ids, position_ids, cache, slots, valid=attention_mask, extent=offset + T, last_only=last_only)
        cache.length = offset + T
        return logits
