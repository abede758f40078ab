"""Batched, deterministic augmentation primitives of the released preprocessing (the official
code's ``preprocess.py`` and slim's ``inception_preprocessing.py``).

Every function works on a whole batch ``[B, C, H, W]`` at once, on any device, with no per-image
Python loop. Random primitives come in two halves:

* a *sampler* ``(keys, stream, ...) -> parameters`` that turns per-sample keys
  (:func:`ssltk.data.rng.sample_keys`) into per-image parameters on the keys' device, so a
  sample's augmentation depends only on its key and the stream, never on the batch it is in;
* a pure *apply* ``(images, parameters) -> images``.

``stream`` separates independent draws made from the same key (different primitives, or different
copies of one image). Streams are ints in ``[0, 2**40)``; a primitive that needs several draws uses
:func:`substream` for each, so its draws never collide with another plain stream.

Geometry (``preprocessing``): ``"symmetric"`` (the default) resizes on the half-pixel grid and
draws inception crops whose distribution is invariant under flips and transposes (aspect ratio
log-uniform in [3/4, 4/3], every offset equally likely), so no transform of ``rot90`` leaves a
trace in the preprocessed pixels of content-free images. ``"tf1"`` is the released code's
geometry bit for bit: TF1's corner-anchored resize grid, aspect uniform in [0.75, 1.33] (wider
crops more often than taller ones), and the last offset excluded. It lets Rotation be solved on
pure noise; it is kept for parity with the released code.

Images of different sizes (files storage keeps the original images, see
:mod:`ssltk.data.image_list`) come as an :class:`ImageList`: each image is cropped (and resized) to
the fixed output size on its own, with the same draws from its key as in a batch tensor, and the
batch is formed after the crop.

Value ranges: images arrive as uint8 in [0, 255]. :func:`to_float` keeps that range (as the
released ``resize``/``crop``/``standardization`` chain does); :func:`inception_preprocess` works in
[0, 1] and returns [-1, 1].
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import numpy as np
import torch

from ssltk.data import rng
from ssltk.data._checks import check_float, check_images, check_per_image, pair
from ssltk.data.image_list import ImageList, Images, by_size, image_sizes
from ssltk.data.resize import (
    ResizeGrid,
    crop_and_resize,
    crop_and_resize_each,
    resize_area,
    resize_bilinear,
    resize_small,
    small_side_size,
)

__all__ = [
    "PREPROCESSING",
    "ImageList",
    "Images",
    "InceptionParams",
    "Preprocessing",
    "adjust_saturation_",
    "apply_inception",
    "brightness_deltas",
    "center_crop_offsets",
    "central_crop_boxes",
    "crop",
    "crop_and_resize",
    "crop_and_resize_each",
    "flip_mask",
    "grayscale_mask",
    "inception_crop_boxes",
    "inception_preprocess",
    "random_crop_offsets",
    "resize_area",
    "resize_bilinear",
    "resize_grid",
    "resize_small",
    "sample_inception_params",
    "saturation_factors",
    "small_side_crops",
    "small_side_size",
    "standardize",
    "substream",
    "to_float",
    "to_gray",
    "to_minus1_1",
]

_STREAM_BITS = 40

Preprocessing = Literal["symmetric", "tf1"]
PREPROCESSING: tuple[Preprocessing, ...] = ("symmetric", "tf1")


def resize_grid(preprocessing: Preprocessing) -> ResizeGrid:
    """The bilinear grid of a ``preprocessing`` mode."""
    if preprocessing not in PREPROCESSING:
        raise ValueError(
            f"preprocessing must be one of {', '.join(PREPROCESSING)}, got {preprocessing!r}"
        )
    return "tf1" if preprocessing == "tf1" else "half_pixel"


def substream(stream: int, part: int) -> int:
    """Stream id for draw ``part`` of a primitive called with ``stream`` (distinct from all plain
    streams below ``2**40`` and from every other ``(stream, part)``)."""
    _check_stream(stream, "substream")
    if stream >= 2**_STREAM_BITS:
        raise ValueError(f"substream: stream must be below 2**{_STREAM_BITS}, got {stream!r}")
    if isinstance(part, bool) or not isinstance(part, int) or not 0 <= part < 2**20:
        raise ValueError(f"substream: part must be an int in [0, 2**20), got {part!r}")
    return stream | ((part + 1) << _STREAM_BITS)


def _check_stream(stream: int, fn: str) -> None:
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < 2**60:
        raise ValueError(f"{fn}: stream must be a non-negative int, got {stream!r}")


def _check_keys(keys: torch.Tensor, fn: str) -> None:
    if not isinstance(keys, torch.Tensor) or keys.ndim != 1 or keys.is_floating_point():
        shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
        raise ValueError(f"{fn}: keys must be a 1-D integer tensor of sample keys, got {shape}")


def _uniforms(keys: torch.Tensor, stream: int, n: int, fn: str) -> torch.Tensor:
    _check_keys(keys, fn)
    _check_stream(stream, fn)
    return rng.uniform(keys, stream, n)


def _check_probability(p: float, fn: str) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{fn}: p must be a probability in [0, 1], got {p!r}")


def _per_image(value: torch.Tensor, x: torch.Tensor, fn: str, name: str) -> torch.Tensor:
    """A ``[B]`` parameter on ``x``'s device, shaped to broadcast over ``[B, C, H, W]``."""
    check_per_image(value, x.shape[0], fn, name)
    return value.to(x.device)[:, None, None, None]


