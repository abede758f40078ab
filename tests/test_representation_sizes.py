"""The width × representation-size study (paper section 3.9) through ``dvc repro``: its own cells
(``runs/<cell>-r<size>``) and the report's plot of accuracy against representation size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from demo_images import demo_imagefolder
from test_train_dvc import dvc, project_copy
from typer.testing import CliRunner

from ssltk import store, tracking
from ssltk.cli import app
from ssltk.config import load_config
from ssltk.report import sizes
from ssltk.report.results import collect

pytestmark = pytest.mark.slow


def test_two_widenings_by_two_representation_sizes_run_through_dvc_and_are_plotted(
    tmp_path: Path,
):
    repo = project_copy(tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(
        source="imagefolder",
        root=str(demo_imagefolder(tmp_path / "images", 6, 2)),
        val_fraction=0,
    )
    params["study"].update(
        tasks=["rotation"], archs=["resnet50_v2"], widenings=[1, 2], representation_sizes=[8, 16]
    )
    params["pretrain"].update(batch_size=8, max_steps=2, checkpoint_every=2)
    params["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "sizes"}
    params["eval"] = {"layers": ["pre_logits"], "lbfgs": {"l2": [0.1], "max_iter": 20}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    listed = dvc("stage", "list", "--name-only", cwd=repo).stdout.split()
    cells = [f"rotation-resnet50_v2-{k}-{size}" for k in (1, 2) for size in (8, 16)]
    for stage in ("pretrain-rs", "eval-rs", "baseline-rs"):
        assert {n for n in listed if n.startswith(f"{stage}@")} == {
            f"{stage}@{cell}" for cell in cells
        }
    repro = dvc("repro", "eval-rs", "baseline-rs@rotation-resnet50_v2-1-8", cwd=repo)
    assert repro.returncode == 0, repro.stdout[-2000:] + repro.stderr[-2000:]

    figures = {}
    client = store.client(params["tracking"]["uri"])
    for k in (1, 2):
        for size in (8, 16):
            folder = repo / "runs" / f"rotation-resnet50_v2-w{k}-r{size}"
            run = client.get_run(json.loads((folder / "run.json").read_text())["run_id"])
            assert run.data.params["model.representation_size"] == str(size)
            assert run.data.tags[tracking.TAG_REPRESENTATION_SIZE] == str(size)
            evaluated = json.loads((folder / "eval" / "metrics.json").read_text())
            assert evaluated["representation_size"] == size
            figures[k, size] = evaluated["layers"]["pre_logits"]["top1"]
    base = json.loads(
        (repo / "runs" / "baseline-rotation-resnet50_v2-w1-r8" / "metrics.json").read_text()
    )

    config = load_config(repo / "params.yaml")
    sized = collect(config, repo / "runs", representation_sizes=True)
    assert sizes.series(sized, "lbfgs") == {
        ("rotation", "resnet50_v2", 1): [
            (8, figures[1, 8], base["layers"]["pre_logits"]["top1"]),
            (16, figures[1, 16], None),
        ],
        ("rotation", "resnet50_v2", 2): [(8, figures[2, 8], None), (16, figures[2, 16], None)],
    }
    report = CliRunner().invoke(
        app,
        [
            "report",
            "--params",
            str(repo / "params.yaml"),
            "--runs",
            str(repo / "runs"),
            "--out",
            str(repo / "reports"),
        ],
    )
    assert report.exit_code == 0, report.output
    png = repo / "reports" / sizes.PLOT
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (repo / "reports" / "results.md").read_text()
    assert "## Width × representation size" in text
    assert f"| 2 | {100 * figures[2, 8]:.1f} / – | {100 * figures[2, 16]:.1f} / – |" in text
    # The main study's cells were not run: reported as missing, not mixed up with these.
    assert "rotation-resnet50_v2-w1: not reported" in report.output
