"""Memory planning: what a model will take, computed from its config before anything is loaded, against
what this process may really use; refusals name the settings that would fit.

    p = Plan(cfg, torch.bfloat16, rows=8, max_len=4096)      # weights, KV cache, prefill workspace
    print(p.table())                                         # the lines, the total, what is available
    p.check("glmkit serve", SERVE_FLAGS)                     # MemoryError naming flags that fit, or nothing
    dtype, why = auto_dtype(p, stored=torch.bfloat16)          # dtype auto, decided on the plan
    check_kv_fits(cfg, 8, 4096, torch.bfloat16, dev)         # the engine's check of the cache it allocates

What a plan counts, each from the config alone (`ModelConfig` fields; no tensor is made):
- weights, exactly as the model holds them: embeddings, every layer's linears and norms, the final norm,
  the head. Quantized (int8 / int4, the layout `quantize` writes): the four linears of each layer and the
  head hold 1 or 0.5 bytes per weight plus their scales (and int4's mins) in the float dtype; embeddings,
  norms and biases stay float. On CPU, two copies the kernels make are counted with them: the native
  decode step's fp32 / paired copies of the small tensors (`fused.decode_plan`), and for int4 the layout
  PyTorch's many-row int4 kernel wants (`Int4Linear._kernel_args`), built at the first prefill.
- the KV cache, exactly as `GLM.new_cache` allocates it: keys and values of every layer for rows x
  positions, plus the valid flags and `sep`. The serving engine also prefills each prompt into a 1-row
  cache of the prompt's length (`prompt KV`), kept for reuse.
- prefill workspace, an estimate (what one prefill of T tokens over S cached positions holds at its
  peak): the residual stream and its normed copy, the fp32 norm temporaries, then the larger of the
  attention phase (q/k/v and their rotated copies; the mask, as GLM's bool mask (T x S) and the float mask
  SDPA makes of it; the output) and the MLP phase (the up projection's 2F columns, the gate product),
  and the logits (1 or T rows x V, in the model's dtype and an fp32 copy). On CPU attention itself is
  SDPA's fused kernel, with GLM's mask and GQA too (blocks of keys per thread: never the T x S scores;
  checked with the profiler). Off CPU the kernel SDPA picks for a masked GQA call is not measured here, so
  the math path's scores and probabilities (H x T x S fp32 each) are counted: an upper bound. Per-call
  weight copies of the many-row matrix products are added: bf16 on a CPU without bf16 instructions
  multiplies in fp32 (an fp32 copy of the largest weight), int4 builds its kernel layout through an int32
  copy of the largest weight once. Measured peaks of a prefill stay under this estimate (tests).

"Available" on CPU is the smaller of the kernel's MemAvailable and the room left under the cgroup memory
limit (cgroup v2 `memory.max` - `memory.current`, or v1's `limit_in_bytes` - `usage_in_bytes`); on CUDA
`torch.cuda.mem_get_info`'s free memory; other devices are not measured (no check). A plan fits when
its total is at most HEADROOM of that: the rest is for the Python process, the tokenizer, the allocator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

GiB, MiB = 1 << 30, 1 << 20
HEADROOM = 0.9  # of the available memory, the most a plan may take
COMFORT = 0.7  # dtype auto on CPU: fp32 only when its plan takes at most this share of the available memory
CLI_CONTEXT = 4096  # generate / chat / fill plan for this many positions (or the model's context, if less);
# a longer prompt or conversation may take more than planned (the prefill workspace grows with its square)
SERVE_ROWS = 8  # glmkit serve's default --max-batch
MIN_LEN = 256  # the shortest context a suggestion or an automatic --max-len offers
SERVE_FLAGS = ("dtype", "quantize", "max_len", "max_batch", "kv_memory")  # flags a refusal may name
CLI_FLAGS = ("dtype", "quantize")


# ---- what this process may use ---------------------------------------------------------------------------
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


def available_bytes(device) -> int | None:
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


# ---- sizes as people write them ----------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40, "kib": 1 << 10, "mib": MiB, "gib": GiB,
          "tib": 1 << 40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(text: str) -> int:
    """'2GiB', '512MiB', '1.5G' (binary), '4GB' (decimal), '1073741824' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size; write e.g. 2GiB, 512MiB or 4GB")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"{text!r}: a size must be positive")
    return n


