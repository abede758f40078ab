"""RevNet additive coupling with the half swap: Triton kernels and their torch reference.

A reversible unit maps ``x = [x1 | x2]`` (channel halves) to ``y = [x2 | x1 + F(x2)]`` and back with
``x = [y2 - F(y1) | y1]``. Two functions cover it, each with ``inverse=True`` for the way back:

* ``coupling(x, fx)``            -> ``[x2 | x1 + fx]``
* ``coupling_conv1x1(x, h, w)``  -> ``[x2 | x1 + conv1x1(h, w)]``, F's last 1×1 conv and the
  coupling: in 16-bit one kernel (a GEMM over channels whose epilogue adds the residual and writes
  both halves), otherwise the conv in torch followed by the coupling kernel.

The kernels write both output halves straight into one freshly allocated tensor (no ``cat``), read
inputs through their strides (any layout), mask sizes that are not multiples of the block sizes,
and index memory in int64. :mod:`ssltk.kernels.dispatch` picks kernel or reference: the kernel on
CUDA tensors outside autograd (the kernels have no backward; the memory-saving RevNet calls them
with autograd off), the differentiable reference everywhere else.

Dtypes: the result has ``torch.result_type`` of the coupling input and ``fx`` (so an fp32 coupling
stream stays fp32 under bf16 autocast). The fused kernel computes the 1×1 conv in ``h.dtype`` (the
weight is cast to it, as autocast does), accumulates in fp32 and rounds the product to ``h.dtype``
before the residual add, so it matches "conv, then couple" in rounding semantics.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ssltk.kernels.dispatch import fuse_conv1x1, use_triton

__all__ = ["coupling", "coupling_conv1x1"]


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _widen(x):
    # Arithmetic precision: fp64 stays fp64, everything else computes in fp32.
    if x.dtype != tl.float64:
        x = x.to(tl.float32)
    return x


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    # Round to nearest even into ``dtype``. bf16 is rounded by hand on the bit pattern because
    # Triton 3.6's interpreter truncates fp32 -> bf16; doing it the same way on the GPU keeps the
    # interpreted and compiled kernels bit-identical (NaN is passed through unchanged).
    if dtype == tl.bfloat16:
        x32 = x.to(tl.float32)
        bits = x32.to(tl.int32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        x = tl.where(x32 != x32, x32, rounded)
    return x.to(dtype)


@triton.jit
def _coupling_kernel(
    src_ptr, f_ptr, out_ptr,
    half, height, width,
    s_n, s_c, s_h, s_w,
    f_n, f_c, f_h, f_w,
    o_n, o_c, o_h, o_w,
    INVERSE: tl.constexpr, PIX_CONTIG: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK pixels of one (sample, channel) row of the half tensor; a 1-d grid of
    # rows × pixel blocks (CUDA limits the 2nd and 3rd grid axes to 65535).
    # With a = src[:, :half], b = src[:, half:]:
    #   forward  out = [b | a + f]      inverse  out = [b - f | a]
    pid = tl.program_id(0).to(tl.int64)
    pixel_blocks = tl.cdiv(height * width, BLOCK)
    row = pid // pixel_blocks
    n = row // half
    c = row % half
    pix = (pid % pixel_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = pix < height * width
    if PIX_CONTIG:  # every tensor stores a channel's H×W pixels densely: vectorisable offsets
        s_pix = pix
        f_pix = pix
        o_pix = pix
    else:
        ph = pix // width
        pw = pix % width
        s_pix = ph * s_h + pw * s_w
        f_pix = ph * f_h + pw * f_w
        o_pix = ph * o_h + pw * o_w

    src_row = src_ptr + n * s_n + c * s_c + s_pix
    a = tl.load(src_row, mask=mask)
    b = tl.load(src_row + half * s_c, mask=mask)
    f = tl.load(f_ptr + n * f_n + c * f_c + f_pix, mask=mask)

    out_dtype: tl.constexpr = out_ptr.dtype.element_ty
    out_row = out_ptr + n * o_n + c * o_c + o_pix
    if INVERSE:
        tl.store(out_row, _round_to(_widen(b) - _widen(f), out_dtype), mask=mask)
        tl.store(out_row + half * o_c, a.to(out_dtype), mask=mask)
    else:
        tl.store(out_row, b.to(out_dtype), mask=mask)
        tl.store(out_row + half * o_c, _round_to(_widen(a) + _widen(f), out_dtype), mask=mask)


@triton.jit
def _coupling_conv1x1_kernel(
    src_ptr, h_ptr, w_ptr, out_ptr,
    half, height, width,
    s_n, s_c, s_h, s_w,
    h_n, h_c, h_h, h_w,
    w_o, w_i,
    o_n, o_c, o_h, o_w,
    K_DIM: tl.constexpr, INVERSE: tl.constexpr, DOT_FP32: tl.constexpr, PIX_CONTIG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # One program: output channels [m0, m0 + BLOCK_M) × pixels [p0, p0 + BLOCK_N) of one sample;
    # acc = W[m, :] @ h[n, :, p] over K, then the epilogue writes both halves of the coupling.
    # K_DIM (F's bottleneck width) is a compile-time constant: a network has only a few, and
    # Triton 3.6's interpreter cannot loop over a runtime bound under NumPy 2.4.
    # 1-d grid ordered (sample, pixel block, channel block): neighbouring programs share h tiles.
    pid = tl.program_id(0).to(tl.int64)
    m_blocks = tl.cdiv(half, BLOCK_M)
    p_blocks = tl.cdiv(height * width, BLOCK_N)
    n = pid // (m_blocks * p_blocks)
    rm = (pid % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = (pid // m_blocks % p_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    m_mask = rm < half
    p_mask = rp < height * width
    if PIX_CONTIG:
        s_pix = rp
        h_pix = rp
        o_pix = rp
    else:
        ph = rp // width
        pw = rp % width
        s_pix = ph * s_h + pw * s_w
        h_pix = ph * h_h + pw * h_w
        o_pix = ph * o_h + pw * o_w
    h_pix = h_pix + n * h_n

    compute_dtype: tl.constexpr = h_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_block in range(0, tl.cdiv(K_DIM, BLOCK_K)):
        kk = k_block * BLOCK_K + rk
        k_mask = kk < K_DIM
        w_tile = tl.load(
            w_ptr + rm[:, None] * w_o + kk[None, :] * w_i,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w_tile = _round_to(_widen(w_tile), compute_dtype)  # the weight cast autocast would do
        h_tile = tl.load(
            h_ptr + kk[:, None] * h_c + h_pix[None, :],
            mask=k_mask[:, None] & p_mask[None, :],
            other=0.0,
        )
        if DOT_FP32:
            acc += tl.dot(w_tile.to(tl.float32), h_tile.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(w_tile, h_tile)

    # The conv's output is rounded to its own dtype first: the same result as conv-then-couple.
    fx = _round_to(acc, compute_dtype).to(tl.float32)
    out_dtype: tl.constexpr = out_ptr.dtype.element_ty
    mask = m_mask[:, None] & p_mask[None, :]
    src_tile = src_ptr + n * s_n + rm[:, None] * s_c + s_pix[None, :]
    a = tl.load(src_tile, mask=mask)
    b = tl.load(src_tile + half * s_c, mask=mask)
    out_tile = out_ptr + n * o_n + rm[:, None] * o_c + o_pix[None, :]
    if INVERSE:
        tl.store(out_tile, _round_to(b.to(tl.float32) - fx, out_dtype), mask=mask)
        tl.store(out_tile + half * o_c, a.to(out_dtype), mask=mask)
    else:
        tl.store(out_tile, b.to(out_dtype), mask=mask)
        tl.store(out_tile + half * o_c, _round_to(a.to(tl.float32) + fx, out_dtype), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pixels_contiguous(*tensors: Tensor) -> bool:
    """Whether each [N, C, H, W] tensor stores every channel's H×W pixels densely, row-major."""
    _, _, height, width = tensors[0].shape
    return all(
        (width == 1 or t.stride(3) == 1) and (height == 1 or t.stride(2) == width) for t in tensors
    )


