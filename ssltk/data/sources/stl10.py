"""Source ``stl10``: the official binaries (column-major 3×96×96 images, 1-based labels, the
100k ``unlabeled_X.bin``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssltk.config import DataConfig, read_utf8
from ssltk.data.errors import DataError, MissingFileError
from ssltk.data.sources.base import ArraySplit, Source, SourceSplit, register_source

__all__ = ["STL10_SIZE"]

STL10_SIZE = 96


def _stl10_images(path: Path) -> np.ndarray:
    """A lazy ``[N, 3, 96, 96]`` view of a ``*_X.bin`` file (stored column-major per channel)."""
    if not path.is_file():
        raise MissingFileError(path, "STL-10 binary version")
    per_image = 3 * STL10_SIZE * STL10_SIZE
    size = path.stat().st_size
    if size == 0 or size % per_image:
        raise DataError(f"{path}: {size} bytes is not a whole number of 3×96×96 images")
    raw = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, STL10_SIZE, STL10_SIZE)
    return raw.transpose(0, 1, 3, 2)  # each channel is stored column by column


def _stl10_labels(path: Path, count: int, num_classes: int) -> np.ndarray:
    if not path.is_file():
        raise MissingFileError(path, "STL-10 binary version")
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if len(labels) != count:
        raise DataError(f"{path}: {len(labels)} labels for {count} images")
    if count and (labels.min() < 1 or labels.max() > num_classes):
        raise DataError(f"{path}: labels must be 1..{num_classes} (1-based)")
    return labels - 1


@register_source("stl10", has_unlabeled=True)
def open_stl10(data: DataConfig, root: Path | None) -> Source:
    assert root is not None
    need_unlabeled = "unlabeled" in data.pretrain_split
    base = root / "stl10_binary" if (root / "stl10_binary").is_dir() else root
    names_file = base / "class_names.txt"
    if not names_file.is_file():
        raise MissingFileError(names_file, "STL-10 binary version")
    classes = [line.strip() for line in read_utf8(names_file).splitlines() if line.strip()]
    splits: dict[str, SourceSplit] = {}
    for split in ("train", "test"):
        images = _stl10_images(base / f"{split}_X.bin")
        labels = _stl10_labels(base / f"{split}_y.bin", len(images), len(classes))
        splits[split] = ArraySplit(images, labels, str(base / f"{split}_X.bin"))
    unlabeled = base / "unlabeled_X.bin"
    if unlabeled.exists() or need_unlabeled:
        images = _stl10_images(unlabeled)
        splits["unlabeled"] = ArraySplit(images, np.full(len(images), -1, np.int64), str(unlabeled))
    return Source("stl10", classes, splits, root=base, native_size=STL10_SIZE, layout="binary")


