"""The pretraining engine: :class:`Trainer` (one SGD step) and :func:`pretrain` (a whole run).

A run is a pure function of the config and the prepared data: the data order and every
augmentation come from counter-based keys, model-internal randomness (dropout) from torch's global
generator, which is seeded and checkpointed, and kernels are deterministic. Checkpoints hold the
model, the optimiser, the position (global step), the epoch's running metric sums and every rank's
RNG states; resuming from one continues the run bit for bit.

Only prepared data made from the config's ``data.*`` settings is used. The run directory is locked
for the run's lifetime (a second process refuses at once); SIGTERM, like Ctrl-C, ends the run with
its MLflow run and run.json marked, before the loop as well as in it. Resuming logs no MLflow point
twice, and pruning never lets an unverifiable checkpoint take a kept place.

Test hook: the environment variable ``SSLTK_INJECT_NAN_AT_STEP=N`` multiplies the loss of global
step ``N`` by NaN, to exercise the divergence path without a contrived config.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ssltk import fsutil, tracking
from ssltk.config import Config, ConfigError
from ssltk.data import rng
from ssltk.data.dataset import PreparedDataset
from ssltk.data.loader import DeterministicLoader
from ssltk.pretext import PretextInputs, PretextTask, build_task
from ssltk.train import distributed
from ssltk.train.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    latest_valid_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_checkpoints,
    save_checkpoint,
)
from ssltk.train.determinism import deterministic_mode, rng_state, seed_everything, set_rng_state
from ssltk.train.meters import CurveFile, EpochMeter, MetricWindow, first_non_finite
from ssltk.train.progress import Progress
from ssltk.train.schedule import Schedule, build_schedule, total_steps
from ssltk.train.sync_bn import convert_sync_bn

FAULT_ENV = "SSLTK_INJECT_NAN_AT_STEP"
CHECKPOINT_FORMAT = 1
RUN_JSON = "run.json"
METRICS_JSON = "metrics.json"
CURVE_CSV = "curve.csv"
CHECKPOINT_DIR = "checkpoints"

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
_TRAJECTORY_SECTIONS = ("seed", "data", "model", "pretext", "pretrain")
#: What a checkpoint of this format holds (``position`` with at least these entries).
_STATE_KEYS = ("model", "optimizer", "position", "epoch_meter", "rng", "trajectory", "data_hash")
_POSITION_KEYS = ("global_step", "steps_per_epoch")


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite."""

    def __init__(self, step: int, loss: float, checkpoint: Path | None) -> None:
        self.step, self.loss, self.checkpoint = step, loss, checkpoint
        kept = f"last good checkpoint {checkpoint}" if checkpoint else "no checkpoint was written"
        super().__init__(f"loss is {loss} at step {step}: training diverged and stopped; {kept}")


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM: the run stopped after a checkpoint of the step it had finished."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        self.step, self.checkpoint = step, checkpoint
        super().__init__(
            f"interrupted after step {step}; checkpoint {checkpoint} saved: "
            "run the same command again to resume"
        )


@dataclass
class PretrainResult:
    run_id: str | None
    checkpoint: Path
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    tracking_uri: str | None = None


def default_out_dir(config: Config) -> Path:
    return Path("runs") / tracking.run_name(config)


def trajectory(config: Config) -> dict[str, Any]:
    """The config values a checkpoint's weights depend on (flat, dotted keys)."""
    resumable = RESUMABLE_KEYS
    if config.pretrain.schedule == "cosine":  # the cosine's length sets every step's rate
        resumable = resumable - {"pretrain.epochs"}
    return {
        key: value
        for key, value in config.flat().items()
        if key.split(".")[0] in _TRAJECTORY_SECTIONS and key not in resumable
    }


def build_optimizer(task: PretextTask, config: Config) -> torch.optim.SGD:
    """SGD with momentum over the task's weight-decay groups; the rate is set every step."""
    groups = task.param_groups(config.pretrain.weight_decay)
    return torch.optim.SGD(groups, lr=0.0, momentum=config.pretrain.momentum)


