"""A pretraining run judged on a second dataset (``eval.data``), as the paper's Places205 column:
figures keyed by the dataset, never mixed with the run's own, and a report column per dataset."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import pytest
import yaml
from demo_images import DEMO_ARCHIVE, demo_imagefolder
from typer.testing import CliRunner

from ssltk import store, tracking
from ssltk.cli import app
from ssltk.data.dataset import PreparedDataset

CELL = "rotation-resnet50_v2-w1"
CLASSES = ("cat", "dog", "ship")  # the Places-style set has 3 classes, the run's own data 10


def places_style(root: Path, train: int = 6, val: int = 3) -> Path:
    """Shipped test-split images laid out as Places205 ships them: ``images/<letter>/<class>/``
    under one root and the two official lists, ``<path> <label>`` a line."""
    lists: dict[str, list[str]] = {"train": [], "val": []}
    taken: dict[str, int] = {}
    with tarfile.open(DEMO_ARCHIVE) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if not member.isfile() or parts[-3] != "test" or parts[-2] not in CLASSES:
                continue
            name = parts[-2]
            count = taken[name] = taken.get(name, 0) + 1
            if count > train + val:
                continue
            relative = f"{name[0]}/{name}/{count:08d}.jpg"
            (root / "images" / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / "images" / relative).write_bytes(archive.extractfile(member).read())
            split = "train" if count <= train else "val"
            lists[split].append(f"{relative} {CLASSES.index(name)}")
    (root / "lists").mkdir()
    for split, lines in lists.items():
        (root / "lists" / f"{split}_places205.csv").write_text("\n".join(lines) + "\n")
    return root


def cli(*argv: str):
    return CliRunner().invoke(app, list(argv), catch_exceptions=False)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("transfer")
    places = places_style(root / "places")
    params = {
        "seed": 1,
        "data": {
            "source": "imagefolder",
            "root": str(demo_imagefolder(root / "demo", 12, 4)),
            "val_fraction": 0.25,
            "prepared_dir": str(root / "data" / "prepared"),
        },
        "model": {"arch": "resnet50_v2", "widening": 1},
        "pretext": {"task": "rotation", "input_size": 32, "rotation": {"crop": "center"}},
        "pretrain": {"epochs": 1, "max_steps": 3, "batch_size": 16, "device": "cpu"},
        "eval": {
            "layers": ["pre_logits"],
            "batch_size": 64,
            "lbfgs": {"l2": [0.1, 1.0], "max_iter": 40},
            "also": ["knn"],
            "knn": {"ks": [1, 3]},
        },
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "transfer"},
        "study": {
            "tasks": ["rotation"],
            "archs": ["resnet50_v2"],
            "widenings": [1],
            "transfer": {
                "places": {
                    "source": "places205",
                    "root": str(places / "images"),
                    "file_list": str(places / "lists"),
                    "prepared_dir": str(root / "data" / "places"),
                }
            },
        },
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    places_sets = [
        "--set",
        "eval.data.source=places205",
        "--set",
        f"eval.data.root={places / 'images'}",
        "--set",
        f"eval.data.file_list={places / 'lists'}",
        "--set",
        f"eval.data.prepared_dir={root / 'data' / 'places'}",
    ]
    assert cli("prepare", "--params", str(path)).exit_code == 0
    made = cli("prepare", "--params", str(path), "--transfer", "places")
    assert made.exit_code == 0, made.output
    places_data = PreparedDataset.open(root / "data" / "places")
    assert places_data.class_names == list(CLASSES)  # named from the list's paths
    assert places_data.manifest["counts"]["test"] == 9  # the official val list: 3 a class
    run_dir = root / "runs" / CELL
    trained = cli("pretrain", "--params", str(path), "--out", str(run_dir))
    assert trained.exit_code == 0, trained.output
    return {
        "root": root,
        "params": path,
        "run_dir": run_dir,
        "run_id": json.loads((run_dir / "run.json").read_text())["run_id"],
        "sets": places_sets,
        "places_hash": PreparedDataset.open(root / "data" / "places").content_hash,
    }


def test_a_run_evaluated_on_a_places_style_dataset_keeps_its_figures_apart(
    workspace: dict, monkeypatch: pytest.MonkeyPatch
):
    root, params, run_dir = workspace["root"], str(workspace["params"]), workspace["run_dir"]
    monkeypatch.chdir(root)  # the baselines' default --out is runs/baseline-<cell>[-<key>]
    key = f"data-{workspace['places_hash'][:16]}"

    # The failing command: one line naming the key and the way out, exit 2.
    wrong = CliRunner().invoke(
        app,
        [
            "eval",
            "--params",
            params,
            "--run-dir",
            str(run_dir),
            "--set",
            f"data.prepared_dir={root / 'data' / 'places'}",
        ],
    )
    assert wrong.exit_code == 2 and "eval.data" in wrong.output
    assert len(wrong.output.strip().splitlines()) == 1

    # The run by its eval.data keys, its random init by the dataset's name in study.transfer.
    for target, extra in (
        (["--run-dir", str(run_dir)], []),
        (["--baseline"], []),
        (["--run-dir", str(run_dir)], workspace["sets"]),
        (["--baseline"], ["--transfer", "places"]),
    ):
        done = cli("eval", "--params", params, *target, *extra)
        assert done.exit_code == 0, done.output
    own = json.loads((run_dir / "eval" / "metrics.json").read_text())
    other = json.loads((run_dir / f"eval-{key}" / "metrics.json").read_text())
    base_other = json.loads((root / "runs" / f"baseline-{CELL}-{key}" / "metrics.json").read_text())
    base_own = json.loads((root / "runs" / f"baseline-{CELL}" / "metrics.json").read_text())
    assert own["dataset"] is None and other["dataset"] == base_other["dataset"] == key
    assert other["data_hash"] == workspace["places_hash"] != own["data_hash"]

    # Each folder's feature cache holds features of its own dataset only.
    def cached_hashes(folder: Path) -> set[str]:
        return {json.loads(p.read_text())["data_hash"] for p in folder.rglob("*.json")}

    assert cached_hashes(run_dir / f"eval-{key}" / "features") == {workspace["places_hash"]}
    assert cached_hashes(run_dir / "eval" / "features") == {own["data_hash"]}

    # Written back onto the pretraining run under both names: neither overwrote the other.
    client = store.client(f"sqlite:///{root / 'mlflow.db'}")
    metrics = client.get_run(workspace["run_id"]).data.metrics
    for method, figures in (("lbfgs", "layers"), ("knn", None)):
        mine = own[figures]["pre_logits"] if figures else own["also"]["knn"]["layers"]["pre_logits"]
        theirs = (
            other[figures]["pre_logits"]
            if figures
            else other["also"]["knn"]["layers"]["pre_logits"]
        )
        assert metrics[tracking.probe_metric(method, 1, "pre_logits")] == mine["top1"]
        assert metrics[tracking.probe_metric(method, 1, "pre_logits", key)] == theirs["top1"]
    eval_run = client.get_run(other["run_id"]).data
    assert eval_run.tags[tracking.TAG_EVAL_DATA] == key
    assert eval_run.tags[tracking.TAG_DATA_HASH + ".eval"] == workspace["places_hash"]
    assert all(name.endswith(f"/{key}") for name in eval_run.metrics)

    # The report: one column group per dataset, each beside random init on that dataset.
    report = cli("report", "--params", params, "--out", str(root / "reports"))
    assert report.exit_code == 0, report.output
    text = (root / "reports" / "results.md").read_text()
    section = text[text.index("## Pre-logits by evaluation dataset") :]
    header = next(line for line in section.splitlines() if line.startswith("| task"))
    assert "imagefolder (pretraining data)" in header and "places205 `" in header and key in header

    def pair(mine: dict, base: dict) -> str:
        a, b = mine["pre_logits"]["top1"], base["pre_logits"]["top1"]
        return f"{100 * a:.1f} / {100 * b:.1f} ({100 * (a - b):+.1f})"

    row = f"| rotation | resnet50_v2 | 1 | {pair(own['layers'], base_own['layers'])} | "
    row += f"{pair(other['layers'], base_other['layers'])} |"
    assert row in section
    assert "## Probes side by side (pre-logits)" in text  # kNN beside L-BFGS
    with open(root / "reports" / "results.csv") as f:
        table = list(csv.DictReader(f))
    transfer = [r for r in table if r["eval_data"] == key and r["method"] == "lbfgs"]
    assert [r["baseline_run_id"] for r in transfer] == [base_other["run_id"]]
    assert float(transfer[0]["top1"]) == other["layers"]["pre_logits"]["top1"]


def test_dvc_evaluates_every_cell_on_each_named_dataset_and_by_default_on_none(tmp_path: Path):
    from test_train_dvc import dvc, project_copy

    repo = project_copy(tmp_path / "repo")
    listed = dvc("stage", "list", "--name-only", cwd=repo)
    assert listed.returncode == 0 and "transfer" not in listed.stdout
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["study"]["transfer"] = {"places205": {"source": "places205", "root": "/p"}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    names = set(dvc("stage", "list", "--name-only", cwd=repo).stdout.split())
    study = params["study"]
    for stage in ("eval-transfer", "baseline-transfer"):
        assert {n for n in names if n.startswith(f"{stage}@")} == {
            f"{stage}@places205-{task}-{arch}-{k}"
            for task in study["tasks"]
            for arch in study["archs"]
            for k in study["widenings"]
        }
