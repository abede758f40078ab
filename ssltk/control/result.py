"""What a noise control measured, its verdict, its file, and its table in the report.

Torch-free, so ``ssltk report`` and the CLI read controls without importing the training stack.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from ssltk.errors import UserError
from ssltk.fsutil import write_atomic

__all__ = [
    "CONTROL_FILE",
    "LEAK_P_VALUE",
    "NO_VERDICT",
    "ControlResult",
    "control_of",
    "controls_markdown",
    "noise_cell",
    "read_controls",
    "verdict_of",
    "write_control",
]

#: One-sided significance of "above chance" (a t-test over held-out batches).
LEAK_P_VALUE = 1e-3
#: Tasks whose noise control has no verdict, and why.
NO_VERDICT = {"exemplar": "instance discrimination: distinct noise images are distinct instances"}
#: The file a control writes into its directory (a DVC metric).
CONTROL_FILE = "control.json"


@dataclass
class ControlResult:
    """A task's pretext metric on held-out noise against chance, and how it was measured."""

    task: str
    arch: str
    metric: str
    chance: float
    score: float  # mean over held-out batches
    score_sem: float  # standard error of that mean
    p_value: float | None  # one-sided, H0: the metric is at chance
    verdict: str  # "leaks", "clean", or "n/a" (see NO_VERDICT)
    steps: int
    batch_size: int
    held_out_images: int
    image_size: int
    noise_size: int
    settings: dict[str, str]
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, train metric)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ControlResult:
        data = dict(data)
        data["curve"] = [tuple(point) for point in data.get("curve", [])]
        return cls(**data)

    def summary(self) -> str:
        """One line: the figure, its uncertainty, chance and the verdict."""
        line = (
            f"noise control {self.task}/{self.arch}: {self.metric} {self.score:.4f} ± "
            f"{self.score_sem:.4f} on {self.held_out_images} unseen noise images (chance "
            f"{self.chance:.4f}) after {self.steps} steps"
        )
        if self.verdict == "n/a":
            return f"{line}: no verdict ({NO_VERDICT.get(self.task, 'none defined')})"
        return f"{line}: {self.verdict.upper()} (p = {self.p_value:.2g})"


def verdict_of(task: str, scores: np.ndarray, chance: float) -> tuple[float | None, str]:
    """``(p_value, verdict)`` of held-out batch scores against ``chance``.

    Held-out batches are independent draws of noise, so a one-sided t-test over their means is
    valid whatever the correlation of predictions within a batch.
    """
    if task in NO_VERDICT:
        return None, "n/a"
    if scores.std() == 0:  # e.g. a constant prediction: exactly chance for balanced labels
        p = 0.0 if scores.mean() > chance else 1.0
    else:
        p = float(stats.ttest_1samp(scores, chance, alternative="greater").pvalue)
    return p, "leaks" if p < LEAK_P_VALUE else "clean"


def write_control(result: ControlResult, out_dir: Path) -> Path:
    """Write ``out_dir/control.json`` atomically; return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CONTROL_FILE
    write_atomic(path, (json.dumps(result.to_json(), indent=2) + "\n").encode())
    return path


def read_controls(runs_dir: Path) -> list[ControlResult]:
    """Every control under ``runs_dir`` (``*/control.json``), by task then arch; a file that does
    not parse is a :class:`UserError` naming it."""
    results = []
    for path in sorted(runs_dir.glob(f"*/{CONTROL_FILE}")):
        try:
            results.append(ControlResult.from_json(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError) as err:
            raise UserError(f"{path}: not a noise-control result ({err})") from None
    return sorted(results, key=lambda r: (r.task, r.arch))


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def noise_cell(result: ControlResult | None) -> str:
    """``"25.3 % (chance 25.0 %)"`` for a table cell; ``–`` without a control."""
    if result is None:
        return "–"
    return f"{_pct(result.score)} % (chance {_pct(result.chance)} %)"


def control_of(cell: object, controls: list[ControlResult]) -> ControlResult | None:
    """The control of ``cell``'s task and arch, else of its task."""
    same_task = [c for c in controls if c.task == cell.task]
    same_arch = [c for c in same_task if c.arch == cell.arch]
    return (same_arch or same_task or [None])[0]


def controls_markdown(results: list[ControlResult]) -> str:
    """The report's section on noise controls (empty without any)."""
    if not results:
        return ""
    lines = [
        "\n## Noise controls\n",
        "Each task, with the arch and preprocessing of this study, trained on fresh i.i.d. noise "
        "images and scored on noise it never saw (training-mode preprocessing, mean ± standard "
        "error over held-out batches). Noise has no content: a figure above chance is a "
        "shortcut through preprocessing (one-sided t-test over the batches, p < "
        f"{LEAK_P_VALUE:g}). Exemplar discriminates instances, which distinct noise images "
        "are, so it has no verdict.\n",
        "| task | arch | settings | metric | on noise | chance | steps × batch | "
        "held-out images | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        settings = ", ".join(f"{key} {value}" for key, value in r.settings.items())
        verdict = "**LEAKS**" if r.verdict == "leaks" else r.verdict
        lines.append(
            f"| {r.task} | {r.arch} | {settings} | {r.metric} | {_pct(r.score)} ± "
            f"{_pct(r.score_sem)} % | {_pct(r.chance)} % | {r.steps} × {r.batch_size} | "
            f"{r.held_out_images} | {verdict} |"
        )
    return "\n".join(lines) + "\n"
