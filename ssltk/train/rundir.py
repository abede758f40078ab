"""What a pretraining run leaves in its directory, for people, ``ssltk eval`` and DVC.

``run.json`` (status, MLflow ids, the checkpoint relative to the directory and its SHA-256, the
position; read back by :func:`read_run_record`, which checks its types), ``metrics.json``
(the final epoch means, written once the run finishes), ``curve.csv`` (step metrics for
``dvc plots``) and ``checkpoints/``. The directory is locked for the run's lifetime.
"""

from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ssltk import fsutil, tracking
from ssltk.config import Config
from ssltk.errors import UserError
from ssltk.train.checkpoint import CheckpointInfo

RUN_JSON = "run.json"
METRICS_JSON = "metrics.json"
CURVE_CSV = "curve.csv"
CHECKPOINT_DIR = "checkpoints"


class RunRecord(BaseModel):
    """The fields of ``run.json`` that other commands read, with their JSON types."""

    model_config = ConfigDict(extra="allow", strict=True)

    status: str
    run_id: str | None = None
    experiment: str | None = None
    tracking_uri: str | None = None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    task: str | None = None
    arch: str | None = None
    widening: int | None = None
    global_step: int | None = None
    total_steps: int | None = None

    def checkpoint_path(self, run_dir: Path) -> Path | None:
        """The checkpoint file: relative to ``run_dir`` (absolute in records of older versions,
        found by name under ``run_dir/checkpoints`` when the directory has moved since)."""
        if not self.checkpoint:
            return None
        path = Path(self.checkpoint)
        if not path.is_absolute():
            return run_dir / path
        moved = run_dir / CHECKPOINT_DIR / path.name
        return moved if not path.is_file() and moved.is_file() else path


def read_run_record(run_dir: Path) -> RunRecord:
    """``run_dir/run.json``, its types checked: a one-line ``UserError`` naming the file and the
    key when it is missing, unreadable or holds a value of the wrong type."""
    path = Path(run_dir) / RUN_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{run_dir}: no {RUN_JSON} (not a pretraining run directory)") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot be read ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(data).__name__}")
    try:
        return RunRecord.model_validate(data)
    except ValidationError as err:
        first = min(err.errors(), key=lambda e: e["type"] == "missing")  # a wrong value first
        key = ".".join(str(part) for part in first["loc"]) or "(top level)"
        found = "missing" if first["type"] == "missing" else f"found {first['input']!r}"[:80]
        raise UserError(f"{path}: {key}: {first['msg'].lower()} ({found})") from None


def default_out_dir(config: Config) -> Path:
    return Path("runs") / tracking.run_name(config)


def write_json(path: Path, data: dict[str, Any]) -> None:
    fsutil.write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def hold(out_dir: Path, main: bool) -> AbstractContextManager[Path]:
    """The run directory, locked by the main process (the other ranks only make sure it exists)."""
    if main:
        return fsutil.run_directory(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return nullcontext(out_dir)


class CurveFile:
    """Step metrics as CSV (``step,<name>,…``) for ``dvc plots``, appended at every flush.

    On resume the rows at or past the checkpoint's step (and a line cut short by a kill) are
    dropped, so an interrupted and resumed run writes the same file as an uninterrupted one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)

    def truncate(self, steps: int) -> None:
        """Keep the rows of the first ``steps`` updates."""
        if not self.path.is_file():
            return
        header, *rows = self.path.read_text().splitlines() or [""]
        width = len(header.split(","))
        kept = [
            row
            for row in rows
            if len(row.split(",")) == width
            and row.split(",")[0].isdigit()
            and int(row.split(",")[0]) < steps
        ]
        self.path.write_text("".join(f"{line}\n" for line in [header, *kept]))

    def append(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        if not rows:
            return
        names = list(rows[0][1])
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with open(self.path, "a") as f:
            if new:
                f.write(",".join(["step", *names]) + "\n")
            for step, values in rows:
                f.write(",".join([str(step), *(repr(values[n]) for n in names)]) + "\n")


class RunDir:
    """The files of one run directory (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.checkpoints = root / CHECKPOINT_DIR
        self.curve = CurveFile(root / CURVE_CSV)

    def clear_records(self) -> None:
        """Forget an earlier run's records (``--restart``; its checkpoints go separately)."""
        for name in (RUN_JSON, METRICS_JSON, CURVE_CSV):
            (self.root / name).unlink(missing_ok=True)

    def read_record(self) -> dict[str, Any]:
        """``run.json`` as a dict; empty if it is missing or unreadable."""
        try:
            data = json.loads((self.root / RUN_JSON).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_record(
        self,
        config: Config,
        *,
        status: str,
        tracked: tracking.TrackedRun | None,
        checkpoint: CheckpointInfo | None,
        position: dict[str, int],
        data_hash: str,
        data_settings: str,
        world_size: int,
        failure: str | None = None,
    ) -> None:
        """Write ``run.json``; ``position`` holds global_step, total_steps and steps_per_epoch."""
        self.root.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {
            "status": status,
            "run_id": tracked.run_id if tracked else None,
            "experiment_id": tracked.experiment_id if tracked else None,
            "experiment": config.tracking.experiment,
            "tracking_uri": tracked.tracking_uri if tracked else None,
            "checkpoint": (  # relative: the directory may be moved or read from elsewhere
                Path(os.path.relpath(checkpoint.path, self.root)).as_posix() if checkpoint else None
            ),
            "checkpoint_sha256": checkpoint.sha256 if checkpoint else None,
            "checkpoint_artifact": (
                f"{tracking.CHECKPOINT_ARTIFACT_DIR}/{checkpoint.path.name}" if checkpoint else None
            ),
            "task": config.pretext.task,
            "arch": config.model.arch,
            "widening": config.model.widening,
            **position,
            "data_hash": data_hash,
            "data_settings": data_settings,
            "world_size": world_size,
        }
        if failure:
            data["failure"] = failure
        write_json(self.root / RUN_JSON, data)

    def write_metrics(self, metrics: dict[str, float]) -> None:
        write_json(self.root / METRICS_JSON, metrics)