# --- value ranges ---------------------------------------------------------------------------------


def to_float(images: torch.Tensor) -> torch.Tensor:
    """float32 copy of ``images`` with values unchanged (uint8 stays in [0, 255])."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"to_float: images must be a torch.Tensor, got {type(images).__name__}")
    return images.to(torch.float32)


def to_minus1_1(x: torch.Tensor) -> torch.Tensor:
    """Map [0, 255] values to [-1, 1]: ``x / 255 * 2 - 1`` (float32)."""
    return to_float(x) / 255.0 * 2.0 - 1.0


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-image standardisation ``(x - mean) / max(std, 1/sqrt(N))`` over the last three dims.

    ``x`` is ``[..., C, H, W]`` (any leading dims, e.g. ``[B, 9, C, h, w]`` patches); N = C·H·W and
    ``std`` is the population standard deviation, as ``tf.image.per_image_standardization``.
    Returns float32.
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"standardize: x must be [..., C, H, W], got {shape}")
    flat = to_float(x).flatten(-3)
    # Two plain passes (mean, then mean of squared deviations) are exact enough and far faster
    # on CPU than torch.std's Welford kernel.
    centered = flat - flat.mean(-1, keepdim=True)
    std = centered.square().mean(-1, keepdim=True).sqrt()
    return (centered / std.clamp_min(1.0 / math.sqrt(flat.shape[-1]))).view(x.shape)


# --- crops ----------------------------------------------------------------------------------------


def _crop_sizes(
    in_hw: tuple[int, int], out_hw: int | tuple[int, int], fn: str
) -> tuple[tuple[int, int], tuple[int, int]]:
    in_h, in_w = pair(in_hw, fn, "in_hw")
    out_h, out_w = pair(out_hw, fn, "out_hw")
    if out_h > in_h or out_w > in_w:
        raise ValueError(f"{fn}: out_hw={(out_h, out_w)} is larger than in_hw={(in_h, in_w)}")
    return (in_h, in_w), (out_h, out_w)


def random_crop_offsets(
    keys: torch.Tensor, stream: int, in_hw: tuple[int, int], out_hw: int | tuple[int, int]
) -> torch.Tensor:
    """``[B, 2]`` int64 ``(top, left)`` of uniformly random ``out_hw`` crops (every position,
    including the last, equally likely)."""
    (in_h, in_w), (out_h, out_w) = _crop_sizes(in_hw, out_hw, "random_crop_offsets")
    u = _uniforms(keys, stream, 2, "random_crop_offsets")
    positions = torch.tensor(
        [in_h - out_h + 1, in_w - out_w + 1], dtype=torch.float64, device=u.device
    )
    return torch.minimum((u * positions).floor(), positions - 1).long()


def center_crop_offsets(
    in_hw: tuple[int, int], out_hw: int | tuple[int, int], batch: int
) -> torch.Tensor:
    """``[batch, 2]`` int64 ``(top, left)`` of the centre crop: ``floor((dim - size) / 2)``."""
    (in_h, in_w), (out_h, out_w) = _crop_sizes(in_hw, out_hw, "center_crop_offsets")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"center_crop_offsets: batch must be a non-negative int, got {batch!r}")
    return torch.tensor([(in_h - out_h) // 2, (in_w - out_w) // 2]).expand(batch, 2).clone()


def crop(x: torch.Tensor, offsets: torch.Tensor, out_hw: int | tuple[int, int]) -> torch.Tensor:
    """Per-image crops: image ``i`` is cut at ``offsets[i] = (top, left)`` to ``out_hw``.

    Any dtype (uint8 stays uint8). Offsets must keep every crop inside its image.
    """
    check_images(x, "crop")
    batch, channels, height, width = x.shape
    _, (out_h, out_w) = _crop_sizes((height, width), out_hw, "crop")
    if not isinstance(offsets, torch.Tensor) or offsets.shape != (batch, 2):
        shape = tuple(offsets.shape) if isinstance(offsets, torch.Tensor) else type(offsets)
        raise ValueError(f"crop: offsets must have shape ({batch}, 2), got {shape}")
    offsets = offsets.to(device=x.device, dtype=torch.long)
    top, left = offsets.unbind(1)
    fits = (top >= 0) & (left >= 0) & (top + out_h <= height) & (left + out_w <= width)
    if not bool(fits.all()):
        bad = offsets[~fits][0].tolist()
        raise ValueError(
            f"crop: offset (top, left)={bad} puts a {out_h}x{out_w} crop outside the "
            f"{height}x{width} image"
        )
    planes = torch.arange(batch * channels, device=x.device).view(batch, channels, 1, 1)
    rows = top[:, None] + torch.arange(out_h, device=x.device)
    cols = left[:, None] + torch.arange(out_w, device=x.device)
    index = planes * (height * width) + (rows * width)[:, None, :, None] + cols[:, None, None, :]
    picked = x.reshape(-1).index_select(0, index.reshape(-1))
    return picked.view(batch, channels, out_h, out_w)


# --- flips and colour -----------------------------------------------------------------------------


def flip_mask(keys: torch.Tensor, stream: int, p: float = 0.5) -> torch.Tensor:
    """``[B]`` bool: flip image ``i`` when its uniform is below ``p``."""
    _check_probability(p, "flip_mask")
    return _uniforms(keys, stream, 1, "flip_mask")[:, 0] < p


def brightness_deltas(
    keys: torch.Tensor, stream: int, max_delta: float = 32.0 / 255.0
) -> torch.Tensor:
    """``[B]`` float32 deltas uniform in ``[-max_delta, max_delta)``."""
    if max_delta < 0:
        raise ValueError(f"brightness_deltas: max_delta must be >= 0, got {max_delta!r}")
    u = _uniforms(keys, stream, 1, "brightness_deltas")[:, 0]
    return (u * (2.0 * max_delta) - max_delta).to(torch.float32)


def saturation_factors(
    keys: torch.Tensor, stream: int, lower: float = 0.5, upper: float = 1.5
) -> torch.Tensor:
    """``[B]`` float32 saturation factors uniform in ``[lower, upper)``."""
    if not 0 <= lower <= upper:
        raise ValueError(
            f"saturation_factors: need 0 <= lower <= upper, got lower={lower!r}, upper={upper!r}"
        )
    u = _uniforms(keys, stream, 1, "saturation_factors")[:, 0]
    return (lower + u * (upper - lower)).to(torch.float32)


def adjust_saturation_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """In place: scale each image's HSV saturation by ``factor[i]``, clip S to [0, 1], keep hue
    and value.

    Closed form of TensorFlow's RGB→HSV→RGB kernel. With ``v = max(r, g, b)`` and
    ``s = (v - min) / v``, the round trip with ``s' = clip(s * f, 0, 1)`` moves every channel
    linearly towards ``v``: ``c' = v - (s' / s) * (v - c)``, where
    ``s' / s = min(f, v / (v - min))``. Pixels with ``v <= 0`` (where TF sets ``s = 0``) become
    ``v`` in all channels. Equal to the HSV route up to float rounding, and also defined for
    values outside [0, 1] (brightness runs first and does not clip). ``x`` is float RGB
    ``[B, 3, H, W]``.
    """
    check_images(x, "adjust_saturation_", channels=3)
    check_float(x, "adjust_saturation_")
    factor = _per_image(factor, x, "adjust_saturation_", "factor")
    value = x.amax(1, keepdim=True)
    spread = value - x.amin(1, keepdim=True)
    # Grey pixels (spread 0) get ratio f (v / 0 = inf), harmless since then v - c = 0 everywhere.
    limit = torch.minimum(factor.to(x.dtype).clamp_min(0.0), value / spread)
    ratio = torch.where(value > 0, limit, 0.0)
    # value - ratio * (value - x), with the same float operations, in place.
    return x.neg_().add_(value).mul_(ratio).neg_().add_(value)


def grayscale_mask(keys: torch.Tensor, stream: int, p: float) -> torch.Tensor:
    """``[B]`` bool: make image ``i`` grey when its uniform is below ``p``."""
    _check_probability(p, "grayscale_mask")
    return _uniforms(keys, stream, 1, "grayscale_mask")[:, 0] < p


def to_gray(x: Images, mask: torch.Tensor) -> Images:
    """Replace the masked images by the plain mean of R, G, B copied to 3 channels.

    Integer input gets the truncated integer mean ``(r + g + b) // 3`` and keeps its dtype; float
    input the exact mean.
    """
    if isinstance(x, ImageList):
        check_per_image(mask, len(x), "to_gray", "mask")
        return ImageList(to_gray(image[None], mask[i : i + 1])[0] for i, image in enumerate(x))
    check_images(x, "to_gray", channels=3)
    flag = _per_image(mask, x, "to_gray", "mask").bool()
    if x.is_floating_point():
        gray = x.mean(1, keepdim=True)
    else:
        gray = (x.sum(1, keepdim=True, dtype=torch.int32) // 3).to(x.dtype)
    return torch.where(flag, gray.expand_as(x), x)


# --- inception crop -------------------------------------------------------------------------------


def inception_crop_boxes(
    keys: torch.Tensor,
    stream: int,
    in_hw: tuple[int, int],
    *,
    area: tuple[float, float] = (0.05, 1.0),
    ratio: tuple[float, float] | None = None,
    min_object_covered: float = 0.1,
    attempts: int = 100,
    preprocessing: Preprocessing = "symmetric",
) -> torch.Tensor:
    """``[B, 4]`` int64 ``(top, left, height, width)`` crops as TF's sample_distorted_bounding_box.

    The object box is the whole image, so ``min_object_covered`` is a lower bound on the crop's
    area fraction. Each attempt draws an aspect ratio ``w/h`` in ``ratio``, a height between the
    rounded heights of the minimum and maximum ``area``, ``width = round(height * ratio)`` with
    TF's one-step rounding repairs, and an offset. The first attempt that fits is kept; if none of
    ``attempts`` does, the whole image is returned. Arithmetic mirrors the C++ kernel (float32,
    round-half-to-even). All attempts are drawn at once: ``uniform(keys, stream, 4 * attempts)``
    viewed as ``[B, attempts, 4]`` = (aspect, height, top, left).

    ``preprocessing="tf1"`` is TF's kernel exactly: aspect uniform in ``ratio`` (default
    ``(0.75, 1.33)``) and offsets in ``[0, H - height)`` (the last position excluded unless the
    crop spans the image). ``"symmetric"`` draws the aspect log-uniformly in ``ratio`` (default
    ``(3/4, 4/3)``) and every offset in ``[0, H - height]``, so a box and its transpose, and a box
    and its mirror image, are equally likely. On a non-square image it also bounds both sides of
    the box by the shorter side of the image and falls back to the central square (areas stay
    fractions of the whole image): else wide boxes of a landscape image fit more often than tall
    ones, and the squeeze of the resize to a square tells a network which way is up.
    """
    fn = "inception_crop_boxes"
    height, width = pair(in_hw, fn, "in_hw")
    symmetric = resize_grid(preprocessing) == "half_pixel"
    # The longest sides a box may have: symmetric bounds both by the shorter side of the image.
    side_h, side_w = (min(height, width),) * 2 if symmetric else (height, width)
    if ratio is None:
        ratio = (3 / 4, 4 / 3) if symmetric else (0.75, 1.33)
    if not 0 < area[0] <= area[1] <= 1:
        raise ValueError(f"{fn}: area must satisfy 0 < low <= high <= 1, got {area!r}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"{fn}: ratio must satisfy 0 < low <= high, got {ratio!r}")
    if min_object_covered < 0:
        raise ValueError(f"{fn}: min_object_covered must be >= 0, got {min_object_covered!r}")
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts <= 0:
        raise ValueError(f"{fn}: attempts must be a positive int, got {attempts!r}")
    # A few hundred numbers per image: drawn and resolved on the CPU, identical for any device.
    u = _uniforms(keys.cpu(), stream, 4 * attempts, fn).numpy().reshape(-1, attempts, 4)

    f32 = np.float32
    if symmetric:
        log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
        aspect = np.exp(u[..., 0].astype(np.float64) * (log_hi - log_lo) + log_lo).astype(f32)
    else:
        aspect = u[..., 0].astype(f32) * (f32(ratio[1]) - f32(ratio[0])) + f32(ratio[0])
    min_area = f32(area[0]) * f32(width) * f32(height)
    max_area = f32(area[1]) * f32(width) * f32(height)

    def rint(v: np.ndarray) -> np.ndarray:
        return np.rint(v).astype(np.int64)

    def width_of(h: np.ndarray) -> np.ndarray:
        return rint(h.astype(f32) * aspect)  # int * float in float32, as the C++ kernel

    def uniform_below(u_col: np.ndarray, n: np.ndarray) -> np.ndarray:
        n = np.maximum(n, 0)
        return np.minimum(np.floor(u_col * n).astype(np.int64), np.maximum(n - 1, 0))

    crop_h = rint(np.sqrt(min_area / aspect))
    max_h = rint(np.sqrt(max_area / aspect))
    # Largest height whose rounded width still fits (TF's repair for wide aspect ratios).
    eps = float(f32(1e-7))
    fitted = np.floor((side_w + 0.5 - eps) / aspect.astype(np.float64)).astype(np.int64)
    fitted -= width_of(fitted) > side_w
    max_h = np.where(width_of(max_h) > side_w, fitted, max_h)
    max_h = np.minimum(max_h, side_h)
    crop_h = np.minimum(crop_h, max_h)
    crop_h = crop_h + uniform_below(u[..., 1], max_h - crop_h + 1)
    crop_w = width_of(crop_h)
    crop_h = np.where(crop_w * crop_h < min_area, crop_h + 1, crop_h)
    crop_w = width_of(crop_h)
    crop_h = np.where(crop_w * crop_h > max_area, crop_h - 1, crop_h)
    crop_w = width_of(crop_h)
    crop_area = crop_w * crop_h

    fits = (crop_area >= min_area) & (crop_area <= max_area)
    fits &= (crop_w <= side_w) & (crop_h <= side_h) & (crop_w > 0) & (crop_h > 0)
    fits &= crop_area.astype(f32) / f32(width * height) >= f32(min_object_covered)
    last = 1 if symmetric else 0  # TF never draws the last offset
    top = uniform_below(u[..., 2], height - crop_h + last)
    left = uniform_below(u[..., 3], width - crop_w + last)

    boxes = np.stack([top, left, crop_h, crop_w], axis=-1)
    first = fits.argmax(axis=1)
    chosen = boxes[np.arange(len(boxes)), first]
    corner = ((height - side_h) // 2, (width - side_w) // 2)  # the whole image, or its centre
    whole = np.array([*corner, side_h, side_w], dtype=np.int64)
    chosen = np.where(fits.any(axis=1)[:, None], chosen, whole)
    return torch.from_numpy(chosen).to(keys.device)


def inception_crop_boxes_each(
    keys: torch.Tensor, stream: int, sizes: list[tuple[int, int]], **options
) -> torch.Tensor:
    """:func:`inception_crop_boxes` of images of different ``sizes`` (``(height, width)`` each);
    image ``i``'s box is the one it would get in a batch of its own size."""
    boxes = torch.empty((len(sizes), 4), dtype=torch.int64)
    for size, rows in by_size(sizes).items():
        boxes[rows] = inception_crop_boxes(keys.cpu()[rows], stream, size, **options)
    return boxes


