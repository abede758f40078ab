"""Memory-saving backpropagation through a stage of reversible units (Gomez et al., 2017).

A unit maps ``x = [x1 | x2]`` to ``y = [x2 | x1 + F(x2)]``. :func:`reversible_sequence` runs a
stage's units inside one autograd Function that keeps only the stage output. Backward walks the
units in reverse and, per unit, runs F **once** with autograd on ``x2 = y1``; that single
recomputation serves both

* reconstruction: ``x1 = y2 - F(y1)``, ``x2 = y1`` (the input of the unit before), and
* gradients: ``torch.autograd.grad`` of F's output gives F's parameter gradients and the gradient
  flowing into ``x2``. Nothing calls ``.backward()`` inside backward, so no parameter's ``.grad``
  is touched there; the Function returns the parameter gradients as gradients of its own inputs
  (the parameters are passed to it), which makes autograd accumulate each exactly once and fire
  DistributedDataParallel's hooks as for any other layer.

When F ends in a plain 1×1 conv (as RevNet's bottleneck does), the conv and the coupling run as the
fused kernels of :mod:`kernels.revnet_coupling`, and the conv's two gradients come straight from
``aten.convolution_backward`` instead of a second autograd pass.

BatchNorm inside F: the forward pass updates the running statistics once, as the plain model does.
The recomputation runs each BN in training mode on batch statistics of its (reconstructed) input
with the running-stat update switched off, so the gradient flows through the batch statistics
exactly as plain autograd differentiates them and the running stats are never updated twice. For
the last unit of a stage the reconstructed input is bit-identical to the forward's, so are the
recomputed statistics; earlier units see the input up to reconstruction rounding, and batch
statistics, being means over N·H·W values, move by far less than that. Reusing the forward's saved
statistics instead would mix values of one input with derivatives at another for no measurable
gain. Units must be deterministic (no dropout).

Autocast: the coupling stream ``x1 + F(x2)`` is kept in fp32 (a bf16 or fp16 stage input is
upcast), so each unit adds one fp32 rounding rather than a bf16 one, which reconstruction could not
undo; F itself runs in the autocast dtype, and backward replays the forward's autocast state so
that F is recomputed in the same dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kernels.revnet_coupling import couple, couple_conv1x1, uncouple, uncouple_conv1x1

__all__ = ["invert_sequence", "reversible_sequence"]


class _Prefix:
    """The layers of F before its last conv, run in order."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        self.layers = tuple(layers)

    def __call__(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers:
            yield from layer.parameters()


def _last_conv1x1(f: nn.Module) -> tuple[_Prefix, nn.Conv2d] | None:
    """``(everything before, last conv)`` when F is a Sequential ending in a plain 1×1 conv."""
    if not isinstance(f, nn.Sequential) or len(f) < 2:
        return None
    *layers, last = f
    plain_1x1 = (
        isinstance(last, nn.Conv2d)
        and last.kernel_size == (1, 1)
        and last.stride == (1, 1)
        and last.padding in ((0, 0), "valid")
        and last.dilation == (1, 1)
        and last.groups == 1
        and last.bias is None
    )
    return (_Prefix(layers), last) if plain_1x1 else None


def _autocast_input(h: Tensor) -> Tensor:
    # What autocast would do to a conv input: fp32 becomes the autocast dtype.
    device = h.device.type
    if torch.is_autocast_enabled(device) and h.dtype == torch.float32:
        return h.to(torch.get_autocast_dtype(device))
    return h


def _conv1x1_grads(grad_fx: Tensor, h: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of ``conv1x1(h, weight)`` w.r.t. ``h`` and ``weight``, in ``h``'s dtype as the
    conv itself ran (then ``weight``'s dtype for its gradient), by the same kernel autograd uses."""
    w = weight.to(h.dtype)
    grad_h, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_fx.to(h.dtype), h, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [True, True, False],
    )  # fmt: skip
    return grad_h, grad_w.to(weight.dtype)


@contextmanager
def _running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Training-mode BN layers use batch statistics but leave their running statistics alone."""
    norms = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def _unit_forward(unit: nn.Module, x: Tensor) -> Tensor:
    half = x.shape[1] // 2
    split = _last_conv1x1(unit.f)
    if split is None:
        return couple(x, unit.f(x[:, half:]))
    prefix, conv = split
    return couple_conv1x1(x, _autocast_input(prefix(x[:, half:])), conv.weight)


def _unit_backward(
    unit: nn.Module, y: Tensor, grad_y: Tensor, x: Tensor | None, need_input_grad: bool
) -> tuple[Tensor, Tensor | None, dict[nn.Parameter, Tensor]]:
    """One unit's input, the gradient w.r.t. it (if ``need_input_grad``) and F's parameter
    gradients, from its output ``y`` and ``grad_y`` with one recomputation of F. The input is
    reconstructed from ``y`` unless it is given as ``x``."""
    half = y.shape[1] // 2
    x2 = (y[:, :half] if x is None else x[:, half:]).detach().requires_grad_(need_input_grad)
    grad_y1, grad_y2 = grad_y[:, :half], grad_y[:, half:]
    split = _last_conv1x1(unit.f)
    with torch.enable_grad(), _running_stats_frozen(unit.f):
        if split is None:
            params = [p for p in unit.f.parameters() if p.requires_grad]
            fx = unit.f(x2)
            if x is None:
                x = uncouple(y, fx.detach())
            root, root_grad, grads = fx, grad_y2, {}
        else:
            prefix, conv = split
            params = [p for p in prefix.parameters() if p.requires_grad]
            h = _autocast_input(prefix(x2))
            if x is None:
                x = uncouple_conv1x1(y, h.detach(), conv.weight)
            grad_h, grad_w = _conv1x1_grads(grad_y2, h.detach(), conv.weight)
            root, root_grad = h, grad_h
            grads = {conv.weight: grad_w} if conv.weight.requires_grad else {}
        inputs = [x2, *params] if need_input_grad else params
        found: Sequence[Tensor | None] = [None] * len(inputs)
        if inputs and root.requires_grad:
            found = torch.autograd.grad(root, inputs, root_grad, allow_unused=True)
    grad_x = None
    if need_input_grad:
        grad_x2, found = found[0], found[1:]
        # d/dx of [x2 | x1 + F(x2)] is again a coupling: [grad_y2 | grad_y1 + dF/dx2 · grad_y2].
        grad_x = torch.cat([grad_y2, grad_y1], 1) if grad_x2 is None else couple(grad_y, grad_x2)
    grads.update((p, g) for p, g in zip(params, found, strict=True) if g is not None)
    return x, grad_x, grads


class _ReversibleSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, units: tuple[nn.Module, ...], *params: nn.Parameter) -> Tensor:
        device = x.device.type
        ctx.units, ctx.params = units, params
        ctx.autocast = (
            device,
            torch.is_autocast_enabled(device),
            torch.get_autocast_dtype(device),
        )
        y = x
        for unit in units:
            y = _unit_forward(unit, y)
        # The stage input is kept too: the first unit's F then sees exactly the forward's input.
        # RevNet zero-pads channels between stages, so that input has all-zero channels whose BN
        # output sits exactly on ReLU's kink; reconstruction leaves ~1e-7 noise there, which
        # would flip the ReLU's derivative and visibly change the gradient.
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        x, y = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        grads: dict[nn.Parameter, Tensor] = {}
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            for i in reversed(range(len(ctx.units))):
                need_input_grad = i > 0 or ctx.needs_input_grad[0]
                known_input = x if i == 0 else None
                y, grad_y, unit_grads = _unit_backward(
                    ctx.units[i], y, grad_y, known_input, need_input_grad
                )
                for p, g in unit_grads.items():
                    grads[p] = grads[p] + g if p in grads else g
        return (grad_y, None, *(grads.get(p) for p in ctx.params))


def _check_units(x: Tensor, units: Sequence[nn.Module]) -> None:
    if x.dim() != 4 or x.shape[1] % 2:
        raise ValueError(f"x: expected [N, C, H, W] with an even C, got shape {tuple(x.shape)}")
    for i, unit in enumerate(units):
        f = getattr(unit, "f", None)
        if not isinstance(f, nn.Module):
            raise ValueError(f"units[{i}]: a reversible unit needs its residual function as `.f`")
        outside = {id(p) for p in unit.parameters()} - {id(p) for p in f.parameters()}
        if outside:
            raise ValueError(
                f"units[{i}]: has parameters outside `.f`, which the reversible backward "
                "would not differentiate"
            )


def reversible_sequence(x: Tensor, units: Sequence[nn.Module]) -> Tensor:
    """Apply reversible ``units`` (each ``y = [x2 | x1 + unit.f(x2)]``) to ``x`` and keep only the
    output for backward; inputs are reconstructed from it unit by unit during backward.

    Gradients equal plain autograd's up to reconstruction rounding. Without autograd (no grad
    mode, or nothing requiring grad) the units simply run.
    """
    units = tuple(units)
    _check_units(x, units)
    if not units:
        return x
    if torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # the coupling stream stays fp32 under autocast (see the module docstring)
    params = list({id(p): p for u in units for p in u.parameters() if p.requires_grad}.values())
    if not torch.is_grad_enabled() or not (x.requires_grad or params):
        with torch.no_grad():
            for unit in units:
                x = _unit_forward(unit, x)
        return x
    return _ReversibleSequence.apply(x, units, *params)


@torch.no_grad()
def invert_sequence(y: Tensor, units: Sequence[nn.Module]) -> Tensor:
    """Reconstruct the input of ``units`` from their output ``y``, the way the memory-saving
    backward does (BN on batch statistics, running statistics untouched)."""
    units = tuple(units)
    _check_units(y, units)
    for unit in reversed(units):
        half = y.shape[1] // 2
        split = _last_conv1x1(unit.f)
        with _running_stats_frozen(unit.f):
            if split is None:
                y = uncouple(y, unit.f(y[:, :half]))
            else:
                prefix, conv = split
                y = uncouple_conv1x1(y, _autocast_input(prefix(y[:, :half])), conv.weight)
    return y
