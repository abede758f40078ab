"""Backbones: parameter counts, endpoint shapes (paper §3, §4.2), conventions and bad arguments.

Large configurations are built on the ``meta`` device, which allocates nothing; real forwards use
k=1 and small inputs.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from torch import nn

from ssltk.models import (
    ArchConfig,
    arch_names,
    build_model,
    count_parameters,
    format_summary,
    model_summary,
    weight_decay_groups,
)
from ssltk.models.layers import ZeroPadMaxPool
from ssltk.models.revnet import PoolAndPadChannels, ReversibleStage

ARCHS = arch_names()
RESNETS = ("resnet50_v1", "resnet50_v2", "revnet50")


def meta_params(arch: str, widening: int, num_classes: int | None) -> int:
    with torch.device("meta"):
        return count_parameters(build_model(arch, widening=widening, num_classes=num_classes))


def shapes(arch: str, widening: int, size: int, patch_mode: bool = False, **kw) -> dict:
    rows = model_summary(arch, widening, size, patch_mode, **kw)
    return {row.endpoint: row.shape for row in rows}


def small(arch: str, **kw) -> nn.Module:
    kw.setdefault("widening", 1)
    kw.setdefault("num_classes", 10)
    if arch == "revnet50":
        kw.setdefault("memory_saving", False)
    if arch == "vgg19_bn":
        kw.setdefault("input_size", 64)
    return build_model(arch, **kw)


# --------------------------------------------------------------------------------------------------
# Parameter counts (paper §3.1)


def test_resnet50_v1_k4_matches_standard_resnet50_exactly():
    assert meta_params("resnet50_v1", 4, 1000) == 25_557_032


@pytest.mark.parametrize(
    ("arch", "widening", "num_classes", "millions"),
    [
        ("resnet50_v1", 8, None, 93.9),
        ("resnet50_v1", 12, None, 211.2),
        ("resnet50_v1", 16, None, 375.4),
        ("revnet50", 16, None, 85.8),
        ("revnet50", 4, 1000, 7.5),
        ("revnet50", 8, 1000, 25.6),
        ("resnet50_v1", 8, 1000, 98.0),
    ],
)
def test_parameter_counts_match_paper(arch, widening, num_classes, millions):
    assert abs(meta_params(arch, widening, num_classes) / 1e6 - millions) < 0.1


@pytest.mark.parametrize("arch", RESNETS)
@pytest.mark.parametrize(("widening", "width"), [(4, 2048), (8, 4096), (12, 6144), (16, 8192)])
def test_pre_logits_width_is_512k(arch, widening, width):
    assert shapes(arch, widening, 224, num_classes=None)["pre_logits"] == (width,)


def test_vgg_k8_pre_logits_is_4096_after_bn_relu():
    got = shapes("vgg19_bn", 8, 224)
    assert got["fc6"] == (4096,) and got["pre_logits"] == (4096,) and got["logits"] == (1000,)
    model = small("vgg19_bn").eval()
    assert isinstance(model.pre_logits[-2], nn.ReLU) and isinstance(
        model.pre_logits[1], nn.BatchNorm2d
    )
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64))["pre_logits"].min() >= 0


# --------------------------------------------------------------------------------------------------
# Endpoint shapes (paper §3.6 and §4.2)


@pytest.mark.parametrize("arch", RESNETS)
@pytest.mark.parametrize("k", [1, 4])
def test_full_image_shapes_at_224(arch, k):
    root = 64 * k if arch == "revnet50" else 16 * k
    assert shapes(arch, k, 224) == {
        "after_root": (root, 56, 56),
        "block1": (64 * k, 56, 56),
        "block2": (128 * k, 28, 28),
        "block3": (256 * k, 14, 14),
        "block4": (512 * k, 7, 7),
        "pre_logits": (512 * k,),
        "logits": (1000,),
    }


@pytest.mark.parametrize("arch", RESNETS)
def test_patch_mode_shapes_at_64(arch):
    k = 2
    root = 64 * k if arch == "revnet50" else 16 * k
    assert shapes(arch, k, 64, patch_mode=True, num_classes=None) == {
        "after_root": (root, 32, 32),
        "block1": (64 * k, 32, 32),
        "block2": (128 * k, 16, 16),
        "block3": (256 * k, 8, 8),
        "block4": (512 * k, 8, 8),
        "pre_logits": (512 * k,),
    }


@pytest.mark.parametrize("patch_mode", [False, True])
def test_vgg_shapes_and_patch_mode_leaves_vgg_unchanged(patch_mode):
    size = 64 if patch_mode else 224
    got = shapes("vgg19_bn", 1, size, patch_mode)
    s = size
    assert got == {
        "block1": (8, s, s),
        "block2": (16, s // 2, s // 2),
        "block3": (32, s // 4, s // 4),
        "block4": (64, s // 8, s // 8),
        "block5": (64, s // 16, s // 16),
        "fc6": (512,),
        "pre_logits": (512,),
        "logits": (1000,),
    }
    with torch.device("meta"):
        plain = build_model("vgg19_bn", widening=1, input_size=size)
        patched = build_model("vgg19_bn", widening=1, input_size=size, patch_mode=True)
    assert [p.shape for p in plain.parameters()] == [p.shape for p in patched.parameters()]


def pooled_size(shape: tuple[int, ...], target: int = 9000) -> tuple[int, int, int]:
    """§4.2 'max' mode: stride ceil(sqrt(HWC/target)) clamped to [1, H], floor-mode pooling."""
    if len(shape) == 1:
        return (1, 1, shape[0])
    c, h, _ = shape
    if h * h * c <= target:
        return (h, h, c)
    s = min(max(math.ceil(math.sqrt(h * h * c / target)), 1), h)
    return (h // s, h // s, c)


@pytest.mark.parametrize(
    ("arch", "k", "patch_mode", "size", "expected"),
    [
        ("resnet50_v1", 4, False, 224, [(11, 64), (5, 256), (4, 512), (2, 1024), (1, 2048)]),
        ("resnet50_v1", 8, False, 224, [(8, 128), (4, 512), (2, 1024), (2, 2048), (1, 4096)]),
        ("resnet50_v1", 16, False, 224, [(5, 256), (2, 1024), (2, 2048), (1, 4096), (1, 8192)]),
        ("revnet50", 16, False, 224, [(2, 1024), (2, 1024), (2, 2048), (1, 4096), (1, 8192)]),
        ("resnet50_v1", 8, True, 64, [(8, 128), (4, 512), (2, 1024), (2, 2048), (1, 4096)]),
    ],
)
def test_endpoints_reproduce_paper_pooled_feature_table(arch, k, patch_mode, size, expected):
    got = shapes(arch, k, size, patch_mode, num_classes=None)
    names = ("after_root", "block1", "block2", "block3", "block4")
    assert [pooled_size(got[n])[1:] for n in names] == [(side, c) for side, c in expected]
    assert [pooled_size(got[n])[0] for n in names] == [side for side, _ in expected]


def test_vgg_k8_reproduces_paper_pooled_feature_table():
    got = shapes("vgg19_bn", 8, 224)
    names = ("block1", "block2", "block3", "block4", "block5")
    assert [pooled_size(got[n]) for n in names] == [
        (11, 11, 64),
        (8, 8, 128),
        (5, 5, 256),
        (4, 4, 512),
        (3, 3, 512),
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_meta_shapes_equal_real_forward(arch):
    torch.manual_seed(0)
    model = small(arch)
    out = model(torch.randn(2, 3, 64, 64))
    expected = shapes(arch, 1, 64, num_classes=10)
    assert list(out) == list(expected)
    assert {name: tuple(t.shape[1:]) for name, t in out.items()} == expected


# --------------------------------------------------------------------------------------------------
# Architecture details


@pytest.mark.parametrize("arch", ARCHS)
def test_backward_reaches_every_parameter(arch):
    torch.manual_seed(0)
    model = small(arch)
    model(torch.randn(2, 3, 64, 64))["logits"].square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_gives_bit_identical_model_and_outputs(arch):
    x = torch.randn(2, 3, 64, 64)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(small(arch)(x)["logits"])
    assert torch.equal(outs[0], outs[1])


def test_headless_models_have_no_logits():
    for num_classes in (None, 0):
        model = small("resnet50_v2", num_classes=num_classes)
        assert model.logits is None and model.config.num_classes is None
        assert "logits" not in model(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("arch", ["resnet50_v2", "revnet50"])
def test_last_relu_false_lets_pre_logits_go_negative(arch):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    with_relu = small(arch, last_relu=True)(x)["pre_logits"]
    torch.manual_seed(0)
    without = small(arch, last_relu=False)(x)["pre_logits"]
    assert with_relu.min() >= 0
    # Train-mode final BN centres each channel, so the pooled features straddle zero.
    assert without.min() < 0


@pytest.mark.parametrize("arch", ARCHS)
def test_representation_size_sets_pre_logits_width(arch):
    model = small(arch, representation_size=96)
    out = model(torch.randn(2, 3, 64, 64))
    assert out["pre_logits"].shape == (2, 96) and out["logits"].shape == (2, 10)
    assert model.config.pre_logits_width == 96


def test_representation_layer_is_before_global_pooling():
    model = small("resnet50_v1", representation_size=96)
    layer = model.pre_logits.representation
    assert isinstance(layer[0], nn.Conv2d) and layer[0].kernel_size == (1, 1)
    assert layer[0].in_channels == 512 and layer[0].out_channels == 96


def test_v1_and_v2_differ_as_in_paper():
    v1, v2 = small("resnet50_v1"), small("resnet50_v2")
    assert any(isinstance(m, nn.BatchNorm2d) for m in v1.root)
    assert not any(isinstance(m, nn.BatchNorm2d | nn.ReLU) for m in v2.root)
    v1_first, v2_first = v1.block2[0], v2.block2[0]
    assert v1_first.conv2.stride == (2, 2) and v1_first.conv1.stride == (1, 1)
    assert isinstance(v1_first.shortcut[1], nn.BatchNorm2d)
    assert isinstance(v2_first.projection, nn.Conv2d)
    assert isinstance(v2.pre_logits.norm, nn.BatchNorm2d)
    assert isinstance(v1.pre_logits.norm, nn.Identity)


def test_revnet_structure():
    model = small("revnet50", widening=2)
    assert [len(getattr(model, f"block{i}").units) for i in (1, 2, 3, 4)] == [3, 4, 6, 3]
    conv1 = model.block3.units[0].f[2]
    assert (conv1.in_channels, conv1.out_channels) == (256, 64)  # C/2 → C/8 at C = 512
    assert model.root[0].out_channels == 128 and model.root[0].bias is None
    assert isinstance(model.block1.entry, nn.Identity)
    assert [getattr(model, f"block{i}").entry.stride for i in (2, 3, 4)] == [2, 2, 2]
    patched = small("revnet50", patch_mode=True)
    assert patched.block4.entry.stride == 1 and patched.root[0].stride == (1, 1)


def test_zero_pad_max_pool_pads_with_zeros_not_minus_inf():
    x = -torch.rand(1, 1, 3, 3) - 1
    out = ZeroPadMaxPool()(x)
    assert out.shape == (1, 1, 2, 2)
    assert torch.equal(out, torch.zeros_like(out))  # every window touches the zero border
    torch_pool = nn.MaxPool2d(3, 2, padding=1)(x)
    assert (torch_pool < 0).all()


def test_pool_and_pad_channels_layout_and_same_padding():
    x = torch.arange(1 * 2 * 3 * 3, dtype=torch.float32).reshape(1, 2, 3, 3)
    out = PoolAndPadChannels(stride=2)(x)
    assert out.shape == (1, 4, 2, 2)
    assert torch.equal(out[:, 0], torch.zeros(1, 2, 2)) and torch.equal(out[:, 3], out[:, 0])
    # TF "same" average pool: the edge windows average only the pixels that exist.
    first = x[0, 0]
    expected = torch.tensor(
        [
            [first[:2, :2].mean(), first[:2, 2].mean()],
            [first[2, :2].mean(), first[2, 2]],
        ]
    )
    assert torch.allclose(out[0, 1], expected)
    assert torch.equal(PoolAndPadChannels(stride=1)(x)[:, 1:3], x)


def test_memory_saving_stage_calls_reversible_sequence(monkeypatch):
    calls = []

    def fake_reversible_sequence(x, units):
        calls.append(units)
        for unit in units:
            x = unit(x)
        return x * 1.0

    fake = types.ModuleType("ssltk.models.reversible")
    fake.reversible_sequence = fake_reversible_sequence
    monkeypatch.setitem(sys.modules, "ssltk.models.reversible", fake)
    stage = ReversibleStage(16, 2, memory_saving=True)
    x = torch.randn(2, 16, 4, 4)
    y = stage(x)
    assert len(calls) == 1 and calls[0] is stage.units
    stage.memory_saving = False
    assert torch.equal(y, stage(x)) and len(calls) == 1
    stage.memory_saving = True
    with torch.no_grad():
        stage(x)
    assert len(calls) == 1  # nothing to save without autograd: plain loop


def test_default_memory_saving_revnet_constructs_and_runs_without_grad():
    model = build_model("revnet50", widening=1, num_classes=None)
    assert model.config.memory_saving and model.block1.memory_saving
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32))["pre_logits"].shape == (2, 512)


# --------------------------------------------------------------------------------------------------
# TF-port conventions (paper §3.8) and weight decay


def test_batch_norm_and_init_follow_tf_conventions():
    torch.manual_seed(0)
    model = small("resnet50_v1", widening=2)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert (module.momentum, module.eps) == (0.01, 1e-3)
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    conv = model.block3[0].conv2  # 3×3, 128 → 128
    bound = math.sqrt(6 / (2 * 128 * 9))
    assert conv.weight.abs().max() <= bound
    assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.equal(model.logits.bias, torch.zeros(10))
    fan = model.logits.in_features + model.logits.out_features
    assert model.logits.weight.abs().max() <= math.sqrt(6 / fan)


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_decay_groups_decay_only_kernels(arch):
    model = small(arch)
    decay, no_decay = weight_decay_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    all_ids = {id(p) for p in model.parameters()}
    decay_ids, no_decay_ids = {id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]}
    assert decay_ids | no_decay_ids == all_ids and not decay_ids & no_decay_ids
    for name, param in model.named_parameters():
        is_kernel = param.ndim > 1
        stem = arch == "revnet50" and name == "root.0.weight"
        assert (id(param) in decay_ids) == (is_kernel and not stem), name
    torch.optim.SGD(weight_decay_groups(model, 1e-4), lr=0.1)


def test_weight_decay_groups_skip_frozen_and_reject_negative():
    model = small("resnet50_v1")
    model.root.requires_grad_(False)
    groups = weight_decay_groups(model, 0.0)
    frozen = {id(p) for p in model.root.parameters()}
    assert not frozen & {id(p) for g in groups for p in g["params"]}
    with pytest.raises(ValueError, match="weight_decay"):
        weight_decay_groups(model, -1.0)


# --------------------------------------------------------------------------------------------------
# Config, summary and bad arguments


def test_config_records_arguments():
    model = build_model("vgg19_bn", widening=2, num_classes=4, patch_mode=True)
    assert model.config == ArchConfig(
        arch="vgg19_bn", widening=2, num_classes=4, patch_mode=True, input_size=64
    )
    assert model.config.as_dict()["input_size"] == 64
    with pytest.raises(AttributeError):
        model.config.widening = 3


def test_summary_rows_sum_to_parameter_count_and_format():
    rows = model_summary("revnet50", 2, 64, patch_mode=True)
    with torch.device("meta"):
        total = count_parameters(build_model("revnet50", widening=2, patch_mode=True))
    assert sum(r.params for r in rows) == total
    assert rows[0].endpoint == "after_root" and rows[0].features == 128 * 32 * 32
    table = format_summary(rows)
    assert f"{total:,}" in table.splitlines()[-1] and "block4" in table


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"arch": "resnet18"}, "arch='resnet18'"),
        ({"arch": "resnet50_v1", "widening": 0}, "widening=0"),
        ({"arch": "revnet50", "widening": -2}, "widening=-2"),
        ({"arch": "revnet50", "widening": 1.5}, "widening=1.5"),
        ({"arch": "resnet50_v1", "last_relu": False}, "last_relu=False"),
        ({"arch": "vgg19_bn", "last_relu": False}, "last_relu=False"),
        ({"arch": "resnet50_v2", "num_classes": -1}, "num_classes=-1"),
        ({"arch": "resnet50_v2", "representation_size": 0}, "representation_size=0"),
        ({"arch": "vgg19_bn", "input_size": 16}, "input_size=16"),
        ({"arch": "revnet50", "patch_mode": "yes"}, "patch_mode='yes'"),
    ],
)
def test_bad_arguments_raise_one_line_naming_them(kwargs, culprit):
    arch = kwargs.pop("arch")
    with torch.device("meta"), pytest.raises(ValueError) as info:
        build_model(arch, **kwargs)
    message = str(info.value)
    assert culprit in message and "\n" not in message


@pytest.mark.parametrize("side", [32, 100])
def test_vgg_rejects_input_of_the_wrong_size_at_forward(side):
    model = small("vgg19_bn")  # built for 64 px: fc6 kernel 2×2
    with pytest.raises(ValueError, match=rf"input size \({side}, {side}\).*input_size=64"):
        model(torch.randn(2, 3, side, side))
    assert model(torch.randn(2, 3, 95, 95))["fc6"].shape == (2, 512)


def test_summary_rejects_bad_input_size():
    with pytest.raises(ValueError, match="input_size=0"):
        model_summary("resnet50_v1", 1, 0)


@pytest.mark.parametrize("arch", arch_names())
def test_the_endpoints_trait_lists_what_forward_returns_in_order(arch):
    from ssltk.registry import ARCHS as BACKBONES

    rows = model_summary(arch, 1, 64)
    assert tuple(row.endpoint for row in rows) == BACKBONES.member(arch).endpoints
