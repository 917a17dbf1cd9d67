"""Pretraining (or continued pretraining) with GLM's blank-infilling objective.

    glmkit pretrain --model glm-tiny --data shards/ --out runs/tiny --steps 2000
    glmkit pretrain ... --resume                       # continue exactly from the last checkpoint
    torchrun --nproc-per-node 2 -m glmkit pretrain ... --parallel fsdp
    glmkit plot runs/tiny                              # loss and bits-per-character curves (PNG)

One loop: AdamW (fused where the build has it), linear warmup then cosine decay to `min_lr` (or
`--schedule wsd`: warmup, then `lr` held, then a linear decay to `min_lr` over the last `--decay-steps`; 0
never decays, so `--resume` with more `--steps` continues a stage at the same rate, with no restart and no
schedule stretched after the fact: ship the decayed end, and `--resume-from` the checkpoint before the decay,
which is always written and never pruned, to go on at the held rate),
gradient accumulation, clipping, one precision policy (fp32, or bf16 autocast with fp32 master
weights), optional torch.compile, held-out evaluation every N steps (loss per objective, bits per
character per domain), checkpoints every M steps (atomic, last K kept, see checkpoint.py).

The loss is the mean over every predicted token of the global batch (all micro-batches of all
ranks): each micro-batch contributes its summed NLL divided by the global token count, which is
all-reduced before the backward passes. So 1 process with batch G, 2 processes with G/2 each, and
1 process with 2 micro-batches of G/2 all take the same step, up to float summation order.
Resuming restores weights, optimizer, loader position and RNG: on CPU in fp32 the resumed run
reproduces the uninterrupted one bit for bit (tests/test_train.py). It starts from the newest
checkpoint that loads, skipping (and setting aside) damaged newer ones, and cuts metrics.jsonl back
to that step, so every step appears there once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import distributed as D
from . import kernels
from .checkpoint import latest_good_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .infill import InfillConfig


@dataclass
class TrainConfig:
    model: str = "glm-tiny"  # preset or checkpoint directory
    data: str = ""  # shard directory (glmkit data tokenize)
    out: str = "runs/default"
    seq_len: int = 512
    batch_size: int = 8  # per process, per micro-batch
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 100
    schedule: str = "cosine"  # cosine | wsd (warmup, stable, decay: see lr_at)
    decay_steps: int = 0  # wsd: the last decay_steps steps go linearly from lr to min_lr (0: no decay)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 (autocast; master weights and optimizer in fp32)
    compile: bool = False
    parallel: str = "ddp"  # ddp | fsdp (when launched by torchrun with more than one process)
    device: str = "auto"
    eval_every: int = 200
    eval_batches: int = 4
    eval_docs: int = 32
    save_every: int = 200
    keep: int = 3
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    resume_from: str = ""  # a checkpoint of another run to continue exactly (when --out has none of its own yet)
    mixture: tuple = (0.5, 0.3, 0.2)
    infill: dict = field(default_factory=dict)  # other InfillConfig fields, e.g. {"coverage": 0.3}
    domain_weights: dict = field(default_factory=dict)  # {"zh_classical": 2.0, ...}: see data.loader
    progress: bool = True
    extra: dict = field(default_factory=dict)


def _amp_note(device) -> str:
    note = "bf16 autocast, fp32 master weights"
    if torch.device(device).type == "cpu" and kernels.cpu_bf16_emulated():
        note += "; no bf16 instructions on this CPU: linear layers and attention multiply in fp32 (kernels.bf16_via_fp32)"
    return note


SCHEDULES = ("cosine", "wsd")  # learning-rate schedules (lr_at)


def lr_at(step: int, c: TrainConfig) -> float:
    """The learning rate of step `step` (0-based). cosine: from lr after the warmup to min_lr at `steps`. wsd: lr
    until the last `decay_steps` steps, which fall linearly to min_lr, the last one at min_lr. Fine-tuning's
    configs have no `schedule` field: cosine."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    schedule = getattr(c, "schedule", "cosine")
    if schedule == "wsd":
        start = c.steps - c.decay_steps
        if c.decay_steps <= 0 or step < start:
            return c.lr
        return c.lr + (c.min_lr - c.lr) * min(1.0, (step - start + 1) / c.decay_steps)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: choose from {SCHEDULES}")
    t = min(1.0, (step - c.warmup) / max(1, c.steps - c.warmup))
    return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * t))


