"""Multi-process training through ``torchrun``.

``torchrun --nproc_per_node N -m sd35.cli.train ...`` (or ``torchrun --nproc_per_node N $(which sd35) train ...``)
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed`
reads them, joins the process group (NCCL on CUDA, gloo on CPU) and gives each process its GPU
``cuda:LOCAL_RANK``. Without those variables everything runs in one process and the helpers here are no-ops.

- **DDP** (LoRA and full fine-tuning): every process holds the whole model; gradients of the trained weights
  are averaged after each backward (skipped on accumulation micro-steps by ``no_sync``). Each process sees its
  own slice of every global batch (the bucket sampler's ``rank``/``world_size``), so N processes with batch B
  train exactly like one process with batch N*B.
- **FSDP** (``fsdp = true``, full fine-tuning only): PyTorch's ``fully_shard`` (FSDP2) per joint block and on
  the whole MMDiT-X, so weights, gradients and AdamW state are split over the processes. Limitations: the
  frozen VAE and text encoders are still replicated on every process; checkpoints and the final file are
  gathered to full tensors on rank 0 (its CPU memory must hold the full model and optimizer state);
  validation runs on every process together (the sharded forward is collective) and rank 0 saves the images;
  ``adamw8bit`` is not supported with FSDP.

Rank 0 alone logs, writes checkpoints, samples and final files; the others wait at barriers.
"""

from __future__ import annotations

import datetime
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sd35.devices import resolve_device
from sd35.errors import SD35Error


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise SD35Error(f"environment variable {name}={value!r} is not an integer.") from None


def pick_device(requested: str | None, local_rank: int, distributed: bool) -> torch.device:
    """The device of this process: the requested one (checked to exist), and under torchrun ``cuda:LOCAL_RANK``."""
    device = resolve_device(requested, allowed=("cuda", "cpu"))
    if device.type == "cuda":
        if distributed and device.index is None:
            if local_rank >= torch.cuda.device_count():
                raise SD35Error(
                    f"LOCAL_RANK {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                    "start at most that many processes per node."
                )
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group if the environment asks for one; return this process's place."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise SD35Error(f"RANK {rank} / WORLD_SIZE {world} from the environment are inconsistent.")
    dev = pick_device(device, local_rank, world > 1)
    if world > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise SD35Error("this PyTorch build has no torch.distributed; run one process.")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"timeout": datetime.timedelta(minutes=60)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **kwargs)
    return DistInfo(rank, world, local_rank, dev)


def barrier(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Barrier, then leave the process group (called once at the end of training, also on errors)."""
    if info.distributed and dist.is_initialized():
        try:
            barrier(info)
        finally:
            dist.destroy_process_group()


def all_mean(value: float, info: DistInfo) -> float:
    """The mean of a number over all processes."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t) / info.world_size


def gather_objects(obj: Any, info: DistInfo) -> list[Any] | None:
    """Every process's ``obj`` on rank 0 (None elsewhere); ``[obj]`` in a single process."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size if info.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP around the model (which must already be on ``info.device``); the model itself in one process."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


def apply_fsdp(model: nn.Module, info: DistInfo, mixed_precision: bool) -> nn.Module:
    """Shard the MMDiT-X in place with FSDP2: each joint block, then the rest. Returns the same module.

    With ``mixed_precision`` the shards are gathered in bf16 and gradients reduced in fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    for block in model.joint_blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def reshard(model: nn.Module) -> None:
    """Free every gathered FSDP2 parameter, so the next forward gathers the current shards again."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def no_sync(model: nn.Module, enabled: bool):
    """DDP's ``no_sync`` on accumulation micro-steps; FSDP2 skips its reduce-scatter likewise."""
    if not enabled:
        return nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _FsdpNoSync(model)
    return nullcontext()


class _FsdpNoSync:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.model.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)
        return False


def is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (collective for an FSDP DTensor: every process must call it)."""
    if is_dtensor(t):
        t = t.full_tensor()
    return t.detach().cpu()


def like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``target``: this process's shard for a DTensor, else moved to its device."""
    if is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements)
    return full.to(target.device, target.dtype)
