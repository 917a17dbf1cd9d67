"""The fused decode step: one decode step of a GLM, every layer, as one native call (csrc/decode.cpp).

An eager decode step spends as long outside the matrix products as in them (norms, rotary, cache
writes, attention, residuals: ~25 operator calls per layer, each mostly dispatch), so `GLM.step` runs
a few-row CPU decode step of a supported model through `decode_step` here. The plan is the C view of
a model's weights, built from its blocks (`layers`) and linears (`kernels`, `quantize`); this module
does not know the model class: `GLM.step` calls it only for a GLM itself and its own caches (KVCache,
or PagedKVCache, whose block table the kernel reads; fp32, bf16, or an int8 pool with its scales).
The library is built and loaded by `kernels`; the structs mirror decode.cpp's.
"""

from __future__ import annotations

import ctypes
import operator
import weakref

import torch
import torch.nn as nn

from . import kernels
from .kernels import _WTYPE, Linear, int4_supported
from .layers import LATENT_NORM_EPS, MLP, Attention, Block, LatentAttention, MoE, Norm, Router, rope_frequencies
from .quantize import Int4Linear, Int8Linear


class _CLinear(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("mins", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64), ("kind", ctypes.c_int32)]


class _CNorm(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("b", ctypes.c_void_p)]


class _CMla(ctypes.Structure):
    _fields_ = [(n, _CLinear) for n in ("q", "q_a", "q_b", "kv_a", "kv_b")] + [("q_norm", _CNorm), ("kv_norm", _CNorm)]
    _fields_ += [("uk", ctypes.c_void_p)]


class _CMoe(ctypes.Structure):
    _fields_ = [("router", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("up", ctypes.POINTER(_CLinear)),
                ("down", ctypes.POINTER(_CLinear)), ("int4", ctypes.POINTER(kernels._CExpert))]
    _fields_ += [(n, ctypes.c_int64) for n in ("E", "k", "groups", "topk_group", "gs")]
    _fields_ += [(n, ctypes.c_int32) for n in ("normalize", "s_type")] + [("scale", ctypes.c_float)]


class _CLayer(ctypes.Structure):
    _fields_ = [("norm1", _CNorm), ("norm2", _CNorm), ("post_attn", _CNorm), ("post_mlp", _CNorm),
                ("qkv", _CLinear), ("out", _CLinear), ("up", _CLinear), ("down", _CLinear),
                ("mla", ctypes.POINTER(_CMla)), ("moe", ctypes.POINTER(_CMoe))]


class _CModel(ctypes.Structure):
    _fields_ = [("layers", ctypes.POINTER(_CLayer)), ("norm", _CNorm), ("head", _CLinear)]
    _fields_ += [(n, ctypes.c_int64) for n in ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "rotary_dim")]
    _fields_ += [(n, ctypes.c_int32) for n in ("layernorm", "position", "swiglu", "sandwich", "deepnorm", "gelu_exact")]
    _fields_ += [(n, ctypes.c_float) for n in ("eps", "alpha", "rope_scale")]
    _fields_ += [("inv_freq", ctypes.c_void_p)]
    _fields_ += [(n, ctypes.c_int64) for n in ("q_rank", "kv_rank", "nope_dim", "v_dim")]
    _fields_ += [("rope_interleave", ctypes.c_int32), ("mla_scale", ctypes.c_float), ("latent_eps", ctypes.c_float)]


class _CCache(ctypes.Structure):
    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("valid", ctypes.c_void_p), ("sep", ctypes.c_void_p),
                ("table", ctypes.c_void_p), ("k_scale", ctypes.c_void_p), ("v_scale", ctypes.c_void_p)]
    _fields_ += [(n, ctypes.c_int64) for n in ("batch", "max_len", "block", "row_blocks", "n_blocks")]
    _fields_ += [("kind", ctypes.c_int32)]


_KV_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}  # decode.cpp's GlmkitCache.kind


class _Unsupported(Exception):
    pass


def architecture_unsupported(cfg) -> str | None:
    """Why decode.cpp cannot run `cfg`'s architecture, or None. It knows heads of q/k/v with interleaved partial
    rotary and no q/k norms, latent attention without GLM-5's indexer, dense MLPs and GLM-4.5's sigmoid-routed
    experts: qk_norm, half-split rotary with q/k/v heads and the indexer run eager (GLM.step falls back on None).
    Read from the config alone (plan.py asks it before a model exists); _Plan checks the modules as it builds."""
    if cfg.attention == "mla":
        if cfg.index_n_heads:
            return "latent attention with an indexer (GLM-5)"
    elif cfg.qk_norm or not cfg.rope_interleave:
        return "qk_norm or rope_partial with rope_interleave=false"
    if cfg.n_experts and cfg.router_scoring != "sigmoid":
        return f"router_scoring={cfg.router_scoring!r}"
    return None


