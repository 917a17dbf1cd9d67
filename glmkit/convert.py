"""Checkpoint formats: read upstream GLM checkpoints into glmkit, write glmkit models back out.

    glmkit convert SRC_DIR DST_DIR [--to glmkit|glm_hf|glm4_hf|glm4_moe_hf|glm4_moe_lite_hf|glm_moe_dsa_hf|glm|chatglm|chatglm2] [--dtype bf16]
    glmkit info PATH|PRESET

    model = glmkit.load("path/to/glm-4-9b-chat-hf", dtype=torch.bfloat16)
    model = glmkit.load("path/to/glm-4-9b-chat-hf", quantize="int4")  # quantized as it is read

Reading is a stream (`state_stream`): one tensor at a time from the memory-mapped files, so a
checkpoint can be quantized while it loads, or into a new sharded checkpoint (`write_stream`,
`quantize_checkpoint`: `glmkit quantize`), without the float model in memory.

A checkpoint is a directory with `config.json` and weights (`model.safetensors`,
`pytorch_model.bin`, or either sharded with an `*.index.json`). Formats:

    glmkit    our own: ModelConfig fields in config.json, our parameter names
    glm_hf    transformers GlmForCausalLM (GLM-4-9B -hf checkpoints)
    glm4_hf   transformers Glm4ForCausalLM (GLM-4-0414: sandwich norms)
    glm4_moe_lite_hf  transformers Glm4MoeLiteForCausalLM (GLM-4.7-Flash: latent attention, experts)
    glm_moe_dsa_hf    transformers GlmMoeDsaForCausalLM (GLM-5: glm4_moe_lite_hf plus the sparse
              attention indexer, self_attn.indexer.*)
    glm4_moe_hf  transformers Glm4MoeForCausalLM (GLM-4.5 / 4.6 / 4.7: mixture of experts, per-expert
              tensors as released and as transformers saves them, the MTP layer as layer num_hidden_layers)
    glm       the original THUDM GLM remote code (glm-large-chinese, glm-10b-chinese, ...)
    chatglm   THUDM ChatGLM-6B remote code
    chatglm2  the later ChatGLMModel remote code: ChatGLM2-6B, ChatGLM3-6B, CodeGeeX2-6B, and
              GLM-4-9B(-chat, -1m), CodeGeeX4-all-9b as first released (GLM-4's network)

Each format is one explicit list of `Rule`s (our name <-> their names, with the reshuffle between
them), used both to read and to write. Reading checks every tensor before anything is assigned:
a missing, unexpected or mis-shaped tensor, an unknown architecture, a truncated or corrupt file
each raise `CheckpointError` naming the file, the tensor and what to do next.

Layouts that differ beyond names:
- HF GLM stores q/k/v separately; we fuse them as rows [Q | K | V]. Glm4MoeLite's dense MLP stores
  gate_proj and up_proj separately; we fuse them as rows [gate | up].
- ChatGLM-6B fuses q/k/v per head ([q_h, k_h, v_h] for each head h); we reorder the rows. Its published
  code also fixes two numbers the config does not say: fp16-rounded rotary frequencies and alpha
  sqrt(2 * 28) at any depth (rope_fp16, deepnorm_layers), set on read and required on write.
- ChatGLM2 onwards (chatglm2) fuse q/k/v as [Q | K | V] with multi-query attention, per head without it.
- The original GLM's position tables have max_sequence_length + 1 rows (our max_seq_len) and its GELU
  is the exact one (mlp="gelu_exact").
- HF RoPE scaling (`rope_parameters` or the older `rope_scaling`) becomes ModelConfig.rope_scaling.
- A native glmkit model (`rope_2d`) exports to GlmForCausalLM exactly for causal use: with block
  positions at 0 the second rotary half is the identity, and the first half's (x[i], x[i+r/2])
  pairs become HF's interleaved (x[2i], x[2i+1]) pairs by permuting q/k rows, which leaves every
  q.k product unchanged. The original config rides along in config.json (`glmkit_config`) so the
  import undoes the permutation and restores the 2D positions.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .chat import _names, format_from_config
from .config import _KIND_NAMES, PRESETS, ModelConfig, _show, get_preset
from .devices import release_freed_heap
from .errors import CheckpointError
from .layers import ROUTER_FP32
from .model import GLM


class ConfigError(CheckpointError, ValueError):
    """A config.json that does not describe a model (not a JSON object, a field of the wrong type or
    out of range). A CheckpointError, since that is what loading raises, and a ValueError, since
    that is what it is."""


# ---- rules ---------------------------------------------------------------------------------------
def _identity_join(ts):
    return ts[0]


def _identity_split(t):
    return [t]


@dataclass
class Rule:
    ours: str
    theirs: tuple[str, ...]
    join: Callable = _identity_join  # their tensors -> ours
    split: Callable = _identity_split  # ours -> their tensors (same order as `theirs`)



def _perm_rule(ours, theirs, to_ours: Callable, to_theirs: Callable):
    return Rule(ours, (theirs,), lambda ts: to_ours(ts[0]), lambda t: [to_theirs(t)])


def _rope2d_to_interleaved_perm(D: int) -> torch.Tensor:
    """Channel order turning rope_2d's first half (pairs i, i+r/2) into interleaved pairs."""
    r = D // 2
    first = torch.stack((torch.arange(r // 2), torch.arange(r // 2) + r // 2), 1).flatten()
    return torch.cat((first, torch.arange(r, D)))


def _permute_heads(t: torch.Tensor, n_heads: int, perm: torch.Tensor) -> torch.Tensor:
    """Reorder channels inside each head of a (heads*D, ...) weight or bias."""
    shape = t.shape
    return t.reshape(n_heads, -1, *shape[1:])[:, perm].reshape(shape)


# ---- formats -------------------------------------------------------------------------------------
@dataclass
class Format:
    name: str
    architectures: tuple[str, ...]
    config_from_hf: Callable[[dict], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict]
    rules: Callable[[ModelConfig], list[Rule]]
    prefixes: tuple[str, ...] = ("",)  # key prefixes seen in the wild, stripped on read
    ignore: tuple[str, ...] = field(default=())  # non-parameter buffers some checkpoints carry
    # (config, stored tensor names) -> config: what config.json cannot say alone (GLM-4.5's optional MTP layer)
    fit: Callable[[ModelConfig, dict], ModelConfig] | None = None


_REQUIRED = object()


def _get(d: dict, key: str, default=_REQUIRED, kind: type = int, src: str = ""):
    """config.json field `key` (null or absent: `default`), checked to be of `kind`; integers must
    be positive (every integer field read here is a size or a count). Errors name the field as
    config.json spells it, which is what the user can fix."""
    v = d.get(key)
    if v is None:
        if default is _REQUIRED:
            raise ConfigError(f"has no field {key!r}, which the {src} format requires")
        return default
    if kind in (int, float) and (isinstance(v, bool) or not isinstance(v, int if kind is int else (int, float))):
        raise ConfigError(f"field {key!r} must be {'an integer' if kind is int else 'a number'}, "
                          f"got {_show(v)}")
    if kind is int and v <= 0:
        raise ConfigError(f"field {key!r} must be a positive integer, got {v}")
    if kind not in (int, float) and not isinstance(v, kind):
        raise ConfigError(f"field {key!r} must be {_KIND_NAMES.get(kind.__name__, kind.__name__)}, "
                          f"got {_show(v)}")
    return v


def _need(d: dict, key: str, src: str, kind: type = int):
    return _get(d, key, _REQUIRED, kind, src)


# glmkit -------------------------------------------------------------------------------------------
def _meta_model(cfg: ModelConfig) -> GLM:
    """The model a checkpoint of `cfg` fills, on the meta device (quantized linears swapped in)."""
    with torch.device("meta"):
        model = GLM(cfg)
        if cfg.quant:
            from .quantize import swap_for_loading

            swap_for_loading(model, cfg.quant)
    return model


def _glmkit_rules(cfg: ModelConfig) -> list[Rule]:
    return [Rule(n, (n,)) for n in _meta_model(cfg).state_dict()]


def _glmkit_from_hf(d: dict) -> ModelConfig:
    return ModelConfig.from_dict({k: v for k, v in d.items() if k not in ("architectures", "model_type")})


GLMKIT = Format("glmkit", ("GlmkitForCausalLM",), _glmkit_from_hf, ModelConfig.to_hf_dict, _glmkit_rules)


# transformers GlmForCausalLM / Glm4ForCausalLM -------------------------------------------------------
def _hf_rope(d: dict, max_pos: int) -> tuple[str, dict]:
    """(the field that holds the rope settings, {rope_theta, rope_fraction, rope_scaling}) of an HF GLM
    config: transformers 5 writes `rope_parameters` (rope_type, rope_theta, partial_rotary_factor and
    the type's keys); older configs carry top-level rope_theta / partial_rotary_factor and `rope_scaling`
    ({"type" or "rope_type", keys}). Defaults filled in as transformers fills them, so the config we keep
    computes the same frequencies on its own."""
    rope, old = _get(d, "rope_parameters", {}, dict), _get(d, "rope_scaling", {}, dict)
    field = "rope_parameters" if rope else "rope_scaling"
    theta = _get(rope, "rope_theta", _get(d, "rope_theta", 10000.0, float), float)
    fraction = _get(rope, "partial_rotary_factor", _get(d, "partial_rotary_factor", 0.5, float), float)
    merged = {**old, **rope}
    kind = merged.get("rope_type", merged.get("type", "default"))
    scaling = {k: v for k, v in merged.items() if k not in ("rope_theta", "partial_rotary_factor", "type")}
    if kind == "default":
        return field, dict(rope_theta=theta, rope_fraction=fraction, rope_scaling=None)
    scaling["rope_type"] = kind
    if kind in ("yarn", "longrope", "llama3"):
        if d.get("original_max_position_embeddings") is not None:  # a top-level one wins, as in transformers
            scaling["original_max_position_embeddings"] = d["original_max_position_embeddings"]
        scaling.setdefault("original_max_position_embeddings", max_pos)
    n = scaling.get("original_max_position_embeddings")
    if kind in ("yarn", "longrope") and scaling.get("factor") is None and isinstance(n, int) and n > 0:
        scaling["factor"] = max_pos / n  # transformers' implicit factor: the context stretch
    return field, dict(rope_theta=theta, rope_fraction=fraction, rope_scaling=scaling)


def _hf_from_dict(d: dict, sandwich: bool, source: str) -> ModelConfig:
    if "glmkit_config" in d:  # our own export: restore what HF cannot express
        return ModelConfig.from_dict(d["glmkit_config"])
    H = _need(d, "num_attention_heads", source)
    max_pos = _get(d, "max_position_embeddings", 8192)
    field, rope = _hf_rope(d, max_pos)
    try:
        return ModelConfig(
            vocab_size=_need(d, "vocab_size", source), dim=_need(d, "hidden_size", source),
            n_layers=_need(d, "num_hidden_layers", source), n_heads=H,
            n_kv_heads=_get(d, "num_key_value_heads", H), head_dim=_get(d, "head_dim", None),
            ffn_dim=_need(d, "intermediate_size", source), max_seq_len=max_pos, position="rope_partial", **rope,
            norm="rmsnorm", norm_eps=_get(d, "rms_norm_eps", 1.5625e-07, float), mlp="swiglu",
            qkv_bias=_get(d, "attention_bias", True, bool), sandwich_norm=sandwich,
            tie_embeddings=_get(d, "tie_word_embeddings", False, bool), source=source, chat_format="glm4",
        )
    except ValueError as e:  # name the rope settings as config.json spells them
        raise ConfigError(str(e).replace("ModelConfig.rope_scaling", f"field {field!r}")) from None


def _hf_check_exportable(cfg: ModelConfig, fmt: str):
    problems = []
    if cfg.position not in ("rope_partial", "rope_2d"):
        problems.append(f"position={cfg.position}")
    if cfg.position == "rope_2d" and cfg.head_dim % 4:
        problems.append("rope_2d with head_dim not divisible by 4")
    if cfg.norm != "rmsnorm":
        problems.append(f"norm={cfg.norm}")
    if cfg.mlp != "swiglu":
        problems.append(f"mlp={cfg.mlp}")
    if cfg.residual != "pre_ln":
        problems.append(f"residual={cfg.residual}")
    if cfg.out_bias or cfg.mlp_bias:
        problems.append("biases on the attention output or MLP")
    if cfg.rope_fp16:
        problems.append("rope_fp16 (ChatGLM-6B's fp16 rotary frequencies)")
    if cfg.attention != "mha":
        problems.append(f"attention={cfg.attention} (latent attention is written as glm4_moe_lite_hf)")
    if cfg.sandwich_norm != (fmt == "glm4_hf"):
        problems.append(f"sandwich_norm={cfg.sandwich_norm} (GlmForCausalLM has none, Glm4ForCausalLM needs them)")
    if problems:
        raise CheckpointError(
            f"this model cannot be written as {fmt}: {'; '.join(problems)}. "
            f"Write it in its own layout with --to {cfg.source if cfg.source in FORMATS else 'glmkit'}"
        )


def _hf_to_dict(cfg: ModelConfig, sandwich: bool) -> dict:
    fmt = "glm4_hf" if sandwich else "glm_hf"
    _hf_check_exportable(cfg, fmt)
    d = {
        "architectures": ["Glm4ForCausalLM" if sandwich else "GlmForCausalLM"],
        "model_type": "glm4" if sandwich else "glm",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu", "attention_bias": cfg.qkv_bias, "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings, "rope_theta": cfg.rope_theta,
        "partial_rotary_factor": 0.5 if cfg.position == "rope_2d" else cfg.rope_fraction,
        # HF's default pad id (151329) must lie inside the vocabulary; ours has no pad token
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    }
    if cfg.rope_scaling:  # transformers 5's spelling, which it reads and writes
        d["rope_parameters"] = {"rope_theta": cfg.rope_theta, "partial_rotary_factor": d["partial_rotary_factor"],
                                **cfg.rope_scaling}
    if cfg.position == "rope_2d":
        d["glmkit_config"] = cfg.to_dict()
    return d


def _hf_rules(cfg: ModelConfig, sandwich: bool) -> list[Rule]:
    H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    perm = _rope2d_to_interleaved_perm(D) if cfg.position == "rope_2d" else None
    inv = torch.argsort(perm) if perm is not None else None

    def qkv_join(ts):
        q, k, v = ts
        if perm is not None:
            q, k = _permute_heads(q, H, inv), _permute_heads(k, K, inv)
        return torch.cat((q, k, v), 0)

    def qkv_split(t):
        q, k, v = t.split((H * D, K * D, K * D), 0)
        if perm is not None:
            q, k = _permute_heads(q, H, perm), _permute_heads(k, K, perm)
        return [q, k, v]

    rules = [Rule("embed.weight", ("model.embed_tokens.weight",)), Rule("norm.weight", ("model.norm.weight",))]
    if not cfg.tie_embeddings:
        rules.append(Rule("head.weight", ("lm_head.weight",)))
    for i in range(cfg.n_layers):
        o, t = f"layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            rules.append(Rule(o + f"attn.qkv.{kind}", tuple(t + f"self_attn.{p}_proj.{kind}" for p in "qkv"), qkv_join, qkv_split))
        rules += [
            Rule(o + "attn.out.weight", (t + "self_attn.o_proj.weight",)),
            Rule(o + "norm1.weight", (t + "input_layernorm.weight",)),
            Rule(o + "norm2.weight", (t + "post_attention_layernorm.weight",)),
            Rule(o + "mlp.up.weight", (t + "mlp.gate_up_proj.weight",)),
            Rule(o + "mlp.down.weight", (t + "mlp.down_proj.weight",)),
        ]
        if sandwich:
            rules += [
                Rule(o + "post_attn_norm.weight", (t + "post_self_attn_layernorm.weight",)),
                Rule(o + "post_mlp_norm.weight", (t + "post_mlp_layernorm.weight",)),
            ]
    return rules


GLM_HF = Format(
    "glm_hf", ("GlmForCausalLM", "GlmModel"),
    lambda d: _hf_from_dict(d, False, "glm_hf"), lambda c: _hf_to_dict(c, False), lambda c: _hf_rules(c, False),
    ignore=("rotary_emb.inv_freq",),
)
GLM4_HF = Format(
    "glm4_hf", ("Glm4ForCausalLM", "Glm4Model"),
    lambda d: _hf_from_dict(d, True, "glm4_hf"), lambda c: _hf_to_dict(c, True), lambda c: _hf_rules(c, True),
    ignore=("rotary_emb.inv_freq",),
)


# transformers Glm4MoeLiteForCausalLM (GLM-4.7-Flash): latent attention ------------------------------------
# transformers' Glm4MoeLiteConfig defaults for the expert fields (GLM-4.7-Flash: 64 experts, 4 routed, 1 shared)
_LITE_MOE_DEFAULTS = {"n_routed_experts": 64, "num_experts_per_tok": 4, "moe_intermediate_size": 1536,
                      "n_shared_experts": 1, "routed_scaling_factor": 1.8}


def _lite_from_dict(d: dict, src: str = "glm4_moe_lite_hf", defaults: dict | None = None) -> ModelConfig:
    """The config of a Glm4MoeLite checkpoint (latent attention; experts in the "sparse" layers of
    mlp_layer_types, by default every layer after the first, as transformers; it reads no
    first_k_dense_replace), with transformers' defaults for absent fields (its class's defaults are
    GLM-4.7-Flash's sizes; `defaults` overrides them for GlmMoeDsa, which shares this layout)."""
    defaults = defaults or {}
    L = _get(d, "num_hidden_layers", defaults.get("num_hidden_layers", 47))
    H = _get(d, "num_attention_heads", defaults.get("num_attention_heads", 20))
    kinds = d.get("mlp_layer_types") or defaults.get("mlp_layer_types") or ["dense"] + ["sparse"] * (L - 1)
    moe = {} if kinds == ["dense"] * L else moe_fields(
        {**_LITE_MOE_DEFAULTS, **defaults.get("moe", {}), **{k: v for k, v in d.items() if v is not None},
         "mlp_layer_types": kinds}, L, src)
    if _get(d, "num_key_value_heads", H) != H:  # transformers expands one latent into every head's keys
        raise ConfigError(f"field 'num_key_value_heads' must equal num_attention_heads ({H}) in {src}")
    if _get(d, "hidden_act", "silu", str) != "silu":
        raise ConfigError(f"field 'hidden_act' must be 'silu' in {src}, got {d['hidden_act']!r}")
    max_pos = _get(d, "max_position_embeddings", 202752)
    field, rope = _hf_rope(d, max_pos)
    fraction = (d.get("rope_parameters") or {}).get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if fraction not in (None, 1, 1.0):  # transformers' latent attention rotates all qk_rope_head_dim channels
        raise ConfigError(f"partial_rotary_factor {fraction!r}: {src} rotates every rope channel (1.0)")
    bias = _get(d, "attention_bias", False, bool)
    try:
        return ModelConfig(
            vocab_size=_get(d, "vocab_size", 154880), dim=_get(d, "hidden_size", defaults.get("hidden_size", 2048)),
            n_layers=L, n_heads=H, ffn_dim=_get(d, "intermediate_size", defaults.get("intermediate_size", 10240)),
            max_seq_len=max_pos, position="rope_partial",
            rope_theta=rope["rope_theta"], rope_scaling=rope["rope_scaling"], norm="rmsnorm",
            norm_eps=_get(d, "rms_norm_eps", 1e-5, float), mlp="swiglu", qkv_bias=bias, out_bias=bias,
            tie_embeddings=_get(d, "tie_word_embeddings", False, bool), source=src, chat_format="glm47",
            attention="mla",  # q_lora_rank null: no q compression
            q_lora_rank=_get(d, "q_lora_rank", None) if "q_lora_rank" in d else defaults.get("q_lora_rank", 768),
            kv_lora_rank=_get(d, "kv_lora_rank", 512), qk_nope_head_dim=_get(d, "qk_nope_head_dim", 192),
            qk_rope_head_dim=_get(d, "qk_rope_head_dim", 64), v_head_dim=_get(d, "v_head_dim", 256),
            rope_interleave=_get(d, "rope_interleave", True, bool) if "rope_interleave" not in defaults
            else defaults["rope_interleave"], **moe, **defaults.get("extra", {}),
        )
    except ValueError as e:
        raise ConfigError(str(e).replace("ModelConfig.rope_scaling", f"field {field!r}")) from None


def _lite_to_dict(cfg: ModelConfig, fmt: str = "glm4_moe_lite_hf") -> dict:
    problems = []
    if cfg.attention != "mla":
        problems.append(f"attention={cfg.attention} (this layout is latent attention)")
    if (cfg.norm, cfg.mlp, cfg.residual) != ("rmsnorm", "swiglu", "pre_ln") or cfg.sandwich_norm or not cfg.final_norm:
        problems.append(f"norm={cfg.norm}, mlp={cfg.mlp}, residual={cfg.residual}, sandwich_norm={cfg.sandwich_norm}, "
                        f"final_norm={cfg.final_norm}")
    if cfg.qkv_bias != cfg.out_bias or cfg.mlp_bias:
        problems.append("biases other than attention_bias (q_a, kv_a and o_proj together)")
    if cfg.rope_fp16 or cfg.qk_norm:
        problems.append("rope_fp16 or qk_norm")
    if bool(cfg.index_n_heads) != (fmt == "glm_moe_dsa_hf"):
        problems.append(f"index_n_heads={cfg.index_n_heads} (the sparse attention indexer is GLM-5's: glm_moe_dsa_hf)")
    if fmt == "glm_moe_dsa_hf" and not cfg.rope_interleave:
        problems.append("rope_interleave=false (GlmMoeDsa rotates interleaved pairs)")
    if problems:
        raise CheckpointError(f"this model cannot be written as {fmt}: {'; '.join(problems)}. "
                              f"Write it with --to glmkit")
    d = {
        "architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim, "rope_interleave": cfg.rope_interleave,
        "mlp_layer_types": ["sparse" if cfg.is_moe_layer(i) else "dense" for i in range(cfg.n_layers)],
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "attention_bias": cfg.qkv_bias, "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})},
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    }
    if cfg.n_experts:
        d.update(moe_to_hf(cfg))
        del d["first_k_dense_replace"]  # transformers reads mlp_layer_types only; written there
    return d


def _latent_attention_rules(cfg: ModelConfig, o: str, t: str) -> list[Rule]:
    """One layer's latent attention: our `o`attn.* <-> transformers' `t`self_attn.* (no reshuffle)."""
    bias = ("weight", "bias") if cfg.qkv_bias else ("weight",)
    a, s = o + "attn.", t + "self_attn."
    if cfg.q_lora_rank is None:
        rules = [Rule(a + "q.weight", (s + "q_proj.weight",))]
    else:
        rules = [Rule(a + f"q_a.{k}", (s + f"q_a_proj.{k}",)) for k in bias]
        rules += [Rule(a + "q_norm.weight", (s + "q_a_layernorm.weight",)), Rule(a + "q_b.weight", (s + "q_b_proj.weight",))]
    rules += [Rule(a + f"kv_a.{k}", (s + f"kv_a_proj_with_mqa.{k}",)) for k in bias]
    rules += [Rule(a + "kv_norm.weight", (s + "kv_a_layernorm.weight",)), Rule(a + "kv_b.weight", (s + "kv_b_proj.weight",))]
    rules += [Rule(a + f"out.{k}", (s + f"o_proj.{k}",)) for k in (("weight", "bias") if cfg.out_bias else ("weight",))]
    return rules


def _lite_block_rules(cfg: ModelConfig, o: str, t: str, layer: int) -> list[Rule]:
    return _latent_attention_rules(cfg, o, t) + moe_mlp_rules(cfg, o, t, layer) + [
        Rule(o + "norm1.weight", (t + "input_layernorm.weight",)),
        Rule(o + "norm2.weight", (t + "post_attention_layernorm.weight",))]


def _lite_rules(cfg: ModelConfig, block_rules=_lite_block_rules) -> list[Rule]:
    """transformers' MoE layouts (Glm4Moe, Glm4MoeLite, GlmMoeDsa): embeddings, final norm, untied head,
    `block_rules` for each layer and for the multi-token-prediction layers after them."""
    rules = [Rule("embed.weight", ("model.embed_tokens.weight",)), Rule("norm.weight", ("model.norm.weight",))]
    if not cfg.tie_embeddings:
        rules.append(Rule("head.weight", ("lm_head.weight",)))
    for i in range(cfg.n_layers):
        rules += block_rules(cfg, f"layers.{i}.", f"model.layers.{i}.", i)
    return rules + mtp_rules(cfg, block_rules)


# transformers GlmMoeDsaForCausalLM (GLM-5): Glm4MoeLite's layout plus the sparse attention indexer ----------
_DSA_DEFAULTS = {  # transformers' GlmMoeDsaConfig defaults where they differ from Glm4MoeLite's (GLM-5's sizes)
    "num_hidden_layers": 78, "num_attention_heads": 64, "hidden_size": 6144, "intermediate_size": 12288,
    "q_lora_rank": 2048, "rope_interleave": True,
    "moe": {"n_routed_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
            "routed_scaling_factor": 2.5},
}


def _dsa_pattern(d: dict, L: int) -> str:
    """index_pattern from indexer_types ("full" / "shared" per layer), else index_topk_pattern ("F"/"S" string
    or list), else transformers' default from index_topk_freq / index_skip_topk_offset (every layer "F")."""
    types = d.get("indexer_types")
    if types is None and d.get("index_topk_pattern") is not None:
        pat = d["index_topk_pattern"]
        types = [{"F": "full", "S": "shared"}.get(c, c) for c in pat]
    if types is None:
        freq, offset = max(_count(d, "index_topk_freq", 1), 1), _count(d, "index_skip_topk_offset", 2)
        types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(L)]
    if not isinstance(types, list) or len(types) != L or not set(types) <= {"full", "shared"} or types[0] != "full":
        raise ConfigError(f"field 'indexer_types' must list 'full' or 'shared' for each of the {L} layers, the first "
                          f"'full', got {_show(types)}")
    return "".join("F" if t == "full" else "S" for t in types)


def _dsa_from_dict(d: dict) -> ModelConfig:
    src = "glm_moe_dsa_hf"
    if d.get("rope_interleave") is False:
        raise ConfigError(f"field 'rope_interleave' is false; {src} (GlmMoeDsa) always rotates interleaved pairs")
    L = _get(d, "num_hidden_layers", 78)
    if d.get("mlp_layer_types") is None:  # transformers: first_k_dense_replace dense layers, then experts
        k = min(_count(d, "first_k_dense_replace", 3), L)
        d = {**d, "mlp_layer_types": ["dense"] * k + ["sparse"] * (L - k)}
    if "q_lora_rank" in d and d["q_lora_rank"] is None:
        raise ConfigError(f"field 'q_lora_rank' is null; {src}'s indexer reads the compressed query")
    pattern = _dsa_pattern(d, L)
    extra = {"index_n_heads": _get(d, "index_n_heads", 32), "index_head_dim": _get(d, "index_head_dim", 128),
             "index_topk": _get(d, "index_topk", 2048), "index_pattern": None if set(pattern) == {"F"} else pattern}
    return _lite_from_dict(d, src, {**_DSA_DEFAULTS, "extra": extra})


def _dsa_to_dict(cfg: ModelConfig) -> dict:
    d = _lite_to_dict(cfg, "glm_moe_dsa_hf")
    del d["rope_interleave"]  # not a GlmMoeDsa field: it always interleaves
    d.update({"architectures": ["GlmMoeDsaForCausalLM"], "model_type": "glm_moe_dsa",
              "index_n_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim, "index_topk": cfg.index_topk,
              "indexer_types": ["full" if cfg.has_indexer(i) else "shared" for i in range(cfg.n_layers)]})
    if "first_k_dense_replace" not in d:  # all dense: transformers would read its default 3 without it
        d["first_k_dense_replace"] = cfg.n_layers
    return d


def _dsa_block_rules(cfg: ModelConfig, o: str, t: str, layer: int) -> list[Rule]:
    rules = _lite_block_rules(cfg, o, t, layer)
    if cfg.has_indexer(layer):
        i, j = o + "attn.indexer.", t + "self_attn.indexer."
        rules += [Rule(i + n, (j + n,)) for n in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias",
                                                   "weights_proj.weight")]
    return rules


GLM_MOE_DSA_HF = Format(
    "glm_moe_dsa_hf", ("GlmMoeDsaForCausalLM", "GlmMoeDsaModel"), _dsa_from_dict, _dsa_to_dict,
    lambda c: _lite_rules(c, _dsa_block_rules),
    ignore=("rotary_emb.inv_freq", "shared_head.head.weight", "embed_tokens.weight"), fit=lambda c, n: _moe_fit(c, n),
)


GLM4_MOE_LITE_HF = Format(
    "glm4_moe_lite_hf", ("Glm4MoeLiteForCausalLM", "Glm4MoeLiteModel"), _lite_from_dict, _lite_to_dict, _lite_rules,
    ignore=("rotary_emb.inv_freq", "shared_head.head.weight", "embed_tokens.weight"), fit=lambda c, n: _moe_fit(c, n),
)


# transformers Glm4MoeForCausalLM (GLM-4.5 / 4.6 / 4.7, -Air) -----------------------------------------
def _count(d: dict, key: str, default: int) -> int:
    """A config.json count that may be 0 (first_k_dense_replace, n_shared_experts, ...)."""
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"field {key!r} must be a non-negative integer, got {_show(v)}")
    return v


