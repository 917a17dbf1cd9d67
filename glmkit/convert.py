"""Checkpoint formats: read upstream GLM checkpoints into glmkit, write glmkit models back out.

    glmkit convert SRC_DIR DST_DIR [--to glmkit|glm_hf|glm4_hf|glm|chatglm] [--dtype bf16]
    glmkit info PATH|PRESET

    model = glmkit.load("path/to/glm-4-9b-chat-hf", dtype=torch.bfloat16)

A checkpoint is a directory with `config.json` and weights (`model.safetensors`,
`pytorch_model.bin`, or either sharded with an `*.index.json`). Formats:

    glmkit    our own: ModelConfig fields in config.json, our parameter names
    glm_hf    transformers GlmForCausalLM (GLM-4-9B -hf checkpoints)
    glm4_hf   transformers Glm4ForCausalLM (GLM-4-0414: sandwich norms)
    glm       the original THUDM GLM remote code (glm-large-chinese, glm-10b-chinese, ...)
    chatglm   THUDM ChatGLM-6B remote code

Each format is one explicit list of `Rule`s (our name <-> their names, with the reshuffle between
them), used both to read and to write. Reading checks every tensor before anything is assigned:
a missing, unexpected or mis-shaped tensor, an unknown architecture, a truncated or corrupt file
each raise `CheckpointError` naming the file, the tensor and what to do next.

Layouts that differ beyond names:
- HF GLM stores q/k/v separately; we fuse them as rows [Q | K | V].
- ChatGLM-6B fuses q/k/v per head ([q_h, k_h, v_h] for each head h); we reorder the rows.
- A native glmkit model (`rope_2d`) exports to GlmForCausalLM exactly for causal use: with block
  positions at 0 the second rotary half is the identity, and the first half's (x[i], x[i+r/2])
  pairs become HF's interleaved (x[2i], x[2i+1]) pairs by permuting q/k rows, which leaves every
  q.k product unchanged. The original config rides along in config.json (`glmkit_config`) so the
  import undoes the permutation and restores the 2D positions.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .config import PRESETS, ModelConfig, get_preset
from .model import GLM


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read as it claims to be; the message says what to do."""


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


def _need(d: dict, key: str, src: str):
    if key not in d:
        raise CheckpointError(f"{src}: config.json has no {key!r}, which this format requires")
    return d[key]


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
def _hf_from_dict(d: dict, sandwich: bool, source: str) -> ModelConfig:
    if "glmkit_config" in d:  # our own export: restore what HF cannot express
        return ModelConfig.from_dict(d["glmkit_config"])
    rope = d.get("rope_parameters") or {}
    rtype = rope.get("rope_type", "default")
    if rtype != "default" or d.get("rope_scaling"):
        raise CheckpointError(f"rope scaling {rtype!r} / {d.get('rope_scaling')} is not supported yet; only default RoPE")
    H = _need(d, "num_attention_heads", source)
    return ModelConfig(
        vocab_size=_need(d, "vocab_size", source), dim=_need(d, "hidden_size", source),
        n_layers=_need(d, "num_hidden_layers", source), n_heads=H,
        n_kv_heads=d.get("num_key_value_heads") or H, head_dim=d.get("head_dim"),
        ffn_dim=_need(d, "intermediate_size", source), max_seq_len=d.get("max_position_embeddings", 8192),
        position="rope_partial", rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
        rope_fraction=rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.5)),
        norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1.5625e-07), mlp="swiglu",
        qkv_bias=d.get("attention_bias", True), sandwich_norm=sandwich,
        tie_embeddings=d.get("tie_word_embeddings", False), source=source,
    )


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
    return ModelConfig(
        vocab_size=_need(d, "vocab_size", src), dim=_need(d, "hidden_size", src), n_layers=_need(d, "num_layers", src),
        n_heads=_need(d, "num_attention_heads", src), max_seq_len=_need(d, "max_sequence_length", src),
        position="learned_2d", norm="layernorm", norm_eps=1e-5, mlp="gelu", qkv_bias=True, out_bias=True,
        mlp_bias=True, tie_embeddings=True, source="glm",
    )


