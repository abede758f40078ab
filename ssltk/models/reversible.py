"""Memory-saving backpropagation through a stage of reversible units (Gomez et al., 2017).

A unit maps ``x = [x1 | x2]`` to ``y = [x2 | x1 + F(x2)]``. :func:`reversible_sequence` runs a
stage's units inside one autograd Function that keeps the stage output and, per unit, one bit per
input of each ReLU in F. Backward walks the units in reverse and runs F **once** per unit with
autograd on ``x2 = y1``; that recomputation serves both the reconstruction ``x1 = y2 - F(y1)``
and, through ``torch.autograd.grad``, F's parameter gradients and the gradient into ``x2``. The
parameter gradients are returned as gradients of the Function's own inputs (the parameters are
passed to it), so autograd accumulates each exactly once and DDP's hooks fire as for any layer.

Memory: backward owns two unit-sized buffers whatever the depth, the reconstructed input and the
input gradient (the returned tensor). Each is two channel halves updated in place, whose roles
swap from unit to unit: ``x1 = y2 - F(y1)`` is written over ``y2``, and since
``d/dx [x2 | x1 + F(x2)]`` is again a coupling, ``[g2 | g1 + dF/dx2 · g2]``, the new ``g2`` over
``g1``. Each unit's recomputation graph is consumed before its buffers are written. When F ends
in a plain 1×1 conv (as RevNet's bottleneck does), that conv's two gradients come straight from
``aten.convolution_backward`` instead of a second autograd pass.

Exact gradients: reconstruction is exact only up to a few fp32 roundings, and a ReLU input within
that distance of zero flips its derivative; at real widths and sizes some do, and one flip turns
the gradient of every layer below it. The forward pass therefore stores the sign of every
ReLU input in F (1 bit each, 1/32 of the activation; ReLUs directly in a Sequential F) and the
recomputation applies those stored signs. What remains of the reconstruction error then moves the
gradients smoothly, by about that error.

BatchNorm inside F: the forward pass updates the running statistics once, as the plain model does.
The recomputation runs each BN in training mode on batch statistics of its (reconstructed) input
with the running-stat update switched off, so the gradient flows through the batch statistics as
plain autograd differentiates them. Units must be deterministic (no dropout).

Structurally zero input channels: RevNet's stage transition zero-pads the channels, so the first
unit's F normalises channels that are exactly zero; BN divides their reconstruction noise by
``sqrt(eps)`` instead of a real standard deviation. The caller names such channels
(``zero_channels``) and backward resets them to exact zero before F runs.

TF32: F runs with cuDNN's TF32 convolutions switched off. TF32 rounds F's inputs to 10 mantissa
bits, so a reconstruction error of one fp32 ulp flips TF32 roundings and F's recomputed output
moves by a TF32 ulp, growing unit by unit (figures: reports/revnet_kernels.md). Use bf16 autocast
for speed instead: the coupling stream ``x1 + F(x2)`` stays fp32 (a 16-bit stage input is
upcast), so each unit adds one fp32 rounding, and a bf16 F output mostly adds to it exactly; F
runs in the autocast dtype, and backward replays the forward's autocast state and gives F's input
the strides the forward gave it (bf16 convolutions may round differently in another layout).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ssltk.kernels.revnet_coupling import coupling, coupling_conv1x1

__all__ = ["invert_sequence", "reversible_sequence"]


@functools.cache
def _bit_weights(device: torch.device) -> Tensor:
    # Made on the device itself: a host-to-device copy per call would stall the CUDA stream.
    return (1 << torch.arange(8, device=device)).to(torch.uint8)


def pack_signs(v: Tensor) -> Tensor:
    """``v > 0`` (ReLU's own test) as bits, 8 per uint8, in ``v``'s logical element order."""
    bits = (v > 0).flatten()
    if bits.numel() % 8:
        bits = torch.cat([bits, bits.new_zeros(8 - bits.numel() % 8)])
    return torch.mul(bits.view(-1, 8), _bit_weights(v.device)).sum(1, dtype=torch.uint8)


def unpack_signs(packed: Tensor, like: Tensor) -> Tensor:
    """The boolean tensor :func:`pack_signs` packed, shaped like ``like``."""
    bits = packed.unsqueeze(1).bitwise_and(_bit_weights(packed.device)).ne(0)
    return bits.flatten()[: like.numel()].view(like.shape)


class _SignedReLU(torch.autograd.Function):
    """ReLU whose derivative follows the stored signs ``positive`` rather than the input's own.
    The few inputs on the wrong side of zero get an output on the stored side (zero, or the
    smallest normal number), so ReLU's own backward, which reads its output, applies."""

    @staticmethod
    def forward(ctx, x: Tensor, positive: Tensor) -> Tensor:
        out = x.clamp_min(torch.finfo(x.dtype).tiny).mul_(positive)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, out, 0), None


