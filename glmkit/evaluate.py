"""Evaluation: held-out likelihood, and understanding and infilling with the same GLM.

    glmkit eval --model ft/ --suite all --out results.json        # + results.md (a markdown table)
    glmkit eval --model M --suite tang300,chengyu --limit 50

The measures themselves (held-out loss per objective, bits per character) live in scoring.py; this
module runs them, and the understanding and infilling suites, over a model and its data.

Suites of `glmkit eval` (data from `glmkit data build`: CACHE/corpus/heldout.jsonl and eval/*):
  bpc           bits per character per domain of held-out documents (or token shards, --shards)
  infill        greedy next-token accuracy on Part B of held-out [MASK] examples (teacher-forced)
  sentiment_zh  cloze classification, pattern "{text}总之很[MASK]。", verbalizers 好/差 (finetune.py)
  spam_en       cloze classification, "{text}\\n\\nThis message is[MASK].", " junk"/" fine"
  cloze         the same on any labelled JSONL (--cloze-file, --pattern, --verbalizer)
  tang300       Tang-300 line infilling: one line of each poem masked, 4 candidates (3 same-length
                lines of other poems), each scored as the blank's log-likelihood; chance 25%
  chengyu       idiom cloze: four-character idioms found in held-out People's Daily text, masked,
                7 candidates (6 other idioms found in that text); chance 1/7
  humaneval     single-line infilling: every non-empty line of every canonical solution masked in
                turn (1,033 tasks); greedy fill; exact match (stripped) and pass@1 by executing the
                program with its tests in a subprocess (timeout, address-space limit, killed on timeout)
Zero-shot unless the model directory has a finetune.json for that cloze preset (`glmkit finetune`),
whose pattern and verbalizer are then used. `--limit N` keeps a seeded random N tasks per suite.
Every blank is scored or generated GLM-style (Part A with [MASK], Part B from <sop>), including for
causal checkpoints (GLM-4), for which these numbers mean little.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .infill import InfillConfig, SpecialIds, build_example, collate, special_ids
from .scoring import _gmask_bits, bits_per_char, model_objective


def read_heldout(path: str | Path, per_domain: int = 0, source: str = "") -> dict[str, list[str]]:
    """Texts of a corpus heldout.jsonl grouped by domain (the first `per_domain` of each; 0: all)."""
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if source and r.get("source") != source:
                continue
            docs = out.setdefault(r.get("domain", "all"), [])
            if not per_domain or len(docs) < per_domain:
                docs.append(r["text"])
    return out


@torch.no_grad()
def bits_per_char_texts(model, tok, texts_by_domain: dict[str, list[str]], seq_len: int, batch_size: int = 8) -> dict:
    """Bits per character per domain of raw texts through the model's tokenizer (see the module doc)."""
    special, objective = special_ids(tok), model_objective(model)
    out = {}
    for name, texts in texts_by_domain.items():
        bits, chars, tokens = _gmask_bits(objective, tok.encode_batch(texts), special, seq_len, batch_size, tok)
        out[name] = {"bpc": bits / max(chars, 1), "docs": len(texts), "chars": chars, "tokens": tokens,
                     "ppl": 2 ** (bits / max(tokens, 1)), "chance": tokens * math.log2(model.cfg.vocab_size) / max(chars, 1)}
    return out


