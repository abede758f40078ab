"""What Rotation and Exemplar share: a full-image backbone and its linear-evaluation readout."""

from __future__ import annotations

import torch

from ssltk.config import Config
from ssltk.data import rng
from ssltk.data.augment import (
    ImageList,
    Images,
    center_crop_offsets,
    crop,
    random_crop_offsets,
    resize_small,
    small_side_crops,
    to_minus1_1,
)
from ssltk.pretext.base import Pool, PretextTask, backbone_from_config, select_endpoints
from ssltk.pretext.geometry import PAPER_INPUT_SIZE, round_half_up

__all__ = ["FullImageTask"]

#: Linear evaluation resizes the shorter side to 256 for a 224 input (the released
#: ``config/evaluation/rotation_or_exemplar.sh``).
PAPER_EVAL_RESIZE = 256


class FullImageTask(PretextTask):
    """A task whose backbone sees whole ``input_size``² images."""

    def __init__(self, backbone: torch.nn.Module, input_size: int) -> None:
        super().__init__(backbone)
        self.input_size = input_size

    @staticmethod
    def full_image_backbone(config: Config, num_outputs: int) -> torch.nn.Module:
        """``model.*`` in full-image mode, its final linear layer with ``num_outputs``."""
        return backbone_from_config(
            config, num_classes=num_outputs, patch_mode=False, input_size=config.pretext.input_size
        )

    @property
    def eval_resize(self) -> int:
        """Shorter side before the centre crop: ``round(256 · input_size / 224)``."""
        return round_half_up(PAPER_EVAL_RESIZE * self.input_size / PAPER_INPUT_SIZE)

    @torch.no_grad()
    def representation(
        self,
        images: Images,
        layers: list[str] | None,
        *,
        pool: Pool | None = None,
        keys: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The released linear evaluation: shorter side ``eval_resize`` (area), an
        ``input_size`` crop (centred, or random from ``keys``), [-1, 1] scaling (no
        standardisation, also for Exemplar), then the backbone's endpoints ``layers``, each
        passed through ``pool`` if given. Original images of different sizes (an
        :class:`ImageList`) are resized and cropped one by one.
        """
        size = self.input_size
        stream = rng.Stream.FULL_IMAGE_EVAL_CROP
        if isinstance(images, ImageList):
            x = to_minus1_1(small_side_crops(images, self.eval_resize, size, keys, stream))
        else:
            resized = resize_small(images, self.eval_resize)
            in_hw = tuple(resized.shape[-2:])
            if keys is None:
                offsets = center_crop_offsets(in_hw, size, images.shape[0])
            else:
                offsets = random_crop_offsets(keys, stream, in_hw, size)
            x = to_minus1_1(crop(resized, offsets, size))
        endpoints = select_endpoints(self.backbone(x), layers)
        if pool is None:
            return endpoints
        return {layer: pool(value) for layer, value in endpoints.items()}
