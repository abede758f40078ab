"""RevNet additive coupling with the half swap: Triton kernels, torch references and custom ops.

A reversible unit maps ``x = [x1 | x2]`` (channel halves) to ``y = [x2 | x1 + F(x2)]`` and back with
``x = [y2 - F(y1) | y1]``. Four ops cover it, each a registered ``torch.library`` custom op with a
fake (meta) implementation and an autograd formula, so eager autograd and ``torch.compile`` both see
one proper op:

* ``couple(x, fx)``            -> ``[x2 | x1 + fx]``
* ``uncouple(y, fx)``          -> ``[y2 - fx | y1]``
* ``couple_conv1x1(x, h, w)``  -> ``[x2 | x1 + conv1x1(h, w)]``: the last 1×1 conv of F fused with
  the coupling add (a GEMM over channels whose epilogue adds the residual and writes both halves)
* ``uncouple_conv1x1(y, h, w)`` -> ``[y2 - conv1x1(h, w) | y1]``

The kernels write both output halves straight into one freshly allocated tensor (no ``cat``, no
copy), read inputs through their strides (any layout, no ``.contiguous()``), handle sizes that are
not multiples of the block sizes by masking, and index memory in int64. Dispatch follows
``kernels.dispatch``: the kernel on CUDA tensors, the reference on CPU tensors unless forced.

Dtypes: the result has ``torch.result_type`` of the coupling input and ``fx`` (so an fp32 coupling
stream stays fp32 under bf16 autocast). The fused ops compute the 1×1 conv in ``h.dtype`` (the
weight is cast to it, as autocast does), accumulate in fp32 and round the product to ``h.dtype``
before the residual add, so they match "conv, then couple" exactly in rounding semantics.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.dispatch import use_triton

__all__ = [
    "couple",
    "couple_conv1x1",
    "couple_conv1x1_reference",
    "couple_reference",
    "coupling",
    "coupling_conv1x1",
    "uncouple",
    "uncouple_conv1x1",
    "uncouple_conv1x1_reference",
    "uncouple_reference",
]


# ----------------------------------------------------------------------------- checks


def _check_coupling_input(name: str, t: Tensor) -> int:
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-d [N, C, H, W] tensor, got shape {tuple(t.shape)}")
    if t.shape[1] % 2:
        raise ValueError(f"{name}: channel count must be even, got {t.shape[1]}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
    return t.shape[1] // 2


def _check_half(name: str, t: Tensor, src_name: str, src: Tensor, half: int) -> None:
    n, _, h, w = src.shape
    if tuple(t.shape) != (n, half, h, w):
        raise ValueError(
            f"{name}: expected shape {(n, half, h, w)} (half of {src_name}'s channels), "
            f"got {tuple(t.shape)}"
        )
    if t.device != src.device:
        raise ValueError(f"{name}: on {t.device}, but {src_name} is on {src.device}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")


def _check_conv_operands(src_name: str, src: Tensor, h: Tensor, weight: Tensor) -> None:
    half = _check_coupling_input(src_name, src)
    n, _, height, width = src.shape
    if h.dim() != 4 or (h.shape[0], h.shape[2], h.shape[3]) != (n, height, width):
        raise ValueError(
            f"h: expected shape [{n}, K, {height}, {width}] to match {src_name}, "
            f"got {tuple(h.shape)}"
        )
    expected = (half, h.shape[1], 1, 1)
    if tuple(weight.shape) != expected:
        raise ValueError(
            f"weight: expected a 1×1 conv weight of shape {expected}, got {tuple(weight.shape)}"
        )
    for name, t in (("h", h), ("weight", weight)):
        if t.device != src.device:
            raise ValueError(f"{name}: on {t.device}, but {src_name} is on {src.device}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")


# ----------------------------------------------------------------------------- references


def couple_reference(x: Tensor, fx: Tensor) -> Tensor:
    """``[x2 | x1 + fx]`` for ``x = [x1 | x2]``, in plain torch."""
    half = x.shape[1] // 2
    out = x.new_empty(x.shape, dtype=torch.result_type(x, fx))
    out[:, :half] = x[:, half:]
    torch.add(x[:, :half], fx, out=out[:, half:])
    return out


def uncouple_reference(y: Tensor, fx: Tensor) -> Tensor:
    """``[y2 - fx | y1]`` for ``y = [y1 | y2]``, in plain torch."""
    half = y.shape[1] // 2
    out = y.new_empty(y.shape, dtype=torch.result_type(y, fx))
    torch.sub(y[:, half:], fx, out=out[:, :half])
    out[:, half:] = y[:, :half]
    return out


def _conv1x1(h: Tensor, weight: Tensor) -> Tensor:
    return torch.nn.functional.conv2d(h, weight.to(h.dtype))


def couple_conv1x1_reference(x: Tensor, h: Tensor, weight: Tensor) -> Tensor:
    """``[x2 | x1 + conv1x1(h, weight)]`` in plain torch (conv computed in ``h.dtype``)."""
    return couple_reference(x, _conv1x1(h, weight))


def uncouple_conv1x1_reference(y: Tensor, h: Tensor, weight: Tensor) -> Tensor:
    """``[y2 - conv1x1(h, weight) | y1]`` in plain torch (conv computed in ``h.dtype``)."""
    return uncouple_reference(y, _conv1x1(h, weight))


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


# ----------------------------------------------------------------------------- custom ops


def coupling(src: Tensor, fx: Tensor, *, inverse: bool = False) -> Tensor:
    """``couple`` (or with ``inverse``, ``uncouple``) without argument checks, custom-op dispatch
    or autograd: kernel or reference as ``kernels.dispatch`` picks. For callers that have checked
    the shapes already and run outside autograd (the reversible backward)."""
    if use_triton(src, fx):
        return _launch_coupling(src, fx, inverse)
    return uncouple_reference(src, fx) if inverse else couple_reference(src, fx)


def coupling_conv1x1(src: Tensor, h: Tensor, weight: Tensor, *, inverse: bool = False) -> Tensor:
    """``couple_conv1x1`` (or ``uncouple_conv1x1``), unchecked like :func:`coupling`. fp64 runs
    the reference: the kernel accumulates in fp32."""
    wide = torch.float64 in (src.dtype, h.dtype, weight.dtype)
    if use_triton(src, h, weight) and not wide:
        return _launch_coupling_conv1x1(src, h, weight, inverse)
    if inverse:
        return uncouple_conv1x1_reference(src, h, weight)
    return couple_conv1x1_reference(src, h, weight)


@torch.library.custom_op("ssltk::revnet_couple", mutates_args=())
def _couple_op(x: Tensor, fx: Tensor) -> Tensor:
    return coupling(x, fx)


@torch.library.custom_op("ssltk::revnet_uncouple", mutates_args=())
def _uncouple_op(y: Tensor, fx: Tensor) -> Tensor:
    return coupling(y, fx, inverse=True)


@torch.library.custom_op("ssltk::revnet_couple_conv1x1", mutates_args=())
def _couple_conv1x1_op(x: Tensor, h: Tensor, weight: Tensor) -> Tensor:
    return coupling_conv1x1(x, h, weight)


@torch.library.custom_op("ssltk::revnet_uncouple_conv1x1", mutates_args=())
def _uncouple_conv1x1_op(y: Tensor, h: Tensor, weight: Tensor) -> Tensor:
    return coupling_conv1x1(y, h, weight, inverse=True)


@_couple_op.register_fake
@_uncouple_op.register_fake
def _coupling_fake(src: Tensor, fx: Tensor) -> Tensor:
    return src.new_empty(src.shape, dtype=torch.result_type(src, fx))


@_couple_conv1x1_op.register_fake
@_uncouple_conv1x1_op.register_fake
def _coupling_conv1x1_fake(src: Tensor, h: Tensor, weight: Tensor) -> Tensor:
    return src.new_empty(src.shape, dtype=torch.result_type(src, h))


def swap_halves(t: Tensor) -> Tensor:
    """``[t2 | t1]`` for ``t = [t1 | t2]`` (the gradient of the coupling's pass-through)."""
    half = t.shape[1] // 2
    return torch.cat([t[:, half:], t[:, :half]], dim=1)


def conv1x1_input_grad(grad_fx: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """Gradient of ``conv1x1(h, weight)`` with respect to ``h``, in fp32, cast to ``dtype``."""
    w = weight.reshape(weight.shape[0], weight.shape[1]).float()
    return torch.einsum("nchw,ck->nkhw", grad_fx.float(), w).to(dtype)


def conv1x1_weight_grad(grad_fx: Tensor, h: Tensor, weight: Tensor) -> Tensor:
    """Gradient of ``conv1x1(h, weight)`` with respect to ``weight``, in fp32, cast back."""
    g = torch.einsum("nchw,nkhw->ck", grad_fx.float(), h.float())
    return g.reshape(weight.shape).to(weight.dtype)


def _setup_fx(ctx, inputs, output) -> None:
    src, fx = inputs
    ctx.src_dtype, ctx.fx_dtype = src.dtype, fx.dtype


def _couple_backward(ctx, grad: Tensor):
    half = grad.shape[1] // 2
    return swap_halves(grad).to(ctx.src_dtype), grad[:, half:].to(ctx.fx_dtype)


def _uncouple_backward(ctx, grad: Tensor):
    half = grad.shape[1] // 2
    return swap_halves(grad).to(ctx.src_dtype), (-grad[:, :half]).to(ctx.fx_dtype)


def _setup_conv(ctx, inputs, output) -> None:
    src, h, weight = inputs
    ctx.src_dtype = src.dtype
    ctx.save_for_backward(h, weight)


def _couple_conv1x1_backward(ctx, grad: Tensor):
    h, weight = ctx.saved_tensors
    grad_fx = grad[:, grad.shape[1] // 2 :]
    return (
        swap_halves(grad).to(ctx.src_dtype),
        conv1x1_input_grad(grad_fx, weight, h.dtype),
        conv1x1_weight_grad(grad_fx, h, weight),
    )


def _uncouple_conv1x1_backward(ctx, grad: Tensor):
    h, weight = ctx.saved_tensors
    grad_fx = -grad[:, : grad.shape[1] // 2]
    return (
        swap_halves(grad).to(ctx.src_dtype),
        conv1x1_input_grad(grad_fx, weight, h.dtype),
        conv1x1_weight_grad(grad_fx, h, weight),
    )


_couple_op.register_autograd(_couple_backward, setup_context=_setup_fx)
_uncouple_op.register_autograd(_uncouple_backward, setup_context=_setup_fx)
_couple_conv1x1_op.register_autograd(_couple_conv1x1_backward, setup_context=_setup_conv)
_uncouple_conv1x1_op.register_autograd(_uncouple_conv1x1_backward, setup_context=_setup_conv)


# ----------------------------------------------------------------------------- public API


def couple(x: Tensor, fx: Tensor) -> Tensor:
    """Reversible coupling with the half swap: ``[x2 | x1 + fx]`` for ``x = [x1 | x2]``."""
    half = _check_coupling_input("x", x)
    _check_half("fx", fx, "x", x, half)
    return _couple_op(x, fx)


def uncouple(y: Tensor, fx: Tensor) -> Tensor:
    """Inverse coupling: ``[y2 - fx | y1]`` for ``y = [y1 | y2]``, where ``fx = F(y1)``."""
    half = _check_coupling_input("y", y)
    _check_half("fx", fx, "y", y, half)
    return _uncouple_op(y, fx)


def couple_conv1x1(x: Tensor, h: Tensor, weight: Tensor) -> Tensor:
    """Fused ``[x2 | x1 + conv1x1(h, weight)]``: F's last 1×1 conv and the coupling in one pass."""
    _check_conv_operands("x", x, h, weight)
    return _couple_conv1x1_op(x, h, weight)


def uncouple_conv1x1(y: Tensor, h: Tensor, weight: Tensor) -> Tensor:
    """Fused inverse ``[y2 - conv1x1(h, weight) | y1]``, where ``h`` is F's last hidden activation
    computed from ``y1``."""
    _check_conv_operands("y", y, h, weight)
    return _uncouple_conv1x1_op(y, h, weight)