def central_square_boxes(in_hw: tuple[int, int], fraction: float) -> torch.Tensor:
    """``[1, 4]``: :func:`central_crop_boxes` of the image's central square (the shorter side),
    so that a resize to a square does not squeeze a non-square image (see
    :func:`inception_crop_boxes`)."""
    height, width = pair(in_hw, "central_square_boxes", "in_hw")
    side = min(height, width)
    box = central_crop_boxes((side, side), fraction, 1)
    box[:, 0] += (height - side) // 2
    box[:, 1] += (width - side) // 2
    return box


def central_crop_boxes(in_hw: tuple[int, int], fraction: float, batch: int) -> torch.Tensor:
    """``[batch, 4]`` boxes of ``tf.image.central_crop``: start ``int((d - d * fraction) / 2)`` and
    size ``d - 2 * start`` on each side."""
    height, width = pair(in_hw, "central_crop_boxes", "in_hw")
    if not 0 < fraction <= 1:
        raise ValueError(f"central_crop_boxes: fraction must be in (0, 1], got {fraction!r}")
    top = int((height - height * fraction) / 2)
    left = int((width - width * fraction) / 2)
    box = torch.tensor([top, left, height - 2 * top, width - 2 * left])
    return box.expand(batch, 4).clone()


# --- inception preprocessing ----------------------------------------------------------------------


