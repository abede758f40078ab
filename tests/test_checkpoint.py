"""Checkpoints: atomic writes with a SHA-256 sidecar, safe loading, broken ones skipped, pruning."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from ssltk.fsutil import WriteError
from ssltk.train.checkpoint import (
    CheckpointError,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_checkpoints,
    save_checkpoint,
    sidecar_path,
    write_atomic,
)
from ssltk.train.determinism import rng_state, seed_everything, set_rng_state
from ssltk.train.rundir import write_json


def state(step: int) -> dict:
    return {"model": {"w": torch.full((3, 2), float(step))}, "step": step, "meta": [1.5, None, "x"]}


def test_save_writes_file_and_matching_sidecar(tmp_path: Path):
    info = save_checkpoint(state(7), tmp_path, 7)
    assert info.path == tmp_path / "ckpt-00000007.pt" and info.step == 7
    assert hashlib.sha256(info.path.read_bytes()).hexdigest() == info.sha256
    assert sidecar_path(info.path).read_text() == f"{info.sha256}  ckpt-00000007.pt\n"
    loaded = load_checkpoint(info.path)
    assert torch.equal(loaded["model"]["w"], torch.full((3, 2), 7.0))
    assert loaded["meta"] == [1.5, None, "x"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_same_state_gives_same_bytes(tmp_path: Path):
    a = save_checkpoint(state(1), tmp_path / "a", 1)
    b = save_checkpoint(state(1), tmp_path / "b", 1)
    assert a.sha256 == b.sha256


def test_newest_valid_is_chosen_and_broken_ones_are_reported(tmp_path: Path, capsys):
    for step in (2, 4, 6, 8):
        save_checkpoint(state(step), tmp_path, step)
    newest = tmp_path / "ckpt-00000008.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    sidecar_path(tmp_path / "ckpt-00000006.pt").unlink()  # killed before the sidecar
    found = latest_valid_checkpoint(tmp_path)
    assert found is not None
    info, loaded = found
    assert info.step == 4 and loaded["step"] == 4
    err = capsys.readouterr().err
    assert "ckpt-00000008.pt" in err and "does not match" in err
    assert "no ckpt-00000006.pt.sha256" in err
    assert err.count("warning: skipping checkpoint") == 2


def test_corrupt_bytes_with_matching_sidecar_are_not_loaded(tmp_path: Path):
    info = save_checkpoint(state(3), tmp_path, 3)
    garbage = b"not a zip archive"
    info.path.write_bytes(garbage)
    sidecar_path(info.path).write_text(f"{hashlib.sha256(garbage).hexdigest()}  {info.path.name}\n")
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        load_checkpoint(info.path)


class Opaque:
    """Not a tensor nor a plain value: weights_only loading must refuse it."""


def test_loading_never_unpickles_code(tmp_path: Path):
    info = save_checkpoint({"thing": Opaque()}, tmp_path, 1)
    with pytest.raises(CheckpointError, match=r"ckpt-00000001\.pt"):
        load_checkpoint(info.path)


def test_empty_or_missing_directory_has_no_checkpoint(tmp_path: Path):
    assert latest_valid_checkpoint(tmp_path / "nowhere") is None
    assert latest_valid_checkpoint(tmp_path) is None


def test_prune_keeps_the_newest(tmp_path: Path):
    for step in (1, 2, 3, 10):
        save_checkpoint(state(step), tmp_path, step)
    (tmp_path / ".ckpt-00000011.pt.tmp").write_bytes(b"partial")
    prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-00000003.pt",
        "ckpt-00000003.pt.sha256",
        "ckpt-00000010.pt",
        "ckpt-00000010.pt.sha256",
    ]
    remove_checkpoints(tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(tmp_path, keep=0)


def test_rng_states_round_trip_through_a_checkpoint(tmp_path: Path):
    seed_everything(11)
    torch.rand(3), random.random(), np.random.rand()
    info = save_checkpoint({"rng": rng_state()}, tmp_path, 1)
    expected = (torch.rand(5), [random.random() for _ in range(3)], np.random.rand(4))
    seed_everything(99)
    set_rng_state(load_checkpoint(info.path)["rng"])
    again = (torch.rand(5), [random.random() for _ in range(3)], np.random.rand(4))
    assert torch.equal(expected[0], again[0])
    assert expected[1] == again[1]
    assert np.array_equal(expected[2], again[2])


# --------------------------------------------------------------------------------------------------
# A write that fails midway


class HalfWriter:
    """A file whose first ``write`` lands half its bytes, then fails as a full disk would."""

    def __init__(self, file: io.IOBase) -> None:
        self.file = file

    def write(self, data: bytes) -> int:
        self.file.write(bytes(data[: len(data) // 2]))
        self.file.flush()
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    def __getattr__(self, name: str):
        return getattr(self.file, name)

    def __enter__(self) -> HalfWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()


class Faults:
    """Fails the ``at``-th write to a file under ``root`` (``disk_full``) or the ``at``-th fsync of
    a regular file (``fsync``, EIO), from outside the code under test."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
        self.monkeypatch, self.root = monkeypatch, root

    def arm(self, kind: str, at: int = 1) -> None:
        count = 0
        if kind == "disk_full":
            real_open = io.open

            def failing_open(file, mode="r", *args, **kwargs):
                nonlocal count
                handle = real_open(file, mode, *args, **kwargs)
                writing = any(flag in mode for flag in "wax+")
                if writing and isinstance(file, str | Path) and self.root in Path(file).parents:
                    count += 1
                    if count == at:
                        return HalfWriter(handle)
                return handle

            self.monkeypatch.setattr(builtins, "open", failing_open)
            self.monkeypatch.setattr(io, "open", failing_open)
        elif kind == "fsync":
            real_fsync = os.fsync

            def failing_fsync(fd: int) -> None:
                nonlocal count
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    count += 1
                    if count == at:
                        raise OSError(errno.EIO, "Input/output error (injected)")
                real_fsync(fd)

            self.monkeypatch.setattr(os, "fsync", failing_fsync)
        else:
            raise ValueError(kind)

    def disarm(self) -> None:
        self.monkeypatch.undo()


