"""Fine-tuning: candidate scores equal a brute-force forward per candidate, a cloze fine-tune learns
a separable task, SFT puts its loss on replies only, LoRA fine-tunes export as loadable merged checkpoints."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import glmkit
from glmkit.finetune import ClozeTask, FinetuneConfig, candidate_scores, epoch_batches, finetune, main, sft_example, sft_messages
from glmkit.infill import special_ids
from glmkit.lora import load_adapters
from tests.helpers import WORDS, assert_close, debug_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def tok(eval_tok):
    """conftest's tokenizer of the evaluation fixtures and the words used here (tests.helpers.eval_texts)."""
    return eval_tok


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    """A random-init debug model with the tiny tokenizer, written as a checkpoint directory."""
    return debug_checkpoint(tok, tmp_path_factory.mktemp("ckpt"))


def brute_force_score(model, prefix, cand, suffix, special, eop=True) -> float:
    """One full forward for one candidate, the GLM layout written out by hand, log-softmax summed."""
    part_a = prefix + [special.mask] + suffix
    m = len(prefix)  # the mask's position
    ids = part_a + [special.sop] + cand
    pos = list(range(len(part_a))) + [m] * (len(cand) + 1)
    block = [0] * len(part_a) + list(range(1, len(cand) + 2))
    targets = cand + [special.eop]
    with torch.no_grad():
        logits = model(torch.tensor([ids]), torch.tensor([[pos, block]]), sep=len(part_a))[0]  # (T, V)
    logp = torch.log_softmax(logits.double(), -1)
    total = 0.0
    for j, t in enumerate(targets if eop else cand):
        total += float(logp[len(part_a) + j, t])
    return total


def test_candidate_scores_equal_brute_force(tok, ckpt):
    model = glmkit.load(ckpt).eval()
    sp = special_ids(tok)
    verbal = ["好", "差", "非常好", "alpha omega alpha"]  # one- and multi-token verbalizers
    items = [(tok.encode(p), tok.encode(s), [tok.encode(v) for v in verbal])
             for p, s in [("物流很快，包装完好，总之很", "。"), ("The quick brown fox", " jumps."), ("", "尾巴")]]
    assert {len(c) for c in items[0][2]} != {1}, [len(c) for c in items[0][2]]
    for eop in (True, False):
        got = candidate_scores(model, items, sp, "sum", eop)  # one padded batch of all 12 candidates
        want = torch.tensor([[brute_force_score(model, p, c, s, sp, eop) for c in cands] for p, s, cands in items],
                            dtype=torch.float64)
        # fp32 sums of up to 8 log-probs near -10, each from a forward of another shape (a padded batch vs one
        # sequence): the rounding grows with the score, and how it falls depends on the CPU's GEMM dispatch
        # (measured 7.6e-6 at -83 with AVX2, 1.5e-5 with AVX-512: one and two fp32 steps). A misplaced position
        # or target moves a score by more than 1e-2.
        tol = 1e-6 * max(1.0, want.abs().max().item())
        assert_close(got, want, tol, f"batched blank scores vs brute force (eop={eop})")
    mean = candidate_scores(model, items, sp, "mean", True)
    n = torch.tensor([[len(c) + 1 for c in cands] for _, _, cands in items])
    total = candidate_scores(model, items, sp, "sum", True)
    assert_close(mean, total / n, 1e-6 * max(1.0, total.abs().max().item()), "mean = sum / (tokens + eop)")


def test_cloze_truncation_keeps_the_pattern(tok):
    task = ClozeTask("Review: {text} Overall it was[MASK]. Thanks", {"pos": " fine", "neg": " junk"})
    long = {"text": " ".join(WORDS * 20), "label": "pos"}
    pre, suf, cands = task.encode(tok, long, max_len=40)
    assert len(pre) + len(suf) + 2 + max(map(len, cands)) <= 40, (len(pre), len(suf))
    assert tok.decode(pre).startswith("Review: ") and tok.decode(pre).endswith(" Overall it was"), tok.decode(pre)
    assert tok.decode(suf) == ". Thanks"
    with pytest.raises(ValueError, match="exactly one"):
        ClozeTask("{text} no blank", {"a": "x", "b": "y"})
    with pytest.raises(ValueError, match="not in the verbalizer"):
        task.label_index({"text": "x", "label": "maybe"})
    with pytest.raises(KeyError, match="no field"):
        task.encode(tok, {"body": "x"}, 40)


