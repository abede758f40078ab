"""Endpoint shapes and parameter counts of a backbone, computed on the ``meta`` device.

Nothing is allocated, so even RevNet50 k=16 or ResNet50 k=12 summarise instantly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ssltk.models.factory import build_backbone
from ssltk.models.spec import ArchConfig

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
    arch: str, widening: int, input_size: int, patch_mode: bool = False, **options: Any
) -> list[SummaryRow]:
    """Rows per endpoint of ``build_model(arch, ...)`` for a ``[1, 3, input_size, input_size]``
    input, in forward order; ``options`` as :func:`~ssltk.models.build_model` takes them."""
    config = ArchConfig(
        arch, widening=widening, input_size=input_size, patch_mode=patch_mode, **options
    )
    return summarize(config)


def summarize(config: ArchConfig) -> list[SummaryRow]:
    """Rows per endpoint of the backbone ``config`` describes for a ``[1, 3, input_size,
    input_size]`` input, in forward order. The ``params`` column sums to the parameter count."""
    input_size = config.input_size
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0:
        raise ValueError(f"input_size={input_size!r}: must be a positive integer")
    with torch.device("meta"):
        model = build_backbone(config)
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
