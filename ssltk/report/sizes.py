"""The width × representation-size experiment (paper section 3.9, its figure of linear accuracy
against representation size, one line per widening): the cells of ``study.representation_sizes``,
each with an extra representation layer of that width before global pooling."""

from __future__ import annotations

import math
from pathlib import Path

from ssltk.report.plots import _legend, _pyplot, _save
from ssltk.report.results import HEADLINE_LAYER, Cell

__all__ = ["PLOT", "markdown", "plot", "series"]

PLOT = "accuracy_by_representation_size.png"


def _top1(cell: Cell, which: str, method: str) -> float | None:
    return cell.probes(which).get((method, 1, HEADLINE_LAYER))


def series(
    cells: list[Cell], method: str
) -> dict[tuple[str, str, int], list[tuple[int, float, float | None]]]:
    """The plot's lines: per (task, arch, widening), ``(size, top-1, random init's top-1)`` by
    size."""
    groups: dict[tuple[str, str, int], list[tuple[int, float, float | None]]] = {}
    for cell in cells:
        value = _top1(cell, "run", method)
        if value is not None and cell.representation_size is not None:
            point = (cell.representation_size, value, _top1(cell, "baseline", method))
            groups.setdefault(cell.key, []).append(point)
    return {key: sorted(points) for key, points in sorted(groups.items())}


def plot(cells: list[Cell], method: str, path: Path) -> Path:
    """Linear top-1 at pre-logits against representation size (log 2 axis), one line per
    widening (and task × arch, if several); random init as crosses."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    groups = series(cells, method)
    several = len({(task, arch) for task, arch, _ in groups}) > 1
    for index, ((task, arch, k), points) in enumerate(groups.items()):
        label = f"k={k}" + (f", {task}, {arch}" if several else "")
        sizes = [p[0] for p in points]
        ax.plot(sizes, [100 * p[1] for p in points], "-o", color=f"C{index}", label=label)
        base = [(p[0], 100 * p[2]) for p in points if p[2] is not None]
        if base:
            ax.plot(*zip(*base, strict=True), "x", color=f"C{index}", alpha=0.6)
    sizes = sorted({p[0] for points in groups.values() for p in points})
    if sizes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
    title = ", ".join(dict.fromkeys(f"{t}, {a}" for t, a, _ in groups)) if not several else ""
    ax.set_xlabel("representation size (width of the extra layer before pooling)")
    ax.set_ylabel(f"linear top-1 at {HEADLINE_LAYER} (%, {method})")
    ax.set_title(f"Width vs representation size{f' ({title})' if title else ''}; x = random init")
    if not groups:
        ax.text(
            0.5,
            0.4,
            "(no evaluated cell of study.representation_sizes)",
            transform=ax.transAxes,
            ha="center",
            color="grey",
        )
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=7)
    return _save(fig, path)


def _pct(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def markdown(cells: list[Cell], method: str) -> str:
    """A table per task × arch: widening down, representation size across; empty if no cells."""
    if not cells:
        return ""
    sizes = sorted({c.representation_size for c in cells if c.representation_size is not None})
    lines = [
        "\n## Width × representation size (paper section 3.9)\n\n"
        f"Pre-logits {method} top-1 with an extra representation layer (1×1 conv, BN, ReLU "
        "before global pooling) of each width. Cells: pretrained / random init. "
        f"Plot: `{PLOT}`.\n"
    ]
    by_key = {(c.key, c.representation_size): c for c in cells}
    for task, arch in dict.fromkeys((c.task, c.arch) for c in cells):
        lines.append(
            f"\n{task}, {arch}\n\n| k | "
            + " | ".join(f"size {s}" for s in sizes)
            + " |\n|---|"
            + "---|" * len(sizes)
            + "\n"
        )
        for k in sorted({c.widening for c in cells if (c.task, c.arch) == (task, arch)}):
            shown = []
            for size in sizes:
                cell = by_key.get(((task, arch, k), size))
                mine = _top1(cell, "run", method) if cell else None
                base = _top1(cell, "baseline", method) if cell else None
                shown.append(f"{_pct(mine)} / {_pct(base)}")
            lines.append(f"| {k} | " + " | ".join(shown) + " |\n")
    return "".join(lines)
