"""What the study measured, read from the workspace's runs and the tracking store.

For every cell of ``study`` (task × arch × widening) the pretraining run that
``runs/<cell>/run.json`` names and the baseline that ``runs/baseline-<cell>/metrics.json`` names
are paired (:func:`collect`): the workspace's runs, not the newest of the store, whose other runs
of the cell are named in a warning. A probe figure is used only if its
``ssltk.probe.<method>.<layer>`` tag says it was measured as the report's params say, on the run's
final weights; the others are left out, each with the reason. The figures give the rows of
``results.csv`` (one per run × layer × method), each cell's best layer, its pretext metric against
chance and the provenance that :mod:`ssltk.report.tables` and :mod:`ssltk.report.plots` present.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssltk import store, tracking
from ssltk.config import Config
from ssltk.errors import UserError
from ssltk.pretext import registered_tasks, task_class
from ssltk.registry import ARCHS
from ssltk.train.rundir import read_run_record

__all__ = ["HEADLINE_LAYER", "Cell", "best_layer", "collect", "layer_order", "rows"]

#: The metrics.json of an evaluation (``ssltk.evaluate.evaluation.METRICS_JSON``).
EVAL_METRICS = "metrics.json"
_NAMED = 5  # run ids listed in one warning

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
    #: ``{which: {metric name: why}}``: probe figures measured otherwise, left out everywhere.
    excluded: dict[str, dict[str, str]] = field(default_factory=dict)
    #: What the report could not use, one line each (a missing or unfinished run, shadowed runs).
    warnings: list[str] = field(default_factory=list)
    #: ``{dataset key: baseline run}`` on the other evaluation datasets (:mod:`.datasets`).
    other_baselines: dict[str, Any] = field(default_factory=dict)
    #: The extra representation layer's width (``study.representation_sizes``), None without.
    representation_size: int | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        return self.task, self.arch, self.widening

    @property
    def store_key(self) -> tuple:
        """What its runs' tags say: the key, and the representation size where there is one."""
        size = self.representation_size
        return self.key if size is None else (*self.key, size)

    @property
    def name(self) -> str:
        return tracking.cell_name(*self.key, self.representation_size)

    def _run(self, which: str, dataset: str | None) -> Any:
        if which == "baseline" and dataset is not None:
            return self.other_baselines.get(dataset)
        return getattr(self, which)

    def _probe_metrics(
        self, which: str, dataset: str | None = None
    ) -> Iterator[tuple[tracking.ProbeMetric, float]]:
        run = self._run(which, dataset)
        left_out = self.excluded.get(which if dataset is None else f"{which}/{dataset}", {})
        for name, value in run.data.metrics.items() if run is not None else ():
            metric = tracking.parse_probe_metric(name)
            if metric is not None and metric.dataset == dataset and name not in left_out:
                yield metric, value

    def probes(
        self, which: str = "run", dataset: str | None = None
    ) -> dict[tuple[str, int, str], float]:
        """``{(method, k, layer): value}`` of the run's (or baseline's) top-k probe metrics on
        the run's own data (``dataset`` None) or on the evaluation dataset ``dataset``."""
        return {
            (m.method, m.top_k, m.layer): v
            for m, v in self._probe_metrics(which, dataset)
            if m.top_k is not None
        }

    def val_probes(self, which: str = "run") -> dict[tuple[str, str], float]:
        """``{(method, layer): top-1 on val}``: what the best layer is chosen by."""
        return {
            (m.method, m.layer): v for m, v in self._probe_metrics(which) if m.figure == "val_top1"
        }

    def datasets(self) -> list[str]:
        """Keys of the other evaluation datasets the pretraining run has figures on."""
        metrics = self.run.data.metrics if self.run is not None else {}
        found = (tracking.parse_probe_metric(name) for name in metrics)
        return list(dict.fromkeys(m.dataset for m in found if m is not None and m.dataset))


def _cell_key(run: Any) -> tuple | None:
    tags = run.data.tags
    try:
        key = tags[tracking.TAG_TASK], tags[tracking.TAG_ARCH], int(tags[tracking.TAG_WIDENING])
        size = tags.get(tracking.TAG_REPRESENTATION_SIZE)
        return key if size is None else (*key, int(size))
    except (KeyError, ValueError):
        return None


