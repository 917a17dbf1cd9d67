"""The Transformer's building blocks: norms, the rotary schemes, attention (heads of q/k/v, or the
latent attention of Glm4MoeLite, `LatentAttention`), the MLP (dense, or GLM-4.5's mixture of experts:
`Router`, `MoE`), the block, and GLM-4.5's multi-token-prediction layer (`MTPLayer`).

`model.GLM` stacks them; `fused` reads their weights for the native decode step. They know nothing of
the KV cache beyond the one method Attention calls, `cache.update(layer, slots, k, v, extent)` (see
the model module). Letters in shape comments as in `model`.

A block runs either one batch (B, T, C) or a ragged token list (N, C) made of `Segment`s, each a batch
of its own (n, T) with its own rotary, mask and cache (`Block.ragged`): the linears, norms and MLP see
all N tokens at once, so the weights are read once for every segment; only attention is per segment.
"""

from __future__ import annotations

import math
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


def rope_frequencies(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, float]:
    """(inv_freq, scale): the inverse frequencies (rotary_dim/2,) fp32 of one rotary table of `cfg`, and the
    factor cos and sin are multiplied by (yarn's and longrope's attention scaling; 1 otherwise).

    The one source of the frequencies: the eager Rotary and the native decode step (fused.py hands this
    table to decode.cpp) both read it. rope_scaling types follow transformers' GLM classes
    (modeling_rope_utils) on the same config. Two choices of ours: longrope uses its long factors when
    the model's max_seq_len exceeds original_max_position_embeddings and its short ones otherwise,
    fixed for the model (transformers switches with the current length, which a KV cache written with
    the other set cannot follow; the two agree on any text of that side of the boundary); and
    rope_fp16 rounds the result to fp16 as ChatGLM-6B's published code does.
    """
    r, base, s = cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling or {}
    kind, scale = s.get("rope_type"), 1.0
    two_i = torch.arange(0, r, 2, device=device, dtype=torch.float32)
    # proportional: exponents over the whole head (the rest of the head is unrotated, angle 0)
    inv = 1.0 / (base ** (two_i / (cfg.head_dim if kind == "proportional" else r)))
    if kind in ("linear", "proportional"):
        inv = inv / s.get("factor", 1.0)
    elif kind == "llama3":
        # long wavelengths slowed by `factor`, short ones kept, the band between blended linearly in
        # (trained length / wavelength)
        n, lo, hi = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv
        slow = torch.where(wavelen > n / lo, inv / s["factor"], inv)
        w = (n / wavelen - lo) / (hi - lo)
        blend = (1 - w) * slow / s["factor"] + w * slow
        inv = torch.where((wavelen >= n / hi) & (wavelen <= n / lo), blend, slow)
    elif kind == "yarn":
        inv, scale = _yarn(s, r, base, two_i)
    elif kind == "longrope":
        n, factor = s["original_max_position_embeddings"], s["factor"]
        ext = torch.tensor(s["long_factor"] if cfg.max_seq_len > n else s["short_factor"], dtype=torch.float32,
                           device=device)
        inv = 1.0 / (ext * base ** (two_i / r))
        scale = s.get("attention_factor") or (1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(n)))
    if cfg.rope_fp16:
        inv = inv.half().float()
    return inv, float(scale)


