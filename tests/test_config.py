"""ModelConfig: validation, serialization round trips, presets and parameter counts.

    .venv/bin/python -m pytest tests/test_config.py -q

num_params is checked two ways: exactly against an instantiated GLM for tiny configs that cover
every switch, and loosely against the published sizes of the big presets (never instantiated).
"""

from __future__ import annotations

import itertools
import json
import math

import pytest

from glmkit.config import PRESETS, ModelConfig, get_preset
from glmkit.model import GLM

# ---- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, bad, allowed",
    [
        ("position", "rope", "'learned_2d', 'rope_2d', 'rope_partial'"),
        ("norm", "batchnorm", "'layernorm', 'rmsnorm'"),
        ("residual", "post_ln", "'pre_ln', 'deepnorm'"),
        ("mlp", "relu", "'gelu', 'gelu_exact', 'swiglu'"),
    ],
)
def test_bad_switch_names_list_the_choices(field, bad, allowed):
    with pytest.raises(ValueError) as e:
        ModelConfig(**{field: bad})
    msg = str(e.value)
    assert f"{field}={bad!r}" in msg and allowed in msg, msg


def test_heads_not_divisible_by_kv_heads():
    with pytest.raises(ValueError, match=r"n_heads=6 is not a multiple of n_kv_heads=4"):
        ModelConfig(dim=96, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match=r"n_heads=4 is not a multiple of n_kv_heads=8"):
        ModelConfig(n_heads=4, n_kv_heads=8)


def test_other_shape_errors_say_what_to_do():
    with pytest.raises(ValueError, match=r"dim=64 is not divisible by n_heads=6; set head_dim"):
        ModelConfig(dim=64, n_heads=6)
    assert ModelConfig(dim=64, n_heads=6, head_dim=16).head_dim == 16  # the advertised fix works
    with pytest.raises(ValueError, match=r"rope_2d needs head_dim divisible by 4.*got 6"):
        ModelConfig(dim=24, n_heads=4, position="rope_2d")
    with pytest.raises(ValueError, match=r"rope_partial needs an even rotary dim, got 3"):
        ModelConfig(dim=24, n_heads=4, position="rope_partial", rope_fraction=0.5)


def test_derived_fields():
    c = ModelConfig(dim=64, n_heads=4, mlp="gelu")
    assert (c.n_kv_heads, c.head_dim, c.ffn_dim, c.residual_alpha) == (4, 16, 256, 1.0)
    assert ModelConfig(dim=64, mlp="swiglu").ffn_dim == 192  # 8/3 * 64 = 170.7, rounded up to 64
    assert ModelConfig(n_layers=8, residual="deepnorm").residual_alpha == 4.0  # sqrt(2 * 8)
    assert ModelConfig(dim=64, n_heads=4, position="rope_2d").rotary_dim == 8
    assert ModelConfig(dim=64, n_heads=4, position="rope_partial", rope_fraction=0.5).rotary_dim == 8
    assert ModelConfig(position="learned_2d").rotary_dim == 0


# ---- serialization --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_dict_round_trip(name):
    cfg = get_preset(name)
    d = cfg.to_dict()
    assert "residual_alpha" not in d  # derived, not serialized
    assert json.loads(json.dumps(d)) == d  # plain JSON types only
    back = ModelConfig.from_dict(d)
    assert back == cfg, f"{name}: {back} != {cfg}"


@pytest.mark.parametrize("name", PRESETS)
def test_json_round_trip(name, tmp_path):
    cfg = get_preset(name)
    path = tmp_path / "config.json"
    cfg.save(path)
    raw = json.loads(path.read_text())
    assert raw["model_type"] == "glmkit" and raw["architectures"] == ["GlmkitForCausalLM"], raw
    back = ModelConfig.from_json(path)
    assert back == cfg, f"{name}: {back} != {cfg}"
    assert back.residual_alpha == cfg.residual_alpha


def test_rope_and_published_code_fields_round_trip_and_are_checked(tmp_path):
    """rope_scaling, rope_fp16 and deepnorm_layers are serialized (a converted checkpoint keeps them) and
    refused where they mean nothing, naming the field."""
    cfg = ModelConfig(position="rope_partial", residual="deepnorm", deepnorm_layers=28, rope_fp16=True,
                      rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    cfg.save(tmp_path / "config.json")
    back = ModelConfig.from_json(tmp_path / "config.json")
    assert back == cfg and back.residual_alpha == math.sqrt(56)
    for kw, match in (
        (dict(deepnorm_layers=28), r"deepnorm_layers=28 applies only to residual='deepnorm'"),
        (dict(position="learned_2d", rope_fp16=True), r"rope_fp16 applies only to rotary positions"),
        (dict(position="learned_2d", rope_scaling={"rope_type": "linear", "factor": 2.0}),
         r"rope_scaling applies only to rotary positions"),
        (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), r"rope_scaling: rope_type 'dynamic'.*not supported"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
                            "low_freq_factor": 2.0, "high_freq_factor": 2.0}), r"low_freq_factor != high_freq_factor"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64.5}),
         r"rope_scaling\['original_max_position_embeddings'\] must be a positive integer"),
        (dict(rope_scaling="yarn"), r"ModelConfig.rope_scaling must be a JSON object or null"),
    ):
        with pytest.raises(ValueError, match=match):
            ModelConfig(**kw)