def _glm_to_dict(cfg: ModelConfig) -> dict:
    if (cfg.position, cfg.norm, cfg.mlp, cfg.residual, cfg.tie_embeddings, cfg.n_kv_heads) != (
        "learned_2d", "layernorm", "gelu", "pre_ln", True, cfg.n_heads
    ) or cfg.ffn_dim != 4 * cfg.dim or not (cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias):
        raise CheckpointError("only original-GLM-shaped models (learned_2d, LayerNorm, GELU 4x, biases, tied) can be written as glm")
    return {
        "architectures": ["GLMModel"], "model_type": "glm", "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "num_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "max_sequence_length": cfg.max_seq_len,
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
    if "position_encoding_2d" not in d:
        raise CheckpointError(
            "this ChatGLM checkpoint is ChatGLM2/3 or GLM-4 remote code (no position_encoding_2d); "
            "only ChatGLM-6B is read in that layout. For GLM-4, use the -hf release (GlmForCausalLM)"
        )
    if not d["position_encoding_2d"]:
        raise CheckpointError(f"{src}: position_encoding_2d=false is not supported")
    if d.get("quantization_bit", 0):
        raise CheckpointError(f"{src}: quantization_bit={d['quantization_bit']}; convert the unquantized checkpoint")
    if d.get("pre_seq_len"):
        raise CheckpointError(f"{src}: P-tuning prefix checkpoints (pre_seq_len) are not supported")
    return ModelConfig(
        vocab_size=_need(d, "vocab_size", src), dim=_need(d, "hidden_size", src), n_layers=_need(d, "num_layers", src),
        n_heads=_need(d, "num_attention_heads", src), ffn_dim=d.get("inner_hidden_size") or 4 * d["hidden_size"],
        max_seq_len=d.get("max_sequence_length", 2048), position="rope_2d", norm="layernorm",
        norm_eps=d.get("layernorm_epsilon", 1e-5), residual="deepnorm", mlp="gelu",
        qkv_bias=True, out_bias=True, mlp_bias=True, source="chatglm",
        # ChatGLM-6B's config.json has no tie_word_embeddings, so HF ties lm_head to the embeddings
        # when loading (its default); a stored lm_head.weight is then ignored, as HF ignores it
        tie_embeddings=d.get("tie_word_embeddings", True),
    )


def _chatglm_to_dict(cfg: ModelConfig) -> dict:
    if (cfg.position, cfg.norm, cfg.mlp, cfg.residual, cfg.n_kv_heads) != (
        "rope_2d", "layernorm", "gelu", "deepnorm", cfg.n_heads
    ) or not (cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias):
        raise CheckpointError("only ChatGLM-6B-shaped models can be written as chatglm")
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

FORMATS: dict[str, Format] = {f.name: f for f in (GLMKIT, GLM_HF, GLM4_HF, GLM_ORIG, CHATGLM)}


def detect_format(d: dict, src: str) -> Format:
    if d.get("model_type") == "glmkit":
        return GLMKIT
    archs = d.get("architectures") or []
    for fmt in FORMATS.values():
        if any(a in fmt.architectures for a in archs):
            return fmt
    if d.get("model_type") == "glm4":
        return GLM4_HF
    if d.get("model_type") == "glm":  # HF's GlmConfig and THUDM's remote GLM share this name
        return GLM_ORIG if "num_layers" in d else GLM_HF
    if d.get("model_type") == "chatglm":
        return CHATGLM
    known = sorted(a for f in FORMATS.values() for a in f.architectures)
    raise CheckpointError(
        f"{src}: unknown architecture {archs or None} (model_type={d.get('model_type')!r}); glmkit reads {known}"
    )


# ---- reading weight files --------------------------------------------------------------------------
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}


