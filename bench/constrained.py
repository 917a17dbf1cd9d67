"""Constrained decoding: what a constraint costs and whether its outputs hold, in one run.

    .venv/bin/python bench/constrained.py                           # every part
    .venv/bin/python bench/constrained.py --parts engines           # llguidance vs xgrammar only
    .venv/bin/python bench/constrained.py --parts speed --size 0.5b --new-tokens 48
    .venv/bin/python bench/constrained.py --samples 40 --size tiny  # smoke run

Parts:
  engines   the two maintained grammar engines on a GLM-4-sized vocabulary (151,552 tokens): compile time of
            a JSON schema (the first, and a second one with the compiler warm), then the time to compute one
            token mask while matching a valid document (median, p99, max). llguidance is glmkit's; xgrammar
            is measured when it is installed (it is not a dependency).
  speed     decode tok/s, greedy, with a JSON-schema constraint vs none, at batch 1 and 8, through the engine
            (the server's path), on a random GLM-4-shaped model with GLM-4's 151,552-token vocabulary
            (--size), so the mask work per token is the real one. A constrained row stops when its JSON is
            complete, so the schema is an array of up to 200 records and --new-tokens caps both runs alike;
            tok/s counts only the decode steps (the first token's time, the prefill, is left out).
  validity  --samples sequences at temperature 1 per schema, on the embedded default model and on the random
            GLM-4-shaped one: the fraction that parse (json.loads) and validate (jsonschema_rs), or fullmatch /
            are one of the choices, for regex and choice constraints. Schemas bound their strings and arrays:
            a random model rarely closes an unbounded string, and a sequence cut by max tokens is cut
            (finish_reason "length"), as OpenAI's is.

The GLM-4 vocabulary is the embedded tokenizer's 16,384 tokens padded with 135,168 tokens made of pairs of its
tokens (unreachable by its merges, but masks are computed over every token's bytes, which is the cost
measured). Report the CPU beside every figure; compare ratios from one run (PERF_NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import glmkit
from glmkit.config import PRESETS, ModelConfig
from glmkit.constrain import Constraint, ConstraintVocab
from glmkit.engine import Engine, Request
from glmkit.model import GLM
from glmkit.sampling import SamplingParams
from glmkit.tokenizer import Tokenizer

GLM4_VOCAB = 151552
SIZES = {  # GLM-4's network (glm-4-9b preset) at smaller widths, GLM-4's vocabulary
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128),
    "0.5b": dict(dim=1024, n_layers=12, n_heads=16, n_kv_heads=2, head_dim=64, ffn_dim=2816),
    "1.5b": dict(dim=2048, n_layers=20, n_heads=16, n_kv_heads=2, head_dim=128, ffn_dim=5632),
}
RECORDS = {  # speed: long enough that no row completes before --new-tokens
    "type": "array", "minItems": 200, "maxItems": 200,
    "items": {"type": "object", "additionalProperties": False, "required": ["id", "name", "score", "tags"],
              "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 24},
                             "score": {"type": "number"}, "tags": {"type": "array", "maxItems": 3,
                                                                   "items": {"enum": ["a", "b", "c"]}}}},
}
SCHEMAS = {  # validity: bounded strings, arrays and integers (a random model rarely closes an unbounded string,
    # or ends a number's digits: a JSON number's fraction is unbounded even between a minimum and a maximum)
    "person": {"type": "object", "additionalProperties": False, "required": ["name", "age", "email", "tags"],
               "properties": {"name": {"type": "string", "maxLength": 20},
                              "age": {"type": "integer", "minimum": 0, "maximum": 150},
                              "email": {"type": "string", "pattern": r"^[a-z]{1,8}@[a-z]{1,8}\.(com|cn)$"},
                              "tags": {"type": "array", "maxItems": 4, "items": {"type": "string", "maxLength": 8}}}},
    "document": {"type": "object", "additionalProperties": False, "required": ["发文机关", "成文日期", "level"],
                 "properties": {"发文机关": {"type": "string", "maxLength": 12},
                                "成文日期": {"type": "string", "pattern": r"^\d{4}年\d{1,2}月\d{1,2}日$"},
                                "level": {"enum": ["公开", "内部", "秘密"]},
                                "pages": {"type": "integer", "minimum": 1, "maximum": 999}}},
    "nested": {"type": "object", "additionalProperties": False, "required": ["items", "ok"],
               "properties": {"ok": {"type": "boolean"}, "percent": {"type": "integer", "minimum": 0, "maximum": 100},
                              "items": {"type": "array", "minItems": 1, "maxItems": 3,
                                        "items": {"type": "object", "additionalProperties": False,
                                                  "required": ["k", "v"],
                                                  "properties": {"k": {"type": "string", "maxLength": 6},
                                                                 "v": {"anyOf": [{"type": "integer", "minimum": -999,
                                                                                  "maximum": 999},
                                                                                 {"type": "null"}]}}}}}},
}
REGEX = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
CHOICES = ["positive", "negative", "neutral", "不确定"]


def cpu() -> str:
    flags = subprocess.run("lscpu", capture_output=True, text=True).stdout
    isa = sorted(set(re.findall(r"\b(avx2|avx512_bf16|avx512_vnni|amx_bf16)\b", flags)))
    model = re.search(r"Model name:\s*(.+)", flags)
    return f"{model.group(1).strip() if model else platform.processor()} ({', '.join(isa)}), {torch.get_num_threads()} threads"


def glm4_tokenizer(base: Tokenizer, seed: int = 0) -> Tokenizer:
    """`base` padded to GLM-4's 151,552 tokens with pairs of its own tokens (appended after its ids, its
    special tokens kept where they are): the vocabulary the masks are computed over has GLM-4's size."""
    from tokenizers import Tokenizer as HFTokenizer

    d = json.loads(base.tok.to_str())
    vocab = d["model"]["vocab"]
    taken = set(vocab) | {a["content"] for a in d.get("added_tokens", [])}
    pieces, rng, n = sorted(vocab, key=vocab.get), random.Random(seed), max(vocab.values()) + 1
    n = max(n, *(a["id"] + 1 for a in d.get("added_tokens", [])))
    while n < GLM4_VOCAB:
        t = rng.choice(pieces) + rng.choice(pieces)
        if t not in taken:
            taken.add(t)
            vocab[t] = n
            n += 1
    return Tokenizer(HFTokenizer.from_str(json.dumps(d)))


