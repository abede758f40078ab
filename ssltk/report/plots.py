"""The study's figures as PNG (matplotlib, Agg backend), each readable without the text."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ssltk import tracking
from ssltk.pretext import task_class
from ssltk.report.results import HEADLINE_LAYER, Cell, best_layer, cell_config, layer_order

if TYPE_CHECKING:
    from ssltk.config import Config

__all__ = ["write_plots"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _legend(ax, **options) -> None:
    """A legend of the labelled artists (each label once), or a note on an empty panel."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), **options)
    elif not ax.lines and not ax.collections:
        ax.text(0.5, 0.5, "no figures to show", transform=ax.transAxes, ha="center", color="grey")


def _layer_order(cells: list[Cell], method: str) -> list[str]:
    found = [layer for c in cells for m, k, layer in c.probes("run") if m == method and k == 1]
    return layer_order((c.arch for c in cells), found)


def depth(cells: list[Cell], method: str, path: Path) -> Path:
    """Linear top-1 by layer, one panel per arch, one line per task; random init dashed."""
    plt = _pyplot()
    archs = list(dict.fromkeys(c.arch for c in cells))
    layers = _layer_order(cells, method)
    fig, axes = plt.subplots(
        1, len(archs), figsize=(5.5 * len(archs), 4.2), squeeze=False, sharey=True
    )
    for ax, arch in zip(axes[0], archs, strict=True):
        for index, cell in enumerate(c for c in cells if c.arch == arch):
            color = f"C{index}"
            for which, style in (("run", "-o"), ("baseline", "--x")):
                probes = cell.probes(which)
                xs = [i for i, layer in enumerate(layers) if (method, 1, layer) in probes]
                ys = [100 * probes[(method, 1, layers[i])] for i in xs]
                if xs:
                    label = f"{cell.task} k={cell.widening}" + (
                        " (random init)" if which == "baseline" else ""
                    )
                    ax.plot(
                        xs, ys, style, color=color, label=label, alpha=1 if which == "run" else 0.6
                    )
        ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right")
        ax.set_title(f"{arch}: linear top-1 by layer")
        ax.set_xlabel("layer (input → output)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"linear top-1 (%, {method})")
    _legend(axes[0][-1], fontsize=7, loc="best")
    return _save(fig, path)


def widening(cells: list[Cell], method: str, layer: str, path: Path) -> Path:
    """Linear top-1 at ``layer`` by widening factor, one line per task × arch."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    groups: dict[tuple[str, str], list[tuple[int, float, float | None]]] = {}
    for cell in cells:
        value = cell.probes("run").get((method, 1, layer))
        if value is not None:
            base = cell.probes("baseline").get((method, 1, layer))
            groups.setdefault((cell.task, cell.arch), []).append((cell.widening, value, base))
    for index, ((task, arch), points) in enumerate(sorted(groups.items())):
        points.sort()
        ks = [p[0] for p in points]
        ax.plot(ks, [100 * p[1] for p in points], "-o", color=f"C{index}", label=f"{task}, {arch}")
        base = [(p[0], 100 * p[2]) for p in points if p[2] is not None]
        if base:
            ax.plot(*zip(*base, strict=True), "x", color=f"C{index}", alpha=0.6)
    ax.set_xlabel("widening factor k")
    ax.set_ylabel(f"linear top-1 at {layer} (%)")
    ax.set_title(f"Accuracy by widening factor ({method}; x = random init)")
    ax.set_xticks(sorted({c.widening for c in cells}))
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=7)
    return _save(fig, path)


def pretext_vs_linear(cells: list[Cell], config: Config, method: str, path: Path) -> Path:
    """One point per run: pretext metric above chance against the best layer's linear top-1."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = {
        arch: m for arch, m in zip(dict.fromkeys(c.arch for c in cells), "osD^v<>", strict=False)
    }
    for index, task in enumerate(dict.fromkeys(c.task for c in cells)):
        cls = task_class(task)
        for cell in (c for c in cells if c.task == task and c.run is not None):
            metric = cell.run.data.metrics.get(tracking.epoch_metric(cls.metric))
            best = best_layer(cell, "run", method)
            if metric is None or best is None:
                continue
            ratio = metric / cls.chance_level(cell_config(config, cell))
            ax.scatter(
                ratio,
                100 * best[1],
                color=f"C{index}",
                marker=markers[cell.arch],
                s=60,
                label=f"{task}, {cell.arch}",
            )
    ax.set_xscale("log")
    ax.set_xlabel("final pretext metric ÷ chance (log scale; 1 = learned nothing)")
    ax.set_ylabel(f"best-layer linear top-1 (%, {method})")
    ax.set_title("Pretext accuracy vs linear accuracy (one point per run)")
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=7)
    return _save(fig, path)


def loss_curves(cells: list[Cell], path: Path) -> Path:
    """Pretraining loss by step, one panel per task (losses of different tasks differ in scale)."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(c.task for c in cells))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for index, cell in enumerate(c for c in cells if c.task == task and c.curve):
            steps, losses = zip(*cell.curve, strict=True)
            ax.plot(steps, losses, color=f"C{index}", lw=1, label=f"{cell.arch} k={cell.widening}")
        ax.set_title(f"{task}: pretraining loss")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=7)
    axes[0][0].set_ylabel("training loss")
    return _save(fig, path)


def write_plots(cells: list[Cell], config: Config, method: str, out_dir: Path) -> list[Path]:
    return [
        depth(cells, method, out_dir / "accuracy_by_layer.png"),
        widening(cells, method, HEADLINE_LAYER, out_dir / "accuracy_by_widening.png"),
        pretext_vs_linear(cells, config, method, out_dir / "pretext_vs_linear.png"),
        loss_curves(cells, out_dir / "pretraining_loss.png"),
    ]