class Trainer:
    """One update: the scheduled rate, forward (bf16 autocast on request), backward, SGD step.

    ``model`` is what runs the forward pass (the task itself, or it wrapped in DDP and/or
    ``torch.compile``). Returned metrics stay on the device as 0-d float tensors.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        *,
        device: torch.device,
        precision: str = "fp32",
        fault_step: int | None = None,
    ) -> None:
        if precision == "bf16" and device.type != "cuda":
            raise ConfigError("pretrain.precision=bf16 needs a CUDA device (use fp32 on CPU)")
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.device = device
        self.bf16 = precision == "bf16"
        self.fault_step = fault_step

    def step(self, inputs: PretextInputs, step: int) -> tuple[float, dict[str, torch.Tensor]]:
        """Apply update number ``step`` (0-based); returns its rate and detached metrics."""
        lr = self.schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with autocast:
            output = self.model(inputs)
        loss = output.loss
        if step == self.fault_step:
            loss = loss * float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        metrics = {"loss": loss.detach().float()}
        metrics.update({name: value.detach().float() for name, value in output.metrics.items()})
        return lr, metrics


def _fault_step() -> int | None:
    raw = os.environ.get(FAULT_ENV)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{FAULT_ENV}={raw!r}: expected a step number") from None


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _write_json(path: Path, data: dict[str, Any]) -> None:
    fsutil.write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def check_state(state: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has every entry a resume reads (a
    checkpoint of another format is left to the compatibility check, which names it)."""
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


