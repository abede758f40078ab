"""Source ``places205``: Places205 as distributed, its images under one root and its official
lists ``train_places205.csv`` and ``val_places205.csv`` (``trainvalsplit_places205.tar.gz``).

Each list line is ``<path under the root> <label>``, e.g. ``a/abbey/00000001.jpg 0``; the class
name is the path's folders after the first letter (``abbey``, ``apartment_building/outdoor``).
``data.root`` is the image root (``.../images256``); ``data.file_list`` is the folder holding
both lists, or the train list with the val list beside it (default: both in the root). The
official val list is the test split (as ImageNet's validation set); ``val`` is held out of train.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssltk.config import DataConfig, read_utf8
from ssltk.data.errors import DataError, MissingFileError
from ssltk.data.sources.base import EncodedSplit, Source, register_source

TRAIN_LIST = "train_places205.csv"
VAL_LIST = "val_places205.csv"


def _lists(root: Path, file_list: Path | None) -> tuple[Path, Path]:
    if file_list is None:
        folder = root
    else:
        file_list = Path(file_list).expanduser().resolve()
        folder = file_list if file_list.is_dir() else file_list.parent
    train = file_list if file_list is not None and file_list.is_file() else folder / TRAIN_LIST
    val = folder / VAL_LIST
    for path in (train, val):
        if not path.is_file():
            raise MissingFileError(path, "a Places205 list (data.file_list names their folder)")
    return train, val


def _class_name(path: str) -> str:
    folders = path.replace("\\", "/").split("/")[:-1]
    if len(folders) > 1 and len(folders[0]) == 1:
        folders = folders[1:]  # the first-letter folder of a/abbey/
    return "/".join(folders)


def _read(list_path: Path, names: dict[int, str]) -> tuple[list[str], np.ndarray]:
    paths, labels = [], []
    for number, line in enumerate(read_utf8(list_path).splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(
                f"{list_path}:{number}: expected '<path> <label>' (e.g. 'a/abbey/00000001.jpg 0'), "
                f"got {line!r}"
            )
        path, label = parts[0].lstrip("/"), int(parts[1])
        name = _class_name(path)
        if names.setdefault(label, name) != name:
            raise DataError(
                f"{list_path}:{number}: label {label} is class {names[label]!r} elsewhere, "
                f"here {name!r}"
            )
        paths.append(path)
        labels.append(label)
    if not paths:
        raise DataError(f"{list_path}: no images listed (the split would be empty)")
    return paths, np.asarray(labels, dtype=np.int64)


@register_source("places205", reads_file_list=True)
def open_places205(data: DataConfig, root: Path | None) -> Source:
    assert root is not None
    train_list, val_list = _lists(root, data.file_list)
    names: dict[int, str] = {}
    train = _read(train_list, names)
    test = _read(val_list, names)
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise DataError(
            f"{train_list}: labels must run 0..{max(names)}; no image has label {missing[0]}"
        )
    unseen = sorted(set(test[1].tolist()) - set(train[1].tolist()))
    if unseen:
        raise DataError(f"{val_list}: label {unseen[0]} has no image in {train_list.name}")
    classes = [names[i] for i in range(len(names))]
    splits = {
        "train": EncodedSplit(train[0], train[1], root=root),
        "test": EncodedSplit(test[0], test[1], root=root),
    }
    return Source("places205", classes, splits, root=root, layout="places205_lists")
