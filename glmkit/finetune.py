"""Fine-tuning one GLM for understanding (cloze classification) and generation (SFT), fully or with LoRA.

    glmkit finetune --task cloze --model run/ckpt --train reviews.jsonl --eval test.jsonl --out ft/ \\
        --pattern "{text}总之很[MASK]。" --verbalizer '{"pos": "好", "neg": "差"}'
    glmkit finetune --task cloze --preset sentiment_zh --model M --train CACHE/corpus/eval/sentiment_zh.jsonl \\
        --train-split train --eval CACHE/corpus/eval/sentiment_zh.jsonl --eval-split test --out ft/
    glmkit finetune --task sft --model M --train chats.jsonl --out ft/ --lora --lora-rank 8
    model = glmkit.load("ft/")        # merged weights; ft/ also holds tokenizer.json, finetune.json,
                                      # and with --lora the adapters on their own (adapter_*.json/.safetensors)

Cloze classification is GLM's way of doing understanding with the generation model (Du et al. 2022,
§2.3, after PET): a pattern turns the input into a text with one blank, and each label has a
verbalizer, the text that would fill the blank. Each candidate is scored as the blank's
log-likelihood under the infilling objective: Part A = the filled pattern with one `[MASK]`, Part B
= `<sop> v1..vn`, targets `v1..vn <eop>`, score = sum of log p over those targets (or the mean,
`--score mean`). `<eop>` counts by default: it makes the score the probability that the blank is
*exactly* the verbalizer, so a short verbalizer that is a prefix of a longer one does not win for
free. `--no-eop` drops it: THUDM/GLM's `build_input_from_ids` scores the answer tokens only
(inputs `<sop> a1..an-1`, targets `a1..an`). Training is cross-entropy over the candidates'
scores, the gradient flowing through every candidate (GLM §2.3).

SFT trains on `{"messages": [...]}` (OpenAI format) or `{"prompt", "completion"}` records rendered
by `Tokenizer.render_chat`; the loss is on assistant replies (and the token that ends each) only.
By default the prompt is read causally, positions 0..T-1, block positions 0: the layout in which
`generate.chat` / `glmkit chat` run a rendered conversation, so a fine-tuned model is used as it
was trained. `--prompt-attention bidirectional` reads everything before the first reply as Part A
(GLM's prefix-LM); inference must then prefill the prompt with sep = its length.

LoRA (`--lora`, lora.py) freezes the base and trains adapters; the output is the merged model
(loadable by glmkit.load) with the adapters saved beside it. The optimizer and learning-rate
schedule are train.py's (`make_optimizer`, `lr_at`).
"""

from __future__ import annotations

import argparse
import json
import math
import string
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .infill import Example, SpecialIds, assemble, collate, special_ids

MASK = "[MASK]"

# Ready-made patterns for the evaluation sets of `glmkit data build` (eval/*.jsonl). The English
# verbalizers keep their leading space: the blank follows "is" directly in the pattern, so a
# byte-level BPE sees " junk" exactly as it would in running text.
CLOZE_PRESETS = {
    "sentiment_zh": {"pattern": "{text}总之很[MASK]。", "verbalizer": {"pos": "好", "neg": "差"}},
    "spam_en": {"pattern": "{text}\n\nThis message is[MASK].", "verbalizer": {"spam": " junk", "ham": " fine"}},
}


# ---- scoring blanks ------------------------------------------------------------------------------
def blank_example(prefix, filler, suffix, special: SpecialIds, mask: int | None = None, eop: bool = True) -> Example:
    """GLM example for one blank: Part A = prefix [MASK] suffix, Part B = <sop> filler, targets
    filler <eop> (the <eop> target without loss unless `eop`). `filler` must be non-empty."""
    prefix, filler, suffix = list(prefix), list(filler), list(suffix)
    if not filler:
        raise ValueError("the text filling a blank is empty (a verbalizer or candidate encodes to no tokens)")
    ex = assemble(prefix + filler + suffix, [(len(prefix), len(prefix) + len(filler))],
                  [special.mask if mask is None else mask], [0], special)
    if not eop:
        ex.loss_mask[-1] = False
    return ex


