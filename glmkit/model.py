"""The GLM family as one config-driven Transformer, with a static KV cache.

    from glmkit.config import get_preset
    from glmkit.model import GLM
    model = GLM(get_preset("debug"))
    logits = model(input_ids)                          # causal, (B, T, V)
    logits = model(input_ids, position_ids, sep=sep)   # GLM prefix-LM: keys < sep seen by all

One module covers the original GLM (learned 2D positions, LayerNorm, GELU), ChatGLM-6B (2D RoPE,
alpha-scaled residual on the normed input), GLM-4 (partial interleaved RoPE, RMSNorm, SwiGLU, GQA,
q/k/v bias) and GLM-4-0414 (sandwich norms); the switches live in `ModelConfig` (ARCHITECTURE §3).

Attention follows GLM's blank-infilling mask: for sample b, key k is visible to query q when
`k < sep[b]` (Part A, read bidirectionally) or `k <= q` (Part B, causal). `sep = 0` is a plain
causal LM. The mask is built once per forward and shared by all layers; attention runs through
`scaled_dot_product_attention` (via `kernels.attention`, which takes CPU bf16 attention through fp32).

Positions are either (B, T) or (B, 2, T) = (position, block position). Block positions matter for
`learned_2d` and `rope_2d`; `rope_partial` (GLM-4) reads only the first row.

Letters in shape comments: B batch, T query length, S key length, C model dim, H query heads,
K key/value heads, D head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .config import ModelConfig


class Norm(nn.Module):
    """LayerNorm (weight + bias) or RMSNorm (weight), both computed in fp32.

    Upcasting explicitly matters on CPU: reductions with `dtype=float32` over a bf16 tensor run ~40x
    slower than on an fp32 copy (PERF_NOTES). The RMSNorm order (normalize, cast back, scale) is
    the one HF GLM uses, so bf16 results match it bit for bit.
    """

    def __init__(self, dim: int, kind: str, eps: float):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps).to(x.dtype)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(pos: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin for positions `pos` (B, T): each (B, T, 1, rotary_dim/2), cast to `dtype`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=pos.device, dtype=torch.float32) / rotary_dim))
    freqs = pos.float()[..., None] * inv_freq  # (B, T, r/2)
    return freqs.cos()[:, :, None, :].to(dtype), freqs.sin()[:, :, None, :].to(dtype)


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + r/2]) of x (..., r): the GPT-NeoX / ChatGLM-6B layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (..., r): the GLM-4 layout."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


class Rotary:
    """Applies the config's rotary scheme to q or k of shape (B, T, heads, D).

    Built once per forward from the position ids, shared by every layer.
    """

    def __init__(self, cfg: ModelConfig, pos: torch.Tensor, block: torch.Tensor, dtype: torch.dtype):
        self.kind, r = cfg.position, cfg.rotary_dim
        if self.kind == "rope_2d":
            self.pos = rope_cos_sin(pos, r, cfg.rope_theta, dtype)
            self.block = rope_cos_sin(block, r, cfg.rope_theta, dtype)
        elif self.kind == "rope_partial":
            self.pos = rope_cos_sin(pos, r, cfg.rope_theta, dtype)
        self.r = r

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rope_2d":  # first half by position, second by block position
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((rotate_halves(x1, *self.pos), rotate_halves(x2, *self.block)), dim=-1)
        if self.kind == "rope_partial":
            return torch.cat((rotate_interleaved(x[..., : self.r], *self.pos), x[..., self.r :]), dim=-1)
        return x


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # one fused projection, rows laid out [Q (H*D) | K (K*D) | V (K*D)]
        self.qkv = kernels.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.out = kernels.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.out_bias)

    def forward(self, x, rotary: Rotary, mask: torch.Tensor, cache: "KVCache | None", layer: int, offset: int):
        B, T, _ = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split((H * D, K * D, K * D), dim=-1)
        q = rotary(q.view(B, T, H, D)).transpose(1, 2)  # (B, H, T, D)
        k = rotary(k.view(B, T, K, D)).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if cache is not None:
            k, v = cache.update(layer, offset, k, v)  # (B, K, S, D), S = offset + T
        # mask None: plain causal attention over the whole sequence, SDPA's fused causal path
        y = kernels.attention(q, k, v, mask, enable_gqa=K != H)  # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        # swiglu: rows [gate (F) | up (F)], as HF GLM's gate_up_proj
        self.up = kernels.Linear(cfg.dim, cfg.ffn_dim * (2 if self.swiglu else 1), bias=cfg.mlp_bias)
        self.down = kernels.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.up(x).chunk(2, dim=-1)  # (B, T, F) each
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.deepnorm, self.alpha = cfg.residual == "deepnorm", cfg.residual_alpha
        self.norm1 = Norm(cfg.dim, cfg.norm, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = Norm(cfg.dim, cfg.norm, cfg.norm_eps)
        self.mlp = MLP(cfg)
        if cfg.sandwich_norm:
            self.post_attn_norm = Norm(cfg.dim, cfg.norm, cfg.norm_eps)
            self.post_mlp_norm = Norm(cfg.dim, cfg.norm, cfg.norm_eps)
        self.sandwich = cfg.sandwich_norm

    def forward(self, x, rotary, mask, cache, layer, offset):
        h = self.norm1(x)
        a = self.attn(h, rotary, mask, cache, layer, offset)
        if self.sandwich:
            a = self.post_attn_norm(a)
        # deepnorm (ChatGLM-6B): the residual stream restarts from the *normed* input, scaled by alpha
        x = (h * self.alpha if self.deepnorm else x) + a
        h = self.norm2(x)
        m = self.mlp(h)
        if self.sandwich:
            m = self.post_mlp_norm(m)
        return (h * self.alpha if self.deepnorm else x) + m


class KVCache(nn.Module):
    """Static, preallocated keys and values for every layer, plus what the mask needs.

    k, v: (L, B, K, S_max, D). `valid` (B, S_max) marks real (non-padding) keys; `sep` (B) is each
    sample's prefix length, kept from prefill so decode steps see the same Part A. `length` is the
    number of positions written; all samples share it (batches are left-padded).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        super().__init__()
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("valid", torch.zeros(batch_size, max_len, device=device, dtype=torch.bool), persistent=False)
        self.register_buffer("sep", torch.zeros(batch_size, device=device, dtype=torch.long), persistent=False)
        self.max_len, self.length = max_len, 0

    def reset(self):
        self.valid.zero_()
        self.sep.zero_()
        self.length = 0

    def update(self, layer: int, offset: int, k: torch.Tensor, v: torch.Tensor):
        T = k.shape[2]
        self.k[layer, :, :, offset : offset + T] = k
        self.v[layer, :, :, offset : offset + T] = v
        return self.k[layer, :, :, : offset + T], self.v[layer, :, :, : offset + T]


