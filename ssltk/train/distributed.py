"""Processes, devices and collectives for data-parallel pretraining.

Semantics (documented in ``ssltk pretrain --help`` too): the loader gives every rank an equal
slice of each *global* batch, each rank's loss is the mean over its slice, and DDP averages the
gradients, so one update equals the single-process update on the whole global batch as long as
the loss is a mean over images and BatchNorm sees the global batch (``sync_bn``). The paper's TPU
runs instead had per-core BatchNorm, triplet batches and Jigsaw permutation subsets; with
``per_replica_semantics`` each rank draws its own Jigsaw subset, and without ``sync_bn`` BatchNorm
statistics are per rank.

Under torchrun only rank 0 touches the run directory: it picks, verifies and reads the checkpoint
and broadcasts its state (:func:`broadcast_state`), so no other node needs a shared filesystem.
A stop (SIGTERM, Ctrl-C) is agreed on by all ranks once a step (:func:`any_rank`), so every rank
stops after the same step. ``pretrain.distributed.nproc_per_node`` above 1 (or ``nnodes``) makes
``ssltk pretrain`` relaunch itself under torchrun (:func:`torchrun_command`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ssltk.config import DistributedConfig, PretrainConfig
from ssltk.errors import UserError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized: bool = False
    cpu_group: Any = None  # a gloo group for small host-side collectives (the stop vote)

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
        cpu_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return DistContext(
            dist.get_rank(), dist.get_world_size(), local_rank, device, True, cpu_group
        )
    if torchrun:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:  # enabled without a launcher: a group of one, so the DDP code path still runs
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    cpu_group = None if backend == "gloo" else dist.new_group(backend="gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, True, cpu_group)


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


def any_rank(context: DistContext, flag: Callable[[], bool]) -> Callable[[], bool]:
    """Start agreeing whether ``flag()`` holds on any rank; the returned callable waits for the
    answer. In one process the flag is read when the answer is asked for."""
    if not context.initialized or context.world_size == 1:
        return flag
    vote = torch.tensor([int(flag())], dtype=torch.int32)
    work = dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=context.cpu_group, async_op=True)

    def answer() -> bool:
        work.wait()
        return bool(vote.item())

    return answer


@dataclass(frozen=True)
class _TensorSlot:
    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def broadcast_state(context: DistContext, state: Any) -> Any:
    """Rank 0's ``state`` (dicts, lists and tuples of tensors and plain values) on every rank.

    The structure is pickled once; each tensor travels as one broadcast on the process group's
    device (a receiving rank's tensors stay there). Rank 0 gets its own ``state`` back.
    """
    if not context.initialized or context.world_size == 1:
        return state
    tensors: list[torch.Tensor] = []

    def strip(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
            return _TensorSlot(len(tensors) - 1, tuple(obj.shape), obj.dtype)
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(strip(v) for v in obj)
        return obj

    skeleton = broadcast_object(context, strip(state) if context.is_main else None)
    device = context.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def fill(obj: Any) -> Any:
        if isinstance(obj, _TensorSlot):
            if context.is_main:
                buffer = tensors[obj.index].detach().to(device).contiguous()
            else:
                buffer = torch.empty(obj.shape, dtype=obj.dtype, device=device)
            dist.broadcast(buffer, src=0)
            return buffer
        if isinstance(obj, dict):
            return {k: fill(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(fill(v) for v in obj)
        return obj

    received = fill(skeleton)
    return state if context.is_main else received


def torchrun_command(config: DistributedConfig, args: list[str]) -> list[str] | None:
    """The torchrun command that runs ``ssltk pretrain <args>`` with ``config``'s process count,
    or None for a single process (or when already under torchrun)."""
    if launched_by_torchrun() or (config.nproc_per_node == 1 and config.nnodes == 1):
        return None
    command = [sys.executable, "-m", "torch.distributed.run"]
    command += [f"--nnodes={config.nnodes}", f"--nproc-per-node={config.nproc_per_node}"]
    if config.nnodes > 1 and not config.rdzv_endpoint:
        raise UserError(
            f"pretrain.distributed.nnodes={config.nnodes} needs "
            "pretrain.distributed.rdzv_endpoint (host:port of node 0)"
        )
    if config.rdzv_endpoint is None:
        command.append("--standalone")
    elif config.node_rank is not None:  # static ranks: global rank 0 runs on node 0
        host, _, port = config.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(
                f"pretrain.distributed.rdzv_endpoint={config.rdzv_endpoint!r}: expected host:port"
            )
        command += [f"--node-rank={config.node_rank}", f"--master-addr={host}"]
        command.append(f"--master-port={port}")
    else:
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={config.rdzv_endpoint}"]
        command.append(f"--rdzv-id={config.rdzv_id}")
    return [*command, "-m", "ssltk", "pretrain", *args]
