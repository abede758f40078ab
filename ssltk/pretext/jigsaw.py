"""Jigsaw (the released ``self_supervision/jigsaw.py``): classify which of 100 permutations
shuffled an image's 3×3 patches.

Each patch is embedded by the backbone in patch mode; for permutation π, slot s of the classifier
input receives the embedding of patch π[s], and the slots are concatenated slot-major
(``9 · embed_dim`` features; the original interleaves channels, which is the same dense layer up to
a fixed reordering of its inputs). Training uses ``perm_subset`` permutations per step shared by
the whole batch (drawn from the batch key) or, with ``per_image_perms``, drawn per image from its
key; evaluation scores all permutations for every image. Labels index the full set, so the head
always has one output per permutation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssltk.config import Config
from ssltk.data import rng
from ssltk.data.augment import Preprocessing
from ssltk.pretext.base import PretextInputs, TaskOutput, accuracy, register_task
from ssltk.pretext.geometry import PatchLayout
from ssltk.pretext.patches import PatchHead, PatchTask
from ssltk.pretext.permutations import load_permutations
from ssltk.sections import JigsawConfig

__all__ = ["Jigsaw", "JigsawConfig", "arrange_slots"]


def arrange_slots(embeddings: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Classifier inputs ``[B·K, P·E]``: for image ``i`` and permutation ``order[i, k]``, slot ``s``
    holds ``embeddings[i, order[i, k, s]]``; slots are concatenated slot-major.

    ``embeddings`` is ``[B, P, E]``, ``order`` ``[B, K, P]``.
    """
    image = torch.arange(embeddings.shape[0], device=embeddings.device)[:, None, None]
    return embeddings[image, order].flatten(0, 1).flatten(1)


@register_task("jigsaw")
class Jigsaw(PatchTask):
    """Permutation classification over the patches of a grid."""

    config_section = JigsawConfig
    paper_results = (("resnet50_v1", 8, {"Table 2": 44.6}),)

    @classmethod
    def chance_level(cls, config: Config) -> float:
        return 1 / len(load_permutations())

    def __init__(
        self,
        backbone: nn.Module,
        head: PatchHead,
        layout: PatchLayout,
        permutations: torch.Tensor,
        *,
        perm_subset: int,
        per_image_perms: bool,
        head_weight_decay: float,
        grayscale_p: float,
        preprocessing: Preprocessing = "symmetric",
    ) -> None:
        super().__init__(
            backbone,
            head,
            layout,
            head_weight_decay=head_weight_decay,
            grayscale_p=grayscale_p,
            preprocessing=preprocessing,
        )
        self.perm_subset, self.per_image_perms = perm_subset, per_image_perms
        self.register_buffer("permutations", permutations, persistent=False)

    @classmethod
    def from_config(cls, config: Config) -> Jigsaw:
        section = config.pretext.jigsaw
        permutations = load_permutations()
        grid = config.pretext.patches.grid
        if permutations.shape[1] != grid * grid:
            raise ValueError(
                f"pretext.patches.grid={grid}: the permutation set orders "
                f"{permutations.shape[1]} patches, i.e. a 3×3 grid"
            )
        head = PatchHead(
            grid * grid * section.embed_dim, section.hidden, permutations.shape[0], section.dropout
        )
        return cls(
            cls.patch_backbone(config, section.embed_dim),
            head,
            cls.layout_from_config(config),
            permutations,
            perm_subset=section.perm_subset,
            per_image_perms=section.per_image_perms,
            **cls.patch_options(config, section),
        )

    def choose_permutations(
        self, keys: torch.Tensor, batch_key: torch.Tensor, *, train: bool
    ) -> torch.Tensor:
        """``[B, K]`` indices into the permutation set for each image."""
        count = self.permutations.shape[0]
        batch = keys.shape[0]
        if not train:
            return torch.arange(count).expand(batch, count)
        subset = self.perm_subset
        if self.per_image_perms:
            return rng.permutation(keys, rng.Stream.JIGSAW_PERMUTATIONS, count)[:, :subset].cpu()
        shared = rng.permutation(batch_key, rng.Stream.JIGSAW_PERMUTATIONS, count)[0, :subset].cpu()
        return shared.expand(batch, subset)

    def prepare_batch(
        self, images: torch.Tensor, keys: torch.Tensor, batch_key: torch.Tensor, *, train: bool
    ) -> PretextInputs:
        patches = self.sample_patches(images, keys, train=train)
        chosen = self.choose_permutations(keys, batch_key, train=train)
        return PretextInputs(patches, chosen.reshape(-1).to(images.device))

    def forward(self, batch: PretextInputs) -> TaskOutput:
        embeddings = self.embed(batch.inputs)  # [B, 9, E]
        order = self.permutations[batch.labels].view(embeddings.shape[0], -1, embeddings.shape[1])
        logits = self.head(arrange_slots(embeddings, order))
        loss = F.cross_entropy(logits, batch.labels)
        return TaskOutput(loss, {"accuracy": accuracy(logits, batch.labels)})
