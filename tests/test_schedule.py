"""The pretraining LR schedule (paper §5.1): linear scaling, warm-up ramp from 0, step decays."""

from __future__ import annotations

import itertools
import math

import pytest

from ssltk.config import PretrainConfig
from ssltk.train.schedule import (
    CosineSchedule,
    StepSchedule,
    build_schedule,
    peak_lr,
    total_steps,
)

IMAGENET_TRAIN = 1_231_121


def released(batch: int, base: float = 0.1) -> StepSchedule:
    return StepSchedule.from_epochs(
        base_lr=base,
        batch_size=batch,
        steps_per_epoch=IMAGENET_TRAIN // batch,  # the last partial batch is dropped
        warmup_epochs=5,
        decay_epochs=[15, 25],
        decay_factor=0.1,
    )


def test_linear_scaling_counts_images_per_256():
    assert peak_lr(0.1, 64) == pytest.approx(0.025)
    assert peak_lr(0.1, 128) == pytest.approx(0.05)
    assert peak_lr(0.1, 512) == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("batch", "warmup", "decays"),
    [(64, 96_180, (288_540, 480_900)), (128, 48_090, (144_270, 240_450))],
)
def test_released_config_step_counts(batch: int, warmup: int, decays: tuple[int, int]):
    schedule = released(batch)
    peak = peak_lr(0.1, batch)
    assert schedule.warmup_steps == warmup
    assert schedule.boundaries == decays
    assert schedule(0) == 0.0
    assert schedule(warmup // 2) == pytest.approx(peak / 2)
    assert schedule(warmup - 1) == pytest.approx(peak * (warmup - 1) / warmup)
    assert schedule(warmup) == pytest.approx(peak)  # the ramp reaches the full rate
    assert schedule(decays[0] - 1) == pytest.approx(peak)
    assert schedule(decays[0]) == pytest.approx(peak * 0.1)
    assert schedule(decays[1] - 1) == pytest.approx(peak * 0.1)
    assert schedule(decays[1]) == pytest.approx(peak * 0.01)


def test_fractional_epochs_and_no_warmup():
    schedule = StepSchedule.from_epochs(
        base_lr=0.256,
        batch_size=256,
        steps_per_epoch=10,
        warmup_epochs=0,
        decay_epochs=[0.55, 2],
        decay_factor=0.5,
    )
    assert schedule.boundaries == (5, 20)
    assert [schedule(s) for s in (0, 4, 5, 19, 20)] == pytest.approx(
        [0.256, 0.256, 0.128, 0.128, 0.064]
    )


def test_ramp_is_linear_in_the_step():
    schedule = StepSchedule(peak=1.0, warmup_steps=4, boundaries=(), decay_factor=0.1)
    assert [schedule(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_from_config_and_total_steps():
    config = PretrainConfig(batch_size=32, base_lr=0.2, warmup_epochs=1, decay_epochs=[2], epochs=3)
    schedule = StepSchedule.from_config(config, steps_per_epoch=7)
    assert schedule.peak == pytest.approx(0.025)
    assert schedule.warmup_steps == 7 and schedule.boundaries == (14,)
    assert total_steps(config, 7) == 21
    assert total_steps(config.model_copy(update={"max_steps": 5}), 7) == 5
    assert total_steps(config.model_copy(update={"max_steps": 500}), 7) == 21


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"peak": 0.0}, "peak"),
        ({"peak": float("inf")}, "peak"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"boundaries": (5, 2)}, "boundaries"),
        ({"decay_factor": 0.0}, "decay_factor"),
    ],
)
def test_bad_schedules_name_the_argument(kwargs: dict, culprit: str):
    args = {"peak": 0.1, "warmup_steps": 2, "boundaries": (3,), "decay_factor": 0.1, **kwargs}
    with pytest.raises(ValueError, match=culprit):
        StepSchedule(**args)


def test_a_negative_step_is_an_error():
    with pytest.raises(ValueError, match="step"):
        released(64)(-1)


# --------------------------------------------------------------------------------------------------
# Cosine (an option, not in the paper)


def test_cosine_ramps_like_step_then_follows_half_a_cosine_to_zero():
    config = PretrainConfig(
        schedule="cosine", batch_size=64, base_lr=0.4, warmup_epochs=1, epochs=5
    )
    schedule = build_schedule(config, steps_per_epoch=4)
    assert isinstance(schedule, CosineSchedule)
    assert (schedule.peak, schedule.warmup_steps, schedule.total_steps) == (0.1, 4, 20)
    assert [schedule(s) for s in range(5)] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    assert schedule(8) == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)) / 2)
    assert schedule(12) == pytest.approx(0.05)  # half-way through the decay
    assert schedule(19) == pytest.approx(0.1 * (1 + math.cos(math.pi * 15 / 16)) / 2)
    assert schedule(20) == 0.0 and schedule(25) == 0.0
    rates = [schedule(s) for s in range(4, 21)]
    assert all(a > b for a, b in itertools.pairwise(rates))


def test_cosine_spans_epochs_not_max_steps_and_step_is_the_default():
    config = PretrainConfig(schedule="cosine", warmup_epochs=0, epochs=3, max_steps=5)
    assert build_schedule(config, steps_per_epoch=10).total_steps == 30
    assert isinstance(build_schedule(PretrainConfig(), 10), StepSchedule)


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [({"peak": -1.0}, "peak"), ({"warmup_steps": 10}, "warmup_steps")],
)
def test_bad_cosine_schedules_name_the_argument(kwargs: dict, culprit: str):
    with pytest.raises(ValueError, match=culprit):
        CosineSchedule(**{"peak": 0.1, "warmup_steps": 2, "total_steps": 10, **kwargs})


def test_cosine_makes_epochs_part_of_a_checkpoints_trajectory():
    from ssltk.config import Config
    from ssltk.train.resume import trajectory

    step, cosine = Config(), Config(pretrain=PretrainConfig(schedule="cosine"))
    assert "pretrain.epochs" not in trajectory(step)  # step decays: more epochs extend the run
    assert trajectory(cosine)["pretrain.epochs"] == 35  # cosine: they change every step's rate