def causal_example(context, continuation) -> Example:
    """Left-to-right scoring of `continuation` after `context` (sep 0, positions 0..T-1): how causal
    checkpoints (GLM-4) score text. `context` must be non-empty (start it with [gMASK] <sop>)."""
    ids = np.asarray(list(context) + list(continuation), np.int64)
    T = len(ids) - 1
    loss = np.arange(T) >= len(context) - 1
    return Example(input_ids=ids[:-1], targets=ids[1:], position_ids=np.stack((np.arange(T), np.zeros(T, np.int64))),
                   sep=0, loss_mask=loss, mode="causal")


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def sequence_logprobs(model, examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example: summed log p of its loss-masked targets (N,), how many (N,), and whether each of
    them is the argmax (N,) bool. Differentiable when grad is enabled: cloze training uses it."""
    b = {k: v.to(model_device(model)) for k, v in collate(examples, pad_id).items()}
    h = model(b["input_ids"], b["position_ids"], sep=b["sep"], hidden_only=True)  # (N, T, C)
    m = b["loss_mask"]
    logits = model.logits(h[m]).float()  # (M, V), M = loss positions of all examples
    tgt = b["targets"][m]
    lp = logits.log_softmax(-1).gather(-1, tgt[:, None])[:, 0]  # (M,)
    row = m.nonzero()[:, 0]  # example of each loss position
    N = len(examples)
    logp = torch.zeros(N, device=lp.device, dtype=lp.dtype).index_add(0, row, lp)
    miss = torch.zeros(N, device=lp.device).index_add(0, row, (logits.argmax(-1) != tgt).float())
    return logp, m.sum(1), miss == 0


def candidate_scores(model, items: list[tuple[list, list, list[list]]], special: SpecialIds, reduce: str = "sum",
                     eop: bool = True, mask: int | None = None) -> torch.Tensor:
    """Blank log-likelihood of each candidate: items are (prefix ids, suffix ids, [candidate ids...])
    with the same number K of candidates each; returns (B, K). reduce: sum | mean (per target token)."""
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce={reduce!r}: choose sum or mean")
    K = len(items[0][2])
    if any(len(c) != K for _, _, c in items):
        raise ValueError("every item needs the same number of candidates")
    exs = [blank_example(p, c, s, special, mask, eop) for p, s, cands in items for c in cands]
    logp, n, _ = sequence_logprobs(model, exs, special.pad)
    if reduce == "mean":
        logp = logp / n.clamp(min=1)
    return logp.view(len(items), K)


# ---- cloze tasks -----------------------------------------------------------------------------------
@dataclass
class ClozeTask:
    """A pattern with one [MASK] and {field} placeholders, and label -> verbalizer text."""

    pattern: str
    verbalizer: dict
    label_field: str = "label"

    def __post_init__(self):
        if self.pattern.count(MASK) != 1:
            raise ValueError(f"cloze pattern {self.pattern!r} must contain exactly one {MASK}")
        if len(self.verbalizer) < 2:
            raise ValueError(f"verbalizer {self.verbalizer!r}: want at least two labels, each mapped to its text")
        self.verbalizer = {str(k): v for k, v in self.verbalizer.items()}
        self.fields = [f for _, f, _, _ in string.Formatter().parse(self.pattern) if f]

    @property
    def labels(self) -> list[str]:
        return list(self.verbalizer)

    @classmethod
    def preset(cls, name: str) -> ClozeTask:
        if name not in CLOZE_PRESETS:
            raise ValueError(f"unknown cloze preset {name!r}; known: {list(CLOZE_PRESETS)}")
        return cls(**CLOZE_PRESETS[name])

    def _render(self, record: dict) -> tuple[str, str]:
        try:
            a, b = self.pattern.split(MASK)
            return a.format_map(record), b.format_map(record)
        except KeyError as e:
            raise KeyError(f"a record has no field {e} that the pattern {self.pattern!r} uses (fields: {list(record)})") from None

    def encode(self, tok, record: dict, max_len: int) -> tuple[list[int], list[int], list[list[int]]]:
        """(prefix ids, suffix ids, candidate ids per label) fitting max_len tokens for the longest
        candidate. Too long: the longest field is cut from its end (re-rendered, so the pattern's
        own words stay), then as a last resort the prefix from its start and the suffix from its end."""
        cands = [tok.encode(v) for v in self.verbalizer.values()]
        budget = max_len - 2 - max(len(c) for c in cands)  # [MASK] and <sop>
        if budget < 1:
            raise ValueError(f"max_len={max_len} leaves no room for the pattern next to the verbalizers")
        record = dict(record)
        for _ in range(4):
            a, b = self._render(record)
            pre, suf = tok.encode(a), tok.encode(b)
            over = len(pre) + len(suf) - budget
            if over <= 0:
                return pre, suf, cands
            texts = [f for f in self.fields if isinstance(record.get(f), str)]
            if not texts:
                break
            longest = max(texts, key=lambda f: len(record[f]))
            ids = tok.encode(record[longest])
            if not ids:
                break
            record[longest] = tok.decode(ids[: max(0, len(ids) - over - 1)])
        keep_pre = min(len(pre), budget - min(len(suf), budget // 2))
        return pre[len(pre) - keep_pre :], suf[: budget - keep_pre], cands

    def label_index(self, record: dict) -> int:
        y = str(record.get(self.label_field))
        if y not in self.verbalizer:
            raise ValueError(f"label {y!r} is not in the verbalizer {self.verbalizer} (field {self.label_field!r})")
        return self.labels.index(y)


@torch.no_grad()
def cloze_predict(model, tok, task: ClozeTask, records: list[dict], max_len: int = 512, batch_size: int = 16,
                  reduce: str = "sum", eop: bool = True) -> tuple[list[int], torch.Tensor]:
    """Predicted label index per record and the (N, K) score matrix."""
    special = special_ids(tok)
    scores = []
    for i in range(0, len(records), batch_size):
        items = [task.encode(tok, r, max_len) for r in records[i : i + batch_size]]
        scores.append(candidate_scores(model, items, special, reduce, eop).float().cpu())
    s = torch.cat(scores) if scores else torch.zeros(0, len(task.labels))
    return s.argmax(-1).tolist(), s


def cloze_accuracy(model, tok, task: ClozeTask, records: list[dict], **kw) -> dict:
    was_training = model.training
    model.eval()
    pred, _ = cloze_predict(model, tok, task, records, **kw)
    model.train(was_training)
    gold = [task.label_index(r) for r in records]
    counts = np.bincount(gold, minlength=len(task.labels)) if gold else np.zeros(1)
    return {"n": len(gold), "accuracy": float(np.mean(np.array(pred) == np.array(gold))) if gold else float("nan"),
            "chance": 1 / len(task.labels), "majority": float(counts.max() / max(1, len(gold)))}


# ---- SFT -------------------------------------------------------------------------------------------
def sft_messages(record: dict) -> list[dict]:
    if "messages" in record:
        return record["messages"]
    if "prompt" in record and "completion" in record:
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    raise ValueError(f"an SFT record needs 'messages' or 'prompt' and 'completion'; got fields {list(record)}")


def sft_example(tok, messages: list[dict], max_len: int, bidirectional_prompt: bool) -> Example | None:
    """Rendered chat -> next-token example with loss on the assistant replies (and the token that
    ends each). sep = the first reply token when `bidirectional_prompt`: the prompt before it (up to
    and including `<|assistant|>`) is Part A, everything after is causal. Cut to max_len tokens from
    the end; None when no loss token survives (a prompt longer than max_len)."""
    ids, mask = tok.render_chat(messages)
    ids, mask = ids[: max_len + 1], mask[: max_len + 1]
    if not any(mask[1:]):
        return None
    T = len(ids) - 1
    first = mask.index(True)  # the first target token; the inputs before it are the prompt
    return Example(input_ids=np.asarray(ids[:-1], np.int64), targets=np.asarray(ids[1:], np.int64),
                   position_ids=np.stack((np.arange(T), np.zeros(T, np.int64))),
                   sep=first if bidirectional_prompt else 0, loss_mask=np.asarray(mask[1:], bool), mode="sft")


def sft_loss(model, examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed NLL over reply tokens, their count), through train.py's GLMObjective."""
    from .scoring import GLMObjective

    b = {k: v.to(model_device(model)) for k, v in collate(examples, pad_id).items()}
    return GLMObjective(model)(**b), b["loss_mask"].sum()


@torch.no_grad()
def sft_eval(model, examples: list[Example], pad_id: int, batch_size: int = 8) -> dict:
    was_training = model.training
    model.eval()
    nll = n = 0.0
    for i in range(0, len(examples), batch_size):
        s, c = sft_loss(model, examples[i : i + batch_size], pad_id)
        nll, n = nll + float(s), n + float(c)
    model.train(was_training)
    return {"n": len(examples), "tokens": int(n), "loss": nll / max(n, 1.0)}


# ---- the loop --------------------------------------------------------------------------------------
@dataclass
class FinetuneConfig:
    task: str = "cloze"  # cloze | sft
    model: str = ""  # checkpoint directory (or preset, with --tokenizer)
    train: str = ""  # JSONL
    eval: str = ""  # JSONL, optional
    out: str = ""
    tokenizer: str = ""  # default: the model directory's tokenizer.json
    train_split: str = ""  # keep only records whose "split" field equals this (default: all)
    eval_split: str = ""
    # cloze
    preset: str = ""  # sentiment_zh | spam_en: pattern + verbalizer
    pattern: str = ""
    verbalizer: str = ""  # JSON object or a .json file: {"label": "text"}
    score: str = "sum"  # sum | mean
    eop: bool = True
    # sft
    prompt_attention: str = "causal"  # causal | bidirectional (see the module doc)
    # optimisation (field names shared with train.TrainConfig: make_optimizer and lr_at read them)
    max_len: int = 256
    batch_size: int = 16
    epochs: float = 1.0
    steps: int = 0  # > 0 overrides epochs
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup: int = 0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    limit: int = 0  # use at most this many training / eval records (0: all)
    group_by_length: bool = False  # batches of similar length (less padding), see epoch_batches
    # LoRA
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple = ("attn.qkv", "attn.out", "mlp.up", "mlp.down")
    progress: bool = True


def read_jsonl(path: str | Path, split: str = "", limit: int = 0) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e})") from None
            if split and r.get("split") != split:
                continue
            rows.append(r)
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{path}: no records" + (f" with split == {split!r}" if split else ""))
    return rows


