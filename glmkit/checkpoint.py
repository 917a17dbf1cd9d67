"""Training checkpoints: whole or absent, never half-written, and enough to resume exactly.

    save_checkpoint(run_dir, step, model, optimizer, trainer_state, tokenizer_dir=None, keep=3)
    ckpt = latest_checkpoint(run_dir)          # Path or None
    state = load_checkpoint(ckpt, model, optimizer)

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
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

PREFIX = "step-"


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
                    trainer_state: dict, tokenizer_file: str | Path | None = None, keep: int = 3) -> Path:
    """Write checkpoint `step` atomically; `model_state` is a full (unsharded) state dict."""
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
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
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
    """(model state dict, optimizer state dict or None, trainer state) of a checkpoint directory."""
    from .convert import check_safetensors, CheckpointError

    path = Path(path)
    for name in ("model.safetensors", "trainer_state.json", "config.json"):
        if not (path / name).exists():
            raise CheckpointError(f"{path} has no {name}; it is not a complete glmkit training checkpoint")
    check_safetensors(path / "model.safetensors")
    from safetensors.torch import load_file

    model_state = load_file(path / "model.safetensors", device=str(map_location))
    opt = None
    if (path / "optimizer.pt").exists():
        try:
            opt = torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path / 'optimizer.pt'}: unreadable ({type(e).__name__}: {e}); "
                                  "resume from an earlier checkpoint") from None
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'trainer_state.json'}: invalid JSON ({e})") from None
    return model_state, opt, state
