"""What a researcher sees of a study in MLflow and in ``dvc plots``: read back through the REST API
of a started ``mlflow server`` (as the UI reads it) and from the page ``dvc plots show`` writes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from demo_images import demo_imagefolder
from typer.testing import CliRunner

from ssltk import tracking
from ssltk.cli import app
from ssltk.config import load_config
from ssltk.data.dataset import PreparedDataset
from ssltk.data.prepare import prepare
from ssltk.report.study_run import REPORT_ARTIFACT_DIR, SUMMARY_PREFIX

ROOT = Path(__file__).resolve().parents[1]
CELL = "rotation-resnet50_v1-w1"


def _screenshots_module():
    spec = importlib.util.spec_from_file_location("screenshots", ROOT / "scripts/screenshots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


screenshots = _screenshots_module()


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A one-cell study in a workspace of its own: pretrain (2 steps), eval, baseline, report."""
    root = tmp_path_factory.mktemp("view")
    params = {
        "data": {
            "source": "imagefolder",
            "root": str(demo_imagefolder(root / "images", 20, 10)),
            "val_fraction": 0.2,
        },
        "model": {"arch": "resnet50_v1", "widening": 1},
        "pretext": {"task": "rotation", "input_size": 32},
        "pretrain": {"max_steps": 2, "batch_size": 8, "checkpoint_every": 2, "device": "cpu"},
        "eval": {"layers": ["pre_logits"], "lbfgs": {"l2": [0.1, 0.01], "max_iter": 20}},
        "tracking": {"experiment": "view-test"},
        "study": {"tasks": ["rotation"], "archs": ["resnet50_v1"], "widenings": [1]},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cwd = Path.cwd()
    os.chdir(root)  # the study's own layout: runs/, reports/ and mlflow.db in the workspace
    try:
        prepare(load_config(root / "params.yaml"), progress=False)
        for argv in (
            ["pretrain", "--out", f"runs/{CELL}"],
            ["eval", "--run-dir", f"runs/{CELL}"],
            ["eval", "--baseline", "--out", f"runs/baseline-{CELL}"],
            ["report", "--out", "reports"],
        ):
            result = CliRunner().invoke(app, argv)
            assert result.exit_code == 0, (argv, result.output)
    finally:
        os.chdir(cwd)
    run_id = json.loads((root / "runs" / CELL / "run.json").read_text())["run_id"]
    content_hash = PreparedDataset.open(root / "data" / "prepared").content_hash
    return {"root": root, "run_id": run_id, "content_hash": content_hash}


def _git_commit() -> str:
    found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else "unknown"


def _inputs(run: dict) -> dict[str, dict]:
    """``{context: dataset}`` of a run's dataset inputs, as the REST API returns them."""
    out = {}
    for item in run["inputs"].get("dataset_inputs", []):
        tags = {t["key"]: t["value"] for t in item.get("tags", [])}
        out[tags[tracking.MLFLOW_DATASET_CONTEXT]] = item["dataset"]
    return out


@pytest.mark.slow
def test_the_rest_api_shows_a_training_experiment_nested_runs_datasets_and_the_report(study):
    root = study["root"]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with screenshots.mlflow_ui(uri, root / "mlruns") as base:
        experiment = screenshots.api(base, "experiments/get-by-name?experiment_name=view-test")
        tags = {t["key"]: t["value"] for t in experiment["experiment"]["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        eid = experiment["experiment"]["experiment_id"]
        found = screenshots.api(base, "runs/search", {"experiment_ids": [eid]})["runs"]
        runs = {}
        for run in found:
            run["tags"] = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
            runs.setdefault(run["tags"][tracking.TAG_KIND], []).append(run)
        assert {kind: len(r) for kind, r in runs.items()} == {
            "study": 1,
            "pretrain": 1,
            "eval": 1,
            "baseline": 1,
        }
        (study_run,), (pretrain,) = runs["study"], runs["pretrain"]
        (evaluation,), (baseline,) = runs["eval"], runs["baseline"]
        study_id = study_run["info"]["run_id"]
        assert pretrain["info"]["run_id"] == study["run_id"]

        # One expandable row: study → pretraining run → its eval; the baseline under the study.
        parent = tracking.MLFLOW_PARENT_RUN
        assert pretrain["tags"][parent] == study_id and baseline["tags"][parent] == study_id
        assert evaluation["tags"][parent] == study["run_id"]

        digest = study["content_hash"][: tracking.DATASET_DIGEST_CHARS]
        assert _inputs(pretrain).keys() == {"train"}
        assert _inputs(evaluation).keys() == _inputs(baseline).keys() == {"train", "val", "test"}
        for run in (pretrain, evaluation, baseline):
            for context, dataset in _inputs(run).items():
                assert dataset["digest"] == digest
                assert dataset["name"] == f"imagefolder-32px-{context}"
                assert json.loads(dataset["profile"])["content_hash"] == study["content_hash"]
        for run in (study_run, pretrain, evaluation, baseline):
            assert run["tags"][tracking.MLFLOW_GIT_COMMIT] == _git_commit()
            assert run["tags"][tracking.MLFLOW_SOURCE_NAME].startswith("ssltk ")

        listed = screenshots.api(
            base, f"artifacts/list?run_id={study_id}&path={REPORT_ARTIFACT_DIR}"
        )
        names = {Path(f["path"]).name for f in listed["files"]}
        assert {"results.md", "results.csv", "accuracy_by_layer.png"} <= names

        metrics = {m["key"]: m["value"] for m in pretrain["data"]["metrics"]}
        headline = metrics[tracking.probe_metric("lbfgs", 1, "pre_logits")]
        assert metrics[f"{SUMMARY_PREFIX}top1_pre_logits"] == headline
        assert min(metrics) == sorted(k for k in metrics if k.startswith(SUMMARY_PREFIX))[0]
        assert pretrain["tags"]["ssltk.best_layer"] == "pre_logits"


@pytest.mark.skipif(
    shutil.which("dvc", path=str(Path(sys.executable).parent)) is None,
    reason="dvc is not installed",
)
def test_dvc_plots_show_writes_a_page_that_needs_no_network(tmp_path: Path):
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent))
    shown = subprocess.run(
        [dvc, "plots", "show", "--out", str(tmp_path / "plots")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    page = (tmp_path / "plots" / "index.html").read_text()
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")
    for plot in declared:
        image = f"static/workspace_{plot.replace('/', '_')}"
        assert f'src="{image}"' in page, plot
        assert (tmp_path / "plots" / image).stat().st_size > 0