class _Unit:
    """What forward and backward need to know about one unit, gathered once per call.

    ``layers`` run F; when F is a Sequential ending in a plain 1×1 conv, ``conv`` is that conv
    and ``layers`` are the ones before it. ``all_params`` are F's parameters that require grad,
    ``params`` those of ``layers``; ``norms`` are F's BN layers; ``relus`` counts the ReLUs among
    ``layers`` (whose input signs forward stores).
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
        if isinstance(f, nn.Sequential):
            self.layers: tuple[nn.Module, ...] = (
                tuple(f)[:-1] if self.conv is not None else tuple(f)
            )
        else:
            self.layers = (f,)
        self.relus = sum(isinstance(layer, nn.ReLU) for layer in self.layers)
        trainable = [p for p in f.parameters() if p.requires_grad]
        self.all_params = tuple(trainable)
        weight = self.conv.weight if self.conv is not None else None
        self.params = tuple(p for p in trainable if p is not weight)
        self.norms = tuple(m for m in f.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))

    def hidden(
        self, x2: Tensor, *, signs: list[Tensor] | None = None, stored: Sequence[Tensor] = ()
    ) -> Tensor:
        """F(x2), or with a fused conv the input of F's last conv (as autocast would feed it).

        ``signs``: append each ReLU's packed input signs. ``stored``: those signs, applied in
        place of the recomputed ones (one per ReLU, in order)."""
        relu = 0
        for layer in self.layers:
            if isinstance(layer, nn.ReLU) and stored:
                x2 = _SignedReLU.apply(x2, unpack_signs(stored[relu], x2))
                relu += 1
                continue
            if isinstance(layer, nn.ReLU) and signs is not None:
                signs.append(pack_signs(x2))
            x2 = layer(x2)
        return x2 if self.conv is None else _autocast_input(x2)

    def forward(self, x: Tensor, signs: list[Tensor] | None = None) -> Tensor:
        with _no_tf32():
            h = self.hidden(x[:, x.shape[1] // 2 :], signs=signs)
            if self.conv is None:
                return coupling(x, h)
            return coupling_conv1x1(x, h, self.conv.weight)

    def f_output(self, h: Tensor) -> Tensor:
        """F's output from :meth:`hidden`'s."""
        return h if self.conv is None else _conv1x1(h, self.conv.weight)

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


def _conv1x1(h: Tensor, weight: Tensor) -> Tensor:
    return F.conv2d(h, weight.to(h.dtype))


def _conv1x1_grads(grad_fx: Tensor, h: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of ``conv1x1(h, weight)`` w.r.t. ``h`` and ``weight``, in ``h``'s dtype as the
    conv itself ran (then ``weight``'s dtype for its gradient), by the same kernel autograd uses."""
    w = weight.to(h.dtype)
    grad_h, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_fx.to(h.dtype), h, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [True, True, False],
    )  # fmt: skip
    return grad_h, grad_w.to(weight.dtype)


class _Halves:
    """A tensor ``[a | b]`` held as two channel halves that backward updates in place.

    ``owned[i]`` says whether half ``i`` is a buffer of backward's own (writable) rather than a
    view of the saved output or of the incoming gradient; ``new()`` hands out the next of the two
    halves of backward's own full-size buffer (``slot(k)`` for the k-th). Halves stay views of
    full-size tensors so that F sees the strides the forward pass gave it (with bf16 convs a
    different layout can round differently). Writes happen only after the unit's recomputation
    graph is consumed, so a shared version counter never trips autograd.
    """

    def __init__(self, t: Tensor, slot: Callable[[int], Tensor]) -> None:
        half = t.shape[1] // 2
        self.a, self.b = t[:, :half], t[:, half:]
        self.owned = [False, False]
        self._slot, self._allocated = slot, 0

    def new(self) -> Tensor:
        self._allocated += 1
        return self._slot(self._allocated - 1)


def _own(halves: _Halves) -> Tensor:
    """The first half as a writable buffer of backward's own (copied into a new one if needed)."""
    if not halves.owned[0]:
        halves.a = halves.new().copy_(halves.a)
        halves.owned[0] = True
    return halves.a


