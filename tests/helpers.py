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


def left_padded(vocab: int, lengths, T: int, seed: int = 0, pad_id: int | None = None):
    """A left-padded batch (ids, attention mask, position ids) of random tokens: row b's last lengths[b]
    tokens are real. With `pad_id`, real tokens avoid id 0 and the padding holds `pad_id`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0 if pad_id is None else 1, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
        if pad_id is not None:
            ids[b, : T - n] = pad_id
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def randomize_moe(model, scale: float = 0.3):
    """Weights larger than a transformers init's (norms near 1), and a random router correction bias, so
    routing, rotary and an indexer's choices matter in a tiny model."""
    for n, p in model.named_parameters():
        p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in n else scale * torch.randn_like(p))
    for n, b in model.named_buffers():
        if "e_score_correction_bias" in n:
            b.normal_(0, scale)
    return model


@torch.no_grad()
def mtp_round_trip(hf_dir: Path, tmp_path: Path, sd: dict, last: int, dim: int):
    """Add an MTP layer (a perturbed copy of layer `last`, plus eh_proj and its norms) to the checkpoint
    `hf_dir`'s tensors `sd`, as a release ships it at index num_hidden_layers; read it, write it back in the
    layout it came from, and check every tensor (and the config) round-trips bit for bit. Returns the
    written config.json and the model read."""
    import json

    from safetensors.torch import load_file, save_file

    from glmkit.convert import read_checkpoint, write_checkpoint
    from glmkit.layers import MoE

    src = tmp_path / "hf-mtp"
    src.mkdir()
    g = torch.Generator().manual_seed(3)
    for n in [n for n in sd if n.startswith(f"model.layers.{last}.")]:
        sd[n.replace(f"layers.{last}.", f"layers.{last + 1}.")] = sd[n] + 0.1 * torch.randn(sd[n].shape, generator=g)
    t = f"model.layers.{last + 1}."
    sd[t + "eh_proj.weight"] = 0.1 * torch.randn(dim, 2 * dim, generator=g)
    for n in ("enorm", "hnorm", "shared_head.norm"):
        sd[t + n + ".weight"] = 1 + 0.2 * torch.randn(dim, generator=g)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    c = json.loads((hf_dir / "config.json").read_text())
    c["num_nextn_predict_layers"] = 1
    (src / "config.json").write_text(json.dumps(c))
    ours = read_checkpoint(src)
    assert ours.cfg.n_mtp_layers == 1 and isinstance(ours.mtp[0].block.mlp, MoE)
    write_checkpoint(ours, tmp_path / "back")  # the layout it came from
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(back) == sorted(sd)
    for n in back:
        assert back[n].dtype == sd[n].dtype and torch.equal(back[n], sd[n]), n
    assert read_checkpoint(tmp_path / "back").cfg == ours.cfg
    return json.loads((tmp_path / "back" / "config.json").read_text()), ours


@torch.no_grad()
def assert_decodes_as_full_forwards(model, prompts: list[list[int]], n: int, arrivals: dict[int, slice]) -> None:
    """`generate` and the serving engine (paged pool; requests joining at the steps `arrivals` names, as slices
    of `prompts`) give, for each prompt, the n greedy tokens of repeated full forwards."""
    from glmkit.engine import Engine, Request
    from glmkit.generate import generate
    from glmkit.sampling import SamplingParams

    want = []
    for p in prompts:
        ids = list(p)
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        want.append(ids[len(p):])
    greedy = SamplingParams(max_new_tokens=n, temperature=0)
    assert [c.token_ids for c in generate(model, prompts, greedy)] == want
    engine = Engine(model, max_batch=2, max_len=32)
    reqs = [Request(p, greedy) for p in prompts]
    run_all(engine, {step: reqs[sl] for step, sl in arrivals.items()})
    assert [r.output_ids for r in reqs] == want


def set_absorb(model, absorb: bool | None) -> None:
    """Force every latent-attention layer's decode form (True: absorbed, False: expanded; None: by cost)."""
    for layer in model.layers:
        layer.attn.absorb = absorb


def scaled(tol: float, ref: torch.Tensor) -> float:
    """`tol` relative to the largest magnitude compared (absolute below 1). fp32 rounding grows with the
    values, and where it falls depends on the CPU: PyTorch's AVX2, AVX-512 and AMX kernels sum in
    different orders (ATEN_CPU_CAPABILITY=avx2 forces the AVX2 one on a newer CPU)."""
    return tol * max(1.0, ref.detach().abs().max().item())


def int4_linear_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                          gs: int) -> torch.Tensor:
    """x (..., K) @ W.T for glmkit's int4 layout as the native int4 kernels compute it (csrc/gemv.cpp
    int4_activations): each (row, group) of x rounded to int8 steps of its absmax / 127 for the scaled codes, the
    mins against the exact group sums. fp32."""
    from glmkit.quantize import unpack_int4

    N, K = packed.shape[0], packed.shape[1] * 2
    xg = x.float().reshape(*x.shape[:-1], K // gs, gs)
    step = xg.abs().amax(-1, keepdim=True) / 127
    step = torch.where(step > 0, step, torch.ones_like(step))
    xq = torch.round(xg * (1 / step)) * step  # nearbyint of x times the step's inverse, as the kernel
    q = unpack_int4(packed).float().reshape(N, K // gs, gs)
    return (torch.einsum("...gk,ngk->...n", xq, q * scales.float()[..., None])
            + torch.einsum("...g,ng->...n", xg.sum(-1), mins.float()))


def uk_int4_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, gs: int,
                      heads: int) -> torch.Tensor:
    """x (M, H, N) through kv_b's key rows (rows [0, N) of each head's block), y (M, H, K) = sum_n x_n W[h][n], as
    kernels.heads_uk_int4 computes it (csrc/gemv.cpp heads_uk_int4): per output group g the activations x_n * s_ng
    rounded to int8 steps of their absmax / 127 per 64 rows, the mins against the exact x, and 7.5 (the codes' mean)
    times the rounding's sum. fp32."""
    from glmkit.quantize import unpack_int4

    M, H, N = x.shape
    K, G = packed.shape[1] * 2, packed.shape[1] * 2 // gs
    rows = [h * (packed.shape[0] // heads) + n for h in range(heads) for n in range(N)]
    q = unpack_int4(packed[rows]).float().reshape(H, N, G, gs)
    s, m = scales[rows].float().reshape(H, N, G), mins[rows].float().reshape(H, N, G)
    C = -(-N // 64)
    a = torch.zeros(M, H, C * 64, G)
    a[:, :, :N] = x.float()[..., None] * s  # (M, H, N, G) each group's activations, zero rows after N
    a = a.reshape(M, H, C, 64, G)
    step = a.abs().amax(3, keepdim=True) / 127
    step = torch.where(step > 0, step, torch.ones_like(step))
    aq = (torch.round(a * (1 / step)) * step).reshape(M, H, C * 64, G)
    err = a.reshape(M, H, C * 64, G).sum(2) - aq.sum(2)  # (M, H, G) the rounding's total, put back at the codes' mean
    y = (torch.einsum("mhng,hngj->mhgj", aq[:, :, :N], q)
         + (torch.einsum("mhn,hng->mhg", x.float(), m) + 7.5 * err)[..., None])
    return y.reshape(M, H, K)
