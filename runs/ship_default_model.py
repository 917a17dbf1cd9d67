"""Package a training checkpoint as glmkit's embedded default model (glmkit/assets/default).

    .venv/bin/python runs/ship_default_model.py ~/glm-run/run/checkpoints/step-0001000 ~/glm-run/run

Writes bf16 weights (half the bytes; every command upcasts to the run's dtype on load), the
config, the tokenizer, and `training.json` (steps, tokens, wall time, last losses) from the run's
metrics; for a run continued from a shipped model (`pretrain --model DIR`), that model's training.json as
`continued_from` and the tokens of both. Replaces a previously shipped model as a whole.
"""
import json
import shutil
import sys
from pathlib import Path

import torch

from glmkit.convert import DEFAULT_MODEL, read_checkpoint, write_checkpoint

if __name__ == "__main__":
    ckpt, run = Path(sys.argv[1]), Path(sys.argv[2])
    model = read_checkpoint(ckpt, dtype=torch.bfloat16)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    train_cfg = json.loads((run / "train_config.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and "eval" not in r and r["step"] <= state["step"]]
    evals = [r for r in rows if "eval" in r and r["step"] <= state["step"]]
    tokens = state["step"] * train_cfg["batch_size"] * train_cfg["seq_len"] * train_cfg.get("grad_accum", 1)
    info = {
        "checkpoint": str(ckpt), "step": state["step"], "tokens_seen": tokens,
        # training time: gaps between logged steps, leaving out pauses between sessions (> 10 min)
        "wall_hours": round(sum(d for d in (b["time"] - a["time"] for a, b in zip(steps, steps[1:])) if 0 < d < 600) / 3600, 2),
        "train_config": train_cfg, "last_train_loss": steps[-1]["loss"] if steps else None,
        "last_eval": evals[-1]["eval"] if evals else None,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    start = Path(train_cfg["model"])  # a continued run: keep the lineage (the start's own training.json)
    if (start / "training.json").exists():
        info["continued_from"] = json.loads((start / "training.json").read_text())
        info["tokens_seen_total"] = tokens + info["continued_from"].get("tokens_seen_total", info["continued_from"]["tokens_seen"])
    tmp = DEFAULT_MODEL.with_name(".default.new")
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(model, tmp, "glmkit", [ckpt / "tokenizer.json"])
    (tmp / "training.json").write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")
    if DEFAULT_MODEL.exists():
        shutil.rmtree(DEFAULT_MODEL)
    tmp.rename(DEFAULT_MODEL)
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir())
    print(f"{ckpt} -> {DEFAULT_MODEL} ({size / 2**20:.1f} MiB, {info['parameters'] / 1e6:.2f}M parameters, step {info['step']})")
