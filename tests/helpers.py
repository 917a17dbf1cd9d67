"""Shared test helpers: comparisons that print the numbers when they fail, and the toy data and
checkpoints several modules build (their fixtures are in conftest.py)."""

import json
from pathlib import Path

import torch


def _diff_report(a: torch.Tensor, b: torch.Tensor, what: str, n: int = 5) -> str:
    """max / mean abs difference and the `n` worst entries side by side."""
    a64, b64 = a.detach().double().flatten(), b.detach().double().flatten()
    diff = (a64 - b64).abs().nan_to_num(nan=float("inf"))
    worst = diff.topk(min(n, diff.numel())).indices
    rows = "\n".join(
        f"    at {tuple(int(i) for i in torch.unravel_index(j, a.shape))}: "
        f"{a64[j].item():+.8f} vs {b64[j].item():+.8f}  (|diff| {diff[j].item():.3e})"
        for j in worst
    )
    return (
        f"{what}: shape {tuple(a.shape)}, max |diff| {diff.max().item():.3e}, "
        f"mean |diff| {diff.mean().item():.3e}\n  worst entries (got vs expected):\n{rows}"
    )


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float, what: str = "tensors") -> float:
    """Assert |a - b| <= atol everywhere (NaN fails); return the max difference for reporting."""
    __tracebackhide__ = True
    assert a.shape == b.shape, f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}"
    diff = (a.detach().double() - b.detach().double()).abs()
    if not bool((diff <= atol).all()):  # also catches NaN
        raise AssertionError(f"atol {atol:.1e} exceeded\n" + _diff_report(a, b, what))
    return diff.max().item() if diff.numel() else 0.0


def assert_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    __tracebackhide__ = True
    """Bit-identical (torch.equal), with the numbers printed when not."""
    assert a.shape == b.shape, f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}"
    if not torch.equal(a, b):
        raise AssertionError("expected bit-identical tensors\n" + _diff_report(a, b, what))


def assert_differs(a: torch.Tensor, b: torch.Tensor, min_diff: float, what: str) -> None:
    __tracebackhide__ = True
    d = (a.double() - b.double()).abs().max().item()
    assert d > min_diff, f"{what}: expected a change, but max |diff| = {d:.3e} <= {min_diff:.1e}"


def debug_checkpoint(tok, directory):
    """A seeded random-init `debug` model sized to `tok`, written with the tokenizer as a checkpoint directory."""
    from glmkit.config import get_preset
    from glmkit.convert import write_checkpoint
    from glmkit.model import GLM

    tok.save(directory / "tok")
    torch.manual_seed(0)
    m = GLM(get_preset("debug", vocab_size=tok.vocab_size))
    m.init_weights(seed=0)
    return write_checkpoint(m, directory / "model", extra_files=[directory / "tok" / "tokenizer.json"])


def int16_act_bound(x: torch.Tensor, w: torch.Tensor) -> float:
    """How far the native int8-weight kernel may be from x @ w.T: it rounds each activation row to int16
    steps of absmax/8191, so an output moves by at most half a step times the row's sum of |w|."""
    return (x.float().abs().amax(-1).max() / 8191 / 2 * w.float().abs().sum(-1).max()).item()


def int4_act_bound(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, group: int) -> float:
    """How far the native int4 kernel may be from x @ dequant.T, for unpacked codes q (N, K) and scales
    (N, K/group): it rounds each (row, group) of x to int8 steps of its absmax / 127 and multiplies the
    mins by exact sums of x, so an output moves by at most half a step times the group's sum of
    |q * scale|."""
    M, N = x.shape[0], q.shape[0]
    step = x.double().reshape(M, -1, group).abs().amax(-1) / 127  # (M, G)
    qs = (q.double().reshape(N, -1, group) * scales.double()[..., None]).abs().sum(-1)  # (N, G)
    return (step / 2 @ qs.T).max().item()


EVAL_FIXTURES = Path(__file__).parent / "fixtures" / "eval"
WORDS = ["red", "blue", "green", "small", "large", "cat", "dog", "tree", "house", "river", "stone", "cloud"]