def _launch_coupling(src: Tensor, fx: Tensor, inverse: bool) -> Tensor:
    half = src.shape[1] // 2
    n, _, height, width = src.shape
    out = torch.empty(src.shape, dtype=torch.result_type(src, fx), device=src.device)
    if out.numel() == 0:
        return out
    block = min(1024, max(16, triton.next_power_of_2(height * width)))
    grid = (n * half * triton.cdiv(height * width, block),)
    _coupling_kernel[grid](
        src, fx, out, half, height, width,
        *src.stride(), *fx.stride(), *out.stride(),
        INVERSE=inverse, PIX_CONTIG=_pixels_contiguous(src, fx, out), BLOCK=block,
    )  # fmt: skip
    return out


def _launch_coupling_conv1x1(src: Tensor, h: Tensor, weight: Tensor, inverse: bool) -> Tensor:
    half = src.shape[1] // 2
    n, _, height, width = src.shape
    k_dim = h.shape[1]
    out = torch.empty(src.shape, dtype=torch.result_type(src, h), device=src.device)
    if out.numel() == 0:
        return out
    pixels = height * width
    block_m = 64 if half >= 64 else 32 if half >= 32 else 16
    block_n = 64 if pixels >= 64 else 32 if pixels >= 32 else 16
    block_k = 32 if k_dim >= 32 else 16
    # Triton 3.6's interpreter mis-computes low-precision tl.dot; bf16/fp16 products are exact in
    # fp32, so upcasting there gives the same result the GPU's low-precision dot accumulates.
    dot_fp32 = h.dtype == torch.float32 or _interpreting()
    grid = (triton.cdiv(half, block_m) * triton.cdiv(pixels, block_n) * n,)
    _coupling_conv1x1_kernel[grid](
        src, h, weight, out, half, height, width,
        *src.stride(), *h.stride(), weight.stride(0), weight.stride(1), *out.stride(),
        K_DIM=k_dim, INVERSE=inverse, DOT_FP32=dot_fp32,
        PIX_CONTIG=_pixels_contiguous(src, h, out),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------- API


def coupling(src: Tensor, fx: Tensor, *, inverse: bool = False) -> Tensor:
    """``[x2 | x1 + fx]`` for ``src = [x1 | x2]``; with ``inverse``, ``[y2 - fx | y1]`` for
    ``src = [y1 | y2]`` and ``fx = F(y1)``. Differentiable (the reference runs under autograd)."""
    if use_triton(src, fx):
        return _launch_coupling(src, fx, inverse)
    a, b = src.chunk(2, dim=1)
    return torch.cat((b - fx, a) if inverse else (b, a + fx), dim=1)


def coupling_conv1x1(src: Tensor, h: Tensor, weight: Tensor, *, inverse: bool = False) -> Tensor:
    """:func:`coupling` with ``fx = conv1x1(h, weight)``, the conv computed in ``h.dtype``."""
    fused = use_triton(src, h, weight) and fuse_conv1x1(h)
    if fused and torch.float64 not in (src.dtype, weight.dtype):
        return _launch_coupling_conv1x1(src, h, weight, inverse)
    return coupling(src, F.conv2d(h, weight.to(h.dtype)), inverse=inverse)
