"""Memory-saving reversible backward against plain autograd.

Tolerances (fp32): gradient angle < 0.1° and relative norm error < 1e-4. Memory saving rebuilds
each unit's input from its output, exact up to one fp32 rounding of ``x1 + F(x2) - F(x2)`` per
unit; the forward pass itself is the same computation as the plain model's, so outputs and BN
running statistics are bit-identical.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ssltk.kernels import dispatch
from ssltk.models import build_model
from ssltk.models.layers import ZeroPadMaxPool
from ssltk.models.reversible import (
    invert_sequence,
    pack_signs,
    reversible_sequence,
    unpack_signs,
)
from ssltk.models.revnet import (
    CompactZeroPadMaxPool,
    PoolAndPadChannels,
    ReversibleStage,
    ReversibleUnit,
    RevNetStem,
)

MAX_ANGLE_DEG = 0.1
MAX_REL_ERR = 1e-4


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    cos = torch.dot(a, b) / (a.norm() * b.norm())
    return math.degrees(math.acos(min(1.0, max(-1.0, cos.item()))))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / a.double().norm()).item()


def assert_grads_agree(
    plain: torch.Tensor, saving: torch.Tensor, max_angle=MAX_ANGLE_DEG, max_rel=MAX_REL_ERR
) -> None:
    assert angle_deg(plain, saving) < max_angle
    assert rel_err(plain, saving) < max_rel


def flat_grads(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters()])


def randomize_norms(module: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN affine parameters and running statistics."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.weight.uniform_(0.5, 1.5, generator=gen)
                bn.bias.uniform_(-0.5, 0.5, generator=gen)
                bn.running_mean.uniform_(-1, 1, generator=gen)
                bn.running_var.uniform_(0.5, 2, generator=gen)


def assert_same_buffers(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        assert torch.equal(x, y), name


def stage_pair(channels: int, depth: int, entry: bool, seed: int):
    torch.manual_seed(seed)
    plain = ReversibleStage(
        channels, depth, entry=PoolAndPadChannels(2) if entry else None, memory_saving=False
    )
    randomize_norms(plain, torch.Generator().manual_seed(seed))
    saving = copy.deepcopy(plain)
    saving.memory_saving = True
    return plain.train(), saving.train()


def run_step(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, input_grad: bool):
    x = x.clone().requires_grad_(input_grad)
    y = module(x)
    (y * weight).sum().backward()
    return y.detach(), x.grad


@settings(max_examples=10, deadline=None)
@given(
    channels=st.sampled_from([8, 16, 24, 32]),
    depth=st.integers(1, 3),
    batch=st.integers(2, 4),
    side=st.integers(2, 5),
    entry=st.booleans(),
    input_grad=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_stage_gradients_match_plain_autograd(
    channels, depth, batch, side, entry, input_grad, seed
):
    plain, saving = stage_pair(channels, depth, entry, seed)
    gen = torch.Generator().manual_seed(seed)
    in_channels = channels // 2 if entry else channels
    x = torch.randn(batch, in_channels, 2 * side if entry else side, side, generator=gen)
    out_shape = (batch, channels, side, (side + 1) // 2 if entry else side)
    weight = torch.randn(out_shape, generator=gen)

    y_plain, gx_plain = run_step(plain, x, weight, input_grad)
    y_saving, gx_saving = run_step(saving, x, weight, input_grad)

    assert torch.equal(y_plain, y_saving)  # same forward computation
    assert_same_buffers(plain, saving)  # running stats updated once, identically
    assert_grads_agree(flat_grads(plain), flat_grads(saving))
    if input_grad:
        assert_grads_agree(gx_plain, gx_saving)
    else:
        assert gx_saving is None


def test_single_unit_matches_its_own_forward():
    torch.manual_seed(0)
    unit = ReversibleUnit(16)
    randomize_norms(unit, torch.Generator().manual_seed(0))
    twin = copy.deepcopy(unit)
    x = torch.randn(3, 16, 4, 4)
    weight = torch.randn(3, 16, 4, 4)
    y_plain, gx_plain = run_step(unit, x, weight, True)
    xs = x.clone().requires_grad_()
    y_saving = reversible_sequence(xs, [twin])
    (y_saving * weight).sum().backward()
    assert torch.equal(y_plain, y_saving.detach())
    assert_grads_agree(gx_plain, xs.grad)
    assert_grads_agree(flat_grads(unit), flat_grads(twin))
    assert_same_buffers(unit, twin)


def test_revnet50_gradients_and_running_stats_match_plain():
    torch.manual_seed(0)
    plain = build_model("revnet50", widening=1, num_classes=10, memory_saving=False)
    saving = build_model("revnet50", widening=1, num_classes=10, memory_saving=True)
    saving.load_state_dict(plain.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (4,), generator=gen)
    for model in (plain, saving):
        F.cross_entropy(model(x)["logits"], labels).backward()
    for name, p in saving.named_parameters():
        assert p.grad is not None, name
    assert_grads_agree(flat_grads(plain), flat_grads(saving))
    assert_same_buffers(plain, saving)


def test_bf16_autocast_keeps_fp32_stream_and_close_gradients():
    plain, saving = stage_pair(32, 3, entry=False, seed=3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32, 6, 6, generator=gen)
    weight = torch.randn(4, 32, 6, 6, generator=gen)
    results = []
    for module in (plain, saving):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(run_step(module, x, weight, True))
    (y_plain, gx_plain), (y_saving, gx_saving) = results
    assert y_saving.dtype == torch.float32
    assert torch.equal(y_plain, y_saving)
    # F runs in bf16, so a reconstruction error of a few fp32 ulps could flip a bf16 rounding in
    # the recomputed F; with the fp32 stream that stays rare enough for the fp32 tolerances.
    assert_grads_agree(gx_plain, gx_saving)
    assert_grads_agree(flat_grads(plain), flat_grads(saving))


def test_bf16_stage_input_is_upcast_under_autocast():
    _, saving = stage_pair(16, 2, entry=False, seed=4)
    x = torch.randn(2, 16, 3, 3).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = saving(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


def test_eval_mode_with_grad_matches_plain():
    plain, saving = stage_pair(16, 2, entry=True, seed=5)
    plain.eval()
    saving.eval()
    x = torch.randn(2, 8, 6, 6)
    weight = torch.randn(2, 16, 3, 3)
    y_plain, gx_plain = run_step(plain, x, weight, True)
    y_saving, gx_saving = run_step(saving, x, weight, True)
    assert torch.equal(y_plain, y_saving)
    assert_grads_agree(gx_plain, gx_saving)
    assert_grads_agree(flat_grads(plain), flat_grads(saving))


class ConvBnUnit(nn.Module):
    """A reversible unit whose F is not a Sequential: exercises the unfused path."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.f = ConvBn(channels // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[1] // 2
        return torch.cat([x[:, half:], x[:, :half] + self.f(x[:, half:])], dim=1)