def test_from_dict_rejects_unknown_fields():
    d = {**ModelConfig().to_dict(), "hidden_size": 4096}
    with pytest.raises(ValueError, match=r"unknown ModelConfig fields \['hidden_size'\]; known: .*'vocab_size'"):
        ModelConfig.from_dict(d)


def test_from_json_rejects_foreign_configs(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "chatglm", "hidden_size": 4096}))
    with pytest.raises(ValueError, match=r"not a glmkit config \(model_type='chatglm'\).*glmkit convert"):
        ModelConfig.from_json(path)


# ---- presets --------------------------------------------------------------------------------------


def test_unknown_preset_lists_known_names():
    with pytest.raises(KeyError) as e:
        get_preset("glm-4-9")  # exact names only: no fuzzy match to glm-4-9b
    msg = str(e.value)
    assert "'glm-4-9'" in msg, msg
    for name in PRESETS:
        assert name in msg, f"{name!r} missing from: {msg}"


def test_preset_overrides():
    cfg = get_preset("debug", n_layers=3, position="rope_partial")
    assert (cfg.n_layers, cfg.position, cfg.dim) == (3, "rope_partial", PRESETS["debug"]["dim"])
    with pytest.raises(ValueError, match="position"):
        get_preset("debug", position="alibi")


# ---- parameter counts -------------------------------------------------------------------------------


def tiny_variants():
    """Every combination of the boolean / categorical switches on a tiny shape, plus shape variants."""
    switches = itertools.product(
        ("learned_2d", "rope_2d", "rope_partial"),
        ("layernorm", "rmsnorm"),
        ("pre_ln", "deepnorm"),
        ("gelu", "swiglu"),
        (False, True),  # sandwich_norm
        (False, True),  # tie_embeddings
        ((False, False, False), (True, True, True), (True, False, False)),  # qkv, out, mlp bias
    )
    for position, norm, residual, mlp, sandwich, tie, (qkv_b, out_b, mlp_b) in switches:
        yield dict(
            vocab_size=40, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=12, position=position,
            norm=norm, residual=residual, mlp=mlp, sandwich_norm=sandwich, tie_embeddings=tie,
            qkv_bias=qkv_b, out_bias=out_b, mlp_bias=mlp_b,
        )
    # shapes: MHA, MQA, head_dim != dim / n_heads, explicit ffn_dim, fractional rope
    yield dict(vocab_size=40, dim=16, n_layers=1, n_heads=4, max_seq_len=12)
    yield dict(vocab_size=40, dim=16, n_layers=3, n_heads=4, n_kv_heads=1, head_dim=8, ffn_dim=24, qkv_bias=True)
    yield dict(vocab_size=40, dim=24, n_layers=1, n_heads=3, head_dim=12, position="rope_partial", rope_fraction=1 / 3, mlp="gelu")
    yield dict(vocab_size=40, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, position="learned_2d", max_seq_len=33)
    yield dict(vocab_size=40, dim=16, n_layers=2, n_heads=2, position="learned_2d", mlp="gelu_exact", max_seq_len=9)


EMBEDDING_PARAMS = ("embed.weight", "pos_embed.weight", "block_pos_embed.weight", "head.weight")


def test_num_params_matches_instantiated_model():
    mismatches = []
    variants = list(tiny_variants())
    for kw in variants:
        cfg = ModelConfig(**kw)
        model = GLM(cfg)
        total = sum(p.numel() for p in model.parameters())
        body = sum(p.numel() for n, p in model.named_parameters() if n not in EMBEDDING_PARAMS)
        if (cfg.num_params(), cfg.num_params(embeddings=False)) != (total, body):
            mismatches.append(f"{kw}: num_params {cfg.num_params()} vs {total}, without embeddings {cfg.num_params(embeddings=False)} vs {body}")
    assert not mismatches, f"{len(mismatches)} of {len(variants)} configs:\n" + "\n".join(mismatches[:10])


# Published sizes. chatglm-6b "6.2B" (THUDM/ChatGLM-6B README: 62 亿参数); glm-4-9b "9.4B" (HF model
# card); GLM-Large 335M-class (GLM paper Table; the Chinese vocab adds ~20M); GLM-10B "10B" (paper).
# The architecture of glm-10b-chinese (48 x 4096, vocab 50048) counts 9.88e9 exactly, so the band
# for it is centred on 1e10 rather than starting at 9.9e9.
PUBLISHED = {
    "chatglm-6b": (6.2e9 * 0.97, 6.2e9 * 1.03),
    "glm-4-9b": (9.4e9 * 0.97, 9.4e9 * 1.03),
    "glm-4-9b-0414": (9.4e9 * 0.97, 9.4e9 * 1.03),
    "glm-large-chinese": (335e6, 360e6),
    "glm-10b-chinese": (1e10 * 0.97, 1e10 * 1.03),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_big_presets_match_published_sizes(name):
    cfg = get_preset(name)
    lo, hi = PUBLISHED[name]
    n = cfg.num_params()
    assert lo <= n <= hi, (
        f"{name}: num_params() = {n:,} ({n / 1e9:.3f}e9), outside [{lo / 1e9:.3f}e9, {hi / 1e9:.3f}e9]; "
        f"without embeddings {cfg.num_params(embeddings=False):,}, one V x C table {cfg.vocab_size * cfg.dim:,}, "
        f"tie_embeddings={cfg.tie_embeddings}"
    )
