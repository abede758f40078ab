"""The backbone registry (:data:`ssltk.registry.ARCHS`) as ``ssltk.models`` offers it: each
builder registers itself and its traits (as timm's ``@register_model``), and every list of
architecture names derives from here. No torch is imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ssltk.registry import ARCHS

if TYPE_CHECKING:
    from torch import nn

    from ssltk.models.spec import ArchConfig

__all__ = ["ArchEntry", "arch_names", "arch_traits", "register_arch", "unregister_arch"]

#: ``(input_size or None, patch_mode) -> input_size``: the side a backbone is built for, or a
#: ``ValueError`` naming ``input_size``.
InputSizeRule = Callable[[int | None, bool], int]


@dataclass(frozen=True)
class ArchEntry:
    """A registered backbone: its builder and the traits that differ between backbones."""

    name: str
    build: Callable[[ArchConfig], nn.Module]
    #: The endpoints ``forward`` returns, in order (empty: not declared).
    endpoints: tuple[str, ...] = ()
    #: The final ReLU may be dropped (the paper's "(-)" rows).
    last_relu_optional: bool = False
    #: The model is built for one input size (VGG's fc6 covers the last map). ``None``: any size,
    #: and ``input_size`` is only recorded.
    input_size_rule: InputSizeRule | None = None
    #: ``memory_saving`` changes the model: activations are recomputed in backward (RevNet).
    memory_saving: bool = False


def register_arch(
    name: str,
    *,
    endpoints: tuple[str, ...] = (),
    last_relu_optional: bool = False,
    input_size_rule: InputSizeRule | None = None,
    memory_saving: bool = False,
) -> Callable[[Callable[[ArchConfig], nn.Module]], Callable[[ArchConfig], nn.Module]]:
    """Decorator registering ``build(config: ArchConfig) -> nn.Module`` as backbone ``name``,
    with the traits of :class:`ArchEntry`."""
    return ARCHS.register(
        name,
        endpoints=tuple(endpoints),
        last_relu_optional=last_relu_optional,
        input_size_rule=input_size_rule,
        memory_saving=memory_saving,
    )


def unregister_arch(name: str) -> None:
    """Remove backbone ``name`` (for code that registers one for a while, such as a test)."""
    ARCHS.unregister(name)


def arch_names() -> tuple[str, ...]:
    """Registered backbones, in registration order."""
    return ARCHS.names()


def arch_traits(name: str) -> ArchEntry:
    """The registry entry of backbone ``name``; a ``ValueError`` listing the registered ones."""
    member = ARCHS.load(name)
    return ArchEntry(name, member.code, **member.traits)
