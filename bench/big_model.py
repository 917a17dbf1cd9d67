"""A real-size GLM on this machine: a random GLM-4-9B-shaped checkpoint, loaded, quantized and served.

    .venv/bin/python bench/big_model.py --out /tmp/glm4-9b                  # writes it (17.5 GiB bf16), then measures
    .venv/bin/python bench/big_model.py --out /tmp/glm4-2l --layers 2       # a 2-layer slice: minutes, not hours
    .venv/bin/python bench/big_model.py --model DIR                         # a real checkpoint, as it is
    .venv/bin/python bench/big_model.py --out D --llama-cpp ~/llama.cpp   # + llama.cpp bf16 / Q8_0 / Q4_0, same weights

The checkpoint is written tensor by tensor in transformers' `GlmForCausalLM` layout (the `-hf` release's
names, shards of at most 2 GiB and an index), N(0, 0.02) weights in bf16, so nothing holds the model in
memory. Each variant (bf16, and int8 / int4 made by `glmkit quantize` from it) is measured in its own
process, so peak resident memory is that variant's alone:
  load       seconds and peak RSS of `glmkit.load(dir, dtype=bf16)` (the checkpoint is memory-mapped)
  quantize   seconds and peak RSS of `glmkit quantize DIR OUT --bits 8|4` (/usr/bin/time)
  prefill    prompt tokens / seconds for a --prefill-token prompt (one new token)
  decode     B / the median time between steps of a stream of N new tokens, greedy, B = each of --batches,
             after a warm-up run at that batch size (its first run pays one-time costs)
  ttft       an --ttft-token prompt submitted to the serving engine while 3 streams decode: its time to first
             token, and the streams' time per output token meanwhile beside their time per token before it
             (tpot_ratio), with one-shot prefill and with each --prefill-chunk (N tokens, or auto: sized by
             measured step times), --ttft-repeats times each, interleaved; medians, and TTFT against one-shot's
Decode beside its bandwidth bound (B x measured bandwidth / bytes of weights read per token). With --llama-cpp DIR
(a source tree, e.g. the one inside llama-cpp-python's source distribution, built with cmake: a benchmark
reference only), the same weights go through llama.cpp's converter (bf16) and llama-quantize (Q8_0, Q4_0), and
its llama-bench runs in the same run: prompt processing at --prefill tokens, generation at batch 1.
Report the CPU beside any figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARD_BYTES = 2 << 30


def write_checkpoint(out: Path, preset: str, layers: int | None) -> None:
    """A random checkpoint of `preset`'s shapes (optionally its first `layers` layers) in the preset's
    source layout, one tensor at a time."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from glmkit.config import get_preset
    from glmkit.convert import FORMATS
    from glmkit.model import GLM

    cfg = get_preset(preset)
    if layers:
        cfg = replace(cfg, n_layers=layers)
    fmt = FORMATS[cfg.source]
    with torch.device("meta"):
        shapes = GLM(cfg).state_dict()
    out.mkdir(parents=True, exist_ok=False)
    (out / "config.json").write_text(json.dumps(fmt.config_to_hf(cfg), indent=2) + "\n")
    gen = torch.Generator().manual_seed(0)
    index, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, out / name, metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, size = {}, 0

    for rule in fmt.rules(cfg):
        for name, meta in zip(rule.theirs, rule.split(shapes[rule.ours])):
            if name.endswith(("norm.weight", "layernorm.weight")):
                t = torch.ones(meta.shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(meta.shape, generator=gen) * 0.02).to(torch.bfloat16)
            if size + t.numel() * 2 > SHARD_BYTES:
                flush()
            shard[name], size = t, size + t.numel() * 2
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))