@torch.no_grad()
def infill_accuracy(model, docs: list[list[int]], special: SpecialIds, seq_len: int, n_examples: int = 16,
                    seed: int = 0, batch_size: int = 8) -> dict:
    """Greedy next-token accuracy over Part B of [MASK]-mode examples cut from `docs` (token ids),
    teacher-forced: how often the argmax is the target, for span tokens and for all targets (<eop>
    included)."""
    stream = np.concatenate([np.append(np.asarray(d, np.int64), special.eos) for d in docs]) if docs else np.zeros(0, np.int64)
    rng = np.random.default_rng(seed)
    cfg = InfillConfig(mixture=(1.0, 0.0, 0.0))
    sentence_end = np.zeros(max(model.cfg.vocab_size, int(stream.max(initial=0)) + 1), bool)  # unused by MASK
    examples, pos = [], 0
    while pos < len(stream) and len(examples) < n_examples:
        ex, used = build_example(stream[pos : pos + seq_len], seq_len, rng, special, sentence_end, cfg)
        pos += max(used, 1)  # (build_example always consumes; the guard keeps this loop finite regardless)
        if ex.loss_mask.any():
            examples.append(ex)
    right = total = right_span = total_span = 0
    dev = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        b = {k: v.to(dev) for k, v in collate(examples[i : i + batch_size], special.pad).items()}
        h = model(b["input_ids"], b["position_ids"], sep=b["sep"], hidden_only=True)
        m = b["loss_mask"]
        hit = model.logits(h[m]).argmax(-1) == b["targets"][m]
        span = b["targets"][m] != special.eop
        right, total = right + int(hit.sum()), total + int(hit.numel())
        right_span, total_span = right_span + int((hit & span).sum()), total_span + int(span.sum())
    return {"n": total, "accuracy": right / max(total, 1), "span_accuracy": right_span / max(total_span, 1),
            "span_tokens": total_span, "examples": len(examples), "chance": 1 / model.cfg.vocab_size}


# ---- code execution -------------------------------------------------------------------------------
# A launcher that limits its own address space, then runs the program: no preexec_fn (unsafe with
# the thread pool that runs programs in parallel). This is a resource guard, not a security sandbox:
# run untrusted model output only on a machine you can afford to lose.
_LAUNCHER = ("import resource, runpy, sys; m = int(sys.argv[2]); resource.setrlimit(resource.RLIMIT_AS, (m, m)); "
             "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 24, 1 << 24)); "
             "runpy.run_path(sys.argv[1], run_name='__main__')")


def run_program(program: str, timeout: float = 5.0, memory_mb: int = 1024) -> str:
    """Run a Python program in its own process group: 'passed' (exit 0), 'failed', 'timeout'
    (killed, with its children), or 'memory' (MemoryError under the address-space limit)."""
    with tempfile.TemporaryDirectory(prefix="glmkit-exec-") as d:
        f = Path(d) / "program.py"
        f.write_text(program, encoding="utf-8")
        p = subprocess.Popen([sys.executable, "-I", "-B", "-c", _LAUNCHER, str(f), str(memory_mb << 20)], cwd=d,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            return "timeout"
        if p.returncode == 0:
            return "passed"
        return "memory" if b"MemoryError" in err[-4096:] else "failed"


def run_programs(programs: list[str], timeout: float = 5.0, memory_mb: int = 1024, workers: int = 0) -> list[str]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda p: run_program(p, timeout, memory_mb), programs))


def humaneval_line_tasks(problems: list[dict]) -> list[dict]:
    """Every non-empty line of every canonical solution, masked in turn: {task_id, line_no, prefix,
    middle, suffix, program_tail}. prefix + middle + suffix == prompt + canonical_solution."""
    tasks = []
    for r in problems:
        lines = r["canonical_solution"].split("\n")
        for j, line in enumerate(lines):
            if not line.strip():
                continue
            tasks.append({"task_id": r["task_id"], "line_no": j, "middle": line,
                          "prefix": r["prompt"] + "".join(x + "\n" for x in lines[:j]),
                          "suffix": "".join("\n" + x for x in lines[j + 1 :]),
                          "program_tail": "\n" + r["test"] + "\n" + f"check({r['entry_point']})\n"})
    return tasks