def eval_texts() -> list[str]:
    """Every string of the evaluation fixtures, and the words and verbalizers the fine-tuning tests use:
    what conftest's `eval_tok` is trained on."""
    texts = []
    for f in sorted(EVAL_FIXTURES.glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            texts += [v for v in r.values() if isinstance(v, str)] + r.get("lines", [])
    texts += (EVAL_FIXTURES / "chengyu.txt").read_text(encoding="utf-8").splitlines()
    return texts + [" ".join(WORDS), "alpha omega " * 3, "总之很好。总之很差。非常好", "This message is fine. This message is junk."]


ZH = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
      "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"]
EN = ["The quick brown fox jumps over the lazy dog. The dog sleeps.", "A stitch in time saves nine. Better late than never."]
CODE = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"]


def debug_train_config(shards, out, **kw):
    """10 steps of the debug preset on `shards` (what tests/data/debug_losses.json records), overridden by `kw`."""
    from glmkit.train import TrainConfig

    base = dict(model="debug", data=str(shards), out=str(out), seq_len=64, batch_size=4, steps=10, lr=3e-3,
                min_lr=3e-4, warmup=3, eval_every=0, save_every=0, log_every=1, progress=False)
    return TrainConfig(**{**base, **kw})


def make_shards(root: Path) -> Path:
    """A deterministic toy pretraining corpus (zh, en, code) -> its own BPE -> token shards under `root`.
    tests/data/debug_losses.json was recorded on these shards."""
    from glmkit.data.shards import write_shards
    from glmkit.tokenizer import train_bpe

    corpus = root / "corpus"
    corpus.mkdir(parents=True)
    pools = [("zh", ZH), ("en", EN), ("code", CODE)]
    for split, n in (("train", 300), ("heldout", 40)):
        with open(corpus / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                dom, pool = pools[i % 3]
                text = " ".join(pool[(i * 7 + j) % len(pool)] for j in range(3))
                f.write(json.dumps({"text": text, "domain": dom}, ensure_ascii=False) + "\n")
    texts = [json.loads(line)["text"] for line in (corpus / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    tok = train_bpe(texts=texts, vocab_size=400)
    write_shards(corpus, tok, root / "shards", progress=False)
    return root / "shards"


# GLM blank filling written out by hand (Part A = context [gMASK], Part B = <sop> ...): references
# for the library's own example builders, scorers and generators
def blank_logprob(model, sp, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """log p(continuation | context) of a GLM, one forward per example with the layout written out by
    hand: Part A = context [gMASK], Part B = <sop> continuation, every Part B token at the mask's
    position with block positions 1, 2, ...; the log-softmax of the logits predicting each
    continuation token, summed; and whether every one of them is the argmax."""
    a = context + [sp.gmask]
    ids = a + [sp.sop] + continuation
    pos = list(range(len(a))) + [len(context)] * (len(continuation) + 1)
    block = [0] * len(a) + list(range(1, len(continuation) + 2))
    with torch.no_grad():
        logits = model(torch.tensor([ids]), torch.tensor([[pos, block]]), sep=len(a))[0].double()  # (T, V)
    pred, want = logits[len(a) : len(a) + len(continuation)], torch.tensor(continuation)  # input sep + i predicts token i
    return pred.log_softmax(-1)[torch.arange(len(want)), want].sum().item(), bool((pred.argmax(-1) == want).all())


def greedy_blank(model, sp, context: list[int], max_new: int) -> list[int]:
    """The [gMASK] blank after `context` filled greedily, a full forward per token (no cache), up to
    <eop> or <|endoftext|>."""
    a, out = context + [sp.gmask], []
    for _ in range(max_new):
        ids = a + [sp.sop] + out
        pos = list(range(len(a))) + [len(context)] * (len(out) + 1)
        block = [0] * len(a) + list(range(1, len(out) + 2))
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids]), torch.tensor([[pos, block]]), sep=len(a))[0, -1].argmax())
        if nxt in (sp.eop, sp.eos):
            break
        out.append(nxt)
    return out


def run_all(engine, arrivals):
    """arrivals: {step_number: [Request, ...]}; steps the engine until everything finished."""
    step = 0
    while engine.has_work() or any(k >= step for k in arrivals):
        for r in arrivals.pop(step, []):
            engine.submit(r)
        engine.step()
        step += 1
