"""``zero_init_residual`` (Goyal et al., 2017): every residual unit starts as its shortcut."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssltk.config import load_config
from ssltk.models import build_model
from ssltk.models.init import zero_init_residual_branches
from ssltk.models.resnet import BottleneckV1, BottleneckV2
from ssltk.pretext import build_task

UNITS = 3 + 4 + 6 + 3


def small(arch: str, zero: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        arch, widening=1, num_classes=4, memory_saving=False, zero_init_residual=zero
    ).eval()


def shortcut_of(unit: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What each unit must output when its residual branch is zero."""
    if isinstance(unit, BottleneckV1):
        return F.relu(unit.shortcut(x))
    return x if unit.projection is None else unit.projection(unit.preact(x))


def unit_gaps(model: torch.nn.Module) -> list[float]:
    """Max |unit(x) - shortcut(x)| of every residual unit on a random batch."""
    gaps: list[float] = []

    def record(unit, inputs, output):
        gaps.append((output - shortcut_of(unit, inputs[0])).abs().max().item())

    units = [m for m in model.modules() if isinstance(m, BottleneckV1 | BottleneckV2)]
    handles = [unit.register_forward_hook(record) for unit in units]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for handle in handles:
        handle.remove()
    return gaps


@pytest.mark.parametrize("arch", ["resnet50_v1", "resnet50_v2"])
def test_every_unit_is_its_shortcut_at_init(arch):
    gaps = unit_gaps(small(arch, zero=True))
    assert len(gaps) == UNITS
    assert max(gaps) == 0.0
    assert min(unit_gaps(small(arch, zero=False))) > 1e-3  # the default init is not the shortcut


@pytest.mark.parametrize("arch", ["resnet50_v1", "resnet50_v2"])
def test_zeroed_scales_still_receive_gradients(arch):
    model = small(arch, zero=True).train()
    model(torch.randn(4, 3, 32, 32))["logits"].square().sum().backward()
    for module in model.modules():
        if isinstance(module, BottleneckV1):
            assert module.bn3.weight.grad.abs().sum() > 0
        elif isinstance(module, BottleneckV2):
            assert module.conv3.weight.grad.abs().sum() > 0


def test_only_the_last_scale_changes_and_revnet_and_vgg_are_untouched():
    plain, zeroed = small("resnet50_v1", zero=False), small("resnet50_v1", zero=True)
    changed = {
        name
        for (name, a), (_, b) in zip(
            plain.state_dict().items(), zeroed.state_dict().items(), strict=True
        )
        if not torch.equal(a, b)
    }
    assert changed == {n for n in plain.state_dict() if n.endswith("bn3.weight")}
    assert len(changed) == UNITS
    for arch in ("revnet50", "vgg19_bn"):
        torch.manual_seed(0)
        model = build_model(arch, widening=1, num_classes=4, input_size=32)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert zero_init_residual_branches(model) == 0
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_config_option_reaches_the_task_backbone():
    sets = ["model.widening=1", "pretext.input_size=32", "model.zero_init_residual=true"]
    task = build_task(load_config(None, [*sets, "pretext.task=rotation"]))
    assert task.backbone.config.zero_init_residual
    assert all(
        unit.bn3.weight.abs().sum() == 0
        for unit in task.backbone.modules()
        if isinstance(unit, BottleneckV1)
    )
    assert not build_task(load_config(None, sets[:2])).backbone.config.zero_init_residual
