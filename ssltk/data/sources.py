"""Dataset sources: the formats users really have, read into labelled splits of images.

* ``demo``: the embedded CIFAR-10 subset, an ImageFolder tree of JPEGs inside a ``.tar.gz``.
* ``cifar10``: the official python-pickle batches, or an ImageFolder tree ``train/``, ``test/``.
* ``stl10``: the official binaries (column-major 3×96×96 images, 1-based labels, the 100k
  ``unlabeled_X.bin``).
* ``imagefolder``: ImageNet/Places205-style ``train/<class>/*`` and ``val/<class>/*`` trees, or a
  ``data.file_list`` of ``<relative path> <label>`` lines.

A source only describes and decodes; :mod:`ssltk.data.prepare` decides how the result is stored.
Every image comes out as uint8 ``[3, S, S]``: shorter side resized to ``S`` with an area (box)
filter, each side ``round(old × ratio)``, then the centre ``S × S`` crop (offset
``floor((d − S) / 2)``). An image over PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``)
is a bad image, like a truncated one; directory trees are walked following symlinks, each
directory once (a symlink loop is reported and not followed again).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import sys
import tarfile
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ssltk.config import DataConfig, read_utf8
from ssltk.errors import UserError
from ssltk.data.errors import DataError, DatasetNotFoundError, MissingFileError

DEMO_ARCHIVE = Path(__file__).resolve().parent.parent / "assets" / "cifar10-demo.tar.gz"
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
CIFAR10_BATCHES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
STL10_SIZE = 96
_DECODE_CHUNK = 32


# --------------------------------------------------------------------------------------------------
# Decoding


def resize_and_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """RGB ``[3, size, size]`` uint8: shorter side to ``size`` (area filter), then centre crop.

    The area average is computed in float (PIL's box filter on 32-bit float planes) and rounded
    once, to nearest with ties to even: PIL's 8-bit path rounds between its two separable passes,
    which biases a 2× reduction upwards by about half a grey level.
    """
    image = image.convert("RGB")
    width, height = image.size
    ratio = size / min(width, height)
    new_w, new_h = max(size, round(width * ratio)), max(size, round(height * ratio))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if (new_w, new_h) == (width, height):
        pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
        return pixels[:, top : top + size, left : left + size].copy()
    planes = [
        np.asarray(plane.convert("F").resize((new_w, new_h), Image.Resampling.BOX))
        for plane in image.split()
    ]
    crop = np.stack(planes)[:, top : top + size, left : left + size]
    return np.clip(np.rint(crop), 0, 255).astype(np.uint8)


def _open_image(data: bytes | Path) -> Image.Image:
    """``Image.open`` where an image over the pixel limit raises instead of warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)


def decode_image(data: bytes | Path, size: int) -> np.ndarray:
    """Decode an encoded image (bytes or a file) into ``[3, size, size]`` uint8."""
    with _open_image(data) as image:
        image.load()
        return resize_and_center_crop(image, size)


def check_image(path: Path, size: int) -> None:
    """Fully read ``path``'s compressed data, raising if it is not a decodable image.

    JPEG decoding uses PIL's draft mode (DCT scaling towards ``size``), which still reads every
    entropy-coded byte, so truncation and corruption are caught at a fraction of the cost.
    """
    with _open_image(path) as image:
        image.draft("RGB", (size, size))
        image.load()


