"""Image resizing on batches ``[B, C, H, W]``: a leak-free bilinear grid, and TF1's exact ops.

Bilinear resizes take a ``grid``. ``"half_pixel"`` (the default) samples output pixel ``dst`` at
``(dst + 0.5) * in / out - 0.5``, clamped to the box, as ``F.interpolate(mode="bilinear",
align_corners=False)`` does: the grid is symmetric, so resizing commutes with flips and transposes.
``"tf1"`` is the released code's grid (below), kept bit-exact for parity. It is anchored at the
top-left corner: source pixels are hit exactly on every ``out / gcd(in, out)``-th row and column
from the top and left, and nowhere else, so an image's sharpness pattern says where its top-left
corner is. ``rot90`` moves that corner, and a network solves Rotation on pure noise by reading it.

The released code resizes with TensorFlow 1 ops whose sampling grids differ from PyTorch's defaults:

* bilinear (``tf.image.resize_images`` / ``resize_bilinear``, ``align_corners=False``) uses the
  *legacy* grid ``src = dst * in / out`` with no half-pixel offset, and clamps the upper neighbour
  at the last row/column. ``F.interpolate(mode="bilinear")`` samples at
  ``(dst + 0.5) * in / out - 0.5`` instead.
* area (``resize_area``) averages each output cell's footprint ``[dst * s, (dst + 1) * s)`` with
  fractional weights for partly covered pixels. ``F.interpolate(mode="area")`` (adaptive average
  pooling) instead averages whole pixels of ``[floor(dst * s), ceil((dst + 1) * s))`` with equal
  weights, which differs whenever ``in / out`` is not an integer.

Both are implemented exactly here: bilinear by gathering neighbours on the chosen grid and blending
in TF's order (x, then y), area as two separable matrix products with the exact overlap weights.
TF's area resize is symmetric already and has no grid option.
Outputs are float32 in the input's value range (uint8 inputs are not rescaled).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ssltk.data._checks import check_images, check_per_image, pair

__all__ = [
    "RESIZE_GRIDS",
    "ResizeGrid",
    "crop_and_resize",
    "crop_and_resize_each",
    "resize_area",
    "resize_bilinear",
    "resize_small",
    "small_side_size",
]

ResizeGrid = Literal["half_pixel", "tf1"]
RESIZE_GRIDS: tuple[ResizeGrid, ...] = ("half_pixel", "tf1")


def _sample_grid(
    start: torch.Tensor,
    length: torch.Tensor,
    out: int,
    grid: ResizeGrid,
    shift: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image sample positions of ``out`` pixels inside ``[start, start + length)``, moved by
    ``shift`` (``[B]`` float32 source pixels, half-pixel grid only) before clamping to the box.

    Returns lower and upper source indices ``[B, out]`` (absolute, int64) and the float32 weight of
    the upper one. Arithmetic is float32, as in TensorFlow's and PyTorch's kernels.
    """
    if grid not in RESIZE_GRIDS:
        raise ValueError(f"resize grid must be one of {', '.join(RESIZE_GRIDS)}, got {grid!r}")
    scale = length.to(torch.float32)[:, None] / out
    dst = torch.arange(out, dtype=torch.float32, device=length.device)[None, :]
    last = length[:, None] - 1
    if grid == "tf1":
        if shift is not None:
            raise ValueError("a sub-pixel shift needs the half_pixel grid")
        src = dst * scale
        lower = src.floor()
        upper = torch.minimum(src.ceil().long(), last)
    else:
        src = (dst + 0.5) * scale - 0.5
        if shift is not None:
            src = src + shift.to(torch.float32)[:, None]
        src = torch.minimum(src.clamp_(min=0.0), last.to(torch.float32))
        lower = src.floor()
        upper = torch.minimum(lower.long() + 1, last)
    return start[:, None] + lower.long(), start[:, None] + upper, src - lower