def same_schedule_until(ck: Path, c: TrainConfig) -> None:
    """For --resume-from, before its weights and optimizer are read: the run that wrote checkpoint `ck` (its
    train_config.json, two levels up) took steps 0..step-1 (trainer_state.json) with the learning rates `c` gives
    them, and the same windows per step, or the continuation would not be the one run it stands for. Refuses
    otherwise, naming what differs."""
    if not (ck / "trainer_state.json").exists():
        raise ValueError(f"--resume-from {ck}: not a pretraining checkpoint (no trainer_state.json)")
    step = json.loads((ck / "trainer_state.json").read_text())["step"]
    src = ck.parent.parent / "train_config.json"
    if not src.exists():
        raise ValueError(f"--resume-from {ck}: no {src.name} in {src.parent} to check the schedule against")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    old = TrainConfig(**{k: v for k, v in json.loads(src.read_text()).items() if k in known})
    for f in ("seq_len", "batch_size", "grad_accum"):
        if getattr(old, f) != getattr(c, f):
            raise ValueError(f"--resume-from {ck}: its run used --{f.replace('_', '-')} {getattr(old, f)}, "
                             f"this one {getattr(c, f)}")
    for t in range(step):
        if lr_at(t, old) != lr_at(t, c):
            raise ValueError(
                f"--resume-from {ck}: its run's learning rate at step {t} was {lr_at(t, old):.4g}, this run's is "
                f"{lr_at(t, c):.4g}. A wsd stage continues from its checkpoint before the decay (kept, with a "
                f"PINNED file) with the same --lr, --warmup and schedule, and more --steps")


def make_optimizer(model: nn.Module, c: TrainConfig, device: torch.device):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # matrices decay; norms, biases and the (possibly tied) embedding do not
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=c.lr, betas=(c.beta1, c.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw), "fused"
    except (RuntimeError, TypeError, ValueError):  # a device/dtype without the fused kernel
        return torch.optim.AdamW(groups, foreach=True, **kw), "foreach"


def build_model(c: TrainConfig, vocab_size: int, device: torch.device) -> nn.Module:
    from .config import PRESETS, get_preset
    from .convert import read_checkpoint
    from .model import GLM

    if c.model in PRESETS and not Path(c.model).exists():
        cfg = get_preset(c.model, vocab_size=vocab_size)
        model = GLM(cfg)
        model.init_weights(seed=c.seed)
    else:  # continued pretraining of an imported or earlier checkpoint
        model = read_checkpoint(c.model, dtype=torch.float32)
        if model.cfg.vocab_size < vocab_size:
            raise ValueError(f"{c.model} has a vocabulary of {model.cfg.vocab_size}, the data's tokenizer {vocab_size}; "
                             "train with the checkpoint's own tokenizer")
    return model.to(device)


