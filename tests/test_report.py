"""``ssltk report``'s tables from runs: pairing with baselines, best layers, the verdict."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

from typer.testing import CliRunner

from ssltk import store, tracking
from ssltk.cli import app
from ssltk.config import Config, config_from_dict

# The report internals these tests pin, in one place (a restructure moves this import only).
from ssltk.report.command import write_report
from ssltk.report.results import Cell, best_layer, collect, provenance, rows
from ssltk.report.tables import CSV_COLUMNS, markdown, verdict, write_csv


def run(run_id: str, metrics: dict[str, float], **tags: str) -> SimpleNamespace:
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, start_time=0, end_time=60_000),
        data=SimpleNamespace(metrics=metrics, tags=tags),
    )


def probes(values: dict[str, float]) -> dict[str, float]:
    return {tracking.probe_metric("lbfgs", 1, layer): v for layer, v in values.items()}


def cells() -> list[Cell]:
    rotation = Cell("rotation", "revnet50", 1)
    rotation.run = run(
        "r1",
        {**probes({"block2": 0.50, "pre_logits": 0.40}), "epoch/accuracy": 0.75},
    )
    rotation.baseline = run("b1", probes({"block2": 0.45, "pre_logits": 0.30}))
    jigsaw = Cell("jigsaw", "revnet50", 1)
    jigsaw.run = run("r2", {**probes({"block2": 0.41, "pre_logits": 0.35}), "epoch/accuracy": 0.2})
    jigsaw.baseline = run("b2", probes({"block2": 0.40, "pre_logits": 0.36}))
    return [rotation, jigsaw]


def test_rows_pair_each_layer_with_its_baseline(tmp_path: Path):
    table = rows(cells())
    assert [(r["task"], r["layer"]) for r in table] == [
        ("rotation", "block2"),
        ("rotation", "pre_logits"),
        ("jigsaw", "block2"),
        ("jigsaw", "pre_logits"),
    ]
    first = table[0]
    assert (first["top1"], first["baseline_top1"], first["run_id"]) == (0.5, 0.45, "r1")
    assert abs(first["delta"] - 0.05) < 1e-12
    write_csv(tmp_path / "results.csv", table)
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert header.split(",")[:9] == list(CSV_COLUMNS[:9])  # the documented columns, in order


def test_verdict_counts_tasks_whose_best_layer_gains_three_points():
    text = verdict(cells(), Config(), "lbfgs")
    assert "| rotation | revnet50 k=1: +5.0 | yes | 3.0× |" in text
    assert "| jigsaw | revnet50 k=1: +1.0 ✗ | no | 20.0× |" in text
    assert "1 of 2 tasks beat random init" in text


def test_the_best_layer_is_chosen_on_val_not_on_the_reported_split():
    cell = cells()[0]
    val = {"probe/lbfgs/val_top1/block2": 0.30, "probe/lbfgs/val_top1/pre_logits": 0.35}
    cell.run.data.metrics.update(val)
    cell.baseline.data.metrics.update(val)
    assert best_layer(cell, "run", "lbfgs") == ("pre_logits", 0.40)  # block2 is better on test
    assert best_layer(cell, "baseline", "lbfgs") == ("pre_logits", 0.30)
    text = markdown([cell], Config(), "lbfgs", {})
    assert "| rotation | revnet50 | 1 | pre_logits | 40.0 | 30.0 | +10.0 | 30.0 |" in text


def test_markdown_has_the_table1_layout_best_layers_and_provenance():
    text = markdown(cells(), Config(), "lbfgs", {"commit": "abc"})
    assert "| revnet50 | 40.0 / 30.0 (+10.0) | 35.0 / 36.0 (-1.0) |" in text
    assert "| rotation | revnet50 | 1 | block2 | 50.0 | 45.0 | +5.0 | 45.0 |" in text
    assert "- commit: abc" in text and "`r1`" in text and "`b2`" in text
    assert "No cell of this study matches" in text  # demo data: no paper number beside it


# --------------------------------------------------------------------------------------------------
# Fixtures as a real run logs them: top-1 *and* top-5 of every probe, the step window's
# ``train/*`` *and* the epoch means ``epoch/*``, each with its own value, so that reading the wrong
# one shows.


def full_probes(method: str, values: dict[str, tuple[float, float, float]]) -> dict[str, float]:
    """``{layer: (top1, top5, val_top1)}`` as the metrics an evaluation writes back."""
    out = {}
    for layer, (top1, top5, val_top1) in values.items():
        out[tracking.probe_metric(method, 1, layer)] = top1
        out[tracking.probe_metric(method, 5, layer)] = top5
        out[f"probe/{method}/val_top1/{layer}"] = val_top1
    return out


def full_cell() -> Cell:
    cell = Cell("rotation", "resnet50_v2", 2)
    metrics = {
        **full_probes("lbfgs", {"block3": (0.31, 0.77, 0.30), "pre_logits": (0.42, 0.83, 0.45)}),
        **full_probes("sgd", {"pre_logits": (0.37, 0.81, 0.36)}),
        tracking.train_metric("accuracy"): 0.93,  # the last logged window of steps
        tracking.epoch_metric("accuracy"): 0.71,  # the final epoch's mean: what "final" means
        tracking.train_metric("loss"): 0.55,
        tracking.epoch_metric("loss"): 0.66,
    }
    cell.run = run("run-2", metrics)
    cell.baseline = run(
        "base-2",
        full_probes("lbfgs", {"block3": (0.21, 0.61, 0.22), "pre_logits": (0.25, 0.64, 0.26)}),
    )
    cell.curve = [(1, 1.2), (2, 0.9), (3, 0.61)]  # train/loss history
    return cell


def test_every_results_csv_column_holds_its_own_figure(tmp_path: Path):
    write_csv(tmp_path / "results.csv", rows([full_cell()]))
    with (tmp_path / "results.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        got = {(r["method"], r["layer"]): r for r in reader}
    assert set(got) == {("lbfgs", "block3"), ("lbfgs", "pre_logits"), ("sgd", "pre_logits")}
    expected = {
        ("lbfgs", "block3"): ("0.31", "0.21", 0.10, "0.77", "base-2"),
        ("lbfgs", "pre_logits"): ("0.42", "0.25", 0.17, "0.83", "base-2"),
        ("sgd", "pre_logits"): ("0.37", "", None, "0.81", "base-2"),  # no sgd baseline
    }
    for key, (top1, baseline, delta, top5, baseline_id) in expected.items():
        row = got[key]
        assert (row["task"], row["arch"], row["widening"]) == ("rotation", "resnet50_v2", "2")
        assert (row["method"], row["layer"]) == key
        assert (row["top1"], row["top5"], row["baseline_top1"]) == (top1, top5, baseline), key
        if delta is None:
            assert row["delta"] == "", key
        else:
            assert abs(float(row["delta"]) - delta) < 1e-9, key
        assert (row["run_id"], row["baseline_run_id"]) == ("run-2", baseline_id), key


def test_the_pretext_figure_is_the_final_epoch_mean_not_the_last_window():
    cell = full_cell()
    text = markdown([cell], Config(), "lbfgs", {})
    # metric, final (epoch/accuracy 0.71, not train/accuracy 0.93), chance 1/4, the curve's last
    # train/loss (0.61, not epoch/loss).
    assert "| rotation | resnet50_v2 | 2 | accuracy | 71.0 % | 25.0 % | 0.610 |" in text
    assert "2.8×" in verdict([cell], Config(), "lbfgs")  # 0.71 / 0.25, not 0.93 / 0.25 = 3.7×
    # Without epoch means (a run stopped inside its first epoch) the last window stands in.
    del cell.run.data.metrics[tracking.epoch_metric("accuracy")]
    text = markdown([cell], Config(), "lbfgs", {})
    assert "| rotation | resnet50_v2 | 2 | accuracy | 93.0 % | 25.0 % | 0.610 |" in text


def test_tables_read_top1_and_the_method_asked_for():
    cell = full_cell()
    text = markdown([cell], Config(), "lbfgs", {})
    # Pre-logits: lbfgs top-1 0.42 vs 0.25 (not top-5 0.83, not sgd 0.37).
    assert "| resnet50_v2 | 42.0 / 25.0 (+17.0) |" in text
    # Best layer on val: pre_logits (val 0.45 > 0.30); random init's best on val also pre_logits.
    assert "| rotation | resnet50_v2 | 2 | pre_logits | 42.0 | 25.0 | +17.0 | 25.0 |" in text
    sgd = markdown([cell], Config(), "sgd", {})
    assert "| resnet50_v2 | 37.0 / – (–) |" in sgd


def test_the_verdict_counts_a_gain_of_exactly_three_points():
    cell = Cell("rotation", "revnet50", 1)
    cell.run = run("r", {**probes({"pre_logits": 0.09}), "epoch/accuracy": 0.5})
    cell.baseline = run("b", probes({"pre_logits": 0.06}))  # 0.09 - 0.06 == 0.03 exactly
    assert "| rotation | revnet50 k=1: +3.0 | yes |" in verdict([cell], Config(), "lbfgs")
    cell.baseline = run("b", probes({"pre_logits": 0.07}))
    assert "| rotation | revnet50 k=1: +2.0 ✗ | no |" in verdict([cell], Config(), "lbfgs")


def test_provenance_spans_the_first_start_to_the_last_end():
    first, second = cells()
    first.run.info = SimpleNamespace(run_id="r1", start_time=0, end_time=60_000)
    first.baseline.info = SimpleNamespace(run_id="b1", start_time=120_000, end_time=150_000)
    second.run.info = SimpleNamespace(run_id="r2", start_time=30_000, end_time=200_000)
    second.baseline.info = SimpleNamespace(run_id="b2", start_time=200_000, end_time=230_000)
    facts = provenance([first, second])
    assert facts["wall time of the study (first run start to last run end)"] == "3 min 50 s"
    assert facts["time in pretraining and baseline runs"] == "4 min 50 s"  # 60 + 30 + 170 + 30


class Study:
    """A tracking store and a workspace ``runs/`` of one cell (rotation, revnet50, k=1)."""

    def __init__(self, root: Path) -> None:
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.runs = root / "runs"
        self.config = config_from_dict(
            {
                "tracking": {"uri": self.uri, "experiment": "report-test"},
                "study": {"tasks": ["rotation"], "archs": ["revnet50"], "widenings": [1]},
                "eval": {"layers": ["block3", "pre_logits"]},
            }
        )
        self.client = store.client(self.uri)
        self.experiment = store.ensure_experiment(self.client, "report-test", self.uri)

    def measured(self, figures=("top1", "top5", "val_top1"), checkpoint="c1", **changes) -> str:
        """The ``ssltk.probe.<method>.<layer>`` tag of an evaluation as today's params say."""
        recorded = {**tracking.probe_measurement(self.config.eval), **changes}
        recorded.update(weights_sha256="w", checkpoint_sha256=checkpoint, figures=list(figures))
        return json.dumps(recorded)

    def logged(
        self, kind: str, start: int, status: str, top1: float, tags: dict | None = None
    ) -> str:
        tags = {
            tracking.TAG_TASK: "rotation",
            tracking.TAG_ARCH: "revnet50",
            tracking.TAG_WIDENING: "1",
            tracking.TAG_KIND: kind,
            tracking.probe_tag("lbfgs", "pre_logits"): self.measured(),
            **(tags or {}),
        }
        client = self.client
        run_id = client.create_run(self.experiment, start_time=start, tags=tags).info.run_id
        client.log_metric(run_id, tracking.probe_metric("lbfgs", 1, "pre_logits"), top1)
        client.log_metric(run_id, tracking.train_metric("loss"), 2.0 - top1, step=1)
        client.set_terminated(run_id, status, end_time=start + 1000)
        return run_id

    def workspace(self, run_id: str, baseline: str, status: str = "finished") -> None:
        cell = self.runs / "rotation-revnet50-w1"
        cell.mkdir(parents=True, exist_ok=True)
        record = {"status": status, "run_id": run_id, "checkpoint_sha256": "c1"}
        (cell / "run.json").write_text(json.dumps(record))
        (self.runs / "baseline-rotation-revnet50-w1").mkdir(exist_ok=True)
        (self.runs / "baseline-rotation-revnet50-w1" / "metrics.json").write_text(
            json.dumps({"run_id": baseline})
        )


