"""Model configuration: one dataclass whose switches span the GLM family, and the presets.

    from glmkit.config import ModelConfig, get_preset
    cfg = get_preset("glm-4-9b")          # exact name; the error lists the known ones
    cfg = ModelConfig.from_json("ckpt/config.json")

Each switch is documented where it is declared below. Upstream checkpoints (HF GLM, GLM-4, the original
THUDM GLM, ChatGLM-6B) are translated to and from this config in `convert.py`; the `config.json`
written here is glmkit's own, HF-style (`architectures`, `model_type`, flat fields), so tools that
peek at a checkpoint directory find what they expect.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

POSITIONS = ("learned_2d", "rope_2d", "rope_partial")
NORMS = ("layernorm", "rmsnorm")
RESIDUALS = ("pre_ln", "deepnorm", "normed")
MLPS = ("gelu", "gelu_exact", "swiglu")
ATTENTIONS = ("mha", "mla")
LATENT_FIELDS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")  # required by "mla"
# rope_scaling types, as transformers' GLM classes name them (`rope_type`): (required keys, optional keys).
# "dynamic" (NTK by the current length) is refused in __post_init__; see there why.
ROPE_SCALING = {
    "linear": ({"factor"}, set()),
    "llama3": ({"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}, set()),
    "yarn": ({"factor", "original_max_position_embeddings"},
             {"attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"}),
    "longrope": ({"factor", "short_factor", "long_factor", "original_max_position_embeddings"}, {"attention_factor"}),
    "proportional": (set(), {"factor"}),
}
ROUTER_SCORINGS = ("sigmoid",)  # GLM-4.5's; the softmax routers of other families are not implemented
CHAT_FORMATS = ("glm4", "chatglm3", "chatglm2", "chatglm", "codegeex2", "codegeex4", "glm45", "glm47")  # glmkit.chat.FORMATS


@dataclass
class ModelConfig:
    vocab_size: int = 512
    dim: int = 64  # hidden size C
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # GQA; None = n_heads (multi-head attention)
    head_dim: int | None = None  # None = dim // n_heads
    ffn_dim: int | None = None  # MLP inner width F; None = 4*dim (gelu) or 8/3*dim rounded (swiglu)
    max_seq_len: int = 1024  # learned tables' size; cache size default; RoPE has no hard limit

    # position scheme:
    #   learned_2d   original GLM: word + position table + block-position table, summed
    #   rope_2d      ChatGLM-6B: head split in halves, first rotated by position, second by block
    #                position, each half rotated as (x[:d/2], x[d/2:]) pairs
    #   rope_partial GLM-4: rotary on the first `rope_fraction` of each head, interleaved pairs
    #                (x[2i], x[2i+1]); block positions are ignored
    position: str = "rope_2d"
    rope_theta: float = 10000.0
    rope_fraction: float = 0.5  # only for rope_partial
    # RoPE frequency scaling for long contexts: None, or a dict of transformers' `rope_parameters` form
    # without rope_theta / partial_rotary_factor (our rope_theta / rope_fraction): {"rope_type": one of
    # ROPE_SCALING, its keys}. layers.rope_frequencies turns it into the frequencies both decode paths use.
    rope_scaling: dict | None = None
    # ChatGLM-6B: its published code rounds the inverse frequencies to fp16 (and ignores any stored ones)
    rope_fp16: bool = False

    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    # pre_ln:   x + f(norm(x))                       (GPT-2, original GLM, GLM-4)
    # deepnorm: norm(x) * alpha + f(norm(x)), alpha = sqrt(2 * n_layers)   (ChatGLM-6B)
    # normed:   norm(x) + f(norm(x))   (ChatGLM2 / GLM-4 code's apply_residual_connection_post_layernorm)
    residual: str = "pre_ln"
    # deepnorm's alpha = sqrt(2 * deepnorm_layers); None = n_layers. ChatGLM-6B's published code builds
    # its blocks with the default 28 whatever the depth, so its checkpoints carry 28.
    deepnorm_layers: int | None = None
    sandwich_norm: bool = False  # GLM-4-0414: extra norms on the attention and MLP outputs
    final_norm: bool = True  # a norm after the last block (ChatGLM2's post_layer_norm=false has none)
    # gelu: tanh-approximated GELU (ChatGLM-6B); gelu_exact: erf GELU (the original GLM's published code)
    mlp: str = "swiglu"
    qkv_bias: bool = False
    out_bias: bool = False  # bias of the attention output projection
    mlp_bias: bool = False
    tie_embeddings: bool = True

    # ---- latent attention ----------------------------------------------------------------------------
    # attention: "mha" (heads of q/k/v, grouped by n_kv_heads) or "mla", multi-head latent attention
    # (Glm4MoeLiteForCausalLM, GLM-4.7-Flash; DeepSeek-V2's form): q = q_b(norm(q_a(x))) (or one q
    # projection when q_lora_rank is None), heads of qk_nope_head_dim + qk_rope_head_dim channels; keys and
    # values come from one latent per token, kv_a(x) = [c (kv_lora_rank) ; k_pe (qk_rope_head_dim)]: c is
    # normed and kv_b(c) gives each head its [k_nope ; v (v_head_dim)], k_pe is rotated and shared by all
    # heads. Only [c ; k_pe] is cached (`kv_layout`). Rotary covers all of q's and k's rope channels, in
    # pairs (x[2i], x[2i+1]) with rope_interleave, else (x[i], x[i + r/2]); rope_fraction does not apply.
    # For "mla" the other fields here are required, position is rope_partial, and n_kv_heads / head_dim
    # are derived (n_heads; qk_nope_head_dim + qk_rope_head_dim, the width of q.k).
    attention: str = "mha"
    q_lora_rank: int | None = None  # None: q = q(x) with no low-rank step
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    rope_interleave: bool = True

    init_std: float = 0.02
    # Which upstream layout this model came from; convert.py uses it as the default export target.
    source: str = "glmkit"
    # Weight-only quantization of a saved model ({"bits", "group_size", "head"}; see quantize.py).
    # Not an architecture switch: loading applies it to the float model from outside.
    quant: dict | None = None
    # The family's prompt format (glmkit.chat: chat layout, stop ids, code infilling), set when a
    # checkpoint is converted; None = GLM-4's. Not an architecture switch either.
    chat_format: str | None = None

    # ---- mixture of experts (GLM-4.5 / 4.6 / 4.7: transformers' Glm4MoeForCausalLM) ----
    # n_experts routed SwiGLU experts of width moe_ffn_dim per MoE layer (0: every layer dense); each token
    # goes to n_experts_per_tok of them, chosen by a sigmoid router: scores s = sigmoid(W x); the choice
    # ranks s + e_score_correction_bias (a learned per-expert bias, for choosing only); experts are split
    # into n_group groups, a group scored by the sum of its two best, and only the topk_group best groups
    # compete; the chosen experts' outputs are weighted by their s (normalised to sum 1 when
    # norm_topk_prob) times routed_scaling_factor. n_shared_experts: one SwiGLU MLP of width
    # n_shared_experts * moe_ffn_dim every token goes through. Layers < first_dense_layers keep the
    # dense MLP (ffn_dim).
    n_experts: int = 0
    n_experts_per_tok: int = 0
    n_shared_experts: int = 0
    moe_ffn_dim: int | None = None
    first_dense_layers: int = 0
    router_scoring: str = "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # the same family's attention: per-head RMSNorm on q and k before rotary (use_qk_norm); its rope_partial
    # rotates (x[i], x[i + r/2]) pairs (rope_interleave=false) where GLM-4 rotates (x[2i], x[2i+1])
    qk_norm: bool = False
    # multi-token-prediction layers shipped after the last block (num_nextn_predict_layers): loaded and
    # written with the model, never run by forward (GLM.mtp_logits drafts with them)
    n_mtp_layers: int = 0

    # ---- sparse attention indexer (GLM-5: transformers' GlmMoeDsaForCausalLM) ----
    # With latent attention and q_lora_rank, index_n_heads > 0 adds DeepSeek-V3.2's indexer: per token a key
    # LayerNorm(wk x) of index_head_dim (its first qk_rope_head_dim channels rotated, interleaved), cached
    # beside the latent; per query index_n_heads heads q = wq_b(q_norm(q_a x)) and head weights
    # weights_proj(x) / sqrt(index_n_heads). A key scores sum_h w_h relu(q_h . k / sqrt(index_head_dim)); the
    # query attends only to the index_topk best of the keys its mask shows. index_pattern: per layer "F" (runs
    # its own indexer) or "S" (reuses the previous "F" layer's choice, no indexer weights); None: all "F".
    index_n_heads: int = 0
    index_head_dim: int | None = None
    index_topk: int = 0
    index_pattern: str | None = None

    # derived in __post_init__ (not serialized)
    residual_alpha: float = 1.0

    def __post_init__(self):
        self._check_types()
        for name, value, allowed in (
            ("position", self.position, POSITIONS),
            ("norm", self.norm, NORMS),
            ("residual", self.residual, RESIDUALS),
            ("mlp", self.mlp, MLPS),
            ("attention", self.attention, ATTENTIONS),
        ):
            if value not in allowed:
                raise ValueError(f"ModelConfig.{name}={value!r}; expected one of {allowed}")
        if self.chat_format is not None and self.chat_format not in CHAT_FORMATS:
            raise ValueError(f"ModelConfig.chat_format={self.chat_format!r}; expected one of {CHAT_FORMATS} or null")
        for name in ("vocab_size", "dim", "n_layers", "n_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_kv_heads is not None and self.n_kv_heads <= 0:
            raise ValueError(f"ModelConfig.n_kv_heads must be positive, got {self.n_kv_heads}")
        self._check_latent()
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.ffn_dim is None:
            if self.mlp in ("gelu", "gelu_exact"):
                self.ffn_dim = 4 * self.dim
            else:  # SwiGLU at ~the parameter count of a 4x GELU MLP, rounded up to 64
                self.ffn_dim = 64 * math.ceil(8 * self.dim / 3 / 64)
        if self.position == "rope_2d" and self.head_dim % 4:
            raise ValueError(f"rope_2d needs head_dim divisible by 4 (two rotary halves), got {self.head_dim}")
        if self.position == "rope_partial" and self.rotary_dim % 2:
            raise ValueError(f"rope_partial needs an even rotary dim, got {self.rotary_dim}")
        if self.deepnorm_layers is not None and self.residual != "deepnorm":
            raise ValueError(f"ModelConfig.deepnorm_layers={self.deepnorm_layers} applies only to residual='deepnorm'; "
                             "remove it (null)")
        if self.rope_fp16 and self.position == "learned_2d":
            raise ValueError("ModelConfig.rope_fp16 applies only to rotary positions (rope_2d, rope_partial), "
                             "not learned_2d; set it false")
        self._check_rope_scaling()
        self._check_moe()
        self._check_indexer()
        layers = self.deepnorm_layers or self.n_layers
        self.residual_alpha = math.sqrt(2 * layers) if self.residual == "deepnorm" else 1.0

    def _check_latent(self):
        """The latent attention fields: all of them for "mla" (and the derived n_kv_heads / head_dim, when
        given, equal to what they are derived as), none for "mha"."""
        where = "ModelConfig"
        latent = ("q_lora_rank",) + LATENT_FIELDS
        if self.attention == "mha":
            given = [n for n in latent if getattr(self, n) is not None]
            if given:
                raise ValueError(f"{where}.{given[0]} applies only to attention='mla'; set attention='mla' or remove it")
            return
        missing = [n for n in LATENT_FIELDS if getattr(self, n) is None]
        if missing:
            raise ValueError(f"{where}: attention='mla' needs {missing} (see the latent attention fields)")
        for n in latent:
            if getattr(self, n) is not None and getattr(self, n) <= 0:
                raise ValueError(f"{where}.{n} must be positive, got {getattr(self, n)}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"{where}.qk_rope_head_dim must be even (rotary pairs), got {self.qk_rope_head_dim}")
        if self.position != "rope_partial":
            raise ValueError(f"{where}: attention='mla' takes position='rope_partial' (rotary on the rope channels), "
                             f"got {self.position!r}")
        if (self.rope_scaling or {}).get("rope_type") == "proportional":
            raise ValueError(f"{where}: rope_scaling 'proportional' is not supported with attention='mla'")
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        for n, want in (("n_kv_heads", self.n_heads), ("head_dim", qk)):
            if getattr(self, n) not in (None, want):
                raise ValueError(f"{where}.{n}={getattr(self, n)} with attention='mla': it is derived ({want}); "
                                 "remove it (null)")
        self.n_kv_heads, self.head_dim = self.n_heads, qk

    def _check_moe(self):
        """The mixture-of-experts fields agree with each other (defaults: a dense model), so a bad config
        fails here naming the field instead of as a shape error in the router."""
        if self.router_scoring not in ROUTER_SCORINGS:
            raise ValueError(f"ModelConfig.router_scoring={self.router_scoring!r}; expected one of {ROUTER_SCORINGS}")
        for name in ("n_experts", "n_experts_per_tok", "n_shared_experts", "first_dense_layers", "n_mtp_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"ModelConfig.{name} must not be negative, got {getattr(self, name)}")
        for name in ("n_group", "topk_group"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"ModelConfig.routed_scaling_factor must be positive, got {self.routed_scaling_factor}")
        if self.moe_ffn_dim is not None and self.moe_ffn_dim <= 0:
            raise ValueError(f"ModelConfig.moe_ffn_dim must be positive, got {self.moe_ffn_dim}")
        if not self.rope_interleave and self.position != "rope_partial":
            raise ValueError(f"ModelConfig.rope_interleave=false applies only to position='rope_partial', "
                             f"not {self.position!r}; set it true")
        E, k = self.n_experts, self.n_experts_per_tok
        if E == 0:
            moe_only = {"n_experts_per_tok": 0, "n_shared_experts": 0, "moe_ffn_dim": None, "first_dense_layers": 0,
                        "n_group": 1, "topk_group": 1}
            set_ = [f"{n}={getattr(self, n)}" for n, v in moe_only.items() if getattr(self, n) != v]
            if set_:
                raise ValueError(f"ModelConfig: {', '.join(set_)} apply only to a mixture of experts; set n_experts "
                                 "(or leave them at their defaults for a dense model)")
            return
        if self.mlp != "swiglu" or self.mlp_bias:
            raise ValueError(f"ModelConfig.n_experts={E}: experts are SwiGLU MLPs without biases; "
                             f"got mlp={self.mlp!r}, mlp_bias={self.mlp_bias}")
        if self.moe_ffn_dim is None:
            raise ValueError(f"ModelConfig.n_experts={E} needs moe_ffn_dim, the width of one expert")
        if not 1 <= k <= E:
            raise ValueError(f"ModelConfig.n_experts_per_tok must be in 1..n_experts={E}, got {k}")
        if E % self.n_group:
            raise ValueError(f"ModelConfig.n_group={self.n_group} does not divide n_experts={E}")
        per = E // self.n_group
        if self.n_group > 1 and per < 2:
            raise ValueError(f"ModelConfig.n_group={self.n_group}: a group is scored by its two best experts, "
                             f"so each needs at least 2 (n_experts={E})")
        if self.topk_group > self.n_group:
            raise ValueError(f"ModelConfig.topk_group={self.topk_group} exceeds n_group={self.n_group}")
        if self.topk_group * per < k:
            raise ValueError(f"ModelConfig: topk_group={self.topk_group} groups of {per} experts hold fewer than "
                             f"n_experts_per_tok={k}")
        if self.first_dense_layers > self.n_layers:
            raise ValueError(f"ModelConfig.first_dense_layers={self.first_dense_layers} exceeds n_layers={self.n_layers}")

    def _check_indexer(self):
        """The indexer's fields agree with each other and with latent attention (defaults: no indexer)."""
        if not self.index_n_heads:
            given = [n for n, v in (("index_head_dim", self.index_head_dim), ("index_topk", self.index_topk),
                                    ("index_pattern", self.index_pattern)) if v]
            if given:
                raise ValueError(f"ModelConfig: {', '.join(given)} apply only to the sparse attention indexer; set "
                                 "index_n_heads or remove them")
            return
        if self.index_n_heads < 0 or self.attention != "mla" or self.q_lora_rank is None:
            raise ValueError(f"ModelConfig.index_n_heads={self.index_n_heads}: the indexer needs a positive head count, "
                             "attention='mla' and q_lora_rank (its queries read q_norm(q_a x))")
        if not self.index_head_dim or self.index_head_dim < self.qk_rope_head_dim:
            raise ValueError(f"ModelConfig.index_head_dim={self.index_head_dim} must be at least qk_rope_head_dim="
                             f"{self.qk_rope_head_dim} (its first channels are rotated)")
        if self.index_topk <= 0:
            raise ValueError(f"ModelConfig.index_topk must be positive with an indexer, got {self.index_topk}")
        p = self.index_pattern
        if p is not None and (len(p) != self.n_layers or set(p) - {"F", "S"} or p[0] != "F"):
            raise ValueError(f"ModelConfig.index_pattern={p!r} must hold 'F' or 'S' for each of the {self.n_layers} "
                             "layers, starting with 'F' (an 'S' layer reuses the previous 'F' layer's choice)")

    def has_indexer(self, layer: int) -> bool:
        """Whether block `layer` runs its own sparse attention indexer (the MTP layers, n_layers.., do)."""
        p = self.index_pattern
        return self.index_n_heads > 0 and (p is None or layer >= self.n_layers or p[layer] == "F")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` (n_layers.. for the multi-token-prediction layers) has routed experts."""
        return self.n_experts > 0 and layer >= self.first_dense_layers

    def _check_rope_scaling(self):
        """rope_scaling names a known type with exactly its keys, each of the right kind, so a bad
        config.json fails here naming the key rather than as NaN logits."""
        s = self.rope_scaling
        if s is None:
            return
        where = "ModelConfig.rope_scaling"
        kind = s.get("rope_type")
        if kind == "dynamic":
            raise ValueError(
                f"{where}: rope_type 'dynamic' (dynamic NTK) is not supported: it recomputes the frequencies from "
                "the current sequence length, so keys already in the KV cache were rotated with other frequencies "
                "than the new queries, and a text's logits depend on how it was chunked and batched. Use 'yarn' or "
                "'linear' with the same factor, or drop rope_scaling for texts within the model's trained length")
        if kind not in ROPE_SCALING:
            raise ValueError(f"{where}: rope_type must be one of {sorted(ROPE_SCALING)}, got {_show(kind)}")
        if self.position == "learned_2d":
            raise ValueError(f"{where} applies only to rotary positions (rope_2d, rope_partial), not learned_2d")
        required, optional = ROPE_SCALING[kind]
        missing, unknown = sorted(required - set(s)), sorted(set(s) - required - optional - {"rope_type"})
        if missing or unknown:
            raise ValueError(f"{where} of rope_type {kind!r}: " + "; ".join(
                ([f"missing {missing}"] if missing else []) + ([f"unknown keys {unknown}"] if unknown else []))
                + f" (it takes {sorted(required)}" + (f", optionally {sorted(optional)})" if optional else ")"))
        for key, value in s.items():
            if key == "rope_type":
                continue
            if key == "truncate":
                ok = isinstance(value, bool)
            elif key in ("short_factor", "long_factor"):
                ok = (isinstance(value, list) and len(value) == self.rotary_dim // 2
                      and all(_is(v, "float") and math.isfinite(v) and v > 0 for v in value))
            elif key == "original_max_position_embeddings":
                ok = _is(value, "int") and value > 0
            elif key in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
                ok = value is None or (_is(value, "float") and math.isfinite(value))
            else:  # factor, attention_factor
                ok = (value is None and key == "attention_factor") or (
                    _is(value, "float") and math.isfinite(value) and value > 0)
            if not ok:
                want = {"truncate": "true or false", "original_max_position_embeddings": "a positive integer",
                        "short_factor": f"a list of {self.rotary_dim // 2} positive numbers (one per rotary pair)",
                        "long_factor": f"a list of {self.rotary_dim // 2} positive numbers (one per rotary pair)",
                        }.get(key, "a positive number" if key in ("factor", "attention_factor") else "a number")
                raise ValueError(f"{where}[{key!r}] must be {want}, got {_show(value)}")
        if kind == "llama3" and s["low_freq_factor"] == s["high_freq_factor"]:
            raise ValueError(f"{where}: llama3 needs low_freq_factor != high_freq_factor (both {s['low_freq_factor']})")

    def _check_types(self):
        """Each field holds what its annotation says, so a config.json with `"dim": "big"` fails
        here, naming the field, rather than deep inside the model with a TypeError."""
        for f in fields(self):
            if f.name == "residual_alpha":
                continue
            value, kinds = getattr(self, f.name), f.type.replace(" ", "").split("|")
            if not any(_is(value, k) for k in kinds):
                want = " or ".join(_KIND_NAMES[k] for k in kinds)
                raise ValueError(f"ModelConfig.{f.name} must be {want}, got {_show(value)}")
            if _is(value, "float") and not math.isfinite(value):
                raise ValueError(f"ModelConfig.{f.name} must be a finite number, got {value}")
        for name in ("max_seq_len", "ffn_dim", "head_dim", "rope_theta", "norm_eps", "deepnorm_layers"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.rope_fraction <= 1:
            raise ValueError(f"ModelConfig.rope_fraction must be in (0, 1], got {self.rope_fraction}")
        if self.init_std < 0:
            raise ValueError(f"ModelConfig.init_std must not be negative, got {self.init_std}")

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that one rotary frequency table covers."""
        if self.attention == "mla":
            return self.qk_rope_head_dim
        if self.position == "rope_2d":
            return self.head_dim // 2  # each half is one rotary table of this size
        if self.position == "rope_partial":
            return int(self.head_dim * self.rope_fraction)
        return 0

    @property
    def kv_layout(self) -> tuple[int, int, int]:
        """(heads, key width, value width) of what one layer caches per token: n_kv_heads keys and values
        of head_dim; for "mla" one latent [c ; k_pe] as the key (kv_lora_rank + qk_rope_head_dim: 576
        values for GLM-4.7-Flash) and nothing as the value, which attention reads from c."""
        if self.attention == "mla":  # GLM-5's indexer adds its key (index_head_dim) to every layer's latent
            return 1, self.kv_lora_rank + self.qk_rope_head_dim + (self.index_head_dim if self.index_n_heads else 0), 0
        return self.n_kv_heads, self.head_dim, self.head_dim

    @property
    def uses_block_positions(self) -> bool:
        return self.position in ("learned_2d", "rope_2d")

    @property
    def prefix_lm(self) -> bool:
        """Trained with GLM's blank infilling: a prompt (Part A) is read bidirectionally and generation
        starts at a mask's position (learned_2d, rope_2d). False: a causal LM (GLM-4, rope_partial)."""
        return self.position != "rope_partial"

    # ---- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("residual_alpha")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a ModelConfig is a JSON object of fields, got {_show(d)}")
        known = {f.name for f in fields(cls)} - {"residual_alpha"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_hf_dict(self) -> dict:
        """glmkit's own config.json: HF-style header plus our fields."""
        return {"architectures": ["GlmkitForCausalLM"], "model_type": "glmkit", **self.to_dict()}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} must hold a JSON object ({{...}}), not {_show(d)}")
        if d.get("model_type") != "glmkit":
            raise ValueError(
                f"{path} is not a glmkit config (model_type={d.get('model_type')!r}); "
                "upstream checkpoints load through glmkit.load() or `glmkit convert`"
            )
        d = {k: v for k, v in d.items() if k not in ("architectures", "model_type")}
        return cls.from_dict(d)

    # ---- sizes ------------------------------------------------------------------------------------
    def num_params(self, embeddings: bool = True, active: bool = False) -> int:
        """Parameters of the model (without the multi-token-prediction layers, which forward does not run).
        `active`: those one token's forward reads: every attention, norm and dense MLP, and in an MoE layer
        the router, the shared expert and n_experts_per_tok routed experts (the embeddings count whole)."""
        C, H, K, D, F, V = self.dim, self.n_heads, self.n_kv_heads, self.head_dim, self.ffn_dim, self.vocab_size
        norm = C * (2 if self.norm == "layernorm" else 1)
        attn = C * (H + 2 * K) * D + (H + 2 * K) * D * self.qkv_bias + H * D * C + C * self.out_bias
        if self.attention == "mla":
            Q, R, P, Dv = self.q_lora_rank, self.kv_lora_rank, self.qk_rope_head_dim, self.v_head_dim
            q = C * H * D if Q is None else (C + 1 + H * D) * Q + Q * self.qkv_bias  # q, or q_a (+ bias), its norm, q_b
            kv = (C + self.qkv_bias) * (R + P) + R + R * H * (self.qk_nope_head_dim + Dv)  # kv_a, its norm, kv_b
            attn = q + kv + H * Dv * C + C * self.out_bias
        attn += 2 * D * self.qk_norm
        up = F * (2 if self.mlp == "swiglu" else 1)
        mlp = C * up + F * C + (up + C) * self.mlp_bias
        layer = attn + norm * (4 if self.sandwich_norm else 2)
        n = self.n_layers * layer + norm
        for i in range(self.n_layers):
            n += self.moe_params(active) if self.is_moe_layer(i) else mlp
            n += self.indexer_params() if self.has_indexer(i) else 0
        if embeddings:
            n += V * C * (1 if self.tie_embeddings else 2)
            if self.position == "learned_2d":
                n += 2 * self.max_seq_len * C
        return n


    def indexer_params(self) -> int:
        """Parameters of one layer's sparse attention indexer: wq_b, wk, k_norm (weight and bias), weights_proj."""
        Hi, Di = self.index_n_heads, self.index_head_dim or 0
        return (self.q_lora_rank or 0) * Hi * Di + self.dim * Di + 2 * Di + self.dim * Hi

    def moe_params(self, active: bool = False) -> int:
        """Parameters of one MoE layer's MLP side: router and its bias, shared expert, routed experts (all,
        or the n_experts_per_tok one token uses)."""
        C, E = self.dim, self.n_experts
        expert = 3 * C * (self.moe_ffn_dim or 0)  # [gate; up] and down, no biases
        return E * C + E + self.n_shared_experts * expert + (self.n_experts_per_tok if active else E) * expert


# annotation -> test, for _check_types. bool is an int subclass and int a valid float in JSON
# (`"rope_theta": 10000`), hence the explicit tests.
_KIND_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "dict": "a JSON object", "None": "null"}


def _is(value: Any, kind: str) -> bool:
    if kind == "int":  # numbers.Integral also admits numpy integers that code may pass
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, {"bool": bool, "str": str, "dict": dict, "None": type(None)}[kind])


def _show(value: Any) -> str:
    """A value for an error message: its repr, cut short (a config may hold anything), and its type."""
    r = repr(value)
    return f"{r[:60] + '...' if len(r) > 60 else r} ({type(value).__name__})"


# Presets are data. Upstream presets carry the real hyper-parameters of the named checkpoint;
# each comment names where the numbers come from.
PRESETS: dict[str, dict] = {
    # tests: tiny, every code path of the native architecture (GQA, rope_2d, SwiGLU, RMSNorm)
    "debug": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256),
    # native glmkit models: modern backbone trained with the GLM objective
    "glm-tiny": dict(vocab_size=16384, dim=256, n_layers=6, n_heads=8, n_kv_heads=2, max_seq_len=1024),
    "glm-small": dict(vocab_size=16384, dim=512, n_layers=8, n_heads=8, n_kv_heads=2, max_seq_len=1024),
    # THUDM/glm-large-chinese config.json (GLM paper Table: GLM-Large, 335M): 24 layers, 1024 hidden,
    # 16 heads, SentencePiece vocab 50048, max_sequence_length 1024, block_position_encoding true;
    # its modeling_glm.py: position tables of max_sequence_length + 1 rows, exact (erf) GELU
    "glm-large-chinese": dict(
        vocab_size=50048, dim=1024, n_layers=24, n_heads=16, max_seq_len=1025, position="learned_2d",
        norm="layernorm", mlp="gelu_exact", qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
        source="glm",
    ),
    # THUDM/glm-10b-chinese config.json (GLM paper: GLM-10B): 48 layers, 4096 hidden, 64 heads; the same
    # modeling_glm.py as glm-large-chinese (tables of max_sequence_length + 1 rows, erf GELU)
    "glm-10b-chinese": dict(
        vocab_size=50048, dim=4096, n_layers=48, n_heads=64, max_seq_len=1025, position="learned_2d",
        norm="layernorm", mlp="gelu_exact", qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
        source="glm",
    ),
    # THUDM/chatglm-6b config.json: 28 layers, 4096 hidden, inner_hidden_size 16384, 32 heads,
    # vocab 130528, max_sequence_length 2048, position_encoding_2d, layernorm_epsilon 1e-5;
    # modeling_chatglm.py: alpha = sqrt(2 * 28) residual (GLMBlock's default num_layers), GELU (tanh),
    # rotary inverse frequencies rounded to fp16; its lm_head is tied to the word embeddings by HF's
    # default tie_word_embeddings=True (6.17B parameters, the published 6.2B)
    "chatglm-6b": dict(
        vocab_size=130528, dim=4096, n_layers=28, n_heads=32, ffn_dim=16384, max_seq_len=2048,
        position="rope_2d", rope_fp16=True, norm="layernorm", norm_eps=1e-5, residual="deepnorm",
        deepnorm_layers=28, mlp="gelu",
        qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True, source="chatglm",
    ),
    # THUDM/glm-4-9b-hf config.json (GlmForCausalLM): 40 layers, 4096 hidden, 13696 ffn, 32 heads,
    # 2 kv heads, head_dim 128, partial_rotary_factor 0.5, rms_norm_eps 1.5625e-07, attention_bias,
    # vocab 151552, max_position_embeddings 8192
    "glm-4-9b": dict(
        vocab_size=151552, dim=4096, n_layers=40, n_heads=32, n_kv_heads=2, head_dim=128, ffn_dim=13696,
        max_seq_len=8192, position="rope_partial", rope_fraction=0.5, rope_theta=10000.0, norm="rmsnorm",
        norm_eps=1.5625e-07, qkv_bias=True, tie_embeddings=False, source="glm_hf",
    ),
    # THUDM/chatglm3-6b config.json (remote-code ChatGLMModel; chatglm2-6b and codegeex2-6b have the same network,
    # chatglm2-6b with seq_length 32768): 28 layers, 4096 hidden, ffn_hidden_size 13696, 32 heads, kv_channels 128,
    # multi_query_group_num 2, padded_vocab_size 65024, seq_length 8192, layernorm_epsilon 1e-5, add_qkv_bias
    "chatglm3-6b": dict(
        vocab_size=65024, dim=4096, n_layers=28, n_heads=32, n_kv_heads=2, head_dim=128, ffn_dim=13696,
        max_seq_len=8192, position="rope_partial", rope_fraction=0.5, rope_theta=10000.0, norm="rmsnorm",
        norm_eps=1e-5, qkv_bias=True, tie_embeddings=False, source="chatglm2", chat_format="chatglm3",
    ),
    # THUDM/GLM-4-9B-0414 config.json (Glm4ForCausalLM): as glm-4-9b plus sandwich norms,
    # rms_norm_eps 1e-5, max_position_embeddings 32768
    "glm-4-9b-0414": dict(
        vocab_size=151552, dim=4096, n_layers=40, n_heads=32, n_kv_heads=2, head_dim=128, ffn_dim=13696,
        max_seq_len=32768, position="rope_partial", rope_fraction=0.5, rope_theta=10000.0, norm="rmsnorm",
        norm_eps=1e-5, sandwich_norm=True, qkv_bias=True, tie_embeddings=False, source="glm4_hf",
    ),
}


# THUDM/glm-4-9b-chat config.json (remote-code ChatGLMModel, as first released): the -hf network with
# rope_ratio 500 (rope_theta 5e6) and seq_length 131072; glm-4-9b-chat-1m: multi_query_group_num 4,
# rope_ratio 10000, seq_length 1048576
PRESETS["glm-4-9b-chat"] = dict(PRESETS["glm-4-9b"], max_seq_len=131072, rope_theta=5e6, source="chatglm2", chat_format="glm4")
PRESETS["glm-4-9b-chat-1m"] = dict(PRESETS["glm-4-9b-chat"], n_kv_heads=4, max_seq_len=1048576, rope_theta=1e8)


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
