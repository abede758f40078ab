"""Exemplar's pretext figure, nearest-neighbour accuracy, on inputs whose answer is known by hand.

The metric is what ``epoch/nn_accuracy`` and the report's "pretext ÷ chance" column show; a
bound check (``0 <= value <= 1``) cannot tell a metric that counts each embedding as its own
neighbour (always 1.0) from the real one.
"""

from __future__ import annotations

import torch

from ssltk.pretext.base import PretextInputs
from ssltk.pretext.exemplar import Exemplar, nearest_neighbour_accuracy
from ssltk.pretext.triplet import pairwise_squared_distances


def test_nearest_neighbour_accuracy_of_a_hand_made_distance_matrix():
    # Six embeddings, labels 0 0 0 1 1 2. Each row's nearest *other* point, by hand:
    #   0 → 1 (label 0, right)   1 → 0 (right)   2 → 3 (label 1, wrong)
    #   3 → 4 (right)            4 → 2 (label 0, wrong)   5 → 0 (label 0, wrong)
    # so 3 of 6 are right. The diagonal is 0, the smallest entry of every row: a metric that
    # lets a point be its own neighbour says 6 of 6.
    d = torch.tensor(
        [
            [0.0, 1.0, 5.0, 6.0, 7.0, 2.0],
            [1.0, 0.0, 4.0, 6.0, 6.0, 3.0],
            [5.0, 4.0, 0.0, 0.5, 0.2, 9.0],
            [6.0, 6.0, 0.5, 0.0, 0.4, 8.0],
            [7.0, 6.0, 0.2, 0.4, 0.0, 9.0],
            [2.0, 3.0, 9.0, 8.0, 9.0, 0.0],
        ]
    )
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    assert nearest_neighbour_accuracy(d, labels).item() == 0.5
    # Relabelling so that every nearest neighbour agrees gives 1; so that none does, 0.
    assert nearest_neighbour_accuracy(d, torch.tensor([0, 0, 1, 1, 1, 0])).item() == 1.0
    assert nearest_neighbour_accuracy(d, torch.tensor([0, 1, 2, 3, 4, 5])).item() == 0.0
    # The input is not modified (the diagonal is masked on a copy).
    assert d.diagonal().eq(0).all()


class _FixedEmbedding(torch.nn.Module):
    """A backbone whose ``logits`` are given embeddings, whatever the input."""

    def __init__(self, embeddings: torch.Tensor) -> None:
        super().__init__()
        self.embeddings = torch.nn.Parameter(embeddings.clone())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.embeddings * 1.0}


def test_exemplar_reports_the_nearest_neighbour_accuracy_of_its_own_embeddings():
    # Two copies each of three images (labels 0 0 1 1 2 2), 2-d embeddings on the unit circle:
    # image 0's copies sit together, image 1's copies are far apart, each next to a copy of
    # image 2. Nearest others: 0↔1 right; 2 → 4 and 4 → 2 wrong; 3 → 5 and 5 → 3 wrong: 2 of 6.
    angle = torch.tensor([0.0, 0.05, 2.0, 4.0, 2.02, 4.03])
    embeddings = torch.stack([angle.cos(), angle.sin()], dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    task = Exemplar(
        _FixedEmbedding(embeddings),
        8,
        copies=2,
        grayscale_p=0.0,
        margin=0.5,
        normalize="per_vector",
    )
    out = task(PretextInputs(torch.zeros(6, 3, 8, 8), labels))
    assert abs(out.metrics["nn_accuracy"].item() - 2 / 6) < 1e-6
    # The same figure from the distances the loss uses.
    expected = nearest_neighbour_accuracy(pairwise_squared_distances(embeddings), labels)
    assert out.metrics["nn_accuracy"].item() == expected.item()
