"""``ArchConfig``: the validated description of one backbone, kept on ``model.config``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ssltk.models.registry import arch_traits
from ssltk.registry import ARCHS

if TYPE_CHECKING:
    from ssltk.config import ModelConfig


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ArchConfig:
    """Arguments of :func:`ssltk.models.build_model`, validated on construction.

    ``num_classes`` None (or 0, normalised to None) builds a headless model without ``logits``.
    ``input_size`` matters only for a backbone registered with an ``input_size_rule`` (VGG, whose
    fc6 kernel covers the map left after five poolings), which resolves and checks it; other
    backbones take any input size, and for them ``input_size`` is only recorded.
    """

    arch: str
    widening: int = 4
    num_classes: int | None = 1000
    last_relu: bool = True
    patch_mode: bool = False
    representation_size: int | None = None
    memory_saving: bool = True
    input_size: int | None = None
    zero_init_residual: bool = False

    def __post_init__(self) -> None:
        traits = arch_traits(self.arch)
        if not is_int(self.widening) or self.widening <= 0:
            raise ValueError(f"widening={self.widening!r}: must be a positive integer")
        if self.num_classes is not None and (not is_int(self.num_classes) or self.num_classes < 0):
            raise ValueError(
                f"num_classes={self.num_classes!r}: must be a non-negative integer or None "
                "(None or 0: headless)"
            )
        if self.num_classes == 0:
            object.__setattr__(self, "num_classes", None)
        for name in ("last_relu", "patch_mode", "memory_saving", "zero_init_residual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be True or False")
        if not self.last_relu and not traits.last_relu_optional:
            raise ValueError(
                f"last_relu=False is only defined for {last_relu_optional()}, not {self.arch}"
            )
        size = self.representation_size
        if size is not None and (not is_int(size) or size <= 0):
            raise ValueError(f"representation_size={size!r}: must be a positive integer or None")
        size = self.input_size
        if traits.input_size_rule is not None:
            object.__setattr__(self, "input_size", traits.input_size_rule(size, self.patch_mode))
        elif size is not None and (not is_int(size) or size <= 0):
            raise ValueError(f"input_size={size!r}: must be a positive integer or None")

    @classmethod
    def from_model(cls, model: ModelConfig, **task: Any) -> ArchConfig:
        """Every ``model.*`` option of params.yaml, plus what the task decides (``num_classes``,
        ``patch_mode``, ``input_size``): a new ``model.*`` option is a field there and here."""
        return cls(**model.model_dump(), **task)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def pre_logits_width(self) -> int:
        """Width of ``pre_logits``: the representation size if set, else 512·k."""
        return self.representation_size or 512 * self.widening


def last_relu_optional() -> str:
    """The registered backbones whose final ReLU may be dropped, as ``"a and b"``."""
    return " and ".join(ARCHS.having("last_relu_optional"))
