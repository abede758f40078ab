"""Source ``cifar10``: the official python-pickle batches (``data_batch_1..5``, ``test_batch``),
or an ImageFolder tree ``train/``, ``test/``."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np

from ssltk.config import DataConfig
from ssltk.data.errors import DataError, MissingFileError
from ssltk.data.sources.base import ArraySplit, Source, failure, register_source
from ssltk.data.sources.imagefolder import disk_tree

__all__ = ["CIFAR10_BATCHES"]

CIFAR10_BATCHES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


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
        raise DataError(f"{path}: not a CIFAR-10 python batch ({failure(err)})") from None
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


@register_source("cifar10")
def open_cifar10(data: DataConfig, root: Path | None) -> Source:
    assert root is not None
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    if (base / "data_batch_1").exists() or (base / "batches.meta").exists():
        return _cifar10_pickles(base)
    if (root / "train").is_dir():
        return replace(disk_tree(root, ("test",), "cifar10"), native_size=32)
    hint = "expected the python-pickle batches, or train/ and test/ class folders"
    raise MissingFileError(base / "data_batch_1", hint)


