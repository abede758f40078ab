"""Semi-hard triplet loss on squared Euclidean distances (Exemplar; TF ``triplet_semihard_loss``).

For every ordered anchor–positive pair ``(a, p)`` (same label, ``p != a``) the negative is the one
with the smallest ``D(a, n)`` that is still larger than ``D(a, p)``; when no such negative exists,
the largest ``D(a, n)`` of that anchor is used. The loss is ``max(0, margin + D(a, p) - D(a, n))``
averaged over all positive pairs. The selection is vectorised: each anchor's negative distances
are sorted once and every positive distance is located in them with ``searchsorted``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "normalize_embeddings",
    "pairwise_squared_distances",
    "semihard_triplet_loss",
    "semihard_triplet_loss_from_distances",
]


def normalize_embeddings(embeddings: torch.Tensor, mode: str = "per_vector") -> torch.Tensor:
    """L2-normalise ``[N, D]`` embeddings per vector, or along the batch axis (``faithful_axis0``).

    ``faithful_axis0`` reproduces the released code, which gives each embedding *dimension* unit
    norm across the batch (``self_supervision/exemplar.py``).
    """
    if mode == "per_vector":
        return F.normalize(embeddings, dim=1)
    if mode == "faithful_axis0":
        return F.normalize(embeddings, dim=0)
    raise ValueError(f"normalize: expected 'per_vector' or 'faithful_axis0', got {mode!r}")


def pairwise_squared_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` squared Euclidean distances, clamped at 0, with an exact zero diagonal."""
    squared_norms = embeddings.square().sum(dim=1)
    gram = embeddings @ embeddings.T
    distances = (squared_norms[:, None] + squared_norms[None, :] - 2.0 * gram).clamp_min(0.0)
    eye = torch.eye(embeddings.shape[0], dtype=torch.bool, device=embeddings.device)
    return distances.masked_fill(eye, 0.0)


def semihard_triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.5
) -> torch.Tensor:
    """Mean semi-hard triplet loss of ``[N, D]`` embeddings with ``[N]`` integer labels.

    Every anchor needs at least one negative and the batch at least one positive pair.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings: expected [N, D], got shape {tuple(embeddings.shape)}")
    if labels.shape != (embeddings.shape[0],):
        raise ValueError(
            f"labels: expected shape ({embeddings.shape[0]},), got {tuple(labels.shape)}"
        )
    return semihard_triplet_loss_from_distances(
        pairwise_squared_distances(embeddings), labels, margin
    )


def semihard_triplet_loss_from_distances(
    distances: torch.Tensor, labels: torch.Tensor, margin: float = 0.5
) -> torch.Tensor:
    """:func:`semihard_triplet_loss` on a precomputed ``[N, N]`` distance matrix."""
    n = distances.shape[0]
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(n, dtype=torch.bool, device=labels.device)
    negative = ~same
    num_negatives = negative.sum(dim=1)
    if n and bool((num_negatives == 0).any()):
        anchor = int((num_negatives == 0).nonzero()[0])
        raise ValueError(
            f"labels: anchor {anchor} (label {int(labels[anchor])}) has no negative; "
            "the batch needs at least two distinct labels"
        )
    num_positives = positive.sum()
    if int(num_positives) == 0:
        raise ValueError("labels: no anchor-positive pair; every label appears only once")

    # Row a: the negatives' distances in increasing order, then +inf in place of non-negatives.
    sorted_negatives = distances.masked_fill(~negative, float("inf")).sort(dim=1).values
    # First negative strictly farther than D(a, p), for every (a, p) at once.
    first_farther = torch.searchsorted(sorted_negatives.detach(), distances.detach(), right=True)
    has_semihard = first_farther < num_negatives[:, None]
    semihard = sorted_negatives.gather(1, first_farther.clamp_max(n - 1))
    hardest_fallback = sorted_negatives.gather(1, (num_negatives - 1)[:, None]).expand(n, n)
    chosen = torch.where(has_semihard, semihard, hardest_fallback)
    per_pair = (margin + distances - chosen).clamp_min(0.0)
    return per_pair.masked_fill(~positive, 0.0).sum() / num_positives
