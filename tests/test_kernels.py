"""Native decode kernels (glmkit/kernels.py, csrc/gemv.cpp) against float64 references, and a decoding
model with them against the same model through PyTorch's linear."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from glmkit import kernels
from glmkit.config import get_preset
from glmkit.generate import SamplingParams, generate
from glmkit.model import GLM
from glmkit.quantize import quantize_int4, quantize_int8, quantize_model, unpack_int4

from .helpers import assert_close

X86_AVX2 = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
needs_native = pytest.mark.skipif(not (X86_AVX2 and shutil.which("c++") or shutil.which("g++")),
                                  reason="native kernels need an x86-64 CPU with AVX2 and a C++ compiler")


@needs_native
def test_builds_on_this_machine():
    # CI machines have a compiler and AVX2: the kernels must be there, not silently replaced
    assert kernels.available(), kernels.why_unavailable()


def act_quant_bound(x: torch.Tensor, w: torch.Tensor) -> float:
    """The quantized-weight kernels round each activation row to int16 steps of absmax/8191: an output
    moves by at most half a step times the row's sum of |w|."""
    return (x.abs().amax(-1).max() / 8191 / 2 * w.abs().sum(-1).max()).item()


@needs_native
@pytest.mark.parametrize("wtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("M", [1, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("K", [64, 72])  # 72: the scalar tail after the 16-wide loop
def test_dense_matches_reference(wtype, M, K):
    g = torch.Generator().manual_seed(M * 100 + K)
    N = 37
    w = torch.randn(N, K, generator=g)
    x = torch.randn(M, K, generator=g)
    b = torch.randn(N, generator=g)
    with torch.no_grad():
        tol = 1e-4
        if wtype == "int8":
            q, s = quantize_int8(w)
            y = kernels.linear(x, q, b, s)
            deq = q.double() * s.double()[:, None]
            ref = x.double() @ deq.T + b.double()
            tol += act_quant_bound(x, deq)
        else:
            wd = w.to(torch.bfloat16) if wtype == "bf16" else w
            y = kernels.linear(x, wd, b)
            ref = x.double() @ wd.double().T + b.double()
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert_close(y.double(), ref, atol=tol, what=f"{wtype} M={M} K={K}")


@needs_native
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("M", [1, 4, 7, 16])
def test_int4_matches_reference(group, M):
    g = torch.Generator().manual_seed(group + M)
    N, K = 24, 256
    w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g)
    q, s, m = quantize_int4(w, group)
    deq = (unpack_int4(q).double().reshape(N, -1, group) * s.double()[..., None] + m.double()[..., None]).reshape(N, K)
    with torch.no_grad():
        y = kernels.linear_int4(x, q, s, m, group)
    assert_close(y.double(), x.double() @ deq.T, atol=1e-4 + act_quant_bound(x, deq), what=f"int4 g{group} M={M}")


@needs_native
def test_bf16_input_and_batched_shape():
    w = (torch.randn(48, 32) * 0.1).to(torch.bfloat16)  # outputs ~1: bf16 rounding ~4e-3
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        y = kernels.linear(x, w)
    assert y.shape == (2, 3, 48) and y.dtype == torch.bfloat16
    assert_close(y.float(), F.linear(x.float(), w.float()), atol=1e-2, what="bf16 (2, 3, K)")


def test_used_only_for_few_row_inference():
    w = torch.randn(8, 16, requires_grad=True)
    assert not kernels.usable(torch.randn(1, 16), w), "autograd through a weight that needs grad must use PyTorch"
    with torch.no_grad():
        assert not kernels.usable(torch.randn(kernels.MAX_ROWS + 1, 16), w), "prefill-sized inputs go to PyTorch's GEMM"
        assert not kernels.usable(torch.randn(1, 16, dtype=torch.float16), w)
        assert kernels.usable(torch.randn(2, 16), w) == kernels.available()
    # training through kernels.Linear: gradients exist and equal F.linear's
    lin = kernels.Linear(16, 8)
    x = torch.randn(1, 16)
    lin(x).sum().backward()
    assert_close(lin.weight.grad, x.expand(8, 16), atol=1e-6, what="dL/dW of a sum")


@needs_native
def test_bad_shapes_are_clear_errors():
    with torch.no_grad():
        with pytest.raises(ValueError, match="features"):
            kernels.linear(torch.randn(1, 20), torch.randn(8, 16))
        with pytest.raises(ValueError, match="do not fit"):
            kernels.linear_int4(torch.randn(1, 64), torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 1), torch.zeros(8, 1), 48)


def test_build_failure_falls_back_to_pytorch(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_why", None)
    monkeypatch.setenv("GLMKIT_CACHE", str(tmp_path))  # nothing cached: it must try to compile
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    if X86_AVX2:
        with pytest.warns(UserWarning, match="unavailable"):
            assert not kernels.available()
        assert "did not build" in kernels.why_unavailable()
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    with torch.no_grad():
        assert_close(kernels.linear(x, w), F.linear(x, w), atol=0, what="fallback is F.linear")


@needs_native
@pytest.mark.parametrize("variant", ["fp32", "bf16", "int8", "int4"])
def test_decode_equals_pytorch_linear(variant, monkeypatch):
    """Greedy decoding with the native kernels gives the tokens PyTorch's linear gives, batch 1 and 3."""
    cfg = get_preset("debug")
    torch.manual_seed(0)
    model = GLM(cfg)
    model.init_weights(seed=0)
    model.eval()
    if variant == "bf16":
        model = model.to(torch.bfloat16)
    elif variant != "fp32":
        quantize_model(model, 8 if variant == "int8" else 4, 32)
    prompts = [[5, 9, 13, 2, 7], [3, 4], [11, 12, 13, 14, 15, 16, 17]]
    params = SamplingParams(temperature=0.0, max_new_tokens=12, logprobs=True)
    native = generate(model, prompts, params)
    monkeypatch.setattr(kernels, "MAX_ROWS", 0)  # every call through PyTorch
    reference = generate(model, prompts, params)
    for n, (a, b) in enumerate(zip(native, reference)):
        assert a.token_ids == b.token_ids, f"{variant} prompt {n}: native {a.token_ids} vs PyTorch {b.token_ids}"
        tol = {"fp32": 1e-4, "bf16": 2e-2}.get(variant, 2e-3)  # int8/int4: 14-bit activations (see gemv.cpp)
        assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=tol, what=f"{variant} prompt {n} logprobs")