def _yarn(s: dict, r: int, base: float, two_i: torch.Tensor) -> tuple[torch.Tensor, float]:
    """YaRN: frequencies that turn fewer than beta_slow times over the trained length are interpolated
    (divided by factor), those turning more than beta_fast times kept, a linear ramp between; cos and
    sin scaled by 0.1 ln(factor) + 1 (or the mscale ratio, or the given attention_factor)."""
    factor, n = s["factor"], s["original_max_position_embeddings"]

    def mscale(m):
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    scale = s.get("attention_factor")
    if scale is None:
        both = s.get("mscale") and s.get("mscale_all_dim")
        scale = mscale(s["mscale"]) / mscale(s["mscale_all_dim"]) if both else mscale(1)

    def pair_at(turns):  # the (fractional) pair index whose frequency turns `turns` times in n positions
        return r * math.log(n / (turns * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = pair_at(s.get("beta_fast") or 32), pair_at(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, r - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(r // 2, dtype=torch.float32, device=two_i.device) - lo) / (hi - lo)).clamp(0, 1)
    freq = base ** (two_i / r)
    keep = 1 - ramp  # weight of the unscaled frequency
    return (1.0 / (factor * freq)) * (1 - keep) + (1.0 / freq) * keep, float(scale)


def rope_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """cos and sin for positions `pos` (B, T) at frequencies inv_freq (r/2,): each (B, T, 1, r/2), times
    `scale`, cast to `dtype`."""
    freqs = pos.float()[..., None] * inv_freq  # (B, T, r/2)
    cos, sin = freqs.cos(), freqs.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos[:, :, None, :].to(dtype), sin[:, :, None, :].to(dtype)


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
        self.kind, self.r, self.interleave = cfg.position, cfg.rotary_dim, cfg.rope_interleave
        if self.kind in ("rope_2d", "rope_partial"):
            inv_freq, scale = rope_frequencies(cfg, pos.device)
            self.pos = rope_cos_sin(pos, inv_freq, dtype, scale)
            if self.kind == "rope_2d":
                self.block = rope_cos_sin(block, inv_freq, dtype, scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rope_2d":  # first half by position, second by block position
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((rotate_halves(x1, *self.pos), rotate_halves(x2, *self.block)), dim=-1)
        if self.kind == "rope_partial":
            rotate = rotate_interleaved if self.interleave else rotate_halves
            return torch.cat((rotate(x[..., : self.r], *self.pos), x[..., self.r :]), dim=-1)
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
        if cfg.qk_norm:  # GLM-4.5's use_qk_norm: one norm over each head's D, shared by the heads
            self.q_norm = Norm(cfg.head_dim, cfg.norm, cfg.norm_eps)
            self.k_norm = Norm(cfg.head_dim, cfg.norm, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm

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
        q, k = q.view(B, T, H, D), k.view(B, T, K, D)
        if self.qk_norm:  # before rotary, as transformers' Glm4MoeAttention
            q, k = self.q_norm(q), self.k_norm(k)
        q = rotary(q).transpose(1, 2)  # (B, H, T, D)
        k = rotary(k).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if cache is not None:  # write at `slots` (B, T); read the keys of slots < extent
            k, v = cache.update(layer, slots, k, v, extent)  # (B, K, S, D)
        # mask None: plain causal attention over the whole sequence, SDPA's fused causal path
        y = kernels.attention(q, k, v, mask, enable_gqa=K != H)  # (B, H, T, D)
        return y.transpose(1, 2).reshape(B, T, H * D)


# transformers' Glm4MoeLite builds q_a_layernorm and kv_a_layernorm with its RMSNorm's default eps, not rms_norm_eps
LATENT_NORM_EPS = 1e-6


class Indexer(nn.Module):
    """GLM-5's sparse attention indexer (DeepSeek-V3.2's; ModelConfig's indexer fields): which keys each query
    attends to. Letters: Hi index heads of Di channels, Q the q_lora_rank. Its key (per token, cached beside the
    latent) and its per-query scores are computed as transformers' GlmMoeDsaIndexer does, in fp32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.Hi, self.Di, self.P, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim, cfg.index_topk
        self.wq_b = kernels.Linear(cfg.q_lora_rank, self.Hi * self.Di, bias=False)  # from q_norm(q_a(x))
        self.wk = kernels.Linear(cfg.dim, self.Di, bias=False)
        self.k_norm = Norm(self.Di, "layernorm", 1e-6)
        self.weights_proj = kernels.Linear(cfg.dim, self.Hi, bias=False)  # read in fp32, as transformers keeps it

    def project(self, x: torch.Tensor, q_resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., C), q_resid (..., Q) -> keys (..., Di), nothing rotated yet, and the query side
        (..., Hi Di + Hi): queries, then head weights."""
        w = F.linear(x.float(), self.weights_proj.weight.float()) * self.Hi ** -0.5
        return self.k_norm(self.wk(x)), torch.cat((self.wq_b(q_resid).float(), w), dim=-1)

    def choose(self, queries: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, rotate, cos, sin) -> torch.Tensor:
        """queries (B, T, Hi Di + Hi) from `project`, keys (B, S, Di) rotated, mask (B, 1, T, S) of the keys
        each query may see -> (B, T, S) bool: the index_topk best of them (fewer where fewer are visible)."""
        B, T = queries.shape[:2]
        q, w = queries.split((self.Hi * self.Di, self.Hi), dim=-1)
        q = q.view(B, T, self.Hi, self.Di)
        q = torch.cat((rotate(q[..., :self.P], cos.float(), sin.float()), q[..., self.P:]), dim=-1)
        scores = torch.einsum("bthd,bsd->bths", q, keys.float()) * self.Di ** -0.5  # (B, T, Hi, S)
        index = torch.einsum("bth,bths->bts", w, scores.relu()).masked_fill(~mask[:, 0], float("-inf"))  # (B, T, S)
        # with fewer than index_topk visible keys some chosen ones are masked: the mask still hides them
        top = index.topk(min(self.topk, index.shape[-1]), dim=-1).indices
        return torch.zeros_like(index, dtype=torch.bool).scatter_(-1, top, True)


class LatentAttention(nn.Module):
    """Multi-head latent attention (ModelConfig.attention "mla"; its fields there). Letters: R the latent
    width kv_lora_rank, P the rope channels, Dn / Dv the per-head no-rope key / value widths.

    What a token caches is its latent [c (R) ; k_pe (P)], rotated k_pe included; attention reads it in one
    of two forms with the same result:
    - expanded (as transformers): kv_b turns every cached c into per-head [k_nope ; v], keys are
      [k_nope ; k_pe] and ordinary attention runs with heads of Dn + P;
    - absorbed: kv_b's key rows W_UK (H, Dn, R) fold into the query, q_nope W_UK (H, R), so the scores
      [q_nope W_UK ; q_pe] . [c ; k_pe] are taken against the cache itself (one shared key head of R + P),
      and the attention-weighted sum of c goes through kv_b's value rows W_UV after. kv_b is then applied
      to the T queries instead of the S cached tokens, which is what makes a decode step cheap.
    `absorb` None picks the form with fewer multiply-adds for T queries over S keys: absorbed while
    (S - T) R (Dn + Dv) > T S (2R - Dn - Dv), i.e. decode steps and short chunks over a longer cache;
    expanded for a whole sequence at once (S = T) when 2R > Dn + Dv. True / False force one.

    With GLM-5's indexer (ModelConfig.index_n_heads) a token's cache entry is [c ; k_pe ; index key (Di)]
    (zeros in layers without an indexer, so every layer's cache has one width) and each query's mask keeps
    only the keys its indexer chose (`Indexer.choose`). A layer of index_pattern "S" reuses the choice the
    previous "F" layer made in the same forward: `choice` is one dict shared by the model's layers, keyed
    by segment (the ragged path's parts), written by "F" layers and read by "S" ones, which run after.
    """

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        H, Q, R, P = cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.H, self.R, self.P, self.Dn, self.Dv = H, R, P, cfg.qk_nope_head_dim, cfg.v_head_dim
        # transformers' softmax scale: 1/sqrt(Dn + P), times yarn's mscale(factor, mscale_all_dim) squared
        s = cfg.rope_scaling or {}
        m = s.get("mscale_all_dim") or 0
        mscale = 0.1 * m * math.log(s["factor"]) + 1.0 if m and s.get("factor", 1) > 1 else 1.0
        self.scale = (self.Dn + P) ** -0.5 * mscale * mscale
        if Q is None:
            self.q = kernels.Linear(cfg.dim, H * (self.Dn + P), bias=False)
        else:  # the low-rank query: q_a (C -> Q), RMSNorm, q_b (Q -> heads)
            self.q_a = kernels.Linear(cfg.dim, Q, bias=cfg.qkv_bias)
            self.q_norm = Norm(Q, "rmsnorm", LATENT_NORM_EPS)
            self.q_b = kernels.Linear(Q, H * (self.Dn + P), bias=False)
        self.kv_a = kernels.Linear(cfg.dim, R + P, bias=cfg.qkv_bias)  # rows [c (R) | k_pe (P)]
        self.kv_norm = Norm(R, "rmsnorm", LATENT_NORM_EPS)
        self.kv_b = kernels.Linear(R, H * (self.Dn + self.Dv), bias=False)  # rows per head [k_nope (Dn) | v (Dv)]
        self.out = kernels.Linear(H * self.Dv, cfg.dim, bias=cfg.out_bias)
        self.rotate = rotate_interleaved if cfg.rope_interleave else rotate_halves
        self.absorb: bool | None = None
        self.Di = cfg.index_head_dim if cfg.index_n_heads else 0
        if cfg.has_indexer(layer):
            self.indexer = Indexer(cfg)
        self.choice: dict = {}  # the model shares one among its layers (see the class docstring)

    def forward(self, x, rotary: Rotary, mask: torch.Tensor | None, cache=None, layer=0, slots=None, extent=None):
        q, latent, *index_q = self._project(x)
        return self.out(self._attend(q, latent, rotary, mask, cache, layer, slots, extent, *index_q))

    def ragged(self, x: torch.Tensor, segments: list[Segment], layer: int) -> torch.Tensor:
        """x (N, C): the tokens of every segment, in order; the projections see all of them at once."""
        sizes = [s.n * s.T for s in segments]
        parts = [t.split(sizes) for t in self._project(x)]  # queries, latents, and the indexer's queries if any
        y = [self._attend(*(p[i].view(s.n, s.T, *p[i].shape[1:]) for p in parts[:1]),
                          *(p[i].view(s.n, s.T, -1) for p in parts[1:2]), s.rotary, s.mask, s.cache, layer, s.slots,
                          s.extent, *(p[i].view(s.n, s.T, -1) for p in parts[2:]), seg=i).flatten(0, 1)
             for i, s in enumerate(segments)]
        return self.out(torch.cat(y))  # (N, C)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (..., C) -> queries (..., H, Dn + P) and latents (..., R + P [+ Di]) with c normed, nothing rotated
        yet; with an indexer also its query side (Indexer.project)."""
        if hasattr(self, "q"):
            q = self.q(x)
        else:
            q_resid = self.q_norm(self.q_a(x))
            q = self.q_b(q_resid)
        c, k_pe = self.kv_a(x).split((self.R, self.P), dim=-1)
        latent = [self.kv_norm(c), k_pe]
        if hasattr(self, "indexer"):
            keys, queries = self.indexer.project(x, q_resid)
            return q.unflatten(-1, (self.H, -1)), torch.cat(latent + [keys], dim=-1), queries
        if self.Di:  # a layer reusing another's choice caches no index key of its own
            latent.append(c.new_zeros(*c.shape[:-1], self.Di))
        return q.unflatten(-1, (self.H, -1)), torch.cat(latent, dim=-1)

    def _attend(self, q, latent, rotary, mask, cache, layer, slots, extent, index_q=None, seg=0):
        """Attention of one batch: q (B, T, H, Dn + P), latent (B, T, R + P [+ Di]) -> (B, T, H Dv)."""
        B, T, H = q.shape[:3]
        R, P, Dn, Dv = self.R, self.P, self.Dn, self.Dv
        cos, sin = rotary.pos  # (B, T, 1, P/2)
        q_nope, q_pe = q.split((Dn, P), dim=-1)
        q_pe = self.rotate(q_pe, cos, sin).transpose(1, 2)  # (B, H, T, P)
        parts = [latent[..., None, :R], self.rotate(latent[..., None, R:R + P], cos, sin)]  # c, k_pe (B, T, 1, P)
        if self.Di:  # the index key, its first P channels rotated as k_pe
            ik = latent[..., None, R + P:]
            parts += [self.rotate(ik[..., :P], cos, sin), ik[..., P:]]
        latent = torch.cat(parts, dim=-1).transpose(1, 2)  # (B, 1, T, R + P [+ Di])
        if cache is not None:  # the latent is the key, of one head; there is no value
            latent, _ = cache.update(layer, slots, latent, latent[..., :0], extent)  # (B, 1, S, R + P [+ Di])
        S = latent.shape[2]
        if self.Di:
            mask = self._sparse_mask(index_q, latent[:, 0, :, R + P:], mask, seg, T, S, cos, sin)
            latent = latent[..., :R + P]
        absorb = self.absorb
        if absorb is None:  # kv_b over S - T more tokens (expanded) vs wider q.k and values (absorbed)
            absorb = (S - T) * R * (Dn + Dv) > T * S * (2 * R - Dn - Dv)
        if absorb:
            q_lat = self._kv_b_heads(q_nope, 0, Dn, trans=True).transpose(1, 2)  # (B, H, T, R)
            y = kernels.attention(torch.cat((q_lat, q_pe), dim=-1), latent, latent[..., :R], mask, enable_gqa=True,
                                  scale=self.scale)  # (B, H, T, R)
            return self._kv_b_heads(y.transpose(1, 2), Dn, Dv, trans=False).reshape(B, T, H * Dv)
        kv = self.kv_b(latent[:, 0, :, :R]).view(B, S, H, Dn + Dv).transpose(1, 2)  # (B, H, S, Dn + Dv)
        k = torch.cat((kv[..., :Dn], latent[..., R:].expand(B, H, S, P)), dim=-1)  # (B, H, S, Dn + P)
        y = kernels.attention(torch.cat((q_nope.transpose(1, 2), q_pe), dim=-1), k, kv[..., Dn:], mask,
                              enable_gqa=False, scale=self.scale)  # (B, H, T, Dv)
        return y.transpose(1, 2).reshape(B, T, H * Dv)

    def _kv_b_heads(self, x: torch.Tensor, row0: int, rows: int, trans: bool) -> torch.Tensor:
        """The absorbed form's per-head products with kv_b's rows [row0, row0 + rows) of each head, W (H, rows, R):
        trans x (B, T, H, rows) -> x W (B, T, H, R) (the key rows W_UK into the query), else x (B, T, H, R) ->
        x W^T (B, T, H, rows) (the value rows W_UV). A few rows on CPU go through the native kernels, which read
        kv_b as stored (bf16 / fp32, or int4 when quantized); PyTorch's batched GEMM reads a bf16 W far below
        the memory bandwidth for them. Otherwise einsums of the (dequantized) weight, differentiable."""
        B, T, H = x.shape[:3]
        kv_b, R = self.kv_b, self.R
        flat = x.reshape(B * T, H, -1)
        if kernels.usable(x.reshape(B * T, -1), *[t for t in (kv_b.weight,) if t.is_floating_point()]):
            if hasattr(kv_b, "mins") and kv_b.group_size % 32 == 0:  # quantize.Int4Linear
                y = kernels.heads_gemv_int4(flat, kv_b.weight, kv_b.scales, kv_b.mins, kv_b.group_size, H, row0, rows,
                                            trans)
                return y.to(x.dtype).view(B, T, H, -1)
            if kv_b.weight.is_floating_point() and kv_b.weight.is_contiguous():
                y = kernels.heads_gemv(flat, kv_b.weight.view(H, -1, R)[:, row0:row0 + rows], trans)
                return y.to(x.dtype).view(B, T, H, -1)
        if hasattr(kv_b, "dequantize"):
            w = kv_b.dequantize(x.dtype)
        elif not kv_b.weight.is_floating_point():  # quantize.Int8Linear: per-row scales
            w = kv_b.weight.to(x.dtype) * kv_b.scales.to(x.dtype)[:, None]
        else:
            w = kv_b.weight.to(x.dtype)
        w = w.view(H, -1, R)[:, row0:row0 + rows]  # (H, rows, R)
        return torch.einsum("bthn,hnr->bthr" if trans else "bthr,hnr->bthn", x, w)

    def _sparse_mask(self, index_q, keys, mask, seg, T, S, cos, sin) -> torch.Tensor:
        """The mask (B, 1, T, S) narrowed to the keys the indexer chose (this layer's, or for an "S" layer
        the previous "F" layer's, kept in `choice`). No mask means causal over S = T keys: built here,
        because the indexer must not choose a future key."""
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=keys.device).tril(S - T)[None, None]
        if hasattr(self, "indexer"):
            mask = mask.expand(keys.shape[0], 1, T, S)
            self.choice[seg] = self.indexer.choose(index_q, keys, mask, self.rotate, cos, sin)
        elif seg not in self.choice:
            raise RuntimeError("a layer that reuses the indexer's choice (index_pattern 'S') ran before any 'F' layer")
        return mask & self.choice[seg][:, None]


class MLP(nn.Module):
    """The dense MLP (width `ffn_dim`, default the config's); an MoE's experts are SwiGLU MLPs of this class."""

    def __init__(self, cfg: ModelConfig, ffn_dim: int | None = None):
        super().__init__()
        F_ = ffn_dim or cfg.ffn_dim
        self.swiglu, self.gelu = cfg.mlp == "swiglu", "none" if cfg.mlp == "gelu_exact" else "tanh"
        # swiglu: rows [gate (F) | up (F)], as HF GLM's gate_up_proj
        self.up = kernels.Linear(cfg.dim, F_ * (2 if self.swiglu else 1), bias=cfg.mlp_bias)
        self.down = kernels.Linear(F_, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x):
        if self.swiglu:
            gate, up = self.up(x).chunk(2, dim=-1)  # (B, T, F) each
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(self.up(x), approximate=self.gelu))


# the router's tensors, by name suffix: kept in fp32 by Router, and read in fp32 by the checkpoint loader
ROUTER_FP32 = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


class Router(nn.Module):
    """GLM-4.5's sigmoid top-k router (transformers' Glm4MoeTopkRouter): x (N, C) -> (weights (N, k) fp32,
    expert ids (N, k) long), best first. Computed in fp32 and kept in fp32 whatever the model's dtype
    (as transformers keeps `gate.weight` and `e_score_correction_bias`): the choice is discrete, and a
    bf16 bias (values near 1 apart by less than bf16's 1/128 step) would reorder experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E = cfg.n_experts
        self.weight = nn.Parameter(torch.zeros(E, cfg.dim, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        self.k, self.groups, self.topk_group = cfg.n_experts_per_tok, cfg.n_group, cfg.topk_group
        self.normalize, self.scale = cfg.norm_topk_prob, cfg.routed_scaling_factor

    def _apply(self, fn, recurse=True):  # .to(dtype) moves the router but leaves it fp32
        super()._apply(fn, recurse)
        for t in (self.weight, self.e_score_correction_bias):
            if t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for n in ("weight", "e_score_correction_bias"):
            if prefix + n in state_dict and state_dict[prefix + n].is_floating_point():
                state_dict[prefix + n] = state_dict[prefix + n].float()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        choice = scores + self.e_score_correction_bias.float()  # the bias steers the choice, not the weights
        N, E = choice.shape
        if self.groups > 1:  # only experts of the topk_group groups with the best two-expert sums compete
            grouped = choice.view(N, self.groups, E // self.groups)  # (N, G, E/G)
            best = grouped.topk(2, dim=-1).values.sum(-1).topk(self.topk_group, dim=-1).indices  # (N, topk_group)
            keep = torch.zeros(N, self.groups, dtype=torch.bool, device=x.device).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, E)
        ids = choice.topk(self.k, dim=-1).indices  # (N, k)
        w = scores.gather(1, ids)
        if self.normalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * self.scale, ids


class MoE(nn.Module):
    """Routed SwiGLU experts plus a shared one (GLM-4.5's MoE layer): y = sum_j w_j expert_{e_j}(x) + shared(x).

    Tokens are grouped by expert: one product per expert in use, over the tokens routed to it, added back
    at their rows, so a decode step of a few rows reads only the chosen experts' weights. The experts are
    plain `MLP`s of kernels.Linear, so quantization (`mlp.experts.E.up` / `.down`) and the native few-row
    kernels apply to each as to a dense MLP; a few rows with int4 experts take one native call for the whole
    layer instead (`kernels.moe_int4`: one parallel region, activations rounded once, sums in fp32)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = nn.ModuleList(MLP(cfg, cfg.moe_ffn_dim) for _ in range(cfg.n_experts))
        if cfg.n_shared_experts:
            self.shared = MLP(cfg, cfg.n_shared_experts * cfg.moe_ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        w, ids = self.gate(x)  # (N, k) each
        # decode (few rows, int4 experts on CPU): the whole layer in one native call, None where it does not apply
        y = kernels.moe_int4(x, self.experts, w, ids, getattr(self, "shared", None))
        if y is not None:
            return y.to(x.dtype).view(shape)
        k = ids.shape[1]
        flat = ids.flatten()  # (N k,): token t's j-th choice at t * k + j
        order = flat.argsort(stable=True)  # the (token, choice) pairs grouped by expert
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            pairs = order[start:start + n]
            start += n
            rows = pairs // k  # the tokens routed to expert e
            y = self.experts[e](x[rows]) * w.flatten()[pairs, None]  # (n, C), fp32 by the weights
            # index_put_ accumulating, not index_add_: the same sums (a token picks an expert once), but
            # index_add_ on CPU costs milliseconds per call when its threads are contended
            out.index_put_((rows,), y.to(x.dtype), accumulate=True)
        if hasattr(self, "shared"):
            out = out + self.shared(x)
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.deepnorm, self.alpha = cfg.residual != "pre_ln", cfg.residual_alpha  # normed: alpha 1
        self.norm1 = Norm(cfg.dim, cfg.norm, cfg.norm_eps)
        self.attn = LatentAttention(cfg, layer) if cfg.attention == "mla" else Attention(cfg)
        self.norm2 = Norm(cfg.dim, cfg.norm, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg)
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
        # deepnorm (ChatGLM-6B) / normed: the residual stream restarts from the *normed* input, scaled by alpha
        x = (h * self.alpha if self.deepnorm else x) + a
        h = self.norm2(x)
        m = self.mlp(h)
        if self.sandwich:
            m = self.post_mlp_norm(m)
        return (h * self.alpha if self.deepnorm else x) + m


class MTPLayer(nn.Module):
    """One multi-token-prediction layer as GLM-4.5 ships it (DeepSeek-V3's design): from the model's final
    hidden state h_t and the embedding of token t+1 it predicts token t+2:
    block(eh_proj([enorm(embed(x_{t+1})); hnorm(h_t)])), then shared_head_norm and the model's head.
    Its block is the kind of layer `n_layers + i` would be (an MoE layer). Not run by the model's forward:
    `GLM.mtp_logits` and `GLM.mtp_step` run it, to draft tokens.

    h_t is the model's output after its final norm, the hidden state its head reads: what vLLM's
    glm4_moe_mtp, SGLang's glm4_moe_nextn and the llama.cpp GLM-4.5 MTP graphs feed. The concatenation
    is [embedding; hidden] in all three (DeepSeek-V3's paper writes [h; e]; the checkpoints follow the
    code). A chained draft feeds the layer's own output back as h, before shared_head_norm, as vLLM does.
    vLLM also zeroes the embedding of the pair at position 0; SGLang and llama.cpp do not, nor do we."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.enorm = Norm(cfg.dim, cfg.norm, cfg.norm_eps)
        self.hnorm = Norm(cfg.dim, cfg.norm, cfg.norm_eps)
        self.eh_proj = kernels.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, layer)
        self.shared_head_norm = Norm(cfg.dim, cfg.norm, cfg.norm_eps)

    def forward(self, h: torch.Tensor, next_embeds: torch.Tensor, rotary: Rotary, mask, *cached) -> torch.Tensor:
        """h, next_embeds (B, T, C) -> the block's output (B, T, C), before shared_head_norm (what a chained
        draft feeds back as h). cached: (cache, layer, slots, extent), or nothing, as `Block`."""
        x = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(h)), dim=-1))  # (B, T, 2C) -> (B, T, C)
        return self.block(x, rotary, mask, *cached)
