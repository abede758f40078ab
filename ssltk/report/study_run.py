"""The report in the MLflow UI: its files as artifacts of the study run, and each cell's headline
figures as summary metrics of its pretraining run, named to sort before every other metric."""

from __future__ import annotations

import time
from pathlib import Path

from ssltk import store, tracking
from ssltk.config import Config
from ssltk.report.results import HEADLINE_LAYER, Cell, best_with_baseline

#: ``cell/…`` sorts before ``epoch/``, ``probe/`` and ``train/`` in the UI's metric columns.
SUMMARY_PREFIX = "cell/"
TAG_BEST_LAYER = "ssltk.best_layer"
REPORT_ARTIFACT_DIR = "report"


def summary_metrics(cell: Cell, method: str) -> dict[str, float]:
    """Top-1 at pre-logits and at the best layer (chosen on val), each with its gain over the
    random init at the same layer, as ``cell/<figure>``; figures the cell lacks are left out."""
    out: dict[str, float] = {}
    mine, base = cell.probes("run"), cell.probes("baseline")
    headline = mine.get((method, 1, HEADLINE_LAYER))
    if headline is not None:
        out["top1_pre_logits"] = headline
        if (method, 1, HEADLINE_LAYER) in base:
            out["gain_pre_logits"] = headline - base[(method, 1, HEADLINE_LAYER)]
    best = best_with_baseline(cell, method)
    if best is not None:
        _, top1, baseline = best
        out["top1_best_layer"] = top1
        if baseline is not None:
            out["gain_best_layer"] = top1 - baseline
    return {f"{SUMMARY_PREFIX}{name}": value for name, value in out.items()}


def log_report(config: Config, cells: list[Cell], files: list[Path]) -> str:
    """Log ``files`` onto the study run and every cell's summary metrics (and best layer, as a
    tag) onto its pretraining run; return the study run's id."""
    from mlflow.entities import Metric, RunTag

    uri = config.tracking.resolved_uri()
    client = store.client(uri)
    experiment_id = store.ensure_experiment(client, config.tracking.experiment, uri)
    study = tracking.study_run_id(client, experiment_id, config.tracking.experiment, uri)
    client.log_batch(
        study,
        tags=[RunTag(k, v) for k, v in tracking.source_tags("report").items()],
        synchronous=True,
    )
    for path in files:
        client.log_artifact(study, str(path), REPORT_ARTIFACT_DIR)
    now = int(time.time() * 1000)
    for cell in cells:
        if cell.run is None:
            continue
        metrics = [
            Metric(k, v, now, 0) for k, v in summary_metrics(cell, config.eval.method).items()
        ]
        best = best_with_baseline(cell, config.eval.method)
        tags = [RunTag(TAG_BEST_LAYER, best[0])] if best else []
        client.log_batch(cell.run.info.run_id, metrics=metrics, tags=tags, synchronous=True)
    return study
