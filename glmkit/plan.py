"""Memory planning: what a model will take, computed from its config before anything is loaded, against
what this process may really use; refusals name the settings that would fit.

    p = Plan(cfg, torch.bfloat16, rows=1, max_len=4096)      # generate / chat: weights, KV cache, prefill workspace
    p = Plan(cfg, torch.bfloat16, rows=8, prefill=512, pool=True)   # serve: the KV pool gets what is left
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
- the KV cache. generate / chat / fill: exactly what `GLM.new_cache` allocates, keys and values of every
  layer for rows x positions, plus the valid flags and `sep`. serve (`pool=True`): the serving engine's
  paged pool (`model.BlockPool`, blocks of KV_BLOCK positions and one null block), sized from what the
  budget leaves after everything else, at most every row at full context (or `kv_memory`, --kv-memory):
  memory follows the tokens in flight, not rows x max_len. Prompts being prefilled and cached prompts take
  their blocks from the same pool. A request's context is its --max-len, or the pool's size when less.
  Serve refuses to start only when the pool cannot hold one request of min(SERVE_MIN_LEN, --max-len).
- prefill workspace, an estimate (what one prefill of T tokens over S cached positions holds at its peak):
  the residual stream and its normed copy, the fp32 norm temporaries, then the larger of the attention phase
  (q/k/v and their rotated copies; the mask, as GLM's bool mask (T x S) and the float mask SDPA makes of it;
  from a paged pool, one layer's keys and values gathered through the block table: the gather indexes k (n,
  blocks, K, block, D) and copies it to (n, K, S, D), then v, three copies live at once; the output) and the
  MLP phase (the up projection's 2F columns, the gate product), and the logits (1 or T rows x V, in the
  model's dtype and an fp32 copy). On CPU attention itself is SDPA's fused kernel, with GLM's mask and GQA
  too (blocks of keys per thread: never the T x S scores; checked with the profiler). Off CPU the kernel
  SDPA picks for a masked GQA call is not measured here, so the math path's scores and probabilities (H x T
  x S fp32 each) are counted: an upper bound. Per-call weight copies of the many-row matrix products are
  added: bf16 on a CPU without bf16 instructions multiplies in fp32 (an fp32 copy of the largest weight),
  int4 builds its kernel layout through an int32 copy of the largest weight once.
  Measured peaks of a prefill stay under this estimate (tests). The serving engine prefills a long prompt
  in chunks (`--prefill-chunk`), so T is the chunk there, not the context; S is the context. A decode
  step of every row is counted instead when it takes more (off CPU, or more rows than the native step
  takes: the eager step gathers each row's keys through its table).

"Available" on CPU is the smaller of the kernel's MemAvailable and the room left under the cgroup memory
limit (cgroup v2 `memory.max` - `memory.current`, or v1's `limit_in_bytes` - `usage_in_bytes`); on CUDA
`torch.cuda.mem_get_info`'s free memory; other devices are not measured (no check). A plan fits when
its total is at most HEADROOM of that: the rest (10%, 2.4 GiB of 24) is the margin for the Python process,
the tokenizer, the server and the allocator; serve's KV pool ends there too.
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
MIN_LEN = 256  # the shortest context a suggested --max-len offers
SERVE_MIN_LEN = 4096  # serve starts only when its KV pool holds one request this long (or --max-len, if less):
# a chat turn with a system prompt and the default 1024-token reply takes a few thousand tokens, and a server
# holding only a few hundred would refuse most requests at submit: better to refuse at start, naming flags
KV_BLOCK = 16  # positions per block of the serving engine's KV pool (Engine's block_size)
PREFILL_CHUNK = 512  # serve's --prefill-chunk default, and the most an automatic chunk takes
SERVE_FLAGS = ("dtype", "quantize", "max_len", "max_batch", "kv_memory", "prefill_chunk")  # flags a refusal may name
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
    return None if bits is None else {"bits": bits, "group_size": group_size if bits == 4 else None, "head": True,
                                      "latent": True}


def quant_name(quant: dict | None) -> str | None:
    return None if not quant else f"int{quant['bits']}"


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---- weights --------------------------------------------------------------------------------------------------
def _linears(cfg) -> list[tuple[int, int, bool]]:
    """(out N, in K, bias) of each layer's linears that quantization takes: qkv, attention out, MLP up
    ([gate | up] for SwiGLU), down. Latent attention has no qkv (its projections: `_latent_bytes`)."""
    C, H, K, D, F = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    mlp = [(F * (2 if cfg.mlp == "swiglu" else 1), C, cfg.mlp_bias), (C, F, cfg.mlp_bias)]
    if cfg.attention == "mla":
        return [(C, H * cfg.v_head_dim, cfg.out_bias)] + mlp
    return [((H + 2 * K) * D, C, cfg.qkv_bias), (C, H * D, cfg.out_bias)] + mlp


def _latent_bytes(cfg, a: int, quant: dict | None = None) -> int:
    """Bytes of one layer's latent attention projections and their norms (q or q_a, q_norm, q_b; kv_a, kv_norm,
    kv_b): in the float dtype `a` bytes wide, but q_a, q_b, kv_a and kv_b quantized where `quant` quantizes them
    (quantize.latent_target; a lone q stays float)."""
    if cfg.attention != "mla":
        return 0
    C, H, Q, R, P = cfg.dim, cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    from .quantize import latent_target

    def lq(name: str, K: int) -> dict | None:  # the quantization of that projection, if any
        return quant if quant and latent_target(name, K, quant) else None

    q = C * H * cfg.head_dim * a if Q is None else (_linear_bytes(Q, C, cfg.qkv_bias, a, lq("attn.q_a", C)) + Q * a
                                                    + _linear_bytes(H * cfg.head_dim, Q, False, a, lq("attn.q_b", Q)))
    kv = (_linear_bytes(R + P, C, cfg.qkv_bias, a, lq("attn.kv_a", C)) + R * a
          + _linear_bytes(H * (cfg.qk_nope_head_dim + cfg.v_head_dim), R, False, a, lq("attn.kv_b", R)))
    return q + kv


def _linear_bytes(N: int, K: int, bias: bool, a: int, quant: dict | None) -> int:
    b = N * a if bias else 0
    if quant is None:
        return N * K * a + b
    if quant["bits"] == 8:  # int8 (N, K), scales (N,)
        return N * K + N * a + b
    G = K // quant["group_size"]  # int4 packed (N, K/2), scales and mins (N, K/g)
    return N * (K // 2) + 2 * N * G * a + b


def _mlp_linears(cfg, layer: int) -> list[tuple[int, int, bool]]:  # _linears' last two are the dense MLP's
    """(out N, in K, bias) of block `layer`'s MLP side: the dense MLP's up and down, or every expert's and the
    shared expert's (an MoE layer; its router is counted apart, it stays fp32)."""
    if not cfg.is_moe_layer(layer):
        return _linears(cfg)[-2:]
    F, S, C = cfg.moe_ffn_dim, cfg.moe_ffn_dim * cfg.n_shared_experts, cfg.dim
    return [(2 * F, C, False), (C, F, False)] * cfg.n_experts + ([(2 * S, C, False), (C, S, False)] if S else [])


