"""Evaluation: every suite end to end on the debug preset with tiny fixtures, the task builders,
code execution under a timeout and a memory limit, and the lm-evaluation-harness adapter."""

import json
import math
import os
import select
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from glmkit.evaluate import (
    DEFAULT_SUITES,
    chengyu_tasks,
    eval_main,
    humaneval_line_tasks,
    infill_accuracy,
    run_program,
    run_programs,
    special_ids,
    tang300_tasks,
)
from glmkit.finetune import blank_example, read_jsonl, sequence_logprobs
from tests.helpers import blank_logprob, debug_checkpoint, greedy_blank

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def ckpt(eval_tok, tmp_path_factory):
    """conftest's fixture tokenizer next to a random-init debug model (write_checkpoint)."""
    return debug_checkpoint(eval_tok, tmp_path_factory.mktemp("eval"))


def test_all_suites_end_to_end(ckpt, tmp_path):
    out = tmp_path / "results.json"
    eval_main(["--model", str(ckpt), "--data", str(FIXTURES), "--out", str(out), "--limit", "4", "--max-new-tokens", "8",
               "--device", "cpu", "--workers", "2"])
    r = json.loads(out.read_text())
    assert list(r["suites"]) == list(DEFAULT_SUITES)
    for name, s in r["suites"].items():
        assert "skipped" not in s, (name, s)
        if name != "bpc":  # an accuracy is k right of n (the rules themselves: the tests below)
            k = s["accuracy"] * s["n"]
            assert s["n"] > 0 and abs(k - round(k)) < 1e-6 and 0 <= round(k) <= s["n"] and "chance" in s, (name, s)
    he = r["suites"]["humaneval"]
    assert sum(he["outcomes"].values()) == he["n"] and he["pass@1"] == he["outcomes"].get("passed", 0) / he["n"], he
    per = r["suites"]["infill"]["per_domain"].values()
    assert math.isclose(r["suites"]["infill"]["accuracy"], sum(v["accuracy"] * v["n"] for v in per) / sum(v["n"] for v in per))
    chance = {"sentiment_zh": 0.5, "spam_en": 0.5, "tang300": 0.25, "chengyu": 1 / 7, "humaneval": 0.0}
    for name, c in chance.items():
        assert math.isclose(r["suites"][name]["chance"], c), (name, r["suites"][name]["chance"])
    assert r["suites"]["humaneval"]["n"] == 3 and r["suites"]["tang300"]["n"] == 4  # fixtures: 3 line tasks, 6 poems
    # a random-init model is close to uniform: bits/char near the uniform model's
    for dom, v in r["suites"]["bpc"]["per_domain"].items():
        assert abs(v["bpc"] - v["chance"]) < 0.05 * v["chance"], f"{dom}: bpc {v['bpc']:.3f} vs uniform {v['chance']:.3f}"
    table = out.with_suffix(".md").read_text()
    for row in ("| bpc/zh_modern | bits/char", "| tang300 | accuracy", "| chengyu | accuracy", "| humaneval | pass@1"):
        assert row in table, table


