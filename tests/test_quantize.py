"""Weight-only quantization: kernels vs dequantized references, model logits vs float, round trips."""

import pytest
import torch

import glmkit
from glmkit import kernels
from glmkit.convert import write_checkpoint
from glmkit.generate import SamplingParams, generate
from glmkit.quantize import Int4Linear, Int8Linear, quantize_int4, quantize_int8, quantize_model, unpack_int4
from tests.helpers import assert_close, int4_act_bound, int16_act_bound


@pytest.fixture(params=["native", "pytorch"])
def path(request, monkeypatch):
    """Each quantized linear through glmkit's native decode kernel and through PyTorch's kernels."""
    if request.param == "native" and not kernels.available():
        pytest.skip(f"native kernels unavailable: {kernels.why_unavailable()}")
    if request.param == "pytorch":
        monkeypatch.setattr(kernels, "MAX_ROWS", 0)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_equals_dequantized_reference(dtype, path):
    torch.manual_seed(0)
    w, b, x = torch.randn(48, 64), torch.randn(48), torch.randn(3, 5, 64)
    q, s = quantize_int8(w)
    assert (q.float() * s[:, None] - w).abs().max() <= s.max() / 2 + 1e-6  # rounding error bound
    lin = Int8Linear(64, 48, True)
    lin.weight.copy_(q), lin.scales.copy_(s), lin.bias.data.copy_(b)
    lin = lin.to(dtype)
    want = x.to(dtype).float() @ (q.float() * s[:, None].to(dtype).float()).T + b.to(dtype).float()
    tol = (1e-4 if dtype == torch.float32 else 0.15) + (int16_act_bound(x, q.float() * s[:, None]) if path == "native" else 0)
    assert_close(lin(x.to(dtype)).float(), want, tol, f"int8 {path} kernel {dtype}")


@pytest.mark.parametrize("group,N", [(32, 48), (64, 48), (32, 40)])  # N=40: no kernel (rows % 16), fallback
def test_int4_kernel_equals_dequantized_reference_and_fallback(group, N, path):
    torch.manual_seed(0)
    w, x = torch.randn(N, 128), torch.randn(7, 128)
    packed, s, m = quantize_int4(w, group)
    q = unpack_int4(packed)
    assert q.max() <= 15 and q.shape == w.shape
    deq = (q.float().reshape(N, -1, group) * s[..., None] + m[..., None]).reshape(N, 128)
    assert (deq - w).abs().max() <= s.max() / 2 + 1e-5
    lin = Int4Linear(128, N, False, group)
    lin.weight.copy_(packed), lin.scales.copy_(s), lin.mins.copy_(m)
    kernel = lin(x)
    tol = 1e-4 + (int4_act_bound(x, q, s, group) if path == "native" else 0)
    assert_close(kernel, x @ deq.T, tol, f"int4 {path} kernel vs dequantized matmul")
    assert_close(torch.nn.functional.linear(x, lin.dequantize()), kernel, tol, f"fallback path vs {path} kernel")


def greedy(model, ids, n):
    for _ in range(n):
        with torch.no_grad():
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.25)])
def test_quantized_model_close_to_float_and_round_trips(tmp_path, bits, tol, repeat3_model):
    torch.manual_seed(0)
    float_model = glmkit.load("debug").eval()
    model = glmkit.load("debug").eval()
    model.load_state_dict(float_model.state_dict())
    quantize_model(model, bits, group_size=32)
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        ref, got = float_model(ids), model(ids)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel < tol, f"int{bits}: max logit error {rel:.4f} of the largest logit > {tol}"
    if bits == 8:  # greedy decoding (prefill, KV cache, the fused int8 step) gives the float model's tokens, known
        rep = repeat3_model()  # here: it repeats the prompt's last three tokens, each position and key counting
        want = greedy(rep, torch.tensor([[4, 8, 15, 16, 23, 5]]), 8)[0, 6:].tolist()
        quantize_model(rep, 8, group_size=32)
        assert generate(rep, [[4, 8, 15, 16, 23, 5]], SamplingParams(max_new_tokens=8, temperature=0))[0].token_ids == want
        assert want == [16, 23, 5] * 2 + [16, 23]
    write_checkpoint(model, tmp_path / "q")
    back = glmkit.load(str(tmp_path / "q"))
    assert back.cfg.quant == {"bits": bits, "group_size": 32 if bits == 4 else None, "head": True}
    assert isinstance(back.layers[0].mlp.down, Int8Linear if bits == 8 else Int4Linear)
    with torch.no_grad():
        assert torch.equal(back(ids), got)
    size = lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values())
    assert size(back) < size(float_model) * (0.6 if bits == 8 else 0.5)


def test_quantize_cli_and_errors(tmp_path):
    from glmkit.cli import main

    write_checkpoint(glmkit.load("debug"), tmp_path / "f")
    assert main(["quantize", str(tmp_path / "f"), str(tmp_path / "q8"), "--bits", "8"]) == 0
    m = glmkit.load(str(tmp_path / "q8"))
    assert m.embed.weight.dtype == torch.bfloat16 and m.layers[0].attn.qkv.weight.dtype == torch.int8
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(m, 8)
    with pytest.raises(ValueError, match="group size 48 does not divide|choose 32, 64, 128"):
        quantize_model(glmkit.load("debug"), 4, group_size=48)
