"""Each pretext task trains a tiny backbone on real CIFAR-10 images and its loss falls."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssltk.config import Config, config_from_dict
from ssltk.data.rng import batch_key, sample_keys
from ssltk.pretext import TASKS, build_task

CIFAR_MINI = Path(__file__).resolve().parents[2] / "shared/data/cifar10-mini.tar.gz"
NUM_IMAGES = 8
STEPS = 30


@pytest.fixture(scope="module")
def cifar_images() -> torch.Tensor:
    """The first ``NUM_IMAGES`` training JPEGs of cifar10-mini, one per class where possible."""
    if not CIFAR_MINI.is_file():
        pytest.skip(f"real-image data {CIFAR_MINI} is absent")
    images: dict[str, np.ndarray] = {}
    with tarfile.open(CIFAR_MINI) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or "train" not in parts or parts[-2] in images:
                continue
            with Image.open(io.BytesIO(archive.extractfile(member).read())) as image:
                images[parts[-2]] = np.asarray(image.convert("RGB"))
            if len(images) == NUM_IMAGES:
                break
    return torch.from_numpy(np.stack(list(images.values()))).permute(0, 3, 1, 2).contiguous()


@pytest.fixture
def single_thread():
    # The CI box has 2 shared cores; intra-op threads only add contention for these tiny models.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(task: str) -> Config:
    small_head = {"embed_dim": 32, "hidden": 64}
    return config_from_dict(
        {
            "seed": 0,
            "model": {"arch": "resnet50_v1", "widening": 1, "memory_saving": False},
            "pretext": {
                "task": task,
                "input_size": 32,
                "exemplar": {"embed_dim": 32, "copies": 4},
                "jigsaw": small_head,
                "relative_patch_location": small_head,
            },
        }
    )


def train_losses(task_name: str, images: torch.Tensor) -> list[float]:
    """Losses of ``STEPS`` SGD steps on one fixed batch (same keys and batch key every step)."""
    torch.manual_seed(0)
    task = build_task(tiny_config(task_name))
    task.train()
    optimizer = torch.optim.SGD(task.param_groups(1e-4), lr=0.05, momentum=0.9)
    keys = sample_keys(0, 0, torch.arange(images.shape[0]))
    batch = task.prepare_batch(images, keys, batch_key(0, 0, 0), train=True)
    losses = []
    for _ in range(STEPS):
        output = task(batch)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("task_name", TASKS)
def test_pretext_loss_falls_on_real_images(task_name, cifar_images, single_thread):
    losses = train_losses(task_name, cifar_images)
    assert all(np.isfinite(losses)), losses
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.8 * first, f"{task_name}: loss {first:.3f} → {last:.3f} ({losses})"