def _named(run_ids: list[str]) -> str:
    more = len(run_ids) - _NAMED
    return ", ".join(run_ids[:_NAMED]) + (f" and {more} more" if more > 0 else "")


def _workspace_run(
    client: Any, experiment_id: str, kind: str, run_id: Any, source: Path
) -> tuple[Any, str | None]:
    """The run ``run_id`` that ``source`` names, or None and why it cannot be reported."""
    if not isinstance(run_id, str) or not run_id:
        return None, f"{source} names no run"
    run = store.find_run(client, run_id)
    if run is None or run.info.experiment_id != experiment_id:
        return None, f"{source} names run {run_id}, which this experiment does not hold"
    if run.data.tags.get(tracking.TAG_KIND) != kind:
        return None, f"{source} names run {run_id}, which is not a {kind} run"
    if run.info.status != "FINISHED":
        return None, f"{source} names run {run_id}, which is {run.info.status}"
    return run, None


def _pretraining_run(
    client: Any, experiment_id: str, cell: Cell, runs_dir: Path
) -> tuple[Any, str | None, str | None]:
    """The cell's finished run from ``runs_dir/<cell>/run.json``, its final checkpoint's SHA-256,
    and why there is no run."""
    try:
        record = read_run_record(runs_dir / cell.name)
    except UserError as err:
        return None, None, str(err)
    source = runs_dir / cell.name / "run.json"
    if record.status != "finished":
        return None, None, f"{source} says the run is {record.status}"
    run, why = _workspace_run(client, experiment_id, tracking.KIND_PRETRAIN, record.run_id, source)
    return run, record.checkpoint_sha256, why


def _baseline_run(client: Any, experiment_id: str, cell: Cell, runs_dir: Path) -> tuple[Any, str]:
    source = runs_dir / f"baseline-{cell.name}" / EVAL_METRICS
    try:
        run_id = json.loads(source.read_text(encoding="utf-8")).get("run_id")
    except FileNotFoundError:
        return None, f"no {source}"
    except (OSError, ValueError, AttributeError) as err:
        return None, f"{source} cannot be read ({type(err).__name__})"
    return _workspace_run(client, experiment_id, tracking.KIND_BASELINE, run_id, source)


def _measured_otherwise(run: Any, config: Config, checkpoint_sha256: str | None) -> dict[str, str]:
    """``{metric name: why}`` for the run's probe figures not measured as ``config.eval`` says
    (or, for a pretraining run, not on the final checkpoint ``checkpoint_sha256``)."""
    out = {}
    for name in run.data.metrics:
        metric = tracking.parse_probe_metric(name)
        if metric is None or not _reported(metric):
            continue
        why = _difference(run.data.tags, metric, config, checkpoint_sha256)
        if why is not None:
            out[name] = why
    return out


def _reported(metric: tracking.ProbeMetric) -> bool:
    """Whether a report reads the figure: top-k on the reported split, or val top-1 (the best
    layer); an eval run's own figures such as the chosen ``l2`` are not written back."""
    return metric.top_k is not None or metric.figure == "val_top1"


def _difference(
    tags: dict[str, str], metric: tracking.ProbeMetric, config: Config, checkpoint: str | None
) -> str | None:
    try:
        recorded = json.loads(tags[tracking.probe_tag(metric.method, metric.layer, metric.dataset)])
    except (KeyError, ValueError):
        return "no record of how it was measured (evaluated by an older ssltk)"
    if not isinstance(recorded, dict):
        return "no record of how it was measured"
    if metric.figure not in recorded.get("figures", ()):
        return f"{metric.figure} was left by an earlier evaluation"
    expected = tracking.probe_measurement(config.eval, metric.method)
    differs = [
        f"{key} {recorded.get(key)!r}, the report's {value!r}"
        for key, value in expected.items()
        if recorded.get(key) != value
    ]
    if checkpoint is not None and recorded.get("checkpoint_sha256") != checkpoint:
        differs.append("measured on earlier weights (the run went on since)")
    return "; ".join(differs) or None


