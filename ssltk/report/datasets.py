"""The evaluation datasets of a study besides the runs' own (the paper's Places205 column).

A pretraining run evaluated on another prepared dataset holds figures keyed by it
(``probe/<method>/top1/<layer>/data-<hash16>``, :mod:`ssltk.evaluate.eval_data`). Its random-init
baseline on the same dataset is the finished baseline run that a ``metrics.json`` under the
workspace's runs folder names for the same cell and dataset key (any folder: ``--out`` is the
user's), the newest if several.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssltk import store, tracking

if TYPE_CHECKING:
    from ssltk.report.results import Cell

__all__ = ["dataset_label", "other_baselines"]

_METRICS = "metrics.json"


def _summaries(runs_dir: Path) -> list[dict[str, Any]]:
    found = []
    for path in sorted([*runs_dir.glob(f"*/{_METRICS}"), *runs_dir.glob(f"*/*/{_METRICS}")]):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(summary, dict) and summary.get("dataset"):
            found.append(summary)
    return found


def other_baselines(client: Any, experiment_id: str, cell: Cell, runs_dir: Path) -> dict[str, Any]:
    """``{dataset key: finished baseline run}`` of ``cell`` on datasets other than its own."""
    out: dict[str, Any] = {}
    for summary in _summaries(runs_dir):
        same_cell = (
            summary.get("kind") == tracking.KIND_BASELINE
            and summary.get("task") == cell.task
            and summary.get("arch") == cell.arch
            and summary.get("widening") == cell.widening
            and summary.get("representation_size") == getattr(cell, "representation_size", None)
        )
        if not same_cell or not isinstance(summary.get("run_id"), str):
            continue
        run = store.find_run(client, summary["run_id"])
        if (
            run is None
            or run.info.experiment_id != experiment_id
            or run.info.status != "FINISHED"
            or run.data.tags.get(tracking.TAG_KIND) != tracking.KIND_BASELINE
        ):
            continue
        key = summary["dataset"]
        if key not in out or run.info.start_time > out[key].info.start_time:
            out[key] = run
    return out


def dataset_label(cells: list[Cell], key: str) -> str:
    """``<source> <prepared_dir>`` of dataset ``key`` as its figures record it, else the key."""
    for cell in cells:
        tags = cell.run.data.tags if cell.run is not None else {}
        for name, value in tags.items():
            if name.startswith(tracking.TAG_PROBE_PREFIX) and name.endswith(f".{key}"):
                try:
                    data = json.loads(value).get("data") or {}
                except (ValueError, AttributeError):
                    continue
                return f"{data.get('source')} `{data.get('prepared_dir')}` ({key})"
    return key
