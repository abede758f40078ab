"""Patch jitter (paper §2.3): each training patch is shifted inside its cell by a random offset in
``0..jitter`` on each axis, every value including ``jitter`` itself drawn; evaluation patches sit
at the centre offset ``jitter // 2``.

The crop equals the resized side here, so the random crop has a single position (0, 0) and every
patch's top-left corner is its cell's corner plus its jitter: what the tasks hand to
``extract_patches`` shows the jitter directly.
"""

from __future__ import annotations

import pytest
import torch

from ssltk.config import config_from_dict
from ssltk.data.rng import sample_keys
from ssltk.pretext import build_task
from ssltk.pretext import patches as patches_module
from ssltk.pretext.patches import grid_offsets

SIDE, GRID = 30, 3  # cells of 10 px
IMAGES = 96  # 96 images × 9 patches × 2 axes = 1728 draws per layout


def patch_task(task: str, jitter: int, preprocessing: str = "symmetric"):
    pretext = {
        "task": task,
        "input_size": 32,
        "preprocessing": preprocessing,
        "patches": {"resize": SIDE, "crop": SIDE, "grid": GRID, "jitter": jitter},
        task: {"embed_dim": 8, "hidden": 16},
    }
    model = {"arch": "resnet50_v1", "widening": 1}
    return build_task(config_from_dict({"model": model, "pretext": pretext}))


@pytest.fixture
def offsets_seen(monkeypatch):
    """The ``[B, P, 2]`` offsets of every ``extract_patches`` call a task makes."""
    seen = []
    original = patches_module.extract_patches

    def spy(images, offsets, gray, patch_size, **kw):
        seen.append((offsets.clone(), patch_size))
        return original(images, offsets, gray, patch_size, **kw)

    monkeypatch.setattr(patches_module, "extract_patches", spy)
    return seen


def jitters(task, offsets_seen, *, train: bool) -> torch.Tensor:
    images = torch.randint(0, 256, (IMAGES, 3, 32, 32), dtype=torch.uint8)
    keys = sample_keys(7, 0, torch.arange(IMAGES))
    offsets_seen.clear()
    task.sample_patches(images, keys, train=train)
    (offsets, patch), *rest = offsets_seen
    assert not rest and patch == task.layout.patch
    cells = grid_offsets(GRID, SIDE // GRID)
    return offsets - cells[None]


@pytest.mark.parametrize(
    ("task_name", "jitter", "preprocessing"),
    [
        ("jigsaw", 4, "symmetric"),
        ("relative_patch_location", 4, "symmetric"),
        ("jigsaw", 1, "tf1"),
        ("relative_patch_location", 3, "tf1"),
    ],
)
def test_training_jitter_draws_every_offset_from_0_to_jitter(
    task_name, jitter, preprocessing, offsets_seen
):
    task = patch_task(task_name, jitter, preprocessing)
    assert (task.layout.cell, task.layout.jitter) == (SIDE // GRID, jitter)
    shift = jitters(task, offsets_seen, train=True)
    for axis in (0, 1):
        values = shift[..., axis].unique().tolist()
        assert values == list(range(jitter + 1)), f"axis {axis}: {values}"
    # Patches of one image are jittered independently (not one shift for the whole grid).
    assert (shift != shift[:, :1]).any(dim=(1, 2)).float().mean() > 0.9
    # The largest offset keeps the patch inside its cell: jitter + patch = cell.
    assert shift.max() + task.layout.patch == task.layout.cell


@pytest.mark.parametrize("jitter", [0, 4])
def test_eval_patches_sit_at_the_centre_offset_and_jitter_0_never_moves(jitter, offsets_seen):
    task = patch_task("jigsaw", jitter)
    eval_shift = jitters(task, offsets_seen, train=False)
    assert (eval_shift == jitter // 2).all()
    train_shift = jitters(task, offsets_seen, train=True)
    if jitter == 0:
        assert (train_shift == 0).all()
