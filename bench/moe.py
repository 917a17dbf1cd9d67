"""A GLM-4.7-Flash-shaped mixture of experts on this machine: written in int4, loaded, decoded, prefilled.

    .venv/bin/python bench/moe.py --out /tmp/flash-int4                 # the whole model (~17 GiB in int4)
    .venv/bin/python bench/moe.py --out /tmp/flash-4l --layers 4        # a 4-layer slice: minutes
    .venv/bin/python bench/moe.py --model DIR                           # an existing checkpoint, as it is
    .venv/bin/python bench/moe.py --out /tmp/x --arch glm4_moe --tiny   # a tiny model (checks the script)
    .venv/bin/python bench/moe.py --model /tmp/flash-int4 --llama-cpp DIR   # and llama.cpp's Q4_0 of the same shape

The shape is transformers' `Glm4MoeLiteConfig()` default, which is GLM-4.7-Flash's (47 layers, 2048 hidden,
latent attention with a 512 + 64 latent KV, 64 routed experts of which 4 per token plus 1 shared, the first
layer dense, vocabulary 154,880): 30B parameters, about 3B active per token. Its bf16 checkpoint (60 GB) would
not fit this machine's disk, so it is written directly in glmkit's int4 layout (`--bits 4`, groups of 64; the
output head too), tensor by tensor through `convert.write_stream`: random nibbles with scales and mins of an
N(0, 0.02) weight's range, random N(0, 0.02) float tensors in bf16 as released (the router in fp32, as glmkit
runs it), norms at 1. Nothing holds the model in memory while it is written.

Measured in a child process (so its peak resident memory is the model's alone):
  load        seconds of `glmkit.load(dir)` and the resident memory after it (the files are memory-mapped:
              weights become resident as they are first read)
  prefill     prompt tokens / seconds for a --prefill-token prompt (one new token), run first: it routes to
              every expert, so the decode figures below are of resident weights; then a batch-16 decode
              warm-up (the int4 kernels read scales and mins as stored: nothing is built per expert)
  decode      B / the median time between steps of a stream of --new-tokens tokens, greedy, per batch B
  bound       the bandwidth bound: measured memory bandwidth / bytes one token's forward reads (attention, dense
              and shared MLPs, router, n_experts_per_tok routed experts per MoE layer, the head; one embedding
              row), and decode at batch 1 as a fraction of it. Batch 1 is decoded in --rounds rounds with a
              reading before and after each (in a process of its own, at the same thread count): each round's
              fraction is against the higher of its own two readings (`b1_roundN`, median and lowest in
              `b1_rounds_of_bound`); `decode_b1_of_bound` is the median step of all rounds against the highest
              reading of the whole run (before the load, the rounds', after the decode figures): the stricter
              figure, which a decode run through a slower minute than the best reading's misses
  kv          bytes of KV cache per token (the latent width for latent attention)
Random weights route tokens uniformly at random, a trained model less so: batch-4 decode reads up to
4 x 4 experts per layer here. Report the CPU beside any figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.big_model import bandwidth_gbs  # the same measurement as the dense benchmark

ARCHS = {  # transformers config class, glmkit format, the tiny variant's overrides (--tiny)
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "glm4_moe_lite_hf",
                      dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                           kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                           vocab_size=512, mlp_layer_types=["dense", "sparse", "sparse"])),
    "glm4_moe": ("Glm4MoeConfig", "glm4_moe_hf",
                 dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=8,
                      num_experts_per_tok=2, vocab_size=512, num_nextn_predict_layers=0)),
}


def model_config(arch: str, layers: int | None, tiny: bool, bits: int):
    """glmkit's config of the architecture's default (released-size) shape, read through its format."""
    import transformers

    from glmkit.convert import FORMATS
    from glmkit.quantize import quant_spec

    cls, fmt, small = ARCHS[arch]
    d = getattr(transformers, cls)(**(small if tiny else {})).to_dict()
    if layers:
        d["num_hidden_layers"] = layers
        if d.get("mlp_layer_types"):
            d["mlp_layer_types"] = d["mlp_layer_types"][:layers]
    d["num_nextn_predict_layers"] = 0  # the MTP layer is not part of decoding
    d["architectures"] = [cls.replace("Config", "ForCausalLM")]
    from dataclasses import replace

    cfg = FORMATS[fmt].config_from_hf(d)
    return replace(cfg, chat_format=None, quant=quant_spec(bits, 64 if not tiny else 32, head=True) if bits else None)


def write_model(cfg, out: Path, fmt: str = "glmkit") -> int:
    """Random weights of `cfg` (quantized ones as int4 / int8 codes) written tensor by tensor in layout `fmt`
    (a float model also in the source's: `glm4_moe_lite_hf` for llama.cpp's converter); returns bytes."""
    from glmkit.convert import _meta_model, write_stream
    from glmkit.layers import ROUTER_FP32

    gen = torch.Generator().manual_seed(0)
    meta = _meta_model(cfg).state_dict()
    scale = 0.02 * 3 / 7.5  # an N(0, 0.02) weight spans about +-3 sigma over 15 int4 steps

    def tensors():
        for name, m in meta.items():
            if m.dtype == torch.uint8:  # packed int4 codes
                t = torch.randint(0, 256, m.shape, dtype=torch.uint8, generator=gen)
            elif m.dtype == torch.int8:
                t = torch.randint(-127, 128, m.shape, dtype=torch.int8, generator=gen)
            elif name.endswith(".scales"):
                t = torch.full(m.shape, scale if cfg.quant["bits"] == 4 else 0.02 * 3 / 127, dtype=torch.bfloat16)
            elif name.endswith(".mins"):
                t = torch.full(m.shape, -7.5 * scale, dtype=torch.bfloat16)
            elif "norm" in name:
                t = torch.ones(m.shape, dtype=torch.bfloat16)
            elif name.endswith("e_score_correction_bias"):
                t = torch.zeros(m.shape, dtype=m.dtype)
            else:
                # bf16 as released, and as `glmkit quantize` keeps them (quantize.cast_floats); the router fp32
                fp32 = m.dtype == torch.float32 and name.endswith(ROUTER_FP32)
                t = (torch.randn(m.shape, generator=gen) * 0.02).to(torch.float32 if fp32 else torch.bfloat16)
            yield name, t

    return write_stream(cfg, tensors(), out, fmt=fmt)[1]


def read_bytes_per_token(cfg) -> int:
    """Bytes one decoded token's forward reads: the active weights, one embedding row instead of the table."""
    from glmkit.plan import active_weight_bytes, weight_bytes

    w = weight_bytes(cfg, torch.bfloat16)
    return active_weight_bytes(cfg, torch.bfloat16) - (w["embeddings"] - cfg.dim * 2 if not cfg.tie_embeddings else 0)


