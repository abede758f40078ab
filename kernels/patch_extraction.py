"""Batched patch extraction: gather, grayscale and per-patch standardisation in one pass.

For images ``[B, C, H, W]`` (uint8 or float), per-patch top-left offsets ``[B, P, 2]`` as (row, col)
and a per-image grayscale flag ``[B]``, :func:`extract_patches` writes float32 patches
``[B, P, C, p, p]``. Semantics follow the released
``preprocess.py``:

* grayscale replaces every channel by the plain channel mean; on uint8 input the mean is an integer
  (truncated) mean, on float input a float mean (after conversion to float32);
* each patch is standardised on its own: ``(x - mean) / max(std, 1/sqrt(N))`` with the population
  std over all ``N = C·p·p`` values.

``extract_patches_triton`` is the kernel: one program per patch, two reductions over the patch
(mean, then the centred sum of squares) and one normalised write. ``extract_patches_torch`` is
the vectorised torch path, what runs on CPU and what the kernel is tested against.
:func:`extract_patches` validates the inputs and dispatches through :mod:`ssltk.kernels.dispatch`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ssltk.kernels.dispatch import use_triton

__all__ = ["extract_patches", "extract_patches_torch", "extract_patches_triton"]

# Largest pixel tile one program holds at once; bigger patches are processed in chunks.
_MAX_TILE_PIXELS = 4096
# Output bytes per chunk of images in the torch path: about one core's L2 cache.
_CHUNK_BYTES = 1 << 20


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
    # One host sync: the error must name the offending offset.
    limit = torch.tensor([height - patch_size, width - patch_size], device=offsets.device)
    outside = (offsets < 0) | (offsets > limit)
    if bool(outside.any()):
        b, j = (int(i) for i in outside.any(dim=-1).nonzero()[0])
        row, col = (int(v) for v in offsets[b, j])
        raise ValueError(
            f"offsets[{b}, {j}] = ({row}, {col}) puts a {patch_size}×{patch_size} patch outside "
            f"the {height}×{width} image"
        )


def _check_out(out: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if (
        tuple(out.shape) != shape
        or out.dtype != torch.float32
        or out.device != device
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out: expected a contiguous float32 tensor of shape {shape} on {device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}"
            + ("" if out.is_contiguous() else " (not contiguous)")
        )


def _output(
    images: torch.Tensor, num_patches: int, patch_size: int, out: torch.Tensor | None
) -> torch.Tensor:
    batch, channels = images.shape[:2]
    shape = (batch, num_patches, channels, patch_size, patch_size)
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=images.device)
    return out


def extract_patches(
    images: torch.Tensor,
    offsets: torch.Tensor,
    gray: torch.Tensor,
    patch_size: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gather patches, apply the per-image grayscale flag and standardise each patch.

    Args:
        images: ``[B, C, H, W]`` uint8 or float images.
        offsets: ``[B, P, 2]`` integer top-left corners ``(row, col)`` of each patch.
        gray: ``[B]`` bool, whether image ``b`` is turned to grayscale.
        patch_size: side ``p`` of the square patches.
        out: optional contiguous float32 ``[B, P, C, p, p]`` buffer to write into.

    Returns:
        ``[B, P, C, p, p]`` float32 standardised patches on the images' device.
    """
    _check_inputs(images, offsets, gray, patch_size)
    if out is not None:
        batch, channels = images.shape[:2]
        shape = (batch, offsets.shape[1], channels, patch_size, patch_size)
        _check_out(out, shape, images.device)
    offsets = offsets.to(device=images.device, dtype=torch.int64)
    gray = gray.to(images.device)
    if use_triton(images):
        return extract_patches_triton(images, offsets, gray, patch_size, out=out)
    return extract_patches_torch(images, offsets, gray, patch_size, out=out)


