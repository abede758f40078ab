"""One linear evaluation: features of every requested layer, the probe, and where results go.

Results are logged to an MLflow run (``ssltk.kind`` eval or baseline) as ``probe/<method>/top1/
<layer>`` and ``top5``, written back onto the pretraining run so the MLflow UI's compare view
lists pretext × arch × widening × accuracy, and written to ``<out>/metrics.json`` for DVC.
Each layer's figures carry how they were measured (``ssltk.probe.<method>.<layer>``), so a report
can tell them from figures of another split, pooling, probe or earlier weights. Figures of weights
that are not a finished run's final checkpoint stay on the eval run. Every stage is checked to be
finite. ``<out>/eval.json`` names the eval run in progress, so a run whose process died is marked
KILLED by the next evaluation in the same folder.
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
from ssltk.data.dataset import PreparedDataset, PreparedSplit
from ssltk.errors import UserError
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

    def metrics(self) -> dict[str, float]:
        """``probe/<method>/<figure>/<layer>`` for MLflow."""
        return {
            tracking.probe_metric(self.method, name, layer): value
            for layer, figures in self.layers.items()
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


def evaluate(
    target: EvalTarget, out_dir: Path, *, device: torch.device, progress: bool = True
) -> EvalResult:
    """Evaluate ``target`` with ``target.config.eval``; log it; write ``out_dir/metrics.json``."""
    config, ev = target.config, target.config.eval
    dataset = PreparedDataset.for_config(config)
    val = needs_val(ev.method, getattr(ev, ev.method, None))
    needed = ["train", ev.report_split] + (["val"] if val else [])
    for name in dict.fromkeys(needed):
        if name not in dataset.splits:
            raise UserError(
                f"eval: the prepared data has no {name!r} split (has {', '.join(dataset.splits)})"
                + (
                    f"; eval.method={ev.method} reads it: set data.val_fraction > 0"
                    if name == "val"
                    else ""
                )
            )
    splits = {name: dataset.split(name) for name in dict.fromkeys(needed)}
    target.task.to(device).eval()
    layers = resolve_layers(target, splits["train"], ev.layers)
    with run_directory(out_dir):
        return _evaluate(target, splits, layers, dataset.content_hash, out_dir, device, progress)


def _evaluate(
    target: EvalTarget,
    splits: dict[str, PreparedSplit],
    layers: list[str],
    data_hash: str,
    out_dir: Path,
    device: torch.device,
    progress: bool,
) -> EvalResult:
    ev = target.config.eval
    started = time.perf_counter()
    _end_dead_run(target, out_dir)
    (out_dir / METRICS_JSON).unlink(missing_ok=True)  # a failed evaluation leaves no figures
    run = _start_run(target, data_hash, device, list(splits))
    _write_eval_record(out_dir, run, "running")
    try:
        with deterministic_mode():
            features = _features(target, splits, layers, data_hash, out_dir, device, progress)
            for name, split_features in features.items():
                for layer in layers:
                    require_finite(split_features.layers[layer], "features", layer, name)
            figures = _probe(target, splits, layers, features, device, out_dir)
        result = EvalResult(run.run_id, ev.method, ev.report_split, figures)
        result.seconds = time.perf_counter() - started
        _record(target, run, result, out_dir)
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
    target: EvalTarget, data_hash: str, device: torch.device, splits: list[str]
) -> tracking.TrackedRun:
    tags = {
        tracking.TAG_WEIGHTS: target.weights,
        tracking.TAG_WEIGHTS_STATE: target.unfinished or "final",
    }
    if target.checkpoint_sha256 is not None:
        tags[tracking.TAG_CHECKPOINT] = target.checkpoint_sha256
    data = {"data_hash": data_hash, "splits": splits}
    if target.kind == tracking.KIND_BASELINE:
        return tracking.start_baseline_run(
            target.config, device=str(device), extra_tags=tags, **data
        )
    tags[tracking.TAG_DATA_HASH + ".eval"] = data_hash
    return tracking.start_eval_run(
        target.config, target.pretrain_run_id, device=str(device), extra_tags=tags, **data
    )


def _features(
    target: EvalTarget,
    splits: dict[str, PreparedSplit],
    layers: list[str],
    data_hash: str,
    out_dir: Path,
    device: torch.device,
    progress: bool,
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
    cache = FeatureCache(ev.cache_dir if ev.cache_dir is not None else out_dir / "features")
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
    out_dir: Path | None = None,
) -> Figures:
    ev = target.config.eval
    inputs = ProbeInputs(
        target,
        splits,
        layers,
        features,
        getattr(ev, ev.method, None),
        ev.report_split,
        device,
        _log,
        out_dir,
    )
    return PROBES.load(ev.method).code(inputs)


#: Figures copied onto the pretraining run: what the MLflow compare view and ``ssltk report`` read
#: (``val_top1`` chooses the best layer without looking at the reported split).
_WRITTEN_BACK = ("top1", "top5", "val_top1")


def measurement(target: EvalTarget, figures: dict[str, float]) -> dict[str, Any]:
    """How one layer's ``figures`` were measured: the ``ssltk.probe.<method>.<layer>`` tag."""
    return {
        **tracking.probe_measurement(target.config.eval),
        "weights_sha256": target.weights,
        "checkpoint_sha256": target.checkpoint_sha256,
        "figures": sorted(name for name in figures if name in _WRITTEN_BACK),
    }


def _record(
    target: EvalTarget, run: tracking.TrackedRun, result: EvalResult, out_dir: Path
) -> None:
    metrics = result.metrics()
    measured = {
        tracking.probe_tag(result.method, layer): json.dumps(
            measurement(target, figures), sort_keys=True, default=_plain
        )
        for layer, figures in result.layers.items()
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
        "weights_sha256": target.weights,
        "checkpoint_sha256": target.checkpoint_sha256,
        "weights_state": target.unfinished or "final",
        "measurement": tracking.probe_measurement(target.config.eval),
        "seconds": round(result.seconds, 1),
        "layers": result.layers,
    }
    text = json.dumps(summary, indent=2, sort_keys=True, default=_plain) + "\n"
    write_atomic(out_dir / METRICS_JSON, text.encode())


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else str(value)
