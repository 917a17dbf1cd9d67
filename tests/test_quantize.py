"""Weight-only quantization: kernels vs dequantized references, model logits vs float, round trips."""

import pytest
import torch
import torch.nn.functional as F

import glmkit
from glmkit import kernels
from glmkit.convert import write_checkpoint
from glmkit.generate import SamplingParams, generate
from glmkit.quantize import Int4Linear, Int8Linear, quantize_int4, quantize_int8, quantize_model, unpack_int4
from tests.helpers import assert_close, assert_equal, int4_act_bound, int16_act_bound


@pytest.fixture(params=["native", "tiled", "pytorch"])
def path(request, monkeypatch):
    """Each quantized linear through glmkit's native decode kernel, through dequantized tiles and the
    GEMM (every row count, as prefill), and through PyTorch's kernels (as without the native library)."""
    if request.param in ("native", "tiled") and not kernels.available():
        pytest.skip(f"native kernels unavailable: {kernels.why_unavailable()}")
    if request.param != "native":
        monkeypatch.setattr(kernels, "MAX_ROWS", 0)
    if request.param == "pytorch":
        monkeypatch.setattr(kernels, "_lib", None)
        monkeypatch.setattr(kernels, "_why", "switched off by the test")
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
    assert back.cfg.quant == {"bits": bits, "group_size": 32 if bits == 4 else None, "head": True,
                              "latent": True}
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


# ---- many rows: dequantized tiles through the GEMM --------------------------------------------------------
needs_native = pytest.mark.skipif(not kernels.available(), reason=f"native kernels unavailable: {kernels.why_unavailable()}")


@pytest.fixture(params=["bf16-gemm", "fp32-gemm"])
def gemm(request, monkeypatch):
    """bf16 activations multiplied in a bf16 GEMM (CPUs with bf16 instructions) and in an fp32 one (others)."""
    monkeypatch.setattr(kernels, "_BF16_EMULATED", request.param == "fp32-gemm")
    return request.param


def int8_layer(N, K, bias, dtype):
    torch.manual_seed(N * K)
    lin = Int8Linear(K, N, bias)
    q, s = quantize_int8(torch.randn(N, K))
    lin.weight.copy_(q), lin.scales.copy_(s)
    if bias:
        lin.bias.data.normal_()
    return lin.to(dtype)


def int4_layer(N, K, group, bias, dtype):
    torch.manual_seed(N * K + group)
    lin = Int4Linear(K, N, bias, group)
    packed, s, m = quantize_int4(torch.randn(N, K), group)
    lin.weight.copy_(packed), lin.scales.copy_(s), lin.mins.copy_(m)
    if bias:
        lin.bias.data.normal_()
    return lin.to(dtype)


def deq_reference(lin) -> torch.Tensor:
    """The layer's weight in fp64 from its stored codes and (possibly bf16) scales."""
    if isinstance(lin, Int8Linear):
        return lin.weight.double() * lin.scales.double()[:, None]
    q = unpack_int4(lin.weight).double().reshape(lin.out_features, -1, lin.group_size)
    return (q * lin.scales.double()[..., None] + lin.mins.double()[..., None]).reshape(lin.out_features, -1)


def tiled(lin, x):
    if isinstance(lin, Int8Linear):
        return kernels.linear_int8_tiled(x, lin.weight, lin.scales, lin.bias)
    return kernels.linear_int4_tiled(x, lin.weight, lin.scales, lin.mins, lin.group_size, lin.bias)


LAYERS = {  # odd shapes: N not a multiple of the tile or of 16, K not a multiple of 8 (int8) or 64 (int4)
    "int8 75x37": lambda bias, dtype: int8_layer(37, 75, bias, dtype),
    "int8 256x300": lambda bias, dtype: int8_layer(300, 256, bias, dtype),
    "int4 g32 96x37": lambda bias, dtype: int4_layer(37, 96, 32, bias, dtype),
    "int4 g64 256x300": lambda bias, dtype: int4_layer(300, 256, 64, bias, dtype),
    "int4 g128 384x48": lambda bias, dtype: int4_layer(48, 384, 128, bias, dtype),
}