def crop_and_resize(
    x: torch.Tensor,
    boxes: torch.Tensor,
    out_hw: int | tuple[int, int],
    *,
    flip: torch.Tensor | None = None,
    grid: ResizeGrid = "half_pixel",
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop each image to its box, then bilinear-resize it to ``out_hw`` (aspect ignored).

    ``boxes`` is ``[B, 4]`` integer ``(top, left, height, width)`` in pixels, inside the image.
    Neighbours are clamped to the box, never read from outside it. With ``grid="tf1"`` the result
    equals ``tf.image.resize_images(tf.slice(image, box), out_hw)`` per image; with
    ``"half_pixel"``, ``F.interpolate(crop, out_hw, mode="bilinear")`` up to float rounding.
    ``shift`` (``[B, 2]`` float, half-pixel grid only) moves every sample position by
    ``(dy, dx)`` source pixels; drawn uniformly in ``[-0.5, 0.5)`` it makes the interpolation
    phase of every output position uniform, so no position's sharpness differs from another's. ``flip`` (``[B]`` bool) mirrors the chosen
    outputs left-right, exactly as a flip afterwards but free (the sampling grid is mirrored).
    Returns float32 ``[B, C, *out_hw]``.
    """
    check_images(x, "crop_and_resize")
    out_h, out_w = pair(out_hw, "crop_and_resize", "out_hw")
    batch, channels, height, width = x.shape
    if not isinstance(boxes, torch.Tensor) or boxes.shape != (batch, 4):
        shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"crop_and_resize: boxes must have shape ({batch}, 4), got {shape}")
    boxes = boxes.to(device=x.device, dtype=torch.long)
    top, left, box_h, box_w = boxes.unbind(1)
    inside = (top >= 0) & (left >= 0) & (box_h > 0) & (box_w > 0)
    inside &= (top + box_h <= height) & (left + box_w <= width)
    if not bool(inside.all()):
        bad = boxes[~inside][0].tolist()
        raise ValueError(
            f"crop_and_resize: box (top, left, height, width)={bad} is empty or outside the "
            f"{height}x{width} image"
        )
    if shift is not None and (not isinstance(shift, torch.Tensor) or shift.shape != (batch, 2)):
        got = tuple(shift.shape) if isinstance(shift, torch.Tensor) else type(shift).__name__
        raise ValueError(f"crop_and_resize: shift must have shape ({batch}, 2), got {got}")
    shift_y, shift_x = (None, None) if shift is None else shift.to(x.device).unbind(1)
    y0, y1, wy = _sample_grid(top, box_h, out_h, grid, shift_y)
    x0, x1, wx = _sample_grid(left, box_w, out_w, grid, shift_x)
    if flip is not None:
        check_per_image(flip, batch, "crop_and_resize", "flip")
        mirror = flip.to(device=x.device, dtype=torch.bool)[:, None]
        x0, x1, wx = (torch.where(mirror, t.flip(1), t) for t in (x0, x1, wx))

    # Interpolate along x for every input row first, then pick and blend the two source rows of
    # each output row. Each x-blend equals TF's per-pixel "top"/"bottom" value bit for bit, and
    # the row step copies whole contiguous rows, so this is much cheaper than gathering four
    # neighbours per output pixel. In-place steps run the same float operations as
    # ``a + (b - a) * w`` with fewer temporaries.
    x = x.to(torch.float32)
    col0 = x0[:, None, None, :].expand(batch, channels, height, out_w)
    col1 = x1[:, None, None, :].expand(batch, channels, height, out_w)
    blended = x.gather(3, col0)
    blended += x.gather(3, col1).sub_(blended).mul_(wx[:, None, None, :])
    rows = blended.view(batch * channels * height, out_w)
    planes = torch.arange(batch * channels, device=x.device).view(batch, channels, 1) * height
    upper = rows.index_select(0, (planes + y0[:, None, :]).reshape(-1))
    lower = rows.index_select(0, (planes + y1[:, None, :]).reshape(-1))
    upper = upper.view(batch, channels, out_h, out_w)
    lower = lower.view(batch, channels, out_h, out_w)
    upper += lower.sub_(upper).mul_(wy[:, None, :, None])
    return upper


def crop_and_resize_each(
    images: Sequence[torch.Tensor],
    boxes: torch.Tensor,
    out_hw: int | tuple[int, int],
    *,
    flip: torch.Tensor | None = None,
    grid: ResizeGrid = "half_pixel",
    shift: torch.Tensor | None = None,
    convert: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`crop_and_resize` of images of different sizes (``[C, H_i, W_i]`` each), one by one.

    Each box is cut out first and passed through ``convert`` (e.g. to [0, 1] floats), so only the
    box is converted; neighbours never leave the box, so row ``i`` equals :func:`crop_and_resize`
    of image ``i`` alone bit for bit. Returns float32 ``[B, C, *out_hw]``.
    """
    if not isinstance(boxes, torch.Tensor) or boxes.shape != (len(images), 4):
        got = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"crop_and_resize_each: boxes must be ({len(images)}, 4), got {got}")
    out_h, out_w = pair(out_hw, "crop_and_resize_each", "out_hw")
    rows = []
    for i, (image, (top, left, height, width)) in enumerate(zip(images, boxes.tolist())):
        check_images(image[None], "crop_and_resize_each")
        if top < 0 or left < 0 or top + height > image.shape[1] or left + width > image.shape[2]:
            raise ValueError(
                f"crop_and_resize_each: box (top, left, height, width)="
                f"{[top, left, height, width]} is outside the {tuple(image.shape[1:])} image"
            )
        region = image[None, :, top : top + height, left : left + width]
        region = convert(region) if convert is not None else region
        whole = torch.tensor([[0, 0, height, width]], device=image.device)
        rows.append(
            crop_and_resize(
                region,
                whole,
                (out_h, out_w),
                flip=None if flip is None else flip[i : i + 1],
                grid=grid,
                shift=None if shift is None else shift[i : i + 1],
            )
        )
    if not rows:
        raise ValueError("crop_and_resize_each: no images")
    return torch.cat(rows)