def truncate_metrics(path: Path, step: int) -> int:
    """Keep only the records of steps <= `step` in metrics.jsonl; return how many were dropped.

    A run killed after its last checkpoint has logged steps past it; resumed from that checkpoint
    it logs them again. Cutting the file back to the resumed step keeps each step once (a line the
    kill cut in half goes too). Written to a temporary file and renamed: a kill here leaves the old
    file or the new one, never a mix."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
            keep = isinstance(rec.get("step"), int) and rec["step"] <= step
        except (json.JSONDecodeError, AttributeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


def train(c: TrainConfig) -> dict:
    from .data.loader import InfillLoader
    from .data.shards import TokenShards
    from .infill import special_ids
    from .scoring import GLMObjective, bits_per_char, objective_losses

    if c.schedule not in SCHEDULES:  # before anything is built (lr_at would say so only after the warmup)
        raise ValueError(f"--schedule {c.schedule}: choose from {SCHEDULES}")
    if not 0 <= c.decay_steps <= c.steps:
        raise ValueError(f"--decay-steps {c.decay_steps}: between 0 and --steps {c.steps}")
    d = D.init(c.device)
    torch.manual_seed(c.seed)
    shards = TokenShards(c.data)
    tok = shards.tokenizer()
    special, sentence_end = special_ids(tok), tok.sentence_end_table()
    infill_cfg = InfillConfig(mixture=tuple(c.mixture), **c.infill)
    model = build_model(c, tok.vocab_size, d.device)
    objective: nn.Module = GLMObjective(model)
    amp = c.precision == "bf16"
    if c.precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision {c.precision}: choose fp32 or bf16")
    if c.compile:
        model.compile()
    if d.active:
        objective = D.apply_fsdp(objective, model.layers) if c.parallel == "fsdp" else D.apply_ddp(objective, d)
    optimizer, opt_kind = make_optimizer(model, c, d.device)
    loader = InfillLoader(shards, "train", c.seq_len, c.batch_size, special, sentence_end, infill_cfg,
                          seed=c.seed, rank=d.rank, world_size=d.world_size, domain_weights=c.domain_weights)
    out = Path(c.out)
    start = 0
    say = (lambda msg: print(f"glmkit pretrain: {msg}", file=sys.stderr)) if d.is_main else (lambda msg: None)
    # --resume-from resumes --out's own newest checkpoint first: the same command continues a killed continuation
    found = latest_good_checkpoint(out, log=say, set_aside=d.is_main) if c.resume or c.resume_from else None
    if found is None and c.resume_from:
        same_schedule_until(Path(c.resume_from), c)
        found = (Path(c.resume_from), *load_checkpoint(c.resume_from))
    if found is not None:
        ck, model_state, optim_state, state = found
        D.load_full_state(objective, optimizer, {f"model.{k}": v for k, v in model_state.items()}, optim_state)
        loader.load_state_dict(state["loader"])
        set_rng_state(state.get("rng", {}))
        start = state["step"]
        say(f"resuming from {ck} at step {start}")
    elif c.resume:
        say(f"--resume: {out / 'checkpoints'} holds no checkpoint; starting from step 0")
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if dropped := truncate_metrics(out / "metrics.jsonl", start):
            say(f"{out / 'metrics.jsonl'}: dropped {dropped} record(s) after step {start}, which this run writes again")
        n_params = sum(p.numel() for p in model.parameters())
        print(f"glmkit pretrain: {n_params / 1e6:.2f}M parameters, device {d.device} x {d.world_size} "
              f"({c.parallel if d.active else 'single process'}), precision {c.precision} "
              f"({_amp_note(d.device) if amp else 'fp32'}), AdamW {opt_kind}, "
              f"compile {c.compile}, global batch {c.batch_size * c.grad_accum * d.world_size} x {c.seq_len}")
        (out / "train_config.json").write_text(json.dumps(asdict(c), indent=1) + "\n")

    def run_objective(batch) -> tuple[torch.Tensor, torch.Tensor]:
        b = {k: v.to(d.device) for k, v in batch.items()}
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=amp):
            s = objective(**b)
        return s, b["loss_mask"].sum()

    def evaluate() -> dict:
        objective.eval()
        # held-out losses with the standard blanks (InfillConfig's defaults), whatever this run trains on, so runs
        # with different recipes are measured alike
        res = {"loss": objective_losses(run_objective, shards, special, sentence_end, c.seq_len, c.batch_size,
                                        c.eval_batches, InfillConfig()),
               "bpc": bits_per_char(run_objective, shards, special, c.seq_len, c.batch_size, c.eval_docs, tok)}
        objective.train()
        return res

    metrics = open(out / "metrics.jsonl", "a") if d.is_main else None
    bar = None
    if d.is_main and c.progress:
        from tqdm import tqdm

        bar = tqdm(total=c.steps, initial=start, unit="step", dynamic_ncols=True)
    losses = []
    t_last, tokens_since = time.perf_counter(), 0
    # wsd: the checkpoint before the decay is always written and never pruned (a next stage continues from it)
    decay_from = c.steps - c.decay_steps if c.schedule == "wsd" and 0 < c.decay_steps < c.steps else None
    objective.train()
    for step in range(start, c.steps):
        lr = lr_at(step, c)
        for g in optimizer.param_groups:
            g["lr"] = lr
        micro = [next(loader) for _ in range(c.grad_accum)]
        n_local = sum(int(m["loss_mask"].sum()) for m in micro)
        # clamp: a window of nothing but eos tokens yields an example with no predicted tokens
        n_global = D.all_reduce_sum(torch.tensor(float(n_local), device=d.device), d).clamp(min=1.0)
        step_nll = torch.zeros((), device=d.device)
        for i, m in enumerate(micro):
            sync = i == len(micro) - 1 or not d.active or c.parallel == "fsdp"
            ctx = objective.no_sync() if not sync and hasattr(objective, "no_sync") else contextlib.nullcontext()
            with ctx:
                s, _ = run_objective(m)
                # DDP and FSDP average gradients over ranks: scale by world size to get the global mean
                (s * d.world_size / n_global).backward()
            step_nll += s.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(D.all_reduce_sum(step_nll, d) / n_global)
        losses.append(loss)
        tokens_since += c.batch_size * c.grad_accum * c.seq_len * d.world_size
        done = step + 1
        if d.is_main and (done % c.log_every == 0 or done == c.steps):
            dt = time.perf_counter() - t_last
            rec = {"step": done, "loss": round(loss, 5), "lr": lr, "grad_norm": round(float(grad_norm), 4),
                   "tok_per_s": round(tokens_since / dt, 1), "time": time.time()}
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            t_last, tokens_since = time.perf_counter(), 0
            if bar:
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rec['tok_per_s']:.0f}")
        if bar:
            bar.update(1)
        if c.eval_every and (done % c.eval_every == 0 or done == c.steps):
            res = evaluate()
            if d.is_main:
                metrics.write(json.dumps({"step": done, "eval": res}) + "\n")
                metrics.flush()
                msg = " ".join(f"{k} {v:.3f}" for k, v in res["loss"].items())
                bpc = " ".join(f"{k} {v:.3f}" for k, v in res["bpc"].items())
                (bar.write if bar else print)(f"step {done}: held-out loss {msg} | bits/char {bpc}")
        if (c.save_every and (done % c.save_every == 0 or done == c.steps)) or done == decay_from:
            model_state = {k[len("model."):]: v for k, v in D.full_model_state(objective).items()}
            optim_state = D.full_optimizer_state(objective, optimizer)
            if d.is_main:
                state = {"loader": loader.state_dict(), "rng": rng_state(), "loss": loss}
                pin = "wsd: the last step before the decay; --resume-from continues the stage here" if done == decay_from else ""
                save_checkpoint(out, done, model_state, model.cfg, optim_state, state, shards.path / "tokenizer.json", c.keep,
                                pin=pin)
    if bar:
        bar.close()
    if metrics:
        metrics.close()
    D.shutdown()
    return {"losses": losses, "model": model}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="glmkit pretrain", description="Pretrain with GLM's blank-infilling objective.")
    defaults = TrainConfig()
    for f in ("model", "data", "out", "seq_len", "batch_size", "grad_accum", "steps", "lr", "min_lr", "warmup",
              "decay_steps", "weight_decay", "beta1", "beta2", "clip", "precision", "parallel", "device", "eval_every",
              "eval_batches", "eval_docs", "save_every", "keep", "log_every", "seed"):
        v = getattr(defaults, f)
        p.add_argument("--" + f.replace("_", "-"), type=type(v), default=v, required=f == "data")
    p.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule,
                   help="cosine (to min_lr at --steps) or wsd (warmup, lr held, linear to min_lr over --decay-steps)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--resume-from", default="", metavar="CKPT",
                   help="continue another run's checkpoint exactly (weights, optimizer, data position) into --out (or "
                        "--out's own newest, once it has one): e.g. a wsd stage's pinned step before its decay, with "
                        "more --steps; refused unless its run's learning rates up to that step are this run's")
    p.add_argument("--mixture", type=float, nargs=3, default=list(defaults.mixture), metavar=("MASK", "sMASK", "gMASK"))
    p.add_argument("--infill", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="blank choice besides the mixture, e.g. coverage=0.3 span_lambda=4 gmask_min=0.3 (InfillConfig)")
    p.add_argument("--domain-weights", nargs="+", default=[], metavar="DOMAIN=W",
                   help="how often each domain's windows are seen per epoch, e.g. zh_classical=2 code=0.5 (others 1)")
    p.add_argument("--no-progress", action="store_true")
    a = vars(p.parse_args(argv))
    a["progress"] = not a.pop("no_progress")
    a["mixture"] = tuple(a["mixture"])
    a["infill"] = _pairs(p, "--infill", a["infill"])
    a["domain_weights"] = _pairs(p, "--domain-weights", a["domain_weights"])
    fields = {f.name for f in dataclasses.fields(InfillConfig)} - {"mixture"}
    if unknown := set(a["infill"]) - fields:
        p.error(f"--infill {sorted(unknown)}: choose from {sorted(fields)}")
    defaults_infill = InfillConfig()
    a["infill"] = {k: type(getattr(defaults_infill, k))(v) for k, v in a["infill"].items()}  # max_span is an int
    train(TrainConfig(**a))
    return 0


def _pairs(p: argparse.ArgumentParser, flag: str, items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        k, _, v = item.partition("=")
        try:
            out[k] = float(v)
        except ValueError:
            p.error(f"{flag} {item!r}: want NAME=NUMBER")
    return out


def plot(argv=None) -> int:
    """`glmkit plot RUN_DIR`: loss and bits-per-character curves from metrics.jsonl, as PNG."""
    p = argparse.ArgumentParser(prog="glmkit plot", description="Plot a run's curves to RUN_DIR/curves.png.")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        raise ImportError("glmkit plot needs matplotlib: pip install 'glmkit[plot]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = Path(a.run_dir) / "metrics.jsonl"
    if not f.exists():
        raise FileNotFoundError(f"{f} does not exist; is {a.run_dir} a glmkit pretrain --out directory?")
    train_pts, evals = [], []
    for line in f.read_text().splitlines():
        r = json.loads(line)
        (evals if "eval" in r else train_pts).append(r)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train_pts:
        ax1.plot([r["step"] for r in train_pts], [r["loss"] for r in train_pts], lw=0.8, label="train")
    for mode in ("MASK", "sMASK", "gMASK"):
        pts = [(r["step"], r["eval"]["loss"][mode]) for r in evals if mode in r["eval"].get("loss", {})]
        if pts:
            ax1.plot(*zip(*pts), marker="o", ms=3, label=f"held-out {mode}")
    ax1.set(xlabel="step", ylabel="loss (nats/token)", title="blank-infilling loss")
    ax1.legend()
    domains = sorted({k for r in evals for k in r["eval"].get("bpc", {})})
    for dom in domains:
        pts = [(r["step"], r["eval"]["bpc"][dom]) for r in evals if dom in r["eval"]["bpc"]]
        ax2.plot(*zip(*pts), marker="o", ms=3, label=dom)
    ax2.set(xlabel="step", ylabel="bits per character", title="held-out bits per character")
    if domains:
        ax2.legend()
    fig.tight_layout()
    out = Path(a.out) if a.out else Path(a.run_dir) / "curves.png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return 0
