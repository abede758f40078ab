"""Which checkpoints a run may resume from: one missing an entry a resume reads is not valid, so
the newest *complete* checkpoint is taken instead of crashing on a missing key mid-resume."""

from __future__ import annotations

import pytest

from ssltk.train.checkpoint import CheckpointError
from ssltk.train.resume import CHECKPOINT_FORMAT, check_state

COMPLETE = {
    "format": CHECKPOINT_FORMAT,
    "model": {},
    "optimizer": {},
    "position": {"global_step": 3, "steps_per_epoch": 2},
    "epoch_meter": {},
    "rng": [],
    "trajectory": {},
    "data_hash": "d",
}


def test_a_complete_checkpoint_passes():
    check_state(dict(COMPLETE))


@pytest.mark.parametrize("key", [k for k in COMPLETE if k != "format"])
def test_a_checkpoint_missing_an_entry_is_not_valid(key):
    state = {k: v for k, v in COMPLETE.items() if k != key}
    with pytest.raises(CheckpointError, match=key):
        check_state(state)


@pytest.mark.parametrize("key", ["global_step", "steps_per_epoch"])
def test_a_position_missing_an_entry_is_not_valid(key):
    position = {k: v for k, v in COMPLETE["position"].items() if k != key}
    with pytest.raises(CheckpointError, match=f"position.{key}"):
        check_state({**COMPLETE, "position": position})
