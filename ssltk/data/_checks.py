"""Argument checks shared by the augmentation modules; each error names the argument and value."""

from __future__ import annotations

import operator

import torch


def check_images(x: torch.Tensor, fn: str, *, name: str = "x", channels: int | None = None) -> None:
    """Require a ``[B, C, H, W]`` tensor (with ``C == channels`` when given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{fn}: {name} must be [B, C, H, W], got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{fn}: {name} must have {channels} channels, got shape {tuple(x.shape)}")


def check_float(x: torch.Tensor, fn: str, *, name: str = "x") -> None:
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {x.dtype}")


def check_per_image(value: torch.Tensor, batch: int, fn: str, name: str) -> None:
    """Require one value per image: shape ``[B]``."""
    if not isinstance(value, torch.Tensor) or value.shape != (batch,):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{fn}: {name} must have shape ({batch},) (one per image), got {shape}")


def pair(size: int | tuple[int, int] | list[int], fn: str, name: str) -> tuple[int, int]:
    """``size`` as a positive ``(height, width)`` pair (an int means a square)."""
    try:
        sides = (operator.index(size),) * 2 if not isinstance(size, tuple | list) else size
        height, width = (operator.index(s) for s in sides)
    except (TypeError, ValueError):
        height = width = 0
    if isinstance(size, bool) or height <= 0 or width <= 0:
        raise ValueError(f"{fn}: {name} must be a positive int or (height, width), got {size!r}")
    return height, width
