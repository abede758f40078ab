"""Source ``imagefolder``: ImageNet/Places205-style ``train/<class>/*`` and ``val/<class>/*``
trees, or a ``data.file_list`` of ``<relative path> <label>`` lines. The tree readers here serve
the other sources too (an ImageFolder tree on disk or inside a tar archive).

Trees are walked following symlinks, each directory once (a symlink loop is reported and not
followed again).
"""

from __future__ import annotations

import os
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ssltk.config import DataConfig, read_utf8
from ssltk.data.errors import DataError, DatasetNotFoundError, MissingFileError
from ssltk.data.sources.base import EncodedSplit, Source, SourceSplit, failure, register_source

__all__ = ["IMAGE_EXTENSIONS", "archive_tree", "disk_tree"]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _dir_id(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def _scan_class_dirs(split_dir: Path) -> dict[str, list[str]]:
    """``{class: sorted paths relative to split_dir's parent}`` of ``split_dir/<class>/**/*``."""
    found: dict[str, list[str]] = {}
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if class_dir.name.startswith("."):
            continue
        paths = []
        # Directories already read, and those above the class folder: reaching one again
        # through a symlink would read images twice (or forever, around a loop).
        seen = {_dir_id(p) for p in (class_dir.resolve(), *class_dir.resolve().parents)}
        seen.discard(_dir_id(class_dir))
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            key = _dir_id(Path(dirpath))
            if key in seen:
                print(f"warning: {dirpath}: symlink loop, not followed", file=sys.stderr)
                dirnames.clear()
                continue
            seen.add(key)
            dirnames.sort()
            rel = Path(dirpath).relative_to(split_dir.parent).as_posix()
            paths.extend(f"{rel}/{name}" for name in sorted(filenames) if _is_image(name))
        found[class_dir.name] = paths
    return found


def _tree_labels(
    per_split: dict[str, dict[str, list[str]]], where: str, dir_names: dict[str, str] | None = None
) -> tuple[list[str], dict[str, tuple[list[str], np.ndarray]]]:
    """Class names from ``train`` and ``(paths, labels)`` per split; checks classes agree.

    ``dir_names`` maps a split to its folder's name where they differ (ImageNet's ``val/`` is the
    test split), for messages.
    """
    dir_names = dir_names or {}
    classes = sorted(per_split["train"])
    if not classes:
        raise DataError(f"{where}/train has no class folders (expected train/<class>/<image>)")
    index = {name: i for i, name in enumerate(classes)}
    result: dict[str, tuple[list[str], np.ndarray]] = {}
    for split, by_class in per_split.items():
        paths: list[str] = []
        labels: list[int] = []
        for name, files in by_class.items():
            if name not in index:
                folder = dir_names.get(split, split)
                raise DataError(f"{where}/{folder}/{name}: class folder not present in train/")
            if not files and split == "train":
                raise DataError(f"{where}/train/{name}: class folder holds no images")
            paths.extend(files)
            labels.extend([index[name]] * len(files))
        result[split] = (paths, np.asarray(labels, dtype=np.int64))
    return classes, result


def disk_tree(root: Path, test_dirs: Sequence[str], source: str) -> Source:
    """An ImageFolder tree: ``root/train/<class>/*`` and the first existing of ``test_dirs``."""
    if not (root / "train").is_dir():
        raise MissingFileError(root / "train", "expected train/<class>/<image> folders")
    present = [name for name in test_dirs if (root / name).is_dir()]
    if not present:
        hint = f"expected {test_dirs[0]}/<class>/<image> folders"
        raise MissingFileError(root / test_dirs[0], hint)
    if len(present) > 1:
        raise DataError(f"{root}: both {' and '.join(present)}/ exist; keep one as the test split")
    dirs = {"train": root / "train", "test": root / present[0]}
    scanned = {k: _scan_class_dirs(d) for k, d in dirs.items()}
    flat = sorted(p.name for p in dirs["test"].iterdir() if p.is_file() and _is_image(p.name))
    if flat and not scanned["test"]:  # ImageNet's official val/: labels in a separate file
        scanned["test"] = flat_ground_truth(root, present[0], flat)
    classes, splits = _tree_labels(scanned, str(root), {"test": present[0]})
    if not splits["test"][0]:
        raise DataError(
            f"{root / present[0]}: no images (expected {present[0]}/<class>/<image>, or a flat "
            f"{present[0]}/ with {', '.join(GROUND_TRUTH_FILES)}); the test split would be empty"
        )
    return Source(
        name=source,
        class_names=classes,
        splits={
            split: EncodedSplit(paths, labels, root=root)
            for split, (paths, labels) in splits.items()
        },
        root=root,
        layout="imagefolder",
    )


def archive_tree(archive: Path, source: str) -> Source:
    """An ImageFolder tree (``[top/]train|test/<class>/*``) inside a tar archive, read once."""
    if not archive.is_file():
        raise DatasetNotFoundError(archive, "image archive")
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                if member.isfile() and _is_image(os.path.basename(member.name)):
                    handle = tar.extractfile(member)
                    assert handle is not None
                    members[member.name] = handle.read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{archive}: not a readable tar archive ({failure(err)})") from None
    per_split: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for name in sorted(members):
        parts = name.split("/")
        if len(parts) >= 2 and parts[0] not in per_split:
            parts = parts[1:]  # a single top-level folder, e.g. cifar10-demo/
        if len(parts) >= 3 and parts[0] in per_split:
            per_split[parts[0]].setdefault(parts[1], []).append(name)
    if not per_split["train"]:
        raise DataError(f"{archive}: no train/<class>/<image> entries")
    classes, splits = _tree_labels(per_split, str(archive))
    return Source(
        name=source,
        class_names=classes,
        splits={
            split: EncodedSplit(
                [f"{archive}:{n}" for n in ns], labels, blobs=[members[n] for n in ns]
            )
            for split, (ns, labels) in splits.items()
        },
        root=None,
        layout="archive",
    )


#: Label files of a flat ImageNet ``val/``, looked for in the root and in the devkit's data/.
LOC_SOLUTION = "LOC_val_solution.csv"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
GROUND_TRUTH_FILES = (LOC_SOLUTION, DEVKIT_GROUND_TRUTH)
_DEVKIT_DIRS = (".", "ILSVRC2012_devkit_t12/data", "ILSVRC2012_devkit_t12")


def _find(root: Path, name: str) -> Path | None:
    return next((root / d / name for d in _DEVKIT_DIRS if (root / d / name).is_file()), None)


def flat_ground_truth(root: Path, folder: str, files: list[str]) -> dict[str, list[str]]:
    """``{wnid: paths}`` of the images of a flat ``root/folder/``, labelled by Kaggle's
    ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the wnid first) or the devkit's
    ``ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID a line, in file-name order)
    with its ``meta.mat`` (ILSVRC2012_ID → wnid)."""
    where = root / folder
    solution, truth = _find(root, LOC_SOLUTION), _find(root, DEVKIT_GROUND_TRUTH)
    if solution is not None:
        wnid_of: dict[str, str] = {}
        for number, line in enumerate(read_utf8(solution).splitlines()[1:], start=2):
            image, _, prediction = line.partition(",")
            if not prediction.split():
                raise DataError(f"{solution}:{number}: expected 'ImageId,<wnid> ...', got {line!r}")
            wnid_of[image.strip()] = prediction.split()[0]
        labels = []
        for name in files:
            stem = os.path.splitext(name)[0]
            if stem not in wnid_of:
                raise DataError(f"{solution}: no label for {where / name}")
            labels.append(wnid_of[stem])
    elif truth is not None:
        ids = [line.strip() for line in read_utf8(truth).splitlines() if line.strip()]
        if len(ids) != len(files):
            raise DataError(
                f"{truth}: {len(ids)} labels for {len(files)} images in {where} (one a line, "
                "in file-name order)"
            )
        wnids = _devkit_wnids(truth.parent / DEVKIT_META)
        try:
            labels = [wnids[int(i)] for i in ids]
        except (ValueError, KeyError) as err:
            raise DataError(f"{truth}: {err} is not an ILSVRC2012_ID of {DEVKIT_META}") from None
    else:
        raise DataError(
            f"{where}: images without class folders and no label file ({' or '.join(GROUND_TRUTH_FILES)} "
            f"in {root} or its devkit's data/)"
        )
    by_class: dict[str, list[str]] = {}
    for name, wnid in zip(files, labels, strict=True):
        by_class.setdefault(wnid, []).append(f"{folder}/{name}")
    return by_class


def _devkit_wnids(meta: Path) -> dict[int, str]:
    """ILSVRC2012_ID → wnid of the devkit's ``meta.mat`` (the 1000 leaf synsets)."""
    if not meta.is_file():
        raise MissingFileError(meta, f"the devkit's {DEVKIT_META}, beside {DEVKIT_GROUND_TRUTH}")
    from scipy.io import loadmat

    try:
        synsets = loadmat(meta, squeeze_me=True)["synsets"]
        return {
            int(s["ILSVRC2012_ID"]): str(s["WNID"])
            for s in synsets
            if int(s["num_children"]) == 0
        }
    except (KeyError, ValueError, TypeError, OSError) as err:
        raise DataError(f"{meta}: not the devkit's synsets table ({failure(err)})") from None


_LIST_SPLITS = {"train": "train", "val": "test", "test": "test"}


def _file_list(root: Path, list_path: Path) -> Source:
    if not list_path.is_file():
        raise MissingFileError(list_path, "data.file_list")
    entries: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for number, line in enumerate(read_utf8(list_path).splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        split = _LIST_SPLITS.get(parts[0].replace("\\", "/").split("/")[0]) if parts else None
        if len(parts) != 2 or split is None:
            raise DataError(
                f"{list_path}:{number}: expected '<train|val|test>/<path> <label>', got {line!r}"
            )
        entries[split].append((parts[0], parts[1]))
    tokens = {label for pairs in entries.values() for _, label in pairs}
    for split, wanted in (("train", "train/"), ("test", "val/ or test/")):
        if not entries[split]:
            raise DataError(f"{list_path}: no {wanted} entries (the {split} split would be empty)")
    if all(t.isdigit() for t in tokens):
        classes = [str(i) for i in range(max(int(t) for t in tokens) + 1)]
        index = {t: int(t) for t in tokens}
    else:
        classes = sorted(tokens)
        index = {name: i for i, name in enumerate(classes)}
    splits: dict[str, SourceSplit] = {}
    for split, pairs in entries.items():
        paths = [p for p, _ in pairs]
        labels = np.asarray([index[label] for _, label in pairs], dtype=np.int64)
        splits[split] = EncodedSplit(paths, labels, root=root)
    return Source("imagefolder", classes, splits, root=root, layout="file_list")


@register_source("imagefolder", reads_file_list=True)
def open_imagefolder(data: DataConfig, root: Path | None) -> Source:
    assert root is not None
    if data.file_list is not None:
        return _file_list(root, Path(data.file_list).expanduser().resolve())
    return disk_tree(root, ("val", "test"), "imagefolder")
