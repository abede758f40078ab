"""Every task and backbone through the engine, on CPU and (where present) CUDA: repeated runs
and a resumed run give bit-identical checkpoints (CUDA kernels under deterministic mode and CUDA
RNG states included); on CUDA also bf16 autocast and ``torch.compile``.

MLflow is beside the point here (and absent from the GPU machine's image), so these runs record
to an in-memory stand-in for :class:`ssltk.tracking.TrackedRun`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from demo_images import demo_imagefolder

from ssltk import tracking
from ssltk.config import load_config
from ssltk.data.prepare import prepare
from ssltk.train.engine import pretrain

CUDA = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@dataclass
class RecordedRun:
    """What the engine logs, kept in memory."""

    run_id: str = "in-memory"
    experiment_id: str = "0"
    tracking_uri: str = "memory:"
    rows: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    status: str = "RUNNING"

    def log_metrics(self, rows) -> None:
        self.rows.extend((step, dict(values)) for step, values in rows)

    def log_artifact(self, path: Path, artifact_dir: str) -> None:
        assert path.is_file()

    def finish(self, status: str = "FINISHED", failure: str | None = None) -> None:
        self.status = status

    def losses(self) -> list[float]:
        return [values["train/loss"] for _, values in self.rows if "train/loss" in values]


@pytest.fixture(scope="module")
def params(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cuda")
    tree = {
        "seed": 1,
        "data": {
            "source": "imagefolder",
            "root": str(demo_imagefolder(root / "images", 4, held_out_split="val")),
            "val_fraction": 0,
            "prepared_dir": str(root / "prepared"),
        },
        "model": {"widening": 1},
        "pretext": {
            "input_size": 32,
            "exemplar": {"copies": 4, "embed_dim": 32},
            "jigsaw": {"embed_dim": 16, "hidden": 32, "perm_subset": 4},
            "relative_patch_location": {"embed_dim": 16, "hidden": 32},
        },
        "pretrain": {
            "epochs": 1,
            "batch_size": 8,
            "warmup_epochs": 0,
            "decay_epochs": [0.6],
            "checkpoint_every": 2,
            "keep_checkpoints": 5,
            "log_every": 1,
        },
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    prepare(load_config(path), progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP barriers stall on a shared two-core machine
    yield path
    torch.set_num_threads(threads)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[RecordedRun]:
    runs: list[RecordedRun] = []

    def start(*args, **kwargs) -> RecordedRun:
        runs.append(RecordedRun())
        return runs[-1]

    monkeypatch.setattr(tracking, "start_pretrain_run", start)
    return runs


def run(params: Path, out: Path, *overrides: str) -> Path:
    return pretrain(load_config(params, list(overrides)), out).checkpoint


def digest(path: Path) -> str:
    return path.with_name(path.name + ".sha256").read_text().split()[0]


@pytest.mark.parametrize("arch", ["resnet50_v1", "revnet50"])
@pytest.mark.parametrize("task", ["rotation", "exemplar", "jigsaw", "relative_patch_location"])
@pytest.mark.parametrize("device", DEVICES)
def test_runs_repeat_and_resume_bit_for_bit(params, recorded, tmp_path, device, task, arch):
    cell = [
        f"pretrain.device={device}",
        f"pretext.task={task}",
        f"model.arch={arch}",
        "pretrain.max_steps=4",
    ]
    first = run(params, tmp_path / "a", *cell)
    again = run(params, tmp_path / "b", *cell)
    assert digest(first) == digest(again)
    run(params, tmp_path / "c", *cell[:-1], "pretrain.max_steps=2")
    resumed = run(params, tmp_path / "c", *cell)  # continues from step 2
    assert digest(resumed) == digest(first)
    assert all(math.isfinite(loss) for r in recorded for loss in r.losses())
    assert [r.status for r in recorded] == ["FINISHED"] * 4


@pytest.mark.parametrize("task", ["rotation", "jigsaw"])
def test_files_storage_runs_repeat_and_resume_bit_for_bit(params, recorded, tmp_path, task):
    """The original images (an ImageList per batch) through the engine, as ImageNet is fed."""
    files = [f"data.prepared_dir={tmp_path / 'files'}", "data.max_in_memory_images=1"]
    assert prepare(load_config(params, files), progress=False)["storage"] == "files"
    cell = [*files, f"pretext.task={task}", "model.arch=resnet50_v1", "pretrain.max_steps=4"]
    first = run(params, tmp_path / "a", *cell)
    assert digest(first) == digest(run(params, tmp_path / "b", *cell))
    run(params, tmp_path / "c", *cell[:-1], "pretrain.max_steps=2")
    assert digest(run(params, tmp_path / "c", *cell)) == digest(first)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_autocast_trains_close_to_fp32(params, recorded, tmp_path):
    cell = ["pretrain.device=cuda", "pretext.task=rotation", "pretrain.max_steps=3"]
    run(params, tmp_path / "fp32", *cell)
    run(params, tmp_path / "bf16", *cell, "pretrain.precision=bf16")
    fp32, bf16 = recorded[0].losses(), recorded[1].losses()
    assert len(bf16) == 3 and all(math.isfinite(x) for x in bf16)
    assert bf16[0] == pytest.approx(fp32[0], rel=3e-2)  # same weights, same batch
    assert bf16[0] != fp32[0]  # autocast really ran in bf16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_step_matches_eager(params, recorded, tmp_path):
    cell = ["pretrain.device=cuda", "pretext.task=rotation", "pretrain.max_steps=2"]
    run(params, tmp_path / "eager", *cell)
    run(params, tmp_path / "compiled", *cell, "pretrain.compile=true")
    eager, compiled = recorded[0].losses(), recorded[1].losses()
    # cuDNN runs fp32 convolutions in TF32 by default and inductor picks other kernels and
    # layouts, so the two agree to TF32 precision compounded over 50 layers, not to fp32
    # rounding (on an H200: 0.7% at step 0; eager CUDA vs CPU differ by 0.2% already).
    assert compiled == pytest.approx(eager, rel=2e-2)
    assert all(math.isfinite(x) for x in compiled)
