"""What the study measured, read from the tracking store.

For every cell of ``study`` (task × arch × widening) the newest finished pretraining run and the
newest baseline run of the same cell are paired (:func:`collect`); their probe metrics give the
rows of ``results.csv`` (one per run × layer × method), each cell's best layer, its pretext metric
against chance and the provenance that :mod:`ssltk.report.tables` and :mod:`ssltk.report.plots`
present.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ssltk import store, tracking
from ssltk.config import Config
from ssltk.errors import UserError
from ssltk.pretext import registered_tasks, task_class
from ssltk.registry import ARCHS

__all__ = ["HEADLINE_LAYER", "Cell", "best_layer", "collect", "layer_order", "rows"]

HEADLINE_LAYER = "pre_logits"


def paper_verified() -> dict[tuple[str, str, int], dict[str, float]]:
    """Paper figures (arXiv 1901.09005, ImageNet linear top-1) that were checked against a second
    source, per (task, arch, widening): Table 2 (SGD protocol, official val set) and Table 1 cells
    (L-BFGS, pre-logits). Each task carries its own (``paper_results``)."""
    return {
        (task, arch, k): figures
        for task in registered_tasks()
        for arch, k, figures in task_class(task).paper_results
    }


@dataclass
class Cell:
    """One (task, arch, widening) of the study: its pretraining run and its baseline."""

    task: str
    arch: str
    widening: int
    run: Any = None  # mlflow Run of kind pretrain
    baseline: Any = None  # mlflow Run of kind baseline
    curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, int]:
        return self.task, self.arch, self.widening

    def _probe_metrics(self, which: str) -> Iterator[tuple[tracking.ProbeMetric, float]]:
        run = getattr(self, which)
        for name, value in run.data.metrics.items() if run is not None else ():
            metric = tracking.parse_probe_metric(name)
            if metric is not None:
                yield metric, value

    def probes(self, which: str = "run") -> dict[tuple[str, int, str], float]:
        """``{(method, k, layer): value}`` of the run's (or baseline's) top-k probe metrics."""
        return {
            (m.method, m.top_k, m.layer): v
            for m, v in self._probe_metrics(which)
            if m.top_k is not None
        }

    def val_probes(self, which: str = "run") -> dict[tuple[str, str], float]:
        """``{(method, layer): top-1 on val}``: what the best layer is chosen by."""
        return {
            (m.method, m.layer): v for m, v in self._probe_metrics(which) if m.figure == "val_top1"
        }


def _newest(runs: Iterable[Any]) -> dict[tuple[str, str, int], Any]:
    """The newest run per (task, arch, widening), from runs sorted newest first."""
    out: dict[tuple[str, str, int], Any] = {}
    for run in runs:
        tags = run.data.tags
        try:
            key = (
                tags[tracking.TAG_TASK],
                tags[tracking.TAG_ARCH],
                int(tags[tracking.TAG_WIDENING]),
            )
        except (KeyError, ValueError):
            continue
        out.setdefault(key, run)
    return out


def collect(config: Config) -> list[Cell]:
    """The study's cells with their newest finished pretraining and baseline runs."""
    uri = config.tracking.resolved_uri()
    client = store.client(uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        raise UserError(
            f"tracking.experiment={config.tracking.experiment!r}: no such experiment in {uri} "
            "(run the study first: dvc repro)"
        )

    def search(kind: str) -> list[Any]:
        return client.search_runs(
            [experiment.experiment_id],
            filter_string=(
                f"tags.`{tracking.TAG_KIND}` = '{kind}' and attributes.status = 'FINISHED'"
            ),
            order_by=["attributes.start_time DESC"],
            max_results=5000,
        )

    runs, baselines = (
        _newest(search(tracking.KIND_PRETRAIN)),
        _newest(search(tracking.KIND_BASELINE)),
    )
    study = config.study
    cells = []
    for task in study.tasks:
        for arch in study.archs:
            for widening in study.widenings:
                cell = Cell(task, arch, widening)
                cell.run = runs.get(cell.key)
                cell.baseline = baselines.get(cell.key)
                if cell.run is not None:
                    cell.curve = loss_curve(client, cell.run.info.run_id)
                cells.append(cell)
    return cells


#: The most points of a loss curve the report reads from the store.
CURVE_POINTS = 1000


def loss_curve(client: Any, run_id: str) -> list[tuple[int, float]]:
    """``(step, train/loss)``: at most :data:`CURVE_POINTS`, evenly sampled with the first and
    last kept (in SQL on a database store; an ``mlflow server`` store reads them all first)."""
    backend = client._tracking_client.store  # the sampling query has no public client method
    history = backend.get_metric_history_bulk_interval(
        [run_id], "train/loss", CURVE_POINTS, None, None
    )
    return sorted((m.step, m.value) for m in history)


def rows(cells: list[Cell]) -> list[dict[str, Any]]:
    """``results.csv`` rows: one per pretraining run × layer × method."""
    out = []
    for cell in cells:
        mine, base = cell.probes("run"), cell.probes("baseline")
        for (method, k, layer), top1 in sorted(mine.items()):
            if k != 1:
                continue
            baseline = base.get((method, 1, layer))
            out.append(
                {
                    "task": cell.task,
                    "arch": cell.arch,
                    "widening": cell.widening,
                    "layer": layer,
                    "method": method,
                    "top1": top1,
                    "baseline_top1": baseline,
                    "delta": None if baseline is None else top1 - baseline,
                    "run_id": cell.run.info.run_id,
                    "baseline_run_id": cell.baseline.info.run_id if cell.baseline else None,
                    "top5": mine.get((method, 5, layer)),
                }
            )
    return out


def best_layer(cell: Cell, which: str, method: str) -> tuple[str, float] | None:
    """The layer with the best top-1 on ``val`` (on the reported split if no val figures were
    logged, e.g. ``data.val_fraction: 0``) and its top-1 on the reported split."""
    scored = {layer: v for (m, k, layer), v in cell.probes(which).items() if m == method and k == 1}
    if not scored:
        return None
    val = {layer: v for (m, layer), v in cell.val_probes(which).items() if m == method}
    by = val if scored.keys() <= val.keys() else scored
    layer = max(sorted(scored), key=by.__getitem__)
    return layer, scored[layer]


def best_with_baseline(cell: Cell, method: str) -> tuple[str, float, float | None] | None:
    """The pretrained network's best layer, its top-1 and the random init's at the same layer."""
    best = best_layer(cell, "run", method)
    if best is None:
        return None
    return *best, cell.probes("baseline").get((method, 1, best[0]))


def best_baseline(cell: Cell, method: str) -> float | None:
    best = best_layer(cell, "baseline", method)
    return None if best is None else best[1]


def pretext(cell: Cell, config: Config) -> tuple[str, float | None, float]:
    cls = task_class(cell.task)
    value = cell.run.data.metrics.get(tracking.train_metric(cls.metric)) if cell.run else None
    epoch = cell.run.data.metrics.get(tracking.epoch_metric(cls.metric)) if cell.run else None
    return cls.metric, epoch if epoch is not None else value, cls.chance_level(config)


def provenance(cells: list[Cell]) -> dict[str, str]:
    runs = [c.run for c in cells if c.run] + [c.baseline for c in cells if c.baseline]
    if not runs:
        return {"runs": "none"}
    tags = runs[0].data.tags
    commits = sorted({r.data.tags.get(tracking.TAG_GIT_COMMIT, "unknown") for r in runs})
    hashes = sorted({r.data.tags.get(tracking.TAG_DATA_HASH, "unknown") for r in runs})
    start = min(r.info.start_time for r in runs)
    end = max(r.info.end_time or r.info.start_time for r in runs)
    busy = sum(((r.info.end_time or r.info.start_time) - r.info.start_time) for r in runs)
    return {
        "commit": ", ".join(commits),
        "data hash": ", ".join(hashes),
        "device": tags.get(tracking.TAG_DEVICE, "unknown"),
        "torch": tags.get(f"{tracking.TAG_VERSION_PREFIX}torch", "unknown"),
        "wall time of the study (first run start to last run end)": _duration((end - start) / 1000),
        "time in pretraining and baseline runs": _duration(busy / 1000),
    }


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s"


def layer_order(archs: Iterable[str], layers: Iterable[str]) -> list[str]:
    """``layers`` in forward order, merged over the ``endpoints`` traits of ``archs`` (ResNet's
    ``block4`` before VGG's ``block5``); layers no backbone declares keep their order, last."""
    after: dict[str, set[str]] = {}
    for arch in dict.fromkeys(archs):
        endpoints = ARCHS.member(arch).endpoints
        for earlier, later in itertools.pairwise(endpoints):
            after.setdefault(later, set()).add(earlier)
            after.setdefault(earlier, set())
    wanted = list(dict.fromkeys(layers))
    ordered: list[str] = []
    pending = [name for name in after]  # first appearance breaks ties
    while pending:
        ready = next(n for n in pending if after[n] <= set(ordered))
        ordered.append(ready)
        pending.remove(ready)
    known = [name for name in ordered if name in wanted]
    return known + [name for name in wanted if name not in after]


def cell_config(config: Config, cell: Cell) -> Config:
    """``config`` with the cell's task: what its chance level is computed for."""
    return config.model_copy(
        update={"pretext": config.pretext.model_copy(update={"task": cell.task})}
    )