def _block_bytes(cfg, layer: int, a: int, quant: dict | None) -> int:
    """Bytes of block `layer`: its linears, norms (qk norms included) and an MoE layer's fp32 router and bias."""
    norm = cfg.dim * (2 if cfg.norm == "layernorm" else 1) * a
    lins = _linears(cfg)[:-2] + _mlp_linears(cfg, layer)
    router = (cfg.n_experts * cfg.dim + cfg.n_experts) * 4 if cfg.is_moe_layer(layer) else 0
    qk = 2 * cfg.head_dim * a * (2 if cfg.norm == "layernorm" else 1) if cfg.qk_norm else 0
    indexer = cfg.indexer_params() * a if cfg.has_indexer(layer) else 0  # GLM-5's, float like the latent projections
    return (sum(_linear_bytes(N, K, b, a, quant) for N, K, b in lins) + norm * (4 if cfg.sandwich_norm else 2) + router + qk
            + _latent_bytes(cfg, a, quant) + indexer)


def weight_bytes(cfg, dtype: torch.dtype, quant: dict | None = None) -> dict[str, int]:
    """Bytes of the model's tensors by part: embeddings, layers (every expert of an MoE), norm, head (0 for a
    float tied model), and the multi-token-prediction layers (GLM-4.5's; loaded though forward skips them)."""
    quant = quant or getattr(cfg, "quant", None)
    a, C, V = _size(dtype), cfg.dim, cfg.vocab_size
    norm = C * (2 if cfg.norm == "layernorm" else 1) * a
    emb = V * C * a + (2 * cfg.max_seq_len * C * a if cfg.position == "learned_2d" else 0)
    layers = sum(_block_bytes(cfg, i, a, quant) for i in range(cfg.n_layers))
    head_quant = quant if quant and quant.get("head") else None
    head = 0 if cfg.tie_embeddings and head_quant is None else _linear_bytes(V, C, False, a, head_quant)
    mtp = sum(_block_bytes(cfg, cfg.n_layers + i, a, quant) + 3 * norm + 2 * C * C * a for i in range(cfg.n_mtp_layers))
    return {"embeddings": emb, "layers": layers, "norm": norm if cfg.final_norm else 0, "head": head, "mtp": mtp}


