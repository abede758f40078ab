"""The pretraining engine: :class:`Trainer` (one SGD step) and :func:`pretrain` (a whole run).

A run is a pure function of the config and the prepared data: the data order and every
augmentation come from counter-based keys, model-internal randomness (dropout) from torch's global
generator, which is seeded and checkpointed, and kernels are deterministic. What a checkpoint holds
and when a run may resume from it is :mod:`ssltk.train.resume`; the files the run leaves are
:mod:`ssltk.train.rundir`.

Only prepared data made from the config's ``data.*`` settings is used. The run directory is locked
for the run's lifetime (a second process refuses at once); SIGTERM, like Ctrl-C, ends the run with
its MLflow run and run.json marked, before the loop as well as in it (in it, after a checkpoint of
the step every rank finished). Metrics are logged once per ``log_every`` steps, as the window's
means. Resuming logs no MLflow point twice, and pruning never lets an unverifiable checkpoint take
a kept place.
"""

from __future__ import annotations

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

from ssltk import fsutil, store, tracking
from ssltk.config import Config
from ssltk.data import rng
from ssltk.data.dataset import PreparedDataset
from ssltk.data.loader import DeterministicLoader
from ssltk.errors import UserError
from ssltk.pretext import PretextTask, build_task
from ssltk.train import distributed, resume
from ssltk.train.checkpoint import CheckpointInfo, prune_checkpoints, save_checkpoint
from ssltk.train.determinism import deterministic_mode, seed_everything
from ssltk.train.meters import EpochMeter, MetricWindow, first_non_finite, window_means
from ssltk.train.progress import Progress
from ssltk.train.rundir import RunDir, default_out_dir, hold
from ssltk.train.schedule import Schedule, build_schedule, total_steps
from ssltk.train.sync_bn import convert_sync_bn


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
    ) -> None:
        if precision == "bf16" and device.type != "cuda":
            raise UserError("pretrain.precision=bf16 needs a CUDA device (use fp32 on CPU)")
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.device = device
        self.bf16 = precision == "bf16"

    def step(self, inputs: Any, step: int) -> tuple[float, dict[str, torch.Tensor]]:
        """Apply update number ``step`` (0-based) on ``inputs``, the batch ``model`` takes (a
        :class:`PretextInputs` for a task); returns the rate and detached metrics."""
        lr = self.schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with autocast:
            output = self.model(inputs)
        loss = output.loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        metrics = {"loss": loss.detach().float()}
        metrics.update({name: value.detach().float() for name, value in output.metrics.items()})
        return lr, metrics


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
        self.pre = config.pretrain.for_task(config.pretext.task)
        self.run_dir = RunDir(out_dir)
        self.context = context
        self.restart = restart
        self.progress_bar = progress_bar and context.is_main
        self.tracked: tracking.TrackedRun | None = None
        self.last_checkpoint: CheckpointInfo | None = None  # rank 0 only
        self.checkpoint_step: int | None = None  # every rank
        self.global_step = 0
        self.meter = EpochMeter()
        self.window = MetricWindow()
        self.log_window: list[tuple[int, dict[str, float]]] = []  # this log window's steps
        self.signalled = False  # this rank got SIGINT/SIGTERM

    # ---------------------------------------------------------------------------------- set-up

    def build(self) -> None:
        context, config = self.context, self.config
        seed_everything(config.seed + context.rank)
        dataset = PreparedDataset.for_config(config)
        self.data_hash = dataset.content_hash
        self.data_settings = dataset.settings_fingerprint
        if context.is_main:  # an unusable store is found before any work, and created once
            store.client(config.tracking.resolved_uri())
            warn_network_store(config.tracking.resolved_uri())
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
            raise UserError(f"model/pretext: {err}") from None
        self.task = task.to(context.device)
        self.task.train()
        self.last_checkpoint, self.resume_state = resume.select(
            self.run_dir.checkpoints, context, restart=self.restart
        )
        if self.restart and context.is_main:  # after the checkpoints: none outlives its run.json
            self.run_dir.clear_records()
        if self.resume_state is not None:
            resume.check_compatible(
                self.resume_state,
                config,
                data_hash=self.data_hash,
                steps_per_epoch=self.steps_per_epoch,
                name=self.last_checkpoint.path if self.last_checkpoint else "checkpoint",
            )
            self.task.load_state_dict(self.resume_state["model"])

        model = self._wrapped_model()
        self.optimizer = build_optimizer(self.task, config)
        self.trainer = Trainer(
            model,
            self.optimizer,
            self.schedule,
            device=context.device,
            precision=self.pre.precision,
        )
        if self.resume_state is not None:
            self.global_step = resume.restore(
                self.resume_state, self.optimizer, self.meter, context.rank
            )
            self.log_window = resume.log_window(self.resume_state)
            self.checkpoint_step = self.global_step

    def _wrapped_model(self) -> nn.Module:
        """The task as the forward pass runs it: in DDP under torchrun, compiled on request."""
        context = self.context
        model: nn.Module = self.task
        if context.initialized:
            if self.pre.distributed.sync_bn:
                self.task = convert_sync_bn(self.task, context.device)
            device_ids = [context.device.index] if context.device.type == "cuda" else None
            model = DistributedDataParallel(self.task, device_ids=device_ids)
            per_replica = self.pre.distributed.per_replica_semantics
            warning = self.task.data_parallel_warning(context.world_size, per_replica)
            if warning and context.is_main:
                print(f"warning: {warning}", file=sys.stderr)
        if self.pre.compile:
            model = torch.compile(model)
        return model

    def start_tracking(self) -> None:
        if not self.context.is_main:
            return
        previous = self.run_dir.read_record().get("run_id")
        self.tracked = tracking.start_pretrain_run(
            self.config,
            data_hash=self.data_hash,
            device=str(self.context.device),
            world_size=self.context.world_size,
            resume_run_id=previous if self.resume_state is not None else None,
            stale_run_id=previous if self.resume_state is None else None,
            data_settings=self.data_settings,
        )
        self._write_record(status="running")
        if self.resume_state is None:
            self.run_dir.curve.reset()
        else:
            self.run_dir.curve.truncate(self.global_step)

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

        Under torchrun the ranks agree once a step whether any of them was signalled, so all
        stop after the same step; there a second signal is ignored (torchrun's agent sends one
        to every rank, and its SIGKILL after a grace period is the hard stop).
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        several = self.context.world_size > 1

        def request_stop(signum: int, frame: object) -> None:
            if self.signalled and not several:
                raise KeyboardInterrupt
            self.signalled = True

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
            stop_vote = distributed.any_rank(self.context, lambda: self.signalled)
            lr, values = self.trainer.step(inputs, self.global_step)
            stop = stop_vote()
            self.window.add(self.global_step, lr, values)
            self.global_step += 1
            if self.progress is not None:
                self.progress.advance()

            step = self.global_step
            end_of_epoch = step % self.steps_per_epoch == 0
            checkpoint = step % self.pre.checkpoint_every == 0 or step == self.total or stop
            if step % self.pre.log_every == 0 or checkpoint or end_of_epoch:
                self._flush(epoch)
            if end_of_epoch:
                seconds = time.perf_counter() - epoch_clock
                self._log_epoch(epoch, epoch_steps * self.pre.batch_size / max(seconds, 1e-9))
            if checkpoint:
                self._checkpoint()
            if stop:
                path = self.last_checkpoint.path if self.last_checkpoint else None
                raise RunInterrupted(step, path)
            if step >= self.total:
                return

    def _flush(self, epoch: int) -> None:
        """Bring the steps' metrics to the host (checked for NaN, added to the epoch means) and
        log the window of ``log_every`` steps they complete as one row of means."""
        rows = self.window.flush(lambda t: distributed.all_mean(self.context, t))
        bad = first_non_finite(rows)
        if bad is not None:
            checkpoint = self.last_checkpoint.path if self.last_checkpoint else None
            raise DivergenceError(bad[0], bad[1], checkpoint)
        for _, values in rows:
            self.meter.add({k: v for k, v in values.items() if k != "lr"})
        self.log_window.extend(rows)
        step = self.global_step
        if not self.log_window or (step % self.pre.log_every and step != self.total):
            return
        means = window_means(self.log_window)
        self.log_window = []
        now = time.perf_counter()
        steps = step - self.flush_start_step
        images_per_sec = steps * self.pre.batch_size / max(now - self.flush_clock, 1e-9)
        self.flush_clock, self.flush_start_step = now, step
        if self.tracked is not None:
            logged = {tracking.train_metric(k): v for k, v in means.items()}
            logged[tracking.train_metric("images_per_sec")] = images_per_sec
            self.tracked.log_metrics([(step - 1, logged)])
            self.run_dir.curve.append([(step - 1, means)])
        if self.progress is not None:
            shown = {name: value for name, value in means.items() if name != "lr"}
            self.progress.report(step, epoch, shown, images_per_sec)

    def _log_epoch(self, epoch: int, images_per_sec: float) -> None:
        means = self.meter.close_epoch()
        if self.tracked is not None:
            values = {tracking.epoch_metric(k): v for k, v in means.items()}
            values[tracking.epoch_metric("images_per_sec")] = images_per_sec
            self.tracked.log_metrics([(epoch, values)])

    def _checkpoint(self) -> None:
        rng_states = distributed.gather_objects(self.context, resume.local_rng_state())
        if self.context.is_main:
            state = resume.state_of(
                self.task,
                self.optimizer,
                self.meter,
                global_step=self.global_step,
                steps_per_epoch=self.steps_per_epoch,
                rng=rng_states,
                world_size=self.context.world_size,
                config=self.config,
                data_hash=self.data_hash,
                log_window=self.log_window,
            )
            ckpt_dir = self.run_dir.checkpoints
            self.last_checkpoint = save_checkpoint(state, ckpt_dir, self.global_step)
            prune_checkpoints(ckpt_dir, self.pre.keep_checkpoints, fresh=self.last_checkpoint)
        self.checkpoint_step = self.global_step
        distributed.barrier(self.context)

    # ------------------------------------------------------------------------------- finishing

    def _write_record(self, status: str, failure: str | None = None) -> None:
        if not self.context.is_main:
            return
        self.run_dir.write_record(
            self.config,
            status=status,
            tracked=self.tracked,
            checkpoint=self.last_checkpoint,
            position={
                "global_step": self.global_step,
                "total_steps": self.total,
                "steps_per_epoch": self.steps_per_epoch,
            },
            data_hash=self.data_hash,
            data_settings=self.data_settings,
            world_size=self.context.world_size,
            failure=failure,
        )

    def finish(self) -> PretrainResult:
        if self.checkpoint_step != self.global_step:
            self._checkpoint()  # e.g. resumed past a lowered max_steps
        final = self.meter.latest()
        if self.context.is_main and self.last_checkpoint is not None:
            metrics = {**final, "steps": self.global_step}
            metrics["epochs"] = self.global_step / self.steps_per_epoch
            self.run_dir.write_metrics(metrics)
            if self.tracked is not None:
                ckpt = self.last_checkpoint.path
                self.tracked.log_artifact(ckpt, tracking.CHECKPOINT_ARTIFACT_DIR)
                self.tracked.log_artifact(
                    ckpt.with_name(ckpt.name + ".sha256"), tracking.CHECKPOINT_ARTIFACT_DIR
                )
                self.tracked.finish("FINISHED")
            self._write_record(status="finished")
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
            lambda: self._write_record(status=status.lower(), failure=message),
            lambda: self.tracked.finish(status, failure=message),
        ):
            try:  # best effort: the failure being reported (a full disk?) may strike here too
                record()
            except Exception as err:
                reason = " ".join(str(err).split())[:200]
                print(f"warning: could not record the run as {status}: {reason}", file=sys.stderr)


