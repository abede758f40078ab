"""The probe registry as :mod:`ssltk.evaluate` offers it, and what a probe is given.

A probe is a function ``fit(inputs: ProbeInputs) -> {layer: {figure: value}}`` registered with
``@register_probe(name, needs_val=..., section=...)``; its figures must include ``top1`` and
``top5`` on ``inputs.report_split`` and may add ``val_top1`` (what the best layer is chosen by).
``section`` is the model of its ``eval.<name>`` keys in params.yaml; ``needs_val`` says whether
it reads the ``val`` split: ``True``, or a function of its section.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssltk.registry import PROBES

if TYPE_CHECKING:
    import torch

    from ssltk.data.dataset import PreparedSplit
    from ssltk.evaluate.features import Features
    from ssltk.evaluate.target import EvalTarget
    from ssltk.schema import Section

__all__ = ["Figures", "ProbeInputs", "needs_val", "register_probe", "unregister_probe"]

#: ``{layer: {figure: value}}``, e.g. ``{"pre_logits": {"top1": 0.31, "top5": 0.8}}``.
Figures = dict[str, dict[str, float]]


@dataclass(frozen=True)
class ProbeInputs:
    """Everything a probe may read: the frozen task, the prepared splits it needs, the pooled
    features of each of them, its own ``eval.<name>`` section and where to log."""

    target: EvalTarget
    splits: Mapping[str, PreparedSplit]
    layers: list[str]
    features: Mapping[str, Features]
    section: Any
    report_split: str
    device: torch.device
    log: Callable[[str], None]
    work_dir: Path | None = None  # the evaluation's folder: where a probe may checkpoint


def register_probe(
    name: str,
    *,
    needs_val: bool | Callable[[Any], bool] = False,
    section: type[Section] | None = None,
) -> Callable[[Callable[[ProbeInputs], Figures]], Callable[[ProbeInputs], Figures]]:
    """Decorator registering ``fit`` as probe ``name`` (``eval.method: name``)."""
    return PROBES.register(name, needs_val=needs_val, section=section)


def unregister_probe(name: str) -> None:
    """Remove probe ``name`` (for code that registers one for a while, such as a test)."""
    PROBES.unregister(name)


def needs_val(name: str, section: Any) -> bool:
    """Whether probe ``name``, configured by ``section``, reads the ``val`` split."""
    rule = PROBES.member(name).needs_val
    return bool(rule(section) if callable(rule) else rule)
