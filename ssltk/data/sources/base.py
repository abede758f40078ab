"""What every data source is made of: decoding, splits, :class:`Source`, and the registry
(``@register_source``) that :func:`open_source` reads.

A source only describes and decodes; :mod:`ssltk.data.prepare` decides how the result is stored.
Every image comes out as uint8 ``[3, S, S]``: shorter side resized to ``S`` with an area (box)
filter, each side ``round(old × ratio)``, then the centre ``S × S`` crop (offset
``floor((d − S) / 2)``). An image over PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``)
is a bad image, like a truncated one.
"""

from __future__ import annotations

import io
import multiprocessing
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ssltk.config import DataConfig
from ssltk.data.errors import DataError, DatasetNotFoundError
from ssltk.errors import UserError
from ssltk.registry import SOURCES

__all__ = [
    "ArraySplit",
    "EncodedSplit",
    "Opener",
    "Source",
    "SourceSplit",
    "decode_image",
    "decode_original",
    "open_source",
    "register_source",
    "resize_and_center_crop",
    "unregister_source",
]

_DECODE_CHUNK = 32


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


def decode_original(data: bytes | Path) -> np.ndarray:
    """Decode an encoded image whole, at its own size: RGB ``[3, H, W]`` uint8."""
    with _open_image(data) as image:
        image.load()
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def check_image(path: Path, size: int) -> None:
    """Fully read ``path``'s compressed data, raising if it is not a decodable image.

    JPEG decoding uses PIL's draft mode (DCT scaling towards ``size``), which still reads every
    entropy-coded byte, so truncation and corruption are caught at a fraction of the cost.
    """
    with _open_image(path) as image:
        image.draft("RGB", (size, size))
        image.load()


def failure(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _decode_or_reason(args: tuple[bytes | Path, int]) -> tuple[np.ndarray | None, str]:
    try:
        return decode_image(*args), ""
    except Exception as err:  # any decoder failure marks the image bad; the caller names the file
        return None, failure(err)


def _check_or_reason(args: tuple[Path, int]) -> str:
    try:
        check_image(*args)
        return ""
    except Exception as err:
        return failure(err)


def _ordered_map(function: Callable, items: Iterable, workers: int) -> Iterator:
    """``map`` in order, in a ``spawn`` pool of ``workers`` processes when ``workers > 0``."""
    if workers <= 0:
        yield from map(function, items)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(function, items, chunksize=_DECODE_CHUNK)


class SourceSplit(ABC):
    """One split of a source, in the fixed order :func:`ssltk.data.prepare.prepare` stores it."""

    labels: np.ndarray  # int64 [N]; -1 where unlabeled

    def __len__(self) -> int:
        return len(self.labels)

    @abstractmethod
    def name_of(self, index: int) -> str:
        """A name for item ``index`` that a person can find (file path, archive member, record)."""

    @abstractmethod
    def decoded(
        self, size: int, workers: int = 0, start: int = 0
    ) -> Iterator[tuple[np.ndarray | None, str]]:
        """Each item from ``start`` on, in order, as ``[3, size, size]`` uint8, or
        ``(None, reason)`` if unreadable."""

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

    def decoded(
        self, size: int, workers: int = 0, start: int = 0
    ) -> Iterator[tuple[np.ndarray | None, str]]:
        for begin in range(start, len(self.labels), 1024):
            chunk = np.ascontiguousarray(self.images[begin : begin + 1024])
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

    def _items(self, start: int = 0) -> Iterator[bytes | Path]:
        if self.blobs is not None:
            return (self.blobs[i] for i in range(start, len(self.blobs)))
        assert self.root is not None
        return (self.root / self.names[i] for i in range(start, len(self.names)))

    def name_of(self, index: int) -> str:
        return str(self.root / self.names[index]) if self.root is not None else self.names[index]

    def decoded(
        self, size: int, workers: int = 0, start: int = 0
    ) -> Iterator[tuple[np.ndarray | None, str]]:
        items = ((item, size) for item in self._items(start))
        return _ordered_map(_decode_or_reason, items, workers)

    def checked(self, size: int, workers: int = 0, start: int = 0) -> Iterator[str]:
        """For files on disk from ``start`` on: ``''`` for each decodable file in order, else the
        reason it is not."""
        if self.root is None:
            raise ValueError("checked() reads files on disk; this split holds archive bytes")
        items = ((item, size) for item in self._items(start))
        return _ordered_map(_check_or_reason, items, workers)

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


#: ``open(data, root) -> Source``: ``root`` is ``data.root`` resolved and checked to be a folder
#: for a source with ``needs_root``, else None.
Opener = Callable[[DataConfig, Path | None], Source]


def register_source(
    name: str, *, needs_root: bool = True, has_unlabeled: bool = False, reads_file_list: bool = False
) -> Callable[[Opener], Opener]:
    """Decorator registering ``open`` as data source ``name`` (``data.source: name``).

    Traits: ``needs_root`` (reads ``data.root``), ``has_unlabeled`` (may give an ``unlabeled``
    split), ``reads_file_list`` (reads ``data.file_list``).
    """
    return SOURCES.register(
        name, needs_root=needs_root, has_unlabeled=has_unlabeled, reads_file_list=reads_file_list
    )


def unregister_source(name: str) -> None:
    """Remove data source ``name`` (for code that registers one for a while, such as a test)."""
    SOURCES.unregister(name)


def _having(trait: str) -> str:
    return " and ".join(SOURCES.having(trait))


def open_source(data: DataConfig) -> Source:
    """The source ``data.source`` describes, checked for the files its format needs."""
    member = SOURCES.load(data.source)
    if data.file_list is not None and not member.reads_file_list:
        raise UserError(
            f"data.file_list is only read by source {_having('reads_file_list')}, not {data.source}"
        )
    root = None
    if member.needs_root:
        if data.root is None:
            raise UserError(f"data.root: required for source {data.source} (the dataset's folder)")
        root = Path(data.root).expanduser().resolve()
        if not root.is_dir():
            raise DatasetNotFoundError(root, f"data.root for source {data.source}")
    source = member.code(data, root)
    if "unlabeled" in data.pretrain_split and "unlabeled" not in source.splits:
        raise UserError(
            f"data.pretrain_split: {data.pretrain_split!r} needs unlabeled images, "
            f"which only source {_having('has_unlabeled')} has (source is {data.source})"
        )
    return source
