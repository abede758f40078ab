"""Atomic, hash-verified checkpoints and the choice of which one to resume from.

A checkpoint ``ckpt-<step>.pt`` is written to a temporary file, fsync'ed and renamed into place;
then its SHA-256 is written beside it as ``ckpt-<step>.pt.sha256`` (``sha256sum -c`` format), the
same way. A checkpoint counts only once its sidecar exists and matches, so a process killed at any
point leaves either a complete, verifiable checkpoint or one that is reported and skipped (in one
line, as is one whose structure its caller's ``validate`` rejects). Pruning keeps the newest
checkpoints that verify, so a corrupt file never takes the place of a good one. Checkpoints hold
tensors and plain Python values only and load with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssltk.fsutil import write_atomic

_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")
SIDECAR_SUFFIX = ".sha256"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or not loadable."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    sha256: str


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(state: dict[str, Any], directory: Path, step: int) -> CheckpointInfo:
    """Serialise ``state`` as ``directory/ckpt-<step>.pt`` with its SHA-256 sidecar."""
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path = directory / checkpoint_name(step)
    sidecar_path(path).unlink(missing_ok=True)  # a stale sidecar must never vouch for new bytes
    write_atomic(path, data)
    write_atomic(sidecar_path(path), f"{digest}  {path.name}\n".encode())
    return CheckpointInfo(path, step, digest)


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint file in ``directory``, newest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def verify_checkpoint(path: Path) -> str:
    """The file's SHA-256 if it matches its sidecar; otherwise :class:`CheckpointError`."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        raise CheckpointError(f"{path}: no {sidecar.name} (the write did not finish)")
    expected = sidecar.read_text().split()
    if not expected or not re.fullmatch(r"[0-9a-f]{64}", expected[0]):
        raise CheckpointError(f"{sidecar}: not a SHA-256 line")
    actual = sha256_file(path)
    if actual != expected[0]:
        raise CheckpointError(
            f"{path}: SHA-256 {actual[:12]}… does not match {sidecar.name} ({expected[0][:12]}…)"
        )
    return actual


def _one_line(err: BaseException) -> str:
    """A loader's failure in one line (torch's refusal of pickled code is a page of advice)."""
    text = str(err)
    refused = re.search(r"GLOBAL (\S+)", text)
    if isinstance(err, pickle.UnpicklingError) and refused:
        return f"refused: it would import {refused.group(1)} (only tensors and plain values load)"
    return f"{type(err).__name__}: {' '.join(text.split())[:300]}"


def load_checkpoint(
    path: Path,
    map_location: str | torch.device = "cpu",
    validate: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Verify and load one checkpoint (tensors and plain values only).

    ``validate`` checks the loaded dict's structure and raises :class:`CheckpointError` if it is
    not a checkpoint its caller can resume from.
    """
    verify_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a corrupt archive can fail in many ways
        raise CheckpointError(f"{path}: cannot be loaded ({_one_line(err)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(state).__name__}")
    if validate is not None:
        try:
            validate(state)
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None
    return state


def latest_valid_checkpoint(
    directory: Path,
    map_location: str | torch.device = "cpu",
    validate: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[CheckpointInfo, dict[str, Any]] | None:
    """The newest checkpoint that verifies, loads and passes ``validate``; each one skipped is
    reported on stderr in one line."""
    for step, path in list_checkpoints(directory):
        try:
            state = load_checkpoint(path, map_location, validate)
        except CheckpointError as err:
            print(f"warning: skipping checkpoint: {err}", file=sys.stderr)
            continue
        return CheckpointInfo(path, step, sha256_file(path)), state
    return None


def _verifies(path: Path) -> bool:
    try:
        verify_checkpoint(path)
    except (CheckpointError, OSError):
        return False
    return True


def prune_checkpoints(
    directory: Path, keep: int, fresh: CheckpointInfo | None = None
) -> list[Path]:
    """Keep the ``keep`` newest checkpoints that verify; delete every other one (an unverifiable
    file can never be resumed from, so it must not take a place) and stale temporary files.

    ``fresh`` is a checkpoint just written by :func:`save_checkpoint`, trusted without rehashing.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    removed = []
    kept = 0
    for _, path in list_checkpoints(directory):
        if kept < keep and ((fresh is not None and path == fresh.path) or _verifies(path)):
            kept += 1
            continue
        for victim in (path, sidecar_path(path)):
            if victim.exists():
                victim.unlink()
                removed.append(victim)
    for tmp in directory.glob(".ckpt-*.tmp"):
        tmp.unlink()
        removed.append(tmp)
    return removed


def remove_checkpoints(directory: Path) -> None:
    """Delete every checkpoint in ``directory`` (``--restart``)."""
    for _, path in list_checkpoints(directory):
        path.unlink()
        sidecar_path(path).unlink(missing_ok=True)
    for pattern in ("*.pt.sha256", ".ckpt-*.tmp"):
        for stray in directory.glob(pattern):
            stray.unlink()