# ---- the suites -----------------------------------------------------------------------------------
@dataclass
class EvalContext:
    model: object
    tok: object
    data: Path
    limit: int = 0
    seed: int = 0
    batch_size: int = 8
    max_len: int = 512
    docs_per_domain: int = 32
    shards: str = ""
    workers: int = 0
    timeout: float = 5.0
    memory_mb: int = 1024
    max_new_tokens: int = 64
    finetune: dict | None = None  # the model directory's finetune.json
    cloze_file: str = ""
    pattern: str = ""
    verbalizer: str = ""
    split: str = "test"
    scoring: str = "blank"  # multiple choice: blank (the candidate in the blank) | lm (the whole text left to right)

    @property
    def special(self) -> SpecialIds:
        return special_ids(self.tok)

    def file(self, name: str) -> Path:
        for p in (self.data / "eval" / name, self.data / name):
            if p.exists():
                return p
        raise FileNotFoundError(f"{name} is neither in {self.data / 'eval'} nor in {self.data}; "
                                "build the evaluation data with `glmkit data build` or pass --data DIR")

    def subset(self, items: list) -> list:
        """A seeded random `limit` of the items, in their original order (all when no limit)."""
        if not self.limit or len(items) <= self.limit:
            return items
        keep = np.sort(np.random.default_rng(self.seed).choice(len(items), self.limit, replace=False))
        return [items[i] for i in keep]


@torch.no_grad()
def _multiple_choice(ctx: EvalContext, items: list[tuple[list, list, list[list]]], gold: list[int]) -> dict:
    """Accuracy of argmax blank log-likelihood (summed, <eop> counted) over candidates, and the same
    calibrated by each candidate's log-likelihood in an empty context (the blank alone, Part A =
    `[MASK]`): score = log p(c | context) - log p(c | nothing), the pointwise mutual information of
    candidate and context. The plain score favours candidates that are frequent (or few tokens) in
    general; calibration asks which candidate the context makes more likely than it is anyway (GPT-3's
    unconditional normalisation; Holtzman et al. 2021 call the bias "surface form competition"). Both
    are reported; `accuracy` is the plain one."""
    from .finetune import candidate_scores

    special = ctx.special
    prior: dict[tuple, float] = {}  # candidate ids -> log p(candidate | empty context)
    todo = sorted({tuple(c) for _, _, cands in items for c in cands})
    for i in range(0, len(todo), ctx.batch_size):
        chunk = todo[i : i + ctx.batch_size]
        s = candidate_scores(ctx.model, [([], [], [list(c)]) for c in chunk], special)[:, 0]
        prior.update(zip(chunk, s.tolist()))
    right = right_cal = 0
    for i in range(0, len(items), ctx.batch_size):
        batch, want = items[i : i + ctx.batch_size], torch.tensor(gold[i : i + ctx.batch_size])
        s = candidate_scores(ctx.model, batch, special).cpu()
        cal = s - torch.tensor([[prior[tuple(c)] for c in cands] for _, _, cands in batch], dtype=s.dtype)
        right += int((s.argmax(-1) == want).sum())
        right_cal += int((cal.argmax(-1) == want).sum())
    n = max(len(items), 1)
    return {"n": len(items), "accuracy": right / n, "accuracy_calibrated": right_cal / n}


