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

The library is compiled on first use with the system C++ compiler (`$CXX`, else c++ / g++; a few
seconds, cached under $GLMKIT_CACHE/kernels, default ~/.cache/glmkit/kernels, keyed by the source's
hash and the variant) and called through ctypes, which releases the GIL. There are two variants
(`variant()`): "avx2", and "avx512vnni" on CPUs with AVX-512 F/BW/VL and VNNI, whose integer dot
products take one instruction where AVX2 takes two or three (`GLMKIT_VNNI=0` keeps the AVX2 one);
both give the same bits. The cache directory is private (0700); a cache another user owns or can
write to is refused, never loaded from. When the library cannot be built or loaded (no compiler, no
AVX2, not x86, an unsafe cache) every call falls back to PyTorch with a warning, and
`why_unavailable()` says why. `GLMKIT_NATIVE=0` turns it off.
It is used only for inference on CPU (no autograd, not inside torch.compile or export tracing) and
for at most MAX_ROWS rows; larger inputs (prefill, training) go to PyTorch's GEMM, which is faster there.
Quantized weights reach that GEMM through dequantized tiles (`linear_int8_tiled`, `linear_int4_tiled`).
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
_SRCS = [Path(__file__).parent / "csrc" / n for n in ("gemv.cpp", "decode.cpp", "noise.cpp")]
_HEADERS = [Path(__file__).parent / "csrc" / "simd.h"]  # part of the source hash, not compiled alone
_WTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
_FLAGS = {"avx2": ["-mavx2", "-mfma"],
          "avx512vnni": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]}


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere: the AVX2 variant is chosen there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def variant() -> str:
    """The library variant for this CPU: "avx512vnni" where it has AVX-512 F, BW, VL and VNNI (and
    GLMKIT_VNNI is not 0), else "avx2" (see csrc/gemv.cpp)."""
    if os.environ.get("GLMKIT_VNNI", "1") != "0" and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= _cpu_flags():
        return "avx512vnni"
    return "avx2"


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


def _library_name(var: str | None = None) -> str:
    src = b"".join(p.read_bytes() for p in _SRCS + _HEADERS)
    return f"glmkit-{hashlib.sha256(src).hexdigest()[:16]}-{var or variant()}.so"


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


def _compile(cache: Path, so: Path, var: str) -> None:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise RuntimeError("no C++ compiler on PATH (set CXX)")
    fd, tmp = tempfile.mkstemp(prefix=so.stem + ".", suffix=".tmp", dir=cache)  # unique: concurrent builds
    os.close(fd)
    try:
        cmd = [cxx, "-O3", *_FLAGS[var], "-fopenmp", "-shared", "-fPIC", "-o", tmp, *map(str, _SRCS)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()[-300:]}")
        os.chmod(tmp, 0o755)  # the linker's mode follows the umask: 0775 under umask 002 would be refused
        os.replace(tmp, so)  # atomic: readers see no library or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(var: str | None = None) -> tuple[int, Path]:
    """A checked descriptor of the library for this source and variant (default: this CPU's) and its path,
    compiling it first if it is not cached."""
    var = var or variant()
    cache = _private_dir()
    so = cache / _library_name(var)
    fd = _open_library(so)
    if fd is None:
        _compile(cache, so, var)
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