def toy_records(n, seed):
    """Separable: the label is which keyword (alpha / omega) sits among random filler words."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = ["pos", "neg"][i % 2]
        words = list(rng.choice(WORDS, 6))
        words.insert(int(rng.integers(0, 7)), "alpha" if label == "pos" else "omega")
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_epoch_batches_cover_every_example_once_and_group_lengths():
    rng = np.random.default_rng(0)
    lengths = list(np.where(rng.random(1000) < 0.15, 128, rng.integers(10, 60, 1000)))  # few long, many short
    padded = {}
    for group in (False, True):
        a = epoch_batches(lengths, 16, np.random.default_rng(3), group, window=8)
        b = epoch_batches(lengths, 16, np.random.default_rng(3), group, window=8)
        assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b) == 63  # seeded
        assert sorted(np.concatenate(a).tolist()) == list(range(1000))  # each example once per epoch
        padded[group] = sum(len(x) * max(lengths[i] for i in x) for x in a)
    real = sum(lengths)
    # grouping within windows of 8 batches cuts the padded tokens to near the real ones
    assert padded[True] < 0.75 * padded[False] and padded[True] < 1.35 * real, (padded, real)


@pytest.mark.parametrize("group", [False, True])
def test_cloze_finetune_learns_a_separable_task(tok, ckpt, tmp_path, capsys, group):
    train = write_jsonl(tmp_path / "train.jsonl", toy_records(64, 0))
    test = write_jsonl(tmp_path / "test.jsonl", toy_records(40, 1))
    out = tmp_path / "ft"
    main(["--task", "cloze", "--model", str(ckpt), "--train", str(train), "--eval", str(test), "--out", str(out),
          "--pattern", "{text}. This message is[MASK].", "--verbalizer", '{"pos": " fine", "neg": " junk"}',
          "--steps", "40", "--lr", "3e-3", "--batch-size", "16", "--max-len", "64", "--device", "cpu", "--quiet"]
         + (["--group-by-length"] if group else []))
    meta = json.loads((out / "finetune.json").read_text())
    res = meta["eval"][-1]
    assert res["accuracy"] >= 0.9, f"cloze accuracy after fine-tuning {res['accuracy']:.3f} (n={res['n']}), losses end {meta['final_loss']:.4f}"
    assert meta["cloze"]["verbalizer"] == {"pos": " fine", "neg": " junk"}
    # the written directory is a checkpoint glmkit.load reads, with its tokenizer
    model = glmkit.load(out).eval()
    from glmkit.finetune import cloze_accuracy

    again = cloze_accuracy(model, glmkit.load_tokenizer(out), ClozeTask(**meta["cloze"]), [json.loads(x) for x in test.read_text().splitlines()],
                           max_len=64)
    assert again["accuracy"] == res["accuracy"], (again, res)
    with pytest.raises(FileExistsError):  # never over an existing run, checked before any training
        finetune(FinetuneConfig(task="cloze", model=str(ckpt), train=str(train), out=str(out), preset="spam_en"))


def test_lora_finetune_exports_merged_and_adapters(tok, ckpt, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", toy_records(32, 2))
    r = finetune(FinetuneConfig(task="cloze", model=str(ckpt), train=str(train), out=str(tmp_path / "ft"),
                                pattern="{text}. This message is[MASK].", verbalizer='{"pos": " fine", "neg": " junk"}',
                                steps=15, lr=1e-2, batch_size=16, max_len=64, device="cpu", lora=True, lora_rank=4,
                                lora_targets=("attn.qkv", "attn.out"), progress=False))
    first, last = np.mean(r["losses"][:3]), np.mean(r["losses"][-3:])
    assert last < first, f"LoRA loss did not fall: {first:.4f} -> {last:.4f}"
    out = tmp_path / "ft"
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    ids = torch.tensor([tok.encode("alpha red cat. This message is fine.")])
    merged = glmkit.load(out).eval()
    unmerged = load_adapters(glmkit.load(ckpt), out).eval()  # base + adapters from their own files
    with torch.no_grad():
        want = unmerged(ids)  # W + BA rounded to fp32 once vs two products: rounding that scales with the logits
        assert_close(merged(ids), want, 1e-5 * max(1.0, want.abs().max().item()),
                     "exported merged model vs base + saved adapters")


def test_sft_loss_on_replies_only(tok, ckpt, tmp_path):
    rows = [{"prompt": f"colour of the {w}?", "completion": f"the {w} is {c}"} for w, c in
            [("cat", "red"), ("dog", "blue"), ("tree", "green"), ("house", "small")]]
    rows.append({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "river?"},
                              {"role": "assistant", "content": "stone"}, {"role": "user", "content": "cloud?"},
                              {"role": "assistant", "content": "large"}]})
    ex = sft_example(tok, sft_messages(rows[0]), 64, bidirectional_prompt=False)
    assert ex.sep == 0
    reply = tok.decode(ex.targets[ex.loss_mask].tolist())
    assert reply == "\nthe cat is red<|endoftext|>", repr(reply)
    bi = sft_example(tok, sft_messages(rows[0]), 64, bidirectional_prompt=True)
    assert bi.sep == int(np.argmax(bi.loss_mask)) + 1 and tok.decode(bi.input_ids[: bi.sep].tolist()).endswith("<|assistant|>")
    multi = sft_example(tok, sft_messages(rows[-1]), 64, False)
    text = tok.decode(multi.targets[multi.loss_mask].tolist())
    assert "stone" in text and "large" in text and "river" not in text and "cloud" not in text, repr(text)
    assert sft_example(tok, sft_messages(rows[0]), 5, False) is None  # the prompt alone fills max_len

    train = write_jsonl(tmp_path / "sft.jsonl", rows)
    r = finetune(FinetuneConfig(task="sft", model=str(ckpt), train=str(train), eval=str(train), out=str(tmp_path / "ft"),
                                steps=30, lr=3e-3, batch_size=5, max_len=64, device="cpu", progress=False))
    first, last = np.mean(r["losses"][:3]), np.mean(r["losses"][-3:])
    assert last < first - 1.0, f"SFT loss {first:.3f} -> {last:.3f}"
    assert r["eval"]["loss"] < first - 1.0 and r["eval"]["n"] == 5, r["eval"]
    assert glmkit.load(tmp_path / "ft").cfg.vocab_size == tok.vocab_size
