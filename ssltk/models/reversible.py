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

Structurally zero input channels: RevNet's stage transition zero-pads the channels, so the first
unit's F normalises channels that are exactly zero; BN maps them to exactly its bias, on ReLU's
kink at initialisation. Reconstruction leaves ~1e-7 noise there, which BN (dividing by
``sqrt(eps)`` instead of a real standard deviation) amplifies until ReLU derivatives flip and the
gradient turns visibly (0.28° on RevNet50). The caller names such channels (``zero_channels``)
and backward resets them to exact zero in the first unit's reconstructed ``x2`` before F runs;
noise in the other channels is harmless, so the stage input need not be stored.

TF32: F runs with cuDNN's TF32 convolutions switched off. Reconstruction is exact only up to
~1e-7, and TF32 rounds F's inputs to 10 mantissa bits, so that tiny error flips TF32 roundings,
F's recomputed output moves by ~1e-3 and the error grows unit by unit (measured on an H200: 34°
between memory-saving and plain fp32 gradients of RevNet50 with TF32 on, 1e-4° with it off). Use
bf16 autocast for speed: its F output adds to the fp32 stream almost always exactly.

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

from kernels.revnet_coupling import coupling, coupling_conv1x1

__all__ = ["invert_sequence", "reversible_sequence"]


