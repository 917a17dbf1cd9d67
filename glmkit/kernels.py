"""Native decode kernels: skinny matrix products for a few activation rows (csrc/gemv.cpp).

A decode step multiplies B activation rows (the batch, 1..16) by every weight matrix once, so its
speed is the speed of reading the weights. PyTorch's CPU linear reads them at a fraction of the
memory bandwidth for one row and far below it for 2-16 rows (it takes a GEMM path meant for large
inputs; see bench/decode.py and ../shared/PERF_NOTES.md). csrc/gemv.cpp reads each weight row once
and multiplies it into all rows with AVX2 + FMA, for fp32, bf16, int8 and glmkit's int4 layout
(the quantized ones with integer dot products: int8 weights on activations rounded to int16, 14
bits per row, finer than the bf16 activations quantized models run in; int4 weights on activations
rounded to int8 per group, as llama.cpp's 4-bit formats do; see gemv.cpp).

    from glmkit import kernels
    kernels.available()                 # True on x86-64 with AVX2 once the extension has compiled
    y = kernels.linear(x, weight, bias) # F.linear's contract; falls back to F.linear when not usable

The library is compiled on first use with the system C++ compiler (`$CXX`, else c++ / g++; about a
second, cached under $GLMKIT_CACHE/kernels, default ~/.cache/glmkit/kernels, keyed by the source's
hash) and called through ctypes, which releases the GIL. The cache directory is private (0700); a
cache another user owns or can write to is refused, never loaded from. When the library cannot be
built or loaded (no compiler, no AVX2, not x86, an unsafe cache) every call falls back to PyTorch
with a warning, and `why_unavailable()` says why. `GLMKIT_NATIVE=0` turns it off.
It is used only for inference on CPU (no autograd, not inside torch.compile or export tracing) and
for at most MAX_ROWS rows; larger inputs (prefill, training) go to PyTorch's GEMM, which is faster there.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_ROWS = 16
_lib = None
_why: str | None = None  # why the library is unavailable (None: not tried yet, or available)
_SRCS = [Path(__file__).parent / "csrc" / n for n in ("gemv.cpp", "decode.cpp")]
_HEADERS = [Path(__file__).parent / "csrc" / "simd.h"]  # part of the source hash, not compiled alone
_WTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


# ---- the library cache ------------------------------------------------------------------------------------
# The library's path is predictable (a hash of the public sources), and loading it runs its code in this
# process, so a library is loaded only from a directory that no one else can write to: owned by this user,
# not group- or world-writable (created 0700), and only if the file itself is ours and not writable by
# others. The file is checked through the descriptor it is loaded through (/proc/self/fd), so it cannot be
# swapped between the check and dlopen. Builds write a temporary name in the directory and rename it,
# so a concurrent or killed build never leaves a half-written library under the final name.
class _UnsafeCache(Exception):
    """The cache directory or the library in it could have been written by someone else."""


def _cache_dir() -> Path:
    return Path(os.environ.get("GLMKIT_CACHE") or Path.home() / ".cache" / "glmkit").expanduser() / "kernels"


def _library_name() -> str:
    src = b"".join(p.read_bytes() for p in _SRCS + _HEADERS)
    return f"glmkit-{hashlib.sha256(src).hexdigest()[:16]}.so"


def _check_private(st: os.stat_result, path: Path, what: str) -> None:
    fix = f"remove {path} or set GLMKIT_CACHE to a directory of your own"
    if st.st_uid != os.geteuid():
        raise _UnsafeCache(f"{what} {path} is owned by uid {st.st_uid}, not by you (uid {os.geteuid()}); {fix}")
    if st.st_mode & 0o022:
        raise _UnsafeCache(f"{what} {path} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):o}); "
                           f"run `chmod go-w {path}` after checking what is in it, or {fix}")


def _private_dir() -> Path:
    cache = _cache_dir()
    cache.parent.mkdir(parents=True, exist_ok=True)
    try:
        cache.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.stat(cache)
    if not stat.S_ISDIR(st.st_mode):
        raise _UnsafeCache(f"kernel cache {cache} is not a directory; remove it or set GLMKIT_CACHE")
    _check_private(st, cache, "kernel cache")
    if st.st_mode & 0o077:  # ours and not writable by others, e.g. made 0755 by an older glmkit: close it
        os.chmod(cache, 0o700)
    return cache


def _open_library(so: Path) -> int | None:
    """A descriptor of the cached library after checking it is ours (None: not built yet)."""
    try:
        fd = os.open(so, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:  # ELOOP: a symlink where the library should be
        raise _UnsafeCache(f"kernel library {so} cannot be opened safely ({e.strerror}); remove it") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _UnsafeCache(f"kernel library {so} is not a regular file; remove it")
        _check_private(st, so, "kernel library")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _compile(cache: Path, so: Path) -> None:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise RuntimeError("no C++ compiler on PATH (set CXX)")
    fd, tmp = tempfile.mkstemp(prefix=so.stem + ".", suffix=".tmp", dir=cache)  # unique: concurrent builds
    os.close(fd)
    try:
        cmd = [cxx, "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-o", tmp, *map(str, _SRCS)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-300:]}")
        os.chmod(tmp, 0o755)  # the linker's mode follows the umask: 0775 under umask 002 would be refused
        os.replace(tmp, so)  # atomic: readers see no library or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> tuple[int, Path]:
    """A checked descriptor of the library for this source and its path, compiling it first if it is not cached."""
    cache = _private_dir()
    so = cache / _library_name()
    fd = _open_library(so)
    if fd is None:
        _compile(cache, so)
        fd = _open_library(so)
        if fd is None:
            raise RuntimeError(f"{so} vanished right after it was built")
    return fd, so


def _dlopen(fd: int, so: Path) -> ctypes.CDLL:
    """Load the file that was checked, through its descriptor (by path where there is no /proc). On success
    the descriptor stays open: glibc knows a loaded library by the name it was opened with and matches a
    later dlopen of that name to it, so the number must not come to name another file."""
    try:
        return ctypes.CDLL(f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else str(so))
    except BaseException:
        os.close(fd)
        raise


def _load():
    global _lib, _why
    if _lib is not None or _why is not None:
        return _lib
    if os.environ.get("GLMKIT_NATIVE", "1") == "0":
        _why = "disabled by GLMKIT_NATIVE=0"
    elif not _x86():
        _why = f"not an x86-64 CPU ({platform.machine()})"
    elif torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        _why = f"the CPU lacks AVX2 ({torch.backends.cpu.get_cpu_capability()})"
    else:
        try:
            lib = _dlopen(*_build())
            i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
            lib.glmkit_gemv_dense.argtypes = [ptr, i64, i64, ptr, c_int, ptr, i64, ptr, c_int]
            lib.glmkit_gemv_q8.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, c_int]
            lib.glmkit_gemv_int4.argtypes = [ptr, i64, i64, ptr, ptr, c_int, i64, i64, ptr, c_int]
            lib.glmkit_decode_step.argtypes = [ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, c_int]
            for f in (lib.glmkit_gemv_dense, lib.glmkit_gemv_q8, lib.glmkit_gemv_int4, lib.glmkit_decode_step):
                f.restype = c_int
            _lib = lib
        except _UnsafeCache as e:  # never load it; PyTorch's kernels still work
            _why = f"refused to load from the kernel cache: {e}"
        except Exception as e:  # no compiler, or it failed
            _why = f"the kernel library did not build: {e}"
        if _why is not None:
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
        if bf16_via_fp32(x, w):
            return _Bf16Linear.apply(x, w, bias)
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


def int4_supported(in_features: int, group_size: int) -> bool:
    """Whether the native int4 kernel takes this shape: groups of a multiple of 32 columns that
    divide the input width, which is a multiple of 64 (the kernel reads 64 columns at a time)."""
    return group_size % 32 == 0 and in_features % group_size == 0 and in_features % 64 == 0


def int4_pairs(scales: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The int4 kernel's (N, G, 2) [scale, min] pairs (one stream beside the weights) and their type
    code: bf16 (1) when both are stored in bf16, so nothing is rounded and 4 bytes per group are read
    instead of 8, else fp32 (0)."""
    bf16 = scales.dtype == torch.bfloat16 and mins.dtype == torch.bfloat16
    dtype = torch.bfloat16 if bf16 else torch.float32
    return torch.stack((scales.detach().to(dtype), mins.detach().to(dtype)), -1).contiguous(), int(bf16)


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequant(packed).T + bias for glmkit's int4 layout (see quantize.py): packed uint8
    (N, K/2), scales and mins (N, K/group_size). Native only: the caller checks `usable` and
    `int4_supported` first."""
    N, K = packed.shape[0], packed.shape[1] * 2
    G = K // group_size
    if x.shape[-1] != K or not int4_supported(K, group_size) or scales.numel() != N * G or mins.numel() != N * G:
        raise ValueError(f"linear_int4: x (..., {x.shape[-1]}), packed {tuple(packed.shape)}, group size {group_size}, "
                         f"scales {tuple(scales.shape)}, mins {tuple(mins.shape)} do not fit together")
    if packed.dtype != torch.uint8 or not packed.is_contiguous():
        raise ValueError("linear_int4: packed must be contiguous uint8")
    xr = _rows(x)
    sm, sm_type = int4_pairs(scales, mins)
    y = torch.empty(xr.shape[0], N)
    rc = _lib.glmkit_gemv_int4(xr.data_ptr(), xr.shape[0], K, packed.data_ptr(), sm.data_ptr(), sm_type, group_size,
                               N, y.data_ptr(), torch.get_num_threads())
    _check(rc, "linear_int4")
    return _out(y, x, bias)


# ---- bf16 matrix products on CPUs without bf16 instructions -------------------------------------------------
# Without AVX512-BF16 or AMX, PyTorch's CPU bf16 GEMM converts as it goes and runs far below the fp32
# GEMM on the same machine (on the AVX2 development machine: a 512 x 768 x 3072 product 6.5x slower,
# a weight gradient 12x; see bench/decode.py's prefill and bench/train_throughput.py). A bf16 product
# is exact products of bf16 values summed in fp32, which is what an fp32 GEMM of the widened operands
# computes too (in another summation order), so there it is done that way: bf16 in, bf16 out, the
# same contract as F.linear in bf16 or under bf16 autocast, with bf16 tensors saved for backward.
_BF16_EMULATED: bool | None = None


def cpu_bf16_emulated() -> bool:
    """Whether this CPU lacks bf16 matrix instructions (x86 without AVX512-BF16 / AMX), so that bf16
    products are faster as fp32 ones. GLMKIT_BF16_GEMM=fp32|native overrides the detection."""
    global _BF16_EMULATED
    if _BF16_EMULATED is None:
        env = os.environ.get("GLMKIT_BF16_GEMM", "auto")
        if env in ("fp32", "native"):
            _BF16_EMULATED = env == "fp32"
        elif not _x86():
            _BF16_EMULATED = False  # ARM's bf16 paths are its own; leave them to PyTorch
        else:
            cpu = torch.cpu
            native = [getattr(cpu, f, lambda: True)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
            _BF16_EMULATED = not any(native)
    return _BF16_EMULATED


def bf16_via_fp32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight.T is a CPU bf16 product (bf16 operands, or bf16 autocast) better done in fp32."""
    if x.device.type != "cpu" or weight.device.type != "cpu" or not cpu_bf16_emulated():
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.is_floating_point() and weight.is_floating_point()
    return x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16


