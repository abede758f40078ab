"""RevNet50 as in the paper's code (§3.7): one additive coupling per unit with a half swap.

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

from kernels.revnet_coupling import coupling
from ssltk.models.layers import (
    ZeroPadMaxPool,
    batch_norm,
    conv,
    exclude_from_weight_decay,
    init_weights,
)
from ssltk.models.resnet import DEPTHS, STAGE_WIDTHS, StagedBackbone, stage_strides
from ssltk.models.spec import ArchConfig


class _WindowMaxPool(torch.autograd.Function):
    """``ZeroPadMaxPool``'s 3×3/2 max-pool over a zero-padded input that saves, per output, only
    which of the 9 window positions held the maximum (int8), not the padded input and int64
    indices. Forward and gradient run torch's own max-pool kernels on the same indices, so both
    are bit-identical to the plain layer, ties included (torch takes the first maximum in
    row-major window order, on CPU and CUDA). Both passes work through the batch in chunks, so
    the padded input and int64 indices exist for one chunk at a time, and backward writes the
    input gradient directly (no padded gradient to crop)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        batched = x if x.dim() == 4 else x.unsqueeze(0)
        n, c, height, width = batched.shape
        out_size = ((height - 1) // 2 + 1, (width - 1) // 2 + 1)
        channels_last = not batched.is_contiguous() and batched.is_contiguous(
            memory_format=torch.channels_last
        )
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((n, c, *out_size), dtype=x.dtype, device=x.device, memory_format=fmt)
        position = torch.empty(out.shape, dtype=torch.int8, device=x.device)
        starts = _window_starts(out_size, width + 2, x.device)
        for chunk in _batch_chunks(n):
            out[chunk], flat = F.max_pool2d(
                F.pad(batched[chunk], (1, 1, 1, 1)), kernel_size=3, stride=2, return_indices=True
            )
            # flat - (window's top-left index) = row * (width + 2) + col, row and col in 0..2.
            offset = (flat - starts).to(torch.int32)
            row = (offset >= width + 2).to(torch.int32) + (offset >= 2 * (width + 2))
            position[chunk] = offset.sub_(row * (width - 1))  # row * 3 + col
        if x.dim() == 3:
            out, position = out.squeeze(0), position.squeeze(0)
        ctx.save_for_backward(position)
        ctx.input_shape = x.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (position,) = ctx.saved_tensors
        height, width = ctx.input_shape[-2:]
        batched = grad_out if grad_out.dim() == 4 else grad_out.unsqueeze(0)
        position = position.view(batched.shape)
        grad_in = batched.new_empty((*batched.shape[:2], height, width))
        # Window (i, j) starts at padded (2i, 2j), i.e. at input (2i - 1, 2j - 1).
        starts = _window_starts(batched.shape[-2:], width, grad_out.device) - width - 1
        for chunk in _batch_chunks(batched.shape[0]):
            pos = position[chunk]
            row = torch.div(pos, 3, rounding_mode="floor")
            index = pos.to(torch.int64).add_(row, alpha=width - 3).add_(starts)
            border = _border_maxima(pos, row, height, width)
            # A maximum on the zero border has no input to flow into: zero its gradient.
            grad = batched[chunk].masked_fill(border, 0)
            torch.ops.aten.max_pool2d_with_indices_backward.grad_input(
                grad, grad_in[chunk], [3, 3], [2, 2], [1, 1], [1, 1], False,
                index.masked_fill_(border, 0), grad_input=grad_in[chunk],
            )  # fmt: skip
        return grad_in if grad_out.dim() == 4 else grad_in.squeeze(0)


def _window_starts(out_size: tuple[int, int], width: int, device: torch.device) -> torch.Tensor:
    """Flat index, in a plane ``width`` wide, of each output window's top-left pixel."""
    rows, cols = out_size
    top = torch.arange(0, 2 * rows, 2, device=device)
    return top[:, None] * width + torch.arange(0, 2 * cols, 2, device=device)


def _batch_chunks(n: int, chunks: int = 8) -> list[slice]:
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


class RevNet50(StagedBackbone):
    """RevNet50 with widening k: stage widths 64k..512k, (3, 4, 6, 3) units."""

    def __init__(self, config: ArchConfig) -> None:
        super().__init__()
        if config.arch != "revnet50":
            raise ValueError(f"arch={config.arch!r}: RevNet50 builds revnet50")
        self.config = config
        k = config.widening
        widths = [w * k for w in STAGE_WIDTHS]
        root_stride = 1 if config.patch_mode else 2
        self.root = nn.Sequential(
            exclude_from_weight_decay(conv(3, widths[0], 7, root_stride)),
            CompactZeroPadMaxPool(config.memory_saving),
        )
        # Stage i+1 enters through the transition that ends stage i (paper: "pool and double").
        strides = stage_strides(config.patch_mode)
        for i, (depth, width) in enumerate(zip(DEPTHS, widths, strict=True)):
            entry = PoolAndPadChannels(strides[i]) if i else None
            stage = ReversibleStage(width, depth, entry=entry, memory_saving=config.memory_saving)
            self.add_module(f"block{i + 1}", stage)
        self._add_head(widths[-1], final_norm=True)
        init_weights(self)
