"""RevNet50 as in the paper's code (§3.7): one additive coupling per unit with a half swap.

A unit maps x = [x1 | x2] to [x2 | x1 + F(x2)], where F is a pre-activation bottleneck without a
shortcut and inner width C/8. Units never change the shape; between stages a parameter-free
transition average-pools (stride 2) and zero-pads the channels from C to 2C. The stem is a single
7×7 conv straight to 64k channels (no BN/ReLU, excluded from weight decay) and a zero-padded
max-pool.

With ``memory_saving`` each stage runs its units through
:func:`ssltk.models.reversible.reversible_sequence`, which recomputes activations from the stage
output during backward instead of storing them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssltk.models.layers import (
    PreLogits,
    ZeroPadMaxPool,
    batch_norm,
    conv,
    exclude_from_weight_decay,
    init_weights,
)
from ssltk.models.resnet import DEPTHS, STAGE_WIDTHS, stage_strides
from ssltk.models.spec import ArchConfig


def coupling_forward(x: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
    """``[x1 | x2]`` and ``fx = F(x2)`` → ``[x2 | x1 + fx]``."""
    x1, x2 = x.chunk(2, dim=1)
    return torch.cat((x2, x1 + fx), dim=1)


def coupling_inverse(y: torch.Tensor, fy: torch.Tensor) -> torch.Tensor:
    """``[y1 | y2]`` and ``fy = F(y1)`` → ``[y2 - fy | y1]``, undoing :func:`coupling_forward`."""
    y1, y2 = y.chunk(2, dim=1)
    return torch.cat((y2 - fy, y1), dim=1)


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


class RevNet50(nn.Module):
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
            exclude_from_weight_decay(conv(3, widths[0], 7, root_stride)), ZeroPadMaxPool()
        )
        # Stage i+1 enters through the transition that ends stage i (paper: "pool and double").
        strides = stage_strides(config.patch_mode)
        for i, (depth, width) in enumerate(zip(DEPTHS, widths, strict=True)):
            entry = PoolAndPadChannels(strides[i]) if i else None
            stage = ReversibleStage(width, depth, entry=entry, memory_saving=config.memory_saving)
            self.add_module(f"block{i + 1}", stage)
        self.pre_logits = PreLogits(
            widths[-1],
            final_norm=True,
            last_relu=config.last_relu,
            representation_size=config.representation_size,
        )
        self.logits = (
            nn.Linear(self.pre_logits.out_features, config.num_classes)
            if config.num_classes
            else None
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        endpoints = {"after_root": self.root(x)}
        x = endpoints["after_root"]
        for name in ("block1", "block2", "block3", "block4"):
            x = endpoints[name] = getattr(self, name)(x)
        endpoints["pre_logits"] = self.pre_logits(x)
        if self.logits is not None:
            endpoints["logits"] = self.logits(endpoints["pre_logits"])
        return endpoints