def resize_bilinear(
    x: torch.Tensor,
    size: int | tuple[int, int],
    *,
    grid: ResizeGrid = "half_pixel",
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bilinear resize of whole images to ``size`` on ``grid`` (see the module docstring;
    ``"tf1"``: TF1's legacy ``align_corners=False`` grid without half-pixel centres), optionally
    moved by a sub-pixel ``shift`` as in :func:`crop_and_resize`."""
    check_images(x, "resize_bilinear")
    batch, _, height, width = x.shape
    whole = torch.tensor([0, 0, height, width], device=x.device).expand(batch, 4)
    size_hw = pair(size, "resize_bilinear", "size")
    return crop_and_resize(x, whole, size_hw, grid=grid, shift=shift)


def _area_weights(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` matrix whose row ``o`` averages the input span ``[o * s, (o + 1) * s)``."""
    scale = in_size / out_size
    lo = np.arange(out_size)[:, None] * scale
    hi = lo + scale
    pixel = np.arange(in_size)[None, :]
    overlap = np.clip(np.minimum(pixel + 1, hi) - np.maximum(pixel, lo), 0.0, None)
    return overlap / scale


def resize_area(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """TF area resize (``tf.image.resize_area``, ``align_corners=False``) to ``size``.

    Each output pixel is the coverage-weighted mean of the input pixels under its footprint. For
    integer shrink factors this is average pooling (and is computed that way); otherwise two
    matrix products with the exact weights. Results match TensorFlow up to float32 rounding of the
    summation order. Returns float32.
    """
    check_images(x, "resize_area")
    out_h, out_w = pair(size, "resize_area", "size")
    height, width = x.shape[-2:]
    x = x.to(torch.float32)
    if (out_h, out_w) == (height, width):
        return x.clone()
    if height % out_h == 0 and width % out_w == 0:
        kernel = (height // out_h, width // out_w)
        return F.avg_pool2d(x, kernel, stride=kernel)
    rows = torch.from_numpy(_area_weights(height, out_h)).to(x.device, torch.float32)
    cols = torch.from_numpy(_area_weights(width, out_w)).to(x.device, torch.float32)
    return torch.matmul(rows, torch.matmul(x, cols.T))


def small_side_size(in_hw: tuple[int, int], smaller_size: int) -> tuple[int, int]:
    """Output ``(height, width)`` of :func:`resize_small` (aspect kept, shorter side
    ``smaller_size``).

    Follows the released code's float32 arithmetic: ``ratio = smaller_size / min(h, w)`` and each
    side ``round(side * ratio)`` with round-half-to-even.
    """
    height, width = pair(in_hw, "resize_small", "in_hw")
    if isinstance(smaller_size, bool) or not isinstance(smaller_size, int) or smaller_size <= 0:
        raise ValueError(f"resize_small: smaller_size must be a positive int, got {smaller_size!r}")
    ratio = np.float32(smaller_size) / np.float32(min(height, width))
    return int(np.rint(np.float32(height) * ratio)), int(np.rint(np.float32(width) * ratio))


def resize_small(x: torch.Tensor, smaller_size: int) -> torch.Tensor:
    """Area-resize so the shorter side is ``smaller_size``, keeping the aspect ratio.

    All images of a batch share one size; resize differently sized images one by one (or group
    them by size). Returns float32.
    """
    check_images(x, "resize_small")
    return resize_area(x, small_side_size(tuple(x.shape[-2:]), smaller_size))
