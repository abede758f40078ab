"""Reduce an endpoint to at most ``max_features`` values per example (9000 in the released
code's ``utils.py``).

A ``[B, C, H, W]`` map with more than ``max_features`` values is pooled with kernel = stride =
``ceil(sqrt(H·W·C / max_features))`` (clamped to ``[1, H]``, no padding, floor mode) and
flattened; smaller maps and vectors are only flattened. ``max`` is the released configs' mode
(``linear_eval.py``'s ``pool_type``), ``avg`` the same with average pooling.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["make_pool", "pool_stride", "pooled_shape"]

POOL_MODES = ("max", "avg")


def pool_stride(channels: int, height: int, width: int, max_features: int) -> int:
    """The square kernel (= stride) that brings ``C·H·W`` to at most about ``max_features``."""
    size = channels * height * width
    if size <= max_features:
        return 1
    return min(max(math.ceil(math.sqrt(size / max_features)), 1), height)


def pooled_shape(shape: tuple[int, ...], max_features: int) -> tuple[int, ...]:
    """``(C, H', W')`` after pooling a ``(C, H, W)`` map, or ``shape`` itself for vectors."""
    if len(shape) != 3:
        return tuple(shape)
    channels, height, width = shape
    s = pool_stride(channels, height, width, max_features)
    return channels, height // s, width // s


def make_pool(max_features: int, mode: str = "max") -> Callable[[torch.Tensor], torch.Tensor]:
    """A function ``[B, ...] → [B, features]`` applying that rule to each endpoint."""
    if mode not in POOL_MODES:
        raise ValueError(f"pooling={mode!r}: expected one of {', '.join(POOL_MODES)}")
    pool2d = F.max_pool2d if mode == "max" else F.avg_pool2d

    def pool(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            s = pool_stride(x.shape[1], x.shape[2], x.shape[3], max_features)
            if s > 1:
                x = pool2d(x, kernel_size=s, stride=s)
        return x.flatten(1)

    return pool
