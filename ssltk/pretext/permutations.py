"""The Jigsaw permutation set of Noroozi & Favaro, ``permutations_100_max.bin`` (as the released
``self_supervision/patch_utils.py`` loads it).

File format: two little-endian int32 (count, length), then count × length little-endian int32
1-based entries. The file is checked against its documented SHA-256 before it is parsed.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

__all__ = ["PERMUTATIONS_PATH", "PERMUTATIONS_SHA256", "load_permutations"]

PERMUTATIONS_PATH = Path(__file__).resolve().parent.parent / "assets" / "permutations_100_max.bin"
PERMUTATIONS_SHA256 = "c329e21a1dc7c5df5e0800cab6577285e7fad9e71ac31cab2e5a7914e52975bc"


def load_permutations(
    path: str | Path = PERMUTATIONS_PATH, sha256: str | None = PERMUTATIONS_SHA256
) -> torch.Tensor:
    """The ``[count, length]`` int64 tensor of 0-based permutations stored in ``path``.

    ``sha256=None`` skips the checksum (for other permutation files of the same format).
    """
    return _load(str(Path(path).resolve()), sha256).clone()


@lru_cache(maxsize=4)
def _load(path: str, sha256: str | None) -> torch.Tensor:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"permutations file {file}: not found")
    data = file.read_bytes()
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise ValueError(
                f"permutations file {file}: SHA-256 {digest} is not the expected {sha256}"
            )
    if len(data) < 8 or len(data) % 4:
        raise ValueError(
            f"permutations file {file}: {len(data)} bytes is not a valid header + body"
        )
    words = np.frombuffer(data, dtype="<i4")
    count, length = int(words[0]), int(words[1])
    if count < 1 or length < 1 or words.size != 2 + count * length:
        raise ValueError(
            f"permutations file {file}: header says {count}×{length} "
            f"but the file holds {words.size - 2} entries"
        )
    table = torch.from_numpy(words[2:].astype(np.int64).reshape(count, length)) - 1
    expected = torch.arange(length).expand(count, length)
    if not torch.equal(table.sort(dim=1).values, expected):
        bad = int((table.sort(dim=1).values != expected).any(dim=1).nonzero()[0])
        raise ValueError(f"permutations file {file}: row {bad} is not a permutation of 1..{length}")
    return table
