"""The params.yaml sections of the shipped tasks (``pretext.<task>``) and probes
(``eval.<method>``), apart from their code so that reading params.yaml imports no torch.

A task or probe from outside ssltk may keep its section in its own module (see
:mod:`ssltk.registry`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ssltk.schema import NonNegFloat, PositiveInt, Probability, Section

__all__ = [
    "ExemplarConfig",
    "JigsawConfig",
    "KnnProbeConfig",
    "LbfgsConfig",
    "MlpProbeConfig",
    "PatchHeadConfig",
    "RelativePatchLocationConfig",
    "RotationConfig",
    "SgdProbeConfig",
    "trains_on_val",
]


class RotationConfig(Section):
    crop: Literal["inception", "center"] = Field(
        "inception",
        description="training preprocessing: the paper's inception crop, or the evaluation's "
        "centre crop (for tiny images, where inception crops are a few blurred pixels)",
    )


class ExemplarConfig(Section):
    copies: Annotated[int, Field(ge=2)] = 8
    grayscale_p: Probability = 0.66
    embed_dim: PositiveInt = 1000
    margin: NonNegFloat = 0.5
    normalize: Literal["per_vector", "faithful_axis0"] = "per_vector"


class PatchHeadConfig(Section):
    """The per-patch embedding and the MLP head of a patch task (its ``pretext.<name>`` keys)."""

    embed_dim: PositiveInt = 1000
    hidden: PositiveInt = 4096
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.5
    weight_decay: NonNegFloat = 5e-4


class JigsawConfig(PatchHeadConfig):
    perm_subset: Annotated[int, Field(ge=1, le=100)] = 8
    per_image_perms: bool = False


class RelativePatchLocationConfig(PatchHeadConfig):
    pass


class LbfgsConfig(Section):
    l2: list[NonNegFloat] = Field([1e-4, 1e-3, 1e-2, 1e-1], min_length=1)
    max_iter: PositiveInt = 500
    tol: float = Field(
        1e-5,
        gt=0,
        description="a fit ends when its largest gradient entry in (W, b) is at most this "
        "(scikit-learn's tol test; its default is 1e-4)",
    )


class KnnProbeConfig(Section):
    """Weighted k-nearest-neighbour classifier on the cached features (:mod:`ssltk.evaluate.knn`):
    cosine similarity, votes weighted by ``exp(similarity / temperature)`` (Wu et al. 2018, as
    DINO and solo-learn report it); ``k`` chosen on ``val`` when ``ks`` lists more than one."""

    ks: list[PositiveInt] = Field([10, 20, 100, 200], min_length=1)
    temperature: Annotated[float, Field(gt=0)] = 0.07
    batch_size: PositiveInt = Field(1024, description="query rows per similarity block")
    layers: list[str] | None = Field(
        None,
        description="the eval.layers it reads (null: all of them); its cost is a matmul of "
        "every query row with every training row, per layer",
    )


class SgdProbeConfig(Section):
    epochs: PositiveInt = 70
    batch_size: PositiveInt = 512
    base_lr: Annotated[float, Field(gt=0)] = 0.1
    decay_epochs: list[NonNegFloat] = Field([30, 50])
    weight_decay: NonNegFloat = 0.0
    augment: bool = True
    train_split: Literal["train", "trainval"] = Field(
        "train", description="trainval: train and val together, as the released protocol"
    )


def trains_on_val(section: SgdProbeConfig) -> bool:
    """Whether probe ``sgd``/``mlp`` with ``section`` reads val (``train_split: trainval``)."""
    return section.train_split == "trainval"


class MlpProbeConfig(SgdProbeConfig):
    hidden: PositiveInt = 1000
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.5
