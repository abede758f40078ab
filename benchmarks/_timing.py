"""The one timer of the benchmarks: seconds of a call with the device synchronised around it, and
several candidates timed in turns, so that a shared machine's noise hits them all alike.

``clock`` defaults to the wall clock; ``time.process_time`` (this process's CPU time) suits CPU
comparisons on a machine that other jobs load.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

Clock = Callable[[], float]


def synchronize(device: torch.device | str | None) -> None:
    """Wait for ``device``'s queued work (a no-op off CUDA)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Seconds since it was made, ``device`` synchronised at both ends."""

    def __init__(self, device: torch.device | str | None = None, clock: Clock = time.perf_counter):
        self.device, self.clock = device, clock
        synchronize(device)
        self.started = clock()

    def elapsed(self) -> float:
        synchronize(self.device)
        return self.clock() - self.started


def in_turns(
    calls: dict[str, Callable[[], object]],
    repeats: int,
    device: torch.device | str | None = None,
    *,
    warmup: int = 1,
    clock: Clock = time.perf_counter,
) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` calls per candidate, after ``warmup`` untimed calls of each;
    the candidates take turns within every repeat."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            watch = Stopwatch(device, clock)
            call()
            times[name].append(watch.elapsed())
    return times


def repeat(
    call: Callable[[], object],
    repeats: int,
    device: torch.device | str | None = None,
    *,
    warmup: int = 1,
    clock: Clock = time.perf_counter,
) -> list[float]:
    """Seconds of each of ``repeats`` calls of one candidate (see :func:`in_turns`)."""
    return in_turns({"call": call}, repeats, device, warmup=warmup, clock=clock)["call"]