def show(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB" if abs(n) >= MiB else f"{n / 1024:.1f} KiB"


def size_flag(n: int) -> str:
    """A size for a flag, rounded down to what it prints: 2GiB, 1536MiB."""
    return f"{n // GiB}GiB" if n >= GiB and n % GiB < MiB else f"{max(1, n // MiB)}MiB"


def quant_spec(name: str | dict | None, group_size: int = 64) -> dict | None:
    """'int8' | 'int4' | None -> the `quant` dict `quantize.quantize_model` sets (head quantized too)."""
    if name is None or isinstance(name, dict):
        return name
    bits = {"int8": 8, "8": 8, "int4": 4, "4": 4, "none": None}.get(str(name).lower(), 0)
    if bits == 0:
        raise ValueError(f"--quantize {name}: choose int8 or int4")
    return None if bits is None else {"bits": bits, "group_size": group_size if bits == 4 else None, "head": True}


def quant_name(quant: dict | None) -> str | None:
    return None if not quant else f"int{quant['bits']}"


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---- weights --------------------------------------------------------------------------------------------------
def _linears(cfg) -> list[tuple[int, int, bool]]:
    """(out N, in K, bias) of each layer's linears: qkv, attention out, MLP up ([gate | up] for SwiGLU), down."""
    C, H, K, D, F = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    return [((H + 2 * K) * D, C, cfg.qkv_bias), (C, H * D, cfg.out_bias),
            (F * (2 if cfg.mlp == "swiglu" else 1), C, cfg.mlp_bias), (C, F, cfg.mlp_bias)]


def _linear_bytes(N: int, K: int, bias: bool, a: int, quant: dict | None) -> int:
    b = N * a if bias else 0
    if quant is None:
        return N * K * a + b
    if quant["bits"] == 8:  # int8 (N, K), scales (N,)
        return N * K + N * a + b
    G = K // quant["group_size"]  # int4 packed (N, K/2), scales and mins (N, K/g)
    return N * (K // 2) + 2 * N * G * a + b


def weight_bytes(cfg, dtype: torch.dtype, quant: dict | None = None) -> dict[str, int]:
    """Bytes of the model's tensors by part: embeddings, layers, norm, head (0 for a float tied model)."""
    quant = quant or getattr(cfg, "quant", None)
    a, C, V = _size(dtype), cfg.dim, cfg.vocab_size
    norm = C * (2 if cfg.norm == "layernorm" else 1) * a
    emb = V * C * a + (2 * cfg.max_seq_len * C * a if cfg.position == "learned_2d" else 0)
    layer = sum(_linear_bytes(N, K, bias, a, quant) for N, K, bias in _linears(cfg)) + norm * (4 if cfg.sandwich_norm else 2)
    head_quant = quant if quant and quant.get("head") else None
    head = 0 if cfg.tie_embeddings and head_quant is None else _linear_bytes(V, C, False, a, head_quant)
    return {"embeddings": emb, "layers": cfg.n_layers * layer, "norm": norm, "head": head}


def _tiled(quant: dict | None) -> bool:
    """Whether many-row products of these quantized weights take the dequantized tiles (kernels), which keep
    no copy of the weights (else int4 takes PyTorch's kernel, which keeps its own layout): the modules' rule."""
    from . import kernels

    return bool(quant) and kernels.uses_tiles(quant["bits"], quant.get("group_size"))


def kernel_copies_bytes(cfg, dtype: torch.dtype, quant: dict | None = None, prefill: bool = True) -> dict[str, int]:
    """CPU only: the native decode step's copies (fp32 norms, biases and int8 scales of a non-fp32 model;
    int4's [scale, min] pairs) and, for int4 after a prefill without the dequantized tiles, PyTorch's
    many-row kernel's layout of every layer's linears (packed weight (N, K/2) uint8 and fp32 [scale, zero] pairs)."""
    quant = quant or getattr(cfg, "quant", None)
    a, C, V, L = _size(dtype), cfg.dim, cfg.vocab_size, cfg.n_layers
    fp32 = dtype != torch.float32
    head_quant = quant if quant and quant.get("head") else None
    lins = [(N, K, bias, quant, False) for N, K, bias in _linears(cfg)] * L
    if not cfg.tie_embeddings or head_quant:
        lins.append((V, C, False, head_quant, True))
    norms = (L * (4 if cfg.sandwich_norm else 2) + 1) * C * (2 if cfg.norm == "layernorm" else 1)
    decode = norms * 4 if fp32 else 0
    many_rows = 0
    for N, K, bias, q, head in lins:
        decode += N * 4 if bias and fp32 else 0
        if q and q["bits"] == 8 and fp32:
            decode += N * 4
        elif q and q["bits"] == 4:
            G = K // q["group_size"]
            decode += N * G * 2 * (a if dtype == torch.bfloat16 else 4)
            if prefill and N % 16 == 0 and not head and not _tiled(q):  # the head runs on few rows (last-token logits)
                many_rows += N * (K // 2) + G * N * 2 * 4
    if quant and quant["bits"] == 4 and any(K % 64 or K % quant["group_size"] or quant["group_size"] % 32
                                            for _, K, _, q, _ in lins if q):
        decode = 0  # the native step does not take this int4 shape: no decode plan, no copies
    return {"decode copies": decode, "int4 prefill layout": many_rows}


# ---- KV cache -------------------------------------------------------------------------------------------------
def _kv_per_position(cfg, dtype: torch.dtype) -> int:
    """Bytes one row adds per position: keys and values of every layer, and its valid flag."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * _size(dtype) + 1


def kv_cache_bytes(cfg, batch: int, max_len: int, dtype: torch.dtype) -> int:
    """What `GLM.new_cache(batch, max_len)` allocates: k and v (L, B, K, S, D), valid (B, S) bool, sep (B,) long."""
    return batch * max_len * _kv_per_position(cfg, dtype) + 8 * batch


def kv_fit(cfg, dtype: torch.dtype, budget: float, batch: int | None = None, max_len: int | None = None) -> int:
    """The largest max_len (given `batch`) or batch (given `max_len`) whose KV cache fits `budget` bytes."""
    per = _kv_per_position(cfg, dtype)
    if max_len is None:
        return max(0, int((budget - 8 * batch) // (batch * per)))
    return max(0, int(budget // (max_len * per + 8)))


# ---- prefill workspace ---------------------------------------------------------------------------------------
def _bf16_emulated() -> bool:
    from .kernels import cpu_bf16_emulated

    return cpu_bf16_emulated()


def prefill_bytes(cfg, dtype: torch.dtype, rows: int, T: int, S: int, device, quant: dict | None = None,
                  full_logits: bool = False) -> int:
    """The estimated peak of one prefill of `rows` x T tokens attending over S positions (see the module)."""
    quant = quant or getattr(cfg, "quant", None)
    device = torch.device(device)
    a, C, H, K, D, F, V = _size(dtype), cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    cpu = device.type == "cpu"
    emulated = cpu and dtype == torch.bfloat16 and quant is None and _bf16_emulated()
    c = 4 if emulated else a  # products of bf16 weights on such CPUs come out in fp32 before the cast back
    n = rows * T
    resid = n * C * (2 * a + 2 * 4)  # x, its normed copy, the fp32 norm temporaries
    qkv = n * (H + 2 * K) * D * (c + 2 * a)  # the projection and the rotated q, k and v
    mask = rows * T * S * (3 + 2 * c)  # GLM's bool mask and its temporaries; SDPA's float mask (and a temporary)
    scores = 0 if cpu else 2 * rows * H * T * S * 4  # the math path's scores and probabilities (see the module)
    attn = qkv + mask + scores + n * H * D * (2 * c + a)  # the output, its transposed copy, the projection's input
    up = F * (2 if cfg.mlp == "swiglu" else 1)
    mlp = n * (up * c + 2 * F * a + C * c)
    logits = rows * (T if full_logits else 1) * V * (a + 4)
    peak = resid + max(attn, mlp, logits)
    # per-call weight copies of the many-row products (the head only when it sees many rows)
    shapes = [(N, Kin) for N, Kin, _ in _linears(cfg)] + ([(V, C)] if full_logits else [])
    largest = max(N * Kin for N, Kin in shapes)
    if emulated:
        peak += largest * 4 + n * max(Kin for _, Kin in shapes) * 4  # fp32 weight and input
    elif cpu and _tiled(quant):
        peak += 4 << 20  # one dequantized tile (kernels.TILE_BYTES)
    elif cpu and quant and quant["bits"] == 4:
        peak += largest * 5  # the one-time unpack: uint8 (N, K), then int32 (N, K)
    return peak


# ---- the plan ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What loading `cfg` in `dtype` (quantized with `quant`) and serving `rows` x `max_len` positions will
    take on `device`. `prefill`: tokens per prefill call (default: a whole `max_len` prompt at once);
    `admission`: the serving engine's 1-row prompt cache; `available`: None measures it now."""

    cfg: object
    dtype: torch.dtype
    rows: int = 1
    max_len: int | None = None
    quant: dict | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prefill: int | None = None
    full_logits: bool = False
    admission: bool = False
    available: int | None = None
    kv_memory: int | None = None  # the --kv-memory budget the contiguous cache was sized from
    lines: list[tuple[str, int, str]] = field(init=False)

    def __post_init__(self):
        self.device = torch.device(self.device)
        self.quant = quant_spec(self.quant) or getattr(self.cfg, "quant", None)
        self.max_len = self.max_len or self.cfg.max_seq_len
        if self.rows < 1 or self.max_len < 1:
            raise ValueError(f"max_batch={self.rows}, max_len={self.max_len}: both must be >= 1")
        if self.available is None:
            self.available = available_bytes(self.device)
        cfg, dt, q = self.cfg, self.dtype, self.quant
        what = f"{quant_name(q)}, {_dtype_name(dt)} float parts" if q else _dtype_name(dt)
        w = weight_bytes(cfg, dt, q)
        note = ", ".join(f"{k} {show(v)}" for k, v in w.items() if v)
        self.lines = [(f"weights ({what})", sum(w.values()), note)]
        if self.device.type == "cpu":
            for name, n in kernel_copies_bytes(cfg, dt, q).items():
                if n:
                    self.lines.append((name, n, "made by the CPU kernels"))
        self.lines.append((f"KV cache ({self.rows} x {self.max_len} positions, {_dtype_name(dt)})",
                           kv_cache_bytes(cfg, self.rows, self.max_len, dt),
                           f"{show(kv_cache_bytes(cfg, 1, 1024, dt))} per 1K tokens"
                           + (f", from --kv-memory {show(self.kv_memory)}" if self.kv_memory else "")))
        if self.admission:
            self.lines.append(("prompt KV (a prefill's own row)", kv_cache_bytes(cfg, 1, self.max_len, dt), ""))
        T = min(self.prefill or self.max_len, self.max_len)
        rows = 1 if self.admission else self.rows
        self.lines.append((f"prefill workspace ({rows} x {T} tokens over {self.max_len})",
                           prefill_bytes(cfg, dt, rows, T, self.max_len, self.device, q, self.full_logits), "estimate"))

    def __repr__(self) -> str:
        return (f"Plan({_dtype_name(self.dtype)}{', ' + quant_name(self.quant) if self.quant else ''}, {self.rows} x "
                f"{self.max_len}, total {show(self.total)}, {'fits' if self.fits else 'does not fit'})")

    @property
    def total(self) -> int:
        return sum(n for _, n, _ in self.lines)

    @property
    def budget(self) -> float | None:
        return None if self.available is None else self.available * HEADROOM

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget

    def with_(self, **changes) -> Plan:
        return replace(self, **changes)

    def table(self) -> str:
        out = [f"  {name:<52s} {show(n):>11s}{'  ' + note if note else ''}" for name, n, note in self.lines]
        avail = "not measured on this device" if self.available is None else (
            f"{show(self.available)} available here, {int(HEADROOM * 100)}% of it usable: "
            + ("fits" if self.fits else "does not fit"))
        out.append(f"  {'total':<52s} {show(self.total):>11s}  {avail}")
        return "\n".join(out)

    # ---- refusing with what would fit ------------------------------------------------------------------
    def largest_max_len(self) -> int:
        """The largest max_len up to this one that fits at these rows (a multiple of MIN_LEN when at least
        that), or 0 when none does."""
        fits = lambda n: self.with_(max_len=n, kv_memory=None).fits
        if not fits(1):
            return 0
        lo, hi = 1, self.max_len + 1  # fits(lo), not fits(hi): the plan grows with max_len
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo - lo % MIN_LEN if lo >= MIN_LEN else lo

    def largest_rows(self) -> int:
        lo, hi = 0, self.rows
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.with_(rows=mid, kv_memory=None).fits else (lo, mid)
        return lo

    def suggestions(self, flags=SERVE_FLAGS, limit: int = 4) -> list[tuple[str, Plan]]:
        """Flag combinations that fit, each with its re-made plan, fewest changes first."""
        weights = [({}, "")]
        if "dtype" in flags and self.dtype == torch.float32:
            weights.append(({"dtype": torch.bfloat16}, "--dtype bf16"))
        if "quantize" in flags and self.quant is None:
            for q in ("int8", "int4"):
                weights.append(({"quant": quant_spec(q)}, f"--quantize {q}"))
                if self.dtype == torch.float32:
                    weights.append(({"quant": quant_spec(q), "dtype": torch.bfloat16}, f"--dtype bf16 --quantize {q}"))
        found, best_len, best_rows = [], 0, 0  # a weights change is named with --max-len / --max-batch only if it buys more
        for change, text in weights:
            p = self.with_(**change)
            if p.fits:
                found.append((text, p))
                continue
            n = p.largest_max_len() if {"max_len", "kv_memory"} & set(flags) else 0
            if n >= min(MIN_LEN, self.max_len) and n > best_len:
                best_len = n
                if "max_len" in flags:
                    found.append(((text + f" --max-len {n}").strip(), p.with_(max_len=n)))
                if "kv_memory" in flags:
                    size = size_flag(kv_cache_bytes(self.cfg, p.rows, n, p.dtype))
                    q = p.with_(max_len=kv_fit(self.cfg, p.dtype, parse_size(size), batch=p.rows), kv_memory=parse_size(size))
                    if q.max_len >= 1:
                        found.append(((text + f" --kv-memory {size}").strip(), q))
            b = p.largest_rows() if "max_batch" in flags and self.rows > 1 else 0
            if b > best_rows:
                best_rows = b
                found.append(((text + f" --max-batch {b}").strip(), p.with_(rows=b)))
        return [(t, p) for t, p in found if t and p.fits][:limit]

    def check(self, who: str = "glmkit", flags=SERVE_FLAGS) -> None:
        """MemoryError, before anything is allocated, when the plan does not fit: the lines, and the flags that would."""
        if self.fits:
            return
        tips = self.suggestions(flags)
        fix = "; or ".join(t for t, _ in tips) if tips else "a machine with more memory"
        raise MemoryError(f"{who}: this needs {show(self.total)}, and this process can use {show(self.budget)} "
                          f"({int(HEADROOM * 100)}% of the {show(self.available)} available on {self.device}):\n"
                          f"{self.table()}\nTry {fix}.")


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


# ---- dtype auto ----------------------------------------------------------------------------------------------
def auto_dtype(plan: Plan, stored: torch.dtype | None) -> tuple[torch.dtype, str]:
    """dtype auto, given a plan made for fp32 and the checkpoint's stored float dtype (None: a preset, any).
    Off CPU: the device policy (`devices.resolve_dtype`). On CPU fp32 (the fastest on CPUs without bf16
    instructions, and exact), unless the weights are stored in 16 bits and the fp32 plan would take more
    than COMFORT of the available memory: then bf16, the checkpoint's own precision (fp16 is rounded to bf16:
    fp16 matmuls on CPU are far slower)."""
    from .devices import resolve_dtype

    if plan.device.type != "cpu":
        return resolve_dtype("auto", plan.device), ""
    fp32 = plan.with_(dtype=torch.float32)
    if plan.available is None or stored == torch.float32 or fp32.total <= COMFORT * plan.available:
        return torch.float32, f"dtype auto: fp32 (needs {show(fp32.total)} of {show(plan.available or 0)} available)"
    return torch.bfloat16, (f"dtype auto: bf16, because fp32 needs {show(fp32.total)} of {show(plan.available)} available"
                            + (" (the checkpoint's fp16 rounded to bf16)" if stored == torch.float16 else ""))


# ---- the engine's own check ---------------------------------------------------------------------------------
def check_kv_fits(cfg, batch: int, max_len: int, dtype: torch.dtype, device, available: int | None = None) -> None:
    """Raise MemoryError, before anything is allocated, when a KV cache of batch x max_len cannot fit in what
    is left (the model is loaded); the message names the --max-len (at this --max-batch) and the --max-batch
    (at this --max-len) that would. The engine calls this; commands check a whole `Plan` before loading."""
    if batch < 1 or max_len < 1:
        raise ValueError(f"max_batch={batch}, max_len={max_len}: both must be >= 1")
    need = kv_cache_bytes(cfg, batch, max_len, dtype)
    avail = available_bytes(device) if available is None else available
    if avail is None or need <= avail * HEADROOM:
        return
    fit_len, fit_batch = kv_fit(cfg, dtype, avail * HEADROOM, batch=batch), kv_fit(cfg, dtype, avail * HEADROOM, max_len=max_len)
    hints = [f"--max-len {fit_len} (at --max-batch {batch})"] if fit_len >= 1 else []
    hints += [f"--max-batch {fit_batch} (at --max-len {max_len})"] if fit_batch >= 1 else []
    fix = " or ".join(hints) if hints else "a smaller --max-len and --max-batch, or a machine with more memory"
    raise MemoryError(f"the KV cache for {batch} rows x {max_len} positions needs {need / GiB:.1f} GiB "
                      f"({dtype}); this process can use {avail / GiB:.1f} GiB more on {torch.device(device)}. "
                      f"Try {fix}.")