def epoch_batches(lengths: list[int], batch_size: int, rng: np.random.Generator, group_by_length: bool = False,
                  window: int = 64) -> list[np.ndarray]:
    """One epoch's batches of example indices: a seeded permutation cut into batches (the last may be
    short). With `group_by_length`, each run of `window` batches' worth of the permutation is sorted by
    length before it is cut, and the batches are then shuffled: every batch is still a random draw
    from a random window, but of similar lengths, so padding to the batch's longest example wastes
    little (short reviews batched with a 128-token one otherwise cost 128 tokens each)."""
    order = rng.permutation(len(lengths))
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    span = batch_size * window
    runs = [sorted(order[i : i + span], key=lambda j: lengths[j]) for i in range(0, len(order), span)]
    batches = [np.asarray(r[i : i + batch_size]) for r in runs for i in range(0, len(r), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def cloze_task_from(c: FinetuneConfig) -> ClozeTask:
    """--preset, overridden piecewise by --pattern / --verbalizer."""
    base = ClozeTask.preset(c.preset) if c.preset else None
    pattern = c.pattern or (base.pattern if base else "")
    verbalizer = base.verbalizer if base else None
    if c.verbalizer:
        v = Path(c.verbalizer).read_text(encoding="utf-8") if c.verbalizer.endswith(".json") else c.verbalizer
        try:
            verbalizer = json.loads(v)
        except json.JSONDecodeError as e:
            raise ValueError(f"--verbalizer must be a JSON object like '{{\"pos\": \"好\"}}' ({e})") from None
    if not pattern or not verbalizer:
        raise ValueError("cloze fine-tuning needs --preset NAME, or --pattern and --verbalizer")
    return ClozeTask(pattern, verbalizer)


def _load(c: FinetuneConfig, device):
    from .convert import load
    from .tokenizer import load_tokenizer

    model = load(c.model, device=device, dtype=torch.float32)
    tok_path = c.tokenizer or c.model
    try:
        tok = load_tokenizer(tok_path)
    except FileNotFoundError as e:  # keep what was wrong ("does not exist" or "has no tokenizer.json")
        raise FileNotFoundError(f"{e}; pass --tokenizer PATH") from None
    if tok.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens, the model's vocabulary {model.cfg.vocab_size}")
    return model, tok


def finetune(c: FinetuneConfig) -> dict:
    """Run a fine-tune; write the (merged) model to c.out. Returns {"model", "losses", "eval"}."""
    from .devices import resolve_device
    from .lora import LoRAConfig, apply_lora, merge_lora, save_adapters
    from .train import lr_at, make_optimizer

    if c.task not in ("cloze", "sft"):
        raise ValueError(f"--task {c.task}: choose cloze or sft")
    out = Path(c.out) if c.out else None
    if out is not None and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out directory")
    if c.precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision {c.precision}: choose fp32 or bf16")
    device = resolve_device(c.device)
    torch.manual_seed(c.seed)
    model, tok = _load(c, device)
    special = special_ids(tok)
    max_len = min(c.max_len, model.cfg.max_seq_len)

    train_rows = read_jsonl(c.train, c.train_split, c.limit)
    eval_rows = read_jsonl(c.eval, c.eval_split, c.limit) if c.eval else []
    if c.task == "cloze":
        task = cloze_task_from(c)
        train_items = [(task.encode(tok, r, max_len), task.label_index(r)) for r in train_rows]

        def loss_fn(batch):  # mean cross-entropy over candidates
            scores = candidate_scores(model, [x for x, _ in batch], special, c.score, c.eop)  # (B, K)
            y = torch.tensor([y for _, y in batch], device=scores.device)
            return F.cross_entropy(scores, y)

        def evaluate():
            return cloze_accuracy(model, tok, task, eval_rows, max_len=max_len, batch_size=c.batch_size,
                                  reduce=c.score, eop=c.eop)
    else:
        task = None
        if c.prompt_attention not in ("causal", "bidirectional"):
            raise ValueError(f"--prompt-attention {c.prompt_attention}: choose causal or bidirectional")
        bidir = c.prompt_attention == "bidirectional"
        train_items = [e for r in train_rows if (e := sft_example(tok, sft_messages(r), max_len, bidir)) is not None]
        eval_items = [e for r in eval_rows if (e := sft_example(tok, sft_messages(r), max_len, bidir)) is not None]
        if not train_items:
            raise ValueError(f"{c.train}: no record keeps a reply within --max-len {max_len}")

        def loss_fn(batch):  # mean NLL per reply token
            s, n = sft_loss(model, batch, special.pad)
            return s / n.clamp(min=1)

        def evaluate():
            return sft_eval(model, eval_items, special.pad, c.batch_size)

    if c.lora:
        apply_lora(model, LoRAConfig(c.lora_rank, c.lora_alpha, c.lora_dropout, tuple(c.lora_targets)))
    n_batches = math.ceil(len(train_items) / c.batch_size)
    steps = c.steps if c.steps > 0 else max(0, math.ceil(c.epochs * n_batches))
    sched = replace(c, steps=steps)
    optimizer, _ = make_optimizer(model, sched, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"glmkit finetune: task {c.task}, {len(train_items)} training examples, {steps} steps of {c.batch_size}, "
          f"device {device}, {c.precision}, {f'LoRA r={c.lora_rank}' if c.lora else 'full'}: "
          f"{trainable / 1e6:.3f}M of {total / 1e6:.2f}M parameters train")
    amp = c.precision == "bf16"
    rng = np.random.default_rng(c.seed)
    if c.task == "cloze":  # the longest candidate's example
        lengths = [len(p) + len(s) + max(map(len, cands)) for (p, s, cands), _ in train_items]
    else:
        lengths = [len(e.input_ids) for e in train_items]
    batches, bi = epoch_batches(lengths, c.batch_size, rng, c.group_by_length), 0
    losses, history = [], []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, sched)
        if bi >= len(batches):
            batches, bi = epoch_batches(lengths, c.batch_size, rng, c.group_by_length), 0
        batch = [train_items[i] for i in batches[bi]]
        bi += 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], c.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        done = step + 1
        if c.progress and (done % c.log_every == 0 or done == steps):
            print(f"step {done}/{steps}: loss {np.mean(losses[-c.log_every:]):.4f} ({time.perf_counter() - t0:.0f}s)")
        if c.eval_every and eval_rows and done % c.eval_every == 0 and done < steps:
            res = evaluate()
            history.append({"step": done, **res})
            print(f"step {done}: eval {res}")
    result = evaluate() if eval_rows else {}
    if result:
        history.append({"step": steps, **result})
        print(f"eval: {result}")

    if out is not None:
        with tempfile.TemporaryDirectory() as tmp:
            extra = [Path(tok.path)] if tok.path and Path(tok.path).name == "tokenizer.json" else []
            if not extra:
                tok.save(tmp)
                extra = [Path(tmp) / "tokenizer.json"]
            if c.lora:
                save_adapters(model, tmp, base_model=c.model)
                extra += [Path(tmp) / "adapter_model.safetensors", Path(tmp) / "adapter_config.json"]
                merge_lora(model)
            meta = {"task": c.task, "config": asdict(c),
                    "cloze": asdict(task) if task else None, "steps": steps, "final_loss": losses[-1] if losses else None,
                    "eval": history, "seconds": round(time.perf_counter() - t0, 1)}
            (Path(tmp) / "finetune.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
            from .convert import write_checkpoint

            write_checkpoint(model, out, extra_files=extra + [Path(tmp) / "finetune.json"])
        print(f"wrote {out}" + (" (LoRA merged; adapters beside it)" if c.lora else ""))
    return {"model": model, "losses": losses, "eval": result, "history": history, "tokenizer": tok}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="glmkit finetune", description="Cloze classification or SFT fine-tuning, full or LoRA.")
    d = FinetuneConfig()
    p.add_argument("--task", choices=("cloze", "sft"), required=True)
    p.add_argument("--model", required=True, help="checkpoint directory (or a preset with --tokenizer)")
    p.add_argument("--train", required=True, help="JSONL: cloze {text..., label}; sft {messages} or {prompt, completion}")
    p.add_argument("--eval", default="", help="JSONL scored at the end (cloze accuracy, SFT loss)")
    p.add_argument("--out", required=True, help="new directory for the fine-tuned (merged) checkpoint")
    p.add_argument("--tokenizer", default="")
    p.add_argument("--train-split", default="", help="keep records whose 'split' field equals this")
    p.add_argument("--eval-split", default="")
    p.add_argument("--preset", default="", choices=("",) + tuple(CLOZE_PRESETS), help="cloze pattern and verbalizer")
    p.add_argument("--pattern", default="", help='cloze pattern with {fields} and one [MASK], e.g. "{text}总之很[MASK]。"')
    p.add_argument("--verbalizer", default="", help='JSON {"label": "text"} or a .json file')
    p.add_argument("--score", default=d.score, choices=("sum", "mean"), help="candidate score: summed or mean log p")
    p.add_argument("--no-eop", action="store_true", help="leave <eop> out of candidate scores")
    p.add_argument("--prompt-attention", default=d.prompt_attention, choices=("causal", "bidirectional"),
                   help="sft: how the prompt is read (causal = as `glmkit chat` runs it)")
    for f in ("max_len", "batch_size", "epochs", "steps", "lr", "min_lr", "warmup", "weight_decay", "beta1", "beta2",
              "clip", "seed", "log_every", "eval_every", "limit", "lora_rank", "lora_alpha", "lora_dropout"):
        p.add_argument("--" + f.replace("_", "-"), type=type(getattr(d, f)), default=getattr(d, f))
    p.add_argument("--precision", default=d.precision, choices=("fp32", "bf16"))
    p.add_argument("--device", default=d.device)
    p.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    p.add_argument("--lora-targets", nargs="+", default=list(d.lora_targets), help="linear name suffixes to adapt")
    p.add_argument("--group-by-length", action="store_true",
                   help="batch examples of similar length together (less padding; batches still random)")
    p.add_argument("--quiet", action="store_true")
    a = vars(p.parse_args(argv))
    a["eop"] = not a.pop("no_eop")
    a["progress"] = not a.pop("quiet")
    a["lora_targets"] = tuple(a["lora_targets"])
    finetune(FinetuneConfig(**a))
    return 0