_warned_stores: set[str] = set()


def warn_network_store(uri: str) -> None:
    """One warning per store and process when a SQLite store lies on a network filesystem,
    where several writers at once risk "database is locked" (an ``mlflow server`` does not)."""
    db = store.sqlite_path(uri)
    if db is None or uri in _warned_stores:
        return
    point, kind = fsutil.mount_of(Path(db).parent)
    if kind in fsutil.NETWORK_FILESYSTEMS:
        _warned_stores.add(uri)
        print(
            f"warning: the tracking store {db} is on {kind} ({point}); several runs at once "
            "may hit 'database is locked': serve it with `mlflow server --backend-store-uri "
            f"{uri}` and set tracking.uri=http://HOST:5000 (README, cluster section)",
            file=sys.stderr,
        )


def pretrain(
    config: Config,
    out_dir: Path | None = None,
    *,
    restart: bool = False,
    progress_bar: bool = False,
) -> PretrainResult:
    """Pretrain ``config``'s (task, arch, widening) into ``out_dir`` (default ``runs/<name>``).

    Resumes from the newest valid checkpoint in ``out_dir/checkpoints`` unless ``restart``.
    Raises :class:`UserError` for user errors and :class:`DivergenceError` on a NaN/inf loss
    (the MLflow run is then marked FAILED and the last good checkpoint is kept).
    """
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(config)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 holds the directory
    with _sigterm_interrupts(), hold(out_dir, main), deterministic_mode():
        context = distributed.setup(config.pretrain)
        try:
            return _run(config, out_dir, context, restart=restart, progress_bar=progress_bar)
        finally:
            distributed.teardown(context)


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
