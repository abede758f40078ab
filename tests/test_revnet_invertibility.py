"""Property tests: every reversible unit and stage is invertible in fp32.

Tolerance: |inverse(forward(x)) - x| ≤ 1e-5 + 1e-5·|x| elementwise. The only rounding is in
x1 + F(x2) - F(x2), so the error is a few ulps of |F(x2)| (≈1 here); 1e-5 leaves ample margin.

BatchNorm in F: in eval mode it uses running statistics, so F is a fixed function. In train mode
it normalises with the batch statistics of its input x2; the inverse feeds F the very same tensor
(y1 = x2, bit-identical because the forward copies it unchanged), so both directions see the same
statistics and F computes the same values. The running statistics are updated twice, which does
not affect the outputs of a train-mode call.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssltk.kernels.revnet_coupling import coupling
from ssltk.models.revnet import ReversibleStage, ReversibleUnit

TOL = {"rtol": 1e-5, "atol": 1e-5}

shapes = st.fixed_dictionaries(
    {
        "channels": st.sampled_from([8, 16, 24, 40, 64]),
        "batch": st.integers(1, 4),
        "side": st.integers(2, 7),
        "train": st.booleans(),
        "seed": st.integers(0, 2**31 - 1),
        "scale": st.sampled_from([0.1, 1.0, 10.0]),
    }
)


def _setup(params: dict, depth: int | None = None):
    torch.manual_seed(params["seed"])
    c = params["channels"]
    module = ReversibleUnit(c) if depth is None else ReversibleStage(c, depth, memory_saving=False)
    # Non-trivial running statistics and affine parameters, so eval mode is not the identity BN.
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)
    module.train(params["train"])
    x = params["scale"] * torch.randn(params["batch"], c, params["side"], params["side"])
    return module, x


@settings(max_examples=30, deadline=None)
@given(shapes)
def test_unit_inverse_undoes_forward(params):
    unit, x = _setup(params)
    with torch.no_grad():
        y = unit(x)
        torch.testing.assert_close(unit.inverse(y), x, **TOL)
        torch.testing.assert_close(unit(unit.inverse(y)), y, **TOL)


@settings(max_examples=30, deadline=None)
@given(shapes)
def test_unit_forward_undoes_inverse(params):
    unit, y = _setup(params)
    with torch.no_grad():
        x = unit.inverse(y)
        torch.testing.assert_close(unit(x), y, **TOL)


@settings(max_examples=15, deadline=None)
@given(shapes, st.integers(1, 4))
def test_stage_is_invertible(params, depth):
    stage, x = _setup(params, depth)
    # fp32 rounding of each unit's residual adds up over the units (a wrong inverse is O(1) off).
    tol = {"rtol": 1e-5 * (depth + 1), "atol": 1e-5 * (depth + 1)}
    with torch.no_grad():
        y = stage(x)
        torch.testing.assert_close(stage.inverse(y), x, **tol)
        torch.testing.assert_close(stage(stage.inverse(y)), y, **tol)


@settings(max_examples=20, deadline=None)
@given(shapes)
def test_unit_is_the_swapped_additive_coupling(params):
    unit, x = _setup(params)
    half = params["channels"] // 2
    with torch.no_grad():
        y = unit(x)
        fx = unit.f(x[:, half:])
    assert torch.equal(y[:, :half], x[:, half:])  # x2 passes through bit-exactly
    assert torch.equal(y[:, half:], x[:, :half] + fx)
    assert torch.equal(y, coupling(x, fx))


def test_unit_rejects_channels_not_divisible_by_8():
    with pytest.raises(ValueError, match="channels=12"):
        ReversibleUnit(12)