def prefix_mask(sep: torch.Tensor, valid: torch.Tensor, offset: int, T: int) -> torch.Tensor:
    """Boolean attention mask (B, 1, T, S) for queries at offset..offset+T-1 over S = offset+T keys.

    allowed[b, q, k] = valid[b, k] and (k < sep[b] or k <= q). A query always sees itself, so a
    padding query (all of whose keys are padding) gets a finite, ignored output instead of NaN.
    """
    S = offset + T
    kpos = torch.arange(S, device=sep.device)
    qpos = torch.arange(offset, S, device=sep.device)
    allowed = (kpos[None, None, :] < sep[:, None, None]) | (kpos[None, None, :] <= qpos[None, :, None])
    allowed = (allowed & valid[:, None, :S]) | (kpos[None, None, :] == qpos[None, :, None])
    return allowed[:, None]  # (B, 1, T, S)


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
    def _positions(self, input_ids, position_ids, attention_mask, offset):
        B, T = input_ids.shape
        if position_ids is None:
            if attention_mask is not None:  # left padding: count real tokens
                pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                pos = torch.arange(offset, offset + T, device=input_ids.device).expand(B, T)
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

    def _run(self, input_ids, pos, block, mask, cache, offset, hidden_only=False, last_only=False):
        x = self.embed(input_ids)  # (B, T, C)
        if self.cfg.position == "learned_2d":
            x = x + self.pos_embed(pos) + self.block_pos_embed(block)
        rotary = Rotary(self.cfg, pos, block, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rotary, mask, cache, i, offset)
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
        pos, block = self._positions(input_ids, position_ids, attention_mask, 0)
        if attention_mask is None and (sep is None or (isinstance(sep, int) and sep == 0)):
            mask = None  # causal, no padding: no mask to build (checked without a host sync)
        else:
            valid = torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if attention_mask is None else attention_mask.bool()
            mask = prefix_mask(self._sep(sep, B, input_ids.device), valid, 0, T)
        return self._run(input_ids, pos, block, mask, None, 0, hidden_only)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.embed.weight
        return KVCache(self.cfg, batch_size, max_len or self.cfg.max_seq_len, p.device, p.dtype)

    def prefill(self, input_ids, cache: KVCache, position_ids=None, sep=None, attention_mask=None, last_only=False):
        """Run `input_ids` (B, T) after what `cache` holds, writing their keys and values.

        The first call on an empty cache sets `sep`; later calls (a second chunk, or the `<sop>`
        of the next blank) continue causally after it. Returns logits (B, T, V), or (B, 1, V) for
        the last position only with `last_only` (the head is then applied to one position).
        """
        B, T = input_ids.shape
        offset = cache.length
        if offset + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {offset} used, {T} more requested")
        if offset == 0:
            sep_t = self._sep(sep, B, input_ids.device)
            if int(sep_t.max()) > T:  # Part A keys must exist before any query attends to them
                raise ValueError(f"sep={sep_t.tolist()} exceeds the {T} tokens of the first prefill; prefill all of Part A at once")
            cache.sep.copy_(sep_t)
        elif sep is not None:
            raise ValueError("sep can only be set by the first prefill of a cache")
        valid = torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if attention_mask is None else attention_mask.bool()
        cache.valid[:, offset : offset + T] = valid
        if position_ids is None and offset > 0:
            raise ValueError("continuing a cache needs explicit position_ids")
        pos, block = self._positions(input_ids, position_ids, attention_mask, offset)
        mask = prefix_mask(cache.sep, cache.valid, offset, T)
        logits = self._run(input_ids, pos, block, mask, cache, offset, last_only=last_only)
        cache.length = offset + T
        return logits

    def decode(self, input_ids, cache: KVCache, position_ids):
        """One step: input_ids (B, 1), position_ids (B, 1) or (B, 2, 1). Returns logits (B, 1, V)."""
        return self.prefill(input_ids, cache, position_ids=position_ids)
