"""Weight-only int8 / int4 quantization: transform the state dict, swap the linears.

    glmkit quantize SRC DST --bits 8            # per-output-channel int8
    glmkit quantize SRC DST --bits 4 --group-size 64
    model = glmkit.load(DST)                    # every command loads quantized checkpoints
    model = glmkit.load(SRC, quantize="int4")   # or quantize as it loads (--quantize int4 on serve, ...)

`glmkit quantize` streams: one tensor at a time is read from the memory-mapped checkpoint (any
layout glmkit reads), quantized in fp32 a block of rows at a time, and written into the output's
shards as they fill (`convert.quantize_checkpoint`), so a model far larger than memory quantizes. Loading
with `quantize=` does the same into a model built on the meta device. Both give bit for bit what
`quantize_model` gives on the model loaded in fp32.

Activations stay in the model's float dtype; only weights are stored as integers. Decode steps
(at most kernels.MAX_ROWS rows) on x86 CPUs run in glmkit's native kernels (`kernels`), which read
this layout as stored: 1 or 0.5 bytes per weight instead of 2 or 4, and decoding is bound by memory
bandwidth, so fewer bytes is faster. Larger CPU inputs (prefill, large batches) are compute-bound:
there the weight is dequantized a tile of output rows at a time into the dtype of the machine's
fastest GEMM (bf16 where the CPU has bf16 instructions, else fp32) and multiplied tile by tile.
Without the native library, CPU matmuls run in PyTorch's weight-only kernels
(`torch._weight_int8pack_mm`, `torch._weight_int4pack_mm_for_cpu`). Elsewhere (or when a kernel
rejects a shape) the weight is dequantized whole on the fly: correct everywhere.

Checkpoint layout (device independent): for each quantized linear `X`,
    int8: X.weight int8 (N, K), X.scales (N,) float      w = q * scale
    int4: X.weight uint8 (N, K/2), two 4-bit values per byte (low nibble = even column),
          X.scales (N, K/g), X.mins (N, K/g) float       w = q * scale + min, q in 0..15
and config.json carries `quant: {"bits", "group_size", "head"}`. The CPU kernel's packed int4
layout is built at load time, so the file does not depend on a kernel version.

A tied model gets a quantized copy of its embedding as the output head (`head`): the head is a
third to a half of a small model's decode bandwidth, the embedding lookup stays in float.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .layers import ROUTER_FP32

TARGETS = ("attn.qkv", "attn.out", "mlp.up", "mlp.down")
# latent attention's projections, quantized when the spec says so (quant["latent"]; checkpoints written before it
# was added have them float). kv_b included: the absorbed decode reads its per-head blocks through
# kernels.heads_gemv_int4 (LatentAttention._kv_b_heads), prefill through the quantized linear.
LATENT_TARGETS = ("attn.q_a", "attn.q_b", "attn.kv_a", "attn.kv_b")
# an MoE layer's experts and shared expert: mlp.experts.E.up, mlp.shared.down, ...
_MOE_TARGET = re.compile(r"(^|\.)mlp\.(experts\.\d+|shared)\.(up|down)$")


def is_target(name: str) -> bool:
    """Whether the linear named `name` (a module path in a GLM) is quantized: attention and MLP products,
    every expert's included. The router (mlp.gate) stays float: it decides which weights are read."""
    return name.endswith(TARGETS) or _MOE_TARGET.search(name) is not None


