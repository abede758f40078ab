"""Extending ssltk from outside: a pretext task, a backbone, a probe and a data source registered
by this module alone.

Nothing in ssltk names them; the CLI's own config path accepts them, the task's and the probe's
config sections are validated by their own models, the engine pretrains the task, ``ssltk
prepare`` reads the source and ``ssltk eval`` runs the probe. The registries are left as found.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from pydantic import Field
from torch import nn
from typer.testing import CliRunner

from ssltk.cli import app
from ssltk.cliutils import read_config
from ssltk.config import Config, PositiveInt, Section
from ssltk.data.augment import center_crop_offsets, crop, to_minus1_1
from ssltk.data.sources import ArraySplit, Source, register_source, unregister_source
from ssltk.evaluate.probe import Figures, ProbeInputs, register_probe, unregister_probe
from ssltk.models import ArchConfig, arch_names, build_model, register_arch, unregister_arch
from ssltk.pretext import (
    PretextInputs,
    PretextTask,
    TaskOutput,
    register_task,
    registered_tasks,
    unregister_task,
)
from ssltk.pretext.base import backbone_from_config, select_endpoints

TASK, ARCH = "toy_flip", "toy_convnet"


class ToyConvNet(nn.Module):
    """conv → ReLU → global average pool → linear: endpoints ``block1, pre_logits, logits``."""

    def __init__(self, config: ArchConfig) -> None:
        super().__init__()
        self.config = config
        width = 4 * config.widening
        self.block1 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.logits = nn.Linear(width, config.num_classes) if config.num_classes else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        endpoints = {"block1": self.block1(x)}
        endpoints["pre_logits"] = endpoints["block1"].mean(dim=(2, 3))
        if self.logits is not None:
            endpoints["logits"] = self.logits(endpoints["pre_logits"])
        return endpoints


class ToyFlipConfig(Section):
    crop: PositiveInt = Field(24, description="side of the centre crop the network sees")


class ToyFlip(PretextTask):
    """Was the centre crop mirrored left-right? Every image is shown both ways."""

    config_section = ToyFlipConfig

    def __init__(self, backbone: nn.Module, crop_size: int) -> None:
        super().__init__(backbone)
        self.crop_size = crop_size

    @classmethod
    def chance_level(cls, config: Config) -> float:
        return 0.5

    @classmethod
    def from_config(cls, config: Config) -> ToyFlip:
        size = config.pretext.toy_flip.crop
        backbone = backbone_from_config(config, num_classes=2, patch_mode=False, input_size=size)
        return cls(backbone, size)

    def _centre(self, images: torch.Tensor) -> torch.Tensor:
        offsets = center_crop_offsets(tuple(images.shape[-2:]), self.crop_size, images.shape[0])
        return to_minus1_1(crop(images, offsets, self.crop_size))

    def prepare_batch(
        self, images: torch.Tensor, keys: torch.Tensor, batch_key: torch.Tensor, *, train: bool
    ) -> PretextInputs:
        x = self._centre(images)
        labels = torch.arange(2, device=images.device).repeat(images.shape[0])
        return PretextInputs(torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1), labels)

    def forward(self, batch: PretextInputs) -> TaskOutput:
        logits = self.backbone(batch.inputs)["logits"]
        accuracy = (logits.detach().argmax(1) == batch.labels).float().mean()
        return TaskOutput(F.cross_entropy(logits, batch.labels), {"accuracy": accuracy})

    def representation(self, images, layers, *, pool=None, keys=None):
        endpoints = select_endpoints(self.backbone(self._centre(images)), layers)
        return {k: pool(v) if pool else v for k, v in endpoints.items()}


@contextmanager
def registered_toys() -> Iterator[None]:
    register_arch(ARCH)(ToyConvNet)
    register_task(TASK)(ToyFlip)
    try:
        yield
    finally:
        unregister_task(TASK)
        unregister_arch(ARCH)


@pytest.fixture
def toys() -> Iterator[None]:
    with registered_toys():
        yield


def params(tmp_path: Path, cifar_demo: Path, **pretext: object) -> Path:
    """A params file over 2 train and 1 test image per class of the shipped demo images."""
    lines = []
    for split, count in (("train", 2), ("test", 1)):
        for folder in sorted((cifar_demo / split).iterdir()):
            for image in sorted(folder.iterdir())[:count]:
                lines.append(f"{image.relative_to(cifar_demo).as_posix()} {folder.name}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    tree = {
        "data": {
            "source": "imagefolder",
            "root": str(cifar_demo),
            "file_list": str(tmp_path / "list.txt"),
            "val_fraction": 0,
            "prepared_dir": str(tmp_path / "prepared"),
        },
        "model": {"arch": ARCH, "widening": 1},
        "pretext": {"task": TASK, "input_size": 32, **pretext},
        "pretrain": {"epochs": 1, "batch_size": 4, "max_steps": 2, "device": "cpu"},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_a_task_and_a_backbone_registered_here_pretrain_through_the_cli(
    toys, tmp_path: Path, cifar_demo: Path
):
    path = params(tmp_path, cifar_demo, toy_flip={"crop": 20})
    config = read_config(path, [])
    assert (config.model.arch, config.pretext.task) == (ARCH, TASK)
    assert config.pretext.toy_flip == ToyFlipConfig(crop=20)
    assert TASK in config.study.tasks and ARCH in config.study.archs  # defaults: all registered

    runner = CliRunner()
    prepared = runner.invoke(app, ["prepare", "--params", str(path)], catch_exceptions=False)
    assert prepared.exit_code == 0, prepared.output
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["pretrain", "--params", str(path), "--out", str(out)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert (run["status"], run["task"], run["arch"], run["global_step"]) == (
        "finished",
        TASK,
        ARCH,
        2,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and math.isfinite(metrics["loss"])
    assert run["checkpoint"] == "checkpoints/ckpt-00000002.pt"  # relative to the run directory
    assert (out / run["checkpoint"]).is_file()


def config_error(path: Path) -> str:
    """The one ``error:`` line of ``ssltk config`` on ``path``, which must exit 2."""
    result = CliRunner().invoke(app, ["config", "--params", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_the_registered_task_section_keeps_unknown_keys_errors(toys, tmp_path, cifar_demo):
    assert "unknown key 'pretext.toy_flip.size'" in config_error(
        params(tmp_path, cifar_demo, toy_flip={"size": 3})
    )
    error = config_error(params(tmp_path, cifar_demo, toy_flip={"crop": 0}))
    assert "pretext.toy_flip.crop: Input should be greater than 0" in error


def test_unregistering_removes_names_from_the_registries_and_the_schema(tmp_path, cifar_demo):
    before = registered_tasks(), arch_names()
    with registered_toys():
        assert (registered_tasks(), arch_names()) == (before[0] + (TASK,), before[1] + (ARCH,))
    assert (registered_tasks(), arch_names()) == before
    error = config_error(params(tmp_path, cifar_demo))
    assert "model.arch: Input should be 'resnet50_v1'," in error and f"(got '{ARCH}')" in error
    with pytest.raises(ValueError, match=f"arch='{ARCH}'"):
        build_model(ARCH)
    assert TASK not in Config().pretext.model_dump()


PROBE, SOURCE = "toy_centroid", "toy_stripes"


def stripes(count: int, seed: int) -> ArraySplit:
    """Class 0: horizontal stripes, class 1: vertical ones, on noise; 8×8 uint8 images."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count, dtype=np.int64) % 2
    images = rng.integers(0, 64, (count, 3, 8, 8), dtype=np.uint8)
    images[labels == 0, :, ::2, :] += 160
    images[labels == 1, :, :, ::2] += 160
    return ArraySplit(images, labels, f"stripes[{seed}]")