def random_glm4(size: str, seed: int = 0) -> GLM:
    cfg = ModelConfig(**dict(PRESETS["glm-4-9b"], **SIZES[size], max_seq_len=4096))
    torch.manual_seed(seed)
    return GLM(cfg).to(torch.bfloat16).eval()


# ---- engines -------------------------------------------------------------------------------------------
def engines(tok: Tokenizer) -> dict:
    """Schema compile times and per-token mask times of llguidance and (when installed) xgrammar."""
    import llguidance

    V = tok.vocab_size
    eos = tok.special("eos")
    doc = json.dumps({"name": "李雷 Smith", "age": 42, "email": "li@abc.cn", "tags": ["x", "yz"]}, ensure_ascii=False)
    ids = tok.encode(doc)
    schema, other = SCHEMAS["person"], SCHEMAS["document"]
    out = {}

    def masks(fill_and_accept) -> dict:
        ts = []
        for t in ids:
            t0 = time.perf_counter()
            fill_and_accept(t)
            ts.append(time.perf_counter() - t0)
        ts.sort()
        return {"mask_ms_median": round(statistics.median(ts) * 1e3, 4),
                "mask_ms_p99": round(ts[min(len(ts) - 1, int(len(ts) * 0.99))] * 1e3, 4),
                "mask_ms_max": round(ts[-1] * 1e3, 4), "tokens": len(ts)}

    t0 = time.perf_counter()
    cv = ConstraintVocab(tok, V)
    assert cv.lltokenizer is not None  # built here, timed
    r = {"vocab_build_s": round(time.perf_counter() - t0, 3)}
    for name, s in (("compile_first_ms", schema), ("compile_second_ms", other)):
        t0 = time.perf_counter()
        m = cv.matcher(Constraint.json_schema(s))
        r[name] = round((time.perf_counter() - t0) * 1e3, 3)
    m = cv.matcher(Constraint.json_schema(schema))
    bm = torch.zeros(1, cv.words, dtype=torch.int32)

    def llg_step(t):
        cv.fill([m], bm)
        if not m.consume_token(t):
            raise RuntimeError(f"llguidance refused token {t}: {m.get_error()}")
    r.update(masks(llg_step))
    out["llguidance"] = r | {"version": llguidance.__version__ if hasattr(llguidance, "__version__") else "?"}
    try:
        import xgrammar as xgr
    except ImportError:
        out["xgrammar"] = "not installed"
        return out
    enc = [""] * V
    for piece, i in tok.tok.get_vocab(with_added_tokens=True).items():
        enc[i] = piece
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(enc, xgr.VocabType.BYTE_LEVEL, vocab_size=V, stop_token_ids=[eos])
    comp = xgr.GrammarCompiler(info, max_threads=1)
    r = {"vocab_build_s": round(time.perf_counter() - t0, 3)}
    opts = dict(any_whitespace=False, separators=(", ", ": "), strict_mode=True)
    for name, s in (("compile_first_ms", schema), ("compile_second_ms", other)):
        t0 = time.perf_counter()
        comp.compile_json_schema(json.dumps(s), **opts)
        r[name] = round((time.perf_counter() - t0) * 1e3, 3)
    mx = xgr.GrammarMatcher(comp.compile_json_schema(json.dumps(schema), **opts))
    bx = xgr.allocate_token_bitmask(1, V)

    def xgr_step(t):
        mx.fill_next_token_bitmask(bx, 0)
        if not mx.accept_token(t):
            raise RuntimeError(f"xgrammar refused token {t}")
    r.update(masks(xgr_step))
    out["xgrammar"] = r
    return out


