"""The pretraining LR schedule (paper §5.1): linear scaling, warm-up ramp from 0, step decays."""

from __future__ import annotations

import pytest

from ssltk.config import PretrainConfig
from ssltk.train.schedule import StepSchedule, peak_lr, steps_per_epoch, total_steps

IMAGENET_TRAIN = 1_231_121


def released(batch: int, base: float = 0.1) -> StepSchedule:
    spe = steps_per_epoch(IMAGENET_TRAIN, batch)
    return StepSchedule.from_epochs(
        base_lr=base,
        batch_size=batch,
        steps_per_epoch=spe,
        warmup_epochs=5,
        decay_epochs=[15, 25],
        decay_factor=0.1,
    )


def test_steps_per_epoch_drops_the_last_partial_batch():
    assert steps_per_epoch(IMAGENET_TRAIN, 64) == 19_236
    assert steps_per_epoch(IMAGENET_TRAIN, 128) == 9_618
    assert steps_per_epoch(10, 3) == 3


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


def test_batch_larger_than_data_and_negative_step_are_errors():
    with pytest.raises(ValueError, match="batch_size=64"):
        steps_per_epoch(10, 64)
    with pytest.raises(ValueError, match="step"):
        released(64)(-1)
