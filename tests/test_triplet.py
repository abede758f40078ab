"""Semi-hard triplet loss (paper §2.2) against a brute-force triple loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssltk.pretext.triplet import (
    normalize_embeddings,
    pairwise_squared_distances,
    semihard_triplet_loss,
)


def brute_force_loss(embeddings: torch.Tensor, labels: list[int], margin: float) -> float:
    """Loops over anchors, positives and negatives on directly computed squared distances."""
    n = len(labels)

    def dist(i: int, j: int) -> float:
        return float(((embeddings[i] - embeddings[j]) ** 2).sum())

    total, pairs = 0.0, 0
    for a in range(n):
        negatives = [dist(a, k) for k in range(n) if labels[k] != labels[a]]
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            d_ap = dist(a, p)
            farther = [d for d in negatives if d > d_ap]
            d_an = min(farther) if farther else max(negatives)
            total += max(0.0, margin + d_ap - d_an)
            pairs += 1
    return total / pairs


def exemplar_labels(num_images: int, copies: int) -> list[int]:
    return [i for i in range(num_images) for _ in range(copies)]


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    num_images=st.integers(2, 4),
    copies=st.integers(2, 4),
    dim=st.integers(1, 4),
    margin=st.sampled_from([0.0, 0.5, 2.0, 10.0]),
)
def test_matches_brute_force_on_integer_embeddings(data, num_images, copies, dim, margin):
    # Small integers keep every distance exact in float64, so ties (and the strict D(a,n) > D(a,p)
    # of the semi-hard rule) resolve the same way in both implementations.
    n = num_images * copies
    values = data.draw(st.lists(st.integers(-3, 3), min_size=n * dim, max_size=n * dim))
    embeddings = torch.tensor(values, dtype=torch.float64).view(n, dim)
    labels = exemplar_labels(num_images, copies)
    loss = semihard_triplet_loss(embeddings, torch.tensor(labels), margin)
    assert float(loss) == pytest.approx(brute_force_loss(embeddings, labels, margin), abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    labels=st.lists(st.integers(0, 3), min_size=3, max_size=12).filter(
        lambda ls: len(set(ls)) >= 2 and len(ls) > len(set(ls))
    ),
)
def test_matches_brute_force_on_random_normalised_embeddings(seed, labels):
    g = torch.Generator().manual_seed(seed)
    embeddings = normalize_embeddings(torch.randn(len(labels), 5, generator=g, dtype=torch.float64))
    loss = semihard_triplet_loss(embeddings, torch.tensor(labels), 0.5)
    assert float(loss) == pytest.approx(brute_force_loss(embeddings, labels, 0.5), abs=1e-9)


def test_no_semihard_negative_falls_back_to_largest_negative_distance():
    # Positives are far apart (D = 100) and every negative is closer, so no semi-hard negative
    # exists: each pair uses the largest negative distance of its anchor.
    embeddings = torch.tensor([[0.0], [10.0], [1.0], [3.0]], dtype=torch.float64)
    labels = [0, 0, 1, 1]
    loss = semihard_triplet_loss(embeddings, torch.tensor(labels), 0.5)
    # Anchor 0: D(0,1)=100, negatives {1, 9} → 0.5+100-9; anchor 1: D=100, negatives {81, 49} →
    # 0.5+100-81; anchor 2: D(2,3)=4, negatives {1, 81} → semi-hard 81 → 0; anchor 3: {9, 49} → 0.
    expected = ((0.5 + 100 - 9) + (0.5 + 100 - 81)) / 4
    assert float(loss) == pytest.approx(expected)
    assert float(loss) == pytest.approx(brute_force_loss(embeddings, labels, 0.5))


def test_gradient_flows_to_anchor_positive_and_negative():
    embeddings = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.9], [3.0, 3.0]], requires_grad=True)
    loss = semihard_triplet_loss(embeddings, torch.tensor([0, 0, 1, 1]), 2.0)
    loss.backward()
    assert loss.item() > 0
    assert torch.isfinite(embeddings.grad).all()
    assert (embeddings.grad[:3].abs().sum(dim=1) > 0).all()


def test_distances_are_squared_euclidean_with_zero_diagonal():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    expected = torch.tensor([[0.0, 25.0, 2.0], [25.0, 0.0, 13.0], [2.0, 13.0, 0.0]])
    torch.testing.assert_close(pairwise_squared_distances(x), expected)


def test_normalisation_modes():
    x = torch.tensor([[3.0, 0.0], [4.0, 2.0]])
    torch.testing.assert_close(normalize_embeddings(x).norm(dim=1), torch.ones(2))
    torch.testing.assert_close(normalize_embeddings(x, "faithful_axis0").norm(dim=0), torch.ones(2))
    with pytest.raises(ValueError, match="normalize"):
        normalize_embeddings(x, "axis2")


def test_degenerate_label_sets_are_rejected():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="no negative"):
        semihard_triplet_loss(x, torch.tensor([0, 0, 0, 0]))
    with pytest.raises(ValueError, match="no anchor-positive pair"):
        semihard_triplet_loss(x, torch.tensor([0, 1, 2, 3]))