def _fit(prefix: list, suffix: list, budget: int) -> tuple[list, list]:
    """Keep the context nearest the blank: cut the prefix from its start, the suffix from its end."""
    if len(prefix) + len(suffix) <= budget:
        return prefix, suffix
    keep_pre = min(len(prefix), budget - min(len(suffix), budget // 4))
    return prefix[len(prefix) - keep_pre :], suffix[: budget - keep_pre]


def suite_bpc(ctx: EvalContext) -> dict:
    per = ctx.limit or ctx.docs_per_domain
    if ctx.shards:
        from .data.shards import TokenShards

        res = bits_per_char(model_objective(ctx.model), TokenShards(ctx.shards), ctx.special, ctx.max_len,
                            ctx.batch_size, per, ctx.tok)
        return {"per_domain": {k: {"bpc": v} for k, v in res.items()}, "source": ctx.shards}
    path = ctx.file("heldout.jsonl")
    res = bits_per_char_texts(ctx.model, ctx.tok, read_heldout(path, per), ctx.max_len, ctx.batch_size)
    return {"per_domain": res, "n": sum(v["docs"] for v in res.values()), "source": str(path)}


def suite_infill(ctx: EvalContext) -> dict:
    texts = read_heldout(ctx.file("heldout.jsonl"), ctx.docs_per_domain)
    n = ctx.limit or 16
    per = {d: infill_accuracy(ctx.model, ctx.tok.encode_batch(t), ctx.special, ctx.max_len, n, ctx.seed, ctx.batch_size)
           for d, t in texts.items()}
    total = sum(v["n"] for v in per.values())
    acc = sum(v["accuracy"] * v["n"] for v in per.values()) / max(total, 1)
    return {"n": total, "accuracy": acc, "chance": 1 / ctx.model.cfg.vocab_size, "per_domain": per}


def _cloze_suite(ctx: EvalContext, name: str, file: Path, task, split: str) -> dict:
    from .finetune import cloze_accuracy, read_jsonl

    rows = read_jsonl(file)
    if split and any("split" in r for r in rows):
        rows = [r for r in rows if r.get("split") == split]
    rows = ctx.subset(rows)
    kw = {}
    ft = ctx.finetune or {}
    tuned = bool(ft.get("cloze")) and ft.get("config", {}).get("preset") == name
    if tuned:
        task = type(task)(ft["cloze"]["pattern"], ft["cloze"]["verbalizer"], ft["cloze"].get("label_field", "label"))
        kw = {"reduce": ft["config"].get("score", "sum"), "eop": ft["config"].get("eop", True)}
    res = cloze_accuracy(ctx.model, ctx.tok, task, rows, max_len=ctx.max_len, batch_size=ctx.batch_size, **kw)
    return {**res, "finetuned": tuned, "pattern": task.pattern, "verbalizer": task.verbalizer, "split": split or "all"}


def suite_sentiment_zh(ctx: EvalContext) -> dict:
    from .finetune import ClozeTask

    return _cloze_suite(ctx, "sentiment_zh", ctx.file("sentiment_zh.jsonl"), ClozeTask.preset("sentiment_zh"), ctx.split)


def suite_spam_en(ctx: EvalContext) -> dict:
    from .finetune import ClozeTask

    return _cloze_suite(ctx, "spam_en", ctx.file("spam_en.jsonl"), ClozeTask.preset("spam_en"), ctx.split)


def suite_cloze(ctx: EvalContext) -> dict:
    from .finetune import FinetuneConfig, cloze_task_from

    if not ctx.cloze_file:
        raise FileNotFoundError("the cloze suite needs --cloze-file F.jsonl with --pattern and --verbalizer (or --preset)")
    task = cloze_task_from(FinetuneConfig(pattern=ctx.pattern, verbalizer=ctx.verbalizer))
    return _cloze_suite(ctx, "cloze", Path(ctx.cloze_file), task, ctx.split)


def tang300_tasks(poems: list[dict], seed: int = 0, k: int = 4) -> list[dict]:
    """One task per poem of >= 2 lines: a seeded line masked, k-1 distractors of the same length
    from other poems, candidates in seeded random order."""
    rng = np.random.default_rng(seed)
    by_len: dict[int, list[tuple[int, str]]] = {}
    for i, p in enumerate(poems):
        for line in p["lines"]:
            by_len.setdefault(len(line), []).append((i, line))
    tasks = []
    for i, p in enumerate(poems):
        lines = p["lines"]
        if len(lines) < 2:
            continue
        j = int(rng.integers(len(lines)))
        pool = sorted({line for (o, line) in by_len[len(lines[j])] if o != i and line != lines[j]})
        if len(pool) < k - 1:
            continue
        cands = [lines[j]] + [pool[x] for x in rng.choice(len(pool), k - 1, replace=False)]
        perm = rng.permutation(k)
        head = f"{p.get('title', '')}\n{p.get('author', '')}\n"
        tasks.append({"prefix": head + "".join(x + "\n" for x in lines[:j]), "suffix": "".join("\n" + x for x in lines[j + 1 :]),
                      "candidates": [cands[x] for x in perm], "answer": int(np.argmax(perm == 0))})
    return tasks


def chengyu_tasks(texts: list[str], idioms: list[str], seed: int = 0, k: int = 7, window: int = 128) -> list[dict]:
    """Each idiom occurring in `texts` (first occurrence per document, non-overlapping), masked with
    `window` characters of context each side; k-1 distractors drawn from the other idioms found in
    the texts (all idioms if fewer than k were found), so every candidate is a real, in-domain idiom."""
    known = set(idioms)
    found = []
    for t in texts:
        seen, i = set(), 0
        while i <= len(t) - 4:
            s = t[i : i + 4]
            if s in known and s not in seen:
                seen.add(s)
                found.append((t, i, s))
                i += 4
            else:
                i += 1
    pool = sorted({s for _, _, s in found})
    if len(pool) < k:
        pool = sorted(known)
    rng = np.random.default_rng(seed)
    tasks = []
    for t, i, s in found:
        others = [x for x in pool if x != s]
        cands = [s] + [others[x] for x in rng.choice(len(others), k - 1, replace=False)]
        perm = rng.permutation(k)
        tasks.append({"prefix": t[max(0, i - window) : i], "suffix": t[i + 4 : i + 4 + window], "idiom": s,
                      "candidates": [cands[x] for x in perm], "answer": int(np.argmax(perm == 0))})
    return tasks


def _mc_suite(ctx: EvalContext, tasks: list[dict], k: int) -> dict:
    tok = ctx.tok
    tasks = ctx.subset(tasks)
    items = []
    for t in tasks:
        cands = [tok.encode(c) for c in t["candidates"]]
        pre, suf = _fit(tok.encode(t["prefix"]), tok.encode(t["suffix"]), ctx.max_len - 2 - max(map(len, cands)))
        items.append((pre, suf, cands))
    gold = [t["answer"] for t in tasks]
    if ctx.scoring == "lm":
        return {**_lm_choice(ctx, items, gold), "chance": 1 / k}
    return {**_multiple_choice(ctx, items, gold), "chance": 1 / k}


@torch.no_grad()
def _lm_scores(ctx: EvalContext, items: list[tuple[list, list, list[list]]]) -> torch.Tensor:
    """log p(prefix candidate suffix) of each candidate, the text read left to right after a lone [gMASK]: how a
    causal language model answers a cloze (it cannot read a blank's right context). (len(items), K)."""
    from .finetune import candidate_scores

    out = [candidate_scores(ctx.model, [([], [], [p + c + s for c in cands]) for p, s, cands in items[i : i + ctx.batch_size]],
                            ctx.special, mask=ctx.special.gmask).cpu() for i in range(0, len(items), ctx.batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 0)


def _lm_choice(ctx: EvalContext, items: list[tuple[list, list, list[list]]], gold: list[int]) -> dict:
    """Accuracy of argmax _lm_scores. The prefix is the same for every candidate, so candidate and suffix decide.
    No calibrated variant: a candidate's prior does not separate from its context here."""
    right = int((_lm_scores(ctx, items).argmax(-1) == torch.tensor(gold)).sum()) if items else 0
    return {"n": len(items), "accuracy": right / max(len(items), 1), "scoring": "lm"}


def suite_tang300(ctx: EvalContext) -> dict:
    from .finetune import read_jsonl

    return _mc_suite(ctx, tang300_tasks(read_jsonl(ctx.file("tang300.jsonl")), ctx.seed), 4)


def suite_chengyu(ctx: EvalContext) -> dict:
    idioms = [x.strip() for x in ctx.file("chengyu.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
    texts = [t for ts in read_heldout(ctx.file("heldout.jsonl"), source="pd199801").values() for t in ts]
    res = _mc_suite(ctx, chengyu_tasks(texts, idioms, ctx.seed), 7)
    return {**res, "documents": len(texts)}


def suite_humaneval(ctx: EvalContext) -> dict:
    from .finetune import read_jsonl
    from .generate import infill
    from .sampling import SamplingParams

    tok = ctx.tok
    problems = read_jsonl(ctx.file("humaneval.jsonl"))
    tasks = ctx.subset(humaneval_line_tasks(problems))
    budget = ctx.max_len - ctx.max_new_tokens - 2
    params = SamplingParams(max_new_tokens=ctx.max_new_tokens, temperature=0.0, stop=("\n",))
    lines = []
    for t in tasks:  # generate.infill: Part A = prefix [MASK] suffix, greedy from <sop>, cut at the newline
        pre, suf = _fit(tok.encode(t["prefix"]), tok.encode(t["suffix"]), budget)
        lines.append(infill(ctx.model, tok, tok.decode(pre), tok.decode(suf), params).spans[0].text.split("\n")[0])
    exact = [line.strip() == t["middle"].strip() for line, t in zip(lines, tasks)]
    # identical to the canonical line: the program is the canonical solution, which passes
    todo = [i for i, (line, t) in enumerate(zip(lines, tasks)) if line != t["middle"]]
    status = ["passed"] * len(tasks)
    ran = run_programs([tasks[i]["prefix"] + lines[i] + tasks[i]["suffix"] + tasks[i]["program_tail"] for i in todo],
                       ctx.timeout, ctx.memory_mb, ctx.workers)
    for i, s in zip(todo, ran):
        status[i] = s
    n = len(tasks)
    return {"n": n, "problems": len({t["task_id"] for t in tasks}), "exact_match": sum(exact) / max(n, 1),
            "pass@1": status.count("passed") / max(n, 1), "accuracy": status.count("passed") / max(n, 1), "chance": 0.0,
            "outcomes": {s: status.count(s) for s in sorted(set(status))},
            "samples": [{"task_id": t["task_id"], "line": t["line_no"], "target": t["middle"], "generated": line, "status": s}
                        for t, line, s in list(zip(tasks, lines, status))[:5]]}


SUITES = {"bpc": suite_bpc, "infill": suite_infill, "sentiment_zh": suite_sentiment_zh, "spam_en": suite_spam_en,
          "tang300": suite_tang300, "chengyu": suite_chengyu, "humaneval": suite_humaneval, "cloze": suite_cloze}
DEFAULT_SUITES = ("bpc", "infill", "sentiment_zh", "spam_en", "tang300", "chengyu", "humaneval")


def run_suites(ctx: EvalContext, names, strict: bool = False) -> dict:
    """Run the named suites; a suite whose data is missing is skipped (an error when `strict`)."""
    out = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            res = SUITES[name](ctx)
        except FileNotFoundError as e:
            if strict:
                raise
            res = {"skipped": str(e)}
        res["seconds"] = round(time.perf_counter() - t0, 2)
        out[name] = res
        print(f"{name}: " + (f"skipped ({res['skipped']})" if "skipped" in res else
                             ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in res.items() if isinstance(v, (int, float)))))
    return out


def markdown_table(results: dict) -> str:
    rows = []
    for name, r in results["suites"].items():
        if "skipped" in r:
            rows.append((name, "skipped", "", "", ""))
        elif name == "bpc":
            rows += [(f"bpc/{d}", "bits/char", f"{v['bpc']:.3f}", str(v.get("docs", "")),
                      f"{v['chance']:.2f}" if "chance" in v else "") for d, v in r["per_domain"].items()]
        elif name == "humaneval":
            rows += [(name, "exact match", f"{r['exact_match']:.3f}", str(r["n"]), "0"),
                     (name, "pass@1", f"{r['pass@1']:.3f}", str(r["n"]), "0")]
        else:
            metric = "token accuracy" if name == "infill" else "accuracy" + (" (fine-tuned)" if r.get("finetuned") else "")
            rows.append((name, metric, f"{r['accuracy']:.3f}", str(r["n"]), f"{r['chance']:.3g}"))
            if "accuracy_calibrated" in r:
                rows.append((name, "accuracy, calibrated (PMI)", f"{r['accuracy_calibrated']:.3f}", str(r["n"]), f"{r['chance']:.3g}"))
    lines = ["| suite | metric | value | n | chance |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return f"`{results['model']}`\n\n" + "\n".join(lines) + "\n"


def eval_main(argv=None) -> int:
    """`glmkit eval`: run suites, write results JSON and a markdown table beside it."""
    from .convert import load
    from .data.corpus import cache_root
    from .devices import resolve_device, resolve_dtype
    from .tokenizer import load_tokenizer

    p = argparse.ArgumentParser(prog="glmkit eval", description="Evaluate a GLM: held-out bits/char, infilling, "
                                "cloze classification, Tang-300 and idiom multiple choice, HumanEval line infilling.")
    p.add_argument("--model", required=True, help="checkpoint directory (or a preset with --tokenizer)")
    p.add_argument("--tokenizer", default="", help="default: the model directory's tokenizer.json")
    p.add_argument("--suite", default="all", help=f"comma-separated: {', '.join(SUITES)}; or all (= {', '.join(DEFAULT_SUITES)})")
    p.add_argument("--data", default="", help="corpus directory with heldout.jsonl and eval/ (default: CACHE/corpus)")
    p.add_argument("--shards", default="", help="token shards: bits/char on their held-out split instead of heldout.jsonl")
    p.add_argument("--out", default="results.json", help="results JSON; the markdown table goes to the same name .md")
    p.add_argument("--limit", type=int, default=0, help="at most N tasks per suite (seeded random subset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=512, help="tokens per sequence (capped at the model's max_seq_len)")
    p.add_argument("--docs-per-domain", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--workers", type=int, default=0, help="parallel code executions (default: all cores)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per HumanEval program")
    p.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per HumanEval program")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--cloze-file", default="")
    p.add_argument("--pattern", default="")
    p.add_argument("--verbalizer", default="")
    p.add_argument("--split", default="test", help="cloze suites: records whose 'split' field equals this ('' = all)")
    p.add_argument("--scoring", choices=("blank", "lm"), default="blank",
                   help="tang300/chengyu: the candidate in the blank (GLM), or the whole text left to right (a model "
                        "trained as a causal LM, pretrain --infill whole_window=1)")
    a = p.parse_args(argv)
    names = list(DEFAULT_SUITES) if a.suite == "all" else [s.strip() for s in a.suite.split(",") if s.strip()]
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; choose from {list(SUITES)} or all")
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    model = load(a.model, device=device, dtype=dtype).eval()
    tok = load_tokenizer(a.tokenizer or a.model)
    ft_file = Path(a.model) / "finetune.json"
    ctx = EvalContext(model=model, tok=tok, data=Path(a.data) if a.data else cache_root() / "corpus", limit=a.limit,
                      seed=a.seed, batch_size=a.batch_size, max_len=min(a.max_len, model.cfg.max_seq_len),
                      docs_per_domain=a.docs_per_domain, shards=a.shards, workers=a.workers, timeout=a.timeout,
                      memory_mb=a.memory_mb, max_new_tokens=a.max_new_tokens,
                      finetune=json.loads(ft_file.read_text()) if ft_file.exists() else None,
                      cloze_file=a.cloze_file, pattern=a.pattern, verbalizer=a.verbalizer, split=a.split,
                      scoring=a.scoring)
    print(f"glmkit eval: {a.model} on {device} ({dtype}), data {ctx.data}, suites {', '.join(names)}"
          + (f", limit {a.limit}" if a.limit else ""))
    t0 = time.perf_counter()
    results = {"model": str(a.model), "device": str(device), "dtype": str(dtype).replace("torch.", ""),
               "limit": a.limit, "seed": a.seed, "max_len": ctx.max_len,
               "suites": run_suites(ctx, names, strict=a.suite != "all")}
    results["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    table = markdown_table(results)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0
