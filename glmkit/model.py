"""The GLM family as one config-driven Transformer, with its KV cache and one cached step.

    from glmkit.config import get_preset
    from glmkit.model import GLM
    model = GLM(get_preset("debug"))
    logits = model(input_ids)                          # causal, (B, T, V), no cache
    logits = model(input_ids, position_ids, sep=sep)   # GLM prefix-LM: keys < sep seen by all
    cache = model.new_cache(B, max_len)
    logits = model.prefill(input_ids, cache, sep=sep)  # the next T slots of every row
    logits = model.step(tokens, position_ids, cache, slots)   # any slots: a decode step, rows at own lengths
    logits = model.step_many([Part(tokens, pos, cache, slots), Part(chunk, pos2, cache2, slots2)])  # one pass

One module covers the original GLM (learned 2D positions, LayerNorm, GELU), ChatGLM-6B (2D RoPE,
alpha-scaled residual on the normed input), GLM-4 (partial interleaved RoPE, RMSNorm, SwiGLU, GQA,
q/k/v bias), GLM-4-0414 (sandwich norms) and GLM-4.5 / 4.6 / 4.7 (routed experts with a shared one after
dense first layers, q/k norms, half-split partial rotary, and multi-token-prediction layers kept in
`mtp` that forward does not run: `mtp_logits` drafts with them, `mtp_step` through a cache of their own
for `speculative`); the switches live in `ModelConfig`, the blocks in `layers`.

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
for torch.compile). `KVCache` holds them in preallocated tensors. `PagedKVCache` holds them in
fixed-size blocks of a `BlockPool`: each row has a block table, `begin` allocates blocks as a row's
slots grow (copying a shared block before it is written), `update` writes through the table and
gathers slots [0, extent) into (n, K, extent, D) for attention, and `copy_rows` (prompt reuse,
compaction) shares blocks by reference count instead of copying keys. A pool may keep its keys and
values in int8 (`BlockPool(..., dtype=torch.int8)`): half a bf16 cache's bytes, each key and value
vector quantized as it is written with its own scale (`quantize_kv`) and dequantized as it is read,
to the dtype of the keys written; the native decode step reads the int8 blocks directly. The
contiguous `KVCache` (what `generate` uses) has no int8 form.

Latent attention (ModelConfig.attention "mla") uses the same interface with its own widths
(`ModelConfig.kv_layout`): a layer's "key" is one head holding each token's latent [c ; k_pe]
(kv_lora_rank + qk_rope_head_dim values) and its "value" has width 0, so both caches store exactly
the compressed width per token and layer; `layers.LatentAttention` reads the values from c. A pool
for such a model has no int8 form.

Several batches in one forward. `GLM.step_many` runs `Part`s, each a `step` of its own (rows of its
own cache, its own slots, mask and extent), as one ragged token list: the serving engine's decode rows
and a prompt's prefill chunk go through the linears together, so a step reads the weights once
instead of once per part; attention stays per part (`layers.Segment`). One part is `step` itself.

Letters in shape comments: B batch, T query length, S key length, C model dim, H query heads,
K key/value heads, D head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import fused, kernels
from .config import ModelConfig
from .devices import release_freed_heap
from .layers import Block, MTPLayer, Norm, Rotary, Segment


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


class PoolExhausted(MemoryError):
    """The block pool has no free block: a row could not grow."""


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per vector over the last dim (a head's D): x (..., D) -> q (..., D) int8 and its
    scale s (...) fp32, x ~ q * s with s = max|x| / 127, q = round(x / s). A zero vector gets s = 0.
    One scale per vector (not per block) keeps a key independent of the others in its block, so a
    block fills slot by slot and a shared block needs no requantizing. The scales are fp32: 4 bytes per
    head_dim int8 bytes (3% at 128); bf16 would save 1.5% and add a rounding of every key's scale. The
    native step (csrc/decode.cpp `store_kv`) quantizes by the same rule."""
    x = x.float()
    s = x.abs().amax(-1) / 127
    q = torch.round(x / s.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).clamp_(-127, 127)
    return q.to(torch.int8), s


