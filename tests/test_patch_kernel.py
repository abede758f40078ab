"""Batched patch extraction: Triton kernel (interpreted on CPU), the torch path, naive loop."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssltk.kernels import patch_extraction
from ssltk.kernels.dispatch import force
from ssltk.kernels.patch_extraction import (
    extract_patches,
    extract_patches_torch,
    extract_patches_triton,
)


def naive_patches(
    images: torch.Tensor, offsets: torch.Tensor, gray: torch.Tensor, p: int
) -> torch.Tensor:
    """One patch at a time: crop, grayscale, standardise (paper §2.0), written independently."""
    batch, channels = images.shape[:2]
    out = torch.empty(batch, offsets.shape[1], channels, p, p, dtype=torch.float64)
    for b in range(batch):
        for j in range(offsets.shape[1]):
            row, col = (int(v) for v in offsets[b, j])
            patch = images[b, :, row : row + p, col : col + p]
            if gray[b]:
                if images.dtype == torch.uint8:
                    mean = patch.long().sum(0) // channels
                else:
                    mean = patch.float().sum(0) / channels
                patch = mean.expand(channels, p, p)
            x = patch.double() if images.dtype == torch.uint8 else patch.float().double()
            n = x.numel()
            std = x.std(correction=0)
            out[b, j] = (x - x.mean()) / max(float(std), 1 / math.sqrt(n))
    return out.float()


def _case(
    seed: int,
    dtype: torch.dtype,
    batch: int,
    channels: int,
    height: int,
    width: int,
    p: int,
    num_patches: int,
    border: bool,
):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        images = torch.randint(0, 256, (batch, channels, height, width), generator=g, dtype=dtype)
    else:
        images = (torch.rand(batch, channels, height, width, generator=g) * 255).to(dtype)
    rows = torch.randint(0, height - p + 1, (batch, num_patches), generator=g)
    cols = torch.randint(0, width - p + 1, (batch, num_patches), generator=g)
    if border:  # pin patches to every edge and corner
        rows[:, 0], cols[:, 0] = 0, 0
        rows[:, -1], cols[:, -1] = height - p, width - p
    gray = torch.rand(batch, generator=g) < 0.5
    return images, torch.stack([rows, cols], dim=-1), gray


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.uint8, torch.float32, torch.float16]),
    batch=st.integers(1, 3),
    channels=st.sampled_from([1, 3]),
    height=st.integers(4, 20),
    width=st.integers(4, 20),
    p_frac=st.floats(0.1, 1.0),
    num_patches=st.integers(1, 4),
    border=st.booleans(),
)
def test_kernel_matches_torch_path_and_naive_loop(
    seed, dtype, batch, channels, height, width, p_frac, num_patches, border
):
    p = max(1, int(min(height, width) * p_frac))
    images, offsets, gray = _case(
        seed, dtype, batch, channels, height, width, p, num_patches, border
    )
    naive = naive_patches(images, offsets, gray, p)
    reference = extract_patches_torch(images, offsets, gray, p)
    with force("triton"):
        kernel = extract_patches(images, offsets, gray, p)
    assert kernel.shape == (batch, num_patches, channels, p, p) and kernel.dtype == torch.float32
    torch.testing.assert_close(reference, naive, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(kernel, reference, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("gray_on", [True, False])
def test_kernel_chunked_path_for_large_patches(dtype, gray_on):
    # 70×70 = 4900 pixels needs more than one tile per patch.
    images, offsets, _ = _case(3, dtype, 2, 3, 72, 75, 70, 2, border=True)
    gray = torch.full((2,), gray_on)
    reference = extract_patches_torch(images, offsets, gray, 70)
    kernel = extract_patches_triton(images, offsets, gray, 70)
    torch.testing.assert_close(kernel, reference, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(
        reference, naive_patches(images, offsets, gray, 70), atol=2e-5, rtol=1e-5
    )


def test_uint8_grayscale_is_truncated_integer_mean():
    images = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    images[0, :, 0, 0] = torch.tensor([1, 1, 0], dtype=torch.uint8)  # mean 2/3 → 0
    images[0, :, 1, 1] = torch.tensor([255, 255, 254], dtype=torch.uint8)  # 764/3 → 254
    offsets = torch.zeros(1, 1, 2, dtype=torch.long)
    gray = torch.tensor([True])
    expected_gray = torch.tensor([[0.0, 0.0], [0.0, 254.0]])
    expected = (expected_gray - expected_gray.mean()) / expected_gray.std(correction=0)
    for mode in ("torch", "triton"):
        with force(mode):
            out = extract_patches(images, offsets, gray, 2)
        for c in range(3):
            torch.testing.assert_close(out[0, 0, c], expected)


@pytest.mark.parametrize("gray", [[False], [True], [True, False]], ids=["color", "gray", "mixed"])
def test_constant_patch_uses_minimum_std(gray):
    images = torch.full((len(gray), 3, 4, 4), 7, dtype=torch.uint8)
    offsets = torch.ones(len(gray), 1, 2, dtype=torch.long)
    for mode in ("torch", "triton"):
        with force(mode):
            out = extract_patches(images, offsets, torch.tensor(gray), 3)
        assert torch.equal(out, torch.zeros(len(gray), 1, 3, 3, 3))


# Output bytes per image of the chunking case below: 4 patches × 3 channels × 6² × 4 bytes.
_CASE_IMAGE_BYTES = 4 * 3 * 36 * 4


@pytest.mark.parametrize("images_per_chunk", [1, 2, 3, 7])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float16])
def test_torch_path_chunks_agree_with_naive_loop(monkeypatch, images_per_chunk, dtype):
    # Chunks of 2 and 3 images see all-gray, all-colour and mixed chunks; 7 is the whole batch.
    images, offsets, _ = _case(13, dtype, 7, 3, 14, 15, 6, 4, border=True)
    gray = torch.tensor([True, True, False, True, False, False, True])
    monkeypatch.setattr(patch_extraction, "_CHUNK_BYTES", images_per_chunk * _CASE_IMAGE_BYTES + 1)
    assert patch_extraction._chunk_images(7, _CASE_IMAGE_BYTES) == images_per_chunk
    buffer = torch.full((7, 4, 3, 6, 6), float("nan"))
    got = extract_patches_torch(images, offsets, gray, 6, out=buffer)
    expected = naive_patches(images, offsets, gray, 6)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(extract_patches_triton(images, offsets, gray, 6), got)


def test_non_contiguous_images():
    base, offsets, gray = _case(5, torch.float32, 2, 3, 9, 12, 4, 3, border=True)
    images = base.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # same values, new strides
    assert not images.is_contiguous()
    with force("triton"):
        kernel = extract_patches(images, offsets, gray, 4)
    torch.testing.assert_close(kernel, extract_patches_torch(base, offsets, gray, 4))


def test_dispatch_uses_torch_path_on_cpu_by_default():
    images, offsets, gray = _case(7, torch.uint8, 2, 3, 10, 10, 5, 2, border=False)
    with force("auto"):
        out = extract_patches(images, offsets, gray, 5)
    assert torch.equal(out, extract_patches_torch(images, offsets, gray, 5))


@pytest.mark.parametrize(
    "row, col", [(-1, 0), (0, -2), (6, 0), (0, 7)], ids=["top", "left", "bottom", "right"]
)
def test_out_of_bounds_offset_names_the_offset(row, col):
    images = torch.zeros(2, 3, 10, 11, dtype=torch.uint8)
    offsets = torch.zeros(2, 3, 2, dtype=torch.long)
    offsets[1, 2] = torch.tensor([row, col])
    with pytest.raises(ValueError, match=rf"offsets\[1, 2\] = \({row}, {col}\)"):
        extract_patches(images, offsets, torch.zeros(2, dtype=torch.bool), 5)


def test_bad_arguments_are_named():
    images = torch.zeros(2, 3, 8, 8)
    offsets = torch.zeros(2, 1, 2, dtype=torch.long)
    gray = torch.zeros(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="patch_size"):
        extract_patches(images, offsets, gray, 9)
    with pytest.raises(ValueError, match="gray"):
        extract_patches(images, offsets, gray.long(), 4)
    with pytest.raises(ValueError, match="offsets"):
        extract_patches(images, offsets.float(), gray, 4)
    with pytest.raises(ValueError, match="images"):
        extract_patches(images.long(), offsets, gray, 4)


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_out_buffer_is_filled_and_returned(mode):
    images, offsets, gray = _case(11, torch.uint8, 2, 3, 12, 12, 5, 3, border=True)
    buffer = torch.full((2, 3, 3, 5, 5), float("nan"))
    with force(mode):
        result = extract_patches(images, offsets, gray, 5, out=buffer)
    assert result is buffer
    torch.testing.assert_close(buffer, naive_patches(images, offsets, gray, 5), atol=2e-5, rtol=0)


def test_bad_out_buffer_is_named():
    images, offsets, gray = _case(11, torch.uint8, 2, 3, 12, 12, 5, 3, border=False)
    wrong_shape = torch.empty(2, 3, 3, 5, 4)
    wrong_dtype = torch.empty(2, 3, 3, 5, 5, dtype=torch.float64)
    strided = torch.empty(2, 3, 3, 5, 10)[..., ::2]
    for bad in (wrong_shape, wrong_dtype, strided):
        with pytest.raises(ValueError, match="out: expected a contiguous float32"):
            extract_patches(images, offsets, gray, 5, out=bad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [9, 64, 70])
def test_cuda_kernel_matches_cpu_reference(dtype, p):
    images, offsets, gray = _case(p, dtype, 16, 3, 96, 101, p, 9, border=True)
    expected = extract_patches_torch(images, offsets, gray, p)
    with force("auto"):
        got = extract_patches(images.cuda(), offsets.cuda(), gray.cuda(), p)
    assert got.is_cuda
    torch.testing.assert_close(got.cpu(), expected, atol=2e-5, rtol=1e-5)
    strided = images.cuda().transpose(2, 3).contiguous().transpose(2, 3)
    from_strided = extract_patches_triton(strided, offsets.cuda(), gray.cuda(), p)
    torch.testing.assert_close(from_strided.cpu(), expected, atol=2e-5, rtol=1e-5)
