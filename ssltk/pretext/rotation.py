"""Rotation: predict which multiple of 90° an image was rotated by (the released
``self_supervision/rotation.py``).

Every image is inception-preprocessed once at ``input_size`` and contributes all four rotations to
the same batch, adjacent: copy ``k`` is rotated ``k × 90°`` counter-clockwise (``numpy.rot90``)
and labelled ``k``. The 4-way classifier is the backbone's own ``logits`` layer. With
``pretext.rotation.crop: center`` (not in the paper) training uses the deterministic centre crop
of evaluation instead: on 32-px images an inception crop is often a few blurred pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssltk.config import Config
from ssltk.data import rng
from ssltk.data.augment import Preprocessing, inception_preprocess
from ssltk.pretext.base import (
    PretextInputs,
    TaskOutput,
    accuracy,
    register_task,
)
from ssltk.pretext.full_image import FullImageTask
from ssltk.sections import RotationConfig

__all__ = ["NUM_ROTATIONS", "Rotation", "RotationConfig", "rotate_all"]

NUM_ROTATIONS = 4


def rotate_all(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` square images → ``[4B, C, H, W]``: each image's rotations 0..3, adjacent."""
    rotations = [torch.rot90(x, k, dims=(2, 3)) for k in range(NUM_ROTATIONS)]
    return torch.stack(rotations, dim=1).flatten(0, 1)


@register_task("rotation")
class Rotation(FullImageTask):
    """Four-way rotation classification."""

    config_section = RotationConfig
    paper_results = (("revnet50", 16, {"Table 1": 53.7, "Table 2": 55.4}),)

    def __init__(
        self,
        backbone: torch.nn.Module,
        input_size: int,
        *,
        inception_crop: bool = True,
        preprocessing: Preprocessing = "symmetric",
    ) -> None:
        super().__init__(backbone, input_size)
        self.inception_crop = inception_crop
        self.preprocessing = preprocessing

    @classmethod
    def chance_level(cls, config: Config) -> float:
        return 1 / NUM_ROTATIONS

    @classmethod
    def from_config(cls, config: Config) -> Rotation:
        return cls(
            cls.full_image_backbone(config, NUM_ROTATIONS),
            config.pretext.input_size,
            inception_crop=config.pretext.rotation.crop == "inception",
            preprocessing=config.pretext.preprocessing,
        )

    def prepare_batch(
        self, images: torch.Tensor, keys: torch.Tensor, batch_key: torch.Tensor, *, train: bool
    ) -> PretextInputs:
        augment = train and self.inception_crop
        x = inception_preprocess(
            images,
            keys,
            rng.Stream.ROTATION_INCEPTION,
            self.input_size,
            train=augment,
            preprocessing=self.preprocessing,
        )
        labels = torch.arange(NUM_ROTATIONS, device=images.device).repeat(len(images))
        return PretextInputs(rotate_all(x), labels)

    def forward(self, batch: PretextInputs) -> TaskOutput:
        logits = self.backbone(batch.inputs)["logits"]
        loss = F.cross_entropy(logits, batch.labels)
        return TaskOutput(loss, {"accuracy": accuracy(logits, batch.labels)})