def _gray_plane(patches: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Channel mean of ``[k, P, C, p, p]`` patches into ``out`` (``[k, P, 1, p, p]`` float32);
    uint8 patches get the truncated integer mean."""
    channels = patches.shape[2]
    if patches.dtype == torch.uint8:
        total = patches.sum(2, keepdim=True, dtype=torch.int32)
        return out.copy_(total.div_(channels, rounding_mode="floor"))
    return torch.sum(patches, 2, keepdim=True, out=out).div_(channels)


def _centre_rows(rows: torch.Tensor, min_std: float) -> torch.Tensor:
    """Subtract each row's mean in place; return the rows' ``max(std, min_std)`` as ``[n, 1]``."""
    size = rows.shape[1]
    rows.sub_(rows.sum(1, keepdim=True).div_(size))
    std = torch.linalg.vector_norm(rows, dim=1, keepdim=True).div_(math.sqrt(size))
    return std.clamp_min_(min_std)


def _chunk_images(batch: int, image_bytes: int) -> int:
    """Images per chunk: a chunk's output stays in a core's cache between the passes over it."""
    return max(1, min(batch, _CHUNK_BYTES // image_bytes))


def extract_patches_torch(
    images: torch.Tensor,
    offsets: torch.Tensor,
    gray: torch.Tensor,
    patch_size: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Vectorised torch implementation of :func:`extract_patches` (no validation): the CPU path.

    Each patch row is a run of ``p`` consecutive values of the flattened image, so one
    ``index_select`` over the (overlapping) view of all such runs gathers every row of every patch,
    one contiguous copy per row. The batch is processed in chunks of whole images whose output fits
    in cache, so the grayscale and standardisation passes after the gather read cache, not memory.
    A chunk of grayscale images is standardised on its single gray plane, which the final pass
    writes to every channel.
    """
    batch, channels, height, width = images.shape
    num_patches = offsets.shape[1]
    out = _output(images, num_patches, patch_size, out)
    if out.numel() == 0:
        return out
    device = images.device
    flat = images.contiguous().reshape(-1)
    runs = flat.as_strided((flat.numel() - patch_size + 1, patch_size), (1, 1))
    corners = (
        torch.arange(batch, device=device)[:, None] * (channels * height * width)
        + offsets[..., 0] * width
        + offsets[..., 1]
    )  # [B, P] flat index of each patch's top-left pixel in channel 0
    within = (
        torch.arange(channels, device=device)[:, None] * (height * width)
        + torch.arange(patch_size, device=device) * width
    ).view(-1)  # [C·p] offsets of a patch's row starts from its corner, in output order
    pixels = patch_size * patch_size
    min_std = 1.0 / math.sqrt(channels * pixels)
    chunk = _chunk_images(batch, out[0].numel() * out.element_size())
    plane = torch.empty(chunk, num_patches, 1, patch_size, patch_size, device=device)
    flags = gray.tolist()
    for first in range(0, batch, chunk):
        last = min(first + chunk, batch)
        patches = out[first:last]
        starts = (corners[first:last, :, None] + within).view(-1)
        if images.dtype == torch.float32:
            torch.index_select(runs, 0, starts, out=patches.view(-1, patch_size))
            gray_source = patches
        else:
            gathered = runs.index_select(0, starts).view(patches.shape)
            patches.copy_(gathered)
            # uint8 grays from the integers (truncated mean); other dtypes after conversion.
            gray_source = gathered if images.dtype == torch.uint8 else patches
        num_gray = sum(flags[first:last])
        if num_gray == last - first:
            # Every channel equals the gray plane: standardise the plane, write it C times.
            gray_plane = _gray_plane(gray_source, plane[: last - first])
            std = _centre_rows(gray_plane.view(-1, pixels), min_std)
            std = std.view(last - first, num_patches, 1, 1, 1)
            torch.div(gray_plane.expand_as(patches), std, out=patches)
            continue
        if num_gray > 0:
            # A blend with 0/1 weights is exact on finite values and much faster on CPU than a
            # torch.where broadcasting the flags and the plane.
            weight = gray[first:last].to(torch.float32).view(-1, 1, 1, 1, 1)
            gray_plane = _gray_plane(gray_source, plane[: last - first])
            patches.mul_(1.0 - weight).addcmul_(gray_plane, weight)
        rows = patches.view(-1, channels * pixels)
        rows.div_(_centre_rows(rows, min_std))
    return out


@triton.jit
def _load_tile(
    corner,
    is_gray,
    chunk,
    stride_c,
    stride_h,
    stride_w,
    C: tl.constexpr,
    C_PAD: tl.constexpr,
    PATCH: tl.constexpr,
    TILE: tl.constexpr,
    IS_UINT8: tl.constexpr,
):
    """Chunk ``chunk`` of a patch as a ``[C_PAD, TILE]`` float32 tile, grayscale applied, padding 0.

    ``corner`` points at the patch's top-left pixel in channel 0.
    """
    channel = tl.arange(0, C_PAD)[:, None]
    pixel = chunk * TILE + tl.arange(0, TILE)[None, :]
    mask = (channel < C) & (pixel < PATCH * PATCH)
    row = (pixel // PATCH).to(tl.int64)
    col = (pixel % PATCH).to(tl.int64)
    raw = tl.load(
        corner + channel.to(tl.int64) * stride_c + row * stride_h + col * stride_w,
        mask=mask,
        other=0,
    )
    if IS_UINT8:
        values = raw.to(tl.int32)
        gray = tl.sum(values, axis=0) // C
        values = tl.where(is_gray, tl.broadcast_to(gray[None, :], values.shape), values)
        values = values.to(tl.float32)
    else:
        values = raw.to(tl.float32)
        gray = tl.sum(values, axis=0) / C
        values = tl.where(is_gray, tl.broadcast_to(gray[None, :], values.shape), values)
    return tl.where(mask, values, 0.0), mask


@triton.jit
def _extract_patches_kernel(
    images_ptr,
    offsets_ptr,
    gray_ptr,
    out_ptr,
    num_patches,
    stride_b,
    s_c,
    s_h,
    s_w,
    min_std,
    C: tl.constexpr,
    C_PAD: tl.constexpr,
    PATCH: tl.constexpr,
    TILE: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    IS_UINT8: tl.constexpr,
):
    """One program per patch: sum, centred sum of squares, normalised store."""
    patch_id = tl.program_id(0).to(tl.int64)
    image = patch_id // num_patches
    row0 = tl.load(offsets_ptr + 2 * patch_id)
    col0 = tl.load(offsets_ptr + 2 * patch_id + 1)
    is_gray = tl.load(gray_ptr + image) != 0
    corner = images_ptr + image * stride_b + row0 * s_h + col0 * s_w
    size: tl.constexpr = C * PATCH * PATCH
    out_base = out_ptr + patch_id * size + tl.arange(0, C_PAD)[:, None].to(tl.int64) * PATCH * PATCH
    if NUM_CHUNKS == 1:
        # The whole patch fits one tile: read it once and keep it in registers.
        values, mask = _load_tile(
            corner, is_gray, 0, s_c, s_h, s_w, C, C_PAD, PATCH, TILE, IS_UINT8
        )
        mean = tl.sum(tl.sum(values, axis=1), axis=0) / size
        centred = tl.where(mask, values - mean, 0.0)
        var = tl.sum(tl.sum(centred * centred, axis=1), axis=0) / size
        denom = tl.maximum(tl.sqrt(var), min_std)
        tl.store(out_base + tl.arange(0, TILE)[None, :], centred / denom, mask=mask)
    else:
        # Larger patches: the same two reductions and the store, chunk by chunk.
        total = 0.0
        for chunk in range(NUM_CHUNKS):
            values, _ = _load_tile(
                corner, is_gray, chunk, s_c, s_h, s_w, C, C_PAD, PATCH, TILE, IS_UINT8
            )
            total += tl.sum(tl.sum(values, axis=1), axis=0)
        mean = total / size
        squares = 0.0
        for chunk in range(NUM_CHUNKS):
            values, mask = _load_tile(
                corner, is_gray, chunk, s_c, s_h, s_w, C, C_PAD, PATCH, TILE, IS_UINT8
            )
            centred = tl.where(mask, values - mean, 0.0)
            squares += tl.sum(tl.sum(centred * centred, axis=1), axis=0)
        denom = tl.maximum(tl.sqrt(squares / size), min_std)
        for chunk in range(NUM_CHUNKS):
            values, mask = _load_tile(
                corner, is_gray, chunk, s_c, s_h, s_w, C, C_PAD, PATCH, TILE, IS_UINT8
            )
            pixel = chunk * TILE + tl.arange(0, TILE)[None, :]
            tl.store(out_base + pixel, (values - mean) / denom, mask=mask)


def extract_patches_triton(
    images: torch.Tensor,
    offsets: torch.Tensor,
    gray: torch.Tensor,
    patch_size: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton kernel of :func:`extract_patches` (no validation; offsets must be int64)."""
    batch, channels = images.shape[:2]
    num_patches = offsets.shape[1]
    out = _output(images, num_patches, patch_size, out)
    if out.numel() == 0:
        return out
    pixels = patch_size * patch_size
    tile = min(triton.next_power_of_2(pixels), _MAX_TILE_PIXELS)
    channels_pad = triton.next_power_of_2(channels)
    num_warps = 8 if tile * channels_pad >= 8192 else 4
    _extract_patches_kernel[(batch * num_patches,)](
        images,
        offsets.contiguous(),
        gray.contiguous().view(torch.uint8),
        out,
        num_patches,
        *images.stride(),
        1.0 / math.sqrt(channels * pixels),
        C=channels,
        C_PAD=channels_pad,
        PATCH=patch_size,
        TILE=tile,
        NUM_CHUNKS=triton.cdiv(pixels, tile),
        IS_UINT8=images.dtype == torch.uint8,
        num_warps=num_warps,
    )
    return out