# ---- speed ---------------------------------------------------------------------------------------------
def decode_rate(model, tok, batch: int, new: int, constraint: Constraint | None) -> float:
    """Decode tok/s of `batch` greedy requests through the engine: tokens after each row's first, over the
    time from the first row's first token to the last row's end."""
    eng = Engine(model, max_batch=batch, max_len=512, prefill_chunk=None, constraint_vocab=ConstraintVocab.of(tok, model.cfg.vocab_size))
    prompt = [tok.special("gmask"), tok.special("sop")] + tok.encode("Records as JSON:")
    reqs = [eng.submit(Request(prompt + [i], SamplingParams(max_new_tokens=new, temperature=0, constraint=constraint,
                                                              stop_ids=(tok.special("eos"),)))) for i in range(batch)]
    while eng.has_work():
        eng.step()
    short = [len(r.output_ids) for r in reqs if len(r.output_ids) < new]
    if short or any(r.finish_reason != "length" for r in reqs):
        raise RuntimeError(f"rows ended early ({[r.finish_reason for r in reqs]}, {short} tokens): raise maxItems")
    t0, t1 = min(r.t_first for r in reqs), max(r.t_done for r in reqs)
    return sum(len(r.output_ids) - 1 for r in reqs) / (t1 - t0)


def speed(model, tok, batches, new: int, repeats: int) -> list[dict]:
    c = Constraint.json_schema(RECORDS)
    rows = []
    for B in batches:
        decode_rate(model, tok, B, 8, None)  # warm-up (kernels, the first matcher)
        decode_rate(model, tok, B, 8, c)
        free, held = [], []
        for _ in range(repeats):  # interleaved: drift on a shared machine hits both alike
            free.append(decode_rate(model, tok, B, new, None))
            held.append(decode_rate(model, tok, B, new, c))
        f, h = statistics.median(free), statistics.median(held)
        rows.append({"batch": B, "unconstrained_tok_s": round(f, 2), "json_schema_tok_s": round(h, 2),
                     "ratio": round(h / f, 3)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ---- validity ------------------------------------------------------------------------------------------
def validity(model, tok, samples: int, max_new: int, label: str, only=None) -> list[dict]:
    import jsonschema_rs  # the tests' JSON schema validator (the test extra)

    cases = [(f"json_schema:{k}", Constraint.json_schema(s), lambda t, s=s: jsonschema_rs.validate(s, json.loads(t)))
             for k, s in SCHEMAS.items()]
    cases += [("json_object", Constraint.json_object(), lambda t: isinstance(json.loads(t), dict) or 1 / 0),
              ("regex", Constraint.regex(REGEX), lambda t: re.fullmatch(REGEX, t) or 1 / 0),
              ("choice", Constraint.choice(CHOICES), lambda t: t in CHOICES or 1 / 0)]
    cases = [c for c in cases if only is None or c[0] in only]
    eos = tok.special("eos")
    prompt = [tok.special("gmask"), tok.special("sop")] + tok.encode("答案：")
    out = []
    for name, c, check in cases:
        eng = Engine(model, max_batch=16, max_len=max_new + 64, prefill_chunk=None,
                     constraint_vocab=ConstraintVocab.of(tok, model.cfg.vocab_size))
        reqs = []
        for i in range(samples):
            while True:
                try:
                    reqs.append(eng.submit(Request(prompt, SamplingParams(max_new_tokens=max_new, temperature=1.0, seed=i,
                                                                          constraint=c, stop_ids=(eos,)))))
                    break
                except Exception:  # the waiting queue is full: let it drain
                    eng.step()
        while eng.has_work():
            eng.step()
        valid, cut, bad = 0, 0, []
        for r in reqs:
            if r.finish_reason == "length":
                cut += 1
                continue
            text = tok.decode(r.output_ids)
            try:
                check(text)
                valid += 1
            except Exception as e:  # any failure to parse or validate counts
                bad.append((text[:80], f"{type(e).__name__}: {str(e)[:80]}"))
        row = {"model": label, "constraint": name, "samples": samples, "valid": valid, "cut_by_max_tokens": cut,
               "invalid": len(bad), "valid_of_finished": round(valid / max(1, samples - cut), 4),
               "mean_tokens": round(statistics.mean(len(r.output_ids) for r in reqs), 1)}
        if bad:
            row["first_invalid"] = bad[0]
        out.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="engines,speed,validity")
    p.add_argument("--size", default="0.5b", choices=list(SIZES), help="the random GLM-4-shaped model")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, default=200, help="per constraint and model")
    p.add_argument("--max-new", type=int, default=160, help="max tokens of a validity sample")
    p.add_argument("--constraints", help="validity: only these, comma-separated (json_schema:person, ..., json_object, "
                   "regex, choice)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    a = p.parse_args(argv)
    parts = a.parts.split(",")
    base = glmkit.load_tokenizer(Path(glmkit.__file__).parent / "assets" / "default")
    tok = glm4_tokenizer(base)
    res = {"cpu": cpu(), "torch": torch.__version__, "vocab": tok.vocab_size}
    print(json.dumps(res), flush=True)
    if "engines" in parts:
        res["engines"] = engines(tok)
        print(json.dumps(res["engines"]), flush=True)
    model = random_glm4(a.size) if {"speed", "validity"} & set(parts) else None
    if "speed" in parts:
        res["speed"] = {"size": a.size, "params": sum(t.numel() for t in model.parameters()),
                        "rows": speed(model, tok, [int(b) for b in a.batches.split(",")], a.new_tokens, a.repeats)}
    if "validity" in parts:
        default = glmkit.load(Path(glmkit.__file__).parent / "assets" / "default")
        only = a.constraints.split(",") if a.constraints else None
        res["validity"] = validity(default, base, a.samples, a.max_new, "embedded default", only) + \
            validity(model, tok, a.samples, a.max_new, f"random GLM-4 {a.size}", only)
    if a.out:
        a.out.write_text(json.dumps(res, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