class BlockPool:
    """Keys and values of every layer in fixed-size blocks, k and v (L, N + 1, K, block, D), with valid
    flags (N + 1, block) per slot and a reference count per block, shared by the `PagedKVCache`s made
    on it. Block 0 is the null block: zero, never valid, never handed out; unused table entries point
    to it, so a gather reads zeros there. The tensors are allocated empty (untouched pages cost no
    memory on CPU) and a block is zeroed when handed out: resident memory follows the blocks in use.

    `dtype` is what the keys are stored in: a float dtype (the model's), or torch.int8, which adds
    k_scale and v_scale (L, N + 1, K, block) fp32, one per key and value vector (`quantize_kv`): keys
    are quantized by `write` and dequantized by `read`, so a cache on the pool works as a float one."""

    def __init__(self, n_layers, n_blocks, n_kv_heads, block, head_dim, dtype=torch.float32, device=None,
                 value_dim: int | None = None):
        if not (dtype.is_floating_point or dtype == torch.int8):
            raise ValueError(f"a KV block pool holds a float dtype or torch.int8, not {dtype}")
        value_dim = head_dim if value_dim is None else value_dim  # 0: keys only (latent attention)
        if dtype == torch.int8 and value_dim == 0:
            raise ValueError("an int8 KV block pool is not available for latent attention (attention='mla'); "
                             "use the model's float dtype for the KV cache (--kv-dtype auto)")
        shape = (n_layers, n_blocks + 1, n_kv_heads, block, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape[:-1] + (value_dim,), dtype=dtype, device=device)
        self.k_scale = self.v_scale = None
        if dtype == torch.int8:
            self.k_scale, self.v_scale = (torch.empty(shape[:-1], dtype=torch.float32, device=device) for _ in "kv")
        for t in self._per_block():
            t[:, 0].zero_()
        self.valid = torch.zeros(n_blocks + 1, block, dtype=torch.bool, device=device)
        self.block, self.n_blocks = block, n_blocks
        self.refs = [0] * (n_blocks + 1)
        self.free = list(range(n_blocks, 0, -1))  # pop() hands out low block numbers first

    @classmethod
    def for_model(cls, model, n_blocks: int, block: int = 16, dtype: torch.dtype | None = None) -> BlockPool:
        """A pool for `model`'s layers, in `dtype` (default the model's; torch.int8 for int8 KV)."""
        p, cfg = model.embed.weight, model.cfg
        K, Dk, Dv = cfg.kv_layout
        return cls(cfg.n_layers, n_blocks, K, block, Dk, dtype or p.dtype, p.device, value_dim=Dv)

    @staticmethod
    def block_bytes(cfg: ModelConfig, block: int, dtype: torch.dtype) -> int:
        """Bytes of one block: keys and values of every layer (int8: and their fp32 scales), and its valid flags."""
        K, Dk, Dv = cfg.kv_layout
        vectors = cfg.n_layers * K * block
        scales = 2 * vectors * 4 if dtype == torch.int8 else 0
        return vectors * (Dk + Dv) * torch.empty((), dtype=dtype).element_size() + scales + block

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def _per_block(self) -> list[torch.Tensor]:
        """The tensors indexed [layer, block, ...]: keys, values and (int8) their scales."""
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]

    def write(self, index, k: torch.Tensor, v: torch.Tensor):
        """Store keys and values at `index` into the (L, N + 1, K, block) dims (what it selects, times D,
        is k's and v's shape): cast to the pool's dtype, or quantized with their scales."""
        if self.k_scale is None:
            self.k[index], self.v[index] = k.to(self.k.dtype), v.to(self.v.dtype)
            return
        (self.k[index], self.k_scale[index]), (self.v[index], self.v_scale[index]) = quantize_kv(k), quantize_kv(v)

    def read(self, layer: int, blocks: torch.Tensor, dtype: torch.dtype, values: bool = False) -> torch.Tensor:
        """Keys (or `values`) of `layer` in `blocks` (block ids of any shape (*)): (*, K, block, D) in `dtype`,
        a copy (int8: dequantized, the product taken in fp32). One tensor at a time, so a caller that
        reshapes the keys before reading the values never holds two copies of both."""
        t, s = (self.v, self.v_scale) if values else (self.k, self.k_scale)
        if s is None:
            return t[layer, blocks]
        return (t[layer, blocks].float() * s[layer, blocks][..., None]).to(dtype)

    def copy_block(self, dst: int, src: int):
        """Block `dst` takes `src`'s keys, values, scales and valid flags (copy-on-write)."""
        for t in self._per_block():
            t[:, dst] = t[:, src]
        self.valid[dst] = self.valid[src]

    @property
    def num_free(self) -> int:
        return len(self.free)

    def alloc(self) -> int:
        if not self.free:
            raise PoolExhausted(f"the KV block pool is full ({self.n_blocks} blocks of {self.block} slots in use)")
        b = self.free.pop()
        self.refs[b] = 1
        for t in self._per_block():  # masked slots must hold finite numbers (0 x NaN is NaN)
            t[:, b].zero_()
        self.valid[b] = False
        return b

    def share(self, b: int):
        self.refs[b] += 1

    def release(self, b: int):
        self.refs[b] -= 1
        if self.refs[b] == 0:
            self.free.append(b)