class NextToken(torch.nn.Module):
    """A model that always predicts its input token + 1: right exactly where a target follows its input."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.cfg, self.anchor = SimpleNamespace(vocab_size=vocab_size), torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, position_ids, sep=None, hidden_only=False):
        return torch.nn.functional.one_hot((input_ids + 1) % self.cfg.vocab_size, self.cfg.vocab_size).float()

    def logits(self, h):
        return h


def test_infill_accuracy_counts_argmax_hits():
    # documents of consecutive ids: in Part B (<sop> t0 .. t(k-1) -> t0 .. t(k-1) <eop>) an input + 1
    # model hits t1 .. t(k-1) and misses t0 (after <sop>) and <eop>: k - 1 of k + 1 targets per span
    from glmkit.infill import SpecialIds

    sp = SpecialIds(mask=1, smask=2, gmask=3, sop=4, eop=5, eos=6, pad=0)
    r = infill_accuracy(NextToken(64), [list(range(10, 40)), list(range(12, 50))], sp, seq_len=24, n_examples=6, batch_size=4)
    spans = r["n"] - r["span_tokens"]  # one <eop> target per span
    assert r["examples"] >= 3 and spans > r["examples"], r  # several examples, some with several spans
    assert r["accuracy"] == (r["span_tokens"] - spans) / r["n"] and r["span_accuracy"] == (r["span_tokens"] - spans) / r["span_tokens"], r


def test_explicit_suite_with_missing_data_is_an_error(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="glmkit data build"):
        eval_main(["--model", str(ckpt), "--data", str(tmp_path), "--suite", "tang300", "--out", str(tmp_path / "r.json")])


def test_task_builders_are_deterministic_and_correct():
    poems = read_jsonl(FIXTURES / "tang300.jsonl")
    a, b = tang300_tasks(poems, seed=3), tang300_tasks(poems, seed=3)
    assert a == b and len(a) == len(poems)
    for t in a:
        cands = t["candidates"]
        assert len(set(cands)) == 4 and len({len(c) for c in cands}) == 1, cands
        full = t["prefix"] + cands[t["answer"]] + t["suffix"]
        assert any(full.endswith("\n".join(p["lines"])) for p in poems), full
    assert {t["answer"] for t in tang300_tasks(poems * 3, seed=0)} != {0}  # the answer is not always first

    texts = [r["text"] for r in read_jsonl(FIXTURES / "heldout.jsonl") if r["source"] == "pd199801"]
    idioms = (FIXTURES / "chengyu.txt").read_text(encoding="utf-8").split()
    tasks = chengyu_tasks(texts, idioms, seed=0)
    found = sorted(t["idiom"] for t in tasks)
    assert found == sorted(["一心一意", "锦上添花", "欢欣鼓舞", "实事求是", "精益求精", "半途而废", "畅所欲言", "日新月异",
                            "拔地而起", "齐心协力"]), found
    for t in tasks:
        assert len(t["candidates"]) == 7 and len(set(t["candidates"])) == 7 and t["candidates"][t["answer"]] == t["idiom"]
        assert any(t["prefix"] + t["idiom"] + t["suffix"] in x for x in texts)

    problems = read_jsonl(FIXTURES / "humaneval.jsonl")
    lines = humaneval_line_tasks(problems)
    assert len(lines) == 3, [t["middle"] for t in lines]
    by_id = {p["task_id"]: p for p in problems}
    for t in lines:
        p = by_id[t["task_id"]]
        assert t["prefix"] + t["middle"] + t["suffix"] == p["prompt"] + p["canonical_solution"]
    # the canonical programs pass by execution, a wrong line fails
    programs = [t["prefix"] + t["middle"] + t["suffix"] + t["program_tail"] for t in lines]
    assert run_programs(programs, timeout=10) == ["passed"] * 3
    assert run_program(lines[0]["prefix"] + "    return 0.0" + lines[0]["suffix"] + lines[0]["program_tail"]) == "failed"


def test_infinite_loop_is_killed_by_the_timeout(tmp_path):
    pid_file = tmp_path / "child.pid"
    program = ("import subprocess, sys\n"
               "c = subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
               f"open({str(pid_file)!r}, 'w').write(str(c.pid))\n"
               "while True:\n    pass\n")
    t0 = time.perf_counter()
    status = run_program(program, timeout=1.5)
    dt = time.perf_counter() - t0
    assert status == "timeout" and dt < 10, f"status {status} after {dt:.1f}s"
    child = int(pid_file.read_text())
    try:
        fd = os.pidfd_open(child)
    except ProcessLookupError:
        return  # gone and reaped already
    try:  # a pidfd turns readable when its process terminates: wait for that, not for a fixed time
        ended = select.select([fd], [], [], 10)[0]
    finally:
        os.close(fd)
    if not ended:
        os.kill(child, signal.SIGKILL)
    assert ended, f"the program's child {child} survived the kill by 10 s"


def test_memory_bomb_is_stopped_by_the_limit():
    t0 = time.perf_counter()
    status = run_program("x = bytearray(4 << 30)\nprint(len(x))\n", timeout=20, memory_mb=256)
    assert status == "memory", f"status {status} after {time.perf_counter() - t0:.1f}s"
    grow = "xs = []\nwhile True:\n    xs.append(bytearray(16 << 20))\n"
    status = run_program(grow, timeout=20, memory_mb=256)
    assert status == "memory", f"a growing allocation ended with {status}"
    assert run_program("import sys\nsys.exit(0)\n", memory_mb=256) == "passed"


# ---- the lm-evaluation-harness adapter -----------------------------------------------------------------
def request(*args):
    """What the adapter reads of lm_eval's Instance: .args."""
    return SimpleNamespace(args=args)


