"""Native decode kernels: skinny matrix products for a few activation rows (csrc/gemv.cpp).

A decode step multiplies B activation rows (the batch, 1..16) by every weight matrix once, so its
speed is the speed of reading the weights. PyTorch's CPU linear reads them at a fraction of the
memory bandwidth for one row and far below it for 2-16 rows (it takes a GEMM path meant for large
inputs; see bench/decode.py and ../shared/PERF_NOTES.md). csrc/gemv.cpp reads each weight row once
and multiplies it into all rows with AVX2 + FMA, for fp32, bf16, int8 and glmkit's int4 layout
(the quantized ones with integer dot products on int16-quantized activations: 14 bits per row,
finer than the bf16 activations quantized models run in; see gemv.cpp).

    from glmkit import kernels
    kernels.available()                 # True on x86-64 with AVX2 once the extension has compiled
    y = kernels.linear(x, weight, bias) # F.linear's contract; falls back to F.linear when not usable

The library is compiled on first use with the system C++ compiler (`$CXX`, else c++ / g++; about a
second, cached under ~/.cache/glmkit/kernels keyed by the source's hash) and called through ctypes,
which releases the GIL. When it cannot be built (no compiler, no AVX2, not x86) every call falls
back to PyTorch and `why_unavailable()` says why. `GLMKIT_NATIVE=0` turns it off.
It is used only for inference on CPU (no autograd, not inside torch.compile or export tracing) and
for at most MAX_ROWS rows; larger inputs (prefill, training) go to PyTorch's GEMM, which is faster there.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_ROWS = 16
_lib = None
_why: str | None = None  # why the library is unavailable (None: not tried yet, or available)
_SRC = Path(__file__).parent / "csrc" / "gemv.cpp"
_WTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


def _build() -> Path:
    src = _SRC.read_bytes()
    cache = Path(os.environ.get("GLMKIT_CACHE", Path.home() / ".cache" / "glmkit")) / "kernels"
    so = cache / f"gemv-{hashlib.sha256(src).hexdigest()[:16]}.so"
    if so.exists():
        return so
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise RuntimeError("no C++ compiler on PATH (set CXX)")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = so.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cxx, "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-o", str(tmp), str(_SRC)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-300:]}")
    os.replace(tmp, so)  # atomic: a concurrent build or a kill leaves no half-written library
    return so


def _load():
    global _lib, _why
    if _lib is not None or _why is not None:
        return _lib
    if os.environ.get("GLMKIT_NATIVE", "1") == "0":
        _why = "disabled by GLMKIT_NATIVE=0"
    elif platform.machine().lower() not in ("x86_64", "amd64"):
        _why = f"not an x86-64 CPU ({platform.machine()})"
    elif torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        _why = f"the CPU lacks AVX2 ({torch.backends.cpu.get_cpu_capability()})"
    else:
        try:
            lib = ctypes.CDLL(str(_build()))
            i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
            lib.glmkit_gemv_dense.argtypes = [ptr, i64, i64, ptr, c_int, ptr, i64, ptr, c_int]
            lib.glmkit_gemv_q8.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, c_int]
            lib.glmkit_gemv_int4.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, ptr, c_int]
            lib.glmkit_gemv_dense.restype = lib.glmkit_gemv_q8.restype = lib.glmkit_gemv_int4.restype = c_int
            _lib = lib
        except Exception as e:  # no compiler, or it failed: PyTorch's kernels still work
            _why = f"the kernel library did not build: {e}"
            warnings.warn(f"glmkit native decode kernels unavailable ({_why}); using PyTorch's", stacklevel=3)
    return _lib


def available() -> bool:
    return _load() is not None


def why_unavailable() -> str | None:
    _load()
    return _why


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether x (..., K) should go through the native kernel: CPU inference on few rows."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or x.numel() > MAX_ROWS * x.shape[-1]:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    return _load() is not None


def _check(rc: int, what: str):
    if rc != 0:  # the C side rejected arguments the checks above should have caught: never return garbage
        raise RuntimeError(f"glmkit native {what} rejected its arguments (code {rc})")


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()


def _out(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (* scale per output row) + bias, weight fp32 / bf16 / int8 (N, K). Falls back to
    PyTorch when the native kernel is not usable for these inputs."""
    if not (usable(x, weight) and weight.dim() == 2 and weight.is_contiguous() and weight.dtype in _WTYPE):
        w = weight.to(x.dtype) * scale.to(x.dtype)[:, None] if scale is not None else weight
        return F.linear(x, w, bias)
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"linear: x has {x.shape[-1]} features, the weight {K}")
    xr = _rows(x)
    s = scale.to(torch.float32).contiguous() if scale is not None else None
    if s is not None and s.numel() != N:
        raise ValueError(f"linear: {s.numel()} scales for {N} output rows")
    y = torch.empty(xr.shape[0], N)
    if weight.dtype == torch.int8 and s is not None and K < 32768:  # integer dot products (see gemv.cpp)
        rc = _lib.glmkit_gemv_q8(xr.data_ptr(), xr.shape[0], K, weight.data_ptr(), s.data_ptr(), N, y.data_ptr(),
                                 torch.get_num_threads())
    else:
        rc = _lib.glmkit_gemv_dense(xr.data_ptr(), xr.shape[0], K, weight.data_ptr(), _WTYPE[weight.dtype],
                                    s.data_ptr() if s is not None else None, N, y.data_ptr(), torch.get_num_threads())
    _check(rc, "linear")
    return _out(y, x, bias)


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequant(packed).T + bias for glmkit's int4 layout (see quantize.py): packed uint8
    (N, K/2), scales and mins (N, K/group_size). Native only: the caller checks `usable` first."""
    N, K = packed.shape[0], packed.shape[1] * 2
    G = K // group_size
    if x.shape[-1] != K or group_size % 32 or K % group_size or scales.numel() != N * G or mins.numel() != N * G:
        raise ValueError(f"linear_int4: x (..., {x.shape[-1]}), packed {tuple(packed.shape)}, group size {group_size}, "
                         f"scales {tuple(scales.shape)}, mins {tuple(mins.shape)} do not fit together")
    if packed.dtype != torch.uint8 or not packed.is_contiguous():
        raise ValueError("linear_int4: packed must be contiguous uint8")
    xr = _rows(x)
    sc, mn = scales.to(torch.float32).contiguous(), mins.to(torch.float32).contiguous()
    y = torch.empty(xr.shape[0], N)
    rc = _lib.glmkit_gemv_int4(xr.data_ptr(), xr.shape[0], K, packed.data_ptr(), sc.data_ptr(), mn.data_ptr(), group_size,
                               N, y.data_ptr(), torch.get_num_threads())
    _check(rc, "linear_int4")
    return _out(y, x, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose few-row CPU inference calls use the
    native kernel; everything else (training, prefill, other devices, compile, export) is F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if usable(x, self.weight):
            return linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
