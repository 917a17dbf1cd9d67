"""An MoE layer's int4 experts in one native call (kernels.moe_int4, csrc/gemv.cpp glmkit_moe_int4).

Checked on a tiny layer of odd widths (3 groups of 64 in, experts of 3 groups, a shared expert twice as wide):
its output against the float layer of the dequantized weights (relative to the output's magnitude: the kernel
rounds activations to int8 steps per group, as the per-linear int4 kernel does, twice per expert) and against the per-expert
native path it replaces (the same products: equal to fp32 summation order), for 1, 3 and 16 rows (16 rows
share experts), bf16 and fp32 scales; the AVX-512 VNNI and AVX2 builds bit for bit; and that layouts it does
not take (groups of 32) fall back to the per-expert path.
"""

from dataclasses import replace

import pytest
import torch

from glmkit import kernels
from glmkit.config import ModelConfig
from glmkit.model import GLM
from glmkit.quantize import cast_floats, quantize_model
from tests.helpers import assert_close, assert_equal

needs_native = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable")

CFG = ModelConfig(vocab_size=61, dim=192, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, position="rope_partial",
                  n_experts=8, n_experts_per_tok=3, n_shared_experts=2, moe_ffn_dim=192, first_dense_layers=1,
                  routed_scaling_factor=1.7)


def layer(group_size=64, dtype=torch.float32, seed=0):
    """(int4 MoE layer, float MoE layer of its dequantized weights)."""
    torch.manual_seed(seed)
    model = GLM(CFG).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    q = cast_floats(quantize_model(model, 4, group_size, head=False), dtype)
    ref = GLM(replace(CFG)).eval()
    sd = {n: t.float() for n, t in q.state_dict().items() if not n.endswith((".scales", ".mins")) and n in ref.state_dict()}
    for name, mod in q.named_modules():
        if hasattr(mod, "dequantize"):
            sd[name + ".weight"] = mod.dequantize(torch.float32)
    ref.load_state_dict(sd, strict=True)
    return q.layers[1].mlp, ref.layers[1].mlp


def per_expert(moe, x, monkeypatch):
    """The layer through its per-expert path (each expert's linears one native call each)."""
    with monkeypatch.context() as m:
        m.setattr(kernels, "moe_int4", lambda *a, **k: None)
        return moe(x)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_one_call_equals_dequantized_layer_and_per_expert_path(dtype, monkeypatch):
    moe, ref = layer(dtype=dtype)
    calls = []
    real = kernels.moe_int4
    monkeypatch.setattr(kernels, "moe_int4", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(1)
    for M in (1, 3, 16):
        x = torch.randn(M, CFG.dim, generator=g).to(dtype)
        calls.clear()
        got = moe(x)
        assert calls and got.dtype == dtype, "the layer did not take the one-call path"
        want = ref(x.float())
        scale = want.abs().max().item()
        # two stages of int8 activation steps (x, then SiLU(gate) * up) against asymmetric int4 codes: a few % of max |y|
        mx = assert_close(got.float(), want, 0.08 * scale, f"M={M} {dtype}: one call vs dequantized float layer")
        old = per_expert(moe, x, monkeypatch)
        tol = 1e-5 * scale if dtype == torch.float32 else 0.03 * scale  # bf16: the per-expert path rounds to bf16 twice
        mx2 = assert_close(got.float(), old.float(), tol, f"M={M} {dtype}: one call vs per-expert native path")
        print(f"\nM={M} {dtype}: vs dequantized {mx:.3e}, vs per-expert {mx2:.3e}, of max |y| {scale:.3f}")


@needs_native
@pytest.mark.skipif(kernels.variant() != "avx512vnni", reason="no AVX-512 VNNI on this CPU: only the AVX2 build runs")
@torch.no_grad()
def test_vnni_and_avx2_builds_agree_bit_for_bit(monkeypatch):
    moe, _ = layer(dtype=torch.bfloat16, seed=2)
    x = torch.randn(5, CFG.dim, generator=torch.Generator().manual_seed(3)).bfloat16()
    out = {}
    for name, lib in {"avx512vnni": kernels._lib, "avx2": kernels._open("avx2")}.items():
        monkeypatch.setattr(kernels, "_lib", lib)
        out[name] = moe(x)
    assert_equal(out["avx512vnni"], out["avx2"], "MoE layer, VNNI vs AVX2 build")


@needs_native
@torch.no_grad()
def test_groups_of_32_take_the_per_expert_path():
    moe, ref = layer(group_size=32)
    x = torch.randn(2, CFG.dim, generator=torch.Generator().manual_seed(4))
    w, ids = moe.gate(x)
    assert kernels.moe_int4(x, moe.experts, w, ids, moe.shared) is None
    want = ref(x)
    assert_close(moe(x), want, 0.08 * want.abs().max().item(), "groups of 32, per-expert path vs dequantized")
