"""Step metrics kept on the device until a flush, their means over a logging window, and per-epoch
means that survive a resume."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch


class MetricWindow:
    """Per-step scalar tensors, moved to the host once per window instead of once a step."""

    def __init__(self) -> None:
        self._rows: list[tuple[int, float, dict[str, torch.Tensor]]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, step: int, lr: float, values: Mapping[str, torch.Tensor]) -> None:
        self._rows.append((step, lr, dict(values)))

    def flush(
        self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> list[tuple[int, dict[str, float]]]:
        """``[(step, {"lr": …, "loss": …, …})]`` for the window, emptied; ``reduce`` (e.g. the mean
        over ranks) is applied to the stacked ``[steps, metrics]`` tensor before the transfer.
        """
        if not self._rows:
            return []
        names = list(self._rows[0][2])
        stacked = torch.stack(
            [torch.stack([values[n] for n in names]) for _, _, values in self._rows]
        )
        if reduce is not None:
            stacked = reduce(stacked)
        host = stacked.cpu().tolist()
        rows = [
            (step, {"lr": lr, **dict(zip(names, row, strict=True))})
            for (step, lr, _), row in zip(self._rows, host, strict=True)
        ]
        self._rows.clear()
        return rows


def window_means(rows: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Each metric's mean over the steps of ``rows`` (one logged row per window)."""
    return {name: sum(values[name] for _, values in rows) / len(rows) for name in rows[0][1]}


class EpochMeter:
    """Running sums of step metrics over the current epoch; its state goes into checkpoints."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.last_epoch: dict[str, float] = {}

    def add(self, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.steps += 1

    def means(self) -> dict[str, float]:
        return {name: total / self.steps for name, total in self.sums.items()} if self.steps else {}

    def close_epoch(self) -> dict[str, float]:
        """The finished epoch's means; the meter starts over."""
        self.last_epoch = self.means()
        self.sums, self.steps = {}, 0
        return self.last_epoch

    def latest(self) -> dict[str, float]:
        """Means of the epoch in progress, or of the last finished one if none is."""
        return self.means() if self.steps else dict(self.last_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "steps": self.steps, "last_epoch": dict(self.last_epoch)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sums = {k: float(v) for k, v in state["sums"].items()}
        self.steps = int(state["steps"])
        self.last_epoch = {k: float(v) for k, v in state["last_epoch"].items()}


def first_non_finite(
    rows: list[tuple[int, dict[str, float]]], name: str = "loss"
) -> tuple[int, float] | None:
    """``(step, value)`` of the first row whose ``name`` is NaN or infinite."""
    for step, values in rows:
        if not math.isfinite(values[name]):
            return step, values[name]
    return None
