"""File operations that survive faults: atomic writes and locked run directories.

A write goes to a temporary file that is fsync'ed and renamed into place, so readers see all of it
or nothing; on any error the temporary file is removed and an ``OSError`` (full disk, read-only
folder) becomes a one-line :class:`WriteError`. A run directory is held through an advisory
``fcntl.flock`` on ``DIR/.lock``: the kernel drops it when its holder exits, however it exits, so a
stale lock never blocks, and a second process refuses at once, naming the holder's pid. A
filesystem mounted without lock support (Lustre without ``-o flock``) is one line naming the mount
and the fix.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ssltk.errors import UserError

LOCK_NAME = ".lock"
#: What a failing ``flock`` says on a filesystem that does not implement it.
_NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}
#: Filesystem types whose files live on another machine.
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "lustre", "cifs", "smb3", "smbfs", "gpfs", "beegfs", "fuse.glusterfs", "ceph"}
)


def mount_of(path: Path) -> tuple[str, str]:
    """``(mount point, filesystem type)`` of the mount holding ``path`` (from /proc/mounts)."""
    target = os.path.realpath(path)
    best = ("/", "unknown")
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fields[2])
    return best


class WriteError(UserError):
    """A file could not be written (no space left, read-only or missing folder)."""


class DirectoryBusy(UserError):
    """Another process holds the directory's lock."""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or all of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise WriteError(f"cannot write {path}: {err.strerror or err}") from None
        raise


def reserve(path: Path) -> None:
    """Allocate every block of ``path`` now, so a full disk is an ``OSError`` here, not a SIGBUS
    when a memory map of it is written later (filesystems without fallocate are left as they are).
    """
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(fd: int) -> str:
    with suppress(OSError):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return f"pid {text}"
    return "pid unknown"


def _lock(path: Path, *, wait: bool) -> int:
    """An fd holding an exclusive flock on ``path`` (created if missing)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise DirectoryBusy(
                f"{path.parent} is in use by another ssltk process ({holder}); "
                "wait for it to finish or use another directory"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The holder may have removed the file between our open and flock: lock the new one.
        with suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)


@contextmanager
def locked(path: Path, *, wait: bool = False, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive advisory lock on file ``path``; without ``wait``, refuse at once
    (:class:`DirectoryBusy`) when another process holds it. The pid of the holder is kept in the
    file for that message. With ``remove`` the file is deleted on the way out (safe: a waiter that
    then gets the lock on the deleted file notices and locks a new one)."""
    try:
        fd = _lock(path, wait=wait)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as err:
        if err.errno in _NO_FLOCK:
            with suppress(OSError):  # nobody can hold a lock there: leave no lock file
                path.unlink()
            point, kind = mount_of(path)
            raise UserError(
                f"{path.parent}: the {kind} filesystem mounted at {point} does not support file "
                "locks (flock); remount it with -o flock (Lustre) or -o lock (NFS), or put the "
                "directory on a local disk"
            ) from None
        raise WriteError(f"{path.parent}: cannot write there ({err.strerror or err})") from None
    try:
        yield
    finally:
        if remove:
            with suppress(OSError):
                path.unlink()
        os.close(fd)


@contextmanager
def run_directory(directory: Path, option: str = "--out") -> Iterator[Path]:
    """Create ``directory`` if needed and hold its lock for one run.

    A run that fails before it writes anything leaves no directory behind: the folders this call
    created are removed again if they hold nothing but the lock file.
    """
    directory = Path(directory)
    created = [p for p in (directory, *directory.parents) if not p.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        message = f"{option} {directory}: cannot use it as the run directory ({err.strerror})"
        raise UserError(message) from None
    lock = directory / LOCK_NAME
    try:
        with locked(lock):
            try:
                yield directory
            finally:
                if created and {p.name for p in directory.iterdir()} == {LOCK_NAME}:
                    with suppress(OSError):
                        lock.unlink()
    finally:
        for folder in created:  # innermost first
            with suppress(OSError):
                folder.rmdir()  # only succeeds while empty