@needs_native
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_tiles_equal_reference_weights(layer, dtype, gemm, monkeypatch):
    """x = I gives the weight itself: every tile (several, the last one short) holds the dequantized
    weight, exact in fp32 up to the one rounding of q * scale + min, and that rounded once in bf16."""
    monkeypatch.setattr(kernels, "TILE_BYTES", 1)  # the smallest tiles: 16 rows
    lin = LAYERS[layer](False, dtype)
    K = lin.in_features
    want = deq_reference(lin).T  # (K, N)
    got = tiled(lin, torch.eye(K, dtype=dtype)).double()
    eps = 2.0**-24 if dtype == torch.float32 else 2.0**-8  # half an ulp, relative
    assert_close(got, want, want.abs().max().item() * 2 * eps, f"{layer} tiles vs fp64 dequantization, {dtype} {gemm}")
    if dtype == torch.float32:  # the model's own fallback dequantization agrees too
        ref = lin.dequantize() if isinstance(lin, Int4Linear) else lin.weight.float() * lin.scales[:, None]
        assert_close(got.float(), ref.T, want.abs().max().item() * 4 * eps, f"{layer} tiles vs dequantize()")


@needs_native
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 17, 300])
def test_tiled_linear_equals_dequantized_reference(layer, dtype, bias, rows, gemm, monkeypatch):
    """Many-row products (and a single row, called directly) equal x @ dequant.T + b within the rounding
    of the weight, the products' sum and the output to `dtype`: per output, a few ulps of sum |x| |w|."""
    monkeypatch.setattr(kernels, "TILE_BYTES", 4096)  # several tiles even at these sizes
    lin = LAYERS[layer](bias, dtype)
    torch.manual_seed(rows)
    x = torch.randn(rows, lin.in_features).to(dtype)
    w = deq_reference(lin)
    want = x.double() @ w.T + (lin.bias.double() if bias else 0)
    eps = 2.0**-24 if dtype == torch.float32 else 2.0**-8
    tol = 4 * eps * ((x.double().abs() @ w.abs().T).max().item() + (lin.bias.abs().max().item() if bias else 0))
    got = tiled(lin, x)
    assert got.dtype == dtype and got.shape == want.shape
    assert_close(got.double(), want, tol, f"{layer} tiled, {rows} rows, {dtype} {gemm}, bias {bias}")
    if rows > kernels.MAX_ROWS:  # the module takes this path for prefill-sized inputs, any leading shape
        with torch.no_grad():
            y = lin(x.reshape(1, rows, -1))
        assert_equal(y.reshape(rows, -1), got, f"{layer} module forward vs linear_*_tiled")


@needs_native
def test_modules_and_plan_decide_tiles_by_one_rule(monkeypatch):
    """kernels.uses_tiles decides both whether a quantized module's many-row product goes through the
    dequantized tiles and whether the memory plan counts the layout PyTorch's int4 kernel keeps instead:
    with the rule saying no, the modules take PyTorch's kernels (int4 builds its layout) and the plan counts it."""
    from glmkit.config import get_preset
    from glmkit.plan import kernel_copies_bytes

    cfg, quant = get_preset("debug"), {"bits": 4, "group_size": 32, "head": True}
    x = torch.randn(kernels.MAX_ROWS + 8, 128)
    for tiles in (True, False):
        if not tiles:
            asked = []
            monkeypatch.setattr(kernels, "uses_tiles", lambda bits, group, x=None: asked.append((bits, group)) or False)
        lin4, lin8 = int4_layer(48, 128, 32, False, torch.float32), int8_layer(48, 128, False, torch.float32)
        with torch.no_grad():
            lin4(x), lin8(x)
        assert (lin4._packed is None) == tiles, f"tiles {tiles}: int4 module built PyTorch's layout: {lin4._packed is not None}"
        layout = kernel_copies_bytes(cfg, torch.bfloat16, quant)["int4 prefill layout"]
        assert (layout == 0) == tiles, f"tiles {tiles}: the plan counts {layout} bytes of int4 layout"
    assert {(4, 32), (8, None)} <= set(asked), asked