def open_stripes(data, root) -> Source:
    assert root is None  # needs_root=False: data.root is not read
    splits = {"train": stripes(16, 0), "test": stripes(8, 1)}
    return Source(SOURCE, ["horizontal", "vertical"], splits, native_size=8, layout="memory")


class CentroidConfig(Section):
    shrink: float = Field(0.0, ge=0, le=1, description="pull each centroid towards the mean")


def fit_centroids(inputs: ProbeInputs) -> Figures:
    """Nearest class mean of the cached train features, scored on the report split."""
    assert "val" not in inputs.features  # needs_val=False: no val split is asked for
    train, report = inputs.features["train"], inputs.features[inputs.report_split]
    figures = {}
    for layer in inputs.layers:
        x, y = np.asarray(train.layers[layer]), train.labels
        means = np.stack([x[y == c].mean(axis=0) for c in np.unique(y)])
        means = (1 - inputs.section.shrink) * means + inputs.section.shrink * x.mean(axis=0)
        test = np.asarray(report.layers[layer])
        guess = ((test[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
        figures[layer] = {"top1": float((guess == report.labels).mean()), "top5": 1.0}
    return figures


@contextmanager
def registered_probe_and_source() -> Iterator[None]:
    register_source(SOURCE, needs_root=False)(open_stripes)
    register_probe(PROBE, section=CentroidConfig)(fit_centroids)
    try:
        yield
    finally:
        unregister_probe(PROBE)
        unregister_source(SOURCE)


def stripes_params(tmp_path: Path, **eval_: object) -> Path:
    tree = {
        "data": {
            "source": SOURCE,
            "image_size": 8,
            "val_fraction": 0,
            "prepared_dir": str(tmp_path / "prepared"),
        },
        "model": {"arch": ARCH, "widening": 1},
        "pretext": {"task": TASK, "input_size": 8, "toy_flip": {"crop": 6}},
        "eval": {"device": "cpu", "batch_size": 8, **eval_},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_a_probe_and_a_data_source_registered_here_prepare_and_evaluate_through_the_cli(
    toys, tmp_path: Path
):
    before = read_config(None, []).eval.model_dump()
    with registered_probe_and_source():
        path = stripes_params(tmp_path, method=PROBE, toy_centroid={"shrink": 0.5})
        config = read_config(path, [])
        assert config.eval.toy_centroid == CentroidConfig(shrink=0.5)
        runner = CliRunner()
        prepared = runner.invoke(app, ["prepare", "--params", str(path)], catch_exceptions=False)
        assert prepared.exit_code == 0, prepared.output
        out = tmp_path / "baseline"
        result = runner.invoke(
            app,
            ["eval", "--baseline", "--params", str(path), "--out", str(out)],
            catch_exceptions=False,
        )
        assert result.exit_code == 0, result.output
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["method"] == PROBE and 0 <= metrics["layers"]["pre_logits"]["top1"] <= 1
        assert "unknown key 'eval.toy_centroid.size'" in config_error(
            stripes_params(tmp_path, toy_centroid={"size": 1})
        )
    assert read_config(None, []).eval.model_dump() == before
    error = config_error(stripes_params(tmp_path))
    assert "data.source: Input should be 'demo'," in error and f"(got '{SOURCE}')" in error


def test_the_sgd_probe_evaluates_without_a_val_split(toys, tmp_path: Path):
    with registered_probe_and_source():
        sgd = {"epochs": 1, "batch_size": 8, "augment": False}
        path = stripes_params(tmp_path, method="sgd", sgd=sgd)
        runner = CliRunner()
        assert runner.invoke(app, ["prepare", "--params", str(path)]).exit_code == 0
        out = tmp_path / "baseline"
        result = runner.invoke(
            app, ["eval", "--baseline", "--params", str(path), "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        assert json.loads((out / "metrics.json").read_text())["method"] == "sgd"
