"""Relative Patch Location (the released ``self_supervision/relative_patch_location.py``): where
is a neighbour patch relative to the centre one?

All 8 (neighbour, centre) pairs of every image are classified; the classifier input is
``concat(embedding[neighbour], embedding[centre])`` (slot-major, see :mod:`ssltk.pretext.jigsaw`).
Label ``i`` is the ``i``-th non-centre grid position in row-major order: top-left, top, top-right,
left, right, bottom-left, bottom, bottom-right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssltk.config import Config
from ssltk.pretext.base import PretextInputs, TaskOutput, accuracy, register_task
from ssltk.pretext.patches import PatchHead, PatchTask
from ssltk.sections import RelativePatchLocationConfig

__all__ = ["RelativePatchLocation", "RelativePatchLocationConfig", "neighbour_centre_pairs"]


def neighbour_centre_pairs(embeddings: torch.Tensor) -> torch.Tensor:
    """``[B·(P-1), 2E]`` rows ``concat(embeddings[i, n], embeddings[i, centre])`` for every
    non-centre position ``n`` in row-major order, image-major, for ``[B, P, E]`` embeddings
    (``centre = P // 2``)."""
    centre = embeddings.shape[1] // 2
    neighbour = torch.cat([embeddings[:, :centre], embeddings[:, centre + 1 :]], dim=1)
    centre_rows = embeddings[:, centre : centre + 1].expand_as(neighbour)
    return torch.cat([neighbour, centre_rows], dim=-1).flatten(0, 1)


@register_task("relative_patch_location")
class RelativePatchLocation(PatchTask):
    """Classification of each neighbour's position around the centre patch."""

    config_section = RelativePatchLocationConfig
    paper_results = (("resnet50_v1", 8, {"Table 1": 50.5, "Table 2": 51.4}),)

    @classmethod
    def chance_level(cls, config: Config) -> float:
        return 1 / (config.pretext.patches.grid**2 - 1)

    @classmethod
    def from_config(cls, config: Config) -> RelativePatchLocation:
        section = config.pretext.relative_patch_location
        grid = config.pretext.patches.grid
        if grid % 2 == 0:
            raise ValueError(f"pretext.patches.grid={grid}: needs a centre patch, i.e. an odd grid")
        head = PatchHead(2 * section.embed_dim, section.hidden, grid * grid - 1, section.dropout)
        return cls(
            cls.patch_backbone(config, section.embed_dim),
            head,
            cls.layout_from_config(config),
            **cls.patch_options(config, section),
        )

    def prepare_batch(
        self, images: torch.Tensor, keys: torch.Tensor, batch_key: torch.Tensor, *, train: bool
    ) -> PretextInputs:
        patches = self.sample_patches(images, keys, train=train)
        num_neighbours = self.layout.grid**2 - 1
        labels = torch.arange(num_neighbours, device=images.device).repeat(len(images))
        return PretextInputs(patches, labels)

    def forward(self, batch: PretextInputs) -> TaskOutput:
        embeddings = self.embed(batch.inputs)  # [B, P, E]
        logits = self.head(neighbour_centre_pairs(embeddings))
        loss = F.cross_entropy(logits, batch.labels)
        return TaskOutput(loss, {"accuracy": accuracy(logits, batch.labels)})
