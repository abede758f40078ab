"""Processes, devices and collectives for data-parallel pretraining.

Semantics (documented in ``ssltk pretrain --help`` too): the loader gives every rank an equal
slice of each *global* batch, each rank's loss is the mean over its slice, and DDP averages the
gradients, so one update equals the single-process update on the whole global batch as long as
the loss is a mean over images and BatchNorm sees the global batch (``sync_bn``). The paper's TPU
runs instead had per-core BatchNorm, triplet batches and Jigsaw permutation subsets; with
``per_replica_semantics`` each rank draws its own Jigsaw subset, and without ``sync_bn`` BatchNorm
statistics are per rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ssltk.config import PretrainConfig
from ssltk.errors import UserError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA when available; ``cuda`` without a GPU is a user error."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("pretrain.device=cuda: no CUDA device is available (use cpu or auto)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(config: PretrainConfig) -> DistContext:
    """Join the process group when launched by torchrun (or ``distributed.enabled``)."""
    torchrun = launched_by_torchrun()
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if torchrun else 0
    device = resolve_device(config.device, local_rank)
    if not torchrun and not config.distributed.enabled:
        return DistContext(0, 1, 0, device)

    backend = config.distributed.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError("pretrain.distributed.backend=nccl needs CUDA devices (use gloo on CPU)")
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, True)
    if torchrun:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:  # enabled without a launcher: a group of one, so the DDP code path still runs
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, True)


def teardown(context: DistContext) -> None:
    if context.initialized and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistContext) -> None:
    if context.initialized:
        if context.device.type == "cuda":
            dist.barrier(device_ids=[context.device.index])
        else:
            dist.barrier()


def all_mean(context: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over ranks (itself in a single process)."""
    if not context.initialized or context.world_size == 1:
        return tensor
    summed = tensor.clone()
    dist.all_reduce(summed)
    return summed / context.world_size


def gather_objects(context: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not context.initialized or context.world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(context: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not context.initialized or context.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
