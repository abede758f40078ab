"""TF1-compatible image resizing on batches ``[B, C, H, W]``.

The released code resizes with TensorFlow 1 ops whose sampling grids differ from PyTorch's defaults:

* bilinear (``tf.image.resize_images`` / ``resize_bilinear``, ``align_corners=False``) uses the
  *legacy* grid ``src = dst * in / out`` with no half-pixel offset, and clamps the upper neighbour
  at the last row/column. ``F.interpolate(mode="bilinear")`` samples at
  ``(dst + 0.5) * in / out - 0.5`` instead.
* area (``resize_area``) averages each output cell's footprint ``[dst * s, (dst + 1) * s)`` with
  fractional weights for partly covered pixels. ``F.interpolate(mode="area")`` (adaptive average
  pooling) instead averages whole pixels of ``[floor(dst * s), ceil((dst + 1) * s))`` with equal
  weights, which differs whenever ``in / out`` is not an integer.

Both are implemented exactly here: bilinear by gathering neighbours with TF's grid and blending in
TF's order (x, then y), area as two separable matrix products with the exact overlap weights.
Outputs are float32 in the input's value range (uint8 inputs are not rescaled).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ssltk.data._checks import check_images, check_per_image, pair

__all__ = ["crop_and_resize", "resize_area", "resize_bilinear", "resize_small", "small_side_size"]


def _legacy_grid(
    start: torch.Tensor, length: torch.Tensor, out: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image TF1 legacy sample positions inside ``[start, start + length)``.

    Returns lower and upper source indices ``[B, out]`` (absolute, int64) and the float32 weight of
    the upper one. Arithmetic is float32, as in TensorFlow's kernel.
    """
    scale = length.to(torch.float32)[:, None] / out
    src = torch.arange(out, dtype=torch.float32, device=length.device)[None, :] * scale
    lower = src.floor()
    upper = torch.minimum(src.ceil().long(), length[:, None] - 1)
    return start[:, None] + lower.long(), start[:, None] + upper, src - lower


def crop_and_resize(
    x: torch.Tensor,
    boxes: torch.Tensor,
    out_hw: int | tuple[int, int],
    *,
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop each image to its box, then TF1-bilinear resize it to ``out_hw`` (aspect ignored).

    ``boxes`` is ``[B, 4]`` integer ``(top, left, height, width)`` in pixels, inside the image. The
    result equals ``tf.image.resize_images(tf.slice(image, box), out_hw)`` per image: neighbours are
    clamped to the box, never read from outside it. ``flip`` (``[B]`` bool) mirrors the chosen
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
    y0, y1, wy = _legacy_grid(top, box_h, out_h)
    x0, x1, wx = _legacy_grid(left, box_w, out_w)
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


def resize_bilinear(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """TF1 legacy bilinear resize (``align_corners=False``, no half-pixel centres) to ``size``."""
    check_images(x, "resize_bilinear")
    batch, _, height, width = x.shape
    whole = torch.tensor([0, 0, height, width], device=x.device).expand(batch, 4)
    return crop_and_resize(x, whole, pair(size, "resize_bilinear", "size"))


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
