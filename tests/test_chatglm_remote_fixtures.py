"""The ChatGLM2 / ChatGLM3 / GLM-4 remote-code fixtures against the layout facts written down here.

tests/fixtures/chatglm_remote/<name>/ hold tiny random models saved by THUDM's published remote code
with the logits that code computed (see make_fixtures.py there). This file does not test glmkit: it
re-derives those logits with a small independent forward written from the layout facts below, so a
wrong fact (or a fixture that no longer matches its recorded logits) fails here, and glmkit's reader
can be held to the same fixtures. The facts, checked in modeling_chatglm.py of each release:

- query_key_value rows: multi_query_attention -> [q (H*D); k (G*D); v (G*D)], G = multi_query_group_num;
  otherwise per head [q_h; k_h; v_h] (D rows each), and multi_query_group_num is ignored.
  Query head h reads key/value group h // (H / G).
- D = kv_channels (H * D need not be hidden_size); scores scaled by 1/sqrt(D) (the
  apply_query_key_layer_scaling coeff divides and multiplies back).
- RoPE on the first D/2 channels of q and k, interleaved pairs (2i, 2i+1), theta_i =
  (10000 * rope_ratio) ** (-2i / (D/2)); rope_ratio only exists in GLM-4's code (1 before it).
- dense_h_to_4h rows = [gate; up], silu(gate) * up; bias on qkv iff add_qkv_bias or add_bias_linear,
  on dense / both MLP linears iff add_bias_linear; rmsnorm false -> LayerNorm with bias.
- apply_residual_connection_post_layernorm: both residuals add the normed input instead of the
  block input; post_layer_norm false: no final norm at all; no embedding scale; output_layer untied.
- transformer.rotary_pos_emb.inv_freq is stored (release dtype) as 10000 ** (-2i / (D/2)) whatever
  rope_ratio is; the forward never reads its values.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).parent / "fixtures" / "chatglm_remote"
FIXTURES = sorted(p.name for p in ROOT.iterdir() if (p / "logits.safetensors").is_file())
RELEASES = sorted(p.stem for p in (ROOT / "released_configs").glob("*.json"))


def _load(name: str):
    d = ROOT / name
    cfg = json.loads((d / "config.json").read_text())
    sd = load_file(d / "model.safetensors")
    ref = load_file(d / "logits.safetensors")
    return cfg, sd, ref


def _reference_logits(c: dict, sd: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Causal LM logits [B, T, V] of a ChatGLM2/3 / GLM-4 remote-code checkpoint, in float32."""
    w = {k: v.float() for k, v in sd.items()}
    H, D, E = c["num_attention_heads"], c["kv_channels"], c["hidden_size"]
    G = c["multi_query_group_num"] if c["multi_query_attention"] else H
    B, T = ids.shape
    rot = D // 2
    inv = (10000.0 * c.get("rope_ratio", 1)) ** (-torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv  # (T, rot/2)
    cos, sin = ang.cos(), ang.sin()

    def rope(t):  # (B, h, T, D): rotate pairs (2i, 2i+1) of the first D/2 channels
        r, rest = t[..., :rot], t[..., rot:]
        a, b = r[..., 0::2], r[..., 1::2]
        return torch.cat([torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2), rest], -1)

    def norm(t, prefix):
        if c["rmsnorm"]:
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + c["layernorm_epsilon"]) * w[prefix + ".weight"]
        return F.layer_norm(t, (E,), w[prefix + ".weight"], w[prefix + ".bias"], c["layernorm_epsilon"])

    x = w["transformer.embedding.word_embeddings.weight"][ids]  # (B, T, E)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(c["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        h = norm(x, p + "input_layernorm")
        qkv = F.linear(h, w[p + "self_attention.query_key_value.weight"], w.get(p + "self_attention.query_key_value.bias"))
        if c["multi_query_attention"]:
            q, k, v = qkv.split([H * D, G * D, G * D], -1)
            q, k, v = q.view(B, T, H, D), k.view(B, T, G, D), v.view(B, T, G, D)
        else:
            q, k, v = qkv.view(B, T, H, 3, D).unbind(3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, h, T, D)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
        att = (q @ k.transpose(-1, -2)) / D ** 0.5
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, H * D)
        a = F.linear(y, w[p + "self_attention.dense.weight"], w.get(p + "self_attention.dense.bias"))
        post_ln = c["apply_residual_connection_post_layernorm"]
        x2 = (h if post_ln else x) + a
        h2 = norm(x2, p + "post_attention_layernorm")
        gate, up = F.linear(h2, w[p + "mlp.dense_h_to_4h.weight"], w.get(p + "mlp.dense_h_to_4h.bias")).chunk(2, -1)
        m = F.linear(F.silu(gate) * up, w[p + "mlp.dense_4h_to_h.weight"], w.get(p + "mlp.dense_4h_to_h.bias"))
        x = (h2 if post_ln else x2) + m
    if c["post_layer_norm"]:
        x = norm(x, "transformer.encoder.final_layernorm")
    return F.linear(x, w["transformer.output_layer.weight"])


