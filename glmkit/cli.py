"""`glmkit <command>`: each command is one module's main().

    glmkit serve [--model M]     the MaaS server (OpenAI-compatible), default: the embedded model
    glmkit keys / usage          API keys; per-key tokens, compute time, cost, revenue
    glmkit info PATH|PRESET      configuration, parameter count, memory per dtype (--verify: every file whole)
    glmkit convert SRC DST       read any supported GLM checkpoint, write it in another layout
    glmkit tokenizer train ...   train a byte-level BPE with the GLM special tokens
    glmkit data build ...        assemble the default corpus (or your files) into the cache
    glmkit data tokenize ...     tokenize a built corpus into memmap shards
    glmkit pretrain ...          pretrain with GLM's objective (torchrun for many processes)
    glmkit plot RUN_DIR          loss and bits-per-character curves as PNG
    glmkit quantize SRC DST      weight-only int8 / int4 checkpoint
    glmkit export SRC DST        HF directory or ONNX graphs
    glmkit fill TEXT             fill every [MASK] / [sMASK] / [gMASK] of a text
    glmkit generate / chat       continue a prompt; interactive chat
    glmkit finetune ...          cloze classification or SFT, full or LoRA
    glmkit eval ...              the evaluation suites (JSON + markdown table)
    glmkit lm-eval ...           lm-evaluation-harness with glmkit registered
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# command -> ("module:function", one-line help); modules are imported only when their command runs
COMMANDS = {
    "info": ("glmkit.cli:info", "show a checkpoint's or preset's config, parameter count and memory per dtype"),
    "convert": ("glmkit.convert:main", "convert a checkpoint between glmkit, HF GLM/GLM-4, THUDM GLM and ChatGLM-6B layouts"),
    "tokenizer": ("glmkit.tokenizer:main", "train a byte-level BPE tokenizer with the GLM special tokens"),
    "data": ("glmkit.cli:data", "build the corpus (`data build`) and tokenize it into shards (`data tokenize`)"),
    "pretrain": ("glmkit.train:main", "pretrain or continue pretraining with the blank-infilling objective"),
    "plot": ("glmkit.train:plot", "draw a run's loss and bits-per-character curves as PNG"),
    "quantize": ("glmkit.cli:quantize", "weight-only int8 / int4 quantization of a checkpoint"),
    "export": ("glmkit.export:main", "export a checkpoint as an HF directory or ONNX graphs (prefill, decode)"),
    "serve": ("glmkit.server.app:main", "serve a model over HTTP: OpenAI-compatible API, /v1/fill, /infill, /v1/classify, /metrics"),
    "keys": ("glmkit.server.maas:keys_main", "API keys for `glmkit serve`: create | list | revoke (stored hashed)"),
    "usage": ("glmkit.server.maas:usage_main", "per-key usage: requests, tokens, compute seconds, cost, revenue, margin"),
    "lb-config": ("glmkit.server.replicas:main", "HAProxy config for several `glmkit serve` replicas on one database"),
    "fill": ("glmkit.cli:fill_main", "fill the [MASK]/[sMASK]/[gMASK] blanks of a text, left to right"),
    "generate": ("glmkit.cli:generate_main", "continue a prompt, streaming the text"),
    "chat": ("glmkit.cli:chat_main", "chat on stdin, streaming; /reset clears, /exit quits"),
    "finetune": ("glmkit.finetune:main", "fine-tune for cloze classification or SFT, fully or with LoRA"),
    "eval": ("glmkit.evaluate:eval_main", "evaluate: bits/char, infilling, cloze, Tang-300, idioms, HumanEval line infilling"),
    "lm-eval": ("glmkit.lm_eval_adapter:main", "lm-evaluation-harness with the glmkit model registered"),
}


def data(argv):
    """`glmkit data build ...` and `glmkit data tokenize ...`."""
    if argv and argv[0] == "build":
        from .data.corpus import main as build

        return build(argv)
    if argv and argv[0] == "tokenize":
        from .data.shards import main as tokenize

        return tokenize(argv[1:])
    print("usage: glmkit data build [...] | glmkit data tokenize [...]  (add -h for options)")
    return 2


def quantize(argv=None) -> int:
    """`glmkit quantize SRC DST --bits 8|4`: a weight-only quantized copy of a checkpoint, streamed
    (one tensor in memory at a time, output shards written as they fill)."""
    import torch

    from .convert import quantize_checkpoint
    from .quantize import quant_spec

    p = argparse.ArgumentParser(prog="glmkit quantize", description="Weight-only int8/int4 quantization of a checkpoint "
                                "(any layout glmkit reads), one tensor at a time: memory stays near one output shard.")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--bits", type=int, choices=[8, 4], required=True)
    p.add_argument("--group-size", type=int, default=64, help="int4 group size: 32, 64, 128 or 256 (default 64)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="dtype of the non-quantized tensors and scales")
    p.add_argument("--shard-mib", type=int, default=1024, help="largest output shard in MiB (default 1024)")
    a = p.parse_args(argv)
    quant_spec(a.bits, a.group_size)  # bad values refused before anything is read
    if a.shard_mib < 1:
        raise ValueError(f"--shard-mib {a.shard_mib}: must be >= 1")
    t0 = time.perf_counter()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    before, after = quantize_checkpoint(a.src, a.dst, a.bits, a.group_size, dtype, a.shard_mib << 20)
    print(f"{a.src} -> {a.dst}: int{a.bits}{f' (group {a.group_size})' if a.bits == 4 else ''}, "
          f"{before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s")
    return 0


def describe(cfg, source: str, plan=None, why: str = "") -> str:
    """A config's sizes and fields; with `plan` (and dtype auto's `why`), what it takes on this machine."""
    import torch

    from .plan import CLI_CONTEXT, CLI_FLAGS, SERVE_FLAGS, Plan, active_weight_bytes, kv_cache_bytes, quant_spec, show, weight_bytes

    n, n_body = cfg.num_params(), cfg.num_params(embeddings=False)
    lines = [f"{source}", f"  parameters: {n:,} ({n / 1e6:.1f}M; {n_body / 1e6:.1f}M without embeddings)"]
    if cfg.n_experts:  # what one token's forward reads: a mixture of experts reads n_experts_per_tok experts
        act = cfg.num_params(active=True)
        lines.append(f"  active:     {act:,} per token ({act / 1e6:.1f}M: attention, norms, dense layers, router, "
                     f"shared and {cfg.n_experts_per_tok} of {cfg.n_experts} routed experts per MoE layer, embeddings "
                     f"and head); {show(active_weight_bytes(cfg, torch.bfloat16))} read per token in bf16, "
                     f"{show(active_weight_bytes(cfg, torch.bfloat16, quant_spec('int4')))} in int4")
    if cfg.n_mtp_layers:
        lines.append(f"  MTP:        {cfg.n_mtp_layers} multi-token-prediction layer(s) loaded (not counted above)")
    if cfg.quant:
        lines.append(f"  weights:    int{cfg.quant['bits']} {show(sum(weight_bytes(cfg, torch.bfloat16).values()))} "
                     f"(bf16 float parts), {show(sum(weight_bytes(cfg, torch.float32).values()))} (fp32)")
    else:
        sizes = [(k, sum(weight_bytes(cfg, dt, quant_spec(q)).values())) for k, dt, q in
                 (("fp32", torch.float32, None), ("bf16", torch.bfloat16, None), ("int8", torch.bfloat16, "int8"),
                  ("int4", torch.bfloat16, "int4"))]
        lines.append("  weights:    " + ", ".join(f"{k} {show(b)}" for k, b in sizes)
                     + " (int8 / int4: bf16 scales, embeddings and norms; int4 in groups of 64)")
    kv1k = kv_cache_bytes(cfg, 1, 1024, torch.bfloat16)
    lines.append(f"  KV cache:   {show(kv1k)} per 1K tokens in bf16, {show(2 * kv1k)} in fp32, "
                 f"{show(kv_cache_bytes(cfg, 1, 1024, torch.int8))} in int8 (serve --kv-dtype int8); "
                 f"{show(kv_cache_bytes(cfg, 1, cfg.max_seq_len, torch.bfloat16))} per row at {cfg.max_seq_len} tokens in bf16")
    if plan is not None:
        T = plan.prefill or plan.max_len
        chunk = (f"prefill chunks of {T:,} tokens" if T < plan.max_len else
                 "a prompt's Part A prefilled whole" if cfg.prefix_lm else "whole prompts prefilled")
        lines.append(f"  memory plan for `glmkit serve` here (--max-batch {plan.rows}, --max-len {plan.max_len:,}, {chunk}):")
        lines += [f"    {w}" for w in why.split("; ") if w]
        lines.append(_indent(plan.table()))
        if plan.available is not None:
            tips = plan.suggestions(SERVE_FLAGS) if not plan.fits else []
            lines.append(f"    fits: context per request {plan.context:,} tokens, {plan.kv_tokens:,} tokens in flight"
                         if plan.fits else f"    does not fit: {plan.shortfall()}")
            if not plan.fits:
                lines.append("    fits with: " + "; ".join(t for t, _ in tips) if tips else "    nothing fits: a machine with more memory")
        cli = Plan(cfg, plan.dtype, rows=1, max_len=min(cfg.max_seq_len, CLI_CONTEXT), quant=plan.quant, device=plan.device,
                   available=plan.available)
        lines.append(f"  memory plan for `glmkit generate / chat` ({cli.max_len:,} tokens of context):")
        lines.append(_indent(cli.table()))
        if plan.available is not None:
            tips = cli.suggestions(CLI_FLAGS) if not cli.fits else []
            lines.append("    fits" if cli.fits else "    needs " + ("; or ".join(t for t, _ in tips) or "more memory"))
    lines.append("  config:")
    lines += [f"    {k}: {v}" for k, v in cfg.to_dict().items()]
    return "\n".join(lines)


def _indent(table: str) -> str:
    return "\n".join("  " + line for line in table.split("\n"))


def info(argv=None):
    from .config import PRESETS, get_preset
    from .convert import config_of, stored_dtype, verify_checkpoint
    from .devices import resolve_device

    p = argparse.ArgumentParser(prog="glmkit info", description=COMMANDS["info"][1])
    p.add_argument("model", nargs="?", default=None,
                   help=f"checkpoint directory or preset ({', '.join(PRESETS)}); default: the embedded model")
    p.add_argument("--device", default="auto", help="the device to plan for (default auto)")
    p.add_argument("--verify", action="store_true",
                   help="also check every weight file's size against its header and the tensor names against "
                        "config.json (reads headers only; exit code 1 when anything is damaged)")
    g = p.add_argument_group("the serve plan for these `glmkit serve` flags")
    g.add_argument("--dtype", default="auto", help="auto|fp32|bf16|fp16 (default auto)")
    add_quantize_arg(g)
    g.add_argument("--max-batch", type=int, default=None, help="streams decoded together (default 8)")
    g.add_argument("--max-len", type=int, default=None, help="context per request (default: the model's)")
    g.add_argument("--kv-memory", default=None, help="KV pool size, e.g. 4GiB (default: what the memory left holds)")
    a = p.parse_args(argv)
    for name in ("max_batch", "max_len"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if a.model is None:
        from .convert import default_model_path

        a.model = str(default_model_path())
    path = Path(a.model)
    device = resolve_device(a.device)
    if a.model in PRESETS and not path.exists():
        cfg = get_preset(a.model)
        plan, why = memory_plan(a, "serve", cfg, None, device)
        print(describe(cfg, f"preset {a.model}", plan, why))
        return 0
    fmt, cfg = config_of(path)  # CheckpointError / ConfigError name the file and field; main prints them
    stored = stored_dtype(path)
    plan, why = memory_plan(a, "serve", cfg, stored, device)
    print(describe(cfg, f"{path} (format {fmt.name}, stored {str(stored).removeprefix('torch.')})", plan, why))
    if not a.verify:
        print("  files:      not checked; `glmkit info --verify PATH` checks them against their headers")
        return 0
    problems, summary = verify_checkpoint(path)
    for problem in problems:
        print(f"glmkit info: error: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"  verified:   {summary}")
    return 0


def memory_plan(a, command: str, cfg, stored, device):
    """(the memory Plan for `command` with the flags in `a`, dtype auto's reason or ""), before loading.

    serve: --max-batch (default 8) streams of up to --max-len (default the model's context) tokens each, in
    the engine's paged KV pool: --kv-memory bytes, or what the budget leaves after the weights, the CPU
    kernels' copies and the workspace of one prefill chunk (--prefill-chunk; auto: its upper bound). A
    request's context is --max-len, or the pool's size when that holds less (the reason says so); the plan
    does not fit when the pool cannot hold one request of min(4096, --max-len). generate / chat / fill:
    --num-beams rows of the model's context, at most CLI_CONTEXT (4K) tokens, in a contiguous cache.
    dtype auto is decided on this plan (`plan.auto_dtype`)."""
    import torch

    from .devices import resolve_dtype
    from .plan import CLI_CONTEXT, KV_BLOCK, SERVE_ROWS, Plan, auto_dtype, kv_pool_bytes, parse_size, quant_spec, serve_prefill, show

    quant = quant_spec(getattr(a, "quantize", None))
    serve = command == "serve"
    if serve:
        max_len = getattr(a, "max_len", None) or cfg.max_seq_len
        kv_memory = parse_size(a.kv_memory) if getattr(a, "kv_memory", None) else None
        chunk = serve_prefill(cfg, max_len, getattr(a, "prefill_chunk", None))  # None: as auto, the default's bound
        plan = Plan(cfg, torch.float32, getattr(a, "max_batch", None) or SERVE_ROWS, max_len, quant, device,
                    prefill=chunk, pool=True, kv_memory=kv_memory,
                    kv_dtype=kv_dtype_arg(getattr(a, "kv_dtype", None)))
    else:
        plan = Plan(cfg, torch.float32, max(1, getattr(a, "num_beams", 1)), min(cfg.max_seq_len, CLI_CONTEXT), quant, device)
    why = ""
    if (a.dtype or "auto") == "auto":
        dtype, why = auto_dtype(plan, stored)
    else:
        dtype = resolve_dtype(a.dtype, device)
    plan = plan.with_(dtype=dtype)
    if serve and plan.fits and plan.context < plan.max_len:
        full = kv_pool_bytes(cfg, -(-plan.max_len // KV_BLOCK), dtype)
        why = (why + "; " if why else "") + (f"context per request: {plan.context:,} tokens, what the KV pool holds "
                                             f"({plan.max_len:,} would take {show(full)} of KV)")
    return plan, why


# ---- generation commands: fill, generate, chat (and the loader `glmkit serve` shares) ----------------------
# the sampling flags: SamplingParams field -> help; each flag's type and default are the field's
SAMPLING_FLAGS = dict(max_new_tokens="", temperature="0 = greedy (default %(default)s)", top_k="0 = off", top_p="1 = off",
                      min_p="0 = off", repetition_penalty="", presence_penalty="", frequency_penalty="", seed="",
                      num_beams="", length_penalty="", no_repeat_ngram_size="")


def add_sampling_args(p, temperature: float = 1.0, max_new_tokens: int = 128):
    from .sampling import SamplingParams

    d = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    p.add_argument("--model", default=None, help="checkpoint directory (with tokenizer.json) or preset; "
                   "default: the embedded default model")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or file (default: the model's directory)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps|xpu|npu|mlu|musa (default auto)")
    p.add_argument("--dtype", default="auto", help="auto|fp32|bf16|fp16 (default auto: bf16 on GPUs, fp32 on CPU)")
    add_quantize_arg(p)
    g = p.add_argument_group("sampling")
    for name, note in SAMPLING_FLAGS.items():
        kind = float if isinstance(getattr(d, name), float) else int  # seed's default is None
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(d, name), help=note or None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile")


def add_kv_dtype_arg(p):
    p.add_argument("--kv-dtype", choices=["auto", "int8"], default="auto",
                   help="the KV cache's dtype: auto (the model's) or int8 (half of bf16's memory per token, one fp32 scale "
                        "per key and value vector; logits within int8 rounding of auto's)")


def kv_dtype_arg(name: str | None):
    """--kv-dtype auto | int8 -> the engine's kv_dtype: None (the model's) or torch.int8."""
    import torch

    if name in (None, "auto"):
        return None
    if name == "int8":
        return torch.int8
    raise ValueError(f"--kv-dtype {name}: choose auto or int8")


def add_quantize_arg(p):
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="quantize the weights as they are read (int4: groups of 64); memory stays near the quantized "
                        "model's size; the same model as `glmkit quantize` would write")


def params_from_args(a, stop_ids=()):
    from .sampling import SamplingParams

    return SamplingParams(**{k: getattr(a, k) for k in SAMPLING_FLAGS}, stop=tuple(a.stop), stop_ids=tuple(stop_ids))


def load_for_cli(a, command: str):
    """(model, tokenizer) from --model / --device / --dtype (and --quantize, --max-batch, --max-len, --kv-memory,
    --prefill-chunk where the command has them). The memory plan is checked before anything is loaded: what
    cannot fit is a MemoryError naming flags that would. Prints the resolved device and dtype once. For serve,
    a.max_len (the context per request), a.max_batch and a.kv_memory (the KV pool's bytes, for the engine)
    are set to what the plan settled."""
    from .config import PRESETS, get_preset
    from .convert import config_of, load, stored_dtype
    from .devices import resolve_device
    from .plan import CLI_FLAGS, SERVE_FLAGS
    from .tokenizer import load_tokenizer

    if a.model is None:  # the embedded default model (a clear error if this install has none)
        from .convert import default_model_path

        a.model = str(default_model_path())
    preset = a.model in PRESETS and not Path(a.model).exists()
    if preset and a.tokenizer is None:
        raise ValueError(f"--model {a.model} is a preset (random weights) and ships no tokenizer; pass --tokenizer PATH, "
                         "or a checkpoint directory (config.json, weights, tokenizer.json) as --model")
    device = resolve_device(a.device)
    cfg, stored = (get_preset(a.model), None) if preset else (config_of(a.model)[1], stored_dtype(a.model))
    plan, why = memory_plan(a, command, cfg, stored, device)
    tokenizer = load_tokenizer(a.tokenizer or a.model)
    print(f"glmkit {command}: device {device}, dtype {str(plan.dtype).removeprefix('torch.')}"
          + (f" ({why})" if why else ""), file=sys.stderr)
    plan.check(f"glmkit {command}", SERVE_FLAGS if command == "serve" else CLI_FLAGS)
    if command == "serve":  # the engine's limits and its pool, as planned
        a.max_len, a.max_batch, a.kv_memory = plan.context, plan.rows, plan.kv_bytes
    model = load(a.model, device=device, dtype=plan.dtype, quantize=getattr(a, "quantize", None)).eval()
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.cfg.vocab_size} "
                         "embeddings; they do not belong together")
    return model, tokenizer


def fill_main(argv=None) -> int:
    """`glmkit fill TEXT`: fill the [MASK] / [sMASK] / [gMASK] blanks of TEXT."""
    from .generate import fill

    p = argparse.ArgumentParser(prog="glmkit fill", description="Fill the [MASK], [sMASK] and [gMASK] blanks of a text, left to right.")
    p.add_argument("text", help='e.g. "床前明月光，[MASK]。"')
    p.add_argument("--blank", action="append", default=[], metavar="JSON",
                   help='a typed blank, repeatable, one per mask in order (the rest untyped), as in /v1/fill\'s "blanks": '
                        '{"choices": [...]} | {"regex": "..."} | {"json_schema": {...}}, with "max_tokens" and "stop"; '
                        '{} for an untyped one')
    add_sampling_args(p, temperature=0.0, max_new_tokens=64)
    a = p.parse_args(argv)
    params = params_from_args(a)  # validate flags before loading anything
    blanks = [blank_arg(b) for b in a.blank]
    model, tok = load_for_cli(a, "fill")
    res = fill(model, tok, a.text, params, blanks=blanks, compile=a.compile)
    print(res.text)
    for s in res.spans:
        print(f"  {s.mask} -> {s.text!r} ({s.finish_reason})", file=sys.stderr)
    return 0


def blank_arg(text: str):
    """`glmkit fill --blank JSON` -> generate.Blank (ValueError naming what is wrong)."""
    import json

    from .generate import Blank

    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--blank {text!r} is not JSON ({e}); e.g. --blank '{{\"choices\": [\"yes\", \"no\"]}}'") from None
    fields = ("choices", "regex", "json_schema", "max_tokens", "stop")
    if not isinstance(d, dict) or set(d) - set(fields):
        raise ValueError(f"--blank {text!r}: give a JSON object with some of {', '.join(fields)}")
    try:
        return Blank.of(d.get("choices"), d.get("regex"), d.get("json_schema"), d.get("max_tokens"), d.get("stop"))
    except ValueError as e:
        raise ValueError(f"--blank {text!r}: {e}") from None


def generate_main(argv=None) -> int:
    """`glmkit generate --prompt TEXT`: continue a prompt, streaming the text."""
    from .generate import generate, stream
    from .sampling import eos_ids

    p = argparse.ArgumentParser(prog="glmkit generate", description="Continue a prompt (causal generation), streaming the text.")
    p.add_argument("--prompt", required=True)
    p.add_argument("--special", action="store_true", help="read special-token strings in the prompt (e.g. [gMASK]<sop>) as tokens")
    add_sampling_args(p)
    a = p.parse_args(argv)
    params_from_args(a)
    model, tok = load_for_cli(a, "generate")
    params = params_from_args(a, eos_ids(tok))
    ids = tok.encode(a.prompt, allow_special=a.special)
    t0, n, reason = time.perf_counter(), 0, None
    if params.num_beams > 1:
        (c,) = generate(model, [ids], params, tok, compile=a.compile)
        print(c.text)
        n, reason = len(c.token_ids), c.finish_reason
    else:
        for chunk in stream(model, [ids], params, tok, compile=a.compile):
            print(chunk.text, end="", flush=True)
            n += len(chunk.token_ids)
            reason = chunk.finish_reason or reason
        print()
    dt = time.perf_counter() - t0
    print(f"[{reason}: {n} tokens in {dt:.2f} s, {n / dt:.1f} tok/s]", file=sys.stderr)
    return 0


def chat_main(argv=None, stdin=None, stdout=None) -> int:
    """`glmkit chat`: interactive chat over stdin, streaming replies; /reset clears, /exit quits."""
    from .generate import chat_stream

    p = argparse.ArgumentParser(prog="glmkit chat", description="Chat on stdin; /reset clears the history, /exit (or end of input) quits.")
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(p, max_new_tokens=512)
    a = p.parse_args(argv)
    params = params_from_args(a)
    if params.num_beams > 1:
        raise ValueError("glmkit chat streams its replies; beam search cannot stream (drop --num-beams)")
    model, tok = load_for_cli(a, "chat")
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    start = [{"role": "system", "content": a.system}] if a.system else []
    history = list(start)
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = list(start)
            stdout.write("(history cleared)\n")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        for piece in chat_stream(model, tok, history, params, compile=a.compile):
            stdout.write(piece)
            stdout.flush()
            reply += piece
        stdout.write("\n")
        history.append({"role": "assistant", "content": reply})
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: glmkit <command> [options]\n\ncommands:")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:10s} {doc}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    import importlib

    from .convert import CheckpointError

    module, function = COMMANDS[argv[0]][0].split(":")
    entry = getattr(importlib.import_module(module), function)
    # user mistakes (a wrong path, a damaged checkpoint, a bad config.json or option value) print one
    # line; anything else is a bug in glmkit and keeps its traceback
    try:
        return entry(argv[1:]) or 0
    except (CheckpointError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError, NotImplementedError, KeyError, ValueError, MemoryError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e  # str(KeyError) would add quotes
        print(f"glmkit {argv[0]}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
