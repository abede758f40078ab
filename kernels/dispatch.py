"""Choosing between a Triton kernel and its torch reference.

The kernel runs on CUDA tensors and the reference on CPU tensors. ``SSLTK_KERNELS`` overrides it:
``triton`` forces the kernel (on CPU this needs ``TRITON_INTERPRET=1``), ``torch`` forces the
reference, ``auto`` (the default) picks by device. Tensors that autograd is recording always take
the reference: the kernels have no backward formula.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_MODES = ("auto", "triton", "torch")
_override: str | None = None


def mode() -> str:
    value = _override or os.environ.get("SSLTK_KERNELS", "auto")
    if value not in _MODES:
        raise ValueError(f"SSLTK_KERNELS={value!r}: expected one of {', '.join(_MODES)}")
    return value


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernel should run for these tensors."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    chosen = mode()
    if chosen == "auto":
        return all(t.is_cuda for t in tensors)
    return chosen == "triton"


@contextmanager
def force(value: str) -> Iterator[None]:
    """Temporarily force ``auto``, ``triton`` or ``torch`` (for tests and benchmarks)."""
    global _override
    if value not in _MODES:
        raise ValueError(f"kernel mode {value!r}: expected one of {', '.join(_MODES)}")
    previous, _override = _override, value
    try:
        yield
    finally:
        _override = previous


def fuse_conv1x1(h: torch.Tensor) -> bool:
    """Whether F's last 1×1 conv runs inside the Triton coupling kernel, given that kernel runs:
    in 16-bit only, because in fp32 the kernel's IEEE-fp32 GEMM is ~10× slower than cuDNN's conv
    followed by the coupling kernel (reports/revnet_kernels.md)."""
    return h.dtype in (torch.float16, torch.bfloat16)