class InceptionParams(NamedTuple):
    """Per-image parameters of training-mode :func:`inception_preprocess`."""

    boxes: torch.Tensor  # [B, 4] int64 (top, left, height, width)
    flip: torch.Tensor  # [B] bool
    brightness: torch.Tensor  # [B] float32 delta
    saturation: torch.Tensor  # [B] float32 factor


def sample_inception_params(
    keys: torch.Tensor,
    stream: int,
    in_hw: tuple[int, int] | list[tuple[int, int]],
    *,
    preprocessing: Preprocessing = "symmetric",
) -> InceptionParams:
    """Draw crop box, flip, brightness and saturation from substreams 0..3 of ``stream``.

    ``in_hw`` is the batch's image size, or a list of each image's size (boxes then on the CPU).
    """
    box_stream = substream(stream, 0)
    if isinstance(in_hw, list):
        boxes = inception_crop_boxes_each(keys, box_stream, in_hw, preprocessing=preprocessing)
    else:
        boxes = inception_crop_boxes(keys, box_stream, in_hw, preprocessing=preprocessing)
    return InceptionParams(
        boxes=boxes,
        flip=flip_mask(keys, substream(stream, 1), 0.5),
        brightness=brightness_deltas(keys, substream(stream, 2), 32.0 / 255.0),
        saturation=saturation_factors(keys, substream(stream, 3), 0.5, 1.5),
    )


