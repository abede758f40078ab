"""The DVC study: its matrices, and ``dvc repro`` (prepare → pretrain → eval → baseline → report)
and ``dvc exp run`` on a copy of the project."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ssltk import store as mlflow_store
from ssltk import tracking
from ssltk.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = shutil.which("dvc", path=str(BIN)) or shutil.which("dvc")

pytestmark = pytest.mark.skipif(DVC is None, reason="dvc is not installed")


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [DVC, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def test_pretrain_eval_and_baseline_matrices_cover_the_study():
    study = load_config(ROOT / "params.yaml").study
    listed = dvc("stage", "list", "--name-only", cwd=ROOT)
    assert listed.returncode == 0, listed.stderr
    names = set(listed.stdout.split())
    for stage in ("pretrain", "eval", "baseline"):
        cells = {line for line in names if line.startswith(f"{stage}@")}
        expected = {
            f"{stage}@{task}-{arch}-{width}"
            for task in study.tasks
            for arch in study.archs
            for width in study.widenings
        }
        assert cells == expected, stage
    assert {"prepare", "report"} <= names


def project_copy(target: Path) -> Path:
    """The project's files (tracked and untracked, not ignored) in a fresh git repository."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    subprocess.run([*git, "add", "-A"], cwd=target, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=target, check=True)
    return target


@pytest.mark.slow
def test_dvc_repro_and_exp_run_log_to_one_store(tmp_path: Path):
    repo = project_copy(tmp_path / "repo")
    store = tmp_path / "store" / "mlflow.db"
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["study"].update(tasks=["rotation"], archs=["resnet50_v1"], widenings=[1])
    params["pretrain"].update({"batch_size": 8, "max_steps": 2, "checkpoint_every": 2})
    params["tracking"] = {"uri": f"sqlite:///{store}", "experiment": "dvc-test"}
    params["eval"] = {"layers": ["pre_logits"], "lbfgs": {"l2": [0.1], "max_iter": 20}}
    params["control"] = {"steps": 2, "held_out_batches": 2}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "commit", "-qam", "tiny study"], cwd=repo, check=True)

    repro = dvc("repro", cwd=repo)
    assert repro.returncode == 0, repro.stdout[-2000:] + repro.stderr[-2000:]
    out = repo / "runs" / "rotation-resnet50_v1-w1"
    record = json.loads((out / "run.json").read_text())
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert (out / "checkpoints" / "ckpt-00000002.pt").is_file()
    evaluated = json.loads((out / "eval" / "metrics.json").read_text())
    assert evaluated["pretrain_run_id"] == record["run_id"]
    with open(repo / "reports" / "results.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["task"], row["layer"], row["run_id"]) == (
        "rotation",
        "pre_logits",
        record["run_id"],
    )
    assert float(row["delta"]) == float(row["top1"]) - float(row["baseline_top1"])
    assert len(list((repo / "reports").glob("*.png"))) >= 4
    control = json.loads((repo / "runs" / "control-rotation" / "control.json").read_text())
    assert (control["task"], control["steps"], control["held_out_images"]) == ("rotation", 2, 16)
    results = (repo / "reports" / "results.md").read_text()
    assert "## Noise controls" in results and "pretext metric on noise, chance" in results
    status = dvc("status", cwd=repo)
    assert "up to date" in status.stdout, status.stdout
    again = dvc("repro", cwd=repo)
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout

    subprocess.run([*git, "add", "dvc.lock"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "lock"], cwd=repo, check=True)
    exp = dvc("exp", "run", "--temp", "-S", "pretrain.max_steps=3", cwd=repo)
    assert exp.returncode == 0, exp.stdout[-2000:] + exp.stderr[-2000:]

    client = mlflow_store.client(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("dvc-test")
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{tracking.TAG_KIND}` = 'pretrain'",
        order_by=["attributes.start_time"],
    )
    assert [r.data.params["pretrain.max_steps"] for r in runs] == ["2", "3"]
    assert runs[0].info.run_id == record["run_id"]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_dvc_repro_runs_a_cell_with_nproc_per_node_2_under_torchrun(tmp_path: Path):
    repo = project_copy(tmp_path / "repo")
    store = tmp_path / "mlflow.db"
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["study"].update(tasks=["rotation"], archs=["resnet50_v1"], widenings=[1])
    params["pretrain"].update({"batch_size": 8, "max_steps": 2, "checkpoint_every": 2})
    params["pretrain"]["distributed"] = {"nproc_per_node": 2, "backend": "gloo"}
    params["tracking"] = {"uri": f"sqlite:///{store}", "experiment": "dvc-ddp"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    repro = dvc("repro", "pretrain@rotation-resnet50_v1-1", cwd=repo)
    assert repro.returncode == 0, repro.stdout[-2000:] + repro.stderr[-2000:]
    record = json.loads((repo / "runs" / "rotation-resnet50_v1-w1" / "run.json").read_text())
    assert record["world_size"] == 2 and record["status"] == "finished"
    run = mlflow_store.client(f"sqlite:///{store}").get_run(record["run_id"])
    assert run.data.tags[tracking.TAG_WORLD_SIZE] == "2" and run.info.status == "FINISHED"
