"""RevNet coupling kernels against their torch reference (Triton interpreter on CPU, or CUDA)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssltk.kernels import dispatch, revnet_coupling
from ssltk.kernels.revnet_coupling import coupling, coupling_conv1x1

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


def reference(fn, *args, **kwargs) -> torch.Tensor:
    with dispatch.force("torch"):
        return fn(*args, **kwargs)


@needs_interpreter
@settings(max_examples=12, deadline=None)
@given(
    shape=shapes,
    layout=st.sampled_from(LAYOUTS),
    f_layout=st.sampled_from(LAYOUTS),
    dtypes=st.sampled_from(DTYPE_PAIRS),
    seed=st.integers(0, 2**31 - 1),
)
def test_coupling_kernel_equals_reference(shape, layout, f_layout, dtypes, seed):
    n, half, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    x = make((n, 2 * half, h, w), layout, gen, dtype=dtypes[0])
    fx = make((n, half, h, w), f_layout, gen, dtype=dtypes[1])
    with dispatch.force("triton"):
        y = coupling(x, fx)
        back = coupling(y, fx, inverse=True)
    assert y.is_contiguous()
    assert y.dtype == torch.result_type(x, fx)
    # Bit-identical to the reference in every dtype, bf16 rounding included.
    assert torch.equal(y, reference(coupling, x, fx))
    assert torch.equal(back, reference(coupling, y, fx, inverse=True))
    assert torch.equal(back[:, half:], x[:, half:].to(back.dtype))


@needs_interpreter
@settings(max_examples=10, deadline=None)
@given(
    shape=shapes,
    k_dim=st.integers(1, 40),
    layout=st.sampled_from(LAYOUTS),
    h_layout=st.sampled_from(LAYOUTS),
    h_dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_conv_coupling_equals_reference(shape, k_dim, layout, h_layout, h_dtype, seed):
    n, half, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    x = make((n, 2 * half, h, w), layout, gen)
    hidden = make((n, k_dim, h, w), h_layout, gen, dtype=h_dtype)
    weight = torch.randn(2 * half, k_dim, 1, 1, generator=gen)[::2]  # non-contiguous weight
    with dispatch.force("triton"):
        y = coupling_conv1x1(x, hidden, weight)
        back = coupling_conv1x1(y, hidden, weight, inverse=True)
    expected = reference(coupling_conv1x1, x, hidden, weight)
    assert y.dtype == back.dtype == torch.float32  # the fp32 stream stays fp32
    assert torch.equal(y[:, :half], x[:, half:])
    assert torch.equal(back[:, half:], y[:, :half])
    # Both round the conv to 16 bits; fp32 accumulation order may move that rounding by one ulp.
    fx = expected[:, half:] - x[:, :half]
    ulp = torch.finfo(h_dtype).eps * (fx.abs().max().item() + 1e-30)
    torch.testing.assert_close(y, expected, rtol=0, atol=ulp)
    # Same kernel both ways: the fp32 stream is recovered up to one fp32 rounding of x1 + fx.
    torch.testing.assert_close(back, x, rtol=0, atol=1e-6 * (1 + y.abs().max().item()))


@needs_interpreter
def test_fp32_conv_coupling_takes_torch_conv_and_coupling_kernel(monkeypatch):
    def no_fused_kernel(*_):
        raise AssertionError("the fused fp32 kernel ran")

    monkeypatch.setattr(revnet_coupling, "_launch_coupling_conv1x1", no_fused_kernel)
    launched = []
    launch = revnet_coupling._launch_coupling
    monkeypatch.setattr(
        revnet_coupling, "_launch_coupling", lambda *a: launched.append(1) or launch(*a)
    )
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 16, 5, 3, generator=gen)
    hidden = torch.randn(2, 6, 5, 3, generator=gen)
    weight = torch.randn(8, 6, 1, 1, generator=gen)
    with dispatch.force("triton"):
        y = coupling_conv1x1(x, hidden, weight)
    assert launched == [1]
    assert torch.equal(y, reference(coupling_conv1x1, x, hidden, weight))  # same conv, same add


def test_coupling_is_differentiable_even_where_kernels_are_forced():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    fx = torch.randn(2, 3, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, 1, 1, generator=gen, dtype=torch.float64, requires_grad=True)
    with dispatch.force("triton"):  # tensors autograd records take the reference
        assert torch.autograd.gradcheck(coupling, (x, fx))
        assert torch.autograd.gradcheck(lambda y, f: coupling(y, f, inverse=True), (x, fx))
        assert torch.autograd.gradcheck(coupling_conv1x1, (x, hidden, weight))


def test_inverse_undoes_coupling():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 3, 3, generator=gen)
    fx = torch.randn(2, 4, 3, 3, generator=gen)
    y = coupling(x, fx)
    assert torch.equal(y[:, :4], x[:, 4:])
    assert torch.equal(y[:, 4:], x[:, :4] + fx)
    torch.testing.assert_close(coupling(y, fx, inverse=True), x, rtol=0, atol=1e-6)


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
    with dispatch.force("triton"), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        y = coupling(x, fx)
        back = coupling(y, fx, inverse=True)
        yc = coupling_conv1x1(x, hidden, weight)
        backc = coupling_conv1x1(yc, hidden, weight, inverse=True)
    assert torch.equal(y, reference(coupling, x, fx))
    assert torch.equal(back, reference(coupling, y, fx, inverse=True))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        ref = reference(coupling_conv1x1, x, hidden, weight)
        ref_back = reference(coupling_conv1x1, yc, hidden, weight, inverse=True)
    # fp32: cuDNN's conv, then the coupling kernel (the same arithmetic). bf16: the fused GEMM.
    tol = 1e-5 if dtype == torch.float32 else 2.0**-7 * ref.abs().max().item()
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
        y = coupling(x, fx)
    assert y[-1, -1, -1, -1].item() == 1.5
    assert y[-1, half - 1, -1, -1].item() == 5.0
    assert (y[:, :half] != 2.0).sum().item() == 1
    assert torch.all(y[:, half:] == 1.5).item()
