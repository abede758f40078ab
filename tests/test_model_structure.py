"""The backbones' structure, unit by unit: what parameter totals and gradients cannot see.

* Every bottleneck of ResNet50 v1 and v2 has the paper's widths (§3.2): input = the previous
  unit's output, inner = a quarter of the stage width, output = the stage width (64k..512k).
* Pinned parameter counts of every registered arch at k=1 and k=4, with and without the head.
* RevNet50's stage transitions zero-pad the channels to ``[0 | x | 0]``; the memory-saving
  backward is told which of the first unit's ``x2`` channels are exactly zero and resets them.
  Gradients at test sizes on CPU are bit-identical with or without that hint, so what the stage
  passes down is checked directly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssltk.models import arch_names, build_model, count_parameters
from ssltk.models import reversible as reversible_module
from ssltk.models.resnet import DEPTHS, ROOT_WIDTH, STAGE_WIDTHS, BottleneckV1, BottleneckV2
from ssltk.models.revnet import PoolAndPadChannels, ReversibleStage

# --------------------------------------------------------------------------------------------------
# ResNet bottleneck widths


def _expected_units(k: int):
    """(stage, unit, in, inner, out) of every bottleneck of ResNet50 at widening ``k``."""
    channels = ROOT_WIDTH * k
    for stage, (depth, width) in enumerate(zip(DEPTHS, STAGE_WIDTHS, strict=True), start=1):
        for unit in range(depth):
            yield stage, unit, channels, width * k // 4, width * k
            channels = width * k


@pytest.mark.parametrize("arch", ["resnet50_v1", "resnet50_v2"])
@pytest.mark.parametrize("k", [1, 3])
def test_every_bottleneck_has_the_paper_widths(arch, k):
    assert DEPTHS == (3, 4, 6, 3) and STAGE_WIDTHS == (64, 128, 256, 512) and ROOT_WIDTH == 16
    with torch.device("meta"):
        model = build_model(arch, widening=k, num_classes=None)
    block = BottleneckV1 if arch == "resnet50_v1" else BottleneckV2
    seen = 0
    for stage, unit, c_in, inner, c_out in _expected_units(k):
        b = getattr(model, f"block{stage}")[unit]
        where = f"{arch} k={k} block{stage}[{unit}]"
        assert isinstance(b, block), where
        convs = (b.conv1, b.conv2, b.conv3)
        assert [(c.in_channels, c.out_channels) for c in convs] == [
            (c_in, inner),
            (inner, inner),
            (inner, c_out),
        ], where
        assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (1, 1)], where
        norms = [b.bn1, b.bn2] + ([b.bn3] if block is BottleneckV1 else [b.preact[0]])
        want = [inner, inner] + ([c_out] if block is BottleneckV1 else [c_in])
        assert [n.num_features for n in norms] == want, where
        # A projection exactly where the shape changes: every stage's first unit.
        projection = b.shortcut if block is BottleneckV1 else b.projection
        has_projection = projection is not None and not isinstance(projection, nn.Identity)
        assert has_projection == (unit == 0), where
        if has_projection:
            proj = projection[0] if isinstance(projection, nn.Sequential) else projection
            assert (proj.in_channels, proj.out_channels) == (c_in, c_out), where
        seen += 1
    assert seen == sum(DEPTHS)
    assert sum(isinstance(m, block) for m in model.modules()) == seen


# --------------------------------------------------------------------------------------------------
# Parameter counts of every arch (computed from the widths above at k=4: resnet50_v1 with the
# 1000-way head is torchvision's ResNet50, 25,557,032)

PARAMS = {
    ("resnet50_v1", 1, None): 1_480_976,
    ("resnet50_v1", 1, 1000): 1_993_976,
    ("resnet50_v1", 4, None): 23_508_032,
    ("resnet50_v1", 4, 1000): 25_557_032,
    ("resnet50_v2", 1, None): 1_479_056,
    ("resnet50_v2", 1, 1000): 1_992_056,
    ("resnet50_v2", 4, None): 23_500_352,
    ("resnet50_v2", 4, 1000): 25_549_352,
    ("revnet50", 1, None): 350_112,
    ("revnet50", 1, 1000): 863_112,
    ("revnet50", 4, None): 5_408_640,
    ("revnet50", 4, 1000): 7_457_640,
    ("vgg19_bn", 1, None): 2_184_184,
    ("vgg19_bn", 1, 1000): 2_697_184,
    ("vgg19_bn", 4, None): 34_903_264,
    ("vgg19_bn", 4, 1000): 36_952_264,
}


def test_every_arch_has_a_pinned_parameter_count():
    assert {arch for arch, _, _ in PARAMS} == set(arch_names())


@pytest.mark.parametrize(("arch", "k", "classes"), sorted(PARAMS, key=str))
def test_parameter_counts_are_pinned(arch, k, classes):
    with torch.device("meta"):
        model = build_model(arch, widening=k, num_classes=classes)
    assert count_parameters(model) == PARAMS[arch, k, classes]


def _v2_params(k: int, classes: int | None) -> int:
    """ResNet50 v2 by hand: 7×7 root conv; per unit BN(in) + 1×1 + BN + 3×3 + BN + 1×1 (+ a 1×1
    projection in each stage's first unit); the final BN; the head."""
    total = 7 * 7 * 3 * ROOT_WIDTH * k
    for _, unit, c_in, inner, c_out in _expected_units(k):
        total += 2 * c_in + c_in * inner + 2 * inner + 9 * inner * inner + 2 * inner
        total += inner * c_out + (c_in * c_out if unit == 0 else 0)
    total += 2 * 512 * k
    return total + (512 * k * classes + classes if classes else 0)


@pytest.mark.parametrize("k", [1, 4])
def test_resnet50_v2_count_follows_from_its_widths(k):
    assert PARAMS["resnet50_v2", k, 1000] == _v2_params(k, 1000)
    assert PARAMS["resnet50_v2", k, None] == _v2_params(k, None)


# --------------------------------------------------------------------------------------------------
# RevNet50: the zero channels each stage names to the memory-saving backward


def test_pool_and_pad_names_exactly_its_zero_channels():
    x = torch.rand(2, 8, 4, 4) + 0.5  # no zero anywhere
    out = PoolAndPadChannels(stride=1)(x)
    zero = [c for c in range(out.shape[1]) if not out[:, c].any()]
    assert zero == [0, 1, 2, 3, 12, 13, 14, 15]
    first, last = PoolAndPadChannels.zero_channels(out.shape[1])
    assert (first, last) == (slice(0, 4), slice(12, 16))
    # x2 of the first unit is channels 8..15: the hint there is its second half, 4..7.
    assert reversible_module._zero_x2_ranges((first, last), 16) == ((4, 8),)
    assert reversible_module._zero_x2_ranges((slice(0, 4),), 16) == ()


@pytest.fixture
def stage_calls(monkeypatch):
    """Records ``(x, zero_x2)`` of every memory-saving reversible sequence that runs."""
    calls = []
    original = reversible_module._ReversibleSequence.apply

    def spy(x, plan, zero_x2, *params):
        calls.append((x.detach().clone(), zero_x2))
        return original(x, plan, zero_x2, *params)

    monkeypatch.setattr(reversible_module._ReversibleSequence, "apply", staticmethod(spy))
    return calls


def test_revnet_stages_pass_down_the_zero_half_of_x2(stage_calls):
    torch.manual_seed(0)
    model = build_model("revnet50", widening=1, num_classes=10, memory_saving=True).train()
    model(torch.randn(2, 3, 16, 16))  # a forward in grad mode is what hands the hint down
    stages = [getattr(model, f"block{i}") for i in range(1, 5)]
    assert all(isinstance(s, ReversibleStage) for s in stages)
    assert len(stage_calls) == 4
    for i, (x, zero_x2) in enumerate(stage_calls, start=1):
        channels = x.shape[1]
        assert channels == STAGE_WIDTHS[i - 1]
        x2 = x[:, channels // 2 :]
        exactly_zero = [c for c in range(x2.shape[1]) if not x2[:, c].any()]
        if i == 1:  # the stem feeds stage 1 directly: nothing is padded
            assert zero_x2 == () and exactly_zero == [], f"block{i}"
            continue
        # Stages 2..4 enter through [0 | x | 0]: the second half of x2 is the padding.
        assert zero_x2 == ((channels // 4, channels // 2),), f"block{i}"
        named = [c for start, stop in zero_x2 for c in range(start, stop)]
        assert named == exactly_zero, f"block{i}: hint {zero_x2}, zero channels {exactly_zero}"