class _Plan:
    """The C view of one model: pointers to its weights (read in place) and fp32 copies of the small
    tensors the kernel wants in fp32 (norms, biases, quantization scales). `fresh()` says whether the
    model still is what the plan describes: every module and tensor it read is still in place, with
    the same storage and version (a LoRA wrapper, `.to(dtype)` or an in-place update rebuilds it)."""

    def __init__(self, model):
        self.refs, self.keep = [], []
        self.structs = []  # the C records the plan points into (kept alive with it)
        self._watch = None  # fresh()'s columns of refs, made on first use
        cfg = model.cfg
        mla = cfg.attention == "mla"
        why = architecture_unsupported(cfg)
        if why:
            raise _Unsupported(why)

        def tensor(owner, name, fp32=False):
            t = getattr(owner, name)
            if t is None:
                return None
            if t.device.type != "cpu" or not t.is_contiguous():
                raise _Unsupported(f"{name} is not a contiguous CPU tensor")
            store = owner._parameters if name in owner._parameters else owner._buffers
            self.refs.append((store, name, t, t._version, t.data_ptr()))
            if fp32:
                t = t.detach().to(torch.float32).contiguous()
                self.keep.append(t)
            return t.data_ptr()

        def module(owner, name, types):
            m = owner._modules.get(name)
            if type(m) not in types:
                raise _Unsupported(f"{name} is a {type(m).__name__}")
            self.refs.append((owner._modules, name, m, None, None))
            return m

        def lin(owner, name):
            m = module(owner, name, (Linear, nn.Linear, Int8Linear, Int4Linear))
            w = m.weight
            c = _CLinear(n=w.shape[0], k=m.in_features, group=0, bias=tensor(m, "bias", fp32=True))
            if type(m) is Int4Linear:
                if not int4_supported(m.in_features, m.group_size):
                    raise _Unsupported(f"int4 group size {m.group_size} with {m.in_features} inputs")
                sc, mn, code = kernels.int4_scales(m.scales, m.mins)  # as stored where they can be
                if sc.data_ptr() == m.scales.data_ptr() and mn.data_ptr() == m.mins.data_ptr():
                    c.scale, c.mins = tensor(m, "scales"), tensor(m, "mins")
                else:  # another dtype: fp32 copies, kept here
                    tensor(m, "scales"), tensor(m, "mins")  # watched for changes
                    self.keep += [sc, mn]
                    c.scale, c.mins = sc.data_ptr(), mn.data_ptr()
                c.kind, c.group = 3 + code, m.group_size
            elif type(m) is Int8Linear:
                c.kind, c.scale = 2, tensor(m, "scales", fp32=True)
            elif w.dtype in (torch.float32, torch.bfloat16):
                c.kind = _WTYPE[w.dtype]
            else:
                raise _Unsupported(f"{name} weight dtype {w.dtype}")
            c.w = tensor(m, "weight")
            return c

        def norm(owner, name):
            m = module(owner, name, (Norm,))
            return _CNorm(tensor(m, "weight", fp32=True), tensor(m, "bias", fp32=True))

        def latent(attn):
            c = _CMla(kv_a=lin(attn, "kv_a"), kv_b=lin(attn, "kv_b"), kv_norm=norm(attn, "kv_norm"))
            if "q" in attn._modules:
                c.q = lin(attn, "q")
            else:
                c.q_a, c.q_norm, c.q_b = lin(attn, "q_a"), norm(attn, "q_norm"), lin(attn, "q_b")
            kv_b = c.kv_b  # read per head by the heads kernels: fp32 / bf16, or int4 in groups of 32k
            if kv_b.kind == 2 or (kv_b.kind >= 3 and kv_b.group % 32):
                raise _Unsupported("kv_b is int8, or int4 in groups that are not a multiple of 32")
            if kv_b.kind >= 3 and kv_b.k % 32 == 0:  # its key rows regrouped for integer products (W_UK): a copy of
                uk = kernels.uk_codes(attn.kv_b.weight, cfg.n_heads, cfg.qk_nope_head_dim)  # their bytes, eager's too
                self.keep.append(uk)
                c.uk = uk.data_ptr()
            self.structs.append(c)
            return ctypes.pointer(c)

        def experts(moe):
            gate = module(moe, "gate", (Router,))
            mlps = [module(moe.experts, str(e), (MLP,)) for e in range(len(moe.experts))]
            if "shared" in moe._modules:
                mlps.append(module(moe, "shared", (MLP,)))
            if not all(m.swiglu for m in mlps):
                raise _Unsupported("experts that are not SwiGLU")
            up = (_CLinear * (len(moe.experts) + 1))(*[lin(m, "up") for m in mlps])
            down = (_CLinear * (len(moe.experts) + 1))(*[lin(m, "down") for m in mlps])
            c = _CMoe(router=tensor(gate, "weight", fp32=True), bias=tensor(gate, "e_score_correction_bias", fp32=True),
                      up=up, down=down, E=len(moe.experts), k=gate.k, groups=gate.groups, topk_group=gate.topk_group,
                      normalize=gate.normalize, scale=gate.scale)
            table = kernels.int4_experts(mlps, cfg.dim)  # one record per expert for the whole-layer int4 kernel, or None
            if table is not None:
                c.int4, c.gs, c.s_type = ctypes.cast(table[0], ctypes.POINTER(kernels._CExpert)), table[1], table[2]
                self.structs.append(table)
            self.structs += [c, up, down]
            return ctypes.pointer(c)

        blocks = []
        for i in range(cfg.n_layers):
            blk = module(model.layers, str(i), (Block,))
            attn = module(blk, "attn", (LatentAttention,) if mla else (Attention,))
            layer = _CLayer(norm1=norm(blk, "norm1"), norm2=norm(blk, "norm2"), out=lin(attn, "out"))
            if mla:
                layer.mla = latent(attn)
            else:
                layer.qkv = lin(attn, "qkv")
            if cfg.is_moe_layer(i):
                layer.moe = experts(module(blk, "mlp", (MoE,)))
            else:
                mlp = module(blk, "mlp", (MLP,))
                layer.up, layer.down = lin(mlp, "up"), lin(mlp, "down")
            if cfg.sandwich_norm:
                layer.post_attn, layer.post_mlp = norm(blk, "post_attn_norm"), norm(blk, "post_mlp_norm")
            blocks.append(layer)
        self.layers = (_CLayer * len(blocks))(*blocks)
        if "head" in model._modules:
            head = lin(model, "head")
        else:  # tied: the embedding table is the head
            emb = module(model, "embed", (nn.Embedding,))
            if emb.weight.dtype not in (torch.float32, torch.bfloat16):
                raise _Unsupported(f"embedding dtype {emb.weight.dtype}")
            head = _CLinear(w=tensor(emb, "weight"), n=emb.weight.shape[0], k=emb.weight.shape[1],
                            kind=_WTYPE[emb.weight.dtype])
        rope = cfg.position in ("rope_2d", "rope_partial")
        # the eager Rotary's frequency table, held here while the kernel points at it (a few hundred bytes,
        # not among `keep`'s weight copies that plan.kernel_copies_bytes counts)
        self.inv_freq, rope_scale = rope_frequencies(cfg) if rope else (None, 1.0)
        self.model = _CModel(
            layers=self.layers, norm=norm(model, "norm"), head=head, n_layers=cfg.n_layers, dim=cfg.dim,
            n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
            rotary_dim=cfg.rotary_dim if rope else 0,
            layernorm=cfg.norm == "layernorm", position={"rope_2d": 1, "rope_partial": 2}.get(cfg.position, 0),
            swiglu=cfg.mlp == "swiglu", sandwich=cfg.sandwich_norm, deepnorm=cfg.residual != "pre_ln",
            gelu_exact=cfg.mlp == "gelu_exact", eps=cfg.norm_eps, alpha=cfg.residual_alpha, rope_scale=rope_scale,
            inv_freq=self.inv_freq.data_ptr() if rope else None,
        )
        if mla:  # the cache holds one key head of [c ; k_pe]
            a0 = model.layers[0].attn
            self.model.n_kv_heads, self.model.head_dim = 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim
            self.model.q_rank, self.model.kv_rank = cfg.q_lora_rank or 0, cfg.kv_lora_rank
            self.model.nope_dim, self.model.v_dim = cfg.qk_nope_head_dim, cfg.v_head_dim
            self.model.rope_interleave, self.model.mla_scale, self.model.latent_eps = cfg.rope_interleave, a0.scale, LATENT_NORM_EPS
        self.vocab = head.n

    def fresh(self) -> bool:
        """Every ref still in place (list comparisons in C: a GLM-4.7-Flash plan holds ~40,000 refs, its experts')."""
        if self._watch is None:
            self._watch = ([store for store, *_ in self.refs], [name for _, name, *_ in self.refs],
                           [obj for _, _, obj, *_ in self.refs], [t for *_, t, v, p in self.refs if p is not None],
                           [(v, p) for *_, v, p in self.refs if p is not None])
        stores, names, objs, tensors, state = self._watch
        return (all(map(operator.is_, map(dict.get, stores, names), objs))
                and [(t._version, t.data_ptr()) for t in tensors] == state)


