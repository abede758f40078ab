"""ResNet50 v1 (post-activation, stride on the 3×3) and v2 (pre-activation), as the released
``models/resnet.py``.

Widths scale with the widening factor k: root 16k, stage outputs 64k/128k/256k/512k, bottleneck
inner width a quarter of the output. Each endpoint is the output of the child module of the same
name (``root`` gives ``after_root``).
"""

from __future__ import annotations

import torch
from torch import nn

from ssltk.models.layers import PreLogits, ZeroPadMaxPool, batch_norm, conv, init_weights
from ssltk.models.registry import register_arch
from ssltk.models.spec import ArchConfig

DEPTHS = (3, 4, 6, 3)
STAGE_WIDTHS = (64, 128, 256, 512)  # per unit of k
ROOT_WIDTH = 16  # per unit of k


def stage_strides(patch_mode: bool) -> tuple[int, ...]:
    """Stride of each stage's first unit; patch mode keeps stage 4 at full resolution."""
    return (1, 2, 2, 1) if patch_mode else (1, 2, 2, 2)


class BottleneckV1(nn.Module):
    """1×1 → 3×3 (strided) → 1×1, BN after each conv, ReLU after the shortcut add."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        inner = out_channels // 4
        self.conv1 = conv(in_channels, inner, 1)
        self.bn1 = batch_norm(inner)
        self.conv2 = conv(inner, inner, 3, stride)
        self.bn2 = batch_norm(inner)
        self.conv3 = conv(inner, out_channels, 1)
        self.bn3 = batch_norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                conv(in_channels, out_channels, 1, stride), batch_norm(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class BottleneckV2(nn.Module):
    """Pre-activation bottleneck: BN-ReLU on the input, then 1×1 → 3×3 (strided) → 1×1.

    A projection shortcut (1×1 conv, no BN) reads the pre-activated input; the identity shortcut
    reads the raw input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        inner = out_channels // 4
        self.preact = nn.Sequential(batch_norm(in_channels), nn.ReLU(inplace=True))
        self.conv1 = conv(in_channels, inner, 1)
        self.bn1 = batch_norm(inner)
        self.conv2 = conv(inner, inner, 3, stride)
        self.bn2 = batch_norm(inner)
        self.conv3 = conv(inner, out_channels, 1)
        self.relu = nn.ReLU(inplace=True)
        self.projection: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.projection = conv(in_channels, out_channels, 1, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.preact(x)
        shortcut = x if self.projection is None else self.projection(preact)
        out = self.relu(self.bn1(self.conv1(preact)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.conv3(out) + shortcut


def _stage(
    block: type[nn.Module], in_channels: int, out_channels: int, depth: int, stride: int
) -> nn.Sequential:
    units = [block(in_channels, out_channels, stride)]
    units += [block(out_channels, out_channels, 1) for _ in range(depth - 1)]
    return nn.Sequential(*units)


class StagedBackbone(nn.Module):
    """Shared shape of ResNet50 and RevNet50: ``root``, ``block1..block4``, ``pre_logits`` and an
    optional linear ``logits`` head, called to return the endpoint dict.
    """

    def _add_head(self, channels: int, *, final_norm: bool) -> None:
        config = self.config
        self.pre_logits = PreLogits(
            channels,
            final_norm=final_norm,
            last_relu=config.last_relu,
            representation_size=config.representation_size,
        )
        self.logits = (
            nn.Linear(self.pre_logits.out_features, config.num_classes)
            if config.num_classes
            else None
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        endpoints = {"after_root": self.root(x)}
        x = endpoints["after_root"]
        for name in ("block1", "block2", "block3", "block4"):
            x = endpoints[name] = getattr(self, name)(x)
        endpoints["pre_logits"] = self.pre_logits(x)
        if self.logits is not None:
            endpoints["logits"] = self.logits(endpoints["pre_logits"])
        return endpoints


class ResNet50(StagedBackbone):
    """ResNet50 v1 or, with ``preactivation``, v2, returning the endpoint dict."""

    def __init__(self, config: ArchConfig, *, preactivation: bool) -> None:
        super().__init__()
        self.config = config
        k = config.widening
        v1 = not preactivation
        root_stride = 1 if config.patch_mode else 2
        root_width = ROOT_WIDTH * k
        if v1:
            # Post-ReLU input: -inf padding in MaxPool2d equals TF's zero padding here.
            self.root = nn.Sequential(
                conv(3, root_width, 7, root_stride),
                batch_norm(root_width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            self.root = nn.Sequential(conv(3, root_width, 7, root_stride), ZeroPadMaxPool())

        block = BottleneckV1 if v1 else BottleneckV2
        channels = root_width
        strides = stage_strides(config.patch_mode)
        for i, (depth, width, stride) in enumerate(zip(DEPTHS, STAGE_WIDTHS, strides, strict=True)):
            self.add_module(f"block{i + 1}", _stage(block, channels, width * k, depth, stride))
            channels = width * k
        self._add_head(channels, final_norm=not v1)
        init_weights(self)


@register_arch("resnet50_v1")
def resnet50_v1(config: ArchConfig) -> ResNet50:
    return ResNet50(config, preactivation=False)


@register_arch("resnet50_v2")
def resnet50_v2(config: ArchConfig) -> ResNet50:
    return ResNet50(config, preactivation=True)