def check_safetensors(path: Path) -> list[str]:
    """Validate a safetensors file's header against its size; return its tensor names.

    safetensors itself reports a short file as an opaque deserialization error, or not at all when
    memory-mapped until a read faults; checking offsets up front turns that into a clear message.
    """
    size = path.stat().st_size
    what = "re-download it or convert the checkpoint again"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header); {what}")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated safetensors file: header says {n} bytes, file has {size}; {what}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e}); {what}") from None
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            a, b = info["data_offsets"]
            numel = 1
            for s in info["shape"]:
                numel *= s
            itemsize = _ST_SIZES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}; {what}") from None
        if itemsize is not None and b - a != numel * itemsize:
            raise CheckpointError(f"{path}: tensor {name!r} claims {b - a} bytes for shape {info['shape']} {info['dtype']}; {what}")
        end = max(end, b)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, file has {size}; {what}"
        )
    return [k for k in header if k != "__metadata__"]


class WeightFiles:
    """The tensors of a checkpoint directory, indexed by name -> file, read lazily."""

    def __init__(self, path: Path):
        self.path = path
        self.where: dict[str, Path] = {}
        self._bin: dict[Path, dict] = {}
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = path / index_name
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
                shards = sorted(set(weight_map.values()))
                missing = [s for s in shards if not (path / s).exists()]
                if missing:
                    raise CheckpointError(f"{index} lists shards that are not in {path}: {missing}; download all shards")
                for shard in shards:
                    self._add(path / shard)
                return
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (path / single).exists():
                self._add(path / single)
                return
        raise CheckpointError(
            f"{path} has no weights: expected model.safetensors, pytorch_model.bin, or a sharded *.index.json"
        )

    def _add(self, f: Path):
        if f.suffix == ".safetensors":
            names = check_safetensors(f)
        else:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises RuntimeError, EOFError, pickle errors, ...
                raise CheckpointError(f"{f}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e}); "
                                      "the file is truncated or corrupt; re-download it") from None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{f}: holds a {type(sd).__name__}, not a state dict")
            sd = sd.get("module", sd) if isinstance(sd.get("module"), dict) else sd
            self._bin[f] = sd
            names = list(sd)
        for n in names:
            self.where[n] = f

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        if f in self._bin:
            return self._bin[f][name]
        from safetensors import safe_open

        with safe_open(f, framework="pt") as st:
            return st.get_tensor(name)


def _strip_prefix(names, fmt: Format, expected: set[str]) -> str:
    """The prefix under which this checkpoint stores the format's names ('' or e.g. 'glm.')."""
    best, hits = fmt.prefixes[0], -1
    for p in fmt.prefixes:
        h = sum(1 for n in names if n.startswith(p) and n[len(p):] in expected)
        if h > hits:
            best, hits = p, h
    return best


def _default_dtype(t: torch.Tensor, device) -> torch.dtype:
    # fp16 matmuls run ~75x slower than fp32 on CPUs without fp16 units (PERF_NOTES)
    if t.dtype == torch.float16 and torch.device(device or "cpu").type == "cpu":
        return torch.float32
    return t.dtype if t.is_floating_point() else torch.float32