def _unit_range(images: torch.Tensor, fn: str) -> torch.Tensor:
    check_images(images, fn, name="images", channels=3)
    if images.dtype != torch.uint8:
        raise TypeError(f"{fn}: images must be uint8 in [0, 255], got {images.dtype}")
    # tf.image.convert_image_dtype multiplies by 1/255 rather than dividing.
    return images.to(torch.float32) * (1.0 / 255.0)


def _crop_unit_range(
    images: Images,
    boxes: torch.Tensor,
    size: tuple[int, int],
    fn: str,
    *,
    flip: torch.Tensor | None = None,
    grid: ResizeGrid,
) -> torch.Tensor:
    """[0, 1] floats of each box resized to ``size``: the batch at once, or image by image."""
    if isinstance(images, ImageList):

        def unit(region: torch.Tensor) -> torch.Tensor:
            return _unit_range(region, fn)

        return crop_and_resize_each(images, boxes, size, flip=flip, grid=grid, convert=unit)
    return crop_and_resize(_unit_range(images, fn), boxes, size, flip=flip, grid=grid)


def apply_inception(
    images: Images,
    params: InceptionParams,
    out_size: int | tuple[int, int] = 224,
    *,
    grid: ResizeGrid = "half_pixel",
) -> torch.Tensor:
    """Training-mode inception preprocessing with given parameters; uint8 in, float32 [-1, 1] out.

    [0, 1] float → box crop → bilinear resize on ``grid`` to ``out_size`` (aspect ignored) → flip
    → brightness → saturation → clip to [0, 1] → ``(x - 0.5) * 2``.
    """
    size = pair(out_size, "apply_inception", "out_size")
    x = _crop_unit_range(images, params.boxes, size, "apply_inception", flip=params.flip, grid=grid)
    x += _per_image(params.brightness, x, "apply_inception", "brightness").to(x.dtype)
    x = adjust_saturation_(x, params.saturation)
    return x.clamp_(0.0, 1.0).sub_(0.5).mul_(2.0)