def _reconstruct(state: _Halves, fx: Tensor) -> None:
    """``[y1 | y2]`` becomes ``[y2 - fx | y1]``, written into y2's buffer when it is ours."""
    out = state.b if state.owned[1] else state.new()
    state.a, state.b = torch.sub(state.b, fx, out=out), state.a
    state.owned = [True, state.owned[0]]


def _pull_back(grad: _Halves, dx2: Tensor | None) -> None:
    """``[g1 | g2]`` becomes ``[g2 | g1 + dx2]``, written into g1's buffer when it is ours."""
    if grad.owned[0]:
        out = grad.a if dx2 is None else grad.a.add_(dx2)
    else:
        out = grad.new()
        out.copy_(grad.a) if dx2 is None else torch.add(grad.a, dx2, out=out)
    grad.a, grad.b = grad.b, out
    grad.owned = [grad.owned[1], True]


def _halves_of(full: Tensor, order: Callable[[int], int]) -> Callable[[int], Tensor]:
    """``slot(k)``: the half ``order(k)`` (0 first, 1 second) of ``full``."""
    half = full.shape[1] // 2
    return lambda k: full[:, half:] if order(k) else full[:, :half]


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
        y, signs = x, []
        for unit in units:
            y = unit.forward(y, signs)
        ctx.save_for_backward(y, *signs)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        y, *signs = ctx.saved_tensors
        units, depth = ctx.units, len(ctx.units)
        need_input_grad = ctx.needs_input_grad[0]
        # The k-th gradient half written ends in position (depth - k) % 2 (see _pull_back), so
        # the returned gradient needs no final copy.
        full_grad = torch.empty_like(grad_out)
        grad = _Halves(grad_out, _halves_of(full_grad, lambda k: (depth - k) % 2))
        state = _Halves(y, _halves_of(torch.empty_like(y), lambda k: k))
        grads: dict[nn.Parameter, Tensor] = {}
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            for i in reversed(range(depth)):
                unit = units[i]
                stored = signs[sum(u.relus for u in units[:i]) :][: unit.relus]
                x2_grad = i > 0 or need_input_grad
                if i == 0 and ctx.zero_x2:
                    x2 = _own(state)
                    for start, stop in ctx.zero_x2:
                        x2[:, start:stop] = 0
                unit_grads = _unit_backward(unit, state, grad, stored, x2_grad, i > 0)
                for p, g in unit_grads.items():
                    grads[p] = grads[p] + g if p in grads else g
        if not need_input_grad:
            full_grad = None
        elif not grad.owned[0]:  # a single unit: g2 passes through
            full_grad[:, : full_grad.shape[1] // 2] = grad.a
        return (full_grad, None, None, *(grads.get(p) for p in ctx.params))


def _unit_backward(
    unit: _Unit,
    state: _Halves,
    grad: _Halves,
    stored: Sequence[Tensor],
    x2_grad: bool,
    reconstruct: bool,
) -> dict[nn.Parameter, Tensor]:
    """One unit's backward with one recomputation of F: ``state`` (its output ``[y1 | y2]``)
    becomes its input if ``reconstruct``, ``grad`` (the gradient w.r.t. the output) becomes the
    gradient w.r.t. the input if ``x2_grad``; returns F's parameter gradients."""
    x2 = state.a.detach().requires_grad_(x2_grad)
    with torch.enable_grad(), unit.recomputing():
        h = unit.hidden(x2, stored=stored)
    grads: dict[nn.Parameter, Tensor] = {}
    if unit.conv is None:
        grad_h = grad.b
    else:
        grad_h, grad_w = _conv1x1_grads(grad.b, h.detach(), unit.conv.weight)
        if unit.conv.weight.requires_grad:
            grads[unit.conv.weight] = grad_w
    inputs = [x2, *unit.params] if x2_grad else list(unit.params)
    found: Sequence[Tensor | None] = [None] * len(inputs)
    if inputs and h.requires_grad:
        found = torch.autograd.grad(h, inputs, grad_h, allow_unused=True)
    del grad_h
    if x2_grad:
        dx2, found = found[0], found[1:]
        _pull_back(grad, dx2)
        del dx2
    grads.update((p, g) for p, g in zip(unit.params, found, strict=True) if g is not None)
    if reconstruct:
        with unit.recomputing():
            fx = unit.f_output(h.detach())
        _reconstruct(state, fx)
    return grads


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
    stage output (and the signs of F's ReLU inputs, one bit each) for backward; the units' inputs
    are reconstructed from it during backward.

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
            if unit.conv is None:
                y = coupling(y, h, inverse=True)
            else:
                y = coupling_conv1x1(y, h, unit.conv.weight, inverse=True)
    return y
