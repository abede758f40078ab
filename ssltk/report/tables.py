"""``results.md`` and ``results.csv``: the tables of what :mod:`ssltk.report.results` collected."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from ssltk.config import Config
from ssltk.control.result import ControlResult, control_of, controls_markdown, noise_cell
from ssltk.fsutil import write_atomic
from ssltk.report import sizes
from ssltk.report.datasets import dataset_label
from ssltk.report.results import (
    HEADLINE_LAYER,
    Cell,
    best_baseline,
    best_with_baseline,
    paper_verified,
    pretext,
)

__all__ = ["CSV_COLUMNS", "MIN_GAIN", "markdown", "measurement", "verdict", "write_csv"]

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
    "eval_data",
)


def _pct(value: float | None) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{100 * value:.1f}"
    )


def markdown(
    cells: list[Cell],
    config: Config,
    method: str,
    provenance: dict[str, str],
    controls: list[ControlResult] | None = None,
    sized: list[Cell] | None = None,
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
    w(measurement(cells, config))
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
    w(by_dataset(cells, config, method))
    w(beside(cells, config, method))
    w(sizes.markdown(sized or [], method))

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
        best = best_with_baseline(cell, method)
        if best is None:
            w(f"| {cell.task} | {cell.arch} | {cell.widening} | (not evaluated) | | | | |\n")
            continue
        layer, top1, base = best
        delta = None if base is None else top1 - base
        w(
            f"| {cell.task} | {cell.arch} | {cell.widening} | {layer} | {_pct(top1)} "
            f"| {_pct(base)} | {_delta(delta)} | {_pct(best_baseline(cell, method))} |\n"
        )

    w(
        "\n## Pretext task\n\nThe final epoch's pretext metric against what a network that learned "
        "nothing scores (chance), and the same task's metric on unseen noise images after its "
        "noise control (see Noise controls below; the control of the same arch, else of the "
        "task). The final train loss is the mean over the last logging window "
        "(`pretrain.log_every` steps).\n\n"
        "| task | arch | k | metric | final | chance | final train loss | pretext metric on noise, "
        "chance |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    controls = controls or []
    for cell in cells:
        name, value, chance = pretext(cell, config)
        loss = cell.curve[-1][1] if cell.curve else None
        w(
            f"| {cell.task} | {cell.arch} | {cell.widening} | {name} | {_pct(value)} % | "
            f"{_pct(chance)} % | {'–' if loss is None else f'{loss:.3f}'} | "
            f"{noise_cell(control_of(cell, controls))} |\n"
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


def _pair(cell: Cell, method: str, dataset: str | None) -> str:
    mine = cell.probes("run", dataset).get((method, 1, HEADLINE_LAYER))
    base = cell.probes("baseline", dataset).get((method, 1, HEADLINE_LAYER))
    delta = None if mine is None or base is None else mine - base
    return f"{_pct(mine)} / {_pct(base)} ({_delta(delta)})"


def by_dataset(cells: list[Cell], config: Config, method: str) -> str:
    """Pre-logits top-1 with one column per evaluation dataset (the paper's ImageNet and
    Places205 columns), each beside random init measured on the same dataset; empty when the
    runs were evaluated on their own data only."""
    keys = list(dict.fromkeys(k for c in cells for k in c.datasets()))
    if not keys:
        return ""
    groups = [f"{config.data.source} (pretraining data)"] + [dataset_label(cells, k) for k in keys]
    lines = [
        f"\n## Pre-logits by evaluation dataset\n\n{method}, top-1 on each dataset's "
        f"`{config.eval.report_split}` split. Cells: pretrained / random init on the same "
        "dataset (Δ).\n\n| task | arch | k | " + " | ".join(groups) + " |\n"
        "|---|---|---|" + "---|" * len(groups) + "\n"
    ]
    for cell in cells:
        shown = [_pair(cell, method, d) for d in [None, *keys]]
        lines.append(
            f"| {cell.task} | {cell.arch} | {cell.widening} | " + " | ".join(shown) + " |\n"
        )
    return "".join(lines)


def beside(cells: list[Cell], config: Config, method: str) -> str:
    """Pre-logits top-1 of ``eval.also``'s probes (e.g. kNN) beside ``method``'s, on the same
    cached features; empty when none ran."""
    others = [m for m in dict.fromkeys(config.eval.also) if m != method]
    if not others:
        return ""
    methods = [method, *others]
    lines = [
        "\n## Probes side by side (pre-logits)\n\nEach probe on the same cached features, "
        f"top-1 on `{config.eval.report_split}`. Cells: pretrained / random init (Δ).\n\n"
        "| task | arch | k | " + " | ".join(methods) + " |\n"
        "|---|---|---|" + "---|" * len(methods) + "\n"
    ]
    for cell in cells:
        shown = [_pair(cell, m, None) for m in methods]
        lines.append(
            f"| {cell.task} | {cell.arch} | {cell.widening} | " + " | ".join(shown) + " |\n"
        )
    return "".join(lines)


#: The gain over random init, in points of linear top-1, that counts as a representation learned.
MIN_GAIN = 0.03


def measurement(cells: list[Cell], config: Config) -> str:
    """How every figure shown was measured, and which figures were left out and why."""
    ev = config.eval
    section = getattr(ev, ev.method, None)
    settings = section.model_dump(mode="json") if section is not None else {}
    lines = [
        "## What is shown\n\n"
        f"Every figure below was measured on `{ev.report_split}` with {ev.pooling} pooling to at "
        f"most {ev.max_features} features by the `{ev.method}` probe "
        f"({', '.join(f'{k} {v}' for k, v in settings.items()) or 'no settings'}), on the final "
        "weights of the run that `runs/` names for its cell; figures measured otherwise are left "
        "out.\n"
    ]
    left_out = [
        f"- {cell.name} {'random init' if which == 'baseline' else 'pretrained'} `{name}`: {why}\n"
        for cell in cells
        for which, names in cell.excluded.items()
        for name, why in sorted(names.items())
    ]
    warned = [f"- {line}\n" for cell in cells for line in cell.warnings]
    if left_out:
        lines.append("\nLeft out, measured otherwise:\n\n" + "".join(left_out))
    if warned:
        lines.append("\nNot reported:\n\n" + "".join(warned))
    return "".join(lines) + "\n"


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
            best = best_with_baseline(cell, method)
            gain = None if best is None or best[2] is None else best[1] - best[2]
            gains.append(f"{cell.arch} k={cell.widening}: {_delta(gain)}")
            _, value, chance = pretext(cell, config)
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
        if (b := best_with_baseline(c, method)) is None or b[2] is None or b[1] - b[2] < MIN_GAIN
    ]
    random_best = [v for c in short if (v := best_baseline(c, method)) is not None]
    if random_best:
        lines.append(
            f" Where a cell falls short, the random network's own best layer already reaches "
            f"{_pct(min(random_best))}–{_pct(max(random_best))} % (best-layer table above), and "
            "the pretrained network's best layer does not exceed it by 3 points."
        )
    return "".join(lines) + "\n"


def _delta(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}"


def write_csv(path: Path, table: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    write_atomic(path, buffer.getvalue().encode())
