"""Endpoint shapes and parameter counts of a backbone, computed on the ``meta`` device.

Nothing is allocated, so even RevNet50 k=16 or ResNet50 k=12 summarise instantly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ssltk.models.factory import build_model

#: The module producing each endpoint, where its name differs from the endpoint's.
_PRODUCER = {"after_root": "root"}


@dataclass(frozen=True)
class SummaryRow:
    """One endpoint: its shape without the batch axis, its size, and the parameters of the
    module producing it from the previous endpoint."""

    endpoint: str
    shape: tuple[int, ...]
    features: int
    params: int


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_summary(
    arch: str,
    widening: int,
    input_size: int,
    patch_mode: bool = False,
    *,
    num_classes: int | None = 1000,
    last_relu: bool = True,
    representation_size: int | None = None,
) -> list[SummaryRow]:
    """Rows per endpoint for a ``[1, 3, input_size, input_size]`` input, in forward order.

    The ``params`` column sums to the model's parameter count.
    """
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0:
        raise ValueError(f"input_size={input_size!r}: must be a positive integer")
    with torch.device("meta"):
        model = build_model(
            arch,
            widening=widening,
            num_classes=num_classes,
            last_relu=last_relu,
            patch_mode=patch_mode,
            representation_size=representation_size,
            input_size=input_size,
        )
        model.eval()
        with torch.no_grad():
            endpoints = model(torch.empty(1, 3, input_size, input_size))
    rows = []
    for name, value in endpoints.items():
        producer = getattr(model, _PRODUCER.get(name, name))
        shape = tuple(value.shape[1:])
        rows.append(SummaryRow(name, shape, value[0].numel(), count_parameters(producer)))
    return rows


def format_summary(rows: list[SummaryRow]) -> str:
    """A plain-text table of ``rows`` with a total line."""
    header = ("endpoint", "shape", "features", "params")
    body = [
        (r.endpoint, "×".join(map(str, r.shape)), f"{r.features:,}", f"{r.params:,}") for r in rows
    ]
    body.append(("total", "", "", f"{sum(r.params for r in rows):,}"))
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line: tuple[str, ...]) -> str:
        left = line[0].ljust(widths[0])
        return "  ".join(
            [left, *(cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True))]
        )

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, body[:-1]), rule, fmt(body[-1])])