def _dense_first(d: dict, n_layers: int, src: str) -> int:
    """How many leading layers are dense: first_k_dense_replace, or transformers' `mlp_layer_types`
    ("dense" then "sparse" per layer) where a config has it. Other orders are refused (we have no field)."""
    types = d.get("mlp_layer_types")
    if types is None:
        return _count(d, "first_k_dense_replace", 1)
    if not isinstance(types, list) or len(types) != n_layers or not set(types) <= {"dense", "sparse"}:
        raise ConfigError(f"field 'mlp_layer_types' must list 'dense' or 'sparse' for each of the {n_layers} layers, "
                          f"got {_show(types)}")
    k = types.count("dense")
    if types != ["dense"] * k + ["sparse"] * (n_layers - k):
        raise ConfigError(f"field 'mlp_layer_types': {src} models in glmkit have their dense layers first, got {types}")
    return k


def moe_fields(d: dict, n_layers: int, src: str) -> dict:
    """The ModelConfig mixture-of-experts fields of a transformers GLM MoE config (Glm4Moe; the same keys
    in Glm4MoeLite), and its MTP layer count."""
    experts = d.get("n_routed_experts", d.get("num_local_experts"))
    return dict(
        n_experts=_get({"n_routed_experts": experts}, "n_routed_experts", src=src),
        n_experts_per_tok=_need(d, "num_experts_per_tok", src), n_shared_experts=_count(d, "n_shared_experts", 1),
        moe_ffn_dim=_need(d, "moe_intermediate_size", src), first_dense_layers=_dense_first(d, n_layers, src),
        n_group=_get(d, "n_group", 1), topk_group=_get(d, "topk_group", 1),
        norm_topk_prob=_get(d, "norm_topk_prob", True, bool),
        routed_scaling_factor=_get(d, "routed_scaling_factor", 1.0, float),
        n_mtp_layers=_count(d, "num_nextn_predict_layers", _count(d, "num_mtp_layers", 0)),
    )