_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> _Plan, or the reason it has none


def decode_plan(model) -> _Plan | None:
    """The native view of `model` for decode_step, rebuilt if the model changed since it was made, or
    None if the fused step does not support the model (e.g. a LoRA wrapper, a CUDA model). Checking
    costs a few microseconds per layer: a generation loop gets it once and passes it to each step."""
    p = _plans.get(model)
    if p is None or (isinstance(p, _Plan) and not p.fresh()):
        try:
            p = _Plan(model)
        except _Unsupported as e:
            p = str(e)
        _plans[model] = p
    return p if isinstance(p, _Plan) else None


def decode_step(model, cache, token: torch.Tensor, pos: torch.Tensor, block: torch.Tensor, idx: torch.Tensor,
                plan: _Plan | None = None) -> torch.Tensor | None:
    """One decode step of `model` (a glmkit GLM) for rows 0..M-1 of `cache` (a KVCache or a
    PagedKVCache whose rows already hold a block for slot idx), as one native call.

    token, pos, block, idx: (M,) long: the token each row feeds, its position and block position,
    and the cache slot it writes. KVCache: k, v (L, B, K, S, D) are written at [:, b, :, idx[b]], valid
    (B, S) set there; paged: at the block table's block and offset, the pool's valid flags (an int8
    pool: quantized as `model.quantize_kv` does, with its scale). Row b attends to its valid keys s
    with s < sep[b] or s <= idx[b], the model's mask.
    Returns the next-token logits (M, V) in fp32, or None when the fused step does not apply (the
    caller then runs the eager step, which gives the same results within rounding: this one keeps
    the residual stream, rotary and attention in fp32 even for a bf16 model). `plan`:
    decode_plan(model), if the caller already has it (it must be current: the model not changed since).
    """
    M, sep = token.shape[0], cache.sep
    paged = hasattr(cache, "table")
    k, v, valid = (cache.pool.k, cache.pool.v, cache.pool.valid) if paged else (cache.k, cache.v, cache.valid)
    ks, vs = (cache.pool.k_scale, cache.pool.v_scale) if paged else (None, None)
    if not (0 < M <= kernels.MAX_ROWS and token.device.type == "cpu" and k.dtype in _KV_KIND):
        return None
    if k.dtype == torch.int8 and not (ks is not None and vs is not None and ks.is_contiguous() and vs.is_contiguous()
                                      and ks.dtype == vs.dtype == torch.float32 and ks.shape == vs.shape == k.shape[:-1]):
        return None
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or kernels._load() is None:
        return None
    if torch.is_grad_enabled() and model.embed.weight.requires_grad:
        return None
    plan = plan or decode_plan(model)
    L, N, K, BS, D = k.shape  # N blocks of BS slots; a KVCache: B rows of one block of S slots
    B, S = (cache.table.shape[0], cache.max_len) if paged else (N, BS)
    cfg = model.cfg
    Kh, Dk, Dv = cfg.kv_layout  # latent attention: one key head of the latent, values of width 0
    if plan is None or (L, K, D) != (cfg.n_layers, Kh, Dk) or v.shape != (*k.shape[:-1], Dv) or v.dtype != k.dtype:
        return None
    if not (k.is_contiguous() and v.is_contiguous() and valid.is_contiguous() and valid.dtype == torch.bool
            and valid.shape == (N, BS) and sep.shape == (B,) and sep.dtype == torch.long and sep.is_contiguous() and M <= B):
        return None
    if paged and not (cache.table.is_contiguous() and cache.table.dtype == torch.long):
        return None
    x = model.embed(token)  # (M, C)
    if cfg.position == "learned_2d":
        x = x + model.pos_embed(pos) + model.block_pos_embed(block)
    x = x.to(torch.float32).contiguous()  # a fresh tensor (the lookup copies): the kernel overwrites it
    pos, block, idx = (t.to(torch.long).contiguous() for t in (pos, block, idx))
    logits = torch.empty(M, plan.vocab)
    table, row_blocks = (cache.table.data_ptr(), cache.table.shape[1]) if paged else (None, 1)
    scales = (ks.data_ptr(), vs.data_ptr()) if k.dtype == torch.int8 else (None, None)
    c = _CCache(k.data_ptr(), v.data_ptr(), valid.data_ptr(), sep.data_ptr(), table, *scales, B, S, BS, row_blocks, N,
                _KV_KIND[k.dtype])
    rc = kernels._lib.glmkit_decode_step(ctypes.addressof(plan.model), ctypes.addressof(c), M, x.data_ptr(),
                                         pos.data_ptr(), block.data_ptr(), idx.data_ptr(), logits.data_ptr(),
                                         torch.get_num_threads())
    kernels._check(rc, "decode step")
    return logits