def inception_preprocess(
    images: Images,
    keys: torch.Tensor | None,
    stream: int,
    out_size: int | tuple[int, int] = 224,
    *,
    train: bool = True,
    preprocessing: Preprocessing = "symmetric",
) -> torch.Tensor:
    """Slim's inception preprocessing of a uint8 batch ``[B, 3, H, W]``; float32 [-1, 1] out.

    Training draws every random choice from ``keys`` and ``stream`` (see
    :func:`sample_inception_params`). Eval is deterministic (``keys`` may be ``None``): centre crop
    of 87.5% of each side, bilinear resize to ``out_size``, map to [-1, 1]. ``preprocessing``
    picks the geometry (see the module docstring). An :class:`ImageList` (files storage) is
    cropped image by image: the box is sampled over, or centred in, each whole original image
    (``symmetric``: with both sides at most the image's shorter side, see
    :func:`inception_crop_boxes`, so that the resize does not squeeze it).
    """
    ragged = isinstance(images, ImageList)
    if not ragged:
        check_images(images, "inception_preprocess", name="images", channels=3)
    in_hw = image_sizes(images) if ragged else (images.shape[2], images.shape[3])
    grid = resize_grid(preprocessing)
    if train:
        if keys is None:
            raise ValueError("inception_preprocess: keys are required when train=True")
        params = sample_inception_params(keys, stream, in_hw, preprocessing=preprocessing)
        return apply_inception(images, params, out_size, grid=grid)
    if ragged:
        square = grid == "half_pixel"  # symmetric: a non-square original is not squeezed
        boxes = torch.cat(
            [
                central_square_boxes(hw, 0.875) if square else central_crop_boxes(hw, 0.875, 1)
                for hw in in_hw
            ]
        )
    else:
        boxes = central_crop_boxes(in_hw, 0.875, images.shape[0])
    size = pair(out_size, "inception_preprocess", "out_size")
    x = _crop_unit_range(images, boxes, size, "inception_preprocess", grid=grid)
    return x.sub_(0.5).mul_(2.0)


def small_side_crops(
    images: ImageList,
    smaller_size: int,
    crop_size: int,
    keys: torch.Tensor | None = None,
    stream: int = 0,
) -> torch.Tensor:
    """The released evaluation crop of images of different sizes: per image :func:`resize_small`
    to ``smaller_size`` (area, aspect kept), then a ``crop_size``² crop, centred
    (:func:`center_crop_offsets`) or random from ``keys``; float32 ``[B, 3, crop, crop]``."""
    sizes = [small_side_size(hw, smaller_size) for hw in image_sizes(images)]
    offsets = torch.empty((len(images), 2), dtype=torch.int64)
    for size, rows in by_size(sizes).items():
        if keys is None:
            offsets[rows] = center_crop_offsets(size, crop_size, len(rows))
        else:
            offsets[rows] = random_crop_offsets(keys.cpu()[rows], stream, size, crop_size)
    crops = [
        crop(resize_area(image[None], size), offsets[i : i + 1], crop_size)
        for i, (image, size) in enumerate(zip(images, sizes))
    ]
    return torch.cat(crops)