class _Bf16Linear(torch.autograd.Function):
    """F.linear for bf16 operands through fp32 products, forward and backward (see above)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.bfloat16)
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = F.linear(x.float(), weight.float(), bias.float() if bias is not None else None)
        return y.to(torch.bfloat16)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        g = gy.float()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (g @ weight.float()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = (g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        return gx, gw, gb


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, enable_gqa: bool) -> torch.Tensor:
    """scaled_dot_product_attention (causal when `mask` is None). CPU bf16 attention runs in fp32 where
    bf16 products are emulated: PyTorch's CPU flash-attention kernel does its blocks through the bf16
    GEMM, and its backward was 46% of a bf16 training step of the 10M bench model (3.5 s of 7.4 s)."""
    if bf16_via_fp32(q, k):  # bf16 operands, or bf16 autocast (which would cast all three to bf16)
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=enable_gqa)
        return y.to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=enable_gqa)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose few-row CPU inference calls use the
    native kernel and whose CPU bf16 products run in fp32 where that is faster (see bf16_via_fp32);
    everything else (fp32 training and prefill, other devices, compile, export) is F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# ---- the fused decode step (csrc/decode.cpp) ---------------------------------------------------------------
# An eager decode step spends as long outside the matrix products as in them (norms, rotary, cache
# writes, attention, residuals: ~25 operator calls per layer, each mostly dispatch), so a few-row
# CPU step of a supported model runs as one native call. Structs mirror decode.cpp's.
class _CLinear(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("group", ctypes.c_int64), ("kind", ctypes.c_int32)]


class _CNorm(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("b", ctypes.c_void_p)]


class _CLayer(ctypes.Structure):
    _fields_ = [("norm1", _CNorm), ("norm2", _CNorm), ("post_attn", _CNorm), ("post_mlp", _CNorm),
                ("qkv", _CLinear), ("out", _CLinear), ("up", _CLinear), ("down", _CLinear)]


class _CModel(ctypes.Structure):
    _fields_ = [("layers", ctypes.POINTER(_CLayer)), ("norm", _CNorm), ("head", _CLinear)]
    _fields_ += [(n, ctypes.c_int64) for n in ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "rotary_dim")]
    _fields_ += [(n, ctypes.c_int32) for n in ("layernorm", "position", "swiglu", "sandwich", "deepnorm")]
    _fields_ += [(n, ctypes.c_float) for n in ("eps", "alpha", "theta")]


class _CCache(ctypes.Structure):
    _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("valid", ctypes.c_void_p),
                ("batch", ctypes.c_int64), ("max_len", ctypes.c_int64), ("bf16", ctypes.c_int32)]


class _Unsupported(Exception):
    pass


class _Plan:
    """The C view of one model: pointers to its weights (read in place) and fp32 copies of the small
    tensors the kernel wants in fp32 (norms, biases, quantization scales). `fresh()` says whether the
    model still is what the plan describes: every module and tensor it read is still in place, with
    the same storage and version (a LoRA wrapper, `.to(dtype)` or an in-place update rebuilds it)."""

    def __init__(self, model):
        from .model import GLM, MLP, Attention, Block, Norm  # model and quantize import this module
        from .quantize import Int4Linear, Int8Linear

        if type(model) is not GLM:  # a subclass may change what a step computes
            raise _Unsupported(f"a {type(model).__name__}, not a GLM")
        self.refs, self.keep = [], []
        cfg = model.cfg

        def tensor(owner, name, fp32=False):
            t = getattr(owner, name)
            if t is None:
                return None
            if t.device.type != "cpu" or not t.is_contiguous():
                raise _Unsupported(f"{name} is not a contiguous CPU tensor")
            store = owner._parameters if name in owner._parameters else owner._buffers
            self.refs.append((store, name, t, t._version, t.data_ptr()))
            if fp32:
                t = t.detach().to(torch.float32).contiguous()
                self.keep.append(t)
            return t.data_ptr()

        def module(owner, name, types):
            m = owner._modules.get(name)
            if type(m) not in types:
                raise _Unsupported(f"{name} is a {type(m).__name__}")
            self.refs.append((owner._modules, name, m, None, None))
            return m

        def lin(owner, name):
            m = module(owner, name, (Linear, nn.Linear, Int8Linear, Int4Linear))
            w = m.weight
            c = _CLinear(n=w.shape[0], k=m.in_features, group=0, bias=tensor(m, "bias", fp32=True))
            if type(m) is Int4Linear:
                if not int4_supported(m.in_features, m.group_size):
                    raise _Unsupported(f"int4 group size {m.group_size} with {m.in_features} inputs")
                tensor(m, "scales"), tensor(m, "mins")  # watched for changes; the kernel reads a pairs copy
                sm, sm_type = int4_pairs(m.scales, m.mins)
                self.keep.append(sm)
                c.kind, c.group, c.scale = 3 + sm_type, m.group_size, sm.data_ptr()
            elif type(m) is Int8Linear:
                c.kind, c.scale = 2, tensor(m, "scales", fp32=True)
            elif w.dtype in (torch.float32, torch.bfloat16):
                c.kind = _WTYPE[w.dtype]
            else:
                raise _Unsupported(f"{name} weight dtype {w.dtype}")
            c.w = tensor(m, "weight")
            return c

        def norm(owner, name):
            m = module(owner, name, (Norm,))
            return _CNorm(tensor(m, "weight", fp32=True), tensor(m, "bias", fp32=True))

        blocks = []
        for i in range(cfg.n_layers):
            blk = module(model.layers, str(i), (Block,))
            attn, mlp = module(blk, "attn", (Attention,)), module(blk, "mlp", (MLP,))
            layer = _CLayer(norm1=norm(blk, "norm1"), norm2=norm(blk, "norm2"), qkv=lin(attn, "qkv"), out=lin(attn, "out"),
                            up=lin(mlp, "up"), down=lin(mlp, "down"))
            if cfg.sandwich_norm:
                layer.post_attn, layer.post_mlp = norm(blk, "post_attn_norm"), norm(blk, "post_mlp_norm")
            blocks.append(layer)
        self.layers = (_CLayer * len(blocks))(*blocks)
        if "head" in model._modules:
            head = lin(model, "head")
        else:  # tied: the embedding table is the head
            emb = module(model, "embed", (nn.Embedding,))
            if emb.weight.dtype not in (torch.float32, torch.bfloat16):
                raise _Unsupported(f"embedding dtype {emb.weight.dtype}")
            head = _CLinear(w=tensor(emb, "weight"), n=emb.weight.shape[0], k=emb.weight.shape[1],
                            kind=_WTYPE[emb.weight.dtype])
        self.model = _CModel(
            layers=self.layers, norm=norm(model, "norm"), head=head, n_layers=cfg.n_layers, dim=cfg.dim,
            n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
            rotary_dim=cfg.rotary_dim if cfg.position in ("rope_2d", "rope_partial") else 0,
            layernorm=cfg.norm == "layernorm", position={"rope_2d": 1, "rope_partial": 2}.get(cfg.position, 0),
            swiglu=cfg.mlp == "swiglu", sandwich=cfg.sandwich_norm, deepnorm=cfg.residual == "deepnorm",
            eps=cfg.norm_eps, alpha=cfg.residual_alpha, theta=cfg.rope_theta,
        )
        self.vocab = head.n

    def fresh(self) -> bool:
        for store, name, obj, version, ptr in self.refs:
            if store.get(name) is not obj or (ptr is not None and (obj._version != version or obj.data_ptr() != ptr)):
                return False
        return True


_plans: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> _Plan, or the reason it has none


def decode_plan(model) -> _Plan | None:
    """The native view of `model` for decode_step, rebuilt if the model changed since it was made, or
    None if the fused step does not support the model (e.g. a LoRA wrapper, a CUDA model). Checking
    costs a few microseconds per layer: a generation loop gets it once and passes it to each step."""
    p = _plans.get(model)
    if p is None or (isinstance(p, _Plan) and not p.fresh()):
        try:
            p = _Plan(model)
        except _Unsupported as e:
            p = str(e)
        _plans[model] = p
    return p if isinstance(p, _Plan) else None


def decode_step(model, token: torch.Tensor, pos: torch.Tensor, block: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                valid: torch.Tensor, idx: torch.Tensor, plan: _Plan | None = None) -> torch.Tensor | None:
    """One decode step of `model` (a glmkit GLM) for rows 0..M-1 of a cache, as one native call.

    token, pos, block, idx: (M,) long: the token each row feeds, its position and block position,
    and the cache slot it writes (also its last visible key). k, v: (L, B, K, S, D) cache tensors,
    written at [:, b, :, idx[b]]; valid (B, S) bool, set at idx. The visible keys of row b are its
    valid keys up to idx[b] (GLM's Part A ends before the first decode slot). Returns the next-token
    logits (M, V) in fp32, or None when the fused step does not apply (the caller then runs the
    eager step, which gives the same results within rounding: this one keeps the residual stream,
    rotary and attention in fp32 even for a bf16 model). `plan`: decode_plan(model), if the caller
    already has it (it must be current: the model not changed since).
    """
    M = token.shape[0]
    if not (0 < M <= MAX_ROWS and token.device.type == "cpu" and k.dtype in (torch.float32, torch.bfloat16)):
        return None
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or _load() is None:
        return None
    if torch.is_grad_enabled() and model.embed.weight.requires_grad:
        return None
    plan = plan or decode_plan(model)
    L, B, K, S, D = k.shape
    cfg = model.cfg
    if plan is None or (L, K, D) != (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim) or v.shape != k.shape or v.dtype != k.dtype:
        return None
    if not (k.is_contiguous() and v.is_contiguous() and valid.is_contiguous() and valid.dtype == torch.bool
            and valid.shape == (B, S) and M <= B):
        return None
    x = model.embed(token)  # (M, C)
    if cfg.position == "learned_2d":
        x = x + model.pos_embed(pos) + model.block_pos_embed(block)
    x = x.to(torch.float32).contiguous()  # a fresh tensor (the lookup copies): the kernel overwrites it
    pos, block, idx = (t.to(torch.long).contiguous() for t in (pos, block, idx))
    logits = torch.empty(M, plan.vocab)
    cache = _CCache(k.data_ptr(), v.data_ptr(), valid.data_ptr(), B, S, int(k.dtype == torch.bfloat16))
    rc = _lib.glmkit_decode_step(ctypes.addressof(plan.model), ctypes.addressof(cache), M, x.data_ptr(), pos.data_ptr(),
                                 block.data_ptr(), idx.data_ptr(), logits.data_ptr(), torch.get_num_threads())
    _check(rc, "decode step")
    return logits
