"""Read a prepared dataset directory (written by :func:`ssltk.data.prepare.prepare`).

``PreparedDataset.open(dir).split("train")`` gives an indexable split: ``images(indices)`` returns
uint8 ``[n, 3, S, S]`` gathered from a memory-mapped array, or, for datasets prepared as a file
list, an :class:`~ssltk.data.image_list.ImageList` of the original images decoded from their files
at their own size (the pretext and evaluation crops are taken from the whole image, as the released
code does). Splits can be joined with ``+`` (``"train+val"``,
``"train+unlabeled"``). Split objects pickle by path, so DataLoader workers reopen them cheaply.

``PreparedDataset.for_config(config)`` also checks that the directory was prepared from the
config's ``data.*`` settings, so a run never trains or evaluates on other data than it logs.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssltk.config import Config, read_utf8
from ssltk.data.errors import BadImageError, PreparedDataError
from ssltk.data.image_list import ImageList, Images
from ssltk.data.prepare import FORMAT, MANIFEST, data_settings
from ssltk.data.sources import decode_original

IndexLike = torch.Tensor | np.ndarray | Sequence[int]


def load_array(path: Path, mmap: bool = False) -> np.ndarray:
    """``np.load`` of a prepared file; a truncated or corrupt one is a one-line user error."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        reason = " ".join(str(err).split())[:200]
        raise PreparedDataError(f"{path} is unreadable ({reason}); run `ssltk prepare`") from None


class PreparedSplit(ABC):
    """One split: ``len``, ``labels`` (int64, -1 when unlabeled), ``images(indices)``."""

    def __init__(self, name: str, class_names: list[str], image_size: int, labels: torch.Tensor):
        self.name = name
        self.class_names = list(class_names)
        self.image_size = image_size
        self.labels = labels

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, n={len(self)}, size={self.image_size})"

    def _check(self, indices: IndexLike) -> np.ndarray:
        idx = torch.as_tensor(indices).numpy() if not isinstance(indices, np.ndarray) else indices
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise IndexError(f"split {self.name!r}: indices must be a 1-D integer tensor")
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            bad = int(idx[(idx < 0) | (idx >= len(self))][0])
            raise IndexError(
                f"split {self.name!r}: index {bad} out of range for {len(self)} images"
            )
        return idx.astype(np.int64, copy=False)

    def images(self, indices: IndexLike) -> Images:
        """The given items in their order: uint8 ``[len(indices), 3, S, S]``, or an
        :class:`ImageList` of the original images (files storage)."""
        return self._gather(self._check(indices))

    @abstractmethod
    def _gather(self, indices: np.ndarray) -> Images: ...


class ArrayBackedSplit(PreparedSplit):
    """Images in ``<split>_images.npy``, memory-mapped on first use in each process."""

    def __init__(self, path: Path, name: str, class_names: list[str], labels: torch.Tensor):
        self.path = path
        super().__init__(name, class_names, int(self._array.shape[-1]), labels)

    @cached_property
    def _array(self) -> np.ndarray:
        return load_array(self.path, mmap=True)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_array", None)  # pickled memmaps would copy the data; reopen instead
        return state

    def _gather(self, indices: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._array[indices]))


class FileBackedSplit(PreparedSplit):
    """Images listed in ``<split>_files.txt``, decoded whole (RGB, original size) when requested;
    ``image_size`` is the size ``ssltk prepare`` checked them at, not the size they come at."""

    def __init__(
        self,
        root: Path,
        files: list[str],
        name: str,
        class_names: list[str],
        image_size: int,
        labels: torch.Tensor,
    ):
        self.root = root
        self.files = files
        super().__init__(name, class_names, image_size, labels)

    def _decode(self, index: int) -> torch.Tensor:
        path = self.root / self.files[index]
        try:
            return torch.from_numpy(decode_original(path))
        except Exception as err:  # the file changed or vanished since prepare checked it
            raise BadImageError(str(path), f"{type(err).__name__}: {err}") from None

    def _gather(self, indices: np.ndarray) -> ImageList:
        return ImageList(self._decode(int(index)) for index in indices)


