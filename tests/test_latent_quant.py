"""Latent attention's low-rank projections quantized (quant["latent"]: q_a, q_b, kv_a; quantize.LATENT_TARGETS).

A tiny Glm4MoeLite built here: quantizing it sets "latent" and swaps q_a and kv_a for int4 linears (q_b,
whose 96 inputs are no whole number of 64-column groups, and kv_b stay float); its logits equal the float model's of
the dequantized weights;
a checkpoint written without "latent" (the layout before it) loads with quantize="int4" by quantizing just
those projections as they are read, giving bit for bit the model quantized from float in one go; a
different group size is refused; and the memory plan counts what the model holds.
"""

import json
from dataclasses import replace

import pytest
import torch

import glmkit
from glmkit import kernels
from glmkit.convert import read_checkpoint, write_checkpoint
from glmkit.model import GLM
from glmkit.plan import weight_bytes
from glmkit.quantize import LATENT_TARGETS, Int4Linear, quantize_model
from tests.helpers import assert_close, assert_equal

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = transformers.Glm4MoeLiteConfig(
        hidden_size=128, intermediate_size=192, moe_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=64, q_lora_rank=96,
        qk_rope_head_dim=16, qk_nope_head_dim=48, v_head_dim=32, vocab_size=512, mlp_layer_types=["dense", "sparse", "sparse"])
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("lite") / "hf"
    transformers.Glm4MoeLiteForCausalLM(cfg).eval().save_pretrained(d)
    return d


def dequantized(model: GLM) -> GLM:
    """A float copy of a quantized GLM: every int4 linear replaced by nn.Linear of its dequantized weight."""
    float_model = GLM(replace(model.cfg, quant=None))
    sd = {n: t for n, t in model.state_dict().items() if not n.endswith((".scales", ".mins"))}
    sd.update({name + ".weight": mod.dequantize(torch.float32) for name, mod in model.named_modules()
               if isinstance(mod, Int4Linear)})
    float_model.load_state_dict(sd, strict=True)
    return float_model.eval()


@torch.no_grad()
def test_latent_projections_quantized_equal_their_dequantized_model(hf_dir, monkeypatch):
    """Every int4 product through dequantized fp32 tiles (no few-row native kernel, which rounds activations):
    equal to the float model of the dequantized weights up to summation order."""
    monkeypatch.setattr(kernels, "MAX_ROWS", 0)
    q = glmkit.load(str(hf_dir), quantize="int4").eval()
    assert q.cfg.quant["latent"] is True
    attn = q.layers[1].attn
    assert LATENT_TARGETS == ("attn.q_a", "attn.q_b", "attn.kv_a")
    assert type(attn.q_a) is Int4Linear and type(attn.kv_a) is Int4Linear
    assert type(attn.q_b) is not Int4Linear, "q_b's 96 inputs are no whole number of 64-column groups: it stays float"
    assert attn.kv_b.weight.is_floating_point(), "kv_b stays float (the absorbed form reads it per head)"
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(1))
    want = dequantized(q)(ids)
    mx = assert_close(q(ids), want, 1e-4, "int4 (latent projections too) vs its dequantized float model")
    ref = read_checkpoint(hf_dir).eval()
    print(f"\nint4 with latent projections vs dequantized: max abs diff {mx:.2e}; vs the float model "
          f"{(q(ids) - ref(ids)).abs().max().item():.3f} of max |logit| {want.abs().max().item():.3f}")


@torch.no_grad()
def test_checkpoint_without_latent_loads_upgraded_bit_for_bit(hf_dir, tmp_path):
    old = quantize_model(read_checkpoint(hf_dir).eval(), 4, 64, latent=False)
    assert type(old.layers[1].attn.q_a) is not Int4Linear
    write_checkpoint(old, tmp_path / "old", fmt="glmkit")
    assert json.loads((tmp_path / "old" / "config.json").read_text())["quant"]["latent"] is False
    upgraded = glmkit.load(str(tmp_path / "old"), quantize="int4").eval()
    direct = glmkit.load(str(hf_dir), quantize="int4").eval()
    assert upgraded.cfg.quant == direct.cfg.quant
    a, b = upgraded.state_dict(), direct.state_dict()
    assert a.keys() == b.keys()
    for n in a:
        assert_equal(a[n], b[n], n)
    with pytest.raises(ValueError, match="already quantized"):
        glmkit.load(str(tmp_path / "old"), quantize="int4", group_size=32)
    as_stored = glmkit.load(str(tmp_path / "old"))
    assert type(as_stored.layers[1].attn.q_a) is not Int4Linear and not as_stored.cfg.quant.get("latent")


def test_plan_counts_the_quantized_latent_projections(hf_dir):
    q = glmkit.load(str(hf_dir), quantize="int4")
    held = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    planned = sum(weight_bytes(q.cfg, torch.float32).values())
    print(f"\nplanned {planned} bytes, held {held}")
    assert planned == held