def latent_target(name: str, in_features: int, quant: dict) -> bool:
    """Whether the linear `name` with `in_features` inputs is one of latent attention's projections that `quant`
    quantizes: with quant["latent"], those of LATENT_TARGETS whose input width the int4 groups divide (the rest
    stay float: a tiny model's odd widths)."""
    if not quant.get("latent") or not name.endswith(LATENT_TARGETS):
        return False
    return quant["bits"] == 8 or in_features % quant["group_size"] == 0


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q int8 (N, K), scales (N,))."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4: (q uint8 (N, K/2) packed, scales (N, K/g), mins (N, K/g))."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the input width {K}")
    wg = w.float().reshape(N, K // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-10)
    q = torch.round((wg - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8).reshape(N, K)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scales, lo


def quantized_tensors(module: str, w: torch.Tensor, quant: dict, dtype: torch.dtype | None):
    """(name, tensor) pairs of `module`'s weight `w` quantized as `quant` says ({"bits", "group_size"}),
    floats (scales, mins) in `dtype`: what a streaming reader yields in place of the float weight.
    A ValueError names the module."""
    try:
        parts = quantize_weight(w, quant["bits"], quant["group_size"])
    except ValueError as e:
        raise ValueError(f"{module}: {e}") from None
    for k, v in parts.items():
        yield f"{module}.{k}", v.to(dtype) if v.is_floating_point() else v


ROW_BLOCK_BYTES = 16 << 20  # fp32 bytes of weight rows quantized at once by quantize_weight


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None) -> dict[str, torch.Tensor]:
    """{"weight", "scales"[, "mins"]} of quantize_int8 / quantize_int4 on `w`, computed ROW_BLOCK_BYTES
    of fp32 rows at a time. Every quantity is per row (int8) or per row group (int4), so this is bit
    for bit the whole-tensor result, and a large weight (a 150K-row head) never has an fp32 copy."""
    N, K = w.shape
    if bits == 4 and K % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the input width {K}")
    step = max(1, ROW_BLOCK_BYTES // (4 * K))
    out = None
    for i in range(0, N, step):
        parts = quantize_int8(w[i:i + step]) if bits == 8 else quantize_int4(w[i:i + step], group_size)
        if out is None:
            out = [torch.empty(N, *p.shape[1:], dtype=p.dtype) for p in parts]
        for o, p in zip(out, parts):
            o[i:i + step] = p
    return dict(zip(("weight", "scales", "mins"), out))


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)  # (N, K) uint8


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.usable(x):  # decode: glmkit's native kernel (csrc/gemv.cpp)
            return kernels.linear(x, self.weight, self.bias, self.scales)
        if kernels.uses_tiles(8, None, x):  # prefill, large batches: dequantized tiles through the GEMM
            return kernels.linear_int8_tiled(x, self.weight.contiguous(), self.scales, self.bias)
        shape = x.shape
        # PyTorch's int8 kernel reads the weight with aligned vector loads: a memory-mapped weight (safetensors
        # aligns to 8 bytes) would crash it
        if _weight_only_kernel(x) and self.weight.data_ptr() % 64 == 0:
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.weight, self.scales.to(x.dtype))
            y = y.reshape(*shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None])
        return y + self.bias.to(y.dtype) if self.bias is not None else y


class Int4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, device=None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        G = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, G, dtype=dtype, device=device))
        self.register_buffer("mins", torch.zeros(out_features, G, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._packed = None  # PyTorch's CPU kernel's layout, built on first use (not saved)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        q = unpack_int4(self.weight).to(dtype).reshape(self.out_features, -1, self.group_size)
        w = q * self.scales.to(dtype)[..., None] + self.mins.to(dtype)[..., None]
        return w.reshape(self.out_features, self.in_features)

    def _kernel_args(self, dtype):
        if self._packed is None or self._packed[0].device != self.weight.device:
            q = unpack_int4(self.weight).to(torch.int32)
            packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
            # the kernel computes (q - 8) * scale + zero: zero = min + 8 * scale
            sz = torch.stack((self.scales.float(), (self.mins + 8 * self.scales).float()), -1)  # (N, G, 2)
            self._packed = (packed, sz.transpose(0, 1).contiguous())  # (G, N, 2)
        return self._packed[0], self._packed[1].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.usable(x) and kernels.int4_supported(self.in_features, self.group_size):
            # decode: glmkit's native kernel reads this layout (weight, scales, mins) as stored: no copy
            return kernels.linear_int4(x, self.weight, self.scales, self.mins, self.group_size, self.bias)
        if kernels.uses_tiles(4, self.group_size, x):  # prefill, large batches: tiles through the GEMM
            return kernels.linear_int4_tiled(x, self.weight.contiguous(), self.scales, self.mins, self.group_size, self.bias)
        shape = x.shape
        # the CPU kernel packs output rows in blocks of 16
        if _weight_only_kernel(x) and self.out_features % 16 == 0:
            packed, sz = self._kernel_args(x.dtype)
            y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).contiguous(), packed, self.group_size, sz)
            y = y.reshape(*shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantize(x.dtype))
        return y + self.bias.to(y.dtype) if self.bias is not None else y


