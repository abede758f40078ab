"""Building blocks shared by the backbones, with the conventions of the released TF
code (``models/resnet.py``, ``trainer.py``).

BatchNorm uses TF's defaults translated to PyTorch (momentum 0.01, eps 1e-3); kernels start
Glorot-uniform with zero biases (see :func:`init_weights`). Convolutions never carry a bias when a
BatchNorm follows them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_MOMENTUM = 0.01
BN_EPS = 1e-3

_NO_DECAY_FLAG = "_ssltk_no_weight_decay"


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm2d with TF's momentum 0.99 (PyTorch 0.01) and eps 1e-3."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """Bias-free conv with symmetric padding (k-1)/2, as TF's explicit-pad + VALID convs."""
    return nn.Conv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=(kernel_size - 1) // 2,
        bias=False,
    )


def exclude_from_weight_decay(module: nn.Module) -> nn.Module:
    """Mark ``module``'s kernel as not decayed (the RevNet stem conv, as the released code)."""
    setattr(module, _NO_DECAY_FLAG, True)
    return module


def is_excluded_from_weight_decay(module: nn.Module) -> bool:
    return getattr(module, _NO_DECAY_FLAG, False)


def init_weights(model: nn.Module) -> None:
    """Glorot-uniform conv/linear kernels, zero biases, BN gamma 1 and beta 0 (TF defaults)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class ZeroPadMaxPool(nn.Module):
    """3×3 stride-2 max-pool over a zero-padded input.

    TF pads the pool input with zeros; ``nn.MaxPool2d(padding=1)`` pads with -inf, which differs at
    the borders whenever the input can be negative (the v2 and RevNet stems have no ReLU before it).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.pad(x, (1, 1, 1, 1)), kernel_size=3, stride=2)


class RepresentationLayer(nn.Sequential):
    """1×1 conv + BN (+ ReLU) that sets the width of the pooled representation.

    ASSUMPTION (the paper decouples width from representation size with an extra layer that its
    released code does not have): the layer sits *before* global average pooling, because a purely
    linear map after pooling could not change what a linear probe can express.
    """

    def __init__(self, in_channels: int, out_channels: int, relu: bool = True) -> None:
        layers: list[nn.Module] = [conv(in_channels, out_channels, 1), batch_norm(out_channels)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels


class PreLogits(nn.Module):
    """Everything between the last stage and ``pre_logits``: optional final BN (+ ReLU), the
    optional representation layer, then global average pooling to ``[B, out_features]``.

    ``final_norm`` is for the pre-activation nets (v2, RevNet), whose last unit ends without a
    BN/ReLU. ``last_relu=False`` is their "(-)" variant; it also drops the representation layer's
    ReLU so that nothing rectifies the features right before pooling.
    """

    def __init__(
        self,
        channels: int,
        *,
        final_norm: bool,
        last_relu: bool,
        representation_size: int | None,
    ) -> None:
        super().__init__()
        self.norm = batch_norm(channels) if final_norm else nn.Identity()
        self.relu = nn.ReLU(inplace=True) if final_norm and last_relu else nn.Identity()
        if representation_size is None:
            self.representation: nn.Module = nn.Identity()
            self.out_features = channels
        else:
            self.representation = RepresentationLayer(channels, representation_size, last_relu)
            self.out_features = representation_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.representation(self.relu(self.norm(x)))
        return x.mean(dim=(2, 3))