def _typed(lib: ctypes.CDLL) -> ctypes.CDLL:
    """`lib` with the C ABI's functions typed (csrc/gemv.cpp, csrc/decode.cpp, csrc/noise.cpp); benchmarks type an
    older build's library the same way, which may lack the newer functions (those are left out)."""
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    signatures = {
        "glmkit_gemv_dense": [ptr, i64, i64, ptr, c_int, ptr, i64, ptr, c_int],
        "glmkit_gemv_q8": [ptr, i64, i64, ptr, ptr, i64, ptr, c_int],
        "glmkit_gemv_int4": [ptr, i64, i64, ptr, ptr, ptr, c_int, i64, i64, ptr, c_int],
        "glmkit_gemv_int4_many": [ptr, i64, i64, c_int, i64, i64, ptr, ptr, ptr, ptr, ptr, c_int],
        "glmkit_decode_step": [ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, c_int],
        "glmkit_dequant_q8": [ptr, ptr, i64, i64, ptr, c_int, c_int],
        "glmkit_dequant_int4": [ptr, ptr, ptr, c_int, i64, i64, i64, ptr, c_int, c_int],
        "glmkit_moe_int4": [ptr, i64, i64, i64, c_int, i64, ptr, ptr, ptr, ptr, ptr, c_int],
        "glmkit_heads_gemv": [ptr, i64, i64, ptr, c_int, i64, i64, i64, i64, c_int, ptr, c_int],
        "glmkit_heads_gemv_int4": [ptr, i64, i64, ptr, ptr, ptr, c_int, i64, i64, i64, i64, c_int, ptr, c_int],
        "glmkit_heads_uk_int4": [ptr, i64, i64, ptr, ptr, ptr, c_int, i64, i64, i64, i64, ptr, c_int],
        "glmkit_uniform_noise": [ptr, i64, i64, ptr],
    }
    for name, args in signatures.items():
        if hasattr(lib, name):
            f = getattr(lib, name)
            f.argtypes, f.restype = args, c_int
    return lib


def _open(var: str) -> ctypes.CDLL:
    """The library variant `var`, built if needed, loaded and its functions typed. `_load` keeps the one
    for this CPU; tests and benchmarks open the AVX2 one beside it to compare."""
    lib = _typed(_dlopen(*_build(var)))
    lib.glmkit_gemv_vnni.argtypes, lib.glmkit_gemv_vnni.restype = [], ctypes.c_int
    if lib.glmkit_gemv_vnni() != (var == "avx512vnni"):
        raise RuntimeError(f"the {var} build of the kernels reports the other variant; remove {_cache_dir()}")
    return lib


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
            _lib = _open(variant())
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


