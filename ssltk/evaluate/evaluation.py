"""One linear evaluation: features of every requested layer, the probe, and where results go.

Results are logged to an MLflow run (``ssltk.kind`` eval or baseline) as ``probe/<method>/top1/
<layer>`` and ``top5``, written back onto the pretraining run so the MLflow UI's compare view
lists pretext × arch × widening × accuracy, and written to ``<out>/metrics.json`` for DVC.
Each layer's figures carry how they were measured (``ssltk.probe.<method>.<layer>``), so a report
can tell them from figures of another split, pooling, probe or earlier weights. Figures of weights
that are not a finished run's final checkpoint stay on the eval run. Every stage is checked to be
finite. ``<out>/eval.json`` names the eval run in progress, so a run whose process died is marked
KILLED by the next evaluation in the same folder.

The data evaluated on is ``eval.data`` (:mod:`ssltk.evaluate.eval_data`): on a dataset other than
the run's own, every figure, tag and feature-cache folder is keyed by that dataset. The probes in
``eval.also`` run on the same cached features beside ``eval.method``.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssltk import store, tracking
from ssltk.data.dataset import PreparedSplit
from ssltk.errors import UserError
from ssltk.evaluate.eval_data import EvalData, open_eval_data
from ssltk.evaluate.features import (
    FeatureCache,
    Features,
    extract_features,
    extraction_threads,
)
from ssltk.evaluate.finite import require_finite
from ssltk.evaluate.probe import Figures, ProbeInputs, needs_val
from ssltk.evaluate.target import EvalTarget
from ssltk.fsutil import WriteError, run_directory, write_atomic
from ssltk.registry import ARCHS, PROBES
from ssltk.train.determinism import deterministic_mode

__all__ = ["EvalResult", "evaluate", "resolve_layers"]

METRICS_JSON = "metrics.json"
EVAL_RECORD = "eval.json"
ALL_LAYERS = "all"


@dataclass
class EvalResult:
    run_id: str | None
    method: str
    split: str
    layers: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0
    #: None on the run's own data, else the evaluation dataset's key.
    dataset: str | None = None
    #: Figures of the ``eval.also`` probes, by method.
    also: dict[str, Figures] = field(default_factory=dict)

    def by_method(self) -> dict[str, Figures]:
        return {self.method: self.layers, **self.also}

    def metrics(self) -> dict[str, float]:
        """``probe/<method>/<figure>/<layer>[/<dataset>]`` for MLflow."""
        return {
            tracking.probe_metric(method, name, layer, self.dataset): value
            for method, figures_of in self.by_method().items()
            for layer, figures in figures_of.items()
            for name, value in figures.items()
        }


def resolve_layers(target: EvalTarget, split: PreparedSplit, requested: list[str]) -> list[str]:
    """``eval.layers`` checked against the backbone's endpoints (``all``: every one of them): its
    ``endpoints`` trait, or for a backbone that declares none, what the task's representation of
    one image holds."""
    available = list(ARCHS.member(target.config.model.arch).endpoints)
    if not available:
        probe = split.images(torch.arange(1)).to(_device_of(target))
        available = list(target.task.representation(probe, None))
    if requested == [ALL_LAYERS]:
        return available
    for layer in requested:
        if layer not in available:
            raise UserError(
                f"eval.layers: {target.config.model.arch} has no endpoint {layer!r}; "
                f"available: {', '.join(available)} (or {ALL_LAYERS})"
            )
    return list(dict.fromkeys(requested))


def _device_of(target: EvalTarget) -> torch.device:
    return next(target.task.parameters()).device


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def evaluation_data(target: EvalTarget) -> EvalData:
    """The prepared dataset ``target`` is evaluated on (``eval.data``), checked."""
    return open_eval_data(target.config, target.data_hash)


def evaluate(
    target: EvalTarget,
    out_dir: Path,
    *,
    device: torch.device,
    progress: bool = True,
    data: EvalData | None = None,
) -> EvalResult:
    """Evaluate ``target`` with ``target.config.eval`` on ``data`` (default: what ``eval.data``
    names); log it; write ``out_dir/metrics.json``."""
    ev = target.config.eval
    data = data or evaluation_data(target)
    dataset = data.dataset
    methods = list(dict.fromkeys([ev.method, *ev.also]))
    val = any(needs_val(m, getattr(ev, m, None)) for m in methods)
    needed = ["train", ev.report_split] + (["val"] if val else [])
    for name in dict.fromkeys(needed):
        if name not in dataset.splits:
            raise UserError(
                f"eval: the prepared data has no {name!r} split (has {', '.join(dataset.splits)})"
                + (
                    f"; eval.method={ev.method} (or eval.also) reads it: set data.val_fraction > 0"
                    if name == "val"
                    else ""
                )
            )
    splits = {name: dataset.split(name) for name in dict.fromkeys(needed)}
    for name, split in splits.items():
        if len(split) == 0:  # found now, not an hour into feature extraction
            raise UserError(
                f"eval: the {name!r} split of {dataset.directory} holds no images"
                + (" (eval.report_split)" if name == ev.report_split else "")
            )
    target.task.to(device).eval()
    layers = resolve_layers(target, splits["train"], ev.layers)
    with run_directory(out_dir):
        return _evaluate(target, splits, layers, data, out_dir, device, progress)


def _evaluate(
    target: EvalTarget,
    splits: dict[str, PreparedSplit],
    layers: list[str],
    data: EvalData,
    out_dir: Path,
    device: torch.device,
    progress: bool,
) -> EvalResult:
    ev = target.config.eval
    started = time.perf_counter()
    _end_dead_run(target, out_dir)
    (out_dir / METRICS_JSON).unlink(missing_ok=True)  # a failed evaluation leaves no figures
    run = _start_run(target, data, device, list(splits))
    _write_eval_record(out_dir, run, "running")
    try:
        with deterministic_mode():
            features = _features(
                target, splits, layers, data.content_hash, out_dir, device, progress, data.key
            )
            for name, split_features in features.items():
                for layer in layers:
                    require_finite(split_features.layers[layer], "features", layer, name)
            figures = _probe(target, splits, layers, features, device, out_dir=out_dir)
            also = {
                method: _probe(
                    target, splits, layers, features, device, method=method, out_dir=out_dir
                )
                for method in dict.fromkeys(ev.also)
                if method != ev.method
            }
        result = EvalResult(
            run.run_id, ev.method, ev.report_split, figures, dataset=data.key, also=also
        )
        result.seconds = time.perf_counter() - started
        _record(target, run, result, out_dir, data)
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        run.finish(status, failure=f"{type(err).__name__}: {err}")
        with suppress(WriteError):  # the failure may be this very disk
            _write_eval_record(out_dir, run, status.lower())
        raise
    _write_eval_record(out_dir, run, "finished")
    return result


def _write_eval_record(out_dir: Path, run: tracking.TrackedRun, status: str) -> None:
    record = {"status": status, "run_id": run.run_id, "tracking_uri": run.tracking_uri}
    write_atomic(out_dir / EVAL_RECORD, (json.dumps(record, indent=2) + "\n").encode())


def _end_dead_run(target: EvalTarget, out_dir: Path) -> None:
    """Mark KILLED the eval run that an earlier process in ``out_dir`` left RUNNING when it died
    (we hold the folder's lock, so that process is gone)."""
    try:
        record = json.loads((out_dir / EVAL_RECORD).read_text(encoding="utf-8"))
        run_id = record["run_id"] if record.get("status") == "running" else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    if not isinstance(run_id, str):
        return
    mlflow_client = store.client(target.config.tracking.resolved_uri())
    found = store.find_run(mlflow_client, run_id)
    if found is not None and found.info.status == "RUNNING":
        why = "the evaluation process died (found by the next evaluation in its folder)"
        mlflow_client.set_tag(run_id, tracking.TAG_FAILURE, why)
        mlflow_client.set_terminated(run_id, "KILLED")
        _log(f"eval: marked eval run {run_id} KILLED (its process died)")


def _start_run(
    target: EvalTarget, data: EvalData, device: torch.device, splits: list[str]
) -> tracking.TrackedRun:
    tags = {
        tracking.TAG_WEIGHTS: target.weights,
        tracking.TAG_WEIGHTS_STATE: target.unfinished or "final",
    }
    if target.checkpoint_sha256 is not None:
        tags[tracking.TAG_CHECKPOINT] = target.checkpoint_sha256
    if data.key is not None:
        tags[tracking.TAG_EVAL_DATA] = data.key
    inputs = {"data_hash": data.content_hash, "splits": splits, "eval_data": data.config.data}
    if target.kind == tracking.KIND_BASELINE:
        return tracking.start_baseline_run(
            target.config, device=str(device), extra_tags=tags, **inputs
        )
    tags[tracking.TAG_DATA_HASH + ".eval"] = data.content_hash
    return tracking.start_eval_run(
        target.config, target.pretrain_run_id, device=str(device), extra_tags=tags, **inputs
    )


def _features(
    target: EvalTarget,
    splits: dict[str, PreparedSplit],
    layers: list[str],
    data_hash: str,
    out_dir: Path,
    device: torch.device,
    progress: bool,
    dataset: str | None = None,
) -> dict[str, Features]:
    ev = target.config.eval
    identity: dict[str, Any] = {
        "weights": target.weights,
        "data_hash": data_hash,
        "pooling": ev.pooling,
        "max_features": ev.max_features,
        "task": target.config.pretext.model_dump(mode="json"),
        "model": target.config.model.model_dump(mode="json"),
        "dtype": ev.cache_dtype,
    }
    if ev.autocast != "none" and device.type == "cuda":
        identity["autocast"] = ev.autocast  # bf16 features differ from float32 ones
    if ev.workers > 0 and device.type == "cpu":
        identity["threads"] = extraction_threads(ev.workers)
    root = ev.cache_dir if ev.cache_dir is not None else out_dir / "features"
    if dataset is not None and ev.cache_dir is not None:  # a shared cache: a folder a dataset
        root = root / dataset
    cache = FeatureCache(root)
    out = {}
    for name, split in splits.items():
        out[name] = extract_features(
            target.task,
            split,
            layers,
            identity=identity,
            cache=cache,
            batch_size=ev.batch_size,
            max_features=ev.max_features,
            pooling=ev.pooling,
            device=device,
            progress=progress,
            dtype=ev.cache_dtype,
            workers=ev.workers,
            autocast=ev.autocast,
        )
        if progress and out[name].cached:
            _log(f"features {name}: read from the cache")
    return out


def _probe(
    target: EvalTarget,
    splits: dict[str, PreparedSplit],
    layers: list[str],
    features: dict[str, Features],
    device: torch.device,
    method: str | None = None,
    out_dir: Path | None = None,
) -> Figures:
    ev = target.config.eval
    method = method or ev.method
    inputs = ProbeInputs(
        target,
        splits,
        layers,
        features,
        getattr(ev, method, None),
        ev.report_split,
        device,
        _log,
        out_dir,
    )
    return PROBES.load(method).code(inputs)


#: Figures copied onto the pretraining run: what the MLflow compare view and ``ssltk report`` read
#: (``val_top1`` chooses the best layer without looking at the reported split).
_WRITTEN_BACK = ("top1", "top5", "val_top1")


def measurement(
    target: EvalTarget,
    figures: dict[str, float],
    method: str | None = None,
    data: EvalData | None = None,
) -> dict[str, Any]:
    """How one layer's ``figures`` were measured: the ``ssltk.probe.<method>.<layer>`` tag."""
    return {
        **tracking.probe_measurement(target.config.eval, method),
        "weights_sha256": target.weights,
        "checkpoint_sha256": target.checkpoint_sha256,
        "figures": sorted(name for name in figures if name in _WRITTEN_BACK),
        **({"data": data.describe(), "dataset": data.key} if data is not None else {}),
    }


def _record(
    target: EvalTarget,
    run: tracking.TrackedRun,
    result: EvalResult,
    out_dir: Path,
    data: EvalData | None = None,
) -> None:
    metrics = result.metrics()
    measured = {
        tracking.probe_tag(method, layer, result.dataset): json.dumps(
            measurement(target, figures, method, data), sort_keys=True, default=_plain
        )
        for method, figures_of in result.by_method().items()
        for layer, figures in figures_of.items()
    }
    run.log_figures(metrics, measured)
    if target.pretrain_run_id is not None and target.unfinished is None:
        headline = {
            k: v
            for k, v in metrics.items()
            if tracking.parse_probe_metric(k).figure in _WRITTEN_BACK
        }
        tracking.open_run(target.config, target.pretrain_run_id).log_figures(headline, measured)
    run.finish("FINISHED")
    summary = {
        "kind": target.kind,
        "method": result.method,
        "split": result.split,
        "run_id": result.run_id,
        "pretrain_run_id": target.pretrain_run_id,
        "task": target.config.pretext.task,
        "arch": target.config.model.arch,
        "widening": target.config.model.widening,
        "representation_size": target.config.model.representation_size,
        "weights_sha256": target.weights,
        "checkpoint_sha256": target.checkpoint_sha256,
        "weights_state": target.unfinished or "final",
        "measurement": tracking.probe_measurement(target.config.eval),
        "seconds": round(result.seconds, 1),
        "layers": result.layers,
        "also": {
            method: {
                "measurement": tracking.probe_measurement(target.config.eval, method),
                "layers": figures,
            }
            for method, figures in result.also.items()
        },
        "dataset": result.dataset,
        "data": data.describe() if data is not None else None,
        "data_hash": data.content_hash if data is not None else None,
    }
    text = json.dumps(summary, indent=2, sort_keys=True, default=_plain) + "\n"
    write_atomic(out_dir / METRICS_JSON, text.encode())


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else str(value)
