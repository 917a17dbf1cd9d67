"""One device policy and one dtype policy, resolved once at start-up and printed by the caller.

    dev = resolve_device("auto")      # cuda > mps > xpu > cpu; or cpu|cuda|mps|xpu|npu|mlu|musa
    dt = resolve_dtype("auto", dev)   # bf16 on accelerators that support it, fp32 on CPU

The commands refine "auto" on CPU with the memory plan (`plan.auto_dtype`): a checkpoint stored in 16 bits
stays bf16 when an fp32 copy would take more than 70% of the memory this process may use.

Vendor backends (Ascend npu, Cambricon mlu, Moore Threads musa) arrive as PyTorch plugins that
register their device type on import; asking for one whose plugin is missing is a clear error.
"""

from __future__ import annotations

import importlib

import torch

DEVICES = ("auto", "cpu", "cuda", "mps", "xpu", "npu", "mlu", "musa")
PLUGINS = {"npu": "torch_npu", "mlu": "torch_mlu", "musa": "torch_musa"}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def _available(kind: str) -> bool:
    if kind == "cpu":
        return True
    if kind in PLUGINS:
        try:
            importlib.import_module(PLUGINS[kind])
        except ImportError:
            return False
    backend = getattr(torch, kind, None) if kind != "mps" else getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    kind, _, index = name.partition(":")
    if kind not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if kind == "auto":
        for k in ("cuda", "mps", "xpu"):
            if _available(k):
                return torch.device(k)
        return torch.device("cpu")
    if kind in PLUGINS:
        try:
            importlib.import_module(PLUGINS[kind])
        except ImportError:
            raise ValueError(f"--device {kind} needs the PyTorch plugin {PLUGINS[kind]!r}, which is not installed; "
                             f"install your vendor's {PLUGINS[kind].replace('_', '-')} build matching torch {torch.__version__}") from None
    if not _available(kind):
        raise ValueError(f"--device {kind}: this PyTorch build sees no {kind} device; use --device cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32  # CPU: fp32 unless asked (bf16 halves memory; see bench/ for speed)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto, fp32, bf16 or fp16")
    if DTYPES[name] == torch.float16 and device.type == "cpu":
        raise ValueError("fp16 on CPU runs matmuls ~75x slower than fp32; use --dtype bf16 or fp32")
    return DTYPES[name]


def release_freed_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere). glibc keeps much of
    what was freed resident: quantizing as a checkpoint loads (a block of fp32 rows per tensor: 0.3 GiB after
    GLM-4.7-Flash's latent projections), or a long prefill's activations (0.7 GiB after 2,048 tokens of it),
    would otherwise stay for the model's lifetime. A few milliseconds; called after such work only."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        trim = None
    if trim is not None:
        trim(0)
