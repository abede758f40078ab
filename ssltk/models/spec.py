"""``ArchConfig``: the validated description of one backbone, kept on ``model.config``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ARCHS = ("resnet50_v1", "resnet50_v2", "revnet50", "vgg19_bn")

#: Architectures whose final ReLU may be dropped (the paper's "(-)" rows, §3.4).
LAST_RELU_OPTIONAL = ("resnet50_v2", "revnet50")

#: Default VGG input side: full images (224) or Jigsaw/RelPatchLoc patches (64).
VGG_IMAGE_SIZE = 224
VGG_PATCH_SIZE = 64
#: VGG halves the resolution five times before fc6.
VGG_DOWNSAMPLING = 32


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ArchConfig:
    """Arguments of :func:`ssltk.models.build_model`, validated on construction.

    ``num_classes`` None (or 0, normalised to None) builds a headless model without ``logits``.
    ``input_size`` matters for VGG only, whose fc6 kernel covers the map left after five poolings:
    it defaults to 224 (64 in patch mode) and the model then accepts sides in
    ``[32·(input_size//32), 32·(input_size//32) + 31]``. Other archs take any input size; for them
    ``input_size`` is only recorded.
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
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r}: expected one of {', '.join(ARCHS)}")
        if not _is_int(self.widening) or self.widening <= 0:
            raise ValueError(f"widening={self.widening!r}: must be a positive integer")
        if self.num_classes is not None and (not _is_int(self.num_classes) or self.num_classes < 0):
            raise ValueError(
                f"num_classes={self.num_classes!r}: must be a non-negative integer or None "
                "(None or 0: headless)"
            )
        if self.num_classes == 0:
            object.__setattr__(self, "num_classes", None)
        for name in ("last_relu", "patch_mode", "memory_saving", "zero_init_residual"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be True or False")
        if not self.last_relu and self.arch not in LAST_RELU_OPTIONAL:
            raise ValueError(
                f"last_relu=False is only defined for {' and '.join(LAST_RELU_OPTIONAL)}, "
                f"not {self.arch}"
            )
        size = self.representation_size
        if size is not None and (not _is_int(size) or size <= 0):
            raise ValueError(f"representation_size={size!r}: must be a positive integer or None")
        self._resolve_input_size()

    def _resolve_input_size(self) -> None:
        size = self.input_size
        if self.arch != "vgg19_bn":
            if size is not None and (not _is_int(size) or size <= 0):
                raise ValueError(f"input_size={size!r}: must be a positive integer or None")
            return
        if size is None:
            size = VGG_PATCH_SIZE if self.patch_mode else VGG_IMAGE_SIZE
        if not _is_int(size) or size < VGG_DOWNSAMPLING:
            raise ValueError(
                f"input_size={size!r}: vgg19_bn needs at least {VGG_DOWNSAMPLING} px "
                "(five 2×2 poolings before fc6)"
            )
        object.__setattr__(self, "input_size", size)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def pre_logits_width(self) -> int:
        """Width of ``pre_logits``: the representation size if set, else 512·k (§3.1, §3.5)."""
        return self.representation_size or 512 * self.widening
