"""Training checkpoints: whole or absent, never half-written, and enough to resume exactly.

    save_checkpoint(run_dir, step, model, optimizer, trainer_state, tokenizer_dir=None, keep=3)
    ckpt = latest_checkpoint(run_dir)          # Path or None
    model_state, optim_state, state = load_checkpoint(ckpt)
    found = latest_good_checkpoint(run_dir)    # what --resume uses: damaged newer ones are skipped

A checkpoint is a directory RUN/checkpoints/step-0000100/ holding
    model.safetensors     weights, glmkit names (the directory is also a model `glmkit.load` reads)
    config.json           glmkit's HF-style config
    optimizer.pt          optimizer state dict (torch.save; weights_only-loadable)
    trainer_state.json    step, loader state, RNG states (base64), anything the loop adds
    tokenizer.json        when the run has a tokenizer
It is written under a temporary name, every file fsynced, then renamed into place and the parent
directory fsynced: a kill -9 at any moment leaves either the previous checkpoints alone or the new
one complete. Temporary leftovers of a killed write are removed by the next save. The last `keep`
checkpoints are kept.

Atomic writes do not protect against what happens to the files afterwards (a full disk during a
copy, a bad sector, a manual `cp` cut short): `latest_good_checkpoint` verifies each checkpoint
(sizes against the safetensors header, the optimizer state and trainer state readable) from the
newest down, and moves each damaged one aside to `checkpoints/damaged-step-N`, saying so.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

PREFIX = "step-"
PIN = "PINNED"  # a file in a checkpoint that pruning never removes (wsd's last step before the decay)


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    """The global torch CPU RNG (dropout, sampling). numpy randomness in glmkit is always drawn from
    generators seeded per use (the loader's per-window rng), so it needs no saving."""
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def set_rng_state(state: dict):
    if "torch" in state:
        torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict, config, optimizer_state: dict | None,
                    trainer_state: dict, tokenizer_file: str | Path | None = None, keep: int = 3, pin: str = "") -> Path:
    """Write checkpoint `step` atomically; `model_state` is a full (unsharded) state dict. Then the oldest are
    removed until `keep` are left, not counting pinned ones: `pin` (why it stays) pins this one."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # leftovers of a write that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{PREFIX}{step:07d}-", dir=root))
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt", "step": str(step)})
        config.save(tmp / "config.json")
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1) + "\n")
        if tokenizer_file is not None:
            shutil.copy2(tokenizer_file, tmp / "tokenizer.json")
        if pin:
            (tmp / PIN).write_text(pin + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): replace it as a whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # never the one just written: after a resume from an older step, newer ones sort after it
    others = [p for p in list_checkpoints(run_dir) if p != final and not (p / PIN).exists()]
    for old in others[: len(others) - (keep - 1)] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "trainer_state.json").exists())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: str | Path, map_location="cpu") -> tuple[dict, dict | None, dict]:
    """(model state dict, optimizer state dict or None, trainer state) of a checkpoint directory.
    A damaged checkpoint raises CheckpointError saying which file and how."""
    from safetensors.torch import load_file

    from .convert import CheckpointError, check_safetensors, confined

    path = Path(path)
    for name in ("model.safetensors", "trainer_state.json", "config.json"):
        if not (path / name).exists():
            raise CheckpointError(f"{path} has no {name}; it is not a complete glmkit training checkpoint")
    weights = confined(path, "model.safetensors", "weight file")
    check_safetensors(weights, path / "model.safetensors", advice="")  # what to do is the caller's to say
    try:
        model_state = load_file(weights, device=str(map_location))
    except Exception as e:  # safetensors raises its own error type for a corrupt header or dtype
        raise CheckpointError(f"{path / 'model.safetensors'}: unreadable ({type(e).__name__}: {e})") from None
    opt = None
    if (path / "optimizer.pt").exists():
        try:
            opt = torch.load(confined(path, "optimizer.pt"), map_location=map_location, weights_only=True)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path / 'optimizer.pt'}: unreadable ({type(e).__name__}: {e})") from None
    try:
        state = json.loads(confined(path, "trainer_state.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / 'trainer_state.json'}: invalid JSON ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path / 'trainer_state.json'}: no integer 'step'; not a glmkit trainer state")
    return model_state, opt, state


def latest_good_checkpoint(run_dir: str | Path, map_location="cpu", log=None,
                           set_aside: bool = True) -> tuple[Path, dict, dict | None, dict] | None:
    """The newest checkpoint of `run_dir` that loads: (path, model state, optimizer state, trainer
    state), or None when the run has no checkpoint at all.

    Each damaged newer one is reported through `log` (default: stderr) and, with `set_aside`, renamed
    to `damaged-step-N`: left in place it would still sort as the newest, so the next save's pruning
    would count it among the `keep` and a later --resume would meet it again. With several processes
    only one should set aside (the others skip the same checkpoints, since they see the same files).
    """
    from .convert import CheckpointError

    log = log or (lambda msg: print(msg, file=sys.stderr))
    root = Path(run_dir) / "checkpoints"
    # every step-* directory, complete or not: one without trainer_state.json is reported, not ignored
    found = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)) if root.exists() else []
    for ck in reversed(found):
        try:
            return (ck, *load_checkpoint(ck, map_location))
        except OSError as e:  # another process set it aside meanwhile, or it is unreadable: skip, keep it
            log(f"skipping checkpoint {ck.name}: {e}")
        except CheckpointError as e:
            note = ""
            if set_aside:
                aside = root / f"damaged-{ck.name}"
                shutil.rmtree(aside, ignore_errors=True)  # an earlier damaged copy of the same step
                os.rename(ck, aside)
                note = f"; moved it to {aside}"
            log(f"skipping checkpoint {ck.name}: {e}{note}")
    if found:
        raise CheckpointError(f"no checkpoint in {root} loads (all {len(found)} are damaged, see above); "
                              "start the run again without --resume")
    return None