class PagedKVCache:
    """The cache interface over a `BlockPool`: rows of up to `max_len` slots, slot s of row b in block
    `blocks[b][s // block]` at offset s % block. `table` (B, max_len / block) is the same on the
    device, 0 (the null block) past a row's blocks. Blocks are allocated in `begin` (or `reserve`) as a
    row's slots grow; a block shared with another row or cache (refs > 1) is copied before a write
    touches it. `release` gives a row's blocks back. `sep` (B,) and `length` as in KVCache."""

    def __init__(self, pool: BlockPool, batch: int, max_len: int):
        self.pool, self.max_len, self.length = pool, max_len, 0
        dev = pool.valid.device
        self.table = torch.zeros(batch, -(-max_len // pool.block), dtype=torch.long, device=dev)
        self.blocks: list[list[int]] = [[] for _ in range(batch)]
        self.sep = torch.zeros(batch, dtype=torch.long, device=dev)
        self._rows = torch.arange(batch, device=dev)[:, None]
        self._at = None  # (block, offset) of the slots of the current step, set by begin

    def reserve(self, row: int, lo: int, hi: int):
        """Make slots [lo, hi) of `row` writable: blocks allocated up to slot hi, any shared block among
        those holding [lo, hi) copied (copy-on-write). Raises PoolExhausted when no block is free."""
        bs, pool, blocks = self.pool.block, self.pool, self.blocks[row]
        if hi > self.max_len:
            raise ValueError(f"slot {hi - 1} outside the cache's {self.max_len} slots")
        for j in range(lo // bs, min(len(blocks), -(-hi // bs))):
            if pool.refs[blocks[j]] > 1:  # shared: this row gets its own copy before writing
                b = pool.alloc()
                pool.copy_block(b, blocks[j])
                pool.release(blocks[j])
                blocks[j] = b
                self.table[row, j] = b
        while len(blocks) * bs < hi:
            blocks.append(pool.alloc())
            self.table[row, len(blocks) - 1] = blocks[-1]

    def release(self, rows):
        """Give the blocks of `rows` (an int or an iterable) back to the pool; the rows become empty."""
        for r in [rows] if isinstance(rows, int) else rows:
            for b in self.blocks[r]:
                self.pool.release(b)
            self.blocks[r] = []
            self.table[r] = 0
            self.sep[r] = 0

    def _gather(self, t: torch.Tensor, n: int, extent: int | None) -> torch.Tensor:
        """Slots [0, extent) of rows [:n] of a per-block tensor t (N + 1, *shape, block, ...) through the table."""
        E = self.max_len if extent is None else extent
        return t[self.table[:n, : -(-E // self.pool.block)]]  # (n, nb, ..., block, ...)

    def begin(self, slots: torch.Tensor, valid: torch.Tensor | None = None, extent: int | None = None):
        n, bs = slots.shape[0], self.pool.block
        for row, (lo, hi) in enumerate(torch.stack((slots.amin(1), slots.amax(1) + 1), 1).tolist()):
            self.reserve(row, lo, hi)
        blk, off = self.table[self._rows[:n], slots // bs], slots % bs  # (n, T) each
        self._at = (slots, blk, off)
        self.pool.valid[blk, off] = True if valid is None else valid.bool()
        E = self.max_len if extent is None else extent
        return self._gather(self.pool.valid, n, extent).flatten(1)[:, :E], self.sep[:n]

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extent: int | None = None):
        n, (at, blk, off) = slots.shape[0], self._at
        if at is not slots:
            raise RuntimeError("PagedKVCache.update: slots differ from the step's begin")
        self.pool.write((layer, blk, slice(None), off), k.transpose(1, 2), v.transpose(1, 2))  # (n, T, K, D)
        E = self.max_len if extent is None else extent
        ids = self.table[:n, : -(-E // self.pool.block)]

        def gather(values: bool):  # (n, nb, K, block, D) -> (n, K, nb * block, D): a copy of every key read
            return self.pool.read(layer, ids, k.dtype, values).transpose(1, 2).flatten(2, 3)[:, :, :E]
        return gather(False), gather(True)

    def copy_rows(self, rows, src, src_rows, n: int):
        """Rows `rows` take slots [:n] of `src`'s rows `src_rows` (as KVCache.copy_rows). From a
        PagedKVCache on the same pool the blocks are shared (a partly filled last block is copied on
        its first write; one holding the source's valid keys past n is copied at once); from any other
        cache the keys are copied into new blocks."""
        def ids(r, size):
            if isinstance(r, int):
                return [r]
            if isinstance(r, slice):
                return list(range(*r.indices(size)))
            return [int(i) for i in r]
        dst = ids(rows, len(self.blocks))
        srcs = ids(src_rows, len(src.blocks) if isinstance(src, PagedKVCache) else src.k.shape[1])
        if len(srcs) == 1:
            srcs = srcs * len(dst)
        bs, pool = self.pool.block, self.pool
        nb = -(-n // bs)
        if isinstance(src, PagedKVCache) and src.pool is pool:
            new = [src.blocks[s][:nb] for s in srcs]
            if any(len(b) < nb for b in new):
                raise ValueError(f"copy_rows: a source row holds fewer than {n} slots")
            for b in (b for bl in new for b in bl):  # share first: a row copied onto itself keeps its blocks
                pool.share(b)
            seps = [int(src.sep[s]) for s in srcs]
            for d, bl, sep in zip(dst, new, seps):
                self.release(d)
                self.blocks[d] = list(bl)
                self.table[d, :nb] = torch.tensor(bl, dtype=torch.long)
                self.sep[d] = sep
                if n % bs and bool(pool.valid[bl[-1], n % bs:].any()):  # keys past n must not show here
                    self.reserve(d, n - 1, n)
                    pool.valid[self.blocks[d][-1], n % bs:] = False
            return
        for d, s in zip(dst, srcs):  # another kind of cache: copy the keys block by block
            self.release(d)
            self.reserve(d, 0, n)
            for j, b in enumerate(self.blocks[d]):
                lo, hi = j * bs, min(n, (j + 1) * bs)
                pool.write((slice(None), b, slice(None), slice(0, hi - lo)), src.k[:, s, :, lo:hi], src.v[:, s, :, lo:hi])
                pool.valid[b, : hi - lo] = src.valid[s, lo:hi]
            self.sep[d] = src.sep[s]


def visible(valid: torch.Tensor, sep: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """GLM's attention mask (B, 1, T, S) for queries at slots (B, T) over keys 0..S-1 of valid (B, S):
    key k is visible to the query at slot q when valid[b, k] and (k < sep[b] or k <= q). A query
    always sees itself, so a padding query gets a finite, ignored output instead of NaN."""
    k, q = torch.arange(valid.shape[1], device=valid.device), slots[:, :, None]
    seen = (valid[:, None] & ((k < sep[:, None, None]) | (k <= q))) | (k == q)
    return seen[:, None]


@dataclass
class Part:
    """The arguments of one `GLM.step` (see there), as a part of `GLM.step_many`."""
    input_ids: torch.Tensor  # (n, T)
    position_ids: torch.Tensor  # (n, T) or (n, 2, T)
    cache: object
    slots: torch.Tensor  # (n, T)
    valid: torch.Tensor | None = None
    extent: int | None = None
    last_only: bool = False


LARGE_STEP = 1024  # tokens in one CPU step after which the C heap's free pages go back to the OS


def _trim_after(n_tokens: int, device: torch.device) -> None:
    """After a long prefill on CPU: glibc keeps the freed activations' pages (0.7 GiB after a 2,048-token prefill of
    GLM-4.7-Flash) resident for the process's lifetime unless asked (devices.release_freed_heap)."""
    if device.type == "cpu" and n_tokens >= LARGE_STEP:
        release_freed_heap()


class GLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        if cfg.position == "learned_2d":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim)
            self.block_pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        if cfg.index_n_heads:  # GLM-5: "S" layers reuse the choice of the "F" layer before them (LatentAttention)
            choice = {}
            for block in self.layers:
                block.attn.choice = choice
        # GLM-4.5's multi-token-prediction layers: weights kept with the model, run only by mtp_logits
        self.mtp = nn.ModuleList(MTPLayer(cfg, cfg.n_layers + i) for i in range(cfg.n_mtp_layers))
        self.norm = Norm(cfg.dim, cfg.norm, cfg.norm_eps) if cfg.final_norm else nn.Identity()
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
                s = std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("attn.out.weight", "down.weight")) else std
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

    def _embed(self, input_ids, pos, block) -> torch.Tensor:
        """Input embeddings (B, T, C), with the learned 2D position embeddings where the model has them."""
        x = self.embed(input_ids)
        if self.cfg.position == "learned_2d":
            x = x + self.pos_embed(pos) + self.block_pos_embed(block)
        return x

    def _run(self, input_ids, pos, block, mask, cache=None, slots=None, extent=None, hidden_only=False, last_only=False):
        x = self._embed(input_ids, pos, block)  # (B, T, C)
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

    def mtp_logits(self, hidden: torch.Tensor, next_ids: torch.Tensor, position_ids=None, depth: int = 0) -> torch.Tensor:
        """Draft logits (B, T, V) of multi-token-prediction layer `depth` over a whole sequence, causal, no
        cache: position t, from the final hidden state hidden[:, t] (B, T, C: forward's `hidden_only`
        output, after the final norm, as vLLM, SGLang and llama.cpp feed GLM-4.5's: see layers.MTPLayer) and
        the next token next_ids[:, t],
        predicts the token after that."""
        self._check_depth(depth)
        pos, block = self._positions(next_ids, position_ids)
        x = self._embed(next_ids, pos, block)
        layer = self.mtp[depth]
        return self.logits(layer.shared_head_norm(layer(hidden, x, Rotary(self.cfg, pos, block, x.dtype), None)))

    def mtp_step(self, hidden, next_ids, position_ids, cache, slots, *, valid=None, extent=None, depth: int = 0):
        """`mtp_logits` through a KV cache of the MTP layers (`new_mtp_cache`), as `step` is forward's: the
        pairs (hidden[:, t], next_ids[:, t]) (n, T, C) and (n, T) of rows [:n] at position_ids (n, T),
        their keys written at `slots` (n, T) of layer `depth`; `valid` (n, T): 0 marks padding; attention
        over slots [0, extent). Returns (logits (n, T, V), the block's output (n, T, C) before the
        layer's head norm: the h a chained draft feeds back)."""
        self._check_depth(depth)
        pos, block = self._positions(next_ids, position_ids)
        x = self._embed(next_ids, pos, block)
        mask = visible(*cache.begin(slots, valid, extent), slots)
        layer = self.mtp[depth]
        out = layer(hidden, x, Rotary(self.cfg, pos, block, x.dtype), mask, cache, depth, slots, extent)
        return self.logits(layer.shared_head_norm(out)), out

    def new_mtp_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A KVCache for the MTP layers (layer i of it is mtp[i]'s attention), shaped as `new_cache`'s."""
        if not len(self.mtp):
            raise ValueError("this model has no multi-token-prediction layer (n_mtp_layers = 0): nothing to cache")
        return self.new_cache(batch_size, max_len, n_layers=len(self.mtp))

    def _check_depth(self, depth: int):
        if not 0 <= depth < len(self.mtp):
            raise ValueError(f"this model has {len(self.mtp)} multi-token-prediction layer(s) (n_mtp_layers); "
                             f"depth {depth} does not exist")

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

    def new_cache(self, batch_size: int, max_len: int | None = None, n_layers: int | None = None) -> KVCache:
        """A KVCache of batch_size rows and max_len slots (default max_seq_len) for the model's layers
        (`n_layers`: that many, for `new_mtp_cache`)."""
        p, cfg, S = self.embed.weight, self.cfg, max_len or self.cfg.max_seq_len
        L = cfg.n_layers if n_layers is None else n_layers
        K, Dk, Dv = cfg.kv_layout  # latent attention: one key head of the latent, values of width 0
        if Dk == Dv:  # keys and values in one allocation
            kv = torch.zeros(2, L, batch_size, K, S, Dk, device=p.device, dtype=p.dtype)
            k, v = kv[0], kv[1]  # indexed, not unpacked: views of unbind may not be written in place
        else:
            k = torch.zeros(L, batch_size, K, S, Dk, device=p.device, dtype=p.dtype)
            v = torch.zeros(L, batch_size, K, S, Dv, device=p.device, dtype=p.dtype)
        return KVCache(k, v, torch.zeros(batch_size, S, dtype=torch.bool, device=p.device),
                       torch.zeros(batch_size, dtype=torch.long, device=p.device))

    def step(self, input_ids, position_ids, cache, slots, *, valid=None, extent=None, last_only=False, plan=None,
             hidden_only=False):
        """The one cached forward: input_ids (n, T) of rows [:n] of `cache` at position_ids (n, T) or
        (n, 2, T), their keys and values written at `slots` (n, T) long, each row its own (prefill: T
        consecutive slots; a decode step: one per row). `valid` (n, T): 0 marks padding; `extent`:
        attend over slots [0, extent) only, which must hold every slot written (None: the whole cache,
        static shapes). Returns logits (n, T, V), or (n, 1, V) with `last_only`; with `hidden_only` the final
        hidden states (n, T, C) instead (what the MTP layers read; `logits` turns them into logits).

        A decode step (T = 1) of a few rows on CPU runs as one native call (`fused.decode_step`) when
        it applies; `plan`: fused.decode_plan(model), got once by a loop whose model does not change.
        Only for a GLM itself and its own caches (KVCache, PagedKVCache): a subclass may change what a
        step computes, another cache keeps its keys elsewhere.
        """
        pos, block = self._positions(input_ids, position_ids)
        if input_ids.shape[1] == 1 and valid is None and not hidden_only and type(self) is GLM and type(cache) in (KVCache, PagedKVCache):
            if type(cache) is PagedKVCache:  # the kernel writes through the table: blocks first
                for row, s in enumerate(slots[:, 0].tolist()):
                    cache.reserve(row, s, s + 1)
            logits = fused.decode_step(self, cache, input_ids[:, 0], pos[:, 0], block[:, 0], slots[:, 0], plan)
            if logits is not None:
                return logits[:, None]
        mask = visible(*cache.begin(slots, valid, extent), slots)
        out = self._run(input_ids, pos, block, mask, cache, slots, extent, hidden_only=hidden_only, last_only=last_only)
        _trim_after(input_ids.numel(), input_ids.device)
        return out

    def step_many(self, parts: list[Part]) -> list[torch.Tensor]:
        """Several `step`s as one forward: every part's tokens go through the linears, norms and MLPs as
        one ragged list (N, C), so the weights are read once; attention is per part, each against its
        own cache with its own mask. Returns each part's logits as its `step` would (within summation
        order: the rows are multiplied in a larger product). One part is `step` itself, so a decode
        step alone keeps its native path. Parts must not write the same cache rows."""
        if len(parts) == 1:
            p = parts[0]
            return [self.step(p.input_ids, p.position_ids, p.cache, p.slots, valid=p.valid, extent=p.extent,
                              last_only=p.last_only)]
        xs, segments = [], []
        for p in parts:
            n, T = p.input_ids.shape
            pos, block = self._positions(p.input_ids, p.position_ids)
            x = self._embed(p.input_ids, pos, block)  # (n, T, C)
            mask = visible(*p.cache.begin(p.slots, p.valid, p.extent), p.slots)
            segments.append(Segment(n, T, Rotary(self.cfg, pos, block, x.dtype), mask, p.cache, p.slots, p.extent))
            xs.append(x.flatten(0, 1))
        x = torch.cat(xs)  # (N, C): part after part, row after row
        for i, layer in enumerate(self.layers):
            x = layer.ragged(x, segments, i)
        hs = [h.view(s.n, s.T, -1)[:, -1:] if p.last_only else h.view(s.n, s.T, -1)
              for p, s, h in zip(parts, segments, x.split([s.n * s.T for s in segments]))]
        logits = self.logits(self.norm(torch.cat([h.flatten(0, 1) for h in hs])))  # one pass over the head too
        _trim_after(x.shape[0], x.device)
        return [lg.view(h.shape[0], h.shape[1], -1) for h, lg in zip(hs, logits.split([h.shape[0] * h.shape[1] for h in hs]))]

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
