"""``ssltk prepare``: turn a source into a prepared dataset directory with a manifest.

Layout of ``data.prepared_dir``::

    manifest.json                 the data.* settings it was made from, source, counts, class
                                  names, image size, hashes, skipped images
    <split>_labels.npy            int64 [N] (-1 for unlabeled)
    <split>_images.npy            uint8 [N, 3, S, S]        storage "arrays" (read memory-mapped)
    <split>_files.txt             relative paths under root storage "files" (decoded whole, at
                                  their own size, when loaded)

    skipped.txt                   the unreadable images left out (data.on_bad_image: skip)

Splits are ``train``, ``val`` (held out from train per class, chosen by ``seed``), ``test`` and, for
STL-10, ``unlabeled``. The directory is written under a temporary name and renamed into place, so an
interrupted run never leaves something that looks prepared. Two runs with the same inputs write
identical bytes. Array files are allocated in full before they are filled through a memory map:
writing a sparse map on a full disk would kill the process with SIGBUS.

A pass is restartable: every :data:`CHUNK` images the work done is committed to a journal in the
temporary directory (``.<name>.partial/progress.jsonl``), and a pass killed (or stopped by a bad
image under ``on_bad_image: fail``) resumes from its last committed chunk when run again with the
same inputs, ending with the same bytes and hash as an uninterrupted pass.

The content hash covers the format, storage, image size, class names and, per split, its labels
and either the stored pixels (``arrays``) or each file's relative path and size in bytes
(``files``): under ``files`` storage an image rewritten in place with the same size keeps the hash.

The manifest records the ``data.*`` settings it was made from (:func:`data_settings`); training
and evaluation refuse prepared data whose settings differ from their config's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from tqdm import tqdm

from ssltk import fsutil
from ssltk.config import Config
from ssltk.data import rng
from ssltk.data.errors import BadImageError, DataError
from ssltk.data.sources import EncodedSplit, Source, SourceSplit, open_source

FORMAT = "ssltk-prepared/1"
SPLIT_ORDER = ("train", "val", "test", "unlabeled")
MANIFEST = "manifest.json"
SKIPPED = "skipped.txt"
#: Images per committed chunk of a pass (what a killed pass loses at most, per split).
CHUNK = 128
# The held-out split draws from its own (epoch, stream) so it never correlates with augmentation.
_HOLDOUT_EPOCH = 2**32 - 1


def data_settings(config: Config) -> dict[str, Any]:
    """The config values that decide what ``ssltk prepare`` writes, as written by the user
    (``seed`` matters only through the held-out split)."""
    data = config.data

    def written(path: Path | None) -> str | None:
        return None if path is None else os.path.normpath(Path(path).expanduser())

    return {
        "data.source": data.source,
        "data.root": None if data.source == "demo" else written(data.root),
        "data.file_list": written(data.file_list),
        "data.image_size": data.image_size,
        "data.val_fraction": data.val_fraction,
        "seed": config.seed if data.val_fraction > 0 else None,
    }


def settings_fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _open_memmap(path: Path, shape: tuple[int, ...]) -> np.memmap:
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    fsutil.reserve(path)
    return array


def held_out_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Train items held out as ``val``: per class ``round(n_c · fraction)``, chosen by ``seed``."""
    count = len(labels)
    keys = rng.sample_keys(seed, _HOLDOUT_EPOCH, torch.arange(count, dtype=torch.int64))
    scores = rng.uniform(keys, rng.Stream.HOLDOUT, 1)[:, 0].numpy()
    mask = np.zeros(count, dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = math.floor(len(members) * fraction + 0.5)
        mask[members[np.argsort(scores[members], kind="stable")[:take]]] = True
    return mask


class _ArrayWriter:
    """Appends images to ``<split>_images.npy`` (memory-mapped) and hashes what it stores."""

    def __init__(self, directory: Path, split: str, capacity: int, size: int) -> None:
        self.directory, self.split, self.size = directory, split, size
        self.path = directory / f"{split}_images.npy"
        if self.path.is_file():  # a resumed pass: the rows of its journal are already there
            self.images = np.lib.format.open_memmap(self.path, mode="r+")
        else:
            self.images = _open_memmap(self.path, (capacity, 3, size, size))
        self.labels: list[int] = []
        self.digest = hashlib.sha256()

    def add(self, image: np.ndarray, label: int) -> list[Any]:
        """Store ``image``; returns its journal entry."""
        self.images[len(self.labels)] = image
        self.digest.update(image.tobytes())
        self.labels.append(label)
        return [label]

    def replay(self, entry: list[Any]) -> None:
        """Take back an image a killed pass stored (hashed again from the file)."""
        self.digest.update(np.ascontiguousarray(self.images[len(self.labels)]).tobytes())
        self.labels.append(int(entry[0]))

    def commit(self) -> None:
        self.images.flush()

    def close(self) -> dict[str, Any]:
        count = len(self.labels)
        self.images.flush()
        if count < len(self.images):  # images were skipped: keep only the rows written
            kept = self.directory / f"{self.split}_images.kept.npy"
            out = _open_memmap(kept, (count, 3, self.size, self.size))
            for start in range(0, count, 4096):
                stop = min(start + 4096, count)
                out[start:stop] = self.images[start:stop]
            out.flush()
            del out
            os.replace(kept, self.path)
        del self.images
        labels = _save_labels(self.directory, self.split, self.labels, self.digest)
        return {"images": self.path.name, "files": None, "labels": labels}


class _FileListWriter:
    """Records checked files as ``<split>_files.txt`` (paths relative to the source root)."""

    def __init__(self, directory: Path, split: str, root: Path) -> None:
        self.directory, self.split, self.root = directory, split, root
        self.names: list[str] = []
        self.labels: list[int] = []
        self.digest = hashlib.sha256()

    def add(self, relpath: str, label: int) -> list[Any]:
        """Record ``relpath``; returns its journal entry."""
        entry = [label, relpath, (self.root / relpath).stat().st_size]
        self.replay(entry)
        return entry

    def replay(self, entry: list[Any]) -> None:
        label, relpath, size = entry
        self.digest.update(f"{relpath}\t{size}\n".encode())
        self.names.append(relpath)
        self.labels.append(int(label))

    def commit(self) -> None:
        pass

    def close(self) -> dict[str, Any]:
        path = self.directory / f"{self.split}_files.txt"
        path.write_text("".join(f"{name}\n" for name in self.names), encoding="utf-8")
        labels = _save_labels(self.directory, self.split, self.labels, self.digest)
        return {"images": None, "files": path.name, "labels": labels}


def _save_labels(directory: Path, split: str, labels: list[int], digest: Any) -> str:
    array = np.asarray(labels, dtype=np.int64)
    np.save(directory / f"{split}_labels.npy", array)
    digest.update(array.astype("<i8").tobytes())
    return f"{split}_labels.npy"


def _targets(source: Source, fraction: float, seed: int) -> dict[str, np.ndarray]:
    """For each source split, the output split of each item (``train`` items may go to ``val``)."""
    targets = {
        name: np.full(len(split), name, dtype=object) for name, split in source.splits.items()
    }
    held = held_out_mask(source.splits["train"].labels, fraction, seed)
    targets["train"][held] = "val"
    return targets


class _Progress:
    """A tqdm bar on a terminal; otherwise a line with the rate and ETA every 30 seconds."""

    def __init__(self, total: int, done: int, desc: str, enabled: bool) -> None:
        self.total, self.done, self.desc, self.enabled = total, done, desc, enabled
        tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=done, desc=desc, unit="img", disable=not tty)
        self.started = self.shown = time.monotonic()
        self.first = done

    def update(self) -> None:
        self.done += 1
        self.bar.update()
        now = time.monotonic()
        if self.enabled and self.bar.disable and now - self.shown >= 30:
            self.shown = now
            rate = (self.done - self.first) / max(now - self.started, 1e-9)
            minutes, seconds = divmod(round((self.total - self.done) / max(rate, 1e-9)), 60)
            eta = f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
            print(
                f"{self.desc}: {self.done}/{self.total} images, {rate:.0f} img/s, eta {eta}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        self.bar.close()


class _Journal:
    """``progress.jsonl``: a first line naming the pass (:func:`_pass_key`), then one line per
    committed chunk (its split, the index after it, each stored item's writer and entry, and the
    images it skipped). A line cut short by a kill is ignored."""

    NAME = "progress.jsonl"

    def __init__(self, directory: Path, key: str) -> None:
        self.path = directory / self.NAME
        self.records: list[dict[str, Any]] = []
        lines = self.path.read_text(encoding="utf-8").splitlines() if self.path.is_file() else []
        if lines and _json_line(lines[0]) == {"pass": key}:
            for line in lines[1:]:
                record = _json_line(line)
                if not isinstance(record, dict):
                    break
                self.records.append(record)
        else:  # nothing done yet, or another pass's work: start over
            for stale in directory.iterdir():
                stale.unlink()
        valid = [{"pass": key}, *self.records]  # drops a line a kill cut short
        fsutil.write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in valid).encode())

    def done(self, split: str) -> list[dict[str, Any]]:
        return [record for record in self.records if record["split"] == split]

    def commit(self, record: dict[str, Any]) -> None:
        self._append(record)

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _write_split(
    split: SourceSplit,
    name: str,
    targets: np.ndarray,
    writers: dict[str, Any],
    ctx: _Context,
    journal: _Journal,
) -> None:
    """Store ``split``'s items from where the journal stops, committing every :data:`CHUNK`."""
    start = 0
    for record in journal.done(name):
        for out, entry in record["items"]:
            writers[out].replay(entry)
        ctx.skipped.extend(record["skipped"])
        start = record["end"]
    if start:
        print(f"{ctx.desc}: resuming at image {start} of {len(split)}", file=sys.stderr)
    files = isinstance(split, EncodedSplit) and ctx.storage == "files"
    if files:
        results: Iterator[Any] = split.checked(ctx.size, ctx.workers, start=start)
    else:
        results = split.decoded(ctx.size, ctx.workers, start=start)
    bar = _Progress(len(split), start, ctx.desc, ctx.progress)
    items: list[list[Any]] = []
    skipped: list[str] = []
    try:
        for index, result in enumerate(results, start=start):
            bar.update()
            value, reason = (split.names[index], result) if files else result
            if reason:
                skipped.append(ctx.bad(split.name_of(index), reason))
            else:
                out = targets[index]
                items.append([out, writers[out].add(value, int(split.labels[index]))])
            if (index + 1) % CHUNK == 0 or index + 1 == len(split):
                for writer in writers.values():
                    writer.commit()
                journal.commit(
                    {"split": name, "end": index + 1, "items": items, "skipped": skipped}
                )
                items, skipped = [], []
    finally:
        bar.close()