class ConcatSplit(PreparedSplit):
    """Several splits seen as one, indices running through them in order."""

    def __init__(self, parts: list[PreparedSplit]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        labels = torch.cat([p.labels for p in parts])
        name = "+".join(p.name for p in parts)
        super().__init__(name, parts[0].class_names, parts[0].image_size, labels)

    def _gather(self, indices: np.ndarray) -> Images:
        part_of = np.searchsorted(self.offsets, indices, side="right") - 1
        if any(isinstance(part, FileBackedSplit) for part in self.parts):
            images: list[torch.Tensor] = [torch.empty(0)] * len(indices)
            for number, part in enumerate(self.parts):
                rows = np.flatnonzero(part_of == number)
                if rows.size:
                    got = part._gather(indices[rows] - self.offsets[number])
                    for row, image in zip(rows, got, strict=True):
                        images[row] = image
            return ImageList(images)
        out = torch.empty((len(indices), 3, self.image_size, self.image_size), dtype=torch.uint8)
        for number, part in enumerate(self.parts):
            rows = np.flatnonzero(part_of == number)
            if rows.size:
                out[torch.from_numpy(rows)] = part._gather(indices[rows] - self.offsets[number])
        return out


class PreparedDataset:
    """A prepared dataset directory: its manifest and its splits."""

    def __init__(self, directory: Path, manifest: dict[str, Any]):
        self.directory = directory
        self.manifest = manifest

    @classmethod
    def open(cls, prepared_dir: str | Path) -> PreparedDataset:
        """Read ``prepared_dir/manifest.json``; raises :class:`PreparedDataError` if unusable."""
        directory = Path(prepared_dir)
        if not directory.is_dir():
            raise PreparedDataError(
                f"prepared dataset not found: {directory} (run `ssltk prepare`)"
            )
        path = directory / MANIFEST
        if not path.is_file():
            raise PreparedDataError(
                f"{path} is missing: {directory} is not a complete prepared dataset "
                "(run `ssltk prepare`)"
            )
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PreparedDataError(f"{path} is corrupt ({err}); run `ssltk prepare`") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = (
                manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            )
            raise PreparedDataError(f"{path}: format {found!r}, expected {FORMAT!r}")
        for key in ("splits", "class_names", "image_size", "storage", "content_hash"):
            if key not in manifest:
                raise PreparedDataError(f"{path}: missing key {key!r}; run `ssltk prepare`")
        return cls(directory, manifest)

    @classmethod
    def for_config(cls, config: Config) -> PreparedDataset:
        """``data.prepared_dir``, refused (one line naming the key) unless it was prepared from
        ``config``'s ``data.*`` settings."""
        dataset = cls.open(config.data.prepared_dir)
        dataset.check_settings(config)
        return dataset

    def check_settings(self, config: Config, section: str = "data") -> None:
        """Refuse (one line) unless prepared from ``config.data``; messages name ``section``'s
        keys (``eval.data`` when ``config.data`` holds an evaluation's data settings)."""
        recorded = self.manifest.get("settings")
        fix = "run `ssltk prepare` with this config (or set data.prepared_dir to data made from it)"
        if not isinstance(recorded, dict):
            raise PreparedDataError(
                f"{self.directory}: no record of the data.* settings it was prepared from "
                f"(an older ssltk); {fix}"
            )
        for key, wanted in data_settings(config).items():
            if recorded.get(key) != wanted:
                name = f"{section}{key.removeprefix('data')}" if key.startswith("data.") else key
                raise PreparedDataError(
                    f"{name}: {self.directory} was prepared with {recorded.get(key)!r}, the config "
                    f"says {wanted!r}; {fix}"
                )

    @property
    def settings_fingerprint(self) -> str:
        return str(self.manifest.get("settings_fingerprint", ""))

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.manifest["splits"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["class_names"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])

    def split(self, name: str) -> PreparedSplit:
        """Split ``name`` (``train``, ``val``, ``test``, ``unlabeled``) or a ``+`` join of them."""
        parts = [self._open_split(part) for part in name.split("+")]
        return parts[0] if len(parts) == 1 else ConcatSplit(parts)

    def _file(self, name: str) -> Path:
        path = self.directory / name
        if not path.is_file():
            raise PreparedDataError(f"{path} is missing; run `ssltk prepare` again")
        return path

    def _open_split(self, name: str) -> PreparedSplit:
        entry = self.manifest["splits"].get(name)
        if entry is None:
            have = ", ".join(self.splits)
            raise PreparedDataError(f"{self.directory}: no split {name!r} (has {have})")
        labels = torch.from_numpy(load_array(self._file(entry["labels"])).astype(np.int64))
        if len(labels) != entry["count"]:
            raise PreparedDataError(
                f"{self.directory / entry['labels']}: {len(labels)} labels, manifest says "
                f"{entry['count']}; run `ssltk prepare` again"
            )
        if entry.get("images"):
            split = ArrayBackedSplit(self._file(entry["images"]), name, self.class_names, labels)
            if len(split._array) != len(labels) or split.image_size != self.image_size:
                raise PreparedDataError(
                    f"{split.path}: shape {split._array.shape} does not match the manifest"
                )
            return split
        root = Path(self.manifest["root"])
        files = read_utf8(self._file(entry["files"])).splitlines()
        if len(files) != len(labels):
            raise PreparedDataError(f"{self.directory / entry['files']}: {len(files)} files")
        return FileBackedSplit(root, files, name, self.class_names, self.image_size, labels)
