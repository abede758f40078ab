"""VGG19 with BatchNorm (the released ``models/vggnet.py``): base width w = 8k, so k=8 is the
usual 64..512 channels.

Every conv is 3×3 without bias, followed by BN and ReLU. Endpoints ``block1..block5`` are taken
before each block's 2×2 max-pool. ``fc6`` is a conv whose kernel covers the whole map left after the
fifth pool (7×7 at 224 px, 2×2 for 64 px patches) with 512k outputs; ``pre_logits`` (fc7) is a
1×1 conv + BN + ReLU; ``logits`` a 1×1 conv with bias. No dropout, no global pooling. The fc6
kernel is fixed when the model is built, from ``config.input_size``; ``fc6``, ``pre_logits`` and
``logits`` are returned flattened to ``[B, C]``.

``representation_size`` sets fc7's width: fc7 already is a 1×1 conv + BN + ReLU feeding the
logits, i.e. exactly the representation layer the other backbones add before pooling.
"""

from __future__ import annotations

import torch
from torch import nn

from ssltk.models.layers import batch_norm, conv, init_weights
from ssltk.models.registry import register_arch
from ssltk.models.spec import ArchConfig, is_int

#: Default input side: full images (224) or Jigsaw/RelPatchLoc patches (64).
VGG_IMAGE_SIZE = 224
VGG_PATCH_SIZE = 64
#: VGG halves the resolution five times before fc6.
VGG_DOWNSAMPLING = 32
CONVS_PER_BLOCK = (2, 2, 4, 4, 4)
BLOCK_WIDTHS = (1, 2, 4, 8, 8)  # multiples of w = 8k


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    return [
        conv(in_channels, out_channels, kernel_size),
        batch_norm(out_channels),
        nn.ReLU(inplace=True),
    ]


def fully_connected(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    """fc6/fc7: a 'valid' conv over the whole map (output 1×1), BN, ReLU."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, bias=False),
        batch_norm(out_channels),
        nn.ReLU(inplace=True),
    ]


def vgg_input_size(size: int | None, patch_mode: bool) -> int:
    """The side fc6's kernel is built for: ``size``, by default 224 (64 in patch mode); the model
    then accepts sides in ``[32·(size//32), 32·(size//32) + 31]``."""
    if size is None:
        size = VGG_PATCH_SIZE if patch_mode else VGG_IMAGE_SIZE
    if not is_int(size) or size < VGG_DOWNSAMPLING:
        raise ValueError(
            f"input_size={size!r}: VGG needs at least {VGG_DOWNSAMPLING} px "
            "(five 2×2 poolings before fc6)"
        )
    return size


@register_arch("vgg19_bn", input_size_rule=vgg_input_size)
class VGG19BN(nn.Module):
    """VGG19-BN returning ``block1..block5, fc6, pre_logits, logits``."""

    def __init__(self, config: ArchConfig) -> None:
        super().__init__()
        if config.input_size is None:
            raise ValueError("input_size: VGG19BN is built for one input size (see vgg_input_size)")
        self.config = config
        w = 8 * config.widening
        channels = 3
        for i, (convs, mult) in enumerate(zip(CONVS_PER_BLOCK, BLOCK_WIDTHS, strict=True)):
            layers: list[nn.Module] = [nn.MaxPool2d(2, 2)] if i else []
            for _ in range(convs):
                layers += conv_bn_relu(channels, mult * w, 3)
                channels = mult * w
            self.add_module(f"block{i + 1}", nn.Sequential(*layers))
        self.fc6_kernel = config.input_size // VGG_DOWNSAMPLING
        fc_width = 512 * config.widening
        self.fc6 = nn.Sequential(
            nn.MaxPool2d(2, 2), *fully_connected(channels, fc_width, self.fc6_kernel)
        )
        self.pre_logits = nn.Sequential(
            *fully_connected(fc_width, config.pre_logits_width, 1), nn.Flatten()
        )
        # A 1×1 conv with bias on a 1×1 map is a Linear layer on the flattened fc7.
        self.logits = (
            nn.Linear(config.pre_logits_width, config.num_classes) if config.num_classes else None
        )
        init_weights(self)

    def _check_input(self, x: torch.Tensor) -> None:
        side = self.fc6_kernel * VGG_DOWNSAMPLING
        pooled = tuple(s // VGG_DOWNSAMPLING for s in x.shape[-2:])
        if x.ndim != 4 or pooled != (self.fc6_kernel, self.fc6_kernel):
            raise ValueError(
                f"input size {tuple(x.shape[-2:])}: {self.config.arch} was built for input_size="
                f"{self.config.input_size} (fc6 kernel {self.fc6_kernel}×{self.fc6_kernel}) and "
                f"takes [B, 3, H, W] with H and W in [{side}, {side + VGG_DOWNSAMPLING - 1}]"
            )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_input(x)
        endpoints: dict[str, torch.Tensor] = {}
        for name in ("block1", "block2", "block3", "block4", "block5"):
            x = endpoints[name] = getattr(self, name)(x)
        x = self.fc6(x)
        endpoints["fc6"] = x.flatten(1)
        x = endpoints["pre_logits"] = self.pre_logits(x)
        if self.logits is not None:
            endpoints["logits"] = self.logits(x)
        return endpoints
