"""LoRA: low-rank adapters applied to a GLM from outside, saved on their own, merged for export.

    from glmkit.lora import LoRAConfig, apply_lora, merge_lora, save_adapters, load_adapters
    apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=("attn.qkv", "attn.out")))  # base frozen
    ...train...
    save_adapters(model, "adapters/")      # adapter_model.safetensors + adapter_config.json
    merge_lora(model)                      # W += (alpha / rank) B A: plain nn.Linear again
    load_adapters(fresh_base_model, "adapters/")   # applies and fills the adapters

Hu et al. 2021 (LoRA): y = W x + (alpha / r) B A dropout(x), with A (r, in) Kaiming-uniform and
B (out, r) zero, so training starts exactly at the base model. Only A and B train.

Like quantize.py this is a module transform: each targeted `nn.Linear` (chosen by name suffix,
e.g. `attn.qkv` matches `layers.3.attn.qkv`) is swapped for a `LoRALinear` that holds it as
`.base`. While adapters are on, parameter names change (`attn.qkv.base.weight`, `attn.qkv.lora_A`),
so write full checkpoints only after `merge_lora`. Adapter files are keyed by the linear's name
(`layers.0.attn.qkv.lora_A`), independent of the wrapping.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("attn.qkv", "attn.out", "mlp.up", "mlp.down")
WEIGHTS_NAME, CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input only
    targets: tuple[str, ...] = TARGETS  # name suffixes of the linears to adapt
    modules: list[str] = field(default_factory=list)  # filled by apply_lora: the names it matched

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        self.targets = tuple(self.targets)


class LoRALinear(nn.Module):
    """base(x) + scale * B(A(dropout(x))); `base` is frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base, self.rank, self.scale = base, rank, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base linear with the update added in fp32 (then cast back to the weight's dtype)."""
        if not isinstance(self.base, nn.Linear):
            raise TypeError(f"cannot merge LoRA into a {type(self.base).__name__}; merge before quantizing")
        w = self.base.weight
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale  # (out, in)
        w.copy_((w.float() + delta).to(w.dtype))
        return self.base


def _set(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Swap the targeted linears for LoRALinear (in place), freeze everything else, return model."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(cfg.targets)]
    if not names:
        linears = sorted({n.split(".", 2)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"LoRA targets {list(cfg.targets)} match no linear layer; this model's linears end in {linears}")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        _set(model, n, LoRALinear(model.get_submodule(n), cfg.rank, cfg.alpha, cfg.dropout))
    cfg.modules = names
    model.lora_config = cfg
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, m in lora_modules(model).items():
        out[f"{n}.lora_A"], out[f"{n}.lora_B"] = m.lora_A.detach(), m.lora_B.detach()
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain linear back (in place)."""
    for n, m in lora_modules(model).items():
        _set(model, n, m.merged())
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def save_adapters(model: nn.Module, directory: str | Path, base_model: str = "") -> Path:
    """adapter_model.safetensors (lora_A / lora_B per adapted linear) + adapter_config.json."""
    from safetensors.torch import save_file

    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("this model has no LoRA adapters (call apply_lora first)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt", "written_by": "glmkit"})
    meta = {"format": "glmkit-lora", **asdict(cfg), "base_model": str(base_model)}
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    return directory


def read_adapter_config(directory: str | Path) -> LoRAConfig:
    f = Path(directory) / CONFIG_NAME
    if not f.exists():
        raise FileNotFoundError(f"{f} does not exist; adapters are saved by `glmkit finetune --lora` or save_adapters()")
    d = json.loads(f.read_text())
    return LoRAConfig(rank=d["rank"], alpha=d["alpha"], dropout=d["dropout"], targets=tuple(d["targets"]))


def load_adapters(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the saved adapters' config to `model` (a base model) and load their weights, checked."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(directory)
    if not lora_modules(model):
        apply_lora(model, cfg)
    want = adapter_state_dict(model)
    got = load_file(Path(directory) / WEIGHTS_NAME)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"{directory}: adapters do not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    mods = lora_modules(model)
    with torch.no_grad():
        for k, t in got.items():
            name, _, part = k.rpartition(".")
            p = getattr(mods[name], part)
            if p.shape != t.shape:
                raise ValueError(f"{directory}: {k} has shape {tuple(t.shape)}, the model wants {tuple(p.shape)} "
                                 "(different base model or rank)")
            p.copy_(t)
    return model