def bandwidth_gbs(passes: int = 5) -> float:
    """The memory bandwidth PyTorch's threads reach reading 1 GiB (a sum over it): the best of `passes` passes, as
    STREAM reports, so a pass slowed by another process on a shared machine does not lower the bound."""
    x = torch.ones(1 << 28)  # 1 GiB of fp32
    x.sum()
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS GiB, stdout) of a command, by /usr/bin/time."""
    r = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M", *cmd], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    sec, kib = r.stderr.strip().splitlines()[-1].split()[1:]
    return float(sec), int(kib) / 2**20, r.stdout


# ---- one variant, in its own process ----------------------------------------------------------------------
def child(a) -> None:
    import glmkit
    from glmkit.generate import generate, stream
    from glmkit.sampling import SamplingParams

    torch.manual_seed(0)
    t = time.perf_counter()
    model = glmkit.load(a.child, dtype=torch.bfloat16).eval()
    res = {"load_s": time.perf_counter() - t}
    V = model.cfg.vocab_size
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.state_dict().items() if n != "embed.weight")
    res["weight_gib"] = weight_bytes / 2**30

    def run(prompts, n):
        t = time.perf_counter()
        generate(model, prompts, SamplingParams(max_new_tokens=n, temperature=0))
        return time.perf_counter() - t

    ids = torch.randint(0, V, (max(a.prefill, 16),)).tolist()
    run([ids[:16]], 1)  # warm-up
    if a.prefill:
        res["prefill_tok_s"] = a.prefill / min(run([ids], 1) for _ in range(2))
    for B in a.batches:  # the median time between a step's tokens, after a warm-up at this batch size
        prompts = [torch.randint(0, V, (32,)).tolist() for _ in range(B)]
        run(prompts, 2)
        stamps = []
        for chunk in stream(model, prompts, SamplingParams(max_new_tokens=a.new_tokens, temperature=0)):
            if chunk.index == B - 1:  # the step's last row: its tokens are all out
                stamps.append(time.perf_counter())
        gaps = sorted(b - a_ for a_, b in zip(stamps, stamps[1:]))
        res[f"decode_b{B}_tok_s"] = B / gaps[len(gaps) // 2]
    modes = [None] + [c if c == "auto" else int(c) for c in a.prefill_chunk.split(",")]
    runs: dict = {}
    for _ in range(a.ttft_repeats if a.ttft else 0):  # modes interleaved, so drift on a shared machine hits all alike
        for chunk in modes:
            runs.setdefault(chunk, []).append(ttft_run(model, V, a.ttft, chunk))
    for chunk, rs in runs.items():
        tag = f"_chunk{chunk}" if chunk else ""
        med = lambda k: sorted(r[k] for r in rs)[len(rs) // 2]  # the median over repetitions
        for k in rs[0]:
            res[k + tag] = med(k)
        res["tpot_ratio" + tag] = med("tpot_during_ttft_s") / med("tpot_idle_s")
        if chunk:  # TTFT against one-shot's in the same repetition
            res["ttft_vs_oneshot" + tag] = sorted(r["ttft_s"] / o["ttft_s"] for r, o in zip(rs, runs[None]))[len(rs) // 2]
    import resource

    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(res))


def ttft_run(model, V: int, prompt: int, chunk) -> dict:
    """An engine (prefill_chunk=chunk) with 3 streams decoding; a `prompt`-token request submitted after
    their 8th token: its TTFT, the streams' mean time per token before it (idle) and while it is
    prefilled (until the step after its first token), their worst gap meanwhile, and the mean chunk."""
    from glmkit.engine import Engine, Request
    from glmkit.sampling import SamplingParams

    engine = Engine(model, max_batch=4, max_len=max(prompt, 64) + 1024, prefill_chunk=chunk)
    stamps: dict[int, list[float]] = {}
    params = SamplingParams(max_new_tokens=960, temperature=0)  # past the prefill even at the smallest chunks
    streams = [engine.submit(Request(torch.randint(0, V, (32,)).tolist(), params,
                                     on_token=lambda r, *_: stamps.setdefault(r.id, []).append(time.perf_counter())))
               for _ in range(3)]
    while min(len(stamps.get(r.id, ())) for r in streams) < 8:
        engine.step()
    t_submit = time.perf_counter()
    long = engine.submit(Request(torch.randint(0, V, (prompt,)).tolist(), SamplingParams(max_new_tokens=2, temperature=0)))
    steps = 0
    while long.t_first is None:
        engine.step()
        steps += 1
    engine.step()  # the streams' next tokens, after the long prompt's first
    gaps = [(b - a, b) for r in streams for a, b in zip(stamps[r.id], stamps[r.id][1:])]
    idle = [g for g, end in gaps if end < t_submit]
    busy = [g for g, end in gaps if t_submit <= end]
    for r in streams:
        engine.cancel(r)
    while engine.has_work():
        engine.step()
    return {"ttft_s": long.t_first - long.t_submit, "tpot_idle_s": sum(idle) / len(idle),
            "tpot_during_ttft_s": sum(busy) / len(busy), "tpot_worst_during_ttft_s": max(busy),
            "mean_chunk": prompt / steps}


# ---- llama.cpp on the same weights ------------------------------------------------------------------------------
LLAMA_QUANT = {"int8": "Q8_0", "int4": "Q4_0"}


def _llama_exe(llama: Path, name: str) -> Path:
    exe = next((p for p in (llama / "build" / "bin" / name, llama / name) if p.exists()), None)
    if exe is None:
        raise FileNotFoundError(f"no {name} under {llama}: build it first (cmake -B build && cmake --build build --target {name})")
    return exe


def gguf_files(llama: Path, src: Path, variants: list[str]) -> dict[str, Path]:
    """GGUF files of `src` per variant, made by llama.cpp's own converter (bf16) and llama-quantize (Q8_0, Q4_0).
    A random checkpoint has no tokenizer, and llama-bench never tokenizes: a byte-level one with GLM's special
    tokens is written beside the weights, and the converter is told its pre-tokenizer instead of hashing it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if not (src / "tokenizer.json").exists():
        vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
        vocab["Ġt"] = len(vocab)  # llama.cpp refuses a BPE vocabulary without merges
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t")]))
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        tok.add_special_tokens(["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                                "<|assistant|>", "<|observation|>"])
        tok.save(str(src / "tokenizer.json"))
        (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    out = {"bf16": Path(f"{src}.bf16.gguf")}
    if not out["bf16"].exists():
        convert = ("import runpy, sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/gguf-py']; import conversion.base as b; "
                   "b.TextModel.get_vocab_base_pre = lambda self, tok: 'chatglm-bpe'; sys.argv = sys.argv[1:]; "
                   "runpy.run_path(sys.argv[0] + '/convert_hf_to_gguf.py', run_name='__main__')")
        subprocess.run([sys.executable, "-c", convert, str(llama), str(src), "--outfile", str(out["bf16"]), "--outtype", "bf16"],
                       check=True, capture_output=True)
    for v in variants:
        if v in LLAMA_QUANT:
            out[v] = Path(f"{src}.{LLAMA_QUANT[v].lower()}.gguf")
            if not out[v].exists():
                subprocess.run([str(_llama_exe(llama, "llama-quantize")), str(out["bf16"]), str(out[v]), LLAMA_QUANT[v]],
                               check=True, capture_output=True)
    return {v: f for v, f in out.items() if v in variants}


def llama_bench(llama: Path, gguf: Path, prompt: int) -> dict:
    """llama-bench's prompt processing at `prompt` tokens and generation at batch 1 (its tg test is one sequence),
    two repetitions each (its default of five costs minutes per variant at 9B)."""
    r = subprocess.run([str(_llama_exe(llama, "llama-bench")), "-m", str(gguf), "-p", str(prompt), "-n", "16", "-r", "2",
                        "-t", str(torch.get_num_threads()), "-o", "json"], capture_output=True, text=True, check=True)
    return {("prefill_tok_s" if row["n_prompt"] else "decode_b1_tok_s"): row["avg_ts"] for row in json.loads(r.stdout)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="where the random checkpoint is (written if missing)")
    p.add_argument("--model", type=Path, help="a real checkpoint directory instead")
    p.add_argument("--preset", default="glm-4-9b")
    p.add_argument("--layers", type=int, default=None, help="only the first N layers (a slice of the real shapes)")
    p.add_argument("--variants", default="bf16,int8,int4")
    p.add_argument("--prefill", type=int, default=2048, help="prompt tokens of the prefill measurement (0: skip)")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--ttft", type=int, default=8192, help="prompt tokens of the late request (0: skip)")
    p.add_argument("--prefill-chunk", default="512,auto",
                   help="the engine's chunks (tokens, or auto) for the TTFT runs beside one-shot, comma-separated")
    p.add_argument("--ttft-repeats", type=int, default=3, help="TTFT runs per mode, interleaved; medians reported")
    p.add_argument("--llama-cpp", type=Path, default=None, help="a llama.cpp source tree with llama-bench and llama-quantize built")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    src = a.model or a.out
    if src is None:
        p.error("give --out DIR (random weights, written if missing) or --model DIR")
    if a.model is None and not (a.out / "config.json").exists():
        t = time.perf_counter()
        write_checkpoint(a.out, a.preset, a.layers)
        print(f"wrote {a.out} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")),
               platform.processor())
    bw = bandwidth_gbs()
    print(f"# {src}  CPU: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, bandwidth {bw:.1f} GB/s")
    rows = {}
    for v in a.variants.split(","):
        d = src
        if v != "bf16":
            d = Path(f"{src}.{v}")
            if not d.exists():
                sec, gib, _ = timed([sys.executable, "-m", "glmkit", "quantize", str(src), str(d), "--bits", v.removeprefix("int")])
                rows.setdefault(v, {}).update(quantize_s=sec, quantize_peak_gib=gib)
        args = [sys.executable, __file__, "--child", str(d), "--prefill", str(a.prefill), "--new-tokens", str(a.new_tokens),
                "--batches", ",".join(map(str, a.batches)), "--ttft", str(a.ttft),
                "--prefill-chunk", a.prefill_chunk, "--ttft-repeats", str(a.ttft_repeats)]
        r = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{v}: failed (rc {r.returncode})\n{r.stderr[-3000:]}", file=sys.stderr)
            continue
        res = rows.setdefault(v, {})
        res.update(json.loads(line[7:]))
        for B in a.batches:
            res[f"decode_b{B}_bound"] = res[f"decode_b{B}_tok_s"] / (B * bw * 1e9 / (res["weight_gib"] * 2**30))
        print(f"# {v}: {json.dumps(res)}", flush=True)  # each variant as it ends, should a later one fail
    if a.llama_cpp:
        for v, f in gguf_files(a.llama_cpp, src, a.variants.split(",")).items():
            rows[f"llama.cpp {v}"] = llama_bench(a.llama_cpp, f, a.prefill)
    keys = sorted({k for r in rows.values() for k in r})
    print("| metric | " + " | ".join(rows) + " |\n|---|" + "---:|" * len(rows))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{r[k]:.3g}" if k in r else "" for r in rows.values()) + " |")


if __name__ == "__main__":
    main()
