"""The Transformer's building blocks: norms, the rotary schemes, attention, the MLP and the block.

`model.GLM` stacks them; `fused` reads their weights for the native decode step. They know nothing of
the KV cache beyond the one method Attention calls, `cache.update(layer, slots, k, v, extent)` (see
the model module). Letters in shape comments as in `model`.

A block runs either one batch (B, T, C) or a ragged token list (N, C) made of `Segment`s, each a batch
of its own (n, T) with its own rotary, mask and cache (`Block.ragged`): the linears, norms and MLP see
all N tokens at once, so the weights are read once for every segment; only attention is per segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .config import ModelConfig


class Norm(nn.Module):
    """LayerNorm (weight + bias) or RMSNorm (weight), both computed in fp32.

    Upcasting explicitly matters on CPU: reductions with `dtype=float32` over a bf16 tensor run ~40x
    slower than on an fp32 copy. The RMSNorm order (normalize, cast back, scale) is
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


@dataclass
class Segment:
    """One part of a ragged token list as attention sees it: n rows of T tokens, their rotary and mask
    (n, 1, T, S), and the cache they write at `slots` (n, T) and read over [0, extent)."""
    n: int
    T: int
    rotary: Rotary
    mask: torch.Tensor
    cache: object
    slots: torch.Tensor
    extent: int | None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # one fused projection, rows laid out [Q (H*D) | K (K*D) | V (K*D)]
        self.qkv = kernels.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.out = kernels.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.out_bias)

    def forward(self, x, rotary: Rotary, mask: torch.Tensor | None, cache=None, layer=0, slots=None, extent=None):
        return self.out(self._attend(self.qkv(x), rotary, mask, cache, layer, slots, extent))

    def ragged(self, x: torch.Tensor, segments: list[Segment], layer: int) -> torch.Tensor:
        """x (N, C): the tokens of every segment, in order; one projection each way for all of them."""
        qkv = self.qkv(x).split([s.n * s.T for s in segments])  # (n * T, (H + 2K) D) per segment
        y = [self._attend(part.view(s.n, s.T, -1), s.rotary, s.mask, s.cache, layer, s.slots, s.extent).flatten(0, 1)
             for s, part in zip(segments, qkv)]
        return self.out(torch.cat(y))  # (N, C)

    def _attend(self, qkv, rotary, mask, cache, layer, slots, extent):
        """Attention of one batch from its projections qkv (B, T, (H + 2K) D) -> (B, T, H D)."""
        B, T, _ = qkv.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = qkv.split((H * D, K * D, K * D), dim=-1)
        q = rotary(q.view(B, T, H, D)).transpose(1, 2)  # (B, H, T, D)
        k = rotary(k.view(B, T, K, D)).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if cache is not None:  # write at `slots` (B, T); read the keys of slots < extent
            k, v = cache.update(layer, slots, k, v, extent)  # (B, K, S, D)
        # mask None: plain causal attention over the whole sequence, SDPA's fused causal path
        y = kernels.attention(q, k, v, mask, enable_gqa=K != H)  # (B, H, T, D)
        return y.transpose(1, 2).reshape(B, T, H * D)


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

    def forward(self, x, rotary, mask, *cached):  # cached: (cache, layer, slots, extent), or nothing
        return self._residual(x, lambda h: self.attn(h, rotary, mask, *cached))

    def ragged(self, x: torch.Tensor, segments: list[Segment], layer: int) -> torch.Tensor:
        """x (N, C): a ragged token list (see the module docstring)."""
        return self._residual(x, lambda h: self.attn.ragged(h, segments, layer))

    def _residual(self, x, attend):
        h = self.norm1(x)
        a = attend(h)
        if self.sandwich:
            a = self.post_attn_norm(a)
        # deepnorm (ChatGLM-6B): the residual stream restarts from the *normed* input, scaled by alpha
        x = (h * self.alpha if self.deepnorm else x) + a
        h = self.norm2(x)
        m = self.mlp(h)
        if self.sandwich:
            m = self.post_mlp_norm(m)
        return (h * self.alpha if self.deepnorm else x) + m