def moe_to_hf(cfg: ModelConfig) -> dict:
    """The config.json keys of moe_fields, from a ModelConfig."""
    return {
        "n_routed_experts": cfg.n_experts, "num_experts_per_tok": cfg.n_experts_per_tok,
        "n_shared_experts": cfg.n_shared_experts, "moe_intermediate_size": cfg.moe_ffn_dim,
        "first_k_dense_replace": cfg.first_dense_layers, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
        "norm_topk_prob": cfg.norm_topk_prob, "routed_scaling_factor": cfg.routed_scaling_factor,
        "num_nextn_predict_layers": cfg.n_mtp_layers,
    }


def _moe_from_dict(d: dict) -> ModelConfig:
    src = "glm4_moe_hf"
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"field 'hidden_act' is {d['hidden_act']!r}; the {src} format has SwiGLU experts (silu)")
    H, C, L = _need(d, "num_attention_heads", src), _need(d, "hidden_size", src), _need(d, "num_hidden_layers", src)
    max_pos = _get(d, "max_position_embeddings", 131072)
    field_, rope = _hf_rope(d, max_pos)
    try:
        return ModelConfig(
            vocab_size=_need(d, "vocab_size", src), dim=C, n_layers=L, n_heads=H,
            # no head_dim: transformers' hidden_size // num_attention_heads, rounded down
            n_kv_heads=_get(d, "num_key_value_heads", H), head_dim=_get(d, "head_dim", max(1, C // H)),
            ffn_dim=_need(d, "intermediate_size", src), max_seq_len=max_pos, position="rope_partial", **rope,
            norm="rmsnorm", norm_eps=_get(d, "rms_norm_eps", 1e-5, float), mlp="swiglu",
            qkv_bias=_get(d, "attention_bias", False, bool), tie_embeddings=_get(d, "tie_word_embeddings", False, bool),
            qk_norm=_get(d, "use_qk_norm", False, bool), rope_interleave=False, source=src,
            # GLM-4.5 / 4.6's layout; GLM-4.7 (same architecture) writes GLM-4.7-Flash's compact one
            chat_format="glm47" if "glm-4.7" in _names(d.get("_name_or_path")) else "glm45",
            **moe_fields(d, L, src),
        )
    except ValueError as e:
        raise ConfigError(str(e).replace("ModelConfig.rope_scaling", f"field {field_!r}")) from None


def _moe_fit(cfg: ModelConfig, names: dict) -> ModelConfig:
    """num_nextn_predict_layers counts MTP layers a checkpoint may not ship: transformers writes 1 and saves
    none (its model has no MTP module). Without any of their tensors the model has none; a partial one is
    still reported missing by name."""
    if cfg.n_mtp_layers and not any(n.startswith(f"model.layers.{cfg.n_layers}.") for n in names):
        return replace(cfg, n_mtp_layers=0)
    return cfg


def _moe_to_dict(cfg: ModelConfig) -> dict:
    problems = []
    if not cfg.n_experts:
        problems.append("no experts (n_experts=0)")
    if cfg.position != "rope_partial" or cfg.rope_interleave:
        problems.append(f"position={cfg.position}, rope_interleave={cfg.rope_interleave} (it rotates half-split "
                        "pairs on the first rope_fraction: rope_partial, rope_interleave=false)")
    if cfg.norm != "rmsnorm" or cfg.residual != "pre_ln" or cfg.sandwich_norm or not cfg.final_norm:
        problems.append(f"norm={cfg.norm}, residual={cfg.residual}, sandwich_norm={cfg.sandwich_norm}, "
                        f"final_norm={cfg.final_norm}")
    if cfg.out_bias or cfg.rope_fp16:
        problems.append("out_bias or rope_fp16")
    if problems:
        raise CheckpointError(f"this model cannot be written as glm4_moe_hf: {'; '.join(problems)}. Write it in its "
                              f"own layout with --to {cfg.source if cfg.source in FORMATS else 'glmkit'}")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.rope_fraction,
            **(cfg.rope_scaling or {})}
    return {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "attention_bias": cfg.qkv_bias, "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings, "rope_parameters": rope, "use_qk_norm": cfg.qk_norm,
        **moe_to_hf(cfg), "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    }


def _gate_up_join(ts):
    return torch.cat(ts, 0)  # [gate; up], our SwiGLU up's rows


def _gate_up_split(t):
    return list(t.chunk(2, 0))


def _moe_block_rules(cfg: ModelConfig, o: str, t: str, layer: int) -> list[Rule]:
    """Rules of one Glm4Moe decoder layer: ours under prefix `o`, theirs under `t` (block `layer`'s MLP kind)."""
    H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    rules = []
    for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
        rules.append(Rule(o + f"attn.qkv.{kind}", tuple(t + f"self_attn.{p}_proj.{kind}" for p in "qkv"),
                          lambda ts: torch.cat(ts, 0), lambda x: list(x.split((H * D, K * D, K * D), 0))))
    rules += [Rule(o + "attn.out.weight", (t + "self_attn.o_proj.weight",)),
              Rule(o + "norm1.weight", (t + "input_layernorm.weight",)),
              Rule(o + "norm2.weight", (t + "post_attention_layernorm.weight",))]
    if cfg.qk_norm:
        rules += [Rule(o + f"attn.{p}_norm.weight", (t + f"self_attn.{p}_norm.weight",)) for p in "qk"]

    return rules + moe_mlp_rules(cfg, o, t, layer)


def moe_mlp_rules(cfg: ModelConfig, o: str, t: str, layer: int) -> list[Rule]:
    """Rules of the MLP side of transformers' Glm4Moe / Glm4MoeLite decoder layer `layer` (ours under `o`,
    theirs under `t`): the dense MLP, or router, correction bias, per-expert and shared-expert tensors."""
    def mlp(ours, theirs):
        return [Rule(ours + "up.weight", (theirs + "gate_proj.weight", theirs + "up_proj.weight"), _gate_up_join,
                     _gate_up_split), Rule(ours + "down.weight", (theirs + "down_proj.weight",))]

    if not cfg.is_moe_layer(layer):
        return mlp(o + "mlp.", t + "mlp.")
    rules = [Rule(o + "mlp.gate.weight", (t + "mlp.gate.weight",)),
             Rule(o + "mlp.gate.e_score_correction_bias", (t + "mlp.gate.e_score_correction_bias",))]
    for e in range(cfg.n_experts):
        rules += mlp(o + f"mlp.experts.{e}.", t + f"mlp.experts.{e}.")
    if cfg.n_shared_experts:
        rules += mlp(o + "mlp.shared.", t + "mlp.shared_experts.")
    return rules


def _moe_rules(cfg: ModelConfig) -> list[Rule]:
    return _lite_rules(cfg, _moe_block_rules)  # Glm4MoeLite's layout with Glm4Moe's blocks


def mtp_rules(cfg: ModelConfig, block_rules) -> list[Rule]:
    """The multi-token-prediction layers, stored as layers n_layers, n_layers + 1, ... after the model's own;
    `block_rules(cfg, ours, theirs, layer)` names the decoder layer inside each."""
    rules = []
    for i in range(cfg.n_mtp_layers):
        o, t, L = f"mtp.{i}.", f"model.layers.{cfg.n_layers + i}.", cfg.n_layers + i
        rules += [Rule(o + "enorm.weight", (t + "enorm.weight",)), Rule(o + "hnorm.weight", (t + "hnorm.weight",)),
                  Rule(o + "eh_proj.weight", (t + "eh_proj.weight",)),
                  Rule(o + "shared_head_norm.weight", (t + "shared_head.norm.weight",))]
        rules += block_rules(cfg, o + "block.", t, L)
    return rules


# The MTP layer's embed_tokens and shared_head.head, where a release ships them, are copies of the model's
# embedding and head: skipped on read, not written.
GLM4_MOE_HF = Format(
    "glm4_moe_hf", ("Glm4MoeForCausalLM", "Glm4MoeModel"), _moe_from_dict, _moe_to_dict, _moe_rules,
    ignore=("rotary_emb.inv_freq", "shared_head.head.weight", "embed_tokens.weight"), fit=_moe_fit,
)


# original THUDM GLM and ChatGLM-6B (remote code) ----------------------------------------------------
def _megatron_layer_rules(cfg: ModelConfig, t_prefix: str, qkv: Rule | None) -> list[Rule]:
    """Per-layer names shared by the original GLM and ChatGLM-6B (Megatron lineage)."""
    rules = []
    for i in range(cfg.n_layers):
        o, t = f"layers.{i}.", f"{t_prefix}layers.{i}."
        for kind in ("weight", "bias"):
            rules += [
                Rule(o + f"norm1.{kind}", (t + f"input_layernorm.{kind}",)),
                Rule(o + f"attn.out.{kind}", (t + f"attention.dense.{kind}",)),
                Rule(o + f"norm2.{kind}", (t + f"post_attention_layernorm.{kind}",)),
                Rule(o + f"mlp.up.{kind}", (t + f"mlp.dense_h_to_4h.{kind}",)),
                Rule(o + f"mlp.down.{kind}", (t + f"mlp.dense_4h_to_h.{kind}",)),
            ]
            their = t + f"attention.query_key_value.{kind}"
            rules.append(qkv(o + f"attn.qkv.{kind}", their) if qkv else Rule(o + f"attn.qkv.{kind}", (their,)))
    return rules


def _glm_from_dict(d: dict) -> ModelConfig:
    src = "original GLM"
    if d.get("relative_encoding"):
        raise CheckpointError(f"{src}: relative_encoding=true (Transformer-XL style) is not supported")
    if not d.get("block_position_encoding", True):
        raise CheckpointError(f"{src}: block_position_encoding=false checkpoints are not supported")
    # The published code (modeling_glm.py, like THUDM/GLM's training code) sizes both position tables at
    # max_sequence_length + 1 rows (1,025 for the released models): positions 0..max_sequence_length are
    # all usable, so that row count is our max_seq_len. Its MLP uses the exact (erf) GELU.
    return ModelConfig(
        vocab_size=_need(d, "vocab_size", src), dim=_need(d, "hidden_size", src), n_layers=_need(d, "num_layers", src),
        n_heads=_need(d, "num_attention_heads", src), max_seq_len=_need(d, "max_sequence_length", src) + 1,
        position="learned_2d", norm="layernorm", norm_eps=1e-5, mlp="gelu_exact", qkv_bias=True, out_bias=True,
        mlp_bias=True, tie_embeddings=True, source="glm",
    )


def _glm_to_dict(cfg: ModelConfig) -> dict:
    if (cfg.position, cfg.norm, cfg.mlp, cfg.residual, cfg.tie_embeddings, cfg.n_kv_heads) != (
        "learned_2d", "layernorm", "gelu_exact", "pre_ln", True, cfg.n_heads
    ) or cfg.ffn_dim != 4 * cfg.dim or not (cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias) or cfg.max_seq_len < 2:
        raise CheckpointError("only original-GLM-shaped models (learned_2d, LayerNorm, exact GELU (gelu_exact) 4x, "
                              "biases, tied, max_seq_len >= 2) can be written as glm: its published code computes that")
    return {
        "architectures": ["GLMModel"], "model_type": "glm", "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "num_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "max_sequence_length": cfg.max_seq_len - 1,
        "block_position_encoding": True, "relative_encoding": False,
    }


def _glm_rules(cfg: ModelConfig) -> list[Rule]:
    t = "transformer."
    return [
        Rule("embed.weight", ("word_embeddings.weight",)),
        Rule("pos_embed.weight", (t + "position_embeddings.weight",)),
        Rule("block_pos_embed.weight", (t + "block_position_embeddings.weight",)),
        Rule("norm.weight", (t + "final_layernorm.weight",)),
        Rule("norm.bias", (t + "final_layernorm.bias",)),
    ] + _megatron_layer_rules(cfg, t, None)


GLM_ORIG = Format(
    "glm", ("GLMModel", "GLMForConditionalGeneration", "GLMForMultipleChoice", "GLMForSingleTokenCloze"),
    _glm_from_dict, _glm_to_dict, _glm_rules, prefixes=("glm.", ""),
)


def _chatglm_from_dict(d: dict) -> ModelConfig:
    src = "ChatGLM"
    if "position_encoding_2d" not in d:  # detect_format sends these to CHATGLM2
        raise CheckpointError("this is a ChatGLM2/3 or GLM-4 remote-code config (no position_encoding_2d): "
                              "read it as the chatglm2 format")
    if not d["position_encoding_2d"]:
        raise CheckpointError(f"{src}: position_encoding_2d=false is not supported")
    if d.get("quantization_bit", 0):
        raise CheckpointError(f"{src}: quantization_bit={d['quantization_bit']}; convert the unquantized checkpoint")
    if d.get("pre_seq_len"):
        raise CheckpointError(f"{src}: P-tuning prefix checkpoints (pre_seq_len) are not supported")
    return ModelConfig(
        vocab_size=_need(d, "vocab_size", src), dim=_need(d, "hidden_size", src), n_layers=_need(d, "num_layers", src),
        n_heads=_need(d, "num_attention_heads", src), ffn_dim=_get(d, "inner_hidden_size", 4 * _need(d, "hidden_size", src)),
        max_seq_len=_get(d, "max_sequence_length", 2048), position="rope_2d", norm="layernorm",
        norm_eps=_get(d, "layernorm_epsilon", 1e-5, float), residual="deepnorm", mlp="gelu",
        qkv_bias=True, out_bias=True, mlp_bias=True, source="chatglm", chat_format="chatglm",
        # the published modeling_chatglm.py rounds the rotary inverse frequencies to fp16 (ignoring the
        # stored inv_freq), and builds its blocks without num_layers: alpha is sqrt(2 * 28) at any depth
        rope_fp16=True, deepnorm_layers=28,
        # ChatGLM-6B's config.json has no tie_word_embeddings, so HF ties lm_head to the embeddings
        # when loading (its default); a stored lm_head.weight is then ignored, as HF ignores it
        tie_embeddings=_get(d, "tie_word_embeddings", True, bool),
    )


def _chatglm_to_dict(cfg: ModelConfig) -> dict:
    if (cfg.position, cfg.norm, cfg.mlp, cfg.residual, cfg.n_kv_heads) != (
        "rope_2d", "layernorm", "gelu", "deepnorm", cfg.n_heads
    ) or not (cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias):
        raise CheckpointError("only ChatGLM-6B-shaped models can be written as chatglm")
    published = dict(rope_fp16=True, alpha_layers=28, rope_theta=10000.0, rope_scaling=None)
    ours = dict(rope_fp16=cfg.rope_fp16, alpha_layers=cfg.deepnorm_layers or cfg.n_layers, rope_theta=cfg.rope_theta,
                rope_scaling=cfg.rope_scaling)
    if ours != published:  # what its published code would compute instead
        diff = ", ".join(f"{k}={ours[k]} (it computes {v})" for k, v in published.items() if ours[k] != v)
        raise CheckpointError(f"this model cannot be written as chatglm: the published ChatGLM-6B code would run it "
                              f"differently: {diff}. Write it as glmkit")
    return {"tie_word_embeddings": cfg.tie_embeddings,
        "architectures": ["ChatGLMModel"], "model_type": "chatglm", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "inner_hidden_size": cfg.ffn_dim, "num_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "max_sequence_length": cfg.max_seq_len,
        "layernorm_epsilon": cfg.norm_eps, "position_encoding_2d": True,
    }


def _chatglm_rules(cfg: ModelConfig) -> list[Rule]:
    H, D = cfg.n_heads, cfg.head_dim

    def qkv(ours, theirs):  # theirs: rows (H, [q k v], D); ours: ([q k v], H, D)
        return _perm_rule(
            ours, theirs,
            lambda t: t.reshape(H, 3, D, *t.shape[1:]).transpose(0, 1).reshape(t.shape),
            lambda t: t.reshape(3, H, D, *t.shape[1:]).transpose(0, 1).reshape(t.shape),
        )

    t = "transformer."
    return [
        Rule("embed.weight", (t + "word_embeddings.weight",)),
        Rule("norm.weight", (t + "final_layernorm.weight",)),
        Rule("norm.bias", (t + "final_layernorm.bias",)),
    ] + ([] if cfg.tie_embeddings else [Rule("head.weight", ("lm_head.weight",))]) + _megatron_layer_rules(cfg, t, qkv)


CHATGLM = Format(
    "chatglm", ("ChatGLMModel", "ChatGLMForConditionalGeneration"), _chatglm_from_dict, _chatglm_to_dict,
    _chatglm_rules, ignore=("rotary_emb.inv_freq",),
)

# ChatGLM2-6B, ChatGLM3-6B, CodeGeeX2-6B, GLM-4-9B(-chat, -1m), CodeGeeX4 (remote code) ------------------
def _chatglm2_from_dict(d: dict) -> ModelConfig:
    """The later `ChatGLMModel` (ChatGLM2 onwards): GLM-4's network under Megatron-style names.

    It is GlmForCausalLM with head_dim = kv_channels, kv heads = multi_query_group_num (all heads
    without multi-query attention), rope_theta = 10000 x rope_ratio and rotary on the first half of
    each head in interleaved pairs. Released ChatGLM2/3 configs have no vocab_size or
    num_hidden_layers: the sizes are padded_vocab_size and num_layers."""
    src = "ChatGLM2/3 / GLM-4 remote-code"
    if d.get("quantization_bit", 0):
        raise CheckpointError(f"{src}: quantization_bit={d['quantization_bit']} (the remote code's own int4/int8 "
                              "weights); convert the unquantized checkpoint, or quantize with glmkit (--quantize int4)")
    if d.get("pre_seq_len"):
        raise CheckpointError(f"{src}: P-tuning v2 prefix checkpoints (pre_seq_len) are not supported; "
                              "merge or drop the prefix encoder first")
    H = _need(d, "num_attention_heads", src)
    C = _need(d, "hidden_size", src)
    multi_query = _get(d, "multi_query_attention", False, bool)
    bias_linear = _get(d, "add_bias_linear", False, bool)
    vocab = _get(d, "padded_vocab_size", None) or _need(d, "vocab_size", src)
    layers = _get(d, "num_layers", None) or _need(d, "num_hidden_layers", src)
    return ModelConfig(
        vocab_size=vocab, dim=C, n_layers=layers, n_heads=H,
        n_kv_heads=_get(d, "multi_query_group_num", 1) if multi_query else H,
        head_dim=_get(d, "kv_channels", None), ffn_dim=_need(d, "ffn_hidden_size", src),
        max_seq_len=_get(d, "seq_length", 8192), position="rope_partial", rope_fraction=0.5,
        rope_theta=10000.0 * _get(d, "rope_ratio", 1, float),
        norm="rmsnorm" if _get(d, "rmsnorm", True, bool) else "layernorm",
        norm_eps=_get(d, "layernorm_epsilon", 1e-5, float), mlp="swiglu",
        qkv_bias=bias_linear or _get(d, "add_qkv_bias", False, bool), out_bias=bias_linear, mlp_bias=bias_linear,
        final_norm=_get(d, "post_layer_norm", True, bool),
        residual="normed" if _get(d, "apply_residual_connection_post_layernorm", False, bool) else "pre_ln",
        tie_embeddings=_get(d, "tie_word_embeddings", False, bool), source="chatglm2",
        chat_format=format_from_config(d),  # by the release's name; config_of also asks its tokenizer_config.json
    )


def _chatglm2_to_dict(cfg: ModelConfig) -> dict:
    problems = []
    if cfg.position != "rope_partial" or cfg.rotary_dim * 2 != cfg.head_dim:
        problems.append(f"position={cfg.position} with rotary on {cfg.rotary_dim} of {cfg.head_dim} channels "
                        "(this layout rotates exactly the first half of each head)")
    if cfg.mlp != "swiglu" or cfg.residual not in ("pre_ln", "normed") or cfg.sandwich_norm:
        problems.append(f"mlp={cfg.mlp}, residual={cfg.residual}, sandwich_norm={cfg.sandwich_norm}")
    if cfg.out_bias != cfg.mlp_bias or (cfg.out_bias and not cfg.qkv_bias):
        problems.append("biases on some linears only (add_bias_linear puts them on all four)")
    if cfg.attention != "mha":
        problems.append(f"attention={cfg.attention}")
    if problems:
        raise CheckpointError(f"this model cannot be written as chatglm2: {'; '.join(problems)}")
    d = {
        "architectures": ["ChatGLMModel"], "model_type": "chatglm",
        "padded_vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "ffn_hidden_size": cfg.ffn_dim,
        "num_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "kv_channels": cfg.head_dim,
        "multi_query_attention": cfg.n_kv_heads != cfg.n_heads, "multi_query_group_num": cfg.n_kv_heads,
        "seq_length": cfg.max_seq_len, "rope_ratio": _plain_number(cfg.rope_theta / 10000.0), "original_rope": True,
        "rmsnorm": cfg.norm == "rmsnorm", "layernorm_epsilon": cfg.norm_eps, "post_layer_norm": cfg.final_norm,
        "apply_residual_connection_post_layernorm": cfg.residual == "normed", "add_bias_linear": cfg.out_bias,
        "add_qkv_bias": cfg.qkv_bias, "tie_word_embeddings": cfg.tie_embeddings,
        "apply_query_key_layer_scaling": True, "attention_softmax_in_fp32": True, "fp32_residual_connection": False,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "bias_dropout_fusion": True,
        "quantization_bit": 0, "pre_seq_len": None, "prefix_projection": False,
    }
    return d


def _plain_number(x: float) -> int | float:
    """500 rather than 500.0: the releases write integral ratios as integers."""
    return int(x) if float(x).is_integer() else x


def _chatglm2_rules(cfg: ModelConfig) -> list[Rule]:
    H, K, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if K == H:  # without multi-query attention the remote code reads rows per head: [q_h; k_h; v_h] for each h
        def qkv(ours, theirs):
            return _perm_rule(
                ours, theirs,
                lambda t: t.reshape(H, 3, D, *t.shape[1:]).transpose(0, 1).reshape(t.shape),
                lambda t: t.reshape(3, H, D, *t.shape[1:]).transpose(0, 1).reshape(t.shape),
            )
    else:  # multi-query: rows [q (H*D); k (K*D); v (K*D)], as ours
        def qkv(ours, theirs):
            return Rule(ours, (theirs,))
    t = "transformer."
    rules = [Rule("embed.weight", (t + "embedding.word_embeddings.weight",))]
    if cfg.final_norm:
        rules += [Rule(f"norm.{k}", (t + f"encoder.final_layernorm.{k}",)) for k in _norm_kinds(cfg)]
    if not cfg.tie_embeddings:
        rules.append(Rule("head.weight", (t + "output_layer.weight",)))
    biases = ("weight", "bias")
    for i in range(cfg.n_layers):
        o, L = f"layers.{i}.", f"{t}encoder.layers.{i}."
        for k in _norm_kinds(cfg):
            rules += [Rule(o + f"norm1.{k}", (L + f"input_layernorm.{k}",)),
                      Rule(o + f"norm2.{k}", (L + f"post_attention_layernorm.{k}",))]
        for k in biases if cfg.qkv_bias else ("weight",):
            rules.append(qkv(o + f"attn.qkv.{k}", L + f"self_attention.query_key_value.{k}"))
        for k in biases if cfg.out_bias else ("weight",):
            rules += [Rule(o + f"attn.out.{k}", (L + f"self_attention.dense.{k}",)),
                      Rule(o + f"mlp.up.{k}", (L + f"mlp.dense_h_to_4h.{k}",)),
                      Rule(o + f"mlp.down.{k}", (L + f"mlp.dense_4h_to_h.{k}",))]
    return rules


def _norm_kinds(cfg: ModelConfig) -> tuple[str, ...]:
    return ("weight", "bias") if cfg.norm == "layernorm" else ("weight",)


CHATGLM2 = Format(
    "chatglm2", ("ChatGLMModel", "ChatGLMForConditionalGeneration"), _chatglm2_from_dict, _chatglm2_to_dict,
    _chatglm2_rules, ignore=("rotary_pos_emb.inv_freq",),
)

FORMATS: dict[str, Format] = {f.name: f for f in (GLMKIT, GLM_HF, GLM4_HF, GLM4_MOE_HF, GLM4_MOE_LITE_HF, GLM_MOE_DSA_HF,
                                                   GLM_ORIG, CHATGLM,
                                                   CHATGLM2)}


def _chatglm_generation(d: dict) -> Format:
    """ChatGLM-6B and its successors share the class names; only ChatGLM-6B's config has position_encoding_2d."""
    return CHATGLM if "position_encoding_2d" in d else CHATGLM2


def detect_format(d: dict, src: str) -> Format:
    if not isinstance(d, dict):
        raise ConfigError(f"{src} must hold a JSON object ({{...}}), not {_show(d)}")
    archs = d.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"{src}: field 'architectures' must be a list of class names, got {_show(archs)}")
    if not isinstance(d.get("model_type"), (str, type(None))):
        raise ConfigError(f"{src}: field 'model_type' must be a string, got {_show(d['model_type'])}")
    if d.get("model_type") == "glmkit":
        return GLMKIT
    for fmt in FORMATS.values():
        if any(a in fmt.architectures for a in archs):
            return _chatglm_generation(d) if fmt is CHATGLM else fmt
    if d.get("model_type") == "glm4":
        return GLM4_HF
    if d.get("model_type") == "glm4_moe_lite":
        return GLM4_MOE_LITE_HF
    if d.get("model_type") == "glm_moe_dsa":
        return GLM_MOE_DSA_HF
    if d.get("model_type") == "glm4_moe":
        return GLM4_MOE_HF
    if d.get("model_type") == "glm":  # HF's GlmConfig and THUDM's remote GLM share this name
        return GLM_ORIG if "num_layers" in d else GLM_HF
    if d.get("model_type") == "chatglm":
        return _chatglm_generation(d)
    known = sorted(a for f in FORMATS.values() for a in f.architectures)
    raise CheckpointError(
        f"{src}: unknown architecture {archs or None} (model_type={d.get('model_type')!r}); glmkit reads {known}"
    )


# ---- finding a checkpoint's files ------------------------------------------------------------------
def checkpoint_dir(path: str | Path) -> Path:
    """`path` if it is a directory; otherwise a CheckpointError saying what it is instead."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (and is not a preset; known presets: {', '.join(PRESETS)})")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; a checkpoint is a directory with config.json and weights")
    return path


def _exists(p: Path) -> bool:
    # a dangling symlink counts as present, so that confined() judges where it points before
    # anything reports the outside file as missing (which would say something about it)
    return p.is_symlink() or p.exists()


def confined(directory: str | Path, name: str, what: str = "file") -> Path:
    """`directory / name` with every symlink resolved, refused unless it stays inside `directory`.

    A checkpoint is often a stranger's download, read by a server: a shard index naming
    `../../etc/passwd`, or a weight file that is a symlink to one, must not make glmkit open a file
    elsewhere on the machine, nor report its size or contents in an error. The message names only
    what the checkpoint itself says. One exception: the Hugging Face hub cache, where
    `models--X/snapshots/REV/` holds links into the same repository's `models--X/blobs/`.
    """
    directory = Path(directory)
    try:
        root = directory.resolve()
        target = (directory / name).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop (RuntimeError before Python 3.13), a NUL byte
        raise CheckpointError(f"{directory}: {what} {name!r} cannot be resolved (a symlink loop?); "
                              "replace it with the file itself") from None
    if target == root or root in target.parents:
        return target
    if root.parent.name == "snapshots" and target.parent == root.parent.parent / "blobs":
        return target
    raise CheckpointError(f"{directory}: {what} {name!r} points outside the checkpoint directory; glmkit reads "
                          "only files inside it. If the file belongs to this checkpoint, copy it into the directory")


def read_config_json(path: str | Path) -> tuple[dict, Path]:
    """(the parsed config.json of checkpoint directory `path`, its path), checked to be a JSON object."""
    path = checkpoint_dir(path)
    cfg_file = path / "config.json"
    if not _exists(cfg_file):
        raise CheckpointError(f"{path} has no config.json; a checkpoint directory needs one (see `glmkit convert`)")
    real = confined(path, "config.json")
    try:
        d = json.loads(real.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cfg_file}: invalid JSON ({e})") from None
    except OSError as e:  # a directory, unreadable, ...
        raise CheckpointError(f"{cfg_file}: cannot be read ({e.strerror})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{cfg_file} must hold a JSON object ({{...}}) of config fields, not {_show(d)}")
    return d, cfg_file


def _gguf_only(_):
    raise CheckpointError("a GGUF file is read whole by glmkit.ggufio, and glmkit does not write GGUF; "
                          "convert it into a checkpoint directory with `glmkit convert FILE.gguf DIR`")


# llama.cpp's GGUF files (architectures chatglm, glm4): read by ggufio, through config_of / state_stream
GGUF = Format("gguf", ("chatglm", "glm4"), _gguf_only, _gguf_only, _gguf_only)


def config_of(path: str | Path) -> tuple[Format, ModelConfig]:
    """The format and ModelConfig a checkpoint directory's config.json describes; every problem is
    a ConfigError naming the file and the field. A GGUF file's come from its metadata (ggufio)."""
    from .ggufio import is_gguf, read_config

    if is_gguf(path):
        return GGUF, read_config(path)
    d, cfg_file = read_config_json(path)
    fmt = detect_format(d, str(cfg_file))
    try:
        cfg = fmt.config_from_hf(d)
    except (ValueError, TypeError) as e:  # _get's and ModelConfig's checks (for glmkit, its names are config.json's)
        raise ConfigError(f"{cfg_file}: {e}") from None
    if fmt.fit:  # what the weights say beyond config.json (headers only); damaged files are reported later
        try:
            cfg = fmt.fit(cfg, WeightFiles(cfg_file.parent).where)
        except CheckpointError:
            pass
    if fmt is CHATGLM2 and cfg.chat_format is None:  # ChatGLM2 / 3 and CodeGeeX2 share config.json's fields
        cfg = replace(cfg, chat_format=format_from_config(d, *_tokenizer_hints(cfg_file.parent)))
    return fmt, cfg


def _tokenizer_hints(directory: Path) -> tuple[dict | None, list[str]]:
    """tokenizer_config.json beside a remote-code config (its name, chat template and added tokens), for
    chat.format_from_config; nothing when it is absent or unreadable (the tokenizer decides later)."""
    try:
        tc = json.loads(confined(directory, "tokenizer_config.json", "tokenizer file").read_text(encoding="utf-8"))
    except (OSError, ValueError, CheckpointError):
        return None, []
    if not isinstance(tc, dict):
        return None, []
    added = tc.get("added_tokens_decoder")
    names = [v.get("content") for v in added.values() if isinstance(v, dict)] if isinstance(added, dict) else []
    return tc, [n for n in names if isinstance(n, str)]


# ---- reading weight files --------------------------------------------------------------------------
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}
_ST_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
             "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
