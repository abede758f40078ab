"""Noise controls (``ssltk control``): noise images, the verdict, the command and the report."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_extension import ToyFlip
from test_report import cells
from torch import nn
from typer.testing import CliRunner

from ssltk.cli import app
from ssltk.config import Config, load_config
from ssltk.control.result import (
    ControlResult,
    controls_markdown,
    read_controls,
    verdict_of,
    write_control,
)
from ssltk.control.run import noise_images, noise_originals, run_control
from ssltk.data.augment import central_crop_boxes, crop_and_resize, resize_grid
from ssltk.data.image_list import ImageList
from ssltk.data.sources import resize_and_center_crop
from ssltk.errors import UserError
from ssltk.models import ArchConfig, register_arch, unregister_arch
from ssltk.pretext import PretextInputs, register_task, unregister_task
from ssltk.pretext.base import backbone_from_config
from ssltk.report.tables import markdown

ROOT = Path(__file__).resolve().parents[1]


def result(task: str = "rotation", score: float = 0.25, verdict: str = "clean") -> ControlResult:
    return ControlResult(
        task=task,
        arch="revnet50",
        metric="accuracy",
        chance=0.25,
        score=score,
        score_sem=0.004,
        p_value=0.5,
        verdict=verdict,
        steps=100,
        batch_size=64,
        held_out_images=512,
        image_size=32,
        noise_size=32,
        settings={"preprocessing": "symmetric", "crop": "center"},
        curve=[(10, 0.26), (20, 0.25)],
    )


def test_noise_images_depend_on_seed_namespace_and_index_only():
    whole = noise_images(3, 0, range(0, 8), 16)
    assert whole.dtype == torch.uint8 and whole.shape == (8, 3, 16, 16)
    assert torch.equal(noise_images(3, 0, range(4, 8), 16), whole[4:])
    assert not torch.equal(noise_images(3, 1, range(0, 8), 16), whole)
    assert not torch.equal(noise_images(4, 0, range(0, 8), 16), whole)
    # Every grey level, roughly uniformly: i.i.d. uniform noise.
    counts = torch.bincount(whole.flatten().long(), minlength=256)
    assert counts.min() > 0 and abs(whole.float().mean().item() - 127.5) < 4  # 4 standard errors


def test_noise_drawn_at_another_size_is_stored_as_prepare_stores_an_image():
    native = noise_images(3, 0, range(2), 8)
    upsampled = noise_images(3, 0, range(2), 16, native_size=8)
    for i in range(2):
        pil = Image.fromarray(native[i].permute(1, 2, 0).numpy())
        assert np.array_equal(upsampled[i].numpy(), resize_and_center_crop(pil, 16))


def test_verdict_is_a_one_sided_test_against_chance():
    rng = np.random.default_rng(0)
    at_chance = 0.25 + rng.normal(0, 0.02, 16)
    assert verdict_of("rotation", at_chance, 0.25)[1] == "clean"
    above = 0.30 + rng.normal(0, 0.02, 16)
    p, verdict = verdict_of("rotation", above, 0.25)
    assert verdict == "leaks" and p < 1e-3
    assert verdict_of("rotation", 0.2 + rng.normal(0, 0.02, 16), 0.25)[1] == "clean"
    assert verdict_of("rotation", np.full(8, 0.25), 0.25) == (1.0, "clean")  # a constant guess
    assert verdict_of("rotation", np.full(8, 0.5), 0.25) == (0.0, "leaks")
    assert verdict_of("exemplar", above, 0.25) == (None, "n/a")


def test_control_files_round_trip_and_a_bad_one_is_named(tmp_path: Path):
    write_control(result(), tmp_path / "control-rotation")
    write_control(result("jigsaw", 0.012, "clean"), tmp_path / "control-jigsaw")
    assert [r.task for r in read_controls(tmp_path)] == ["jigsaw", "rotation"]
    assert read_controls(tmp_path)[1] == result()
    (tmp_path / "control-bad").mkdir()
    (tmp_path / "control-bad" / "control.json").write_text('{"task": 1}')
    with pytest.raises(UserError, match=r"control-bad/control\.json"):
        read_controls(tmp_path)


def test_report_shows_each_cells_noise_control_and_the_controls_table():
    leak = result(score=0.98, verdict="leaks")
    text = markdown(cells(), Config(), "lbfgs", {"commit": "abc"}, [leak])
    assert "pretext metric on noise, chance" in text
    pretext_rows = [line for line in text.splitlines() if "| accuracy |" in line]
    rotation_row = next(line for line in pretext_rows if line.startswith("| rotation |"))
    assert rotation_row.endswith("| 98.0 % (chance 25.0 %) |")
    jigsaw_row = next(line for line in pretext_rows if line.startswith("| jigsaw |"))
    assert jigsaw_row.endswith("| – |")  # no control for that task
    assert "## Noise controls" in text and "**LEAKS**" in text
    assert "preprocessing symmetric, crop center" in text
    assert controls_markdown([]) == ""


TASK, ARCH = "toy_mirror", "toy_local_energy"


class LocalEnergy(nn.Module):
    """conv → square → flatten → linear: a position-aware read-out of local sharpness."""

    def __init__(self, config: ArchConfig) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        size = config.input_size
        self.logits = nn.Linear(4 * size * size, config.num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pre_logits = self.conv(x).square().flatten(1)
        return {"pre_logits": pre_logits, "logits": self.logits(pre_logits)}


class ToyMirror(ToyFlip):
    """test_extension's toy flip task, its centre crop now 87.5 % resized back up through the real
    resize of ``pretext.preprocessing``: a one-dimensional Rotation."""

    config_section = None

    def __init__(self, backbone: nn.Module, size: int, grid: str) -> None:
        super().__init__(backbone, size)
        self.grid = grid

    @classmethod
    def from_config(cls, config: Config) -> ToyMirror:
        size = config.pretext.input_size
        backbone = backbone_from_config(config, num_classes=2, patch_mode=False, input_size=size)
        return cls(backbone, size, resize_grid(config.pretext.preprocessing))

    def prepare_batch(self, images, keys, batch_key, *, train):
        boxes = central_crop_boxes((self.crop_size,) * 2, 0.875, images.shape[0])
        x = crop_and_resize(images.float() / 255, boxes, self.crop_size, grid=self.grid)
        labels = torch.arange(2).repeat(images.shape[0])
        return PretextInputs(torch.stack([x, x.flip(-1)], 1).flatten(0, 1), labels)


@pytest.fixture
def toy_mirror() -> Iterator[None]:
    register_arch(ARCH)(LocalEnergy)
    register_task(TASK)(ToyMirror)
    try:
        yield
    finally:
        unregister_task(TASK)
        unregister_arch(ARCH)


def control(tmp_path: Path, *sets: str):
    toy = [f"pretext.task={TASK}", f"model.arch={ARCH}", "data.image_size=16"]
    short = ["pretext.input_size=16", "control.steps=60", "control.held_out_batches=8"]
    args = [f"--set={s}" for s in (*toy, *short, *sets)]
    params = ["--params", str(ROOT / "params.yaml"), "--out", str(tmp_path)]
    return CliRunner().invoke(app, ["control", *params, *args, "--fail-on-leak"])


def test_the_control_catches_a_resize_leak_and_passes_its_fix(tmp_path: Path, toy_mirror):
    leaky = control(tmp_path / "tf1", "pretext.preprocessing=tf1")
    assert leaky.exit_code == 4, leaky.output
    found = json.loads((tmp_path / "tf1" / "control.json").read_text())
    assert found["verdict"] == "leaks" and found["score"] > 0.6
    assert "LEAKS" in leaky.output and "solvable on noise" in leaky.output
    clean = control(tmp_path / "default")
    assert clean.exit_code == 0, clean.output
    found = json.loads((tmp_path / "default" / "control.json").read_text())
    assert found["verdict"] == "clean" and found["score"] < 0.56
    assert found["settings"]["preprocessing"] == "symmetric"
    assert found["held_out_images"] == 8 * 64 and found["steps"] == 60
    assert len(found["curve"]) == 6  # one point per 10 steps


def test_noise_originals_are_whole_images_of_the_configured_aspect():
    landscape = noise_originals(3, 0, range(4), 12, 4 / 3)
    assert isinstance(landscape, ImageList) and len(landscape) == 4
    assert all(image.shape == (3, 12, 16) and image.dtype == torch.uint8 for image in landscape)
    portrait = noise_originals(3, 0, range(4), 12, 3 / 4)
    assert all(image.shape == (3, 16, 12) for image in portrait)
    # The same seeds as square noise: image i depends on (seed, namespace, i) only.
    assert torch.equal(noise_originals(3, 0, range(2, 4), 12, 4 / 3)[0], landscape[2])
    assert not torch.equal(noise_originals(3, 1, range(1), 12, 4 / 3)[0], landscape[0])


@pytest.fixture
def toy_arch() -> Iterator[None]:
    register_arch(ARCH)(LocalEnergy)
    try:
        yield
    finally:
        unregister_arch(ARCH)


def test_the_control_on_landscape_originals_sees_the_released_boxes_squeeze(tmp_path, toy_arch):
    """Rotation's own files-storage crop of 4:3 noise: the released centre box squeezes the
    original into the square input, which rot90 turns sideways (fixed under ``symmetric``)."""
    sets = [
        f"model.arch={ARCH}",
        "pretext.task=rotation",
        "pretext.rotation.crop=center",
        "control.noise_aspect=1.333",
        "control.steps=60",
        "control.held_out_batches=4",
    ]
    verdicts = {}
    for geometry in ("tf1", "symmetric"):
        config = load_config(ROOT / "params.yaml", [*sets, f"pretext.preprocessing={geometry}"])
        found = run_control(config)
        verdicts[geometry] = (found.verdict, round(found.score, 3))
        assert found.settings["noise originals"] == "32×43 px (aspect 1.333)"
    assert verdicts["tf1"][0] == "leaks", verdicts
    assert verdicts["symmetric"][0] == "clean", verdicts