class ConvBn(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.norm(self.conv(x)))


def test_generic_residual_function_matches_plain():
    torch.manual_seed(6)
    units = nn.ModuleList(ConvBnUnit(8) for _ in range(3))
    twins = copy.deepcopy(units)
    x = torch.randn(2, 8, 4, 4)
    weight = torch.randn(2, 8, 4, 4)
    xp = x.clone().requires_grad_()
    y = xp
    for unit in units:
        y = unit(y)
    (y * weight).sum().backward()
    xs = x.clone().requires_grad_()
    (reversible_sequence(xs, twins) * weight).sum().backward()
    assert_grads_agree(xp.grad, xs.grad)
    assert_grads_agree(flat_grads(units), flat_grads(twins))
    assert_same_buffers(units, twins)


def test_each_parameter_gradient_is_accumulated_exactly_once():
    _, saving = stage_pair(16, 3, entry=False, seed=7)
    counts: dict[str, int] = {}
    for name, p in saving.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda _, name=name: counts.__setitem__(name, counts.get(name, 0) + 1)
        )
    saving(torch.randn(2, 16, 3, 3, requires_grad=True)).sum().backward()
    assert counts == {name: 1 for name, _ in saving.named_parameters()}


def test_residual_function_runs_without_tf32_and_the_flag_is_restored():
    _, saving = stage_pair(16, 2, entry=False, seed=11)
    seen: list[bool] = []
    for module in saving.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda *_: seen.append(torch.backends.cudnn.allow_tf32))
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        saving(torch.randn(2, 16, 3, 3, requires_grad=True)).sum().backward()
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32 = previous
    # 2 units × (2 hooked convs before the fused last one) × (forward + recomputation)
    assert seen == [False] * 8


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while ``fn`` runs (each storage counted once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.sum().backward()
    return sum(storages.values())


@pytest.mark.parametrize("depth", [2, 6])
def test_saved_memory_is_stage_output_and_one_bit_per_relu_input(depth):
    plain, saving = stage_pair(16, depth, entry=False, seed=8)
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    tensor_bytes = x.numel() * x.element_size()
    pixels = 2 * 5 * 5
    # F's three ReLUs see 16/2, 16/8 and 16/8 channels; each input sign is one bit.
    sign_bytes = sum(math.ceil(c * pixels / 8) for c in (8, 2, 2))
    assert saved_bytes(lambda: saving(x)) == tensor_bytes + depth * sign_bytes
    assert saved_bytes(lambda: plain(x)) > depth * tensor_bytes


def bn_inputs_of_first_unit(units: nn.ModuleList, x: torch.Tensor, **kwargs) -> list:
    """What the first unit's first BN sees: in the forward pass, then in the recomputation."""
    seen: list[torch.Tensor] = []
    handle = units[0].f[0].register_forward_pre_hook(lambda _, a: seen.append(a[0].detach()))
    try:
        reversible_sequence(x.clone().requires_grad_(), units, **kwargs).sum().backward()
    finally:
        handle.remove()
    return seen


def test_zero_padded_channels_are_exactly_zero_again_when_f_is_recomputed():
    _, saving = stage_pair(32, 4, entry=True, seed=12)
    x = saving.entry(torch.randn(4, 16, 6, 6, generator=torch.Generator().manual_seed(12)))
    zeros = PoolAndPadChannels.zero_channels(32)
    # F of the first unit sees x2 = channels 16..31, of which 24..31 are padding.
    forward, recomputed = bn_inputs_of_first_unit(saving.units, x, zero_channels=zeros)
    assert not forward[:, 8:].any()
    assert torch.equal(recomputed[:, 8:], forward[:, 8:])
    torch.testing.assert_close(recomputed[:, :8], forward[:, :8], rtol=0, atol=1e-5)
    # Control: without the hint, reconstruction leaves noise in those channels.
    _, noisy = bn_inputs_of_first_unit(saving.units, x)
    assert noisy[:, 8:].any()


def test_zero_channels_outside_the_x2_half_change_nothing():
    _, saving = stage_pair(16, 3, entry=False, seed=13)
    x = torch.randn(2, 16, 3, 3)
    x[:, :4] = 0  # in x1, which no F of the first unit sees
    hinted = copy.deepcopy(saving.units)
    xs, xh = x.clone().requires_grad_(), x.clone().requires_grad_()
    reversible_sequence(xs, saving.units).square().sum().backward()
    reversible_sequence(xh, hinted, zero_channels=[slice(0, 4)]).square().sum().backward()
    assert torch.equal(xs.grad, xh.grad)
    assert torch.equal(flat_grads(saving.units), flat_grads(hinted))


@pytest.mark.parametrize(
    ("zero_channels", "match"),
    [
        ([(0, 4)], r"zero_channels\[0\]: expected a slice"),
        ([slice(0, 4), slice(8, 16, 2)], r"zero_channels\[1\]: expected a step of 1"),
    ],
)
def test_bad_zero_channels_raise_clear_errors(zero_channels, match):
    with pytest.raises(ValueError, match=match):
        reversible_sequence(
            torch.zeros(1, 16, 2, 2), [ReversibleUnit(16)], zero_channels=zero_channels
        )


def test_pool_and_pad_names_its_zero_channels():
    x = torch.randn(2, 8, 4, 4) + 3
    out = PoolAndPadChannels(2)(x)
    zeros = PoolAndPadChannels.zero_channels(out.shape[1])
    mask = torch.zeros(out.shape[1], dtype=torch.bool)
    for channels in zeros:
        mask[channels] = True
    assert mask.sum() == 8
    assert not out[:, mask].any() and out[:, ~mask].ne(0).all()


def pool_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(14)
    ties = torch.randint(-2, 3, (2, 3, 9, 8), generator=gen).float()  # many equal maxima
    nan = torch.randn(2, 3, 6, 6, generator=gen)
    nan[0, 1, 2, 3] = float("nan")
    return {
        "normal": torch.randn(2, 3, 7, 10, generator=gen),
        "negative": -torch.rand(2, 3, 5, 5, generator=gen) - 1,  # the zero border wins
        "ties": ties,
        "zeros": torch.zeros(1, 2, 6, 7),  # ties between the border and the image everywhere
        "channels_last": torch.randn(2, 4, 8, 8, generator=gen).to(
            memory_format=torch.channels_last
        ),
        "unbatched": torch.randn(3, 6, 5, generator=gen),
        "nan": nan,
    }


@pytest.mark.parametrize("case", list(pool_inputs()))
def test_compact_max_pool_is_bit_identical_to_zero_pad_max_pool(case):
    x = pool_inputs()[case]
    plain_x, compact_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = CompactZeroPadMaxPool()(compact_x)
    expected, flat = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), 3, 2, return_indices=True)
    plain_out = ZeroPadMaxPool()(plain_x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0, equal_nan=True)
    # One int8 per output, the window position (row-major) of the index torch's kernel chose.
    (position,) = saved
    assert position.dtype == torch.int8 and position.shape == out.shape
    width = x.shape[-1] + 2
    rows = torch.arange(out.shape[-2])[:, None]
    cols = torch.arange(out.shape[-1])
    expected_position = (flat // width - 2 * rows) * 3 + (flat % width - 2 * cols)
    assert torch.equal(position.long(), expected_position)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(15))
    (out * grad).sum().backward()
    (plain_out * grad).sum().backward()
    assert torch.equal(compact_x.grad, plain_x.grad)