class _Context:
    def __init__(self, config: Config, storage: str, progress: bool) -> None:
        self.size = config.data.image_size
        self.workers = config.data.workers
        self.storage = storage
        self.progress = progress
        self.fail = config.data.on_bad_image == "fail"
        self.skipped: list[str] = []
        self.desc = ""

    def bad(self, name: str, reason: str) -> str:
        if self.fail:
            raise BadImageError(name, reason)
        self.skipped.append(name)
        return name


def _storage(source: Source, limit: int) -> str:
    total = sum(len(split) for split in source.splits.values())
    on_disk = all(split.files() is not None for split in source.splits.values())
    return "files" if total > limit and on_disk else "arrays"


def _write_splits(
    source: Source, config: Config, directory: Path, ctx: _Context, journal: _Journal
) -> dict[str, dict[str, Any]]:
    """Write every split into ``directory``; returns the manifest's ``splits`` section."""
    targets = _targets(source, config.data.val_fraction, config.seed)
    entries: dict[str, dict[str, Any]] = {}
    for name, split in source.splits.items():
        outputs = ("train", "val") if name == "train" else (name,)
        ctx.desc = f"{source.name} {name}"
        writers: dict[str, Any]
        if ctx.storage == "files":
            assert isinstance(split, EncodedSplit) and split.root is not None
            writers = {out: _FileListWriter(directory, out, split.root) for out in outputs}
        else:
            writers = {
                out: _ArrayWriter(directory, out, int((targets[name] == out).sum()), ctx.size)
                for out in outputs
            }
        _write_split(split, name, targets[name], writers, ctx, journal)
        for out, writer in writers.items():
            stored = writer.close()
            labels = np.asarray(writer.labels, dtype=np.int64)
            labeled = bool((labels >= 0).all())
            counts = np.bincount(labels, minlength=len(source.class_names)) if labeled else None
            entries[out] = {
                "count": len(labels),
                "labeled": labeled,
                "class_counts": counts.tolist() if counts is not None else None,
                **stored,
                "sha256": writer.digest.hexdigest(),
            }
    return {name: entries[name] for name in SPLIT_ORDER if name in entries}