def test_cells_are_the_workspace_runs_and_newer_store_runs_are_named(tmp_path: Path):
    """Issue 20.4: a newer smoke run of the cell in the same store is not reported, but named."""
    study = Study(tmp_path)
    studied = study.logged(tracking.KIND_PRETRAIN, 1_000, "FINISHED", 0.318)
    smoke = study.logged(tracking.KIND_PRETRAIN, 2_000, "FINISHED", 0.209)
    study.logged(tracking.KIND_PRETRAIN, 3_000, "FAILED", 0.9)
    baseline = study.logged(tracking.KIND_BASELINE, 1_500, "FINISHED", 0.199)
    newer_baseline = study.logged(tracking.KIND_BASELINE, 2_500, "FINISHED", 0.15)
    study.workspace(studied, baseline)
    (cell,) = collect(study.config, study.runs)
    assert cell.key == ("rotation", "revnet50", 1)
    assert (cell.run.info.run_id, cell.baseline.info.run_id) == (studied, baseline)
    assert cell.curve == [(1, 2.0 - 0.318)]
    (row,) = rows([cell])
    assert (row["top1"], row["baseline_top1"]) == (0.318, 0.199)
    (shadowed_run, shadowed_baseline) = cell.warnings
    assert smoke in shadowed_run and studied in shadowed_run
    assert newer_baseline in shadowed_baseline
    text = markdown([cell], study.config, "lbfgs", provenance([cell]))
    assert smoke in text and "31.8 / 19.9" in text


