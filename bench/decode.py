"""Prefill and decode speed: glmkit vs transformers `GlmForCausalLM.generate`, same weights, one run.

    .venv/bin/python bench/decode.py                                 # 120m and 500m, fp32 and bf16
    .venv/bin/python bench/decode.py --sizes 120m --dtypes bf16 --batches 1
    .venv/bin/python bench/decode.py --sizes tiny --new-tokens 8     # smoke run, seconds
    .venv/bin/python bench/decode.py --quant int8,int4 --no-hf        # + weight-only int8 / int4 rows

For each size a random-init GlmForCausalLM of GLM-4 shape (GQA with 2 KV heads, partial
interleaved rotary, q/k/v bias, untied head) is saved with `save_pretrained` and read back with
`glmkit.load`, so both libraries run the same weights. Measured, median of --repeats runs after a
warm-up:
  prefill   prompt tokens / time to first token (generate with one new token), --prompt-len tokens
  decode    B * (N - 1) / (time for N new tokens - time for 1), greedy, a --decode-prompt-len prompt;
            transformers is held to exactly N tokens with min_new_tokens, glmkit has no stop ids
Memory bandwidth is measured in the same run (torch sum over 1 GiB of fp32), and the decode rate
it bounds is printed beside each: a decode step reads every weight once (all linear layers and the
head; the input embedding only a row per token), so bound = B * bandwidth / weight bytes. KV-cache
reads are left out (short contexts here). Prefill is compute-bound; it has no bandwidth bound.
glmkit's prefill computes the head over all prompt positions (GLM.prefill returns every logit);
transformers' generate computes it for the last one only, about 10% of the 120m prefill's FLOPs.
Compare the ratios, not absolute numbers across runs: the machine is shared (PERF_NOTES.md).

--quant adds weight-only int8 (per channel) and int4 (group 64) rows, quantized from the bf16
model (activations bf16): prefill and decode tokens/s and model bytes beside bf16, and held-out perplexity of
a trained model (the embedded default, or --quality-model) in bf16, int8 and int4 on the same
held-out documents (--corpus heldout.jsonl, --docs per domain): random weights say nothing about
quality. --no-native runs glmkit's decode through PyTorch's linear instead of its native kernels.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import glmkit
from glmkit import kernels
from glmkit.generate import generate
from glmkit.quantize import quantize_model
from glmkit.sampling import SamplingParams

# GLM-4 shape (glm-4-9b: 32 heads / 2 KV heads, head_dim 128, partial rotary 0.5, q/k/v bias),
# scaled down; the vocabulary is glmkit's native 16384 so the embeddings do not dominate.
SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16, intermediate_size=128),
    "120m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, head_dim=64, intermediate_size=3072),
    "500m": dict(hidden_size=1280, num_hidden_layers=22, num_attention_heads=20, head_dim=64, intermediate_size=4608),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUANT = {"int8": (8, None), "int4": (4, 64), "int4g64": (4, 64), "int4g32": (4, 32), "int4g128": (4, 128)}


def quantized(model, name: str):
    """A weight-only quantized copy of a float model, activations in bf16."""
    bits, group = QUANT[name]
    m = quantize_model(copy.deepcopy(model).float(), bits, group or 64)
    for t in list(m.parameters()) + [b for _, b in m.named_buffers() if b.is_floating_point()]:
        t.data = t.data.to(torch.bfloat16)
    return m.eval()


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation, with --compile)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bandwidth_gbs(repeats: int = 5) -> float:
    """Read bandwidth in GB/s: a torch sum over 1 GiB of fp32 (PERF_NOTES' method)."""
    x = torch.ones(2**28)
    t = median_time(lambda: x.sum(), repeats)
    return 2**30 / t / 1e9


def hf_model(size: str, vocab: int):
    import transformers

    cfg = transformers.GlmConfig(
        vocab_size=vocab, num_key_value_heads=2, partial_rotary_factor=0.5, attention_bias=True,
        max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        rms_norm_eps=1e-5, **SIZES[size],
    )
    torch.manual_seed(0)
    return transformers.GlmForCausalLM(cfg).eval()


def weight_bytes(model) -> int:
    """Bytes read per decode step: every weight (quantized ones with their scales) but the input
    embedding table, unless it is tied and also serves as the head (then it is read whole)."""
    cfg, n = model.cfg, 0
    for name, t in model.state_dict().items():
        if name == "embed.weight" and (not cfg.tie_embeddings or hasattr(model, "head")):
            continue
        n += t.numel() * t.element_size()
    return n


def run_glmkit(model, ids: list[int], batch: int, new: int, compile: bool):
    params = SamplingParams(temperature=0.0, max_new_tokens=new)
    return lambda: generate(model, [ids] * batch, params, compile=compile)


def run_hf(hf, ids: list[int], batch: int, new: int):
    x = torch.tensor([ids] * batch)
    mask = torch.ones_like(x)

    def f():
        with torch.inference_mode():
            return hf.generate(x, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                               pad_token_id=0)
    return f


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="120m,500m", help=f"comma-separated, of {list(SIZES)}")
    p.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {list(DTYPES)}")
    p.add_argument("--batches", default="1,8", help="decode batch sizes")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=512, help="prefill prompt length")
    p.add_argument("--decode-prompt-len", type=int, default=16)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-hf", action="store_true", help="glmkit only")
    p.add_argument("--compile", action="store_true", help="glmkit decode step through torch.compile")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quant", default="", help=f"comma-separated weight-only variants from bf16, of {list(QUANT)}")
    p.add_argument("--quality-model", default=None, help="trained checkpoint for the perplexity column (default: embedded)")
    p.add_argument("--corpus", default=str(Path(os.environ.get("GLMKIT_CACHE", Path.home() / ".cache" / "glmkit")) / "corpus"))
    p.add_argument("--docs", type=int, default=32, help="held-out documents per domain for perplexity")
    p.add_argument("--no-native", action="store_true", help="glmkit through PyTorch's linear, not its native kernels")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.no_native:
        kernels.MAX_ROWS = 0
    quants = [q for q in a.quant.split(",") if q]
    for q in quants:
        if q not in QUANT:
            p.error(f"unknown --quant {q!r}; choose from {list(QUANT)}")
    sizes, dtypes = a.sizes.split(","), a.dtypes.split(",")
    batches = [int(b) for b in a.batches.split(",")]
    for s in sizes:
        if s not in SIZES:
            p.error(f"unknown size {s!r}; choose from {list(SIZES)}")
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r}; choose from {list(DTYPES)}")
    if a.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode time is N tokens minus the first)")

    import transformers

    bw = bandwidth_gbs()
    native = "off (--no-native)" if a.no_native else ("on" if kernels.available() else f"unavailable: {kernels.why_unavailable()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"memory read bandwidth {bw:.1f} GB/s (sum over 1 GiB); glmkit native kernels {native}")
    g = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(2, a.vocab, (a.prompt_len,), generator=g).tolist()
    decode_ids = prefill_ids[: a.decode_prompt_len]
    rows, sizes_mib = [], {}
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            hf_model(size, a.vocab).save_pretrained(tmp)  # both libraries read these weights
            variants = [(d, d) for d in dtypes] + [(q, "bf16") for q in quants]
            bf16_model = None
            for name, d in variants:
                if name in QUANT:
                    bf16_model = bf16_model or glmkit.load(tmp, dtype=torch.bfloat16).eval()
                    ours, hf = quantized(bf16_model, name), None
                else:
                    ours = glmkit.load(tmp, dtype=DTYPES[d]).eval()
                    hf = None if a.no_hf else transformers.GlmForCausalLM.from_pretrained(tmp, dtype=DTYPES[d]).eval()
                n_params = sum(p.numel() for p in ours.parameters()) + sum(  # int4 weights: two per uint8
                    b.numel() * (2 if b.dtype == torch.uint8 else 1) for b in ours.buffers() if not b.is_floating_point())
                wb = weight_bytes(ours)
                label = f"{size} ({n_params / 1e6:.0f}M) {name}"
                sizes_mib[label] = model_bytes(ours) / 2**20
                t_ours = median_time(run_glmkit(ours, prefill_ids, 1, 1, a.compile), a.repeats)
                t_hf = median_time(run_hf(hf, prefill_ids, 1, 1), a.repeats) if hf is not None else None
                rows.append((label, f"prefill {a.prompt_len}", a.prompt_len / t_ours, a.prompt_len / t_hf if t_hf else None, None))
                for b in batches:
                    def rate(make):
                        t1 = median_time(make(1), a.repeats)
                        tn = median_time(make(a.new_tokens), a.repeats)
                        return b * (a.new_tokens - 1) / (tn - t1)
                    r_ours = rate(lambda n: run_glmkit(ours, decode_ids, b, n, a.compile))
                    r_hf = rate(lambda n: run_hf(hf, decode_ids, b, n)) if hf is not None else None
                    rows.append((label, f"decode b{b}", r_ours, r_hf, b * bw * 1e9 / wb))
                print(f"  done {label}", file=sys.stderr)
                del ours, hf

    def f(x, spec=".1f"):
        return "–" if x is None else format(x, spec)

    head = ("model", "phase", "glmkit tok/s", "transformers tok/s", "glmkit / hf", "bound tok/s", "glmkit / bound", "hf / bound")
    table = [head]
    for label, phase, ours, hf, bound in rows:
        table.append((label, phase, f(ours), f(hf), f(ours / hf if hf else None, ".2f"), f(bound),
                      f(ours / bound if bound else None, ".2f"), f(hf / bound if bound and hf else None, ".2f")))
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    print()
    for n, r in enumerate(table):
        print("| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print(f"\nbound = batch x {bw:.1f} GB/s / weight bytes per step; prefill has none (compute-bound). "
          f"glmkit{' compiled' if a.compile else ''} eager decode, greedy, {a.new_tokens} new tokens.")
    if quants:
        quant_tables(rows, sizes_mib, quants, a)


def quant_tables(rows, sizes_mib, quants, a):
    """Quantized variants beside bf16: prefill and decode speed and bytes (the random weights above), held-out
    perplexity of a trained model (same documents for every variant)."""
    print("\n| model | model MiB | " + " | ".join(f"{ph} tok/s (vs bf16)" for ph in dict.fromkeys(r[1] for r in rows if r[1].startswith(("prefill", "decode")))) + " |")
    print("|---|---|" + "---|" * len({r[1] for r in rows if r[1].startswith(("prefill", "decode"))}))
    by = {(r[0], r[1]): r[2] for r in rows}
    for label in sizes_mib:
        base = next((lb for lb in sizes_mib if lb.split(" ")[0] == label.split(" ")[0] and lb.endswith(" bf16")), None)
        cells = []
        for (lb, ph), v in by.items():
            if lb == label and ph.startswith(("prefill", "decode")):
                ref = by.get((base, ph)) if base else None
                cells.append(f"{v:.1f}" + (f" ({v / ref:.2f}x)" if ref else ""))
        print(f"| {label} | {sizes_mib[label]:.0f} | " + " | ".join(cells) + " |")
    corpus = Path(a.corpus) / "heldout.jsonl"
    if not corpus.exists():
        print(f"\n(perplexity skipped: no {corpus}; run `glmkit data build` or pass --corpus)")
        return
    from glmkit.evaluate import bits_per_char_texts

    tok = glmkit.load_tokenizer(a.quality_model or glmkit.convert.default_model_path())
    base = glmkit.load(a.quality_model, dtype=torch.bfloat16).eval()
    texts: dict[str, list[str]] = {}
    with open(corpus, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            if len(texts.setdefault(d["domain"], [])) < a.docs:
                texts[d["domain"]].append(d["text"])
    res = {}
    for name in ["bf16"] + quants:
        m = base if name == "bf16" else quantized(base, name)
        with torch.no_grad():
            res[name] = bits_per_char_texts(m, tok, texts, 512)
    domains = list(res["bf16"])
    print(f"\nheld-out perplexity (tokens), {a.quality_model or 'the embedded model'} in bf16 and quantized from it, "
          f"{a.docs} documents per domain:")
    print("| variant | " + " | ".join(domains) + " |")
    print("|---|" + "---|" * len(domains))
    for name, r in res.items():
        print(f"| {name} | " + " | ".join(f"{r[d]['ppl']:.2f} ({(r[d]['ppl'] / res['bf16'][d]['ppl'] - 1) * 100:+.2f}%)" for d in domains) + " |")


if __name__ == "__main__":
    main()
