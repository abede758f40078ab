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

from ssltk.models.layers import (
    ZeroPadMaxPool,
    batch_norm,
    conv,
    exclude_from_weight_decay,
    init_weights,
)
from ssltk.models.resnet import DEPTHS, STAGE_WIDTHS, StagedBackbone, stage_strides
from ssltk.models.spec import ArchConfig


def coupling_forward(x: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
    """``[x1 | x2]`` and ``fx = F(x2)`` → ``[x2 | x1 + fx]``."""
    x1, x2 = x.chunk(2, dim=1)
    return torch.cat((x2, x1 + fx), dim=1)


def coupling_inverse(y: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
    """``[y1 | y2]`` and ``fy = F(y1)`` → ``[y2 - fy | y1]``, undoing :func:`coupling_forward`."""
    y1, y2 = y.chunk(2, dim=1)
    return torch.cat((y2 - fy, y1), dim=1)


class _WindowMaxPool(torch.autograd.Function):
    """``ZeroPadMaxPool``'s 3×3/2 max-pool over a zero-padded input that saves, per output, only
    which of the 9 window positions held the maximum (int8), not the padded input and int64
    indices. Forward and gradient run torch's own max-pool kernels on the same indices, so both
    are bit-identical to the plain layer, ties included (torch takes the first maximum in
    row-major window order, on CPU and CUDA)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (1, 1, 1, 1))
        out, flat = F.max_pool2d(padded, kernel_size=3, stride=2, return_indices=True)
        width = padded.shape[-1]
        # flat - (window's top-left index) = row * width + col with row, col in 0..2.
        offset = (flat - _window_starts(out.shape[-2:], width, x.device)).to(torch.int32)
        row = (offset >= width).to(torch.int32) + (offset >= 2 * width)
        ctx.save_for_backward(offset.sub_(row * (width - 3)).to(torch.int8))  # row * 3 + col
        ctx.padded_shape = padded.shape
        channels_last = padded.dim() == 4 and not padded.is_contiguous()
        channels_last &= padded.is_contiguous(memory_format=torch.channels_last)
        ctx.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (position,) = ctx.saved_tensors
        width = ctx.padded_shape[-1]
        offsets = torch.tensor(
            [row * width + col for row in range(3) for col in range(3)], device=grad_out.device
        )
        starts = _window_starts(grad_out.shape[-2:], width, grad_out.device)
        flat = starts + offsets.take(position.long())
        # Only the shape and memory format of the input are read, never its values.
        shape_of_input = torch.empty(
            ctx.padded_shape,
            dtype=grad_out.dtype,
            device=grad_out.device,
            memory_format=ctx.memory_format,
        )
        grad_padded = torch.ops.aten.max_pool2d_with_indices_backward(
            grad_out, shape_of_input, [3, 3], [2, 2], [0, 0], [1, 1], False, flat
        )
        return grad_padded[..., 1:-1, 1:-1]


def _window_starts(out_size: torch.Size, width: int, device: torch.device) -> torch.Tensor:
    """Flat index, in a padded plane ``width`` wide, of each output's window's top-left pixel."""
    rows, cols = out_size
    top = torch.arange(0, 2 * rows, 2, device=device)
    return top[:, None] * width + torch.arange(0, 2 * cols, 2, device=device)


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
        return coupling_forward(x, self.f(x[:, self.channels // 2 :]))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return coupling_inverse(y, self.f(y[:, : self.channels // 2]))


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