@needs_native
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_prefill_tiled_equals_pytorch_kernels_and_keeps_gradients(bits, monkeypatch):
    """A quantized model's prefill through tiles matches it through PyTorch's weight-only kernels (the
    path without the native library); activations that need a gradient take the differentiable path."""
    torch.manual_seed(0)
    model = quantize_model(glmkit.load("debug").eval(), bits, group_size=32)
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        got = model(ids)
        monkeypatch.setattr(kernels, "_lib", None)
        monkeypatch.setattr(kernels, "_why", "switched off by the test")
        ref = model(ids)
    monkeypatch.undo()
    assert_close(got, ref, 1e-3 * ref.abs().max().item(), f"int{bits} prefill: tiles vs PyTorch's kernels")
    lin = model.layers[0].mlp.down
    x = torch.randn(kernels.MAX_ROWS + 4, lin.in_features, requires_grad=True)
    lin(x).sum().backward()
    want = deq_reference(lin).sum(0).float().expand_as(x)  # d(sum x @ W.T)/dx = column sums of W
    assert_close(x.grad, want, 1e-4 * want.abs().max().item(), f"int{bits} gradient through the quantized linear")


def test_int8_weights_at_any_alignment(path):
    """A memory-mapped checkpoint puts each int8 weight at whatever offset the file gives it (safetensors aligns
    to 8 bytes only): every path of Int8Linear must take such a weight, for one row and for many."""
    N, K = 512, 4096
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    lin = Int8Linear(K, N, bias=True).requires_grad_(False)
    lin.scales.uniform_(0.001, 0.01)
    lin.bias.normal_()
    buf = torch.empty(w.numel() + 64, dtype=torch.int8)
    for off in (0, 8, 24):
        lin.weight = buf[off : off + w.numel()].view(N, K)
        lin.weight.copy_(w)
        for M in (1, 16, 64):
            x = torch.randn(M, K, dtype=torch.bfloat16)
            ref = F.linear(x.float(), w.float() * lin.scales[:, None], lin.bias)
            got = lin(x).float()
            err = float((got - ref).abs().max() / ref.abs().max())
            assert err < 2e-2, (off, M, err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_kernel_reads_scales_and_mins_as_stored(dtype):
    """The int4 kernels read the module's scales and mins where they are (no per-module copy: at 30B
    parameters every expert's copy was gigabytes), so an in-place write to the scales (load_state_dict's
    copy_) shows in the next call, and the result matches the dequantized weight."""
    if not kernels.available():
        pytest.skip(f"native kernels unavailable: {kernels.why_unavailable()}")
    torch.manual_seed(0)
    lin = Int4Linear(128, 32, False, 64, dtype=dtype)
    q, s, m = quantize_int4(torch.randn(32, 128), 64)
    lin.weight.copy_(q), lin.scales.copy_(s), lin.mins.copy_(m)
    sc, mn, code = kernels.int4_scales(lin.scales, lin.mins)
    assert (sc.data_ptr(), mn.data_ptr(), code) == (lin.scales.data_ptr(), lin.mins.data_ptr(), int(dtype == torch.bfloat16))
    x = torch.randn(2, 128)
    with torch.no_grad():
        y = lin(x)
        lin.scales.mul_(2)  # w = q * s + min: doubling s changes the output by the q * s part
        y2 = lin(x)
        want = F.linear(x, lin.dequantize(torch.float32))
    err = float((y2 - want).abs().max() / want.abs().max())
    print(f"\nint4 {dtype} after the scales changed: max rel diff {err:.2e} vs the dequantized weight")
    assert err < 2e-2 and not torch.equal(y2, y), err