def test_lm_eval_adapter_methods(ckpt):
    pytest.importorskip("lm_eval")
    from glmkit.config import get_preset
    from glmkit.lm_eval_adapter import GLMkitLM
    from glmkit.model import GLM
    from glmkit.tokenizer import load_tokenizer

    assert GLMkitLM(model=str(ckpt), device="cpu").mode == "blank"  # rope_2d: a GLM-objective model
    # untied: the debug preset's tied head greedily repeats its input token (<sop> here), an empty fill
    tok = load_tokenizer(ckpt)
    model = GLM(get_preset("debug", vocab_size=tok.vocab_size, tie_embeddings=False)).eval()
    model.init_weights(seed=0)
    lm, sp = GLMkitLM(model=model, tokenizer=tok, batch_size=3), special_ids(tok)
    reqs = [("床前明月光，", "疑是地上霜。"), ("The quick brown fox", " jumps"), ("", "def add(a, b):")]
    got = lm.loglikelihood([request(c, x) for c, x in reqs])
    for (lp, g), (c, x) in zip(got, reqs):
        w, wg = blank_logprob(lm.model, sp, tok.encode(c), tok.encode(x))
        assert isinstance(lp, float) and isinstance(g, bool) and abs(lp - w) < 1e-4 and g == wg, (c, x, lp, w, g, wg)

    # rolling: chunks of max_length/2 tokens, each the blank after up to max_length/2 - 2 tokens before it
    text = "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。" * 4
    ids = tok.encode(text)
    for max_length in (16, 10_000):  # many chunks; one chunk, the whole text after nothing
        lm.max_length = max_length
        (total,) = lm.loglikelihood_rolling([request(text)])
        half = max_length // 2
        want = sum(blank_logprob(lm.model, sp, ids[max(0, s - (half - 2)) : s], ids[s : s + half])[0]
                   for s in range(0, len(ids), half))
        assert len(ids) > 2 * half or max_length > len(ids), len(ids)
        assert abs(total - want) < 1e-3, (max_length, total, want)
    lm.max_length = 256

    out = lm.generate_until([request("床前明月光，", {"until": ["。"], "max_gen_toks": 6}),
                             request("def add(a, b):", {"max_gen_toks": 4})])
    want = [tok.decode(greedy_blank(lm.model, sp, tok.encode("床前明月光，"), 6)).split("。")[0],
            tok.decode(greedy_blank(lm.model, sp, tok.encode("def add(a, b):"), 4))]
    assert out == want and all(out), (out, want)  # non-empty fills, or equality would prove little


