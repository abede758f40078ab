"""Filesystems a cluster mounts: no flock support is one line naming the mount and the fix; a
SQLite store on a network filesystem is one warning, once."""

from __future__ import annotations

import errno
import fcntl
from pathlib import Path

import pytest

from ssltk import fsutil
from ssltk.errors import UserError
from ssltk.train import engine


def test_mount_of_finds_the_innermost_mount(tmp_path: Path):
    point, kind = fsutil.mount_of(tmp_path)
    assert Path(tmp_path).resolve().is_relative_to(point) and kind != "unknown"
    assert fsutil.mount_of(Path("/"))[0] == "/"


def test_a_filesystem_without_flock_is_one_line_naming_the_mount_and_the_fix(tmp_path, monkeypatch):
    def no_flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setattr(fsutil, "mount_of", lambda path: ("/lustre/scratch", "lustre"))
    with pytest.raises(UserError) as caught, fsutil.run_directory(tmp_path / "run"):
        pass
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "run") in message
    assert "lustre filesystem mounted at /lustre/scratch" in message and "-o flock" in message
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_a_sqlite_store_on_a_network_filesystem_is_warned_about_once(tmp_path, monkeypatch, capsys):
    mounts = {"nfs": ("/shared", "nfs4"), "local": ("/", "ext4")}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setattr(fsutil, "mount_of", lambda path: mounts["local"])
    engine.warn_network_store(uri)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(fsutil, "mount_of", lambda path: mounts["nfs"])
    engine.warn_network_store(uri)
    engine.warn_network_store(uri)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "nfs4 (/shared)" in lines[0] and "mlflow server" in lines[0]
    engine.warn_network_store("http://tracking:5000")
    assert capsys.readouterr().err == ""