REDOWNLOAD = "re-download it or convert the checkpoint again"


def check_safetensors(path: Path, shown: str | Path | None = None, advice: str = REDOWNLOAD) -> list[str]:
    """Validate a safetensors file's header against its size; return its tensor names.

    The file must be exactly 8 + header length + the end of its last tensor bytes long: safetensors
    itself reports a short file as an opaque deserialization error, or not at all when memory-mapped
    until a read faults, and refuses a long one. `shown` is the name messages use (default: path).
    """
    shown = shown or path
    advice = f"; {advice}" if advice else ""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{shown}: truncated safetensors file ({size} bytes, no header){advice}")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{shown}: truncated safetensors file: header says {n} bytes, file has {size}{advice}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{shown}: corrupt safetensors header ({e}){advice}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{shown}: corrupt safetensors header (not a JSON object){advice}")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            a, b = info["data_offsets"]
            shape, itemsize = list(info["shape"]), _ST_SIZES.get(info["dtype"])
            ok = all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (a, b, *shape)) and a <= b
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{shown}: corrupt safetensors header entry for tensor {name!r}{advice}")
        if itemsize is not None and b - a != math.prod(shape) * itemsize:
            raise CheckpointError(f"{shown}: tensor {name!r} claims {b - a} bytes for shape {shape} {info['dtype']}{advice}")
        end = max(end, b)
    if 8 + n + end > size:
        raise CheckpointError(f"{shown}: truncated safetensors file: tensors need {8 + n + end} bytes, file has {size}{advice}")
    if 8 + n + end < size:
        raise CheckpointError(f"{shown}: {size - 8 - n - end} bytes after the last tensor: tensors need {8 + n + end} "
                              f"bytes, file has {size}{advice}")
    return [k for k in header if k != "__metadata__"]


