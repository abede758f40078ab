"""The L-BFGS probe's memory plan: one float16 copy of ImageNet-size features on a GPU, printed
before anything is allocated; one line naming what would fit when it does not; an upper bound of
what the CPU path allocates."""

from __future__ import annotations

import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ssltk.errors import UserError
from ssltk.evaluate import lbfgs, lbfgs_probe
from ssltk.evaluate.memory import GIB, plan_probe, require_fit

IMAGENET_TRAIN = 1_281_167  # ILSVRC-2012 train (the issue says 1.23 M; this is more)


def test_imagenet_pre_logits_plan_one_float16_copy_plus_a_chunk_on_an_80gb_gpu(capsys) -> None:
    plan = plan_probe(
        IMAGENET_TRAIN, 8192, 1000, device="cuda", dtype="float16", available=80 * GIB
    )
    copy = IMAGENET_TRAIN * 8192 * 2
    assert plan.features == copy
    assert plan.total <= 1.1 * copy + plan.chunk, (plan.total / copy, plan.describe())
    assert plan.fits
    print(plan.describe())
    line = capsys.readouterr().out
    assert "one float16 copy 19.55 GiB on the GPU" in line and "of 80.00 GiB free" in line
    # float32 caches would not fit a 40 GB card; the line names what would.
    big = plan_probe(IMAGENET_TRAIN, 8192, 1000, device="cuda", available=40 * GIB)
    assert big.features == 2 * copy and not big.fits
    with pytest.raises(UserError) as err:
        require_fit(big, "pre_logits")
    message = str(err.value)
    assert "\n" not in message and "pre_logits" in message
    assert "eval.device=cpu" in message and "eval.cache_dtype=float16" in message
    assert "eval.max_features" in message


def test_the_probe_prints_its_plan_and_stops_before_copying_to_the_device(monkeypatch) -> None:
    """On a GPU too small for the features: exit-2 error, the plan logged first, nothing copied."""
    monkeypatch.setattr(lbfgs_probe, "_free_bytes", lambda device_type: 1 * GIB)

    def no_copy(array):
        raise AssertionError("features were copied before the plan was checked")

    rows = np.lib.stride_tricks.as_strided(np.zeros(1, np.float16), (200_000, 4096), (0, 0))
    features = SimpleNamespace(layers={"pre_logits": rows}, labels=np.zeros(200_000, np.int64))
    logged: list[str] = []
    inputs = SimpleNamespace(
        section=SimpleNamespace(l2=[0.1], max_iter=10, tol=1e-4),
        features={"train": features, "test": features},
        report_split="test",
        splits={"train": SimpleNamespace(num_classes=1000)},
        layers=["pre_logits"],
        device=torch.device("cuda"),
        log=logged.append,
    )
    monkeypatch.setattr(lbfgs_probe, "_array_module_for", lambda device_type: no_copy)
    with pytest.raises(UserError, match=r"needs 2\.12 GiB on cuda but 1\.00 GiB is free"):
        lbfgs_probe.fit_lbfgs(inputs)
    assert logged and logged[0].startswith("probe lbfgs pre_logits: memory plan (cuda)")


def test_the_cpu_plan_bounds_what_the_resident_probe_allocates() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 256)).astype(np.float32)
    y = rng.integers(0, 10, size=len(X))
    plan = plan_probe(len(X), 256, 10, device="cpu", available=64 * GIB)
    assert plan.resident and plan.features == X.nbytes
    tracemalloc.start()
    lbfgs.fit(X, y, 1e-2, max_iter=5)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert X.nbytes <= peak <= plan.total, (peak, plan.total)
    streamed = plan_probe(len(X), 256, 10, device="cpu", available=X.nbytes)
    assert not streamed.resident and streamed.features == 0  # streamed from disk


def test_eval_lbfgs_tol_and_max_iter_reach_the_solver(monkeypatch) -> None:
    """The schema's probe settings, not the solver's defaults, end each fit."""
    from ssltk.sections import LbfgsConfig

    seen: list[dict] = []
    real_fit_path = lbfgs.fit_path

    def recording_fit_path(*args, **kwargs):
        seen.append(kwargs)
        return real_fit_path(*args, **kwargs)

    monkeypatch.setattr(lbfgs, "fit_path", recording_fit_path)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 16)).astype(np.float32)
    y = rng.integers(0, 3, size=len(X))
    split = SimpleNamespace(layers={"pre_logits": X}, labels=y)
    section = LbfgsConfig(l2=[0.1, 0.01], max_iter=7, tol=3e-3)
    inputs = SimpleNamespace(
        section=section,
        features={"train": split, "val": split, "test": split},
        report_split="test",
        splits={"train": SimpleNamespace(num_classes=3)},
        layers=["pre_logits"],
        device=torch.device("cpu"),
        log=lambda line: None,
    )
    figures = lbfgs_probe.fit_lbfgs(inputs)
    assert [(k["tol"], k["max_iter"]) for k in seen] == [(3e-3, 7)]
    assert 0 <= figures["pre_logits"]["top1"] <= 1
    with pytest.raises(ValueError):
        LbfgsConfig(tol=0)