def uniform_noise(row_hash: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """The sampler's uniforms (B, V) fp32 for rows whose (key, step) hash is row_hash (B,) int64 (csrc/noise.cpp,
    the same bits as sampling's PyTorch path); None where the native library is not used (not CPU, unavailable)."""
    if row_hash.device.type != "cpu" or _load() is None:
        return None
    rows = row_hash.to(torch.int64).contiguous()
    out = torch.empty(rows.shape[0], vocab, dtype=torch.float32)
    _check(_lib.glmkit_uniform_noise(rows.data_ptr(), rows.shape[0], vocab, out.data_ptr()), "uniform_noise")
    return out


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
    """Whether the native int4 kernel takes this shape: groups of 32 or of a multiple of 64 columns
    that divide the input width, which is a multiple of 64 (the kernel reads 64 columns at a time: two
    whole groups or part of one)."""
    return (group_size == 32 or group_size > 0 and group_size % 64 == 0) and in_features % group_size == 0 \
        and in_features % 64 == 0


def int4_scales(scales: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The int4 kernels' scales and mins (N, G) and their type code: as stored (no copy) when both are
    contiguous and both bf16 (1) or both fp32 (0), else fp32 copies (0). The kernels read the two beside the
    packed weights; a copy of every expert's scales would be gigabytes at 30B parameters."""
    if scales.dtype == mins.dtype and scales.dtype in (torch.bfloat16, torch.float32):
        code = int(scales.dtype == torch.bfloat16)
        return scales.detach().contiguous(), mins.detach().contiguous(), code
    return scales.detach().float().contiguous(), mins.detach().float().contiguous(), 0


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequant(packed).T + bias for glmkit's int4 layout (see quantize.py): packed uint8
    (N, K/2), scales and mins (N, K/group_size), read as stored. Native only: the caller checks
    `usable` and `int4_supported` first."""
    N, K = packed.shape[0], packed.shape[1] * 2
    G = K // group_size
    if x.shape[-1] != K or not int4_supported(K, group_size) or scales.numel() != N * G or mins.numel() != N * G:
        raise ValueError(f"linear_int4: x (..., {x.shape[-1]}), packed {tuple(packed.shape)}, group size {group_size}, "
                         f"scales {tuple(scales.shape)}, mins {tuple(mins.shape)} do not fit together")
    if packed.dtype != torch.uint8 or not packed.is_contiguous():
        raise ValueError("linear_int4: packed must be contiguous uint8")
    if _load() is None:
        raise RuntimeError(f"linear_int4: the native kernels are unavailable ({_why})")
    xr = _rows(x)
    sc, mn, code = int4_scales(scales, mins)
    y = torch.empty(xr.shape[0], N)
    rc = _lib.glmkit_gemv_int4(xr.data_ptr(), xr.shape[0], K, packed.data_ptr(), sc.data_ptr(), mn.data_ptr(), code,
                               group_size, N, y.data_ptr(), torch.get_num_threads())
    _check(rc, "linear_int4")
    return _out(y, x, bias)


def heads_gemv(x: torch.Tensor, w: torch.Tensor, trans: bool) -> torch.Tensor:
    """Per-head products with a per-head weight block w (H, N, K), fp32 / bf16, rows contiguous (a strided view,
    e.g. kv_b's key or value rows): x (M, H, K) -> (M, H, N) = x[:, h] @ w[h].T, or with `trans` x (M, H, N) ->
    (M, H, K) = x[:, h] @ w[h]. fp32 out. Native (csrc/gemv.cpp): the caller checks `usable` first."""
    H, N, K = w.shape
    Kx = N if trans else K
    if x.dim() != 3 or x.shape[1:] != (H, Kx) or w.stride(2) != 1 or w.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"heads_gemv: x {tuple(x.shape)} and w {tuple(w.shape)} {w.dtype} (strides {w.stride()}) do "
                         f"not fit together (x (M, {H}, {Kx}), w with contiguous rows of fp32 / bf16 expected)")
    if _load() is None:
        raise RuntimeError(f"heads_gemv: the native kernels are unavailable ({_why})")
    xr = x.to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], H, K if trans else N)
    rc = _lib.glmkit_heads_gemv(xr.data_ptr(), x.shape[0], H, w.data_ptr(), _WTYPE[w.dtype], N, K, w.stride(1),
                                w.stride(0), int(trans), y.data_ptr(), torch.get_num_threads())
    _check(rc, "heads_gemv")
    return y


def heads_gemv_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                    heads: int, row0: int, rows: int, trans: bool) -> torch.Tensor:
    """heads_gemv with the weight in glmkit's int4 layout (packed (N_all, K/2), scales and mins (N_all, K/g)): head
    h's block is rows [h * N_all / heads + row0, + rows), so kv_b's key (row0 0) or value rows (row0 Dn) of each
    head. The key rows (`trans`, row0 0, K a multiple of 32): heads_uk_int4 on uk_codes (activations rounded to int8
    steps per group and 64 rows, integer dot products). Otherwise, K a multiple of 64: the rows read where they lie;
    the value rows with groups of a multiple of 64 as linear_int4 reads a weight (activations rounded to int8 steps
    per group, integer dot products), the rest in fp32 without rounding the activations. Other K: each row
    dequantized to fp32 once per call."""
    N_all, K = packed.shape[0], packed.shape[1] * 2
    ldh = N_all // heads
    Kx = rows if trans else K
    if (x.dim() != 3 or x.shape[1:] != (heads, Kx) or N_all % heads or row0 + rows > ldh or group_size % 32
            or K % group_size or packed.dtype != torch.uint8 or not packed.is_contiguous()):
        raise ValueError(f"heads_gemv_int4: x {tuple(x.shape)}, packed {tuple(packed.shape)}, {heads} heads, rows "
                         f"[{row0}, {row0 + rows}) per head, group size {group_size} do not fit together")
    if _load() is None:
        raise RuntimeError(f"heads_gemv_int4: the native kernels are unavailable ({_why})")
    if trans and row0 == 0 and K % 32 == 0:  # kv_b's key rows (W_UK): integer products on their regrouped codes
        return heads_uk_int4(x, uk_codes(packed, heads, rows), scales, mins, group_size)
    sc, mn, code = int4_scales(scales, mins)
    xr = x.to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], heads, K if trans else rows)
    rc = _lib.glmkit_heads_gemv_int4(xr.data_ptr(), x.shape[0], heads, packed[row0].data_ptr(), sc[row0].data_ptr(),
                                     mn[row0].data_ptr(), code, group_size, rows, K, ldh, int(trans), y.data_ptr(),
                                     torch.get_num_threads())
    _check(rc, "heads_gemv_int4")
    return y


def heads_uk_codes(packed: torch.Tensor, heads: int, rows: int) -> torch.Tensor:
    """kv_b's key rows (rows [0, rows) of each head's block of packed (N_all, K/2), glmkit's int4 layout) regrouped
    for heads_uk_int4: (H, K/32, Np/4, 64) uint8, Np = rows rounded up to 8, the same bytes as the rows (csrc/gemv.cpp,
    heads_uk_int4: per 32 outputs and 4 rows, lane i holds the 4 rows' codes of outputs i and i + 8, then of i + 16
    and i + 24). Made once per model by fused.py's plan; K a multiple of 32."""
    N_all, K = packed.shape[0], packed.shape[1] * 2
    if packed.dtype != torch.uint8 or packed.dim() != 2 or N_all % heads or rows > N_all // heads or K % 32:
        raise ValueError(f"heads_uk_codes: packed {tuple(packed.shape)} {packed.dtype}, {heads} heads, {rows} key rows "
                         f"each do not fit together (uint8 (N_all, K/2), K a multiple of 32)")
    Np = -(-rows // 8) * 8
    p = packed.reshape(heads, N_all // heads, K // 2)[:, :rows]
    q = torch.zeros(heads, Np, K, dtype=torch.uint8)  # (H, Np, K) the codes, padded rows 0
    q[:, :rows, 0::2], q[:, :rows, 1::2] = p & 0xF, p >> 4
    # k = 32 kb + 16 half + 8 nib + i, n = 4 n4 + j -> byte (kb, n4, half, i, j), nibble nib
    q = q.reshape(heads, Np // 4, 4, K // 32, 2, 2, 8).permute(0, 3, 1, 4, 6, 2, 5)  # (H, kb, n4, half, i, j, nib)
    return (q[..., 0] | q[..., 1] << 4).reshape(heads, K // 32, Np // 4, 64).contiguous()


_uk: dict[int, tuple] = {}  # id(packed) -> ((data_ptr, version, heads, rows), its codes); dropped with the tensor


def uk_codes(packed: torch.Tensor, heads: int, rows: int) -> torch.Tensor:
    """heads_uk_codes(packed, heads, rows), made once per weight and kept while it lives (rebuilt if it is written
    to): the eager LatentAttention (through heads_gemv_int4) and fused.py's plan share the one copy, so the two
    decode paths round alike and a model holds it once."""
    key = (packed.data_ptr(), packed._version, heads, rows)
    hit = _uk.get(id(packed))
    if hit is None or hit[0] != key:
        if hit is None:
            weakref.finalize(packed, _uk.pop, id(packed), None)
        hit = _uk[id(packed)] = (key, heads_uk_codes(packed, heads, rows))
    return hit[1]


def heads_uk_int4(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                  group_size: int) -> torch.Tensor:
    """heads_gemv_int4's `trans` product (kv_b's key rows, x (M, H, N) -> (M, H, K)) through integer dot products:
    codes = heads_uk_codes(packed, H, N), scales and mins kv_b's own (N_all, K/g), read in place. Each group's
    activations x_n * scale_ng rounded to int8 steps of their absmax / 127 per 64 rows (tests.helpers.uk_int4_reference),
    the mins' term in fp32. Native only: the caller checks `usable` first."""
    H, KB, N4 = codes.shape[:3]
    K, N = KB * 32, x.shape[-1]
    N_all, G = scales.shape[0], K // group_size if group_size else 0
    if (x.dim() != 3 or x.shape[1] != H or -(-N // 8) * 2 != N4 or codes.shape[3] != 64 or codes.dtype != torch.uint8
            or not codes.is_contiguous() or group_size % 32 or K % group_size or N_all % H or N > N_all // H
            or scales.shape != (N_all, G) or mins.shape != (N_all, G)):
        raise ValueError(f"heads_uk_int4: x {tuple(x.shape)}, codes {tuple(codes.shape)}, scales {tuple(scales.shape)}, "
                         f"mins {tuple(mins.shape)}, group size {group_size} do not fit together")
    if _load() is None:
        raise RuntimeError(f"heads_uk_int4: the native kernels are unavailable ({_why})")
    sc, mn, code = int4_scales(scales, mins)
    xr = x.to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], H, K)
    rc = _lib.glmkit_heads_uk_int4(xr.data_ptr(), x.shape[0], H, codes.data_ptr(), sc.data_ptr(), mn.data_ptr(), code,
                                   group_size, N, K, N_all // H, y.data_ptr(), torch.get_num_threads())
    _check(rc, "heads_uk_int4")
    return y


# ---- a mixture-of-experts layer's int4 experts in one native call ---------------------------------------------
class _CExpert(ctypes.Structure):  # csrc/gemv.cpp's GlmkitExpert
    _fields_ = [("up", ctypes.c_void_p), ("up_scales", ctypes.c_void_p), ("up_mins", ctypes.c_void_p),
                ("down", ctypes.c_void_p), ("down_scales", ctypes.c_void_p), ("down_mins", ctypes.c_void_p),
                ("f", ctypes.c_int64)]


def _int4_parts(lin, K: int, group_size: int, code: int | None):
    """(packed, scales, mins) of an int4 linear (quantize.Int4Linear) with K inputs that the MoE kernel reads as
    stored, or None: another type, group size, scale dtype or layout."""
    w, sc, mn = getattr(lin, "weight", None), getattr(lin, "scales", None), getattr(lin, "mins", None)
    if (getattr(lin, "group_size", None) != group_size or lin.in_features != K or w is None or w.dtype != torch.uint8
            or getattr(lin, "bias", None) is not None or not (w.is_contiguous() and sc.is_contiguous() and mn.is_contiguous())
            or sc.dtype != mn.dtype or sc.dtype != (torch.bfloat16 if code else torch.float32)):
        return None
    return w, sc, mn


def int4_experts(mlps: list, C: int):
    """(table, group size, scale code): one _CExpert record per MLP of `mlps` (an MoE layer's experts, then its
    shared one) for glmkit_moe_int4, pointing at their int4 weights as stored; None when one of them does not
    suit the kernel (another type or layout, groups not a multiple of 64 dividing C and every width)."""
    e0 = mlps[0]
    gs = getattr(e0.up, "group_size", None)
    if not gs or gs % 64 or C % gs or C % 4 or getattr(e0.up, "scales", None) is None:
        return None
    code = int(e0.up.scales.dtype == torch.bfloat16)
    table = (_CExpert * len(mlps))()
    for i, mlp in enumerate(mlps):
        F2 = mlp.up.out_features
        up, down = _int4_parts(mlp.up, C, gs, code), _int4_parts(mlp.down, F2 // 2, gs, code)
        if up is None or down is None or F2 % 2 or (F2 // 2) % gs or mlp.down.out_features != C \
                or not getattr(mlp, "swiglu", False):
            return None
        table[i] = _CExpert(up[0].data_ptr(), up[1].data_ptr(), up[2].data_ptr(), down[0].data_ptr(), down[1].data_ptr(),
                            down[2].data_ptr(), F2 // 2)
    return table, gs, code


def moe_int4(x: torch.Tensor, experts: list, weights: torch.Tensor, ids: torch.Tensor, shared=None) -> torch.Tensor | None:
    """An MoE layer's experts for the rows x (N, C) in one native call (csrc/gemv.cpp, glmkit_moe_int4): row t gets
    sum_j weights[t, j] * experts[ids[t, j]](x[t]) (+ shared(x[t])), each expert a SwiGLU MLP (`.up` rows
    [gate | up], `.down`) of int4 linears in groups of a multiple of 64. None when these inputs or weights do not
    suit it (the caller runs its own path): too many rows, another layout, no library."""
    if not usable(x) or x.dim() != 2:
        return None
    N, C = x.shape
    pairs: dict[int, list[tuple[int, float]]] = {}  # expert -> its (row, weight) pairs
    for t, (es, ws) in enumerate(zip(ids.tolist(), weights.tolist())):
        for e, wt in zip(es, ws):
            pairs.setdefault(e, []).append((t, wt))
    jobs = [(experts[e], p) for e, p in pairs.items()]
    if shared is not None:
        jobs.append((shared, [(t, 1.0) for t in range(N)]))
    made = int4_experts([mlp for mlp, _ in jobs], C)
    if made is None:
        return None
    table, gs, code = made
    off, rows, wts = [0], [], []
    for _, p in jobs:
        off.append(off[-1] + len(p))
        rows += [t for t, _ in p]
        wts += [wt for _, wt in p]
    xr = x.to(torch.float32).contiguous()
    off_t, rows_t, w_t = torch.tensor(off), torch.tensor(rows, dtype=torch.int64), torch.tensor(wts, dtype=torch.float32)
    out = torch.zeros(N, C)
    rc = _lib.glmkit_moe_int4(xr.data_ptr(), N, C, gs, code, len(jobs), ctypes.addressof(table), off_t.data_ptr(),
                              rows_t.data_ptr(), w_t.data_ptr(), out.data_ptr(), torch.get_num_threads())
    _check(rc, "moe_int4")
    return out


# ---- many-row products with quantized weights ----------------------------------------------------------------
# Past a few rows the weight-only kernels lose to the GEMM: PyTorch's int8 / int4 weight-only CPU kernels run
# at a fraction of its bf16 GEMM (they are built for decode), and glmkit's own decode kernels read the weight
# once per 4 rows. A product with many rows (prefill, large batches) instead dequantizes the weight a tile of
# output rows at a time (csrc/gemv.cpp) into a buffer reused across tiles, in the dtype of the fastest GEMM
# for the activations (gemm_dtype), and multiplies each tile into its columns of the output. The buffer stays
# near TILE_BYTES (a few MiB, in cache) whatever the matrix; the dequantization is one pass over the weight,
# against 2 * rows FLOPs per weight in the GEMM.
TILE_BYTES = 4 << 20


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a CPU product of `dtype` activations runs in: fp32 for bf16 where bf16 is emulated."""
    return torch.float32 if dtype == torch.bfloat16 and cpu_bf16_emulated() else dtype


def dequant_usable(x: torch.Tensor) -> bool:
    """Whether x (..., K) times a quantized weight can go through dequantized tiles: CPU inference with
    fp32 / bf16 activations (the tiles are written in place, so no autograd, compile or export)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    return _load() is not None


def uses_tiles(bits: int, group_size: int | None, x: torch.Tensor | None = None) -> bool:
    """Whether a many-row product with weights quantized to `bits` (int4: in groups of `group_size`) goes
    through the dequantized tiles: the library is loaded and dequantizes that layout (int4: groups of a
    multiple of 32), and, given `x`, that input can (`dequant_usable`). The one rule for the modules
    (quantize.Int8Linear / Int4Linear, with x) and the memory plan (plan.py, without: there the tiles
    mean no extra weight copy, PyTorch's int4 kernel keeps its own layout)."""
    if x is not None and not dequant_usable(x):
        return False
    return available() and (bits == 8 or bits == 4 and group_size is not None and group_size % 32 == 0)


def _tiled(x: torch.Tensor, N: int, dequant, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + bias for a weight W (N, K) that dequant(n0, n1, out) writes rows n0..n1 of into out."""
    K = x.shape[-1]
    dtype = gemm_dtype(x.dtype)
    xr = x.reshape(-1, K).to(dtype).contiguous()  # (M, K)
    y = torch.empty(xr.shape[0], N, dtype=dtype)  # (M, N)
    rows = min(N, max(16, TILE_BYTES // (K * xr.element_size()) // 16 * 16))
    buf = torch.empty(rows, K, dtype=dtype)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        w = buf[: n1 - n0]
        dequant(n0, n1, w)
        torch.mm(xr, w.t(), out=y[:, n0:n1])  # the GEMM writes the column block in place (ldc = N)
    return _out(y, x, bias)


def linear_int8_tiled(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (weight * scale[:, None]).T + bias for int8 weight (N, K), scale (N,), through dequantized
    tiles and the GEMM. The caller checks `uses_tiles` first."""
    N, K = weight.shape
    if x.shape[-1] != K or scale.numel() != N or weight.dtype != torch.int8 or not weight.is_contiguous():
        raise ValueError(f"linear_int8_tiled: x (..., {x.shape[-1]}), weight {tuple(weight.shape)} {weight.dtype}, "
                         f"scale {tuple(scale.shape)} do not fit together (contiguous int8 weight expected)")
    s = scale.detach().to(torch.float32).contiguous()

    def dequant(n0, n1, out):
        _check(_lib.glmkit_dequant_q8(weight[n0].data_ptr(), s[n0].data_ptr(), n1 - n0, K, out.data_ptr(),
                                      int(out.dtype == torch.bfloat16), torch.get_num_threads()), "dequant_q8")
    return _tiled(x, N, dequant, bias)


def linear_int4_tiled(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequant(packed).T + bias for glmkit's int4 layout (as linear_int4), through dequantized tiles
    and the GEMM. The caller checks `uses_tiles` first."""
    N, K = packed.shape[0], packed.shape[1] * 2
    G = K // group_size
    if (x.shape[-1] != K or group_size % 32 or K % group_size or scales.numel() != N * G or mins.numel() != N * G
            or packed.dtype != torch.uint8 or not packed.is_contiguous()):
        raise ValueError(f"linear_int4_tiled: x (..., {x.shape[-1]}), packed {tuple(packed.shape)} {packed.dtype}, group "
                         f"size {group_size}, scales {tuple(scales.shape)}, mins {tuple(mins.shape)} do not fit together")
    sc, mn, code = int4_scales(scales.reshape(N, G), mins.reshape(N, G))

    def dequant(n0, n1, out):
        _check(_lib.glmkit_dequant_int4(packed[n0].data_ptr(), sc[n0].data_ptr(), mn[n0].data_ptr(), code, group_size,
                                        n1 - n0, K, out.data_ptr(), int(out.dtype == torch.bfloat16),
                                        torch.get_num_threads()), "dequant_int4")
    return _tiled(x, N, dequant, bias)


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


def _cpu_autocast_bf16() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def bf16_via_fp32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x @ weight.T is a CPU bf16 product (bf16 operands, or bf16 autocast) better done in fp32."""
    if x.device.type != "cpu" or weight.device.type != "cpu" or not cpu_bf16_emulated():
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    if torch.is_autocast_enabled("cpu"):
        return _cpu_autocast_bf16() and x.is_floating_point() and weight.is_floating_point()
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


def _bf16_cpu_backward(q: torch.Tensor) -> bool:
    """A CPU attention whose backward will run, in bf16 or under bf16 autocast."""
    if q.device.type != "cpu" or not (torch.is_grad_enabled() and q.requires_grad) or torch.compiler.is_compiling():
        return False
    return q.dtype == torch.bfloat16 or _cpu_autocast_bf16()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, enable_gqa: bool,
              scale: float | None = None) -> torch.Tensor:
    """scaled_dot_product_attention (causal when `mask` is None; `scale` None: 1/sqrt(q's width)). CPU bf16 attention runs in fp32 where
    bf16 products are emulated: PyTorch's CPU flash-attention kernel does its blocks through the bf16
    GEMM, and its backward was 46% of a bf16 training step of the 10M bench model (3.5 s of 7.4 s).
    It does so in training on every CPU: even with bf16 instructions (AVX-512 BF16, AMX) that kernel's
    backward is slower in bf16 than in fp32 at head widths like 32 (a GLM-objective window, 8 x 512,
    8 heads: 254 ms against 168 forward and backward on a Sapphire Rapids Xeon), while its forward is
    faster in bf16, so inference keeps bf16 (and no fp32 copy of a long cache)."""
    if bf16_via_fp32(q, k) or _bf16_cpu_backward(q):  # bf16 operands, or bf16 autocast (which would cast all three to bf16)
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=enable_gqa, scale=scale)
        return y.to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=enable_gqa,
                                          scale=scale)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose few-row CPU inference calls use the
    native kernel and whose CPU bf16 products run in fp32 where that is faster (see bf16_via_fp32);
    everything else (fp32 training and prefill, other devices, compile, export) is F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