def test_an_unfinished_workspace_run_is_not_reported(tmp_path: Path):
    """Issue 20.2: run.json of a killed (or failed, or running) run: its cell is empty."""
    study = Study(tmp_path)
    killed = study.logged(tracking.KIND_PRETRAIN, 1_000, "KILLED", 0.25)
    baseline = study.logged(tracking.KIND_BASELINE, 1_500, "FINISHED", 0.199)
    study.workspace(killed, baseline, status="killed")
    (cell,) = collect(study.config, study.runs)
    assert cell.run is None and "killed" in cell.warnings[0]


def test_figures_measured_otherwise_are_left_out_and_named(tmp_path: Path):
    """Issue 20.3 and 20.2: a figure of another split, an older evaluation's val_top1 and a figure
    of earlier weights (the run resumed since) are not shown; the report says which and why."""
    study = Study(tmp_path)
    other_split = study.measured(split="val")
    old_val = study.measured(figures=("top1", "top5"))
    earlier = study.measured(checkpoint="c0")
    studied = study.logged(
        tracking.KIND_PRETRAIN,
        1_000,
        "FINISHED",
        0.354,
        {
            tracking.probe_tag("lbfgs", "pre_logits"): other_split,
            tracking.probe_tag("lbfgs", "block3"): old_val,
            tracking.probe_tag("lbfgs", "block2"): earlier,
        },
    )
    for figure, layer, value in (
        ("top1", "block3", 0.30),
        ("val_top1", "block3", 0.99),
        ("top1", "block2", 0.28),
        ("val_top1", "block2", 0.20),
    ):
        study.client.log_metric(studied, tracking.probe_metric("lbfgs", figure, layer), value)
    baseline = study.logged(tracking.KIND_BASELINE, 1_500, "FINISHED", 0.199)
    study.workspace(studied, baseline)
    (cell,) = collect(study.config, study.runs)
    assert cell.probes("run") == {("lbfgs", 1, "block3"): 0.30}
    assert cell.val_probes("run") == {}
    left_out = cell.excluded["run"]
    assert "'val', the report's 'test'" in left_out[tracking.probe_metric("lbfgs", 1, "pre_logits")]
    assert "earlier evaluation" in left_out[tracking.probe_metric("lbfgs", "val_top1", "block3")]
    assert "earlier weights" in left_out[tracking.probe_metric("lbfgs", 1, "block2")]
    text = markdown([cell], study.config, "lbfgs", provenance([cell]))
    assert "35.4" not in text and "probe/lbfgs/top1/pre_logits`: split 'val'" in text


