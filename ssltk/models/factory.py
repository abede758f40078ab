"""``build_model`` and the optimizer parameter groups for weight decay."""

from __future__ import annotations

from typing import Any

from torch import nn

from ssltk.models.init import zero_init_residual_branches
from ssltk.models.layers import is_excluded_from_weight_decay
from ssltk.models.registry import arch_traits
from ssltk.models.spec import ArchConfig


def build_model(arch: str, **options: Any) -> nn.Module:
    """Build the registered backbone ``arch``; called on ``[B, 3, H, W]`` it returns endpoints.

    ``options`` are the other fields of :class:`ArchConfig` (``widening=4, num_classes=1000,
    last_relu=True, patch_mode=False, representation_size=None, memory_saving=True,
    input_size=None, zero_init_residual=False``). ResNet/RevNet: ``after_root, block1..block4,
    pre_logits, logits``; VGG: ``block1..block5, fc6, pre_logits, logits``. ``num_classes`` None or
    0 leaves out the head and the ``logits`` endpoint (for pretext heads that read
    ``pre_logits``). ``patch_mode`` sets the root and last-stage strides to 1 for ResNet/RevNet
    (VGG is unchanged). ``memory_saving`` is RevNet's activation recomputation. ``input_size`` is
    used by VGG only. ``zero_init_residual`` starts every residual branch at zero
    (:mod:`ssltk.models.init`). Bad arguments raise ``ValueError`` naming them.
    """
    return build_backbone(ArchConfig(arch, **options))


def build_backbone(config: ArchConfig) -> nn.Module:
    """The backbone ``config`` describes, with ``config`` kept on ``model.config``."""
    model = arch_traits(config.arch).build(config)
    if config.zero_init_residual:
        zero_init_residual_branches(model)
    return model


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups: conv/linear kernels with ``weight_decay``, everything else without.

    BN parameters, biases and kernels marked by ``exclude_from_weight_decay`` (the RevNet stem)
    are not decayed, as in the TF code (``trainer.py``). Frozen parameters are left out; shared
    parameters appear once.
    """
    if not isinstance(weight_decay, int | float) or weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay!r}: must be a non-negative number")
    decay_ids = {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, nn.Conv2d | nn.Linear) and not is_excluded_from_weight_decay(module)
    }
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if id(param) in decay_ids else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
