"""The pretraining learning-rate schedule (the released ``trainer.py``): linear warm-up from 0,
then step decays; optionally (``pretrain.schedule: cosine``, not in the paper) a cosine decay to 0
instead of steps.

Everything is expressed in epochs in the config and converted to global steps with the loader's
``steps_per_epoch = floor(num_images / global_batch)``; the last partial batch is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ssltk.config import PretrainConfig

#: The batch size (in source images) that ``base_lr`` refers to.
LR_REFERENCE_BATCH = 256


def peak_lr(base_lr: float, batch_size: int) -> float:
    """Linear scaling: ``base_lr`` per 256 images times the global batch in images."""
    return base_lr * batch_size / LR_REFERENCE_BATCH


@dataclass(frozen=True)
class StepSchedule:
    """``lr(step)`` for the update made at 0-based global ``step``.

    During warm-up the rate is ``peak * step / warmup_steps`` (so the first update has rate 0);
    afterwards it is ``peak * decay_factor ** k`` where ``k`` counts the decay boundaries reached
    (``step >= boundary``). Boundaries are ``floor(decay_epoch * steps_per_epoch)``.
    """

    peak: float
    warmup_steps: float
    boundaries: tuple[int, ...]
    decay_factor: float

    def __post_init__(self) -> None:
        if self.peak <= 0 or not math.isfinite(self.peak):
            raise ValueError(f"peak learning rate must be positive and finite, got {self.peak}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if list(self.boundaries) != sorted(self.boundaries):
            raise ValueError(f"decay boundaries must be increasing, got {list(self.boundaries)}")
        if not 0 < self.decay_factor <= 1:
            raise ValueError(f"decay_factor must be in (0, 1], got {self.decay_factor}")

    @classmethod
    def from_epochs(
        cls,
        *,
        base_lr: float,
        batch_size: int,
        steps_per_epoch: int,
        warmup_epochs: float,
        decay_epochs: Sequence[float],
        decay_factor: float,
    ) -> StepSchedule:
        return cls(
            peak=peak_lr(base_lr, batch_size),
            warmup_steps=warmup_epochs * steps_per_epoch,
            boundaries=tuple(math.floor(e * steps_per_epoch) for e in decay_epochs),
            decay_factor=decay_factor,
        )

    @classmethod
    def from_config(cls, config: PretrainConfig, steps_per_epoch: int) -> StepSchedule:
        return cls.from_epochs(
            base_lr=config.base_lr,
            batch_size=config.batch_size,
            steps_per_epoch=steps_per_epoch,
            warmup_epochs=config.warmup_epochs,
            decay_epochs=config.decay_epochs,
            decay_factor=config.decay_factor,
        )

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.peak * step / self.warmup_steps
        decays = sum(step >= b for b in self.boundaries)
        return self.peak * self.decay_factor**decays


@dataclass(frozen=True)
class CosineSchedule:
    """``lr(step)``: the same linear warm-up as :class:`StepSchedule`, then
    ``peak · (1 + cos(π · t)) / 2`` with ``t`` the fraction of the post-warm-up steps done, reaching
    0 at ``total_steps`` (Loshchilov & Hutter, 2017, without restarts).
    """

    peak: float
    warmup_steps: float
    total_steps: int

    def __post_init__(self) -> None:
        if self.peak <= 0 or not math.isfinite(self.peak):
            raise ValueError(f"peak learning rate must be positive and finite, got {self.peak}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps={self.total_steps}), "
                f"got {self.warmup_steps}"
            )

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return self.peak * step / self.warmup_steps
        done = min((step - self.warmup_steps) / (self.total_steps - self.warmup_steps), 1.0)
        return self.peak * 0.5 * (1.0 + math.cos(math.pi * done))


Schedule = StepSchedule | CosineSchedule


def build_schedule(config: PretrainConfig, steps_per_epoch: int) -> Schedule:
    """The schedule ``config.schedule`` names. Cosine spans ``epochs`` (not ``max_steps``), so a
    run stopped early follows the first steps of the full run."""
    if config.schedule == "cosine":
        return CosineSchedule(
            peak=peak_lr(config.base_lr, config.batch_size),
            warmup_steps=config.warmup_epochs * steps_per_epoch,
            total_steps=config.epochs * steps_per_epoch,
        )
    return StepSchedule.from_config(config, steps_per_epoch)


def total_steps(config: PretrainConfig, steps_per_epoch: int) -> int:
    """Updates in the whole run: ``epochs * steps_per_epoch``, capped by ``max_steps``."""
    steps = config.epochs * steps_per_epoch
    return min(steps, config.max_steps) if config.max_steps is not None else steps