def test_an_eval_runs_own_figures_are_not_named_as_measured_otherwise(tmp_path: Path):
    """A baseline (or eval) run also logs figures a report never reads, e.g. the chosen l2: they
    are not in its written-back record and must not be listed as left out."""
    study = Study(tmp_path)
    studied = study.logged(tracking.KIND_PRETRAIN, 1_000, "FINISHED", 0.3)
    baseline = study.logged(tracking.KIND_BASELINE, 1_500, "FINISHED", 0.2)
    study.client.log_metric(baseline, tracking.probe_metric("lbfgs", "l2", "pre_logits"), 0.01)
    study.workspace(studied, baseline)
    (cell,) = collect(study.config, study.runs)
    assert cell.excluded == {"run": {}, "baseline": {}}
    assert cell.probes("baseline") == {("lbfgs", 1, "pre_logits"): 0.2}


def test_a_report_without_probe_figures_plots_without_a_warning(tmp_path: Path, recwarn):
    """Issue 20.10: finished runs that were never evaluated: plots with a note, no warnings."""
    study = Study(tmp_path)
    bare = study.client.create_run(
        study.experiment,
        tags={
            tracking.TAG_TASK: "rotation",
            tracking.TAG_ARCH: "revnet50",
            tracking.TAG_WIDENING: "1",
            tracking.TAG_KIND: tracking.KIND_PRETRAIN,
        },
    ).info.run_id
    study.client.set_terminated(bare, "FINISHED")
    study.workspace(bare, "0" * 32)
    written = write_report(study.config, tmp_path / "reports", study.runs)
    assert len(written) == 7 and all(p.is_file() for p in written)
    assert [str(w.message) for w in recwarn] == []


def test_a_report_without_a_finished_workspace_run_is_one_line(tmp_path: Path):
    study = Study(tmp_path)
    study.logged(tracking.KIND_PRETRAIN, 1_000, "FINISHED", 0.3)  # in the store, not in runs/
    params = tmp_path / "params.yaml"
    params.write_text(
        json.dumps(
            {
                "tracking": {"uri": study.uri, "experiment": "report-test"},
                "study": {"tasks": ["rotation"], "archs": ["revnet50"], "widenings": [1]},
            }
        )
    )
    argv = ["report", "--params", str(params), "--runs", str(study.runs)]
    result = CliRunner().invoke(app, [*argv, "--out", str(tmp_path / "reports")])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: no finished pretraining run of the study under")