def collect(
    config: Config, runs_dir: Path = Path("runs"), *, representation_sizes: bool = False
) -> list[Cell]:
    """The study's cells with the workspace's pretraining and baseline runs (see the module);
    with ``representation_sizes``, the cells of ``study.representation_sizes`` instead."""
    uri = config.tracking.resolved_uri()
    client = store.client(uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    if experiment is None:
        raise UserError(
            f"tracking.experiment={config.tracking.experiment!r}: no such experiment in {uri} "
            "(run the study first: dvc repro)"
        )

    def search(kind: str) -> dict[tuple, list[str]]:
        found = client.search_runs(
            [experiment.experiment_id],
            filter_string=(
                f"tags.`{tracking.TAG_KIND}` = '{kind}' and attributes.status = 'FINISHED'"
            ),
            order_by=["attributes.start_time DESC"],
            max_results=5000,
        )
        out: dict[tuple, list[str]] = {}
        for run in found:
            key = _cell_key(run)
            if key is not None:
                out.setdefault(key, []).append(run.info.run_id)
        return out

    in_store = {kind: search(kind) for kind in (tracking.KIND_PRETRAIN, tracking.KIND_BASELINE)}
    study = config.study
    sizes = study.representation_sizes if representation_sizes else [None]
    cells = [
        Cell(task, arch, widening, representation_size=size)
        for task in study.tasks
        for arch in study.archs
        for widening in study.widenings
        for size in sizes
    ]
    for cell in cells:
        _fill(cell, client, experiment.experiment_id, config, runs_dir, in_store)
    return cells


def _fill(
    cell: Cell,
    client: Any,
    experiment_id: str,
    config: Config,
    runs_dir: Path,
    in_store: dict[str, dict[tuple, list[str]]],
) -> None:
    """Give ``cell`` its workspace runs, their usable figures and its warnings."""
    run, checkpoint, why = _pretraining_run(client, experiment_id, cell, runs_dir)
    baseline, base_why = _baseline_run(client, experiment_id, cell, runs_dir)
    cell.run, cell.baseline = run, baseline
    if run is None:
        cell.warnings.append(f"{cell.name}: not reported: {why}")
    if baseline is None:
        cell.warnings.append(f"{cell.name}: no baseline: {base_why}")
    for kind, chosen in ((tracking.KIND_PRETRAIN, run), (tracking.KIND_BASELINE, baseline)):
        mine = chosen.info.run_id if chosen is not None else None
        others = [r for r in in_store[kind].get(cell.store_key, []) if r != mine]
        if others:
            cell.warnings.append(
                f"{cell.name}: the store also holds finished {kind} runs {_named(others)} of "
                f"this cell, not reported (the workspace names {mine or 'none'})"
            )
    if run is not None:
        cell.excluded["run"] = _measured_otherwise(run, config, checkpoint)
        cell.curve = loss_curve(client, cell.run.info.run_id)
    if baseline is not None:
        cell.excluded["baseline"] = _measured_otherwise(baseline, config, None)
    if run is not None:
        from ssltk.report.datasets import other_baselines

        cell.other_baselines = other_baselines(client, experiment_id, cell, runs_dir)
        for key, other in cell.other_baselines.items():
            cell.excluded[f"baseline/{key}"] = _measured_otherwise(other, config, None)
        for key in cell.datasets():
            if key not in cell.other_baselines:
                cell.warnings.append(
                    f"{cell.name}: no baseline on {key} (no finished `ssltk eval --baseline` on "
                    f"that dataset under {runs_dir})"
                )


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
    """``results.csv`` rows: one per pretraining run × evaluation dataset × layer × method."""
    out = []
    for cell, dataset in ((c, d) for c in cells for d in [None, *c.datasets()]):
        mine, base = cell.probes("run", dataset), cell.probes("baseline", dataset)
        other = cell.other_baselines.get(dataset) if dataset else cell.baseline
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
                    "baseline_run_id": other.info.run_id if other else None,
                    "top5": mine.get((method, 5, layer)),
                    "eval_data": dataset,
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