def gguf_read_bytes(path: Path) -> tuple[int, int]:
    """(bytes one token reads, bytes in all) of a GGUF model file: every tensor but the embedding table (one row)
    and the routed experts (ffn_*_exps: n_experts_per_tok of their experts), as read_bytes_per_token counts."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    k, E = (int(r.fields[f"{arch}.{f}"].contents()) for f in ("expert_used_count", "expert_count"))
    read = total = 0
    for t in r.tensors:
        n = int(t.n_bytes)
        total += n
        if t.name == "token_embd.weight":
            read += n // int(t.shape[-1])  # one row (the table is (vocab, dim) with the vocabulary last in GGUF's order)
        elif "_exps." in t.name:
            read += n * k // E
        else:
            read += n
    return read, total


def llama_q4_0(llama: Path, src: Path) -> Path:
    """`src` (a bf16 slice in the HF layout) converted by llama.cpp's converter and quantized to Q4_0 (cached beside
    `src`; the bf16 GGUF is removed once the Q4_0 one exists, for disk)."""
    from bench.big_model import LLAMA_QUANT, gguf_files

    q4 = Path(f"{src}.{LLAMA_QUANT['int4'].lower()}.gguf")
    cfg_path = src / "config.json"
    hf = json.loads(cfg_path.read_text())
    if "first_k_dense_replace" not in hf:  # the converter reads the dense-first layer count from this key only
        hf["first_k_dense_replace"] = hf.get("mlp_layer_types", []).count("dense")
        cfg_path.write_text(json.dumps(hf, indent=2) + "\n")
    if not q4.exists():
        q4 = gguf_files(llama, src, ["int4"])["int4"]
        Path(f"{src}.bf16.gguf").unlink(missing_ok=True)
    return q4


def grow_gguf(src: Path, dst: Path, layers: int, seed: int = 0) -> None:
    """The whole model for llama.cpp without its bf16 checkpoint (60 GB, more than the disk): `src`, llama.cpp's own
    Q4_0 file of a slice whose last layer is a MoE layer, written again with that layer repeated up to `layers`
    (block_count changed, every other key and tensor as converted). The repeated layers' Q4_0 tensors get random
    codes (each 18-byte block's fp16 scale kept from the source), their router a fresh N(0, 0.02) draw, so that each
    layer routes on its own; tensors of other types are copied. Streamed tensor by tensor."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    last = int(r.fields[f"{arch}.block_count"].contents()) - 1
    w = GGUFWriter(str(dst), arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        val = layers if name == f"{arch}.block_count" else f.contents()
        w.add_key_value(name, val, f.types[0], f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None)
    plan = []  # (name written, source tensor, fresh draw)
    for t in r.tensors:
        if t.name.startswith(f"blk.{last}."):
            plan += [(t.name.replace(f"blk.{last}.", f"blk.{i}.", 1), t, i != last) for i in range(last, layers)]
        else:
            plan.append((t.name, t, False))
    for name, t, _ in plan:
        b = t.data.view(np.uint8).reshape(*t.data.shape[:-1], -1)
        w.add_tensor_info(name, b.shape, np.uint8, b.nbytes, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, t, fresh in plan:
        data = t.data
        if fresh and t.tensor_type == GGMLQuantizationType.Q4_0:
            blocks = data.view(np.uint8).reshape(-1, 18).copy()
            blocks[:, 2:] = rng.integers(0, 256, (blocks.shape[0], 16), dtype=np.uint8)
            data = blocks
        elif fresh and t.tensor_type == GGMLQuantizationType.F32 and "ffn_gate_inp" in name:
            data = (rng.standard_normal(data.shape, dtype=np.float32) * 0.02)
        w.write_tensor_data(np.ascontiguousarray(data))
    w.close()


def llama_cpp(llama: Path, gguf: Path, prefill: int, bandwidth: float) -> dict:
    """llama-bench on the Q4_0 file `gguf` with this process's threads, and its decode as a fraction of its own bound
    (bandwidth / the bytes its file has one token read): against `bandwidth` (the highest of glmkit's run), and
    against the higher of two readings taken just before and after llama-bench (its own minute)."""
    from bench.big_model import llama_bench

    read, total = gguf_read_bytes(gguf)
    out = {"llama_q4_0_gib": total / 2**30, "llama_read_gib_per_token": read / 2**30,
           "llama_load_1min": os.getloadavg()[0], "llama_bandwidth_before_gbs": bandwidth_gbs()}
    res = llama_bench(llama, gguf, prefill)
    out["llama_bandwidth_after_gbs"] = bandwidth_gbs()
    out.update({f"llama_{k}": v for k, v in res.items()})
    out["llama_decode_b1_of_bound"] = res["decode_b1_tok_s"] * read / (bandwidth * 1e9)
    own = max(out["llama_bandwidth_before_gbs"], out["llama_bandwidth_after_gbs"])
    out["llama_decode_b1_of_own_bound"] = res["decode_b1_tok_s"] * read / (own * 1e9)
    return out


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2**20


def child(a) -> None:
    import resource

    import glmkit
    from glmkit.convert import config_of
    from glmkit.generate import generate, stream
    from glmkit.model import BlockPool
    from glmkit.sampling import SamplingParams

    torch.manual_seed(0)
    t = time.perf_counter()
    stored = config_of(a.child)[1]
    q = stored.quant
    if a.quantize:  # a float checkpoint (the llama.cpp slice), quantized as it loads
        model = glmkit.load(a.child, dtype=torch.bfloat16, quantize=a.quantize)
    elif q and stored.attention == "mla" and not q.get("latent") and not a.as_stored:
        # written before latent attention's projections were quantized: those quantized as they load (what
        # `glmkit quantize` writes now), instead of holding ~1 GB of them in bf16
        model = glmkit.load(a.child, dtype=torch.bfloat16, quantize=f"int{q['bits']}", group_size=q["group_size"] or 64)
    else:
        model = glmkit.load(a.child, dtype=torch.bfloat16)
    model.eval()
    cfg = model.cfg
    res = {"load_s": time.perf_counter() - t, "rss_after_load_gib": rss_gib(), "quant": cfg.quant,
           "params_b": cfg.num_params() / 1e9, "active_params_b": cfg.num_params(active=True) / 1e9,
           "kv_bytes_per_token": BlockPool.block_bytes(cfg, 1, torch.bfloat16),
           "read_gib_per_token": read_bytes_per_token(cfg) / 2**30}
    V = cfg.vocab_size

    def run(prompts, n):
        t = time.perf_counter()
        generate(model, prompts, SamplingParams(max_new_tokens=n, temperature=0))
        return time.perf_counter() - t

    run([torch.randint(0, V, (16,)).tolist()], 2)  # warm-up
    if a.prefill:  # first: a long prompt routes to every expert, so decode below reads resident weights, not the disk
        ids = torch.randint(0, V, (a.prefill,)).tolist()
        res["prefill_tok_s"] = a.prefill / run([ids], 1)
        res["rss_after_prefill_gib"] = rss_gib()
    # decode-mode warm-up: its first steps touch experts the prefill's rows did not leave in the page cache
    t = time.perf_counter()
    run([torch.randint(0, V, (8,)).tolist() for _ in range(16)], 8)
    res["warmup_b16x8_s"] = time.perf_counter() - t
    res["rss_after_warmup_gib"] = rss_gib()
    # memory bandwidth readings in a process of their own (its 1 GiB buffer, allocated per reading and freed, would
    # count in this process's peak memory), at this process's thread count, taken on request between measurements
    code = (f"import sys, torch; torch.set_num_threads({torch.get_num_threads()}); "
            "from bench.big_model import bandwidth_gbs\nfor _ in sys.stdin: print(bandwidth_gbs(), flush=True)")
    meter = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def bandwidth() -> float:
        meter.stdin.write("\n")
        meter.stdin.flush()
        return float(meter.stdout.readline())

    def decode_gaps(prompts) -> list[float]:
        B, stamps = len(prompts), []
        for chunk in stream(model, prompts, SamplingParams(max_new_tokens=a.new_tokens, temperature=0)):
            if chunk.index == B - 1:
                stamps.append(time.perf_counter())
        return sorted(y - x for x, y in zip(stamps, stamps[1:]))

    for B in a.batches:
        prompts = [torch.randint(0, V, (32,)).tolist() for _ in range(B)]
        run(prompts, 2)
        if B != 1:
            gaps = decode_gaps(prompts)
            res[f"decode_b{B}_tok_s"] = B / gaps[len(gaps) // 2]
            continue
        # batch 1, the figure the bound is for: rounds of (reading, decode, reading), so that each round's decode
        # has readings of its own minute beside it (this VM's bandwidth moves 15-25 GB/s from minute to minute)
        rounds, every = [], []
        before = bandwidth()
        for _ in range(max(1, a.rounds)):
            gaps = decode_gaps(prompts)
            after = bandwidth()
            rounds.append({"tok_s": 1 / gaps[len(gaps) // 2], "bandwidth_before_gbs": before,
                           "bandwidth_after_gbs": after})
            every += gaps
            before = after
        every.sort()
        res["decode_b1_tok_s"] = 1 / every[len(every) // 2]
        res["b1_rounds"] = rounds
    if a.profile:  # where a batch-1 decode step's time goes: the top operators of a few steps, to stderr
        from torch.profiler import profile

        with profile(record_shapes=True) as prof:  # a one-token prompt: its prefill is a decode step too
            run([torch.randint(0, V, (1,)).tolist()], 6)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=16),
              file=sys.stderr)
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    res["bandwidth_after_gbs"] = bandwidth()  # again, after all decode figures
    meter.stdin.close()
    meter.wait()
    print("RESULT " + json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write a random checkpoint here first (a new directory)")
    p.add_argument("--model", type=Path, help="measure this checkpoint instead")
    p.add_argument("--arch", default="glm4_moe_lite", choices=list(ARCHS))
    p.add_argument("--layers", type=int, default=None, help="only the first N layers (a slice)")
    p.add_argument("--bits", type=int, default=4, choices=[0, 4, 8], help="0: bf16 (needs 2 bytes a weight on disk)")
    p.add_argument("--tiny", action="store_true", help="a tiny model of the architecture (checks this script)")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=5,
                   help="batch 1 is decoded in this many rounds, a bandwidth reading before and after each")
    p.add_argument("--as-stored", action="store_true",
                   help="a checkpoint quantized without latent attention's projections: keep them float (default: "
                        "quantize them as it loads)")
    p.add_argument("--profile", action="store_true", help="print the top operators of a few batch-1 decode steps")
    p.add_argument("--threads", type=int, default=None, help="threads for glmkit and llama.cpp (default: PyTorch's)")
    p.add_argument("--mmap-threshold", type=int, default=1 << 20,
                   help="glibc's MALLOC_MMAP_THRESHOLD_ for the measuring process (0: glibc's default, which raises it as "
                        "large blocks are freed, so a prefill's freed activations stay in the heap: ~1 GiB more resident)")
    p.add_argument("--llama-cpp", type=Path, default=None,
                   help="a llama.cpp tree with llama-bench and llama-quantize built. With --out DIR --layers N, a bf16 "
                        "slice in the HF layout is written to DIR, converted by its converter, quantized to Q4_0 and "
                        "benchmarked beside glmkit's int4 of the same slice. Without --layers, the whole model: a 2-layer bf16 "
                        "slice (DIR.llama-slice) converted and quantized, then grown to the model's depth with random Q4_0 "
                        "codes (DIR.llama-q4_0.gguf; the 60 GB bf16 checkpoint would not fit the disk)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--quantize", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.batches = [int(b) for b in str(a.batches).split(",")]
    if a.child:
        if a.threads:
            torch.set_num_threads(a.threads)
        return child(a)
    torch.set_num_threads(a.threads or torch.get_num_threads())
    info = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    on_slice = a.llama_cpp is not None and a.layers is not None  # llama.cpp on the same bf16 slice, else on the whole
    if a.llama_cpp and (a.arch != "glm4_moe_lite" or a.tiny or (on_slice and (a.out is None or a.model is not None))):
        p.error("--llama-cpp: glm4_moe_lite at its real shape; on a slice give --out DIR --layers N (DIR is written in "
                "bf16 in the HF layout if it does not exist)")
    info["load_1min"] = os.getloadavg()[0]  # a shared machine: the figures below are only as good as this is low
    model = a.model
    if model is None:
        if a.out is None:
            p.error("give --out (to write a random checkpoint) or --model")
        if not (on_slice and (a.out / "config.json").exists()):
            cfg = model_config(a.arch, a.layers, a.tiny, 0 if on_slice else a.bits)
            t = time.perf_counter()
            nbytes = write_model(cfg, a.out, "glm4_moe_lite_hf" if on_slice else "glmkit")
            info.update(write_s=time.perf_counter() - t, written_gib=nbytes / 2**30)
        model = a.out
    llama_gguf = None
    if on_slice:
        llama_gguf = llama_q4_0(a.llama_cpp, model)
    elif a.llama_cpp:  # the whole model: a 2-layer slice (the dense layer, one MoE layer) converted, then grown
        from glmkit.convert import config_of

        have, want = config_of(model)[1], model_config(a.arch, None, False, 0)
        shape = ("dim", "n_layers", "n_heads", "n_experts", "n_experts_per_tok", "moe_ffn_dim", "vocab_size")
        if any(getattr(have, f) != getattr(want, f) for f in shape):
            p.error(f"--llama-cpp without --layers grows a slice of {a.arch}'s released shape: {model} has another")
        src = Path(f"{model}.llama-slice")
        if not (src / "config.json").exists():
            write_model(model_config(a.arch, 2, False, 0), src, "glm4_moe_lite_hf")
        llama_gguf = Path(f"{model}.llama-q4_0.gguf")
        if not llama_gguf.exists():
            t = time.perf_counter()
            grow_gguf(llama_q4_0(a.llama_cpp, src), llama_gguf, have.n_layers)
            info["llama_write_s"] = time.perf_counter() - t
    info["bandwidth_gbs"] = bandwidth_gbs()
    cmd = [sys.executable, __file__, "--child", str(model), "--batches", ",".join(map(str, a.batches)),
           "--new-tokens", str(a.new_tokens), "--prefill", str(a.prefill), "--rounds", str(a.rounds)]
    cmd += ["--quantize", "int4"] if on_slice else []
    cmd += ["--threads", str(torch.get_num_threads())]
    cmd += [f for f, on in (("--as-stored", a.as_stored), ("--profile", a.profile)) if on]
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(a.mmap_threshold)} if a.mmap_threshold else {}))
    info["mmap_threshold"] = a.mmap_threshold
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"the measuring process failed:\n{r.stderr[-3000:]}")
    if a.profile:
        print(r.stderr[-6000:], file=sys.stderr)
    res = json.loads(next(line[7:] for line in r.stdout.splitlines() if line.startswith("RESULT ")))
    rounds = res.pop("b1_rounds", [])
    info.update(res)
    read = res["read_gib_per_token"] * 2**30
    readings = [info["bandwidth_gbs"], res["bandwidth_after_gbs"]]
    readings += [r[k] for r in rounds for k in ("bandwidth_before_gbs", "bandwidth_after_gbs")]
    bw = max(readings)
    bound = bw * 1e9 / read
    info["bound_b1_tok_s"] = bound
    info["decode_b1_of_bound"] = res["decode_b1_tok_s"] / bound if "decode_b1_tok_s" in res else None
    for i, r in enumerate(rounds):  # each round against the higher of the two readings beside it
        r["of_bound"] = r["tok_s"] * read / (max(r["bandwidth_before_gbs"], r["bandwidth_after_gbs"]) * 1e9)
        info[f"b1_round{i}"] = (f"{r['tok_s']:.3g} tok/s, {r['bandwidth_before_gbs']:.3g} / "
                                f"{r['bandwidth_after_gbs']:.3g} GB/s beside it: {r['of_bound']:.3f} of its bound")
    if rounds:
        f = [r["of_bound"] for r in rounds]
        info["b1_rounds_of_bound"] = f"median {statistics.median(f):.3f}, lowest {min(f):.3f}"
    if llama_gguf:
        info.update(llama_cpp(a.llama_cpp, llama_gguf, a.prefill, bw))
    info["load_1min_end"] = os.getloadavg()[0]
    for k, v in info.items():
        print(f"{k:24s} {v:.4g}" if isinstance(v, float) else f"{k:24s} {v}")


if __name__ == "__main__":
    main()