class _PretrainRun:
    """The state and steps of one ``pretrain`` call."""

    def __init__(
        self,
        config: Config,
        out_dir: Path,
        context: distributed.DistContext,
        *,
        restart: bool,
        progress_bar: bool,
    ) -> None:
        self.config = config
        self.pre = config.pretrain
        self.out_dir = out_dir
        self.ckpt_dir = out_dir / CHECKPOINT_DIR
        self.context = context
        self.restart = restart
        self.progress_bar = progress_bar and context.is_main
        self.tracked: tracking.TrackedRun | None = None
        self.last_checkpoint: CheckpointInfo | None = None  # rank 0 only
        self.checkpoint_step: int | None = None  # every rank
        self.global_step = 0
        self.meter = EpochMeter()
        self.window = MetricWindow()
        self.curve = CurveFile(out_dir / CURVE_CSV)
        self.stop_requested = False

    # ---------------------------------------------------------------------------------- set-up

    def build(self) -> None:
        context, config = self.context, self.config
        seed_everything(config.seed + context.rank)
        dataset = PreparedDataset.for_config(config)
        self.data_hash = dataset.content_hash
        self.data_settings = dataset.settings_fingerprint
        if context.is_main:  # an unusable store is found before any work, and created once
            tracking.client(config.tracking.resolved_uri())
        split = dataset.split(config.data.pretrain_split)
        self.loader = DeterministicLoader(
            split,
            self.pre.batch_size,
            seed=config.seed,
            shuffle=True,
            drop_last=True,
            workers=self.pre.workers,
            rank=context.rank,
            world_size=context.world_size,
        )
        self.steps_per_epoch = self.loader.steps_per_epoch
        self.total = total_steps(self.pre, self.steps_per_epoch)
        self.schedule = build_schedule(self.pre, self.steps_per_epoch)

        try:
            task = build_task(config)
        except ValueError as err:  # e.g. a patch size too small for VGG's fc6
            raise ConfigError(f"model/pretext: {err}") from None
        self.task = task.to(context.device)
        self.task.train()
        self.resume_state = self._select_checkpoint()
        if self.resume_state is not None:
            self._check_compatible(self.resume_state)
            self.task.load_state_dict(self.resume_state["model"])

        model: nn.Module = self.task
        if context.initialized:
            if self.pre.distributed.sync_bn:
                self.task = convert_sync_bn(self.task, context.device)
            device_ids = [context.device.index] if context.device.type == "cuda" else None
            model = DistributedDataParallel(self.task, device_ids=device_ids)
            if (
                self.task.couples_batch
                and context.world_size > 1
                and not self.pre.distributed.per_replica_semantics
                and context.is_main
            ):
                print(
                    f"warning: {self.task.name}'s loss sees each rank's share of the batch only "
                    "(per-replica semantics) even though pretrain.distributed."
                    "per_replica_semantics=false",
                    file=sys.stderr,
                )
        if self.pre.compile:
            model = torch.compile(model)
        self.optimizer = build_optimizer(self.task, config)
        self.trainer = Trainer(
            model,
            self.optimizer,
            self.schedule,
            device=context.device,
            precision=self.pre.precision,
            fault_step=_fault_step(),
        )
        if self.resume_state is not None:
            self._restore(self.resume_state)

    def _select_checkpoint(self) -> dict[str, Any] | None:
        """Rank 0 picks the newest valid checkpoint (or clears them on ``--restart``)."""
        chosen: str | None = None
        state = None
        if self.context.is_main:
            if self.restart:
                if self.ckpt_dir.is_dir():
                    remove_checkpoints(self.ckpt_dir)
                for name in (RUN_JSON, METRICS_JSON, CURVE_CSV):
                    (self.out_dir / name).unlink(missing_ok=True)
            else:
                found = latest_valid_checkpoint(
                    self.ckpt_dir, map_location=self.context.device, validate=check_state
                )
                if found is not None:
                    self.last_checkpoint, state = found
                    chosen = str(found[0].path)
        chosen = distributed.broadcast_object(self.context, chosen)
        if chosen is not None and state is None:
            state = load_checkpoint(Path(chosen), self.context.device, validate=check_state)
        return state

    def _check_compatible(self, state: dict[str, Any]) -> None:
        name = self.last_checkpoint.path if self.last_checkpoint else "checkpoint"
        hint = "use --restart to start over, or another --out"
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(
                f"{name}: checkpoint format {state.get('format')!r}, "
                f"expected {CHECKPOINT_FORMAT}; {hint}"
            )
        saved, now = state["trajectory"], trajectory(self.config)
        for key in sorted(set(saved) | set(now)):
            if saved.get(key) != now.get(key):
                raise ConfigError(
                    f"{name} was trained with {key}={saved.get(key)!r}, the config now says "
                    f"{now.get(key)!r}; {hint}"
                )
        if state["data_hash"] != self.data_hash:
            raise ConfigError(
                f"{name} was trained on prepared data {state['data_hash'][:12]}…, "
                f"{self.config.data.prepared_dir} now holds {self.data_hash[:12]}…; {hint}"
            )
        if state["position"]["steps_per_epoch"] != self.steps_per_epoch:
            raise ConfigError(f"{name}: steps per epoch changed; {hint}")

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_step = self.checkpoint_step = int(state["position"]["global_step"])
        self.meter.load_state_dict(state["epoch_meter"])
        states = state["rng"]
        if self.context.rank < len(states):
            set_rng_state(states[self.context.rank])

    def start_tracking(self) -> None:
        if not self.context.is_main:
            return
        previous = self._read_run_json().get("run_id")
        self.tracked = tracking.start_pretrain_run(
            self.config,
            data_hash=self.data_hash,
            device=str(self.context.device),
            world_size=self.context.world_size,
            resume_run_id=previous if self.resume_state is not None else None,
            stale_run_id=previous if self.resume_state is None else None,
            data_settings=self.data_settings,
        )
        self._write_run_json(status="running")
        if self.resume_state is None:
            self.curve.reset()
        else:
            self.curve.truncate(self.global_step)

    # -------------------------------------------------------------------------------- training

    def _batch_key(self, epoch: int, step: int) -> torch.Tensor:
        key = rng.batch_key(self.config.seed, epoch, step)
        if self.pre.distributed.per_replica_semantics and self.context.world_size > 1:
            key = rng.batch_key(int(key.item()), self.context.rank, step)
        return key

    def train(self) -> None:
        bar = Progress(
            self.total,
            self.global_step,
            bar=self.progress_bar,
            log_every=self.pre.log_every,
            desc=tracking.run_name(self.config),
        )
        self.progress = bar if self.context.is_main else None
        self.flush_clock = time.perf_counter()
        self.flush_start_step = self.global_step
        try:
            with self._stop_after_step_on_signal():
                while self.global_step < self.total:
                    self._train_epoch()
        finally:
            bar.close()

    @contextmanager
    def _stop_after_step_on_signal(self) -> Iterator[None]:
        """SIGINT/SIGTERM finish the current step, checkpoint it and stop; a second one stops now.

        Single-process runs only: under torchrun each rank would see the signal at a different
        step, so there the default handling (and the last periodic checkpoint) applies.
        """
        if self.context.world_size > 1 or threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: object) -> None:
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True

        previous = {
            sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _train_epoch(self) -> None:
        epoch, first = divmod(self.global_step, self.steps_per_epoch)
        epoch_clock = time.perf_counter()
        device = self.context.device
        for epoch_steps, batch in enumerate(self.loader.epoch(epoch, start_step=first), start=1):
            images = batch.images.to(device, non_blocking=True)
            keys = batch.keys.to(device, non_blocking=True)
            with torch.no_grad():
                inputs = self.task.prepare_batch(
                    images, keys, self._batch_key(epoch, batch.step), train=True
                )
            lr, values = self.trainer.step(inputs, self.global_step)
            self.window.add(self.global_step, lr, values)
            self.global_step += 1
            if self.progress is not None:
                self.progress.advance()

            step = self.global_step
            end_of_epoch = step % self.steps_per_epoch == 0
            checkpoint = (
                step % self.pre.checkpoint_every == 0 or step == self.total or self.stop_requested
            )
            if step % self.pre.log_every == 0 or checkpoint or end_of_epoch:
                self._flush(epoch)
            if end_of_epoch:
                seconds = time.perf_counter() - epoch_clock
                self._log_epoch(epoch, epoch_steps * self.pre.batch_size / max(seconds, 1e-9))
            if checkpoint:
                self._checkpoint()
            if self.stop_requested:
                path = self.last_checkpoint.path if self.last_checkpoint else None
                raise RunInterrupted(step, path)
            if step >= self.total:
                return

    def _flush(self, epoch: int) -> None:
        rows = self.window.flush(lambda t: distributed.all_mean(self.context, t))
        if not rows:
            return
        bad = first_non_finite(rows)
        if bad is not None:
            checkpoint = self.last_checkpoint.path if self.last_checkpoint else None
            raise DivergenceError(bad[0], bad[1], checkpoint)
        for _, values in rows:
            self.meter.add({k: v for k, v in values.items() if k != "lr"})
        now = time.perf_counter()
        steps = self.global_step - self.flush_start_step
        images_per_sec = steps * self.pre.batch_size / max(now - self.flush_clock, 1e-9)
        self.flush_clock, self.flush_start_step = now, self.global_step
        if self.tracked is not None:
            logged = [
                (s, {tracking.train_metric(k): v for k, v in vals.items()}) for s, vals in rows
            ]
            logged.append((rows[-1][0], {tracking.train_metric("images_per_sec"): images_per_sec}))
            self.tracked.log_metrics(logged)
            self.curve.append(rows)
        if self.progress is not None:
            count = len(rows)
            means = {
                name: sum(values[name] for _, values in rows) / count
                for name in rows[0][1]
                if name != "lr"
            }
            self.progress.report(self.global_step, epoch, means, images_per_sec)

    def _log_epoch(self, epoch: int, images_per_sec: float) -> None:
        means = self.meter.close_epoch()
        if self.tracked is not None:
            values = {tracking.epoch_metric(k): v for k, v in means.items()}
            values[tracking.epoch_metric("images_per_sec")] = images_per_sec
            self.tracked.log_metrics([(epoch, values)])

    def _checkpoint(self) -> None:
        rng_states = distributed.gather_objects(self.context, _to_cpu(rng_state()))
        if self.context.is_main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "model": _to_cpu(self.task.state_dict()),
                "optimizer": _to_cpu(self.optimizer.state_dict()),
                "position": {
                    "global_step": self.global_step,
                    "epoch": self.global_step // self.steps_per_epoch,
                    "step_in_epoch": self.global_step % self.steps_per_epoch,
                    "steps_per_epoch": self.steps_per_epoch,
                },
                "epoch_meter": self.meter.state_dict(),
                "rng": rng_states,
                "world_size": self.context.world_size,
                "trajectory": trajectory(self.config),
                "data_hash": self.data_hash,
            }
            self.last_checkpoint = save_checkpoint(state, self.ckpt_dir, self.global_step)
            prune_checkpoints(self.ckpt_dir, self.pre.keep_checkpoints, fresh=self.last_checkpoint)
        self.checkpoint_step = self.global_step
        distributed.barrier(self.context)

    # ------------------------------------------------------------------------------- finishing

    def _read_run_json(self) -> dict[str, Any]:
        path = self.out_dir / RUN_JSON
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_run_json(self, status: str, failure: str | None = None) -> None:
        if not self.context.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        ckpt = self.last_checkpoint
        data: dict[str, Any] = {
            "status": status,
            "run_id": self.tracked.run_id if self.tracked else None,
            "experiment_id": self.tracked.experiment_id if self.tracked else None,
            "experiment": self.config.tracking.experiment,
            "tracking_uri": self.tracked.tracking_uri if self.tracked else None,
            "checkpoint": str(ckpt.path) if ckpt else None,
            "checkpoint_sha256": ckpt.sha256 if ckpt else None,
            "checkpoint_artifact": (
                f"{tracking.CHECKPOINT_ARTIFACT_DIR}/{ckpt.path.name}" if ckpt else None
            ),
            "task": self.config.pretext.task,
            "arch": self.config.model.arch,
            "widening": self.config.model.widening,
            "global_step": self.global_step,
            "total_steps": self.total,
            "steps_per_epoch": self.steps_per_epoch,
            "data_hash": self.data_hash,
            "data_settings": self.data_settings,
            "world_size": self.context.world_size,
        }
        if failure:
            data["failure"] = failure
        _write_json(self.out_dir / RUN_JSON, data)

    def finish(self) -> PretrainResult:
        if self.checkpoint_step != self.global_step:
            self._checkpoint()  # e.g. resumed past a lowered max_steps
        final = self.meter.latest()
        if self.context.is_main and self.last_checkpoint is not None:
            metrics = {**final, "steps": self.global_step}
            metrics["epochs"] = self.global_step / self.steps_per_epoch
            _write_json(self.out_dir / METRICS_JSON, metrics)
            if self.tracked is not None:
                ckpt = self.last_checkpoint.path
                self.tracked.log_artifact(ckpt, tracking.CHECKPOINT_ARTIFACT_DIR)
                self.tracked.log_artifact(
                    ckpt.with_name(ckpt.name + ".sha256"), tracking.CHECKPOINT_ARTIFACT_DIR
                )
                self.tracked.finish("FINISHED")
            self._write_run_json(status="finished")
        distributed.barrier(self.context)
        return PretrainResult(
            run_id=self.tracked.run_id if self.tracked else None,
            checkpoint=self.last_checkpoint.path if self.last_checkpoint else Path(),
            steps=self.global_step,
            metrics=final,
            tracking_uri=self.tracked.tracking_uri if self.tracked else None,
        )

    def fail(self, status: str, message: str) -> None:
        """Mark the MLflow run and run.json; a run that never started tracking leaves no trace."""
        if self.tracked is None:
            return
        for record in (
            lambda: self._write_run_json(status=status.lower(), failure=message),
            lambda: self.tracked.finish(status, failure=message),
        ):
            try:  # best effort: the failure being reported (a full disk?) may strike here too
                record()
            except Exception as err:
                reason = " ".join(str(err).split())[:200]
                print(f"warning: could not record the run as {status}: {reason}", file=sys.stderr)