def _weight_only_kernel(x: torch.Tensor) -> bool:
    """Whether PyTorch's CPU weight-only kernels take x: they have no derivative, so activations that
    need a gradient (adapters trained on a quantized model) go through the dequantized weight."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and not (
        torch.is_grad_enabled() and x.requires_grad)


def _targets(model: nn.Module, quant: dict):
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and (is_target(name) or latent_target(name, mod.in_features, quant)):
            yield name, mod
    if quant.get("head") and isinstance(getattr(model, "head", None), nn.Linear):
        yield "head", model.head


def _set(model: nn.Module, name: str, new: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _empty_like(lin: nn.Linear, quant: dict, device=None, dtype=torch.float32) -> nn.Module:
    bias = lin.bias is not None
    if quant["bits"] == 8:
        return Int8Linear(lin.in_features, lin.out_features, bias, device, dtype)
    return Int4Linear(lin.in_features, lin.out_features, bias, quant["group_size"], device, dtype)


def swap_for_loading(model: nn.Module, quant: dict) -> nn.Module:
    """Replace the target linears with empty quantized modules (on the model's device, e.g. meta)
    so a quantized state dict can be loaded into them."""
    if quant.get("head") and not hasattr(model, "head"):
        model.head = nn.Linear(model.cfg.dim, model.cfg.vocab_size, bias=False, device=model.embed.weight.device)
    for name, lin in list(_targets(model, quant)):
        _set(model, name, _empty_like(lin, quant, lin.weight.device, torch.float32))
    return model


def quant_spec(bits: int, group_size: int = 64, head: bool = True, latent: bool = True) -> dict:
    """The `quant` entry of a config ({"bits", "group_size", "head", "latent"}), its values checked. `latent`:
    latent attention's q_a, q_b, kv_a quantized too (LATENT_TARGETS; a config without the key has them float)."""
    if bits not in (4, 8):
        raise ValueError(f"--bits {bits}: choose 8 or 4")
    if bits == 4 and group_size not in (32, 64, 128, 256):
        raise ValueError(f"--group-size {group_size}: choose 32, 64, 128 or 256")
    return {"bits": bits, "group_size": group_size if bits == 4 else None, "head": head, "latent": latent}


def cast_floats(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Floating parameters and buffers (scales, mins) to `dtype`; integer weights stay as they are, and so
    does an MoE router (fp32, layers.Router)."""
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    for name, t in tensors:
        if not name.endswith(ROUTER_FP32):
            t.data = t.data.to(dtype)
    return model


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int, group_size: int = 64, head: bool = True, latent: bool = True) -> nn.Module:
    """Quantize a float GLM in place; sets model.cfg.quant so it saves and reloads as quantized."""
    quant = quant_spec(bits, group_size, head, latent)
    if getattr(model.cfg, "quant", None):
        raise ValueError("this model is already quantized; quantize the float checkpoint")
    dtype = model.embed.weight.dtype
    if head and model.cfg.tie_embeddings:  # a quantized copy of the tied embedding as the head
        model.head = nn.Linear(model.cfg.dim, model.cfg.vocab_size, bias=False).to(model.embed.weight)
        model.head.weight.copy_(model.embed.weight)
    for name, lin in list(_targets(model, quant)):
        new = _empty_like(lin, quant, lin.weight.device, dtype)
        if bits == 8:
            q, s = quantize_int8(lin.weight)
            new.weight.copy_(q)
            new.scales.copy_(s)
        else:
            q, s, m = quantize_int4(lin.weight, group_size)
            new.weight.copy_(q)
            new.scales.copy_(s)
            new.mins.copy_(m)
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
        _set(model, name, new)
    model.cfg = replace(model.cfg, quant=quant)
    return model

