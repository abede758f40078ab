"""Optional zero initialisation of every residual branch's last scale (Goyal et al., 2017).

Not in the paper's code (``model.zero_init_residual``, default off): each residual unit then starts
as its shortcut, so a deep, thin network trains like a shallow one early on and deepens as the
branches grow. The last scale of a branch is

* ResNet v1: the γ of the BN that ends the bottleneck (``bn3``);
* ResNet v2: the last 1×1 conv's kernel, since the pre-activation branch ends in a conv with no BN
  after it (timm's ``PreActBottleneck.zero_init_last`` does the same).

RevNet is left unchanged on purpose. Its equivalent (the last conv of F) makes every unit a plain
half swap, so the channels that each stage transition pads with zeros, three quarters of block4,
stay exactly zero until F grows; the final BN then amplifies F's first tiny updates by up to
1/sqrt(eps). VGG has no residual branches.
"""

from __future__ import annotations

from torch import nn

from ssltk.models.resnet import BottleneckV1, BottleneckV2

__all__ = ["zero_init_residual_branches"]


def zero_init_residual_branches(model: nn.Module) -> int:
    """Zero the last scale of every residual branch of ``model``; returns how many were zeroed."""
    count = 0
    for module in model.modules():
        if isinstance(module, BottleneckV1):
            nn.init.zeros_(module.bn3.weight)
        elif isinstance(module, BottleneckV2):
            nn.init.zeros_(module.conv3.weight)
        else:
            continue
        count += 1
    return count