def pretrain(
    config: Config,
    out_dir: Path | None = None,
    *,
    restart: bool = False,
    progress_bar: bool = False,
) -> PretrainResult:
    """Pretrain ``config``'s (task, arch, widening) into ``out_dir`` (default ``runs/<name>``).

    Resumes from the newest valid checkpoint in ``out_dir/checkpoints`` unless ``restart``.
    Raises :class:`ConfigError` for user errors and :class:`DivergenceError` on a NaN/inf loss
    (the MLflow run is then marked FAILED and the last good checkpoint is kept).
    """
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(config)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 holds the directory
    with _sigterm_interrupts(), _run_directory(out_dir, main), deterministic_mode():
        context = distributed.setup(config.pretrain)
        try:
            return _run(config, out_dir, context, restart=restart, progress_bar=progress_bar)
        finally:
            distributed.teardown(context)


def _run_directory(out_dir: Path, main: bool) -> Any:
    if main:
        return fsutil.run_directory(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return nullcontext(out_dir)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does: outside the training loop (which turns
    both into a stop after the current step) a run ends marked KILLED, not silently."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(
    config: Config,
    out_dir: Path,
    context: distributed.DistContext,
    *,
    restart: bool,
    progress_bar: bool,
) -> PretrainResult:
    run = _PretrainRun(config, out_dir, context, restart=restart, progress_bar=progress_bar)
    try:
        run.build()
        run.start_tracking()
        run.train()
        return run.finish()
    except DivergenceError as err:
        run.fail("FAILED", str(err))
        raise
    except RunInterrupted as err:
        run.fail("KILLED", str(err))
        raise
    except KeyboardInterrupt:
        run.fail("KILLED", "interrupted")
        raise
    except Exception as err:
        run.fail("FAILED", f"{type(err).__name__}: {err}")
        raise