def test_compact_max_pool_saves_one_byte_per_output_in_memory_saving_mode_only():
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    assert saved_bytes(lambda: CompactZeroPadMaxPool(memory_saving=False)(x)) > x.nbytes
    assert saved_bytes(lambda: CompactZeroPadMaxPool()(x)) == 3 * 3 * 2  # one byte per output
    with torch.no_grad():
        assert torch.equal(CompactZeroPadMaxPool()(x), ZeroPadMaxPool()(x))


def test_revnet50_stem_pool_follows_memory_saving():
    for memory_saving in (True, False):
        model = build_model("revnet50", widening=1, num_classes=None, memory_saving=memory_saving)
        assert isinstance(model.root[1], CompactZeroPadMaxPool)
        assert model.root[1].memory_saving is memory_saving


def test_invert_sequence_reconstructs_input_without_touching_running_stats():
    _, saving = stage_pair(24, 4, entry=False, seed=9)
    x = torch.randn(3, 24, 5, 5)
    with torch.no_grad():
        y = saving(x)
    before = copy.deepcopy(saving)
    reconstructed = invert_sequence(y, saving.units)
    torch.testing.assert_close(reconstructed, x, rtol=0, atol=1e-5)
    assert_same_buffers(before, saving)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1",
)
@pytest.mark.parametrize("bf16", [False, True])
def test_kernels_in_memory_saving_backward_match_plain(bf16):
    """fp32: torch's conv, then the coupling kernel; bf16 autocast: the fused conv + coupling."""
    plain, saving = stage_pair(16, 2, entry=True, seed=10)
    x = torch.randn(2, 8, 4, 4)
    weight = torch.randn(2, 16, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y_plain, gx_plain = run_step(plain, x, weight, True)
        with dispatch.force("triton"):
            y_saving, gx_saving = run_step(saving, x, weight, True)
    # bf16: the fused GEMM accumulates in another order than oneDNN's bf16 conv.
    tol, limits = ((1e-2, 1e-2), (MAX_ANGLE_DEG, 1e-3)) if bf16 else ((1e-5, 1e-5), ())
    torch.testing.assert_close(y_saving, y_plain.float(), rtol=tol[0], atol=tol[1])
    assert_grads_agree(gx_plain, gx_saving, *limits)
    assert_grads_agree(flat_grads(plain), flat_grads(saving), *limits)


@pytest.mark.parametrize(
    ("units", "x", "match"),
    [
        ([nn.Conv2d(4, 4, 1)], torch.zeros(1, 4, 2, 2), r"units\[0\]: a reversible unit"),
        ([ReversibleUnit(8)], torch.zeros(1, 7, 2, 2), "x: expected"),
    ],
)
def test_bad_units_or_input_raise_clear_errors(units, x, match):
    with pytest.raises(ValueError, match=match):
        reversible_sequence(x, units)


def test_parameters_outside_f_are_rejected():
    unit = ReversibleUnit(8)
    unit.scale = nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match=r"units\[0\]: has parameters outside"):
        reversible_sequence(torch.zeros(1, 8, 2, 2), [unit])


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_cuda_revnet50_fused_kernels_match_plain(bf16):
    torch.manual_seed(0)
    plain = build_model("revnet50", widening=1, num_classes=10, memory_saving=False).cuda()
    saving = build_model("revnet50", widening=1, num_classes=10, memory_saving=True).cuda()
    saving.load_state_dict(plain.state_dict())
    for module in plain.modules():  # the plain model keeps the fp32 coupling stream too
        if isinstance(module, ReversibleStage):
            module.units[0].register_forward_pre_hook(lambda _, args: (args[0].float(),))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 64, 64, generator=gen).cuda()
    labels = torch.randint(0, 10, (8,), generator=gen).cuda()
    # The fused kernels compute fp32 convs in IEEE fp32; compare with cuDNN doing the same.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for model in (plain, saving):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)["logits"]
            F.cross_entropy(logits.float(), labels).backward()
    # bf16: F's last conv is the fused GEMM, not cuDNN, so its bf16 roundings differ slightly.
    limits = (2.0, 0.05) if bf16 else (MAX_ANGLE_DEG, MAX_REL_ERR)
    for stage in ("block1", "block2", "block3", "block4"):
        grads = [flat_grads(getattr(m, stage)) for m in (plain, saving)]
        assert_grads_agree(*grads, *limits)
    tol = {"rtol": 1e-3, "atol": 1e-4} if bf16 else {"rtol": 1e-4, "atol": 1e-5}
    for (name, a), b in zip(plain.named_buffers(), saving.buffers(), strict=True):
        torch.testing.assert_close(a, b, **tol, msg=name)