def _diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a - b).abs()
    return f"max {d.max().item():.3e} mean {d.mean().item():.3e}; got {a.flatten()[:4].tolist()} want {b.flatten()[:4].tolist()}"


@pytest.mark.parametrize("name", FIXTURES)
def test_reference_forward_reproduces_remote_logits(name):
    cfg, sd, ref = _load(name)
    got = _reference_logits(cfg, sd, ref["input_ids"])
    assert torch.allclose(got, ref["logits_full"], atol=1e-4, rtol=0), f"{name}: {_diff(got, ref['logits_full'])}"


@pytest.mark.parametrize("name", FIXTURES)
def test_cached_logits_match_full_forward(name):
    _, _, ref = _load(name)
    full = ref["logits_full"]
    for key, start in (("logits_decode", 12), ("logits_chunk", 8)):
        assert torch.allclose(ref[key], full[:, start:], atol=1e-4, rtol=0), f"{name} {key}: {_diff(ref[key], full[:, start:])}"


@pytest.mark.parametrize("name", FIXTURES)
def test_bias_and_norm_tensors_follow_the_flags(name):
    c, sd, _ = _load(name)
    p = "transformer.encoder.layers.0."
    assert (p + "self_attention.query_key_value.bias" in sd) == (c["add_qkv_bias"] or c["add_bias_linear"])
    for lin in ("self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
        assert (p + lin + ".bias" in sd) == c["add_bias_linear"], lin
    assert (p + "input_layernorm.bias" in sd) == (not c["rmsnorm"])
    assert ("transformer.encoder.final_layernorm.weight" in sd) == c["post_layer_norm"]
    H, D, E = c["num_attention_heads"], c["kv_channels"], c["hidden_size"]
    G = c["multi_query_group_num"] if c["multi_query_attention"] else H
    assert sd[p + "self_attention.query_key_value.weight"].shape == ((H + 2 * G) * D, E)
    assert sd[p + "mlp.dense_h_to_4h.weight"].shape == (2 * c["ffn_hidden_size"], E)


@pytest.mark.parametrize("name", FIXTURES)
def test_stored_inv_freq_ignores_rope_ratio(name):
    c, sd, _ = _load(name)
    inv = sd["transformer.rotary_pos_emb.inv_freq"]
    half = c["kv_channels"] // 2
    want = 10000.0 ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[c["torch_dtype"]]
    assert inv.dtype == dtype
    assert torch.allclose(inv.double(), want, rtol=1e-2, atol=0), (inv.tolist(), want.tolist())
    with safe_open(ROOT / name / "logits.safetensors", "pt") as f:
        assert f.metadata()["remote_code"] in name


@pytest.mark.parametrize("release", RELEASES)
def test_released_configs_carry_the_keys_the_remote_code_reads(release):
    c = json.loads((ROOT / "released_configs" / f"{release}.json").read_text())
    need = {"padded_vocab_size", "num_layers", "hidden_size", "ffn_hidden_size", "kv_channels",
            "num_attention_heads", "seq_length", "layernorm_epsilon", "rmsnorm", "post_layer_norm",
            "add_bias_linear", "add_qkv_bias", "multi_query_attention", "multi_query_group_num",
            "apply_residual_connection_post_layernorm"}
    assert c["model_type"] == "chatglm" and c["architectures"] == ["ChatGLMModel"]
    assert not need - c.keys(), sorted(need - c.keys())
    assert "vocab_size" not in c  # the reader must take padded_vocab_size
    assert ("rope_ratio" in c) == release.startswith("glm-4")
