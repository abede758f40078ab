"""What a pretraining checkpoint holds, and when a run may resume from one.

A checkpoint holds the model, the optimiser, the position (global step), the epoch's running metric
sums, every rank's RNG states, the config values the weights depend on (the *trajectory*) and the
prepared data's hash. A run resumes from the newest valid checkpoint only when its trajectory, data
and steps per epoch are unchanged; restoring it continues the run bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssltk.config import Config
from ssltk.errors import UserError
from ssltk.tracking import PRETRAIN_SECTIONS
from ssltk.train import distributed
from ssltk.train.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    latest_valid_checkpoint,
    remove_checkpoints,
)
from ssltk.train.determinism import rng_state, set_rng_state
from ssltk.train.meters import EpochMeter

CHECKPOINT_FORMAT = 1

#: Config keys that may change between a checkpoint and its resumption: they do not alter the
#: trajectory (or, like ``compile`` and ``device``, only within floating-point noise).
RESUMABLE_KEYS = frozenset(
    {
        "pretrain.epochs",
        "pretrain.max_steps",
        "pretrain.workers",
        "pretrain.checkpoint_every",
        "pretrain.keep_checkpoints",
        "pretrain.log_every",
        "pretrain.distributed.nproc_per_node",
        "pretrain.distributed.nnodes",
        "pretrain.distributed.rdzv_endpoint",
        "pretrain.distributed.rdzv_id",
        "pretrain.distributed.node_rank",
        "pretrain.compile",
        "pretrain.device",
        "data.root",
        "data.file_list",
        "data.prepared_dir",
        "data.on_bad_image",
        "data.max_in_memory_images",
        "data.workers",
    }
)
#: What a checkpoint of this format holds (``position`` with at least these entries).
_STATE_KEYS = ("model", "optimizer", "position", "epoch_meter", "rng", "trajectory", "data_hash")
_POSITION_KEYS = ("global_step", "steps_per_epoch")
_HINT = "use --restart to start over, or another --out"


def trajectory(config: Config) -> dict[str, Any]:
    """The config values a checkpoint's weights depend on (flat, dotted keys)."""
    resumable = RESUMABLE_KEYS
    if config.pretrain.schedule == "cosine":  # the cosine's length sets every step's rate
        resumable = resumable - {"pretrain.epochs"}
    # The task's own epochs count, not the other tasks' entries of task_epochs.
    effective = config.model_copy(
        update={"pretrain": config.pretrain.for_task(config.pretext.task)}
    )
    return {
        key: value
        for key, value in effective.flat().items()
        if key.split(".")[0] in PRETRAIN_SECTIONS
        and key not in resumable
        and not key.startswith("pretrain.task_epochs")
    }


def check_state(state: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has every entry a resume reads (a
    checkpoint of another format is left to :func:`check_compatible`, which names it)."""
    if state.get("format") != CHECKPOINT_FORMAT:
        return
    missing = [key for key in _STATE_KEYS if key not in state]
    position = state.get("position")
    if isinstance(position, dict):
        missing += [f"position.{key}" for key in _POSITION_KEYS if key not in position]
    elif "position" not in missing:
        missing.append("position")
    if missing:
        raise CheckpointError(f"not a complete checkpoint (no {', '.join(missing)})")


def select(
    ckpt_dir: Path, context: distributed.DistContext, *, restart: bool
) -> tuple[CheckpointInfo | None, dict[str, Any] | None]:
    """Rank 0 picks, verifies and loads the newest valid checkpoint (or removes them all on
    ``restart``) and broadcasts its state: no other rank opens the file, so they need not see
    ``ckpt_dir``. Returns ``(info, state)`` (``info`` on rank 0 only)."""
    info, state = None, None
    if context.is_main:
        if restart:
            if ckpt_dir.is_dir():
                remove_checkpoints(ckpt_dir)
        else:
            found = latest_valid_checkpoint(
                ckpt_dir, map_location=context.device, validate=check_state
            )
            if found is not None:
                info, state = found
    return info, distributed.broadcast_state(context, state)


def check_compatible(
    state: dict[str, Any],
    config: Config,
    *,
    data_hash: str,
    steps_per_epoch: int,
    name: str | Path = "checkpoint",
) -> None:
    """Raise a one-line :class:`UserError` naming what changed since ``state`` was saved."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"{name}: checkpoint format {state.get('format')!r}, "
            f"expected {CHECKPOINT_FORMAT}; {_HINT}"
        )
    saved, now = state["trajectory"], trajectory(config)
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            raise UserError(
                f"{name} was trained with {key}={saved.get(key)!r}, the config now says "
                f"{now.get(key)!r}; {_HINT}"
            )
    if state["data_hash"] != data_hash:
        raise UserError(
            f"{name} was trained on prepared data {state['data_hash'][:12]}…, "
            f"{config.data.prepared_dir} now holds {data_hash[:12]}…; {_HINT}"
        )
    if state["position"]["steps_per_epoch"] != steps_per_epoch:
        raise UserError(f"{name}: steps per epoch changed; {_HINT}")


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor detached and on the CPU (dicts, lists and tuples walked)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def local_rng_state() -> Any:
    """This rank's RNG states, ready to be gathered into a checkpoint."""
    return to_cpu(rng_state())


def state_of(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meter: EpochMeter,
    *,
    global_step: int,
    steps_per_epoch: int,
    rng: list[Any],
    world_size: int,
    config: Config,
    data_hash: str,
    log_window: Sequence[tuple[int, dict[str, float]]] = (),
) -> dict[str, Any]:
    """The checkpoint of a run after ``global_step`` updates (``rng``: every rank's states;
    ``log_window``: the steps of the unfinished logging window, so a resume logs it whole)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": to_cpu(model.state_dict()),
        "optimizer": to_cpu(optimizer.state_dict()),
        "position": {
            "global_step": global_step,
            "epoch": global_step // steps_per_epoch,
            "step_in_epoch": global_step % steps_per_epoch,
            "steps_per_epoch": steps_per_epoch,
        },
        "epoch_meter": meter.state_dict(),
        "rng": rng,
        "world_size": world_size,
        "trajectory": trajectory(config),
        "data_hash": data_hash,
        "log_window": [(step, dict(values)) for step, values in log_window],
    }


def restore(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, meter: EpochMeter, rank: int
) -> int:
    """Load the optimiser, epoch sums and this rank's RNG states; returns the global step.

    (The model's weights are loaded earlier, before DDP wraps the model.)"""
    optimizer.load_state_dict(state["optimizer"])
    meter.load_state_dict(state["epoch_meter"])
    if rank < len(state["rng"]):
        set_rng_state(state["rng"][rank])
    return int(state["position"]["global_step"])


def log_window(state: dict[str, Any]) -> list[tuple[int, dict[str, float]]]:
    """The steps of the logging window ``state`` was saved in (none in older checkpoints)."""
    return [(int(step), dict(values)) for step, values in state.get("log_window", [])]