@pytest.mark.parametrize("shape", [(3, 5, 7, 2), (1, 1, 1, 1), (2, 8, 4, 4)])
def test_relu_signs_pack_to_one_bit_and_back(shape):
    v = torch.randn(shape, generator=torch.Generator().manual_seed(16))
    v.view(-1)[0] = 0.0  # ReLU passes no gradient at exactly zero: not "positive"
    packed = pack_signs(v)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(v.numel() / 8)
    assert torch.equal(unpack_signs(packed, v), v > 0)
    cl = v.contiguous(memory_format=torch.channels_last)
    assert torch.equal(unpack_signs(pack_signs(cl), cl), v > 0)


def test_gradients_exact_at_real_width_and_size():
    """RevNet50 k=2's third stage at 128 px, batch 32 (512 channels, 8×8, 6 units, entered by
    pool-and-pad). Reconstruction error puts a few ReLU inputs on the wrong side of zero in some
    seeds here (0 and 2); without the stored signs the gradient turned by up to 0.16°."""
    worst = 0.0
    for seed in range(3):
        plain, saving = stage_pair(512, 6, entry=True, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(32, 256, 16, 16, generator=gen)
        weight = torch.randn(32, 512, 8, 8, generator=gen)
        _, gx_plain = run_step(plain, x, weight, True)
        _, gx_saving = run_step(saving, x, weight, True)
        worst = max(
            worst,
            angle_deg(flat_grads(plain), flat_grads(saving)),
            angle_deg(gx_plain, gx_saving),
        )
    assert worst < 0.05


@pytest.mark.parametrize("image_grad", [False, True])
def test_memory_saving_stem_saves_image_and_positions_and_matches_plain(image_grad):
    torch.manual_seed(17)
    plain = RevNetStem(16, 2, memory_saving=False)
    saving = copy.deepcopy(plain)
    saving[1].memory_saving = True
    gen = torch.Generator().manual_seed(17)
    image = torch.randn(10, 3, 21, 18, generator=gen)  # odd and even sides, uneven chunks
    grad = torch.randn(10, 16, 6, 5, generator=gen)
    outs, image_grads = [], []
    for stem in (plain, saving):
        x = image.clone().requires_grad_(image_grad)
        out = stem(x)
        (out * grad).sum().backward()
        outs.append(out.detach())
        image_grads.append(x.grad)
    assert torch.equal(outs[0], outs[1])
    # The weight gradient is summed chunk by chunk, in another order than plain autograd.
    assert rel_err(plain[0].weight.grad, saving[0].weight.grad) < 1e-6
    if image_grad:
        assert rel_err(image_grads[0], image_grads[1]) < 1e-6
    x = image.clone().requires_grad_(image_grad)
    weight_bytes = saving[0].weight.nbytes
    assert saved_bytes(lambda: saving(x)) == image.nbytes + weight_bytes + outs[0].numel()