def active_weight_bytes(cfg, dtype: torch.dtype, quant: dict | None = None) -> int:
    """Bytes of weights one token's forward reads: weight_bytes without the routed experts it does not use
    (an MoE layer reads n_experts_per_tok of n_experts) and without the MTP layers; the embedding table
    counts whole (one row is read, but the tied head reads it all)."""
    w = weight_bytes(cfg, dtype, quant)
    quant = quant or getattr(cfg, "quant", None)
    total = sum(w.values()) - w["mtp"]
    if cfg.n_experts:
        F, C, a = cfg.moe_ffn_dim, cfg.dim, _size(dtype)
        expert = _linear_bytes(2 * F, C, False, a, quant) + _linear_bytes(C, F, False, a, quant)
        moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
        total -= moe_layers * (cfg.n_experts - cfg.n_experts_per_tok) * expert
    return total


def _tiled(quant: dict | None) -> bool:
    """Whether many-row products of these quantized weights take the dequantized tiles (kernels), which keep
    no copy of the weights (else int4 takes PyTorch's kernel, which keeps its own layout): the modules' rule."""
    from . import kernels

    return bool(quant) and kernels.uses_tiles(quant["bits"], quant.get("group_size"))


def kernel_copies_bytes(cfg, dtype: torch.dtype, quant: dict | None = None, prefill: bool = True) -> dict[str, int]:
    """CPU only: the native decode step's copies (fp32 norms, biases and int8 scales of a non-fp32 model;
    int4's scales and mins only when they are fp16: bf16 and fp32 ones are read as stored; an int4 kv_b's key rows
    regrouped for latent attention's W_UK) and, for int4 after a prefill without the dequantized tiles, PyTorch's
    many-row kernel's layout of every layer's linears (packed weight (N, K/2) uint8 and fp32 [scale, zero] pairs)."""
    quant = quant or getattr(cfg, "quant", None)
    C, V, L = cfg.dim, cfg.vocab_size, cfg.n_layers
    fp32 = dtype != torch.float32
    head_quant = quant if quant and quant.get("head") else None
    lins = [(N, K, bias, quant, False) for i in range(L) for N, K, bias in _linears(cfg)[:-2] + _mlp_linears(cfg, i)]
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
            decode += N * G * 2 * 4 if dtype not in (torch.bfloat16, torch.float32) else 0  # fp16: fp32 copies
            if prefill and N % 16 == 0 and not head and not _tiled(q):  # the head runs on few rows (last-token logits)
                many_rows += N * (K // 2) + G * N * 2 * 4
    if cfg.attention == "mla" and quant and quant["bits"] == 4 and cfg.kv_lora_rank % 32 == 0 == quant["group_size"] % 32:
        from .quantize import latent_target

        if latent_target("attn.kv_b", cfg.kv_lora_rank, quant):  # kv_b's key rows regrouped (kernels.heads_uk_codes)
            decode += L * cfg.n_heads * -(-cfg.qk_nope_head_dim // 8) * 8 * cfg.kv_lora_rank // 2
    if not _native_shapes(cfg, quant) or not _native_model(cfg):
        decode = 0  # the native step does not take this model: no decode plan, no copies
    return {"decode copies": decode, "int4 prefill layout": many_rows}


def _native_shapes(cfg, quant: dict | None) -> bool:
    """Whether the native decode step takes these weights (its int4 kernel wants K a multiple of 64 and
    groups of a multiple of 32 that divide K)."""
    if not quant or quant["bits"] != 4:
        return True
    g = quant["group_size"]
    ks = [K for _, K, _ in _linears(cfg)] + ([cfg.dim] if quant.get("head") else [])
    return not any(K % 64 or K % g or g % 32 for K in ks)


def _native_model(cfg) -> bool:
    """Whether fused.decode_step takes this architecture (fused.architecture_unsupported, the plan's own rule)."""
    from .fused import architecture_unsupported

    return architecture_unsupported(cfg) is None


def _native_decode(cfg, dtype: torch.dtype, quant: dict | None, device, rows: int) -> bool:
    """Whether a decode step of `rows` rows runs natively (`fused.decode_step`), reading the pool in place."""
    from . import kernels

    return (torch.device(device).type == "cpu" and rows <= kernels.MAX_ROWS and dtype in (torch.float32, torch.bfloat16)
            and _native_shapes(cfg, quant) and _native_model(cfg) and kernels.available())


# ---- KV cache -------------------------------------------------------------------------------------------------
def _kv_per_position(cfg, dtype: torch.dtype) -> int:
    """Bytes one row adds per position: keys and values of every layer (`ModelConfig.kv_layout`: for latent
    attention the latent alone), and its valid flag. `dtype` is the KV cache's: the model's, or torch.int8
    (serve --kv-dtype int8), which adds an fp32 scale per key and value vector (model.BlockPool)."""
    K, Dk, Dv = cfg.kv_layout
    vectors = cfg.n_layers * K
    return vectors * (Dk + Dv) * _size(dtype) + (2 * vectors * 4 if dtype == torch.int8 else 0) + 1


def kv_cache_bytes(cfg, batch: int, max_len: int, dtype: torch.dtype) -> int:
    """What `GLM.new_cache(batch, max_len)` allocates: k and v (L, B, K, S, D), valid (B, S) bool, sep (B,) long;
    with `dtype` torch.int8, the int8 pool's keys, values and their scales for as many positions."""
    return batch * max_len * _kv_per_position(cfg, dtype) + 8 * batch


def kv_fit(cfg, dtype: torch.dtype, budget: float, batch: int | None = None, max_len: int | None = None) -> int:
    """The largest max_len (given `batch`) or batch (given `max_len`) whose KV cache in `dtype` (the KV
    cache's: the model's, or torch.int8) fits `budget` bytes."""
    per = _kv_per_position(cfg, dtype)
    if max_len is None:
        return max(0, int((budget - 8 * batch) // (batch * per)))
    return max(0, int(budget // (max_len * per + 8)))


def kv_pool_bytes(cfg, blocks: int, dtype: torch.dtype, block: int = KV_BLOCK) -> int:
    """What `BlockPool(n_blocks=blocks)` allocates: keys, values and valid flags of its blocks and of the null block."""
    return (blocks + 1) * block * _kv_per_position(cfg, dtype)


def kv_pool_blocks(cfg, budget: float, dtype: torch.dtype, block: int = KV_BLOCK) -> int:
    """The blocks `Engine(kv_memory=budget)` makes its pool of (the null block is counted in the budget)."""
    return max(0, int(budget) // (block * _kv_per_position(cfg, dtype)) - 1)


def serve_prefill(cfg, max_len: int, chunk: int | str | None = PREFILL_CHUNK) -> int:
    """The most tokens one prefill call of the serving engine takes: --prefill-chunk (None or "auto":
    PREFILL_CHUNK, the most an automatic chunk takes; 0: whole prompts), at most max_len. A prefix-LM
    model's Part A is prefilled whole in its first chunk (every query reads it): up to max_len there."""
    if cfg.prefix_lm:
        return max_len
    chunk = PREFILL_CHUNK if chunk is None or chunk == "auto" else int(chunk)
    return max_len if chunk <= 0 else min(chunk, max_len)


# ---- prefill workspace ---------------------------------------------------------------------------------------
def _bf16_emulated() -> bool:
    from .kernels import cpu_bf16_emulated

    return cpu_bf16_emulated()


def prefill_bytes(cfg, dtype: torch.dtype, rows: int, T: int, S: int, device, quant: dict | None = None,
                  full_logits: bool = False, paged: bool = False) -> int:
    """The estimated peak of one prefill of `rows` x T tokens attending over S positions (see the module);
    `paged`: the cache is a block pool, whose keys and values attention reads as a gathered copy."""
    quant = quant or getattr(cfg, "quant", None)
    device = torch.device(device)
    a, C, H, K, D, F, V = _size(dtype), cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    cpu = device.type == "cpu"
    emulated = cpu and dtype == torch.bfloat16 and quant is None and _bf16_emulated()
    c = 4 if emulated else a  # products of bf16 weights on such CPUs come out in fp32 before the cast back
    n = rows * T
    resid = n * C * (2 * a + 2 * 4)  # x, its normed copy, the fp32 norm temporaries
    qkv = n * (H + 2 * K) * D * (c + 2 * a)  # the projection and the rotated q, k and v
    if cfg.attention == "mla":  # q and the latents, then (expanded form) every head's keys and values of S latents
        K, D = cfg.kv_layout[:2]
        qkv = n * (H * cfg.head_dim + D) * (c + 2 * a) + rows * S * H * (cfg.head_dim + cfg.v_head_dim) * (c + 2 * a)
    mask = rows * T * S * (3 + 2 * c)  # GLM's bool mask and its temporaries; SDPA's float mask (and a temporary)
    scores = 0 if cpu else 2 * rows * H * T * S * 4  # the math path's scores and probabilities (see the module)
    attn = qkv + mask + scores + n * H * D * (2 * c + a)  # the output, its transposed copy, the projection's input
    attn += 3 * rows * K * S * D * a if paged else 0  # one layer's k and v gathered from the pool: three copies at once
    if cpu and dtype == torch.bfloat16 and _bf16_emulated():  # kernels.attention runs in fp32 there: q, k, v copies
        attn += (n * H * D + 2 * rows * K * S * D) * 4
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


def decode_bytes(cfg, dtype: torch.dtype, rows: int, S: int, device, quant: dict | None = None) -> int:
    """The estimated peak of one serving decode step of `rows` rows over up to S positions of the pool: the
    logits (in the model's dtype and fp32), the activations, and unless the native step applies (it reads the
    pool in place) the eager step's gathered keys and values of one layer (k indexed, then copied to
    (n, K, S, D), then v: three copies at once), the valid flags and the masks."""
    a, (K, D, _) = _size(dtype), cfg.kv_layout
    peak = rows * cfg.vocab_size * (a + 4)
    peak += rows * (4 * cfg.dim + (cfg.n_heads + 2 * K) * D + 3 * cfg.ffn_dim) * 4  # the step's activations, at fp32
    if _native_decode(cfg, dtype, quant, device, rows):
        return peak
    f32 = torch.device(device).type == "cpu" and dtype == torch.bfloat16 and _bf16_emulated()
    return peak + rows * K * S * D * (3 * a + (8 if f32 else 0)) + rows * S * (4 + 2 * a)


# ---- the plan ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What loading `cfg` in `dtype` (quantized with `quant`) and running it on `device` will take.
    Default (generate / chat / fill): a contiguous KV cache of `rows` x `max_len` positions and prefills of
    `prefill` tokens (default: a whole `max_len` prompt). `pool=True` (serve): `rows` streams of up to
    `max_len` positions in the engine's paged KV pool, of `kv_memory` bytes (--kv-memory) or, by default,
    what the budget leaves after everything else (at most every row at full context); `prefill`: the
    most tokens one prefill call takes (the engine's chunk). `available`: None measures it now."""

    cfg: object
    dtype: torch.dtype
    rows: int = 1
    max_len: int | None = None
    quant: dict | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prefill: int | None = None
    full_logits: bool = False
    pool: bool = False
    kv_memory: int | None = None  # serve: the pool's budget, --kv-memory; None: what is left
    available: int | None = None
    kv_dtype: torch.dtype | None = None  # the KV pool's dtype when not the model's: torch.int8 (serve --kv-dtype int8)
    lines: list[tuple[str, int, str]] = field(init=False)
    kv_blocks: int = field(init=False, default=0)  # serve: blocks of KV_BLOCK positions in the pool

    def __post_init__(self):
        self.device = torch.device(self.device)
        self.quant = quant_spec(self.quant) or getattr(self.cfg, "quant", None)
        self.max_len = self.max_len or self.cfg.max_seq_len
        if self.rows < 1 or self.max_len < 1 or (self.prefill is not None and self.prefill < 1):
            raise ValueError(f"max_batch={self.rows}, max_len={self.max_len}, prefill={self.prefill}: each must be >= 1")
        if self.available is None:
            self.available = available_bytes(self.device)
        cfg, dt, q, S = self.cfg, self.dtype, self.quant, self.max_len
        what = f"{quant_name(q)}, {_dtype_name(dt)} float parts" if q else _dtype_name(dt)
        w = weight_bytes(cfg, dt, q)
        note = ", ".join(f"{k} {show(v)}" for k, v in w.items() if v)
        self.lines = [(f"weights ({what})", sum(w.values()), note)]
        if self.device.type == "cpu":
            for name, n in kernel_copies_bytes(cfg, dt, q).items():
                if n:
                    self.lines.append((name, n, "made by the CPU kernels"))
        T = min(self.prefill or S, S)
        kv = self.kv_dtype or dt
        per_1k = f"{show(kv_cache_bytes(cfg, 1, 1024, kv))} per 1K tokens"
        if not self.pool:
            self.lines.append((f"KV cache ({self.rows} x {S} positions, {_dtype_name(kv)})",
                               kv_cache_bytes(cfg, self.rows, S, kv), per_1k))
            self.lines.append((f"prefill workspace ({self.rows} x {T} tokens over {S})",
                               prefill_bytes(cfg, dt, self.rows, T, S, self.device, q, self.full_logits), "estimate"))
            return
        pre = prefill_bytes(cfg, dt, 1, T, S, self.device, q, self.full_logits, paged=True)
        dec = decode_bytes(cfg, dt, self.rows, S, self.device, q)
        if dec > pre:
            self.lines.append((f"decode workspace ({self.rows} rows over {S:,})", dec,
                               f"estimate; a prefill of {T:,} tokens: {show(pre)}"))
        else:
            self.lines.append((f"prefill workspace ({T:,} tokens over {S:,})", pre,
                               f"estimate; a decode step of {self.rows} rows: {show(dec)}"))
        full = self.rows * -(-S // KV_BLOCK)  # every row at full context: more would never be used
        if self.kv_memory is not None:
            self.kv_blocks = kv_pool_blocks(cfg, self.kv_memory, kv)
        elif self.budget is None:
            self.kv_blocks = full  # not measured here: the engine's own default
        else:
            self.kv_blocks = min(full, kv_pool_blocks(cfg, self.budget - self.total, kv))
        n = self.kv_tokens
        self.lines.append((f"KV pool ({_dtype_name(kv)}): {n:,} tokens in flight", self.kv_bytes,
                           f"= {self.rows} streams x {n // self.rows:,}" + (f" (or {n // S} at the full {S:,})" if n >= S else "") + "; "
                           f"context per request {self.context:,}; {per_1k}"
                           + (f"; --kv-memory {show(self.kv_memory)}" if self.kv_memory is not None else "")))

    def __repr__(self) -> str:
        kv = f", KV pool {self.kv_tokens} tokens" if self.pool else ""
        return (f"Plan({_dtype_name(self.dtype)}{', ' + quant_name(self.quant) if self.quant else ''}, {self.rows} x "
                f"{self.max_len}{kv}, total {show(self.total)}, {'fits' if self.fits else 'does not fit'})")

    @property
    def total(self) -> int:
        return sum(n for _, n, _ in self.lines)

    @property
    def budget(self) -> float | None:
        return None if self.available is None else self.available * HEADROOM

    # ---- serve's pool ---------------------------------------------------------------------------------
    @property
    def kv_bytes(self) -> int:
        """The KV pool's bytes, what the engine allocates for them: pass it as Engine(kv_memory=)."""
        return kv_pool_bytes(self.cfg, self.kv_blocks, self.kv_dtype or self.dtype) if self.pool else 0

    @property
    def kv_tokens(self) -> int:
        return self.kv_blocks * KV_BLOCK

    @property
    def context(self) -> int:
        """The longest request (prompt and generated tokens): --max-len, or the whole pool when it holds less."""
        return min(self.max_len, self.kv_tokens) if self.pool else self.max_len

    @property
    def min_len(self) -> int:
        return min(SERVE_MIN_LEN, self.max_len)

    @property
    def need(self) -> int:
        """The least this can start with: the total, with an automatic pool holding one request of `min_len`."""
        if not self.pool or self.kv_memory is not None:
            return self.total
        return self.total - self.kv_bytes + kv_pool_bytes(self.cfg, -(-self.min_len // KV_BLOCK), self.kv_dtype or self.dtype)

    @property
    def demand(self) -> int:
        """The total with every row at full context (what dtype auto weighs: an automatic pool takes what is left)."""
        if not self.pool:
            return self.total
        return self.total - self.kv_bytes + kv_pool_bytes(self.cfg, self.rows * -(-self.max_len // KV_BLOCK), self.kv_dtype or self.dtype)

    @property
    def fits(self) -> bool:
        room = self.budget is None or self.need <= self.budget
        return room and (not self.pool or self.kv_tokens >= self.min_len)

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
        """The largest max_len up to this one that fits (a multiple of MIN_LEN when at least that), or 0."""
        fits = lambda n: self.with_(max_len=n).fits
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
            lo, hi = (mid, hi) if self.with_(rows=mid).fits else (lo, mid)
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
            if p.pool and p.kv_memory is not None and "kv_memory" in flags:  # the given pool, shrunk to what is left
                left = p.with_(kv_memory=None)
                if left.fits:
                    size = size_flag(left.kv_bytes)
                    found.append(((text + f" --kv-memory {size}").strip(), p.with_(kv_memory=parse_size(size))))
                    continue
            T = min(p.prefill or p.max_len, p.max_len)
            if p.pool and "prefill_chunk" in flags and not p.cfg.prefix_lm and T > PREFILL_CHUNK:
                q = p.with_(prefill=PREFILL_CHUNK)  # a causal prompt prefilled in chunks: the workspace of one
                if q.fits:
                    found.append(((text + f" --prefill-chunk {PREFILL_CHUNK}").strip(), q))
                    continue
            n = p.largest_max_len() if "max_len" in flags else 0
            if n >= min(MIN_LEN, self.max_len) and n > best_len:
                best_len = n
                found.append(((text + f" --max-len {n}").strip(), p.with_(max_len=n)))
            b = p.largest_rows() if "max_batch" in flags and self.rows > 1 else 0
            if b > best_rows:
                best_rows = b
                found.append(((text + f" --max-batch {b}").strip(), p.with_(rows=b)))
        return [(t, p) for t, p in found if t and p.fits][:limit]

    def shortfall(self) -> str:
        """Why this does not fit, in one sentence (empty when it does)."""
        if self.fits:
            return ""
        if self.budget is not None and self.need > self.budget:
            pool = (f" (with a KV pool for one request of {self.min_len:,} tokens)"
                    if self.pool and self.kv_memory is None else "")
            return (f"this needs {show(self.need)}{pool}, and this process can use {show(self.budget)} "
                    f"({int(HEADROOM * 100)}% of the {show(self.available)} available on {self.device})")
        return (f"--kv-memory {show(self.kv_memory)} holds {self.kv_tokens:,} tokens, fewer than one request of "
                f"{self.min_len:,} (--max-len, or {SERVE_MIN_LEN} at most)")

    def check(self, who: str = "glmkit", flags=SERVE_FLAGS) -> None:
        """MemoryError, before anything is allocated, when the plan does not fit: the lines, and the flags that would."""
        if self.fits:
            return
        tips = self.suggestions(flags)
        fix = "; or ".join(t for t, _ in tips) if tips else "a machine with more memory"
        raise MemoryError(f"{who}: {self.shortfall()}:\n{self.table()}\nTry {fix}.")


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "int8"}.get(dtype, str(dtype))


# ---- dtype auto ----------------------------------------------------------------------------------------------
def auto_dtype(plan: Plan, stored: torch.dtype | None) -> tuple[torch.dtype, str]:
    """dtype auto, given a plan made for fp32 and the checkpoint's stored float dtype (None: a preset, any).
    Off CPU: the device policy (`devices.resolve_dtype`). On CPU fp32 (the fastest on CPUs without bf16
    instructions, and exact), unless the weights are stored in 16 bits and the fp32 plan would take more
    than COMFORT of the available memory: then bf16, the checkpoint's own precision (fp16 is rounded to bf16:
    fp16 matmuls on CPU are far slower). A serve plan is weighed with every row at full context
    (`Plan.demand`): its pool would otherwise take whatever is left, in either dtype."""
    from .devices import resolve_dtype

    if plan.device.type != "cpu":
        return resolve_dtype("auto", plan.device), ""
    fp32 = plan.with_(dtype=torch.float32).demand
    if plan.available is None or stored == torch.float32 or fp32 <= COMFORT * plan.available:
        return torch.float32, f"dtype auto: fp32 (needs {show(fp32)} of {show(plan.available or 0)} available)"
    return torch.bfloat16, (f"dtype auto: bf16, because fp32 needs {show(fp32)} of {show(plan.available)} available"
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