def _read_bin(f: Path, shown: str | Path) -> dict:
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, pickle errors, ...
        raise CheckpointError(f"{shown}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e}); "
                              "the file is truncated or corrupt; re-download it") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{shown}: holds a {type(sd).__name__}, not a state dict")
    return sd.get("module", sd) if isinstance(sd.get("module"), dict) else sd


def weight_file_paths(path: Path) -> list[tuple[str, Path]]:
    """(name as the checkpoint gives it, resolved path) of each weight file of a checkpoint
    directory: the shards its *.index.json lists, or its one model file. All confined to `path`."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if not _exists(index):
            continue
        try:
            weight_map = json.loads(confined(path, index_name, "shard index").read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid shard index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) and s for s in weight_map.values()):
            raise CheckpointError(f"{index}: not a valid shard index (weight_map must map tensor names to file names)")
        shards = sorted(set(weight_map.values()))
        files = [(s, confined(path, s, f"shard (listed in {index_name})")) for s in shards]
        missing = [s for s, f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not in {path}: {missing}; download all shards")
        return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if _exists(path / single):
            f = confined(path, single, "weight file")
            if not f.is_file():
                raise CheckpointError(f"{path / single} is not a file (a broken symlink?); download the checkpoint again")
            return [(single, f)]
    raise CheckpointError(
        f"{path} has no weights: expected model.safetensors, pytorch_model.bin, or a sharded *.index.json"
    )


class WeightFiles:
    """The tensors of a checkpoint directory, indexed by name -> file, read lazily.

    `shared`: every tensor of a safetensors file is a view of one memory map of it, held open for the reader's
    lifetime (a model that keeps its weights where they lie). Otherwise each read maps the file anew and the map
    lives as long as that tensor (a stream that drops each tensor after use). A map per tensor costs twice over
    for a model that keeps them: GLM-4.7-Flash in int4 holds ~20,000 tensors, and so ~20,000 maps (the kernel's
    default limit is 65,530 per process, which a larger MoE's ~130,000 would exceed), and a page fault maps up to
    16 neighbouring pages of the file into the faulting map, so a page near a tensor's ends becomes resident in
    two maps at once: 0.7 GiB of that model's resident memory counted its file pages twice."""

    def __init__(self, path: Path, shared: bool = False):
        self.path = path
        self.shared = shared
        self.where: dict[str, Path] = {}  # tensor name -> resolved file
        self.shown: dict[Path, Path] = {}  # resolved file -> path as the checkpoint names it, for messages
        self._bin: dict[Path, dict] = {}
        self._open: dict[Path, object] = {}  # shared: resolved file -> its safe_open handle (one map)
        for name, f in weight_file_paths(path):
            self.shown[f] = path / name
            if name.endswith(".safetensors"):  # the name's suffix: a hub-cache blob's own name has none
                names = check_safetensors(f, path / name)
            else:
                self._bin[f] = _read_bin(f, path / name)
                names = list(self._bin[f])
            for n in names:
                self.where[n] = f

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        if f in self._bin:
            return self._bin[f][name]
        from safetensors import safe_open

        if self.shared:
            if f not in self._open:
                self._open[f] = safe_open(f, framework="pt")
            return self._open[f].get_tensor(name)
        with safe_open(f, framework="pt") as st:
            return st.get_tensor(name)

    def meta(self, name: str) -> torch.Tensor:
        """A meta tensor of the stored tensor's shape and dtype: its header, none of its data."""
        f = self.where[name]
        if f in self._bin:
            return torch.empty_like(self._bin[f][name], device="meta")
        from safetensors import safe_open

        with safe_open(f, framework="pt") as st:
            sl = st.get_slice(name)
            dtype = _ST_TORCH.get(sl.get_dtype(), torch.float32)
            return torch.empty(sl.get_shape(), dtype=dtype, device="meta")


def stored_dtype(path: str | Path) -> torch.dtype | None:
    """The float dtype holding most of a checkpoint directory's weight bytes, from the safetensors headers
    (a .bin is memory-mapped, not read); None when it stores no float tensor. Loads nothing."""
    from . import ggufio

    if ggufio.is_gguf(path):
        return ggufio.stored_dtype(path)
    counts: dict[torch.dtype, int] = {}
    path = checkpoint_dir(path)
    for name, f in weight_file_paths(path):
        if name.endswith(".safetensors"):
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            items = [(_ST_TORCH.get(v["dtype"]), v["data_offsets"][1] - v["data_offsets"][0])
                     for k, v in header.items() if k != "__metadata__"]
        else:
            items = [(t.dtype, t.nbytes) for t in _read_bin(f, path / name).values() if isinstance(t, torch.Tensor)]
        for dt, nbytes in items:
            if dt is not None and dt.is_floating_point:
                counts[dt] = counts.get(dt, 0) + nbytes
    return max(counts, key=counts.get) if counts else None


def _strip_prefix(names, fmt: Format, expected: set[str]) -> str:
    """The prefix under which this checkpoint stores the format's names ('' or e.g. 'glm.')."""
    best, hits = fmt.prefixes[0], -1
    for p in fmt.prefixes:
        h = sum(1 for n in names if n.startswith(p) and n[len(p):] in expected)
        if h > hits:
            best, hits = p, h
    return best


def _match_names(names: dict[str, Path], fmt: Format, cfg: ModelConfig, path: Path) -> dict[str, str]:
    """{format name: stored name} for every tensor the format's rules need; a CheckpointError when one
    is missing or a stored one is unexpected. `names` maps stored names to the file holding them."""
    if cfg.n_layers > len(names):  # every layer has tensors: refused before a name is made for each layer
        raise CheckpointError(f"{path}: config.json says n_layers={cfg.n_layers}, but the weights hold only {len(names)} "
                              "tensors; config.json does not describe these weights")
    expected = {n for r in fmt.rules(cfg) for n in r.theirs}
    prefix = _strip_prefix(names, fmt, expected)
    present = {n[len(prefix):]: n for n in names if n.startswith(prefix)}
    present.update({n: n for n in names if not n.startswith(prefix)})
    missing = sorted(expected - set(present))
    if missing:
        raise CheckpointError(
            f"{path} ({fmt.name}) is missing {len(missing)} tensor(s), e.g. {missing[:3]}; the checkpoint is "
            f"incomplete or its config.json does not match its weights (n_layers={cfg.n_layers})"
        )
    # tied models may carry a copy of the embedding as the head; any other extra name is an error
    allowed_extra = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = sorted(
        n for n in set(present) - expected - allowed_extra if not any(n.endswith(s) for s in fmt.ignore)
    )
    if unexpected:
        raise CheckpointError(
            f"{path} ({fmt.name}) has {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]} in "
            f"{Path(names[present[unexpected[0]]]).name}; the config.json does not describe these weights"
        )
    return present


def _joined(r: Rule, ts: list[torch.Tensor], want: dict, files: WeightFiles, present: dict) -> torch.Tensor:
    """The rule's layout change applied to its stored tensors, of the shape the model wants, or a
    CheckpointError naming the file, the tensor and both shapes."""
    t, why = None, ""
    try:
        t = r.join(ts)
    except RuntimeError as e:  # a reshape in the layout change failed: wrong shape
        why = f" ({e})"
    if t is None or t.shape != want[r.ours].shape:
        got = [tuple(x.shape) for x in ts]
        raise CheckpointError(
            f"{files.shown[files.where[present[r.theirs[0]]]]}: tensor {r.theirs[0] if len(ts) == 1 else list(r.theirs)} has "
            f"shape {got[0] if len(got) == 1 else got}, but config.json implies {tuple(want[r.ours].shape)} for "
            f"{r.ours}{why}; the weights and config.json disagree"
        )
    return t


def verify_checkpoint(path: str | Path) -> tuple[list[str], str]:
    """(problems, summary) of a checkpoint directory, checked without reading tensor data: config.json,
    every weight file's size against its header (each file on its own, so all damage is listed), and
    the tensor names against those config.json implies. No problems: the checkpoint is whole."""
    from . import ggufio

    if ggufio.is_gguf(path):
        return ggufio.verify(path)
    path = checkpoint_dir(path)
    fmt, cfg = config_of(path)
    problems, names, total = [], {}, 0
    files = weight_file_paths(path)
    for name, f in files:
        try:
            found = check_safetensors(f, path / name) if name.endswith(".safetensors") else _read_bin(f, path / name)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        total += f.stat().st_size
        names.update(dict.fromkeys(found, path / name))
    if not problems:
        try:
            present = _match_names(names, fmt, cfg, path)
            weights, want = WeightFiles(path), _meta_model(cfg).state_dict()
            for r in fmt.rules(cfg):  # the layout change on meta tensors: shapes checked, no data read
                _joined(r, [weights.meta(present[n]) for n in r.theirs], want, weights, present)
        except CheckpointError as e:
            problems.append(str(e))
    summary = (f"{len(files)} weight file(s), {len(names)} tensors, {total / 2**20:.1f} MiB: sizes match their "
               f"headers, tensor names and shapes match config.json ({fmt.name})")
    return problems, summary


def _default_dtype(t: torch.Tensor, device) -> torch.dtype:
    # a CPU without fp16 arithmetic units runs fp16 matmuls far slower than fp32
    if t.dtype == torch.float16 and torch.device(device or "cpu").type == "cpu":
        return torch.float32
    return t.dtype if t.is_floating_point() else torch.float32


def state_stream(path: str | Path, device=None, dtype=None, quant: dict | None = None, keep: bool = False):
    """(config, iterator of (name, tensor)): checkpoint directory `path`'s glmkit state dict, one
    tensor at a time, each read from the memory-mapped files and checked against config.json. Names,
    the format and every file are checked here, before the first tensor is read.

    Floating tensors come out in `dtype` (default: the stored one; fp16 becomes fp32 on a CPU).
    With `quant` ({"bits", "group_size", "head"}, see quantize.quant_spec) each target linear's
    weight is quantized as it is read, from its stored values in fp32, and the config carries
    `quant`: exactly `quantize_model` applied to the model loaded in fp32, then cast to `dtype`,
    while memory holds one tensor at a time, never the float model. A GGUF file streams the same way
    (ggufio.stream: its Q4_0 layers as int4, as stored).

    `keep`: the caller keeps every tensor (a model being loaded): each file is mapped once (WeightFiles'
    `shared`), and a stored tensor read into a copy (another dtype, a quantized or joined weight) has its pages
    dropped from this process once read (evict_mapped), as they would be with their own map."""
    from . import ggufio

    if ggufio.is_gguf(path):
        return ggufio.stream(path, device, dtype, quant)
    path = checkpoint_dir(path)
    fmt, cfg = config_of(path)
    files = WeightFiles(path, shared=keep)
    present = _match_names(files.where, fmt, cfg, path)
    if cfg.quant and fmt is not GLMKIT:
        raise CheckpointError(f"{path / 'config.json'}: quantized checkpoints exist only in the glmkit layout")
    upgrade = bool(cfg.quant and quant)
    if upgrade and not _latent_upgrade(cfg.quant, quant):
        raise ValueError(f"{path} is already quantized (int{cfg.quant['bits']}); quantize the float checkpoint, "
                         "or load this one as it is")
    meta = _meta_model(cfg)
    want = meta.state_dict()
    targets, tied_head = set(), False
    if quant:
        from .quantize import _targets

        # the float linears `quant` quantizes (upgrading: the latent projections, the rest being quantized already)
        targets = {name for name, _ in _targets(meta, quant)}
        tied_head = bool(quant["head"]) and cfg.tie_embeddings and not upgrade  # a quantized copy of the embedding

    def quantized(module: str, w: torch.Tensor):
        from .quantize import quantized_tensors

        return quantized_tensors(module, w, quant, dtype)

    def drop(r, ts, kept=None):  # the stored tensors read into copies: their pages leave this process
        for x, n in zip(ts, r.theirs):
            if kept is None or not _views(kept, x):
                evict_mapped(x, files.where[present[n]])

    def tensors():
        nonlocal dtype
        for r in fmt.rules(cfg):  # the source's rules: names as stored
            ts = [files.get(present[n]) for n in r.theirs]
            if dtype is None and ts[0].is_floating_point():
                dtype = _default_dtype(ts[0], device)
            module, _, leaf = r.ours.rpartition(".")
            if (module in targets and leaf == "weight") or (tied_head and r.ours == "embed.weight"):
                # joined as stored (layout changes only move values), quantized in fp32 a block of rows at a
                # time: no fp32 copy of a whole weight
                common = ts[0].dtype
                for x in ts[1:]:
                    common = torch.promote_types(common, x.dtype)
                w = _joined(r, [x.to(common) for x in ts], want, files, present)
                if module in targets:
                    yield from quantized(module, w)
                    del w  # the float source is read: its pages of the memory-mapped file can leave this process
                    drop(r, ts)
                    continue
                yield r.ours, w.to(dtype)
                yield from quantized("head", w)
                continue
            dt = torch.float32 if r.ours.endswith(ROUTER_FP32) else dtype  # a bf16 router would reorder experts
            out = _joined(r, [x.to(dt) if x.is_floating_point() else x for x in ts], want, files, present)  # ints stay ints
            if keep:
                drop(r, ts, kept=out)
            yield r.ours, out

    return (replace(cfg, quant=quant) if quant else cfg), tensors()


def _latent_upgrade(stored: dict, quant: dict) -> bool:
    """Whether a checkpoint quantized as `stored` can load as `quant` by quantizing only its float latent
    projections as they are read: the same bits, groups and head, `quant` with "latent" and `stored` without
    (written before quantize.LATENT_TARGETS were quantized)."""
    same = all(stored.get(k) == quant.get(k) for k in ("bits", "group_size", "head"))
    return same and bool(quant.get("latent")) and not stored.get("latent")


def read_checkpoint(path: str | Path, device=None, dtype=None, quant: dict | None = None) -> GLM:
    """Load any supported checkpoint directory as a glmkit GLM, checking every tensor; with `quant`,
    quantized as it is read (see state_stream): memory peaks near the quantized model's size."""
    cfg, tensors = state_stream(path, device, dtype, quant, keep=True)
    model = _meta_model(cfg)
    model.load_state_dict(dict(tensors), strict=True, assign=True)
    if quant:
        release_freed_heap()
    return model.to(device) if device is not None else model


def _views(out: torch.Tensor, src: torch.Tensor) -> bool:
    """Whether `out` starts inside `src`'s bytes (a view of it, as a joined layout's slice or a no-op cast is)."""
    start = src.data_ptr()
    return out.device == src.device and start <= out.data_ptr() < start + max(src.nbytes, 1)


def evict_mapped(t: torch.Tensor, path) -> int:
    """Drop from this process the whole memory pages holding `t`'s bytes when `t` lies in a memory map of the
    file `path` (a weight read through safetensors or torch.load(mmap=True)) and is no longer needed; returns the
    bytes dropped, 0 when `t` is anywhere else (a copy in anonymous memory is never touched) or not on Linux.

    A checkpoint file stays mapped while any of its tensors lives (int4 weights are used where they lie), and
    every page a loader read stays resident with it: quantizing GLM-4.7-Flash's float latent projections as
    they load would keep their float source, ~1-2 GiB, resident for the model's lifetime. madvise(DONTNEED) on a
    file mapping only unmaps the pages from this process (the file and the page cache keep them; a later read
    faults them back in), so it is safe for bytes nobody has written to, as a loaded weight's."""
    if t.device.type != "cpu" or t.numel() == 0 or not sys.platform.startswith("linux"):
        return 0
    import ctypes
    import ctypes.util

    start, page = t.data_ptr(), os.sysconf("SC_PAGE_SIZE")
    end = start + t.numel() * t.element_size()
    target = os.path.realpath(path)
    try:
        with open("/proc/self/maps") as f:
            inside = any(_maps_entry(line, start, end, target) for line in f)
        if not inside:
            return 0
        lo, hi = -(-start // page) * page, end // page * page  # whole pages only: neighbours keep theirs
        if hi <= lo:
            return 0
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return hi - lo if libc.madvise(lo, hi - lo, 4) == 0 else 0  # 4: MADV_DONTNEED
    except (OSError, AttributeError):
        return 0


def _maps_entry(line: str, start: int, end: int, target: str) -> bool:
    """Whether a /proc/self/maps line is a mapping of the file `target` holding [start, end)."""
    parts = line.split(maxsplit=5)
    if len(parts) < 6 or parts[5].strip() != target:
        return False
    lo, hi = (int(x, 16) for x in parts[0].split("-"))
    return lo <= start and end <= hi


# ---- writing ---------------------------------------------------------------------------------------
def write_checkpoint(model: GLM, dst: str | Path, fmt: str | None = None, extra_files=(),
                     shard_bytes: int | None = None) -> Path:
    """Write `model` as a checkpoint directory of format `fmt` (default: the layout it came from,
    or glmkit). Written to a temporary directory and renamed, so `dst` is never half-written."""
    fmt = fmt or (model.cfg.source if model.cfg.source in FORMATS else "glmkit")
    return write_stream(model.cfg, ((n, t.detach()) for n, t in model.state_dict().items()), dst, extra_files,
                        shard_bytes or SHARD_BYTES, fmt)[0]


@contextmanager
def _atomic_dir(dst: str | Path):
    """A temporary directory beside `dst`, renamed to `dst` once the block has filled it (files
    synced first); on any error or interrupt it is removed, so `dst` is whole or absent."""
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"{dst} exists and is not empty; choose a new directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
        if dst.exists():
            dst.rmdir()
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


SHARD_BYTES = 1 << 30
_TORCH_ST = {v: k for k, v in _ST_TORCH.items()}


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    """A safetensors file written straight from the tensors' memory (safetensors' save_file first copies
    them all into one bytes object: twice the shard in memory). Widest dtypes first, so with the header
    padded to 8 bytes every tensor starts aligned to its element size."""
    names = sorted(tensors, key=lambda n: -tensors[n].element_size())  # stable: arrival order within a width
    header, offset = {"__metadata__": metadata}, 0
    for n in names:
        t = tensors[n]
        size = t.numel() * t.element_size()
        header[n] = {"dtype": _TORCH_ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for n in names:
            if tensors[n].numel():
                f.write(tensors[n].reshape(-1).view(torch.uint8).numpy())  # a view of the tensor's bytes, no copy


def write_stream(cfg: ModelConfig, tensors, dst: str | Path, extra_files=(), shard_bytes: int = SHARD_BYTES,
                 fmt: str = "glmkit") -> tuple[Path, int]:
    """Write a checkpoint in format `fmt` from glmkit (name, tensor) pairs as they arrive (e.g.
    state_stream, or a model's state dict): each is laid out by the format's rules and goes into
    safetensors shards of at most `shard_bytes` (a larger tensor gets a shard of its own) plus
    `model.safetensors.index.json`, or one `model.safetensors` when one shard holds everything.
    Memory holds the shard being filled, never the model. Atomic like write_checkpoint. Every name
    and shape is checked against the model `cfg` describes. Returns (dst, bytes of tensors written)."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; choose one of {list(FORMATS)}")
    if cfg.quant and fmt != "glmkit":
        raise CheckpointError(f"a quantized model (int{cfg.quant['bits']}) is written in the glmkit layout only, not {fmt}")
    fmt_obj = FORMATS[fmt]
    hf_config = fmt_obj.config_to_hf(cfg)  # refuses what the format cannot express, before anything is written
    want = _meta_model(cfg).state_dict()
    rules = {r.ours: r for r in fmt_obj.rules(cfg)}
    expected = {n for r in rules.values() for n in r.theirs}
    meta = {"format": "pt", "written_by": "glmkit"}
    with _atomic_dir(dst) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, ensure_ascii=False) + "\n")
        shards: list[list[str]] = []  # tensor names per shard, in order
        buf, size, total = {}, 0, 0
        for name, t in tensors:
            if name not in want or name not in rules or t.shape != want[name].shape:
                raise CheckpointError(f"glmkit bug: tensor {name} {tuple(t.shape)} does not belong in this model "
                                      f"(expected {tuple(want[name].shape) if name in want else 'no such name'})")
            r = rules[name]
            for their, part in zip(r.theirs, r.split(t.detach())):
                if their in buf or any(their in names for names in shards):
                    raise CheckpointError(f"glmkit bug: tensor {their} written twice")
                n = part.numel() * part.element_size()
                if buf and size + n > shard_bytes:
                    _write_safetensors(tmp / f"part{len(shards)}", buf, meta)
                    shards.append(list(buf))
                    buf, size = {}, 0
                buf[their] = part.contiguous().cpu()
                size, total = size + n, total + n
        _write_safetensors(tmp / f"part{len(shards)}", buf, meta)
        shards.append(list(buf))
        buf = None
        written = {n for names in shards for n in names}
        if written != expected or sum(map(len, shards)) != len(written):
            raise CheckpointError(f"glmkit bug: the stream missed {sorted(expected - written)[:3]} or repeated a tensor")
        if len(shards) == 1:
            os.rename(tmp / "part0", tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, names in enumerate(shards):
                shard = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                os.rename(tmp / f"part{i}", tmp / shard)
                weight_map.update(dict.fromkeys(names, shard))
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for f in extra_files:
            shutil.copy2(f, tmp / Path(f).name)
    return Path(dst), total



def quantize_checkpoint(src: str | Path, dst: str | Path, bits: int, group_size: int = 64,
                        dtype: torch.dtype = torch.bfloat16, shard_bytes: int = SHARD_BYTES) -> tuple[int, int]:
    """Quantize checkpoint directory `src` (any layout glmkit reads) into a new glmkit checkpoint
    `dst`, streaming: one tensor read, quantized and written at a time (state_stream into
    write_stream); float tensors and scales in `dtype`; tokenizer files copied along. Returns
    (bytes of the source's weight files, bytes of tensors written)."""
    from . import ggufio
    from .quantize import quant_spec

    cfg, tensors = state_stream(src, dtype=dtype, quant=quant_spec(bits, group_size))
    with tempfile.TemporaryDirectory() as tmp:
        _, written = write_stream(cfg, tensors, dst, source_tokenizer_files(src, tmp), shard_bytes)
    if ggufio.is_gguf(src):
        return Path(src).stat().st_size, written
    return sum(f.stat().st_size for _, f in weight_file_paths(checkpoint_dir(src))), written

# tokenization_chatglm.py is copied as text, never run: it tells ChatGLM3 from ChatGLM2 when an older
# tokenizer_config.json does not declare the role tokens, and it is the code that config's auto_map names
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "ice_text.model", "cog-pretrain.model", "tokenization_chatglm.py", "generation_config.json")


def source_tokenizer_files(src: str | Path, tmp: str | Path) -> list[Path]:
    """tokenizer_files(src), or for a GGUF file its vocabulary written into directory `tmp` (tokenizer.json,
    or tokenizer.model for a SentencePiece one): what a checkpoint converted from `src` carries."""
    from . import ggufio

    return ggufio.vocab_files(src, tmp) if ggufio.is_gguf(src) else tokenizer_files(src)


def tokenizer_files(src: str | Path) -> list[Path]:
    """The TOKENIZER_FILES a checkpoint directory has, to copy along when it is rewritten; each is
    confined to `src`, so converting a stranger's checkpoint cannot copy a file from elsewhere on this
    machine into the output. The paths keep their own names (not their resolved ones)."""
    src = Path(src)
    return [src / f for f in TOKENIZER_FILES if _exists(src / f) and confined(src, f, "tokenizer file").is_file()]


# The model glmkit trains itself and ships inside the package (runs/default_model.sh, MODEL_CARD.md).
DEFAULT_MODEL = Path(__file__).parent / "assets" / "default"


def default_model_path() -> Path:
    if not (DEFAULT_MODEL / "config.json").exists():
        raise CheckpointError(f"this glmkit install has no embedded default model at {DEFAULT_MODEL}; "
                              "pass --model PATH|PRESET, or train one with runs/default_model.sh")
    return DEFAULT_MODEL


def load(path_or_preset: str | Path | None = None, device=None, dtype=None, quantize: str | None = None,
         group_size: int = 64) -> GLM:
    """A GLM from a checkpoint directory, a preset name (random init, fp32 unless `dtype`), or, with
    no argument, the embedded default model. `quantize="int8"|"int4"` quantizes the weights as they
    are read (int4 in groups of `group_size`): the same tensors as `glmkit quantize --dtype D` then
    `load(dtype=D)`, without the float model ever being in memory. A checkpoint quantized before latent
    attention's projections were (its quant without "latent") loads with the same `quantize` and group size
    by quantizing just those as they are read."""
    quant = None
    if quantize is not None:
        from .quantize import quant_spec

        if quantize not in ("int8", "int4"):
            raise ValueError(f"quantize={quantize!r}: choose int8 or int4")
        quant = quant_spec(int(quantize[3:]), group_size)
    if path_or_preset is None:
        path_or_preset = default_model_path()
    if isinstance(path_or_preset, str) and path_or_preset in PRESETS and not Path(path_or_preset).exists():
        model = GLM(get_preset(path_or_preset))
        if not quant:
            return model.to(device=device, dtype=dtype or torch.float32)
        from .quantize import cast_floats, quantize_model

        return cast_floats(quantize_model(model, quant["bits"], group_size), dtype or torch.float32).to(device)
    return read_checkpoint(path_or_preset, device=device, dtype=dtype, quant=quant)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="glmkit convert", description="Convert a GLM-family checkpoint directory or GGUF file.")
    p.add_argument("src", help="checkpoint directory (glmkit, GlmForCausalLM, Glm4ForCausalLM, Glm4MoeForCausalLM, THUDM GLM, ChatGLM-6B, "
                   "ChatGLM2/3, GLM-4 / CodeGeeX remote code) or a GGUF file (llama.cpp's chatglm or glm4 architecture)")
    p.add_argument("dst", help="new output directory")
    p.add_argument("--to", default="glmkit", choices=list(FORMATS), help="output layout (default: glmkit)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="output dtype (default: as stored)")
    a = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}[a.dtype]
    dtype = dtype or stored_dtype(a.src)  # as stored: not widened to fp32 as loading for compute would
    cfg, tensors = state_stream(a.src, dtype=dtype)  # one tensor at a time: a 9B model converts in a shard of memory
    if cfg.quant and a.to != "glmkit":
        raise CheckpointError(f"{a.src} is quantized (int{cfg.quant['bits']}); only the glmkit layout holds "
                              "quantized weights: use --to glmkit")
    counted = []
    with tempfile.TemporaryDirectory() as tmp:
        _, nbytes = write_stream(cfg, ((n, counted.append(t.numel()) or t) for n, t in tensors), a.dst,
                                 source_tokenizer_files(a.src, tmp), fmt=a.to)
    print(f"{a.src} ({cfg.source}) -> {a.dst} ({a.to}): {sum(counted) / 1e6:.1f}M parameters, {dtype}, "
          f"{nbytes / 2**30:.2f} GiB")