def read_checkpoint(path: str | Path, device=None, dtype=None) -> GLM:
    """Load any supported checkpoint directory as a glmkit GLM, checking every tensor."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (nor a preset: {', '.join(PRESETS)})")
    if not cfg_file.exists():
        raise CheckpointError(f"{path} has no config.json; a checkpoint directory needs one (see `glmkit convert`)")
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None
    fmt = detect_format(d, str(cfg_file))
    try:
        cfg = fmt.config_from_hf(d)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    files = WeightFiles(path)
    rules = fmt.rules(cfg)
    expected = {n for r in rules for n in r.theirs}
    prefix = _strip_prefix(files.where, fmt, expected)
    present = {n[len(prefix):]: n for n in files.where if n.startswith(prefix)}
    present.update({n: n for n in files.where if not n.startswith(prefix)})

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
            f"{files.where[present[unexpected[0]]].name}; the config.json does not describe these weights"
        )

    if cfg.quant and fmt is not GLMKIT:
        raise CheckpointError(f"{cfg_file}: quantized checkpoints exist only in the glmkit layout")
    model = _meta_model(cfg)
    want = model.state_dict()
    sd = {}
    for r in rules:
        ts = [files.get(present[n]) for n in r.theirs]
        if dtype is None and ts[0].is_floating_point():
            dtype = _default_dtype(ts[0], device)
        t, why = None, ""
        try:
            t = r.join([x.to(dtype) if x.is_floating_point() else x for x in ts])  # quantized ints stay ints
        except RuntimeError as e:  # a reshape in the layout change failed: wrong shape
            why = f" ({e})"
        if t is None or t.shape != want[r.ours].shape:
            got = [tuple(x.shape) for x in ts]
            raise CheckpointError(
                f"{files.where[present[r.theirs[0]]]}: tensor {r.theirs[0] if len(ts) == 1 else list(r.theirs)} has "
                f"shape {got[0] if len(got) == 1 else got}, but config.json implies {tuple(want[r.ours].shape)} for "
                f"{r.ours}{why}; the weights and config.json disagree"
            )
        sd[r.ours] = t
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device) if device is not None else model


# ---- writing ---------------------------------------------------------------------------------------
def write_checkpoint(model: GLM, dst: str | Path, fmt: str | None = None, extra_files=()) -> Path:
    """Write `model` as a checkpoint directory of format `fmt` (default: the layout it came from,
    or glmkit). Written to a temporary directory and renamed, so `dst` is never half-written."""
    from safetensors.torch import save_file

    cfg = model.cfg
    fmt_obj = FORMATS.get(fmt or (cfg.source if cfg.source in FORMATS else "glmkit"))
    if fmt_obj is None:
        raise CheckpointError(f"unknown format {fmt!r}; choose one of {list(FORMATS)}")
    hf_config = fmt_obj.config_to_hf(cfg)
    ours = model.state_dict()
    out = {}
    for r in fmt_obj.rules(cfg):
        for name, t in zip(r.theirs, r.split(ours[r.ours].detach())):
            out[name] = t.contiguous().cpu()
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise CheckpointError(f"{dst} exists and is not empty; choose a new directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, ensure_ascii=False) + "\n")
        save_file(out, tmp / "model.safetensors", metadata={"format": "pt", "written_by": "glmkit"})
        for f in extra_files:
            shutil.copy2(f, tmp / Path(f).name)
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
    return dst


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "ice_text.model", "generation_config.json")


# The model glmkit trains itself and ships inside the package (runs/default_model.sh, MODEL_CARD.md).
DEFAULT_MODEL = Path(__file__).parent / "assets" / "default"


def default_model_path() -> Path:
    if not (DEFAULT_MODEL / "config.json").exists():
        raise CheckpointError(f"this glmkit install has no embedded default model at {DEFAULT_MODEL}; "
                              "pass --model PATH|PRESET, or train one with runs/default_model.sh")
    return DEFAULT_MODEL


def load(path_or_preset: str | Path | None = None, device=None, dtype=None) -> GLM:
    """A GLM from a checkpoint directory, a preset name (random init, fp32 unless `dtype`), or, with
    no argument, the embedded default model."""
    if path_or_preset is None:
        path_or_preset = default_model_path()
    if isinstance(path_or_preset, str) and path_or_preset in PRESETS and not Path(path_or_preset).exists():
        model = GLM(get_preset(path_or_preset))
        return model.to(device=device, dtype=dtype or torch.float32)
    return read_checkpoint(path_or_preset, device=device, dtype=dtype)


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="glmkit convert", description="Convert a GLM-family checkpoint directory.")
    p.add_argument("src", help="checkpoint directory (glmkit, GlmForCausalLM, Glm4ForCausalLM, THUDM GLM, ChatGLM-6B)")
    p.add_argument("dst", help="new output directory")
    p.add_argument("--to", default="glmkit", choices=list(FORMATS), help="output layout (default: glmkit)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="output dtype (default: as stored)")
    a = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}[a.dtype]
    model = read_checkpoint(a.src, dtype=dtype)
    extra = [Path(a.src) / f for f in TOKENIZER_FILES if (Path(a.src) / f).exists()]
    write_checkpoint(model, a.dst, a.to, extra)
    n = sum(p.numel() for p in model.parameters())
    print(f"{a.src} ({model.cfg.source}) -> {a.dst} ({a.to}): {n / 1e6:.1f}M parameters, {next(model.parameters()).dtype}")