@pytest.fixture
def faults(tmp_path: Path) -> Faults:
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield Faults(monkeypatch, tmp_path)


def checkpoint_bytes(step: int) -> bytes:
    buffer = io.BytesIO()
    torch.save(state(step), buffer)
    return buffer.getvalue()


def json_bytes(path: Path, data: dict) -> bytes:
    write_json(path, data)
    return path.read_bytes()


#: The files of a run directory and how each is (re)written: JSON records through the engine's
#: writer, checkpoint bytes and sidecar lines through ``write_atomic``.
FILES = {
    "run.json": lambda path, n: write_json(path, {"status": "running", "global_step": n}),
    "metrics.json": lambda path, n: write_json(path, {"loss": 1.0 / (n + 1), "steps": n}),
    "ckpt-00000004.pt": lambda path, n: write_atomic(path, checkpoint_bytes(n)),
    "ckpt-00000004.pt.sha256": lambda path, n: write_atomic(
        path, f"{hashlib.sha256(checkpoint_bytes(n)).hexdigest()}  ckpt-00000004.pt\n".encode()
    ),
}


@pytest.mark.parametrize("kind", ["disk_full", "fsync"])
@pytest.mark.parametrize("name", list(FILES))
def test_a_failed_write_leaves_the_previous_content_intact(tmp_path, faults, name, kind):
    path = tmp_path / name
    write = FILES[name]
    write(path, 1)
    before = path.read_bytes()
    faults.arm(kind)
    with pytest.raises(WriteError, match="injected"):  # one line for the user, not a traceback
        write(path, 2)
    faults.disarm()
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))  # and no temporary file left behind
    if name.endswith(".json"):
        assert json.loads(before)  # still a whole record
    write(path, 2)  # the next attempt succeeds
    assert path.read_bytes() != before


@pytest.mark.parametrize("kind", ["disk_full", "fsync"])
@pytest.mark.parametrize("failing", ["checkpoint", "sidecar"])
def test_a_failed_save_leaves_the_previous_checkpoint_the_newest_valid(
    tmp_path, faults, failing, kind
):
    old = save_checkpoint(state(4), tmp_path, 4)
    files = {p: p.read_bytes() for p in (old.path, sidecar_path(old.path))}
    faults.arm(kind, at=1 if failing == "checkpoint" else 2)
    with pytest.raises(WriteError, match="injected"):
        save_checkpoint(state(8), tmp_path, 8)
    faults.disarm()
    assert all(path.read_bytes() == content for path, content in files.items())
    found = latest_valid_checkpoint(tmp_path)
    assert found is not None and found[0].step == 4 and found[1]["step"] == 4
