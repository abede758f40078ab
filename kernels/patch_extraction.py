"""Batched patch extraction: gather, grayscale and per-patch standardisation in one pass.

For images ``[B, C, H, W]`` (uint8 or float), per-patch top-left offsets ``[B, P, 2]`` as (row, col)
and a per-image grayscale flag ``[B]``, :func:`extract_patches` writes float32 patches
``[B, P, C, p, p]``. Semantics follow paper §2.0:

* grayscale replaces every channel by the plain channel mean; on uint8 input the mean is an integer
  (truncated) mean, on float input a float mean (after conversion to float32);
* each patch is standardised on its own: ``(x - mean) / max(std, 1/sqrt(N))`` with the population
  std over all ``N = C·p·p`` values.

``extract_patches_triton`` is the kernel: one program per patch, two reductions over the patch
(mean, then the centred sum of squares) and one normalised write. ``extract_patches_reference`` is
the vectorised torch reference it is tested against. :func:`extract_patches` validates the inputs
and dispatches through :mod:`kernels.dispatch`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.dispatch import use_triton

__all__ = ["extract_patches", "extract_patches_reference", "extract_patches_triton"]

# Largest pixel tile one program holds at once; bigger patches are processed in chunks.
_MAX_TILE_PIXELS = 4096


def _check_inputs(
    images: torch.Tensor, offsets: torch.Tensor, gray: torch.Tensor, patch_size: int
) -> None:
    if images.ndim != 4:
        raise ValueError(f"images: expected [B, C, H, W], got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
        raise ValueError(f"images: expected uint8 or floating dtype, got {images.dtype}")
    batch, _, height, width = images.shape
    if offsets.ndim != 3 or offsets.shape[0] != batch or offsets.shape[2] != 2:
        raise ValueError(
            f"offsets: expected [B={batch}, P, 2] (row, col), got shape {tuple(offsets.shape)}"
        )
    if offsets.dtype.is_floating_point or offsets.dtype == torch.bool:
        raise ValueError(f"offsets: expected an integer dtype, got {offsets.dtype}")
    if gray.shape != (batch,) or gray.dtype != torch.bool:
        raise ValueError(
            f"gray: expected a bool tensor of shape ({batch},), "
            f"got {gray.dtype} {tuple(gray.shape)}"
        )
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size: expected a positive int, got {patch_size!r}")
    if patch_size > height or patch_size > width:
        raise ValueError(f"patch_size={patch_size} exceeds the {height}×{width} images")
    if offsets.numel() == 0:
        return
    rows, cols = offsets[..., 0], offsets[..., 1]
    outside = (rows < 0) | (cols < 0) | (rows > height - patch_size) | (cols > width - patch_size)
    if bool(outside.any()):
        b, j = (int(i) for i in outside.nonzero()[0])
        raise ValueError(
            f"offsets[{b}, {j}] = ({int(rows[b, j])}, {int(cols[b, j])}) puts a "
            f"{patch_size}×{patch_size} patch outside the {height}×{width} image"
        )


def extract_patches(
    images: torch.Tensor, offsets: torch.Tensor, gray: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """Gather patches, apply the per-image grayscale flag and standardise each patch.

    Args:
        images: ``[B, C, H, W]`` uint8 or float images.
        offsets: ``[B, P, 2]`` integer top-left corners ``(row, col)`` of each patch.
        gray: ``[B]`` bool, whether image ``b`` is turned to grayscale.
        patch_size: side ``p`` of the square patches.

    Returns:
        ``[B, P, C, p, p]`` float32 standardised patches on the images' device.
    """
    _check_inputs(images, offsets, gray, patch_size)
    offsets = offsets.to(device=images.device, dtype=torch.int64)
    gray = gray.to(images.device)
    if use_triton(images):
        return extract_patches_triton(images, offsets, gray, patch_size)
    return extract_patches_reference(images, offsets, gray, patch_size)


def extract_patches_reference(
    images: torch.Tensor, offsets: torch.Tensor, gray: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """Vectorised torch reference of :func:`extract_patches` (no validation, no Python loops)."""
    batch, channels = images.shape[:2]
    num_patches = offsets.shape[1]
    span = torch.arange(patch_size, device=images.device)
    rows = offsets[..., 0, None] + span  # [B, P, p]
    cols = offsets[..., 1, None] + span
    image_index = torch.arange(batch, device=images.device)[:, None, None, None]
    # Channels-last gather keeps each pixel's channels together for the grayscale mean.
    patches = images.permute(0, 2, 3, 1)[image_index, rows[..., :, None], cols[..., None, :]]
    if images.dtype != torch.uint8:
        patches = patches.float()
    if bool(gray.any()):
        if images.dtype == torch.uint8:
            mean = patches.sum(dim=-1, keepdim=True, dtype=torch.int32).div(
                channels, rounding_mode="floor"
            )
        else:
            mean = patches.sum(dim=-1, keepdim=True) / channels
        flag = gray[:, None, None, None, None]
        patches = torch.where(flag, mean.to(patches.dtype), patches)
    out = torch.empty(
        (batch, num_patches, channels, patch_size, patch_size),
        dtype=torch.float32,
        device=images.device,
    )
    out.copy_(patches.permute(0, 1, 4, 2, 3))
    size = channels * patch_size * patch_size
    flat = out.view(batch, num_patches, size)
    mean = flat.sum(dim=-1, keepdim=True) / size
    centred = flat - mean
    var = centred.square().sum(dim=-1, keepdim=True) / size
    denom = var.sqrt().clamp_min(1.0 / math.sqrt(size))
    torch.div(centred, denom, out=flat)
    return out


@triton.jit
def _load_tile(
    image_base,
    row0,
    col0,
    is_gray,
    chunk,
    stride_c,
    stride_h,
    stride_w,
    CHANNELS: tl.constexpr,
    CHANNELS_PAD: tl.constexpr,
    PATCH: tl.constexpr,
    TILE: tl.constexpr,
    IS_UINT8: tl.constexpr,
):
    """One ``[CHANNELS_PAD, TILE]`` float32 tile of a patch, grayscale applied; padding is 0."""
    channel = tl.arange(0, CHANNELS_PAD)[:, None]
    pixel = chunk * TILE + tl.arange(0, TILE)[None, :]
    mask = (channel < CHANNELS) & (pixel < PATCH * PATCH)
    row = row0 + (pixel // PATCH).to(tl.int64)
    col = col0 + (pixel % PATCH).to(tl.int64)
    source = image_base + channel.to(tl.int64) * stride_c + row * stride_h + col * stride_w
    raw = tl.load(source, mask=mask, other=0)
    if IS_UINT8:
        values = raw.to(tl.int32)
        mean = tl.sum(values, axis=0) // CHANNELS
        values = tl.where(is_gray, tl.broadcast_to(mean[None, :], values.shape), values)
        values = values.to(tl.float32)
    else:
        values = raw.to(tl.float32)
        mean = tl.sum(values, axis=0) / CHANNELS
        values = tl.where(is_gray, tl.broadcast_to(mean[None, :], values.shape), values)
    return tl.where(mask, values, 0.0), mask


@triton.jit
def _extract_patches_kernel(
    images_ptr,
    offsets_ptr,
    gray_ptr,
    out_ptr,
    num_patches,
    stride_b,
    stride_c,
    stride_h,
    stride_w,
    min_std,
    CHANNELS: tl.constexpr,
    CHANNELS_PAD: tl.constexpr,
    PATCH: tl.constexpr,
    TILE: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    IS_UINT8: tl.constexpr,
):
    patch_id = tl.program_id(0).to(tl.int64)
    image = patch_id // num_patches
    row0 = tl.load(offsets_ptr + 2 * patch_id)
    col0 = tl.load(offsets_ptr + 2 * patch_id + 1)
    is_gray = tl.load(gray_ptr + image) != 0
    image_base = images_ptr + image * stride_b
    size: tl.constexpr = CHANNELS * PATCH * PATCH
    out_base = out_ptr + patch_id * size
    channel = tl.arange(0, CHANNELS_PAD)[:, None].to(tl.int64)
    if NUM_CHUNKS == 1:
        # The whole patch fits one tile: read it once and keep it in registers.
        values, mask = _load_tile(
            image_base, row0, col0, is_gray, 0, stride_c, stride_h, stride_w,
            CHANNELS, CHANNELS_PAD, PATCH, TILE, IS_UINT8,
        )  # fmt: skip
        mean = tl.sum(tl.sum(values, axis=1), axis=0) / size
        centred = tl.where(mask, values - mean, 0.0)
        var = tl.sum(tl.sum(centred * centred, axis=1), axis=0) / size
        denom = tl.maximum(tl.sqrt(var), min_std)
        pixel = tl.arange(0, TILE)[None, :]
        tl.store(out_base + channel * (PATCH * PATCH) + pixel, centred / denom, mask=mask)
    else:
        total = 0.0
        for chunk in range(NUM_CHUNKS):
            values, mask = _load_tile(
                image_base, row0, col0, is_gray, chunk, stride_c, stride_h, stride_w,
                CHANNELS, CHANNELS_PAD, PATCH, TILE, IS_UINT8,
            )  # fmt: skip
            total += tl.sum(tl.sum(values, axis=1), axis=0)
        mean = total / size
        squares = 0.0
        for chunk in range(NUM_CHUNKS):
            values, mask = _load_tile(
                image_base, row0, col0, is_gray, chunk, stride_c, stride_h, stride_w,
                CHANNELS, CHANNELS_PAD, PATCH, TILE, IS_UINT8,
            )  # fmt: skip
            centred = tl.where(mask, values - mean, 0.0)
            squares += tl.sum(tl.sum(centred * centred, axis=1), axis=0)
        denom = tl.maximum(tl.sqrt(squares / size), min_std)
        for chunk in range(NUM_CHUNKS):
            values, mask = _load_tile(
                image_base, row0, col0, is_gray, chunk, stride_c, stride_h, stride_w,
                CHANNELS, CHANNELS_PAD, PATCH, TILE, IS_UINT8,
            )  # fmt: skip
            pixel = chunk * TILE + tl.arange(0, TILE)[None, :]
            tl.store(
                out_base + channel * (PATCH * PATCH) + pixel, (values - mean) / denom, mask=mask
            )


def extract_patches_triton(
    images: torch.Tensor, offsets: torch.Tensor, gray: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """Triton kernel of :func:`extract_patches` (no validation; offsets must be int64)."""
    batch, channels = images.shape[:2]
    num_patches = offsets.shape[1]
    out = torch.empty(
        (batch, num_patches, channels, patch_size, patch_size),
        dtype=torch.float32,
        device=images.device,
    )
    if out.numel() == 0:
        return out
    pixels = patch_size * patch_size
    tile = min(triton.next_power_of_2(pixels), _MAX_TILE_PIXELS)
    channels_pad = triton.next_power_of_2(channels)
    num_warps = 8 if tile * channels_pad >= 8192 else 4
    _extract_patches_kernel[(batch * num_patches,)](
        images,
        offsets.contiguous(),
        gray.to(torch.uint8),
        out,
        num_patches,
        *images.stride(),
        1.0 / math.sqrt(channels * pixels),
        CHANNELS=channels,
        CHANNELS_PAD=channels_pad,
        PATCH=patch_size,
        TILE=tile,
        NUM_CHUNKS=triton.cdiv(pixels, tile),
        IS_UINT8=images.dtype == torch.uint8,
        num_warps=num_warps,
    )
    return out