def test_lm_eval_runs_a_local_task(ckpt, tmp_path, monkeypatch):
    """lm_eval.simple_evaluate on a two-question multiple-choice task read from a local JSONL."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from glmkit.lm_eval_adapter import GLMkitLM

    rows = [{"question": "床前明月光，", "choices": ["疑是地上霜。", "低头思故乡。"], "answer": 0},
            {"question": "The quick brown fox", "choices": [" jumps", " sleeps"], "answer": 0}]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "toy.yaml").write_text(
        "task: glmkit_toy_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'toy.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    lm = GLMkitLM(model=str(ckpt), device="cpu")
    res = lm_eval.simple_evaluate(model=lm, tasks=["glmkit_toy_mc"], task_manager=tm, bootstrap_iters=0, log_samples=True)
    # each choice's log-likelihood as the harness asks for it (" " + choice after the question),
    # computed here from the model's logits; accuracy = how often the answer scores highest
    sp, right = special_ids(lm.tok), 0
    for sample, row in zip(sorted(res["samples"]["glmkit_toy_mc"], key=lambda x: x["doc_id"]), rows):
        want = [blank_logprob(lm.model, sp, lm.tok.encode(row["question"]), lm.tok.encode(" " + c))[0] for c in row["choices"]]
        got = [lp for lp, _ in sample["filtered_resps"]]
        assert len(got) == len(want) and all(abs(a - b) < 1e-4 for a, b in zip(got, want)), (row, got, want)
        right += max(range(len(want)), key=want.__getitem__) == row["answer"]
    r = res["results"]["glmkit_toy_mc"]
    assert r["sample_len"] == 2 and r["acc,none"] == right / 2, (r, right)

    from lm_eval.api.registry import get_model

    assert get_model("glmkit") is GLMkitLM


def test_multiple_choice_reports_plain_and_calibrated_accuracy(ckpt):
    # calibrated score = log p(candidate | context) - log p(candidate | empty context); recomputed here
    # from sequence_logprobs, item by item, and compared with _multiple_choice's two accuracies
    from glmkit.convert import load
    from glmkit.evaluate import EvalContext, _multiple_choice
    from glmkit.tokenizer import load_tokenizer

    model, tok = load(ckpt).eval(), load_tokenizer(ckpt)
    ctx = EvalContext(model=model, tok=tok, data=FIXTURES, batch_size=3)
    sp = ctx.special
    words = ["春眠不觉晓", "处处闻啼鸟", "夜来风雨声", "花落知多少", "床前明月光"]
    items = [(tok.encode(w[:2]), tok.encode(w[3:]), [tok.encode(c) for c in words[i : i + 3]]) for i, w in enumerate(words[:3])]
    gold = [0, 1, 2]
    score = lambda p, c, s: float(sequence_logprobs(model, [blank_example(p, c, s, sp)], sp.pad)[0][0].detach())
    plain = [[score(p, c, s) for c in cands] for p, s, cands in items]
    cal = [[score(p, c, s) - score([], c, []) for c in cands] for p, s, cands in items]
    want = {"accuracy": sum(max(range(3), key=r.__getitem__) == g for r, g in zip(plain, gold)) / 3,
            "accuracy_calibrated": sum(max(range(3), key=r.__getitem__) == g for r, g in zip(cal, gold)) / 3}
    got = _multiple_choice(ctx, items, gold)
    assert got["n"] == 3 and {k: got[k] for k in want} == want, (got, want, plain, cal)
    # the two rules disagree somewhere on these items (else the test could not tell them apart)
    assert any(max(range(3), key=a.__getitem__) != max(range(3), key=b.__getitem__) for a, b in zip(plain, cal)), (plain, cal)


def test_lm_scoring_reads_prefix_candidate_and_suffix_left_to_right(ckpt):
    # --scoring lm: each candidate scored as log p(prefix candidate suffix) after a lone [gMASK] (how a model trained
    # as a causal LM answers a cloze); recomputed one example at a time from sequence_logprobs
    from glmkit.convert import load
    from glmkit.evaluate import EvalContext, _lm_choice, _lm_scores
    from glmkit.tokenizer import load_tokenizer

    model, tok = load(ckpt).eval(), load_tokenizer(ckpt)
    ctx = EvalContext(model=model, tok=tok, data=FIXTURES, batch_size=2)
    sp = ctx.special
    words = ["春眠不觉晓", "处处闻啼鸟", "夜来风雨声", "花落知多少", "床前明月光", "疑是地上霜"]
    items = [(tok.encode(w[:2]), tok.encode(w[3:]), [tok.encode(c) for c in words[i : i + 3]]) for i, w in enumerate(words[:3])]
    with torch.no_grad():
        lm = torch.tensor([[float(sequence_logprobs(model, [blank_example([], p + c + s, [], sp, mask=sp.gmask)], sp.pad)[0][0])
                            for c in cands] for p, s, cands in items])
        blank = torch.tensor([[float(sequence_logprobs(model, [blank_example(p, c, s, sp)], sp.pad)[0][0]) for c in cands]
                              for p, s, cands in items])
    got = _lm_scores(ctx, items)
    print(f"\nlm scores max diff {(got - lm).abs().max():.2e}; blank scores differ by {(got - blank).abs().max():.1f}")
    assert torch.allclose(got, lm, atol=1e-3) and not torch.allclose(got, blank, atol=1.0), (got, lm, blank)
    best, worst = lm.argmax(-1).tolist(), lm.argmin(-1).tolist()
    assert _lm_choice(ctx, items, best)["accuracy"] == 1.0 and _lm_choice(ctx, items, worst)["accuracy"] == 0.0
