"""RevNet50 as in the paper's code (``models/resnet.py``): one additive coupling per unit with a
half swap.

A unit maps x = [x1 | x2] to [x2 | x1 + F(x2)], where F is a pre-activation bottleneck without a
shortcut and inner width C/8. Units never change the shape; between stages a parameter-free
transition average-pools (stride 2) and zero-pads the channels from C to 2C. The stem is a single
7×7 conv straight to 64k channels (no BN/ReLU, excluded from weight decay) and a zero-padded
max-pool.

With ``memory_saving`` each stage runs its units through
:func:`ssltk.models.reversible.reversible_sequence`, which recomputes activations from the stage
output during backward instead of storing them, and the stem's max-pool keeps only an int8
window position per output (:class:`CompactZeroPadMaxPool`); without it both are plain autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ssltk.kernels.revnet_coupling import coupling
from ssltk.models.layers import (
    ZeroPadMaxPool,
    batch_norm,
    conv,
    exclude_from_weight_decay,
    init_weights,
)
from ssltk.models.registry import register_arch
from ssltk.models.resnet import DEPTHS, STAGE_WIDTHS, StagedBackbone, stage_strides
from ssltk.models.spec import ArchConfig


def _pool_forward(x: torch.Tensor, chunks: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``ZeroPadMaxPool`` of a 4-d ``x`` and, per output, which of the 9 window positions held
    the maximum (int8, row-major). Runs torch's own max-pool kernel, chunk by chunk over the
    batch, so the padded input and the int64 indices exist for one chunk at a time."""
    n, c, height, width = x.shape
    out_size = ((height - 1) // 2 + 1, (width - 1) // 2 + 1)
    out = torch.empty(
        (n, c, *out_size), dtype=x.dtype, device=x.device, memory_format=_memory_format(x)
    )
    position = torch.empty(out.shape, dtype=torch.int8, device=x.device)
    starts = _window_starts(out_size, width + 2, x.device)
    for chunk in _batch_chunks(n, chunks):
        out[chunk], flat = F.max_pool2d(
            F.pad(x[chunk], (1, 1, 1, 1)), kernel_size=3, stride=2, return_indices=True
        )
        # flat - (window's top-left index) = row * (width + 2) + col, row and col in 0..2.
        offset = (flat - starts).to(torch.int32)
        row = (offset >= width + 2).to(torch.int32) + (offset >= 2 * (width + 2))
        position[chunk] = offset.sub_(row * (width - 1))  # row * 3 + col
    return out, position


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def _pool_backward(grad_out: torch.Tensor, position: torch.Tensor, out: torch.Tensor) -> None:
    """Write the gradient of :func:`_pool_forward` w.r.t. its input into ``out`` (4-d, the
    input's shape), with torch's max-pool gradient kernel on indices re-based to the unpadded
    plane: bit-identical to the plain layer, ties included."""
    height, width = out.shape[-2:]
    # Window (i, j) starts at padded (2i, 2j), i.e. at input (2i - 1, 2j - 1).
    starts = _window_starts(grad_out.shape[-2:], width, grad_out.device) - width - 1
    row = torch.div(position, 3, rounding_mode="floor")
    index = position.to(torch.int64).add_(row, alpha=width - 3).add_(starts)
    border = _border_maxima(position, row, height, width)
    # A maximum on the zero border has no input to flow into: zero its gradient.
    torch.ops.aten.max_pool2d_with_indices_backward.grad_input(
        grad_out.masked_fill(border, 0), out, [3, 3], [2, 2], [1, 1], [1, 1], False,
        index.masked_fill_(border, 0), grad_input=out,
    )  # fmt: skip


class _WindowMaxPool(torch.autograd.Function):
    """``ZeroPadMaxPool``'s 3×3/2 max-pool over a zero-padded input that saves, per output, only
    which of the 9 window positions held the maximum (int8), not the padded input and int64
    indices; backward writes the input gradient directly, chunk by chunk (no padded gradient to
    crop). Torch's own max-pool kernels on the same indices make outputs and gradients
    bit-identical to the plain layer (torch takes the first maximum in row-major window order,
    on CPU and CUDA)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out, position = _pool_forward(x if x.dim() == 4 else x.unsqueeze(0))
        ctx.save_for_backward(position.view(out.shape[-x.dim() :]))
        ctx.input_shape = x.shape
        return out.view(out.shape[-x.dim() :])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (position,) = ctx.saved_tensors
        batched = grad_out if grad_out.dim() == 4 else grad_out.unsqueeze(0)
        position = position.view(batched.shape)
        grad_in = batched.new_empty((*batched.shape[:2], *ctx.input_shape[-2:]))
        for chunk in _batch_chunks(batched.shape[0]):
            _pool_backward(batched[chunk], position[chunk], grad_in[chunk])
        return grad_in.view(ctx.input_shape)


class _StemConvPool(torch.autograd.Function):
    """The stem's conv followed by :class:`_WindowMaxPool`'s pool, saving the image and the
    int8 window positions only. Both passes go chunk by chunk over the batch, so the conv output
    and its gradient (the largest tensors of the network) exist for one chunk at a time. The
    weight gradient is the sum of the chunks' (plain autograd sums in another order)."""

    @staticmethod
    def forward(ctx, image, weight, stride, padding) -> torch.Tensor:
        pooled = position = None
        for chunk in _batch_chunks(image.shape[0]):
            out = F.conv2d(image[chunk], weight, stride=stride, padding=padding)
            part, part_position = _pool_forward(out, chunks=1)
            if pooled is None:
                shape = (image.shape[0], *part.shape[1:])
                pooled = torch.empty(
                    shape, dtype=part.dtype, device=part.device, memory_format=_memory_format(part)
                )
                position = part_position.new_empty(shape)
                ctx.conv = (stride, padding, out.shape[1:], out.dtype)
            pooled[chunk], position[chunk] = part, part_position
        ctx.save_for_backward(image, weight, position)
        return pooled

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        image, weight, position = ctx.saved_tensors
        stride, padding, conv_shape, dtype = ctx.conv  # dtype: what the conv ran in (autocast)
        need_image, need_weight = ctx.needs_input_grad[:2]
        grad_image = torch.empty_like(image) if need_image else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        w = weight.to(dtype)
        for chunk in _batch_chunks(image.shape[0]):
            x = image[chunk].to(dtype)
            grad_conv = grad.new_empty((x.shape[0], *conv_shape))
            _pool_backward(grad[chunk], position[chunk], grad_conv)
            gi, gw, _ = torch.ops.aten.convolution_backward(
                grad_conv, x, w, None, stride, padding, [1, 1], False, [0, 0], 1,
                [need_image, need_weight, False],
            )  # fmt: skip
            if need_image:
                grad_image[chunk] = gi
            if need_weight:
                grad_weight += gw
        return grad_image, grad_weight, None, None


def _window_starts(out_size: tuple[int, int], width: int, device: torch.device) -> torch.Tensor:
    """Flat index, in a plane ``width`` wide, of each output window's top-left pixel."""
    rows, cols = out_size
    top = torch.arange(0, 2 * rows, 2, device=device)
    return top[:, None] * width + torch.arange(0, 2 * cols, 2, device=device)


def _batch_chunks(n: int, chunks: int = 8) -> list[slice]:
    """``chunks`` slices (fewer for a small ``n``) that cover ``range(n)``."""
    step = -(-n // chunks)
    return [slice(i, i + step) for i in range(0, n, step)]


def _border_maxima(position: torch.Tensor, row: torch.Tensor, height: int, width: int):
    """Which outputs took their maximum from the zero border (window row/col outside the
    input): the first row/column of windows at offset 0, the last at offset 2 when the input
    side is odd."""
    col = position - row * 3
    border = torch.zeros_like(position, dtype=torch.bool)
    border[..., 0, :] |= row[..., 0, :] == 0
    border[..., :, 0] |= col[..., :, 0] == 0
    if height % 2:
        border[..., -1, :] |= row[..., -1, :] == 2
    if width % 2:
        border[..., :, -1] |= col[..., :, -1] == 2
    return border


class CompactZeroPadMaxPool(ZeroPadMaxPool):
    """:class:`ZeroPadMaxPool` that, with ``memory_saving``, keeps one int8 per output for
    backward (the window position of its maximum) instead of the padded input and an int64 index
    (about 25 bytes per output in fp32). Outputs and gradients are bit-identical either way."""

    def __init__(self, memory_saving: bool = True) -> None:
        super().__init__()
        self.memory_saving = memory_saving

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.memory_saving and torch.is_grad_enabled() and x.requires_grad:
            return _WindowMaxPool.apply(x)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"memory_saving={self.memory_saving}"


class RevNetStem(nn.Sequential):
    """The stem conv and the zero-padded max-pool. With the pool's ``memory_saving``, training
    runs both as one function that saves the image and int8 window positions only and takes the
    gradients chunk by chunk (:class:`_StemConvPool`)."""

    def __init__(self, out_channels: int, stride: int, memory_saving: bool) -> None:
        super().__init__(
            exclude_from_weight_decay(conv(3, out_channels, 7, stride)),
            CompactZeroPadMaxPool(memory_saving),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem_conv, pool = self
        tracked = x.requires_grad or stem_conv.weight.requires_grad
        if pool.memory_saving and torch.is_grad_enabled() and tracked and x.dim() == 4:
            return _StemConvPool.apply(x, stem_conv.weight, stem_conv.stride, stem_conv.padding)
        return super().forward(x)


class RevBottleneck(nn.Sequential):
    """F of a reversible unit: (BN → ReLU → conv) × 3, C/2 → C/8 → C/8 → C/2, no shortcut."""

    def __init__(self, channels: int) -> None:
        half, inner = channels // 2, channels // 8
        super().__init__(
            batch_norm(half),
            nn.ReLU(inplace=True),
            conv(half, inner, 1),
            batch_norm(inner),
            nn.ReLU(inplace=True),
            conv(inner, inner, 3),
            batch_norm(inner),
            nn.ReLU(inplace=True),
            conv(inner, half, 1),
        )


class ReversibleUnit(nn.Module):
    """``y = [x2 | x1 + F(x2)]``; :meth:`inverse` recovers x from y exactly up to rounding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels % 8:
            raise ValueError(f"channels={channels}: a reversible unit needs a multiple of 8")
        self.channels = channels
        self.f = RevBottleneck(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return coupling(x, self.f(x[:, self.channels // 2 :]))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return coupling(y, self.f(y[:, : self.channels // 2]), inverse=True)


class PoolAndPadChannels(nn.Module):
    """Parameter-free stage transition: 2×2 average pool when ``stride`` is 2 (TF "same" padding,
    i.e. ceil output size and edge windows averaged over valid pixels only), then C/2 zero channels
    before and after, giving ``[0 | x | 0]`` with 2C channels. Not invertible."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride={stride}: expected 1 or 2")
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = F.avg_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
        pad = x.shape[1] // 2
        return F.pad(x, (0, 0, 0, 0, pad, pad))

    @staticmethod
    def zero_channels(out_channels: int) -> tuple[slice, slice]:
        """The output channels that are always exactly zero: the first and last quarter."""
        return slice(0, out_channels // 4), slice(out_channels - out_channels // 4, out_channels)

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


class ReversibleStage(nn.Module):
    """An optional entry transition followed by ``depth`` reversible units at constant width."""

    def __init__(
        self,
        channels: int,
        depth: int,
        *,
        entry: nn.Module | None = None,
        memory_saving: bool = True,
    ) -> None:
        super().__init__()
        self.entry = entry if entry is not None else nn.Identity()
        self.units = nn.ModuleList(ReversibleUnit(channels) for _ in range(depth))
        self.memory_saving = memory_saving

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.entry(x)
        # Without autograd nothing is stored anyway, so the plain loop is the cheapest path.
        if self.memory_saving and torch.is_grad_enabled():
            from ssltk.models.reversible import reversible_sequence

            if isinstance(self.entry, PoolAndPadChannels):
                # The padded channels are exactly zero: backward restores them exactly.
                zeros = self.entry.zero_channels(x.shape[1])
                return reversible_sequence(x, self.units, zero_channels=zeros)
            return reversible_sequence(x, self.units)
        for unit in self.units:
            x = unit(x)
        return x

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Invert the units (not the entry transition, which drops information)."""
        for unit in reversed(self.units):
            y = unit.inverse(y)
        return y


@register_arch("revnet50")
class RevNet50(StagedBackbone):
    """RevNet50 with widening k: stage widths 64k..512k, (3, 4, 6, 3) units."""

    def __init__(self, config: ArchConfig) -> None:
        super().__init__()
        self.config = config
        k = config.widening
        widths = [w * k for w in STAGE_WIDTHS]
        root_stride = 1 if config.patch_mode else 2
        self.root = RevNetStem(widths[0], root_stride, config.memory_saving)
        # Stage i+1 enters through the transition that ends stage i (paper: "pool and double").
        strides = stage_strides(config.patch_mode)
        for i, (depth, width) in enumerate(zip(DEPTHS, widths, strict=True)):
            entry = PoolAndPadChannels(strides[i]) if i else None
            stage = ReversibleStage(width, depth, entry=entry, memory_saving=config.memory_saving)
            self.add_module(f"block{i + 1}", stage)
        self._add_head(widths[-1], final_norm=True)
        init_weights(self)