class _Unit:
    """What backward needs to know about one unit, gathered once per call.

    ``layers`` run F; when F is a Sequential ending in a plain 1×1 conv, ``conv`` is that conv
    and ``layers`` are the ones before it (the fused kernels then do the conv and the coupling).
    ``all_params`` are F's parameters that require grad, ``params`` those of ``layers``;
    ``norms`` are F's BN layers.
    """

    def __init__(self, unit: nn.Module, index: int) -> None:
        f = getattr(unit, "f", None)
        if not isinstance(f, nn.Module):
            raise ValueError(
                f"units[{index}]: a reversible unit needs its residual function as `.f`"
            )
        direct = list(unit._parameters.values()) + [
            p for child in unit.children() if child is not f for p in child.parameters()
        ]
        if any(p is not None for p in direct):
            raise ValueError(
                f"units[{index}]: has parameters outside `.f`, which the reversible backward "
                "would not differentiate"
            )
        self.conv = _last_conv1x1(f)
        self.layers: tuple[nn.Module, ...] = tuple(f)[:-1] if self.conv is not None else (f,)
        trainable = [p for p in f.parameters() if p.requires_grad]
        self.all_params = tuple(trainable)
        weight = self.conv.weight if self.conv is not None else None
        self.params = tuple(p for p in trainable if p is not weight)
        self.norms = tuple(m for m in f.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))

    def hidden(self, x2: Tensor) -> Tensor:
        """F(x2), or with a fused conv the input of F's last conv (as autocast would feed it)."""
        for layer in self.layers:
            x2 = layer(x2)
        return x2 if self.conv is None else _autocast_input(x2)

    def forward(self, x: Tensor) -> Tensor:
        with _no_tf32():
            h = self.hidden(x[:, x.shape[1] // 2 :])
            if self.conv is None:
                return coupling(x, h)
            return coupling_conv1x1(x, h, self.conv.weight)

    def inverse(self, y: Tensor, h: Tensor) -> Tensor:
        """The unit's input from its output ``y`` and ``h = hidden(y1)``."""
        with _no_tf32():
            if self.conv is None:
                return coupling(y, h, inverse=True)
            return coupling_conv1x1(y, h, self.conv.weight, inverse=True)

    @contextmanager
    def recomputing(self) -> Iterator[None]:
        """Training-mode BN layers use batch statistics but leave their running stats alone."""
        frozen = [m for m in self.norms if m.training and m.track_running_stats]
        for m in frozen:
            m.track_running_stats = False
        try:
            with _no_tf32():
                yield
        finally:
            for m in frozen:
                m.track_running_stats = True


def _last_conv1x1(f: nn.Module) -> nn.Conv2d | None:
    """F's last layer when F is a Sequential ending in a plain 1×1 conv without bias."""
    if not isinstance(f, nn.Sequential) or len(f) < 2:
        return None
    last = f[-1]
    plain_1x1 = (
        isinstance(last, nn.Conv2d)
        and last.kernel_size == (1, 1)
        and last.stride == (1, 1)
        and last.padding in ((0, 0), "valid")
        and last.dilation == (1, 1)
        and last.groups == 1
        and last.bias is None
    )
    return last if plain_1x1 else None


@contextmanager
def _no_tf32() -> Iterator[None]:
    """cuDNN convolutions in full fp32 (see "TF32" in the module docstring)."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


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


def _unit_backward(
    unit: _Unit,
    y: Tensor,
    grad_y: Tensor,
    *,
    need_input_grad: bool,
    reconstruct: bool,
    zero_x2: Sequence[tuple[int, int]] = (),
) -> tuple[Tensor | None, Tensor | None, dict[nn.Parameter, Tensor]]:
    """One unit's input (if ``reconstruct``), the gradient w.r.t. it (if ``need_input_grad``) and
    F's parameter gradients, from its output ``y`` and ``grad_y`` with one recomputation of F.
    ``zero_x2`` are channel ranges of ``x2`` known to be exactly zero; they are reset before F
    runs."""
    half = y.shape[1] // 2
    x2 = y[:, :half].detach()
    if zero_x2:
        x2 = x2.clone()
        for start, stop in zero_x2:
            x2[:, start:stop] = 0
    x2.requires_grad_(need_input_grad)
    grad_y1, grad_y2 = grad_y[:, :half], grad_y[:, half:]
    with torch.enable_grad(), unit.recomputing():
        h = unit.hidden(x2)
    x = unit.inverse(y, h.detach()) if reconstruct else None
    grads: dict[nn.Parameter, Tensor] = {}
    if unit.conv is None:
        grad_h = grad_y2
    else:
        grad_h, grad_w = _conv1x1_grads(grad_y2, h.detach(), unit.conv.weight)
        if unit.conv.weight.requires_grad:
            grads[unit.conv.weight] = grad_w
    inputs = [x2, *unit.params] if need_input_grad else list(unit.params)
    found: Sequence[Tensor | None] = [None] * len(inputs)
    if inputs and h.requires_grad:
        found = torch.autograd.grad(h, inputs, grad_h, allow_unused=True)
    grad_x = None
    if need_input_grad:
        grad_x2, found = found[0], found[1:]
        # d/dx of [x2 | x1 + F(x2)] is again a coupling: [grad_y2 | grad_y1 + dF/dx2 · grad_y2].
        grad_x = torch.cat([grad_y2, grad_y1], 1) if grad_x2 is None else coupling(grad_y, grad_x2)
    grads.update((p, g) for p, g in zip(unit.params, found, strict=True) if g is not None)
    return x, grad_x, grads


class _ReversibleSequence(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        units: tuple[_Unit, ...],
        zero_x2: tuple[tuple[int, int], ...],
        *params: nn.Parameter,
    ) -> Tensor:
        device = x.device.type
        ctx.units, ctx.zero_x2, ctx.params = units, zero_x2, params
        ctx.autocast = (
            device,
            torch.is_autocast_enabled(device),
            torch.get_autocast_dtype(device),
        )
        y = x
        for unit in units:
            y = unit.forward(y)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        (y,) = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        grads: dict[nn.Parameter, Tensor] = {}
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            for i in reversed(range(len(ctx.units))):
                y, grad_y, unit_grads = _unit_backward(
                    ctx.units[i],
                    y,
                    grad_y,
                    need_input_grad=i > 0 or ctx.needs_input_grad[0],
                    reconstruct=i > 0,  # nothing needs the stage input itself
                    zero_x2=ctx.zero_x2 if i == 0 else (),
                )
                for p, g in unit_grads.items():
                    grads[p] = grads[p] + g if p in grads else g
        return (grad_y, None, None, *(grads.get(p) for p in ctx.params))


def _plan(x: Tensor, units: Sequence[nn.Module]) -> tuple[_Unit, ...]:
    if x.dim() != 4 or x.shape[1] % 2:
        raise ValueError(f"x: expected [N, C, H, W] with an even C, got shape {tuple(x.shape)}")
    return tuple(_Unit(unit, i) for i, unit in enumerate(units))


def _zero_x2_ranges(zero_channels: Sequence[slice], channels: int) -> tuple[tuple[int, int], ...]:
    """``zero_channels`` (slices of the stage input's channels) as ranges within its ``x2`` half,
    the only half the first unit's F sees."""
    half = channels // 2
    ranges = []
    for i, channel_slice in enumerate(zero_channels):
        if not isinstance(channel_slice, slice):
            raise ValueError(f"zero_channels[{i}]: expected a slice, got {channel_slice!r}")
        start, stop, step = channel_slice.indices(channels)
        if step != 1:
            raise ValueError(f"zero_channels[{i}]: expected a step of 1, got {channel_slice!r}")
        start, stop = max(start, half) - half, max(stop, half) - half
        if start < stop:
            ranges.append((start, stop))
    return tuple(ranges)


def reversible_sequence(
    x: Tensor, units: Sequence[nn.Module], *, zero_channels: Sequence[slice] = ()
) -> Tensor:
    """Apply reversible ``units`` (each ``y = [x2 | x1 + unit.f(x2)]``) to ``x`` and keep only the
    stage output for backward; the units' inputs are reconstructed from it during backward.

    ``zero_channels`` are slices of ``x``'s channels that the caller guarantees to be exactly
    zero (a zero-padding transition); backward restores them exactly instead of up to
    reconstruction noise (see the module docstring). Naming channels that are not zero makes the
    gradients wrong.

    Gradients equal plain autograd's up to reconstruction rounding. Without autograd (no grad
    mode, or nothing requiring grad) the units simply run.
    """
    plan = _plan(x, units)
    zero_x2 = _zero_x2_ranges(zero_channels, x.shape[1])
    if not plan:
        return x
    if torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()  # the coupling stream stays fp32 under autocast (see the module docstring)
    params = list({id(p): p for unit in plan for p in unit.all_params}.values())
    if not torch.is_grad_enabled() or not (x.requires_grad or params):
        with torch.no_grad():
            for unit in plan:
                x = unit.forward(x)
        return x
    return _ReversibleSequence.apply(x, plan, zero_x2, *params)


@torch.no_grad()
def invert_sequence(y: Tensor, units: Sequence[nn.Module]) -> Tensor:
    """Reconstruct the input of ``units`` from their output ``y``, the way the memory-saving
    backward does (BN on batch statistics, running statistics untouched)."""
    for unit in reversed(_plan(y, units)):
        with unit.recomputing():
            h = unit.hidden(y[:, : y.shape[1] // 2])
        y = unit.inverse(y, h)
    return y
