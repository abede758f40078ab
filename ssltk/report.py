"""``ssltk report``: the study's tables and plots, read from the tracking store.

For every cell of ``study`` (task × arch × widening) the newest finished pretraining run and the
newest baseline run of the same cell are paired; their ``probe/<method>/top1/<layer>`` figures give
``results.csv`` (one row per run × layer × method), ``results.md`` (the paper's Table 1 layout at
pre-logits, the best layer per cell, pretext accuracy against chance, provenance) and PNG plots.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssltk import tracking
from ssltk.config import Config
from ssltk.control.result import ControlResult, controls_markdown, noise_cell, read_controls
from ssltk.errors import UserError
from ssltk.fsutil import write_atomic
from ssltk.pretext import registered_tasks, task_class

__all__ = ["CSV_COLUMNS", "Cell", "collect", "write_report"]

CSV_COLUMNS = (
    "task",
    "arch",
    "widening",
    "layer",
    "method",
    "top1",
    "baseline_top1",
    "delta",
    "run_id",
    "baseline_run_id",
    "top5",
)
HEADLINE_LAYER = "pre_logits"
_PROBE = re.compile(r"^probe/(?P<method>[^/]+)/top(?P<k>\d+)/(?P<layer>.+)$")
_PROBE_VAL = re.compile(r"^probe/(?P<method>[^/]+)/val_top1/(?P<layer>.+)$")


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

    def probes(self, which: str = "run") -> dict[tuple[str, int, str], float]:
        """``{(method, k, layer): value}`` of the run's (or baseline's) probe metrics."""
        run = getattr(self, which)
        if run is None:
            return {}
        out = {}
        for name, value in run.data.metrics.items():
            match = _PROBE.match(name)
            if match:
                out[(match["method"], int(match["k"]), match["layer"])] = value
        return out

    def val_probes(self, which: str = "run") -> dict[tuple[str, str], float]:
        """``{(method, layer): top-1 on val}``: what the best layer is chosen by."""
        run = getattr(self, which)
        if run is None:
            return {}
        matches = (_PROBE_VAL.match(name) for name in run.data.metrics)
        return {(m["method"], m["layer"]): run.data.metrics[m.string] for m in matches if m}


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
    client = tracking.client(uri)
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
                    history = client.get_metric_history(cell.run.info.run_id, "train/loss")
                    cell.curve = sorted((m.step, m.value) for m in history)
                cells.append(cell)
    return cells


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


def _pct(value: float | None) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{100 * value:.1f}"
    )


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


def _best(cell: Cell, method: str) -> tuple[str, float, float | None] | None:
    """The pretrained network's best layer, its top-1 and the random init's at the same layer."""
    best = best_layer(cell, "run", method)
    if best is None:
        return None
    return *best, cell.probes("baseline").get((method, 1, best[0]))


def _best_baseline(cell: Cell, method: str) -> float | None:
    best = best_layer(cell, "baseline", method)
    return None if best is None else best[1]


def _pretext(cell: Cell, config: Config) -> tuple[str, float | None, float]:
    cls = task_class(cell.task)
    value = cell.run.data.metrics.get(tracking.train_metric(cls.metric)) if cell.run else None
    epoch = cell.run.data.metrics.get(tracking.epoch_metric(cls.metric)) if cell.run else None
    return cls.metric, epoch if epoch is not None else value, cls.chance_level(config)


def markdown(
    cells: list[Cell],
    config: Config,
    method: str,
    provenance: dict[str, str],
    controls: list[ControlResult] | None = None,
) -> str:
    out = io.StringIO()
    w = out.write
    data = config.data.source
    w("# Results of the study\n\n")
    w(
        f"Linear evaluation ({method}, top-1 on the `{config.eval.report_split}` split of "
        f"`{data}` data) of every pretraining run of the study, each beside a randomly initialised "
        "network of the same task preprocessing, arch and widening (the *baseline*) and the "
        "difference in points. Written by `ssltk report` from the tracking store.\n\n"
    )
    widenings = sorted({c.widening for c in cells})
    tasks = list(dict.fromkeys(c.task for c in cells))
    archs = list(dict.fromkeys(c.arch for c in cells))
    w(
        "## Pre-logits (the layout of the paper's Table 1)\n\n"
        "Cells: pretrained / random init (Δ).\n\n"
    )
    header = [f"{t} k={k}" for t in tasks for k in widenings]
    w("| arch | " + " | ".join(header) + " |\n|---|" + "---|" * len(header) + "\n")
    by_key = {c.key: c for c in cells}
    for arch in archs:
        row = []
        for task in tasks:
            for k in widenings:
                cell = by_key.get((task, arch, k))
                mine = cell.probes("run").get((method, 1, HEADLINE_LAYER)) if cell else None
                base = cell.probes("baseline").get((method, 1, HEADLINE_LAYER)) if cell else None
                delta = None if mine is None or base is None else mine - base
                row.append(f"{_pct(mine)} / {_pct(base)} ({_delta(delta)})")
        w(f"| {arch} | " + " | ".join(row) + " |\n")

    w(
        "\n## Best layer per cell\n\nThe paper finds that the best layer differs by family "
        "(pre-logits for ResNet/RevNet, earlier blocks for VGG). Each network's best layer is "
        "chosen on the `val` split; the table gives its top-1 on the reported split.\n\n"
    )
    w(
        "| task | arch | k | best layer | top-1 | random init, same layer | Δ "
        "| best random-init layer top-1 |\n"
    )
    w("|---|---|---|---|---|---|---|---|\n")
    for cell in cells:
        best = _best(cell, method)
        if best is None:
            w(f"| {cell.task} | {cell.arch} | {cell.widening} | (not evaluated) | | | | |\n")
            continue
        layer, top1, base = best
        delta = None if base is None else top1 - base
        w(
            f"| {cell.task} | {cell.arch} | {cell.widening} | {layer} | {_pct(top1)} "
            f"| {_pct(base)} | {_delta(delta)} | {_pct(_best_baseline(cell, method))} |\n"
        )

    w(
        "\n## Pretext task\n\nThe final epoch's pretext metric against what a network that learned "
        "nothing scores (chance), and the same task's metric on unseen noise images after its "
        "noise control (see Noise controls below; the control of the same arch, else of the "
        "task).\n\n"
        "| task | arch | k | metric | final | chance | final train loss | pretext metric on noise, "
        "chance |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    controls = controls or []
    for cell in cells:
        name, value, chance = _pretext(cell, config)
        loss = cell.curve[-1][1] if cell.curve else None
        w(
            f"| {cell.task} | {cell.arch} | {cell.widening} | {name} | {_pct(value)} % | "
            f"{_pct(chance)} % | {'–' if loss is None else f'{loss:.3f}'} | "
            f"{noise_cell(_control_of(cell, controls))} |\n"
        )
    w(controls_markdown(controls))

    w(verdict(cells, config, method))
    w("\n## The paper's numbers\n\n")
    verified = paper_verified()
    matched = [c for c in cells if c.key in verified and data == "imagefolder"]
    if matched:
        for cell in matched:
            figures = ", ".join(f"{t}: {v}" for t, v in verified[cell.key].items())
            w(
                f"- {cell.task}, {cell.arch}, k={cell.widening}: paper {figures}; this run "
                f"{_pct(cell.probes('run').get((method, 1, HEADLINE_LAYER)))}\n"
            )
    else:
        w(
            "No cell of this study matches a configuration the paper reports (the paper pretrains "
            "and evaluates on ImageNet at 224 px with widening 4–16), so no paper number stands "
            "beside these figures. For reference, the paper's ImageNet linear top-1 figures that "
            "were checked against a second source:\n\n"
        )
        for (task, arch, k), figures in verified.items():
            shown = ", ".join(f"{t} {v}" for t, v in figures.items())
            w(f"- {task}, {arch}, k={k}: {shown}\n")
    w("\nOther Table 1 cells are not verified and are not shown.\n")

    w("\n## Provenance\n\n")
    for key, value in provenance.items():
        w(f"- {key}: {value}\n")
    w("\n| cell | pretraining run | baseline run |\n|---|---|---|\n")
    for cell in cells:
        run_id = cell.run.info.run_id if cell.run else "(missing)"
        base_id = cell.baseline.info.run_id if cell.baseline else "(missing)"
        w(f"| {cell.task}-{cell.arch}-w{cell.widening} | `{run_id}` | `{base_id}` |\n")
    return out.getvalue()


#: The gain over random init, in points of linear top-1, that counts as a representation learned.
MIN_GAIN = 0.03


def verdict(cells: list[Cell], config: Config, method: str) -> str:
    """Per task: did pretraining beat random init at the best layer by ``MIN_GAIN`` in every arch,
    and did the pretext metric end above chance?"""
    lines = [
        f"\n## Verdict\n\nA task counts as learning a representation when its best layer beats "
        f"random init of the same arch and widening by at least {100 * MIN_GAIN:.0f} points; the "
        "gain is measured at the pretrained network's best layer.\n\n"
        "| task | gain at the best layer, per cell | ≥ 3 points in every cell "
        "| pretext ÷ chance |\n"
        "|---|---|---|---|\n"
    ]
    passed = 0
    for task in dict.fromkeys(c.task for c in cells):
        gains, ratios = [], []
        for cell in (c for c in cells if c.task == task):
            best = _best(cell, method)
            gain = None if best is None or best[2] is None else best[1] - best[2]
            gains.append(f"{cell.arch} k={cell.widening}: {_delta(gain)}")
            _, value, chance = _pretext(cell, config)
            ratios.append("–" if value is None else f"{value / chance:.1f}×")
            ok = gain is not None and gain >= MIN_GAIN
            gains[-1] += "" if ok else " ✗"
        every = all(not g.endswith("✗") for g in gains)
        passed += every
        lines.append(
            f"| {task} | {'; '.join(gains)} | {'yes' if every else 'no'} | {', '.join(ratios)} |\n"
        )
    tasks = len(lines) - 1
    lines.append(f"\n{passed} of {tasks} tasks beat random init by ≥ 3 points in every cell.")
    short = [
        c
        for c in cells
        if (b := _best(c, method)) is None or b[2] is None or b[1] - b[2] < MIN_GAIN
    ]
    random_best = [v for c in short if (v := _best_baseline(c, method)) is not None]
    if random_best:
        lines.append(
            f" Where a cell falls short, the random network's own best layer already reaches "
            f"{_pct(min(random_best))}–{_pct(max(random_best))} % (best-layer table above), and "
            "the pretrained network's best layer does not exceed it by 3 points."
        )
    return "".join(lines) + "\n"


def _delta(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}"


def _control_of(cell: Cell, controls: list[ControlResult]) -> ControlResult | None:
    same_task = [c for c in controls if c.task == cell.task]
    same_arch = [c for c in same_task if c.arch == cell.arch]
    return (same_arch or same_task or [None])[0]


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


def write_csv(path: Path, table: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    write_atomic(path, buffer.getvalue().encode())


def write_report(config: Config, out_dir: Path, runs_dir: Path = Path("runs")) -> list[Path]:
    """Write results.md, results.csv and the plots into ``out_dir``; return the paths. Noise
    controls are read from ``runs_dir/*/control.json``."""
    from ssltk import plots

    cells = collect(config)
    if not any(c.run for c in cells):
        raise UserError(
            f"no finished pretraining run of the study in experiment "
            f"{config.tracking.experiment!r} (run the study first: dvc repro)"
        )
    method = config.eval.method
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.md", out_dir / "results.csv"]
    controls = read_controls(runs_dir)
    text = markdown(cells, config, method, provenance(cells), controls)
    write_atomic(written[0], text.encode())
    write_csv(written[1], rows(cells))
    written += plots.write_plots(cells, config, method, out_dir)
    return written