def _content_hash(manifest: dict[str, Any]) -> str:
    summary = {
        "format": manifest["format"],
        "storage": manifest["storage"],
        "image_size": manifest["image_size"],
        "class_names": manifest["class_names"],
        "splits": {name: entry.get("sha256") for name, entry in manifest["splits"].items()},
    }
    return hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()


def _clear_stale(out: Path) -> None:
    """Remove temporary dirs left by prepare runs that were killed (their process is gone)."""
    for stale in out.parent.glob(f".{out.name}.*-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def prepare(config: Config, *, progress: bool = True) -> dict[str, Any]:
    """Write ``config.data.prepared_dir`` from ``config.data``; returns the manifest.

    Raises :class:`~ssltk.data.errors.DataError` (a ``UserError``) naming the path, file or image
    at fault. Under ``data.on_bad_image: skip`` unreadable images are left out and counted in the
    manifest's ``skipped_images`` (their names in ``skipped``).
    """
    data = config.data
    out = Path(data.prepared_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"data.prepared_dir: {out} exists and is not a directory")
    source = open_source(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.locked(out.parent / f".{out.name}.lock", remove=True):
        return _prepare_locked(config, source, out, progress)


def _pass_key(config: Config, source: Source, storage: str) -> str:
    """What a pass writes depends on: settings, storage and each split's items (a journal of
    another pass is never resumed)."""
    digest = hashlib.sha256(json.dumps([FORMAT, data_settings(config), storage]).encode())
    for name, split in source.splits.items():
        digest.update(f"{name}\t{len(split)}\n".encode())
        digest.update(np.asarray(split.labels, dtype="<i8").tobytes())
        if isinstance(split, EncodedSplit) and split.root is not None:
            digest.update("\n".join(split.names).encode())
    return digest.hexdigest()


def _prepare_locked(config: Config, source: Source, out: Path, progress: bool) -> dict[str, Any]:
    data = config.data
    _clear_stale(out)
    tmp = out.parent / f".{out.name}.partial"
    tmp.mkdir(exist_ok=True)
    try:
        storage = _storage(source, data.max_in_memory_images)
        ctx = _Context(config, storage, progress)
        journal = _Journal(tmp, _pass_key(config, source, storage))
        splits = _write_splits(source, config, tmp, ctx, journal)
        settings = data_settings(config)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "settings": settings,
            "settings_fingerprint": settings_fingerprint(settings),
            "source": source.name,
            "layout": source.layout,
            "root": str(source.root) if source.root is not None else None,
            "storage": storage,
            "image_size": data.image_size,
            "native_size": source.native_size,
            "seed": config.seed,
            "val_fraction": data.val_fraction,
            "class_names": source.class_names,
            "num_classes": len(source.class_names),
            "counts": {name: entry["count"] for name, entry in splits.items()},
            "splits": splits,
            "skipped_images": len(ctx.skipped),
            "skipped": ctx.skipped,
            "skipped_list": SKIPPED,
        }
        manifest["content_hash"] = _content_hash(manifest)
        manifest["content_hash_covers"] = (
            "labels and each file's relative path and size in bytes, not the image bytes"
            if storage == "files"
            else "labels and the stored pixels"
        )
        (tmp / SKIPPED).write_text("".join(f"{n}\n" for n in ctx.skipped), encoding="utf-8")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        journal.path.unlink()
        _move_into_place(tmp, out)
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt | BadImageError):  # resumable: keep what is done
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):  # e.g. no space left: one line, nothing half-written left
            where = err.filename or tmp
            raise DataError(f"{where}: {err.strerror or err}; {out} was left unchanged") from None
        raise
    return manifest
