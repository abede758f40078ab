"""Every rank gets its *own* RNG streams back on resume.

Rank r seeds with ``seed + r``, so its dropout masks differ from rank 0's; a checkpoint gathers
every rank's states in rank order and a resumed rank must restore entry ``rank``. A rank that
restores rank 0's states draws rank 0's masks from then on: the run continues, but not the run
that was checkpointed. (That the checkpoint holds each rank's own states, in rank order, is
checked on a real two-process run in ``test_train_e2e``.)
"""

from __future__ import annotations

import random

import numpy as np
import torch

from ssltk.train import resume
from ssltk.train.determinism import seed_everything
from ssltk.train.meters import EpochMeter

WORLD = 2
SEED = 11


def draws() -> list[float]:
    """One number from each global generator a training step may draw from."""
    return [torch.rand(()).item(), float(np.random.rand()), random.random()]


def tiny_optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def checkpoint_of(rng: list) -> dict:
    optimizer = tiny_optimizer()
    return {
        "optimizer": optimizer.state_dict(),
        "epoch_meter": EpochMeter().state_dict(),
        "rng": rng,
        "position": {"global_step": 7, "steps_per_epoch": 4},
    }


def test_restore_gives_each_rank_its_own_entry():
    saved, expected = [], []
    for rank in range(WORLD):
        seed_everything(SEED + rank)
        draws()  # some steps happened before the checkpoint
        saved.append(resume.local_rng_state())
        expected.append(draws())  # what rank r draws next, had it not stopped
    assert expected[0] != expected[1]
    state = checkpoint_of(saved)
    for rank in (1, 0):  # rank 1 first: rank 0's restore must not be what makes it pass
        seed_everything(999)
        step = resume.restore(state, tiny_optimizer(), EpochMeter(), rank)
        assert step == 7
        assert draws() == expected[rank], f"rank {rank} did not get its own RNG state back"
