"""Scale-out with PyTorch's own engine: torchrun + DDP or FSDP2, applied to a model from outside.

    torchrun --nproc-per-node 2 -m glmkit pretrain ... --parallel ddp|fsdp

`init()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts a process group:
gloo on CPU, NCCL on CUDA. Parallelism is applied in one fixed order (torchtitan's habit):
compile, then FSDP2 (`fully_shard` on every block, then the root) or DDP. Checkpoints always hold
full, unsharded state dicts keyed by parameter name, gathered with torch.distributed.checkpoint's
state_dict helpers, so a checkpoint from any world size (or FSDP vs DDP) loads on any other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init(device: str | None = None) -> Dist:
    """Process group from torchrun's environment; a 1-process Dist when not launched by torchrun."""
    from .devices import resolve_device

    if "RANK" not in os.environ:
        return Dist(device=resolve_device(device))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cpu":  # share the cores between the processes on this host instead of oversubscribing
        per_proc = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        torch.set_num_threads(per_proc)
    return Dist(rank, world, local, dev)


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.active:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def apply_ddp(module: nn.Module, d: Dist) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def apply_fsdp(objective: nn.Module, blocks: nn.ModuleList, mp_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: shard each Transformer block, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(objective, mp_policy=mp)
    return objective


def unwrap(module: nn.Module) -> nn.Module:
    """The module under DDP / torch.compile wrappers (FSDP2 shards in place, nothing to unwrap)."""
    while True:
        if hasattr(module, "module"):  # DDP
            module = module.module
        elif hasattr(module, "_orig_mod"):  # torch.compile
            module = module._orig_mod
        else:
            return module


def full_model_state(module: nn.Module) -> dict:
    """Full state dict on CPU (collective under FSDP: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(unwrap(module), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(module: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(module), optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(module: nn.Module, optimizer, model_state: dict, optim_state: dict | None):
    """Load full (unsharded) state into a possibly sharded module and its optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(unwrap(module), model_state, options=opts)
    if optim_state is not None and optimizer is not None:
        set_optimizer_state_dict(unwrap(module), optimizer, optim_state, options=opts)
