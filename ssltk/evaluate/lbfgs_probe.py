"""Probe ``lbfgs``, the paper's main protocol: :mod:`ssltk.evaluate.lbfgs` fitted on the cached
train features of each layer, its L2 strength chosen on ``val`` when ``eval.lbfgs.l2`` lists more
than one, scored on the report split."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ssltk.evaluate import lbfgs
from ssltk.evaluate.finite import require_finite
from ssltk.evaluate.memory import plan_probe, require_fit
from ssltk.evaluate.probe import Figures, ProbeInputs, register_probe

__all__ = ["fit_lbfgs"]


@register_probe("lbfgs")
def fit_lbfgs(inputs: ProbeInputs) -> Figures:
    section, report = inputs.section, inputs.features[inputs.report_split]
    train, val = inputs.features["train"], inputs.features.get("val")
    on_device = _array_module_for(inputs.device.type)
    options = {
        "num_classes": inputs.splits["train"].num_classes,
        "max_iter": section.max_iter,
        "tol": section.tol,
    }
    figures: Figures = {}
    for layer in inputs.layers:
        clock = time.perf_counter()
        rows, dim = train.layers[layer].shape
        plan = plan_probe(
            rows,
            dim,
            options["num_classes"],
            device=inputs.device.type,
            dtype=str(train.layers[layer].dtype),
            available=_free_bytes(inputs.device.type),
        )
        inputs.log(f"probe lbfgs {layer}: {plan.describe()}")
        require_fit(plan, layer)  # before anything is allocated
        if val is None:  # a single strength: nothing to choose
            fit = lbfgs.fit(on_device(train.layers[layer]), train.labels, section.l2[0], **options)
            chosen = {}
        else:
            fit = lbfgs.fit_path(
                on_device(train.layers[layer]),
                train.labels,
                val.layers[layer],  # scored on the device a chunk at a time
                val.labels,
                section.l2,
                **options,
            )
            point = next(p for p in fit.points if p.l2 == fit.l2)
            chosen = {"val_top1": point.val.top1}
        probe = fit if isinstance(fit, lbfgs.LinearProbe) else fit.probe
        require_finite(probe.weight, "probe weights", layer, "train")
        require_finite(probe.bias, "probe bias", layer, "train")
        logits = probe.logits(report.layers[layer], xp=_array_module(inputs.device.type))
        require_finite(logits, "logits", layer, inputs.report_split)
        top1, top5 = (lbfgs.topk_accuracy(logits, report.labels, k) for k in (1, 5))
        figures[layer] = {"top1": top1, "top5": top5, "l2": fit.l2, **chosen}
        inputs.log(
            f"probe lbfgs {layer}: top-1 {top1:.4f} on {inputs.report_split} "
            f"(l2 {fit.l2:g}, {time.perf_counter() - clock:.1f} s)"
        )
    return figures


def _array_module(device_type: str) -> Any:
    if device_type != "cuda":
        return np
    import cupy

    return cupy


def _free_bytes(device_type: str) -> int | None:
    """Free device memory on CUDA; on the CPU what the plan's streaming decides on its own."""
    if device_type != "cuda":
        return None
    import torch

    return int(torch.cuda.mem_get_info()[0])


def _array_module_for(device_type: str) -> Callable[[Any], Any]:
    """Features go to the GPU as CuPy arrays when evaluating on CUDA (the probe's code is the
    same on both array modules), copied a chunk at a time into their one device array, in their
    cache dtype; on CPU they stay NumPy (memory-mapped: see the plan)."""
    if device_type != "cuda":
        return lambda array: array
    import cupy

    def to_device(array: Any) -> Any:
        out = cupy.empty(array.shape, dtype=array.dtype)
        for start in range(0, len(array), lbfgs.CHUNK_ROWS):
            out[start : start + lbfgs.CHUNK_ROWS] = cupy.asarray(
                np.asarray(array[start : start + lbfgs.CHUNK_ROWS])
            )
        return out

    return to_device
