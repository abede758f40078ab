"""Shared by the RevNet benchmarks: the three ways to train, memory probes and step timing.

Memory is read from the allocator, never from the process RSS: on CUDA from its statistics, on
CPU from the profiler's record of every tensor allocation and free (each event carries the
allocator's running total of live bytes), so a figure is the exact sum of live tensor storages.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from _timing import in_turns
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.checkpoint import checkpoint

from ssltk.models import build_model
from ssltk.models.revnet import CompactZeroPadMaxPool, ReversibleStage

MiB = 2.0**20
STAGES = ("block1", "block2", "block3", "block4")


class MemoryTrace:
    """Live tensor bytes above the level at entry: the peak inside the context, the level at
    each :meth:`mark`, and the op that was running at the peak."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.peak, self.levels, self.peak_op = 0, {}, ""

    def __enter__(self) -> MemoryTrace:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def mark(self, name: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.levels[name] = torch.cuda.memory_allocated() - self._start
        else:
            with record_function(f"mark::{name}"):
                pass

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._start
            return
        self._prof.__exit__(*exc)
        self._read_cpu_events()

    def _read_cpu_events(self) -> None:
        from torch._C._profiler import _EventType  # the profiler's event tree (no public API)

        allocations, marks = [], {}
        stack = [(e, "") for e in self._prof.profiler.kineto_results.experimental_event_tree()]
        while stack:
            event, parent = stack.pop()
            if event.tag == _EventType.Allocation:
                fields = event.extra_fields
                allocations.append((event.start_time_ns, fields.alloc_size, fields.total_allocated))
                allocations[-1] += (parent,)
            elif event.name.startswith("mark::"):
                marks[event.name.removeprefix("mark::")] = event.start_time_ns
            stack.extend((child, event.name) for child in event.children)
        allocations.sort()
        if not allocations:
            return
        start = allocations[0][2] - allocations[0][1]
        top = max(allocations, key=lambda a: a[2])
        self.peak, self.peak_op = top[2] - start, top[3]
        for name, when in marks.items():
            before = [a for a in allocations if a[0] <= when]
            self.levels[name] = before[-1][2] - start if before else 0


class SavedBytes:
    """Bytes autograd saves for backward inside the context (each storage once, parameters
    excluded), as ``saved_tensors_hooks`` see them."""

    def __init__(self, model: nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


class CheckpointedUnit(nn.Module):
    """A reversible unit run under ``torch.utils.checkpoint`` (the usual alternative)."""

    def __init__(self, unit: nn.Module) -> None:
        super().__init__()
        self.unit = unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.unit, x, use_reentrant=False)


def set_memory_saving(model: nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, ReversibleStage | CompactZeroPadMaxPool):
            module.memory_saving = enabled


def checkpoint_units(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, ReversibleStage):
            module.units = nn.ModuleList(CheckpointedUnit(u) for u in module.units)
    return model


def revnet_ways(width: int, device: torch.device) -> dict[str, nn.Module]:
    """Plain, memory-saving and checkpoint-per-unit RevNet50 with the same weights."""
    torch.manual_seed(0)
    plain = build_model("revnet50", widening=width, num_classes=10, memory_saving=False)
    saving = copy.deepcopy(plain)
    set_memory_saving(saving, True)
    ways = {
        "plain": plain,
        "memory saving": saving,
        "checkpoint/unit": checkpoint_units(copy.deepcopy(plain)),
    }
    return {name: m.to(device).train() for name, m in ways.items()}


def measure_step(
    model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], device: torch.device
) -> dict[str, float]:
    """Saved bytes, bytes held after the forward pass, and the step's peak (forward + backward),
    each above the level before the step; the parameters' gradients start unset."""
    model.zero_grad(set_to_none=True)
    with MemoryTrace(device) as trace:
        with SavedBytes(model) as saved:
            loss = loss_fn(model)
        trace.mark("forward")
        loss.backward()
        del loss
    held = trace.levels["forward"]
    return {
        "saved": saved.total,
        "held": held,
        "peak": trace.peak,
        "transient": trace.peak - held,
        "peak_op": trace.peak_op,
    }


def time_steps(
    models: dict[str, nn.Module],
    loss_fn: Callable[[nn.Module], torch.Tensor],
    steps: int,
    device: torch.device,
) -> dict[str, tuple[float, float]]:
    """(fastest, median) forward + backward time per model, models warmed up already. On CPU the
    process's CPU time (run it on one thread): other processes' load barely moves it, where a
    shared machine makes wall-clock ratios noise. The models take turns, so that what noise
    remains hits all alike."""

    def step(model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model).backward()

    clock = time.perf_counter if device.type == "cuda" else time.process_time
    calls = {name: partial(step, model) for name, model in models.items()}
    times = in_turns(calls, steps, device, warmup=0, clock=clock)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    cos = (torch.dot(a, b) / (a.norm() * b.norm())).item()
    return math.degrees(math.acos(min(1.0, max(-1.0, cos))))


def mib(n: float) -> str:
    return f"{n / MiB:.1f}"


def load_note() -> str:
    """The 1-minute load average and core count, for reading the timings."""
    try:
        return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    except OSError:
        return "load average unknown"
