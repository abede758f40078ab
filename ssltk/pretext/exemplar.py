"""Exemplar: embed augmented copies of an image close together, other images apart (the released
``self_supervision/exemplar.py``).

Grayscale is decided once per image (probability ``grayscale_p``) before ``copies`` independent
training-mode inception crops are drawn, so all copies of an image share it; each copy is then
standardised. Copies of one image are contiguous and labelled with the image's index in the batch.
The backbone's ``logits`` (``embed_dim`` outputs) are the embedding, L2-normalised per vector or,
with ``normalize: faithful_axis0``, along the batch axis as the released code does; the loss is the
semi-hard triplet loss on squared distances. Evaluation batches are prepared the same way (the
task is defined by the random copies; their draws still come from the keys alone).
"""

from __future__ import annotations

import torch

from ssltk.config import Config
from ssltk.data import rng
from ssltk.data.augment import (
    ImageList,
    Preprocessing,
    grayscale_mask,
    inception_preprocess,
    standardize,
    to_gray,
)
from ssltk.pretext.base import PretextInputs, TaskOutput, register_task
from ssltk.pretext.full_image import FullImageTask
from ssltk.pretext.triplet import (
    normalize_embeddings,
    pairwise_squared_distances,
    semihard_triplet_loss_from_distances,
)
from ssltk.sections import ExemplarConfig

__all__ = ["Exemplar", "ExemplarConfig", "nearest_neighbour_accuracy"]


def nearest_neighbour_accuracy(distances: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of embeddings whose nearest other embedding has the same label."""
    others = distances.detach().clone().fill_diagonal_(float("inf"))
    return (labels[others.argmin(dim=1)] == labels).float().mean()


@register_task("exemplar")
class Exemplar(FullImageTask):
    """Instance discrimination with a semi-hard triplet loss."""

    metric = "nn_accuracy"
    couples_batch = True
    config_section = ExemplarConfig
    min_batch_size = 2
    min_batch_reason = "negatives come from other images of the batch"
    paper_results = (("resnet50_v1", 12, {"Table 2": 46.0}),)

    def __init__(
        self,
        backbone: torch.nn.Module,
        input_size: int,
        *,
        copies: int,
        grayscale_p: float,
        margin: float,
        normalize: str,
        preprocessing: Preprocessing = "symmetric",
    ) -> None:
        super().__init__(backbone, input_size)
        self.preprocessing = preprocessing
        self.copies, self.grayscale_p = copies, grayscale_p
        self.margin, self.normalize = margin, normalize

    @classmethod
    def chance_level(cls, config: Config) -> float:
        """A random embedding's nearest neighbour is one of the other ``copies − 1`` views of
        its image among the batch's ``copies · B − 1`` other embeddings."""
        copies, batch = config.pretext.exemplar.copies, config.pretrain.batch_size
        return (copies - 1) / (copies * batch - 1)

    @classmethod
    def from_config(cls, config: Config) -> Exemplar:
        section = config.pretext.exemplar
        return cls(
            cls.full_image_backbone(config, section.embed_dim),
            config.pretext.input_size,
            copies=section.copies,
            grayscale_p=section.grayscale_p,
            margin=section.margin,
            normalize=section.normalize,
            preprocessing=config.pretext.preprocessing,
        )

    def prepare_batch(
        self, images: torch.Tensor, keys: torch.Tensor, batch_key: torch.Tensor, *, train: bool
    ) -> PretextInputs:
        batch, copies = len(images), self.copies
        if batch < self.min_batch_size:
            raise ValueError(
                f"{self.name} needs at least {self.min_batch_size} images per batch, got {batch}"
            )
        gray = grayscale_mask(keys, rng.Stream.EXEMPLAR_GRAY, self.grayscale_p)
        images = to_gray(images, gray)
        # One derived key per copy, so every copy is an independent draw of the same primitive.
        copy_keys = rng.bits(keys, rng.Stream.EXEMPLAR_COPY_KEYS, copies).reshape(-1)
        if isinstance(images, ImageList):
            repeated = ImageList(image for image in images for _ in range(copies))
        else:
            repeated = images.repeat_interleave(copies, dim=0)
        x = inception_preprocess(
            repeated,
            copy_keys,
            rng.Stream.EXEMPLAR_INCEPTION,
            self.input_size,
            train=True,
            preprocessing=self.preprocessing,
        )
        labels = torch.arange(batch, device=images.device).repeat_interleave(copies)
        return PretextInputs(standardize(x), labels)

    def forward(self, batch: PretextInputs) -> TaskOutput:
        embeddings = self.backbone(batch.inputs)["logits"]
        # Semi-hard selection compares distances closely: keep them in float32 under autocast.
        with torch.autocast(embeddings.device.type, enabled=False):
            normalised = normalize_embeddings(embeddings.float(), self.normalize)
            distances = pairwise_squared_distances(normalised)
        loss = semihard_triplet_loss_from_distances(distances, batch.labels, self.margin)
        metrics = {"nn_accuracy": nearest_neighbour_accuracy(distances, batch.labels)}
        return TaskOutput(loss, metrics)
