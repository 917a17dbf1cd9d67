"""GGUF import: llama.cpp's `chatglm` (GLM-4, ChatGLM2/3) and `glm4` (GLM-4-0414) files as glmkit models.

    model = glmkit.load("glm-4-9b-chat.Q4_0.gguf")     # Q4_0 layers land as int4 (groups of 32), as stored
    tok = glmkit.load_tokenizer("glm-4-9b-chat.Q4_0.gguf")
    glmkit convert glm-4-9b-chat.Q4_0.gguf ckpt/        # a glmkit checkpoint with the file's vocabulary
    glmkit serve --model glm-4-9b-chat.Q4_0.gguf        # chat, generate, info, quantize: the same

The file is read with the `gguf` package's memory-mapped reader: every name, shape and type is checked
before the first tensor is read, then one tensor at a time is converted (`stream`, the GGUF branch of
`convert.state_stream`). This module sits below `convert` and `tokenizer` and imports neither.

Names (gguf-py's tensor names for these architectures, as llama.cpp's converter writes them):

    token_embd -> embed        output_norm -> norm        output -> head (absent: tied to token_embd)
    blk.N.attn_norm -> norm1   blk.N.attn_qkv -> attn.qkv (rows [Q | K | V]; or attn_q, attn_k, attn_v,
    blk.N.attn_output -> attn.out                            as converted from GlmForCausalLM, fused here)
    blk.N.ffn_norm -> norm2    blk.N.ffn_up -> mlp.up (rows [gate | up]: ggml's swiglu applies silu to
    blk.N.ffn_down -> mlp.down                               the first half, as glmkit does)
    glm4 only: blk.N.post_attention_norm, blk.N.post_ffw_norm -> the sandwich norms

No row is permuted: llama.cpp rotates these architectures in its "normal" rope mode, consecutive pairs
(x[2i], x[2i+1]) over the first rope.dimension_count channels of each head, which is glmkit's
`rope_partial`. (Only glm4 files with M-RoPE sections, the vision models, are permuted; refused here.)

Tensor types:
    F32, F16, BF16, F64   floats, as stored (then the usual dtype policy: fp16 becomes fp32 on a CPU)
    Q4_0                  when every layer linear is Q4_0: int4 as stored. A Q4_0 block is 32 weights
                          w = d * (q - 8) with an fp16 d, which is glmkit's int4 with group 32, scale d
                          and min -8d; the nibbles are only repacked (a block holds columns 0-15 in its
                          low nibbles, 16-31 in its high ones; glmkit packs column pairs), so the
                          dequantized weights are bit for bit the file's. The head too when it is Q4_0.
                          Scales and mins are exact in fp32 and fp16; a bf16 model rounds them.
    DEQUANTIZED types     (Q8_0, Q4_1, Q5_0, Q5_1, the K-quants, IQ*, TQ*, MXFP4, NVFP4, and Q4_0 in a
                          file where not every layer linear is Q4_0): gguf.quants.dequantize, into fp32,
                          which holds every such weight exactly. Q8_0 has one scale per 32 weights and
                          glmkit's int8 one per output row: no exact int8 form, so it becomes float
                          (`quantize="int8"` re-quantizes it per row, as for any float model).
    refused               Q8_1 and Q8_K (llama.cpp's activation formats), integer tensors, and types
                          this `gguf` package does not know.

Vocabularies (`read_vocab`): `gpt2` (GLM-4: tokens, merges, tokenizer.ggml.pre chatglm-bpe or glm4)
becomes a byte-level BPE `tokenizers.Tokenizer` with llama.cpp's split for those names; `llama`
(ChatGLM3: SentencePiece pieces, scores and types) becomes a SentencePiece BPE model's bytes, which
`Tokenizer.from_sentencepiece` reads. CONTROL tokens are special (matched only when allowed), and
every token keeps its id.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .errors import CheckpointError
from .quantize import TARGETS

ARCHITECTURES = ("chatglm", "glm4")
FLOATS = ("F32", "F16", "BF16", "F64")
# what gguf.quants dequantizes (checked against gguf 0.19); each becomes fp32, exactly
DEQUANTIZED = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ1_S", "IQ1_M",
               "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4")
Q4_0_GROUP = 32

# The split llama.cpp applies for these tokenizer.ggml.pre names: GLM-4's own (tiktoken) pattern with its
# case-insensitive contractions spelled out as character classes. It equals glmkit's tokenizer.SPLIT_PATTERN
# on all text but the few non-ASCII letters that Unicode case folding maps onto s, t, ... (e.g. U+017F).
_CHATGLM4_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"chatglm-bpe": _CHATGLM4_SPLIT, "glm4": _CHATGLM4_SPLIT}
# token types (gguf.TokenType, the same numbers as SentencePiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def is_gguf(path) -> bool:
    """Whether `path` names a GGUF file (a file whose name ends in .gguf), read here, not a checkpoint directory."""
    p = Path(path)
    return p.suffix.lower() == ".gguf" and p.is_file()


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"reading GGUF files needs the gguf package ({e}); install glmkit[gguf]") from None
    return gguf


@functools.lru_cache(maxsize=1)
def _open_reader(resolved: str, size: int, mtime_ns: int):
    return _gguf().GGUFReader(resolved)


def _reader(path: Path):
    """gguf.GGUFReader over the memory-mapped file; a damaged or foreign file is a CheckpointError.

    The last file's reader is kept (while its size and time are unchanged): the reader parses every
    vocabulary string into its own arrays (14 s for 151K tokens and 151K merges, GLM-4's, on a busy 2-core machine), and
    one command reads the file's metadata three or four times (plan, tokenizer, weights)."""
    _gguf()
    st = path.stat()
    try:
        reader = _open_reader(str(path.resolve()), st.st_size, st.st_mtime_ns)
    except Exception as e:  # the reader raises ValueError, IndexError, struct and numpy errors on damage
        raise CheckpointError(f"{path}: cannot be read as GGUF ({type(e).__name__}: {e}); the file is truncated, "
                              "corrupt or not a GGUF file: download or convert it again") from None
    if reader.byte_order != "I":
        raise CheckpointError(f"{path}: a byte-swapped (big-endian) GGUF file; glmkit reads little-endian GGUF files")
    return reader


def _field(reader, path: Path, key: str, kind: type, default=...):
    """Metadata value `key` checked to be `kind` (int, float, str, bool or list); absent: `default`."""
    f = reader.fields.get(key)
    if f is None:
        if default is ...:
            raise CheckpointError(f"{path}: has no metadata key {key!r}, which a GLM GGUF file carries; "
                                  "the file was not written by llama.cpp's converter, or is damaged")
        return default
    v = f.contents()
    if kind is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if ok and f.types[0] == _gguf().GGUFValueType.FLOAT32:  # the shortest decimal of the float32: 1.5625e-07, as written
            v = float(str(np.float32(v)))
    else:
        ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if not ok:
        raise CheckpointError(f"{path}: metadata key {key!r} holds {type(v).__name__} {str(v)[:40]!r}, "
                              f"expected {kind.__name__}")
    return v


def _count(reader, path: Path, key: str, default=...) -> int:
    """A per-model count that llama.cpp also accepts as one value per layer: those must all be equal."""
    f = reader.fields.get(key)
    if f is not None and len(f.types) > 1:
        v = _field(reader, path, key, list)
        if not v or len(set(v)) != 1:
            raise CheckpointError(f"{path}: {key} differs between layers ({sorted(set(v))[:4]}); glmkit models have "
                                  "the same shape in every layer")
        return int(v[0])
    v = _field(reader, path, key, int, default)
    if v is not None and v <= 0:
        raise CheckpointError(f"{path}: {key} = {v}; it must be positive")
    return v


@dataclass
class GGUFModel:
    """An opened, checked GGUF file: its config, and for each glmkit tensor the file's tensors that form it."""
    path: Path
    arch: str
    cfg: ModelConfig
    tensors: dict  # name -> gguf ReaderTensor
    entries: list[tuple[str, tuple[str, ...]]]  # (glmkit name, file names joined by rows in this order)


def _entries(cfg: ModelConfig, names: set[str]) -> list[tuple[str, tuple[str, ...]]]:
    out = [("embed.weight", ("token_embd.weight",)), ("norm.weight", ("output_norm.weight",))]
    if not cfg.tie_embeddings:
        out.append(("head.weight", ("output.weight",)))
    for i in range(cfg.n_layers):
        o, b = f"layers.{i}.", f"blk.{i}."
        fused = b + "attn_qkv.weight" in names
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            their = (b + f"attn_qkv.{kind}",) if fused and b + f"attn_qkv.{kind}" in names else \
                tuple(b + f"attn_{p}.{kind}" for p in "qkv")
            out.append((o + f"attn.qkv.{kind}", their))
        out += [(o + "norm1.weight", (b + "attn_norm.weight",)), (o + "attn.out.weight", (b + "attn_output.weight",)),
                (o + "norm2.weight", (b + "ffn_norm.weight",)), (o + "mlp.up.weight", (b + "ffn_up.weight",)),
                (o + "mlp.down.weight", (b + "ffn_down.weight",))]
        if cfg.sandwich_norm:
            out += [(o + "post_attn_norm.weight", (b + "post_attention_norm.weight",)),
                    (o + "post_mlp_norm.weight", (b + "post_ffw_norm.weight",))]
    return out


def _shape(t) -> tuple[int, ...]:
    """A tensor's shape in PyTorch order (rows first); GGUF stores ggml's (columns first)."""
    return tuple(int(x) for x in reversed(t.shape.tolist()))


def open_gguf(path) -> GGUFModel:
    """Read and check a GGUF file's metadata and tensor table (no tensor data): the architecture, the
    config, every tensor's name, shape and type. Every problem is a CheckpointError naming the file and
    what is wrong; nothing is read after one."""
    path = Path(path)
    gguf = _gguf()
    reader = _reader(path)
    K = gguf.Keys.LLM
    arch = _field(reader, path, gguf.Keys.General.ARCHITECTURE, str)
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: architecture {arch!r}; glmkit reads GGUF files of the chatglm (GLM-4, ChatGLM2/3) "
                              "and glm4 (GLM-4-0414) architectures only")
    key = lambda k: k.format(arch=arch)
    for k, what in ((gguf.Keys.Rope.DIMENSION_SECTIONS, "M-RoPE sections (a vision model)"),
                    (K.NEXTN_PREDICT_LAYERS, "next-token prediction layers")):
        if key(k) in reader.fields:
            raise CheckpointError(f"{path}: has {what} ({key(k)}); glmkit reads text-only GLM files without them")
    scaling = _field(reader, path, key(gguf.Keys.Rope.SCALING_TYPE), str, "none")
    if scaling != "none":
        raise CheckpointError(f"{path}: rope scaling {scaling!r}; glmkit supports plain RoPE only")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: has no token_embd.weight; the file is incomplete or not a language model")
    C = _count(reader, path, key(K.EMBEDDING_LENGTH))
    H = _count(reader, path, key(gguf.Keys.Attention.HEAD_COUNT))
    D = _count(reader, path, key(gguf.Keys.Attention.KEY_LENGTH), C // H)
    Dv = _count(reader, path, key(gguf.Keys.Attention.VALUE_LENGTH), D)
    if Dv != D:
        raise CheckpointError(f"{path}: key_length {D} != value_length {Dv}; glmkit needs one head size")
    n_rot = _count(reader, path, key(gguf.Keys.Rope.DIMENSION_COUNT), D)
    try:
        cfg = ModelConfig(
            vocab_size=_shape(tensors["token_embd.weight"])[0], dim=C, n_layers=_count(reader, path, key(K.BLOCK_COUNT)),
            n_heads=H, n_kv_heads=_count(reader, path, key(gguf.Keys.Attention.HEAD_COUNT_KV), H), head_dim=D,
            ffn_dim=_count(reader, path, key(K.FEED_FORWARD_LENGTH)),
            max_seq_len=_count(reader, path, key(K.CONTEXT_LENGTH)), position="rope_partial",
            rope_theta=_field(reader, path, key(gguf.Keys.Rope.FREQ_BASE), float, 10000.0),
            rope_fraction=n_rot / D, norm="rmsnorm",
            norm_eps=_field(reader, path, key(gguf.Keys.Attention.LAYERNORM_RMS_EPS), float), mlp="swiglu",
            qkv_bias="blk.0.attn_qkv.bias" in tensors or "blk.0.attn_q.bias" in tensors,
            sandwich_norm=arch == "glm4", tie_embeddings="output.weight" not in tensors,
            source="glm4_hf" if arch == "glm4" else "glm_hf",
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: its metadata does not describe a model glmkit can build ({e})") from None
    if cfg.rotary_dim != n_rot:
        raise CheckpointError(f"{path}: rope.dimension_count {n_rot} of head size {D} is not a fraction glmkit represents")
    entries = _entries(cfg, set(tensors))
    _check_tensors(path, arch, cfg, tensors, entries)
    if all(tensors[n].tensor_type.name == "Q4_0" for o, ns in entries if _linear(o) for n in ns):
        head = not cfg.tie_embeddings and tensors["output.weight"].tensor_type.name == "Q4_0"
        cfg = replace(cfg, quant={"bits": 4, "group_size": Q4_0_GROUP, "head": head})
    return GGUFModel(path, arch, cfg, tensors, entries)


def _linear(ours: str) -> bool:
    return ours.endswith(".weight") and ours[: -len(".weight")].endswith(TARGETS)


def _check_tensors(path: Path, arch: str, cfg: ModelConfig, tensors: dict, entries: list):
    from .model import GLM

    with torch.device("meta"):
        want = GLM(cfg).state_dict()
    used = {n for _, ns in entries for n in ns}
    missing = sorted(used - set(tensors))
    if missing:
        raise CheckpointError(f"{path}: is missing {len(missing)} tensor(s), e.g. {missing[:3]}; the file is incomplete or "
                              f"its metadata (block_count={cfg.n_layers}) does not match its tensors")
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointError(f"{path}: has {len(extra)} tensor(s) that a {arch} model does not, e.g. {extra[:3]}; "
                              "glmkit does not know what they do, so it does not read the file")
    for ours, theirs in entries:
        for n in theirs:
            kind = tensors[n].tensor_type.name
            if kind not in FLOATS and kind not in DEQUANTIZED:
                raise CheckpointError(
                    f"{path}: tensor {n} has type {kind}, which glmkit does not read. It reads {', '.join(FLOATS)}, Q4_0 "
                    f"(as int4) and dequantizes {', '.join(t for t in DEQUANTIZED if t != 'Q4_0')}; "
                    "quantize the model again (llama.cpp's llama-quantize) to one of those")
        shapes = [_shape(tensors[n]) for n in theirs]
        rows = sum(s[0] for s in shapes)
        got = (rows, *shapes[0][1:]) if all(s[1:] == shapes[0][1:] for s in shapes) else None
        if got != tuple(want[ours].shape):
            raise CheckpointError(f"{path}: tensor {theirs[0] if len(theirs) == 1 else list(theirs)} has shape "
                                  f"{shapes[0] if len(shapes) == 1 else shapes}, but the metadata implies "
                                  f"{tuple(want[ours].shape)} for {ours}; the tensors and the metadata disagree")


def read_config(path) -> ModelConfig:
    """The ModelConfig of a GGUF file (with `quant` int4 / group 32 when its layer linears are all Q4_0)."""
    return open_gguf(path).cfg


# ---- tensors ---------------------------------------------------------------------------------------------------
def _float(t) -> torch.Tensor:
    """A tensor's values as floats: float types as stored, the others dequantized (gguf.quants) into fp32."""
    kind, shape = t.tensor_type.name, _shape(t)
    if kind == "BF16":  # the reader gives its bytes; bf16 is the top half of an fp32, reinterpreted, not converted
        return torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16).reshape(shape)
    if kind in FLOATS:
        return torch.from_numpy(np.array(t.data)).reshape(shape)
    return torch.from_numpy(_gguf().quants.dequantize(t.data, t.tensor_type)).reshape(shape)


def q4_0_as_int4(t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 weight (N, K) as glmkit's int4 layout with groups of 32: (packed uint8 (N, K/2), scales (N, K/32),
    mins (N, K/32)) in fp32, from its blocks' bytes alone. Block: fp16 d, then 16 bytes whose low nibbles are
    columns 0-15 and high nibbles columns 16-31, w = d * (q - 8) = q * d + (-8 d); glmkit packs columns 2j
    (low) and 2j+1 (high) in byte j. q * d and -8 d are exact in fp32, and so is their sum, (q - 8) * d."""
    N, K = _shape(t)
    blocks = torch.from_numpy(np.array(t.data)).reshape(N, K // Q4_0_GROUP, 2 + Q4_0_GROUP // 2)  # (N, G, 18)
    d = blocks[..., :2].contiguous().view(torch.float16)[..., 0].float()  # (N, G)
    qs = blocks[..., 2:]  # (N, G, 16)
    q = torch.cat((qs & 0xF, qs >> 4), dim=-1).reshape(N, K)  # (N, K) in 0..15, column order
    return q[:, 0::2] | (q[:, 1::2] << 4), d, -8 * d


def _default_dtype(t: torch.Tensor, device) -> torch.dtype:
    # as convert's policy: fp16 computes slowly on CPUs, so it becomes fp32 there
    if t.dtype == torch.float16 and torch.device(device or "cpu").type == "cpu":
        return torch.float32
    return torch.float32 if t.dtype == torch.float64 else t.dtype


def stream(path, device=None, dtype=None, quant: dict | None = None):
    """(config, iterator of (glmkit name, tensor)) of a GGUF file, one tensor in memory at a time: the GGUF
    branch of `convert.state_stream`, with its meaning. Floats come out in `dtype` (default: the first
    tensor's, fp16 as fp32 on a CPU). A file whose layer linears are all Q4_0 is int4 already (its config
    says so) and gives their packed weights, scales and mins as stored. With `quant` (a float file), each
    layer linear (and the head, or a copy of a tied embedding) is quantized from its fp32 values as read."""
    g = open_gguf(path)
    cfg = g.cfg
    if cfg.quant and quant:
        raise ValueError(f"{g.path} is already quantized (its layer linears are Q4_0, read as int4 in groups of 32); "
                         "load it as it is")
    quantize_head = bool(quant and quant["head"])

    def quantized(module: str, w: torch.Tensor):
        from .quantize import quantized_tensors

        return quantized_tensors(module, w, quant, dtype)

    def tensors():
        nonlocal dtype
        for ours, theirs in g.entries:
            module = ours.rpartition(".")[0]
            as_int4 = cfg.quant and (_linear(ours) or (ours == "head.weight" and cfg.quant["head"]))
            if as_int4:  # the file's Q4_0 blocks, repacked; row blocks of q, k, v stack like rows
                parts = [q4_0_as_int4(g.tensors[n]) for n in theirs]
                packed, scales, mins = (torch.cat(p, 0) if len(p) > 1 else p[0] for p in zip(*parts))
                dtype = dtype or torch.float32
                yield from ((module + ".weight", packed), (module + ".scales", scales.to(dtype)),
                            (module + ".mins", mins.to(dtype)))
                continue
            ts = [_float(g.tensors[n]) for n in theirs]
            w = torch.cat(ts, 0) if len(ts) > 1 else ts[0]
            dtype = dtype or _default_dtype(w, device)
            if quant and (_linear(ours) or (ours == "head.weight" and quantize_head)):
                yield from quantized(module, w)
                continue
            yield ours, w.to(dtype)
            if ours == "embed.weight" and quantize_head and cfg.tie_embeddings:  # a quantized copy as the head
                yield from quantized("head", w)

    return (replace(cfg, quant=quant) if quant else cfg), tensors()


def stored_dtype(path) -> torch.dtype | None:
    """The float dtype holding most of the file's bytes (F32, F16, BF16); None when quantized types hold more."""
    counts: dict = {}
    for t in _reader(Path(path)).tensors:
        kind = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(t.tensor_type.name)
        counts[kind] = counts.get(kind, 0) + int(t.n_bytes)
    return max(counts, key=counts.get) if counts else None


def verify(path) -> tuple[list[str], str]:
    """(problems, summary) of a GGUF file, as convert.verify_checkpoint: its metadata, every tensor's name,
    shape and type, and the file's size against its tensor table; no tensor data is read."""
    try:
        g = open_gguf(path)
    except CheckpointError as e:
        return [str(e)], ""
    kinds: dict[str, int] = {}
    for t in g.tensors.values():
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    size = Path(path).stat().st_size
    how = "int4 (group 32) as stored" if g.cfg.quant else "floats"
    return [], (f"{len(g.tensors)} tensors ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}), "
                f"{size / 2**20:.1f} MiB: the file holds every tensor its table lists, names and shapes match the "
                f"{g.arch} architecture's metadata; layer linears read as {how}")


# ---- vocabulary ------------------------------------------------------------------------------------------------
def read_vocab(path):
    """The GGUF file's vocabulary: a `tokenizers.Tokenizer` (gpt2: byte-level BPE), or the bytes of a
    SentencePiece model (llama), for `Tokenizer.from_sentencepiece`. Ids are the file's."""
    path = Path(path)
    gguf = _gguf()
    reader = _reader(path)
    T = gguf.Keys.Tokenizer
    model = _field(reader, path, T.MODEL, str)
    tokens = _field(reader, path, T.LIST, list)
    types = _field(reader, path, T.TOKEN_TYPE, list, [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise CheckpointError(f"{path}: {len(tokens)} tokens but {len(types)} token types; the vocabulary is damaged")
    if model == "gpt2":
        return _byte_level_bpe(path, reader, tokens, types)
    if model == "llama":
        return _sentencepiece(path, reader, tokens, types)
    raise CheckpointError(f"{path}: vocabulary type {model!r}; glmkit reads gpt2 (GLM-4) and llama (ChatGLM3) "
                          "vocabularies. Pass the model's own tokenizer with --tokenizer")


def _byte_level_bpe(path: Path, reader, tokens: list[str], types: list[int]):
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    gguf = _gguf()
    pre = _field(reader, path, gguf.Keys.Tokenizer.PRE, str, None)
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{path}: pre-tokenizer {pre!r} is not one glmkit knows for GLM vocabularies "
                              f"({', '.join(PRE_TOKENIZERS)}); pass the model's tokenizer.json with --tokenizer")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        dup = next(t for i, t in enumerate(tokens) if vocab[t] != i)
        raise CheckpointError(f"{path}: token {dup!r} appears twice in the vocabulary; the file is damaged")
    merges = []
    for m in _field(reader, path, gguf.Keys.Tokenizer.MERGES, list):
        pair = tuple(m.split(" "))
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or "".join(pair) not in vocab:
            raise CheckpointError(f"{path}: merge {m!r} is not two tokens of the vocabulary joined by one space")
        merges.append(pair)
    # glm4: llama.cpp takes a pre-token that is itself in the vocabulary whole, before any merge
    tok = HFTokenizer(models.BPE(vocab, merges, ignore_merges=pre == "glm4"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZERS[pre]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    return tok


def _sentencepiece(path: Path, reader, tokens: list[str], types: list[int]) -> bytes:
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:
        raise ImportError(f"reading {path}'s SentencePiece vocabulary needs the sentencepiece and protobuf packages "
                          f"({e}); install glmkit[sp]") from None
    gguf = _gguf()
    T = gguf.Keys.Tokenizer
    scores = _field(reader, path, T.SCORES, list, [0.0] * len(tokens))
    if len(scores) != len(tokens) or any(k not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) for k in types):
        raise CheckpointError(f"{path}: the token scores or types do not match the tokens; the vocabulary is damaged")
    proto = pb.ModelProto()
    for text, score, kind in zip(tokens, scores, types):
        p = proto.pieces.add()
        p.piece, p.score, p.type = text, score, kind
    # llama.cpp's `llama` vocabulary merges pieces by score: SentencePiece's BPE model, not its unigram one
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = BYTE in types
    unk = _field(reader, path, T.UNK_ID, int, types.index(UNKNOWN) if UNKNOWN in types else 0)
    proto.trainer_spec.unk_id = unk
    for name, key in (("bos_id", T.BOS_ID), ("eos_id", T.EOS_ID), ("pad_id", T.PAD_ID)):
        v = _field(reader, path, key, int, -1)
        setattr(proto.trainer_spec, name, v if v != unk else -1)
    # no normalization (llama.cpp applies none), spaces as "▁", a leading one unless the file says otherwise
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = _field(reader, path, T.ADD_PREFIX, bool, True)
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    return proto.SerializeToString()


def vocab_files(path, directory) -> list[Path]:
    """Write the GGUF file's vocabulary into `directory` as the file a checkpoint directory carries
    (tokenizer.json, or tokenizer.model for a SentencePiece one); return its path, for `extra_files`."""
    vocab = read_vocab(path)
    if isinstance(vocab, bytes):
        out = Path(directory) / "tokenizer.model"
        out.write_bytes(vocab)
    else:
        out = Path(directory) / "tokenizer.json"
        vocab.save(str(out))
    return [out]
