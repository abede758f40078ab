"""RevNet coupling kernels against their torch references (Triton interpreter on CPU, or CUDA)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import dispatch
from kernels.revnet_coupling import (
    couple,
    couple_conv1x1,
    couple_conv1x1_reference,
    couple_reference,
    uncouple,
    uncouple_conv1x1,
    uncouple_conv1x1_reference,
    uncouple_reference,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1"
)
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LAYOUTS = ("contiguous", "channels_last", "sliced", "transposed")
# (coupling stream, F output): fp32 throughout, bf16 autocast (fp32 stream), all bf16, fp16.
DTYPE_PAIRS = (
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
)


def make(
    shape: tuple[int, ...], layout: str, gen: torch.Generator, dtype=torch.float32, device="cpu"
) -> torch.Tensor:
    """A tensor of ``shape`` with the given memory layout (values from ``gen``)."""
    n, c, h, w = shape

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    if layout == "channels_last":
        out = randn(n, c, h, w).to(memory_format=torch.channels_last)
    elif layout == "sliced":  # every other column of a wider tensor: non-unit pixel stride
        out = randn(n, c, h, 2 * w)[..., ::2]
    elif layout == "transposed":  # H and W swapped in memory
        out = randn(n, c, w, h).transpose(2, 3)
    else:
        out = randn(n, c, h, w)
    if layout != "contiguous" and min(shape) > 1:
        assert not out.is_contiguous()
    return out


shapes = st.tuples(
    st.integers(1, 3),  # N
    st.integers(1, 40),  # C / 2
    st.integers(1, 9),  # H
    st.integers(1, 11),  # W
)


@needs_interpreter
@settings(max_examples=12, deadline=None)
@given(
    shape=shapes,
    layout=st.sampled_from(LAYOUTS),
    f_layout=st.sampled_from(LAYOUTS),
    dtypes=st.sampled_from(DTYPE_PAIRS),
    seed=st.integers(0, 2**31 - 1),
)
def test_coupling_kernels_equal_reference(shape, layout, f_layout, dtypes, seed):
    n, half, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    x = make((n, 2 * half, h, w), layout, gen, dtype=dtypes[0])
    fx = make((n, half, h, w), f_layout, gen, dtype=dtypes[1])
    with dispatch.force("triton"):
        y = couple(x, fx)
        back = uncouple(y, fx)
    assert y.is_contiguous()
    assert y.dtype == torch.result_type(x, fx)
    # Bit-identical to the reference in every dtype, bf16 rounding included.
    assert torch.equal(y, couple_reference(x, fx))
    assert torch.equal(back, uncouple_reference(y, fx))
    assert torch.equal(back[:, half:], x[:, half:].to(back.dtype))


@needs_interpreter
@settings(max_examples=10, deadline=None)
@given(
    shape=shapes,
    k_dim=st.integers(1, 40),
    layout=st.sampled_from(LAYOUTS),
    h_layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_conv_coupling_equals_reference(shape, k_dim, layout, h_layout, seed):
    n, half, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    x = make((n, 2 * half, h, w), layout, gen)
    hidden = make((n, k_dim, h, w), h_layout, gen)
    weight = torch.randn(2 * half, k_dim, 1, 1, generator=gen)[::2]  # non-contiguous weight
    with dispatch.force("triton"):
        y = couple_conv1x1(x, hidden, weight)
        back = uncouple_conv1x1(y, hidden, weight)
    torch.testing.assert_close(y, couple_conv1x1_reference(x, hidden, weight), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        back, uncouple_conv1x1_reference(y, hidden, weight), rtol=1e-5, atol=1e-5
    )
    assert torch.equal(y[:, :half], x[:, half:])
    assert torch.equal(back[:, half:], y[:, :half])


@needs_interpreter
@settings(max_examples=6, deadline=None)
@given(shape=shapes, k_dim=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_fused_conv_coupling_bf16_hidden_keeps_fp32_stream(shape, k_dim, seed):
    n, half, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    x = make((n, 2 * half, h, w), "contiguous", gen)
    hidden = make((n, k_dim, h, w), "channels_last", gen, dtype=torch.bfloat16)
    weight = torch.randn(half, k_dim, 1, 1, generator=gen)
    with dispatch.force("triton"):
        y = couple_conv1x1(x, hidden, weight)
        back = uncouple_conv1x1(y, hidden, weight)
    expected = couple_conv1x1_reference(x, hidden, weight)
    assert y.dtype == back.dtype == torch.float32
    # Both round the conv to bf16; fp32 accumulation order may move that rounding by one ulp.
    fx = expected[:, half:] - x[:, :half]
    ulp = 2.0**-7 * (fx.abs().max().item() + 1e-30)
    torch.testing.assert_close(y, expected, rtol=0, atol=ulp)
    # Same kernel both ways: the fp32 stream is recovered up to one fp32 rounding of x1 + fx.
    torch.testing.assert_close(back, x, rtol=0, atol=1e-6 * (1 + y.abs().max().item()))


def test_coupling_gradients_match_autograd_of_reference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    fx = torch.randn(2, 3, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, 1, 1, generator=gen, dtype=torch.float64, requires_grad=True)
    with dispatch.force("torch"):
        assert torch.autograd.gradcheck(couple, (x, fx))
        assert torch.autograd.gradcheck(uncouple, (x, fx))
        assert torch.autograd.gradcheck(couple_conv1x1, (x, hidden, weight))
        assert torch.autograd.gradcheck(uncouple_conv1x1, (x, hidden, weight))


def test_custom_ops_pass_opcheck():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 3, 5, generator=gen, requires_grad=True)
    fx = torch.randn(2, 4, 3, 5, generator=gen, requires_grad=True)
    hidden = torch.randn(2, 3, 3, 5, generator=gen, requires_grad=True)
    weight = torch.randn(4, 3, 1, 1, generator=gen, requires_grad=True)
    ops = torch.ops.ssltk
    for op, args in (
        (ops.revnet_couple.default, (x, fx)),
        (ops.revnet_uncouple.default, (x, fx)),
        (ops.revnet_couple_conv1x1.default, (x, hidden, weight)),
        (ops.revnet_uncouple_conv1x1.default, (x, hidden, weight)),
    ):
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_torch_compile_traces_ops_as_single_nodes():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 3, 3, generator=gen)
    hidden = torch.randn(2, 3, 3, 3, generator=gen)
    weight = torch.randn(4, 3, 1, 1, generator=gen)

    def roundtrip(x, hidden, weight):
        return uncouple_conv1x1(couple_conv1x1(x, hidden, weight), hidden, weight)

    compiled = torch.compile(roundtrip, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, hidden, weight), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: couple(torch.zeros(2, 5, 3, 3), torch.zeros(2, 2, 3, 3)), "x: channel count"),
        (lambda: couple(torch.zeros(2, 4, 3), torch.zeros(2, 2, 3)), "x: expected a 4-d"),
        (lambda: uncouple(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)), r"fx: expected shape"),
        (
            lambda: couple(torch.zeros(2, 4, 3, 3, dtype=torch.int64), torch.zeros(2, 2, 3, 3)),
            "x: expected a floating-point",
        ),
        (
            lambda: couple_conv1x1(
                torch.zeros(2, 4, 3, 3), torch.zeros(2, 3, 3, 2), torch.zeros(2, 3, 1, 1)
            ),
            "h: expected shape",
        ),
        (
            lambda: couple_conv1x1(
                torch.zeros(2, 4, 3, 3), torch.zeros(2, 3, 3, 3), torch.zeros(2, 3, 3, 3)
            ),
            "weight: expected a 1×1",
        ),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@cuda
@needs_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_equal_reference(layout, dtype):
    gen = torch.Generator().manual_seed(3)
    n, half, h, w, k_dim = 5, 67, 13, 15, 45  # none a multiple of a block size
    x = make((n, 2 * half, h, w), layout, gen, device="cuda")
    fx = make((n, half, h, w), layout, gen, dtype=dtype, device="cuda")
    hidden = make((n, k_dim, h, w), layout, gen, dtype=dtype, device="cuda")
    weight = torch.randn(half, k_dim, 1, 1, generator=gen).cuda()
    with dispatch.force("triton"):
        y = couple(x, fx)
        back = uncouple(y, fx)
        yc = couple_conv1x1(x, hidden, weight)
        backc = uncouple_conv1x1(yc, hidden, weight)
    assert torch.equal(y, couple_reference(x, fx))
    assert torch.equal(back, uncouple_reference(y, fx))
    with torch.backends.cudnn.flags(allow_tf32=False):
        ref = couple_conv1x1_reference(x, hidden, weight)
        ref_back = uncouple_conv1x1_reference(yc, hidden, weight)
    tol = 1e-4 if dtype == torch.float32 else 2.0**-7 * ref.abs().max().item()
    torch.testing.assert_close(yc, ref, rtol=0, atol=tol)
    torch.testing.assert_close(backc, ref_back, rtol=0, atol=tol)


@cuda
@needs_cuda
def test_cuda_coupling_indexes_past_int32():
    # 2**31 + elements per tensor: offsets overflow int32 unless the kernel indexes in int64.
    n, half, h, w = 2, 8, 8192, 8200
    try:
        x = torch.empty(n, 2 * half, h, w, device="cuda")
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory for a 2**31-element tensor")
    assert x.numel() > 2**31
    x[:, :half].fill_(1.0)
    x[:, half:].fill_(2.0)
    x[-1, -1, -1, -1] = 5.0
    fx = torch.full((n, half, h, w), 0.5, device="cuda")
    with dispatch.force("triton"):
        y = couple(x, fx)
    assert y[-1, -1, -1, -1].item() == 1.5
    assert y[-1, half - 1, -1, -1].item() == 5.0
    assert (y[:, :half] != 2.0).sum().item() == 1
    assert torch.all(y[:, half:] == 1.5).item()
