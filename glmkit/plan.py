"""Memory planning: what this process may still allocate, and whether a KV cache fits in it.

    free = available_bytes(torch.device("cpu"))     # MemAvailable, capped by the cgroup's limit
    check_kv_fits(cfg, batch=8, max_len=4096, dtype=torch.bfloat16, device=dev)   # or MemoryError

The serving engine allocates its whole KV cache up front (n_layers x batch x kv_heads x max_len x
head_dim, keys and values). At a real model's full context that is tens of GiB, and an allocator
failure (or the kernel's OOM killer, on Linux) tells a user nothing. So the size is computed and
compared with what the process may really use before anything is allocated, and a refusal names the
settings that would fit.

On CPU "available" is the smaller of the kernel's MemAvailable and the room left under the cgroup
memory limit (containers: cgroup v2 `memory.max` - `memory.current`, or v1's `limit_in_bytes` -
`usage_in_bytes`). On CUDA it is `torch.cuda.mem_get_info`'s free memory. Other devices are not
measured (None: no check).
"""

from __future__ import annotations

from pathlib import Path

import torch

GiB = 1 << 30
HEADROOM = 0.9  # of the available memory, the most the KV cache may take (activations, workspace, allocator slack)


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit, or None when there is no limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:  # v1 writes a huge number for "unlimited"
            return max(0, limit - usage)
    return None


def available_bytes(device: torch.device) -> int | None:
    """Bytes this process can still allocate on `device`, or None where that is not measured."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    room = _cgroup_room()
    if avail is None or room is None:
        return avail if room is None else room
    return min(avail, room)


def kv_cache_bytes(cfg, batch: int, max_len: int, dtype: torch.dtype) -> int:
    """Keys and values of every layer for `batch` rows of `max_len` positions."""
    per_position = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()
    return per_position * batch * max_len


def check_kv_fits(cfg, batch: int, max_len: int, dtype: torch.dtype, device, available: int | None = None) -> None:
    """Raise MemoryError, before anything is allocated, when the KV cache cannot fit; the message names
    the --max-len (at this --max-batch) and the --max-batch (at this --max-len) that would."""
    if batch < 1 or max_len < 1:
        raise ValueError(f"max_batch={batch}, max_len={max_len}: both must be >= 1")
    need = kv_cache_bytes(cfg, batch, max_len, dtype)
    avail = available_bytes(device) if available is None else available
    if avail is None or need <= avail * HEADROOM:
        return
    budget = avail * HEADROOM
    per_row_position = kv_cache_bytes(cfg, 1, 1, dtype)
    fit_len = int(budget // (per_row_position * batch))
    fit_batch = int(budget // (per_row_position * max_len))
    hints = []
    if fit_len >= 1:
        hints.append(f"--max-len {fit_len} (at --max-batch {batch})")
    if fit_batch >= 1:
        hints.append(f"--max-batch {fit_batch} (at --max-len {max_len})")
    fix = " or ".join(hints) if hints else "a smaller --max-len and --max-batch, or a machine with more memory"
    raise MemoryError(f"the KV cache for {batch} rows x {max_len} positions needs {need / GiB:.1f} GiB "
                      f"({dtype}); this process can use {avail / GiB:.1f} GiB more on {torch.device(device)}. "
                      f"Try {fix}.")