def _failure(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _decode_or_reason(args: tuple[bytes | Path, int]) -> tuple[np.ndarray | None, str]:
    try:
        return decode_image(*args), ""
    except Exception as err:  # any decoder failure marks the image bad; the caller names the file
        return None, _failure(err)


def _check_or_reason(args: tuple[Path, int]) -> str:
    try:
        check_image(*args)
        return ""
    except Exception as err:
        return _failure(err)


def _ordered_map(function: Callable, items: Iterable, workers: int) -> Iterator:
    """``map`` in order, in a ``spawn`` pool of ``workers`` processes when ``workers > 0``."""
    if workers <= 0:
        yield from map(function, items)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(function, items, chunksize=_DECODE_CHUNK)


# --------------------------------------------------------------------------------------------------
# Splits


class SourceSplit(ABC):
    """One split of a source, in the fixed order :func:`ssltk.data.prepare.prepare` stores it."""

    labels: np.ndarray  # int64 [N]; -1 where unlabeled

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def name_of(self, index: int) -> str:
        """A name for item ``index`` that a person can find (file path, archive member, record)."""

    @abstractmethod
    def decoded(self, size: int, workers: int = 0) -> Iterator[tuple[np.ndarray | None, str]]:
        """Each item in order as ``[3, size, size]`` uint8, or ``(None, reason)`` if unreadable."""

    def files(self) -> tuple[Path, list[str]] | None:
        """``(root, relative paths)`` when every item is its own file on disk, else ``None``."""
        return None


@dataclass
class ArraySplit(SourceSplit):
    """Decoded images in an array-like ``[N, 3, H, W]`` uint8 (possibly a lazy memmap view)."""

    images: np.ndarray
    labels: np.ndarray
    origin: str

    def name_of(self, index: int) -> str:
        return f"{self.origin}[{index}]"

    def decoded(self, size: int, workers: int = 0) -> Iterator[tuple[np.ndarray | None, str]]:
        for start in range(0, len(self.labels), 1024):
            chunk = np.ascontiguousarray(self.images[start : start + 1024])
            for image in chunk:
                if image.shape[1:] != (size, size):
                    image = resize_and_center_crop(Image.fromarray(image.transpose(1, 2, 0)), size)
                yield image, ""


@dataclass
class EncodedSplit(SourceSplit):
    """Encoded images: files under ``root`` (``names`` relative to it, decoded lazily), or
    ``blobs`` of bytes read from an archive (``names`` then only label them in messages)."""

    names: Sequence[str]
    labels: np.ndarray
    root: Path | None = None
    blobs: Sequence[bytes] | None = None

    def __post_init__(self) -> None:
        if (self.root is None) == (self.blobs is None):
            raise ValueError("EncodedSplit needs exactly one of root (files) or blobs (bytes)")

    def _items(self) -> Iterator[bytes | Path]:
        if self.blobs is not None:
            return iter(self.blobs)
        assert self.root is not None
        return (self.root / name for name in self.names)

    def name_of(self, index: int) -> str:
        return str(self.root / self.names[index]) if self.root is not None else self.names[index]

    def decoded(self, size: int, workers: int = 0) -> Iterator[tuple[np.ndarray | None, str]]:
        return _ordered_map(_decode_or_reason, ((item, size) for item in self._items()), workers)

    def checked(self, size: int, workers: int = 0) -> Iterator[str]:
        """For files on disk: ``''`` for each decodable file in order, else the reason it is not."""
        if self.root is None:
            raise ValueError("checked() reads files on disk; this split holds archive bytes")
        return _ordered_map(_check_or_reason, ((item, size) for item in self._items()), workers)

    def files(self) -> tuple[Path, list[str]] | None:
        return (self.root, list(self.names)) if self.root is not None else None


@dataclass
class Source:
    """What a dataset holds: its class names and its splits (``train``, ``test``, ``unlabeled``)."""

    name: str
    class_names: list[str]
    splits: dict[str, SourceSplit]
    root: Path | None = None
    native_size: int | None = None
    layout: str = ""


# --------------------------------------------------------------------------------------------------
# ImageFolder trees (on disk or inside an archive)


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


def _disk_tree(root: Path, test_dirs: Sequence[str], source: str) -> Source:
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
    classes, splits = _tree_labels(scanned, str(root), {"test": present[0]})
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


def _archive_tree(archive: Path, source: str) -> Source:
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
        raise DataError(f"{archive}: not a readable tar archive ({_failure(err)})") from None
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


# --------------------------------------------------------------------------------------------------
# CIFAR-10 python batches


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a batch file can never run code."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module.replace("numpy.core.", "numpy._core."), name)


def _load_cifar_pickle(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as handle:
            raw = _ArrayUnpickler(handle, encoding="latin1").load()
    except Exception as err:  # a corrupt pickle can fail in many ways; all mean the same here
        raise DataError(f"{path}: not a CIFAR-10 python batch ({_failure(err)})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch (top level is {type(raw).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in raw.items()}


def _cifar_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_cifar_pickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path}: 'data' must be a uint8 array [N, 3072]")
    if data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' rows have {data.shape[1]} values, expected 3072")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(labels)} labels for {len(data)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels  # rows are R plane, G plane, B plane, row-major


def _cifar10_pickles(base: Path) -> Source:
    for name in (*CIFAR10_BATCHES, "batches.meta"):
        if not (base / name).is_file():
            raise MissingFileError(base / name, "CIFAR-10 python version")
    names = _load_cifar_pickle(base / "batches.meta").get("label_names")
    if not isinstance(names, list) or not names:
        raise DataError(f"{base / 'batches.meta'}: no 'label_names' list")
    classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    train = [_cifar_batch(base / name, len(classes)) for name in CIFAR10_BATCHES[:5]]
    test_images, test_labels = _cifar_batch(base / "test_batch", len(classes))
    origin = str(base / "data_batch_{1..5}")
    return Source(
        name="cifar10",
        class_names=classes,
        splits={
            "train": ArraySplit(
                np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]), origin
            ),
            "test": ArraySplit(test_images, test_labels, str(base / "test_batch")),
        },
        root=base,
        native_size=32,
        layout="pickle",
    )


def _cifar10(root: Path) -> Source:
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    if (base / "data_batch_1").exists() or (base / "batches.meta").exists():
        return _cifar10_pickles(base)
    if (root / "train").is_dir():
        return replace(_disk_tree(root, ("test",), "cifar10"), native_size=32)
    hint = "expected the python-pickle batches, or train/ and test/ class folders"
    raise MissingFileError(base / "data_batch_1", hint)


# --------------------------------------------------------------------------------------------------
# STL-10 binaries


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


def _stl10(root: Path, need_unlabeled: bool) -> Source:
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


# --------------------------------------------------------------------------------------------------
# ImageFolder with a file list

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
    if not entries["train"]:
        raise DataError(f"{list_path}: no train/ entries")
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


# --------------------------------------------------------------------------------------------------


def open_source(data: DataConfig) -> Source:
    """The source ``data.source`` describes, checked for the files its format needs."""
    if data.file_list is not None and data.source != "imagefolder":
        raise UserError(f"data.file_list is only read by source imagefolder, not {data.source}")
    source = _open(data)
    if "unlabeled" in data.pretrain_split and "unlabeled" not in source.splits:
        raise UserError(
            f"data.pretrain_split: {data.pretrain_split!r} needs unlabeled images, "
            f"which only source stl10 has (source is {data.source})"
        )
    return source


def _open(data: DataConfig) -> Source:
    if data.source == "demo":
        return replace(_archive_tree(DEMO_ARCHIVE, "demo"), native_size=32)
    if data.root is None:
        raise UserError(f"data.root: required for source {data.source} (the dataset's folder)")
    root = Path(data.root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetNotFoundError(root, f"data.root for source {data.source}")
    if data.source == "cifar10":
        return _cifar10(root)
    if data.source == "stl10":
        return _stl10(root, need_unlabeled="unlabeled" in data.pretrain_split)
    if data.file_list is not None:
        return _file_list(root, Path(data.file_list).expanduser().resolve())
    return _disk_tree(root, ("val", "test"), "imagefolder")
