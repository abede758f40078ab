"""``ssltk report``'s tables from runs: pairing with baselines, best layers, the verdict."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from ssltk import tracking
from ssltk.config import Config
from ssltk.report.results import Cell, best_layer, rows
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
