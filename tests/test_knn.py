"""The kNN probe against a brute-force reference written from its definition."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from ssltk.evaluate.features import Features
from ssltk.evaluate.knn import TRAIN_BLOCK, fit_knn, knn_class_scores, nearest
from ssltk.evaluate.probe import ProbeInputs
from ssltk.sections import KnnProbeConfig


def reference_scores(train, labels, query, classes: int, k: int, t: float) -> np.ndarray:
    """Per query: cosine similarity to every training row by loops, the k most similar vote
    exp(sim / t) for their label."""
    out = np.zeros((len(query), classes))
    for i, q in enumerate(query.astype(np.float64)):
        sims = [
            float(q @ x / (np.linalg.norm(q) * np.linalg.norm(x))) for x in train.astype(np.float64)
        ]
        for j in sorted(range(len(train)), key=lambda j: -sims[j])[:k]:
            out[i, labels[j]] += np.exp(sims[j] / t)
    return out


def blobs(rng: np.random.Generator, n: int, classes: int, dim: int = 12):
    centres = rng.normal(size=(classes, dim))
    labels = rng.integers(0, classes, n)
    return (centres[labels] + 1.2 * rng.normal(size=(n, dim))).astype(np.float32), labels


def test_knn_scores_match_a_brute_force_reference():
    rng = np.random.default_rng(0)
    train, labels = blobs(rng, 90, 4)
    query, _ = blobs(rng, 25, 4)
    for k in (1, 10, 20, 200):  # 200 > 90 training rows: every row votes
        sims, index = nearest(train, query, k, batch_size=7)
        got = knn_class_scores(sims, index, labels, 4, k, 0.07)
        want = reference_scores(train, labels, query, 4, k, 0.07)
        np.testing.assert_allclose(got, want, rtol=1e-4)
        assert (got.argmax(1) == want.argmax(1)).all()


def test_blocks_of_training_rows_give_the_same_neighbours(monkeypatch):
    rng = np.random.default_rng(1)
    train, _ = blobs(rng, 50, 3)
    query, _ = blobs(rng, 9, 3)
    whole = nearest(train, query, 20)
    monkeypatch.setattr("ssltk.evaluate.knn.TRAIN_BLOCK", 8)  # running top-k over 7 blocks
    assert TRAIN_BLOCK != 8
    blocked = nearest(train, query, 20)
    torch.testing.assert_close(blocked[0], whole[0])
    assert torch.equal(blocked[1], whole[1])


def test_the_probe_chooses_k_on_val_and_reports_it_on_the_report_split_deterministically():
    rng = np.random.default_rng(2)
    splits = {name: blobs(rng, n, 5) for name, n in (("train", 120), ("val", 40), ("test", 60))}
    features = {
        name: Features({"pre_logits": x}, y.astype(np.int64), cached=True)
        for name, (x, y) in splits.items()
    }
    section = KnnProbeConfig(ks=[1, 10, 20, 100])
    inputs = ProbeInputs(
        target=None,
        splits={"train": SimpleNamespace(num_classes=5)},
        layers=["pre_logits"],
        features=features,
        section=section,
        report_split="test",
        device=torch.device("cpu"),
        log=lambda line: None,
    )
    figures = fit_knn(inputs)["pre_logits"]
    on_val = {}
    for k in section.ks:
        scores = reference_scores(*splits["train"], splits["val"][0], 5, k, 0.07)
        on_val[k] = float((scores.argmax(1) == splits["val"][1]).mean())
    best = max(section.ks, key=lambda k: (on_val[k], -k))
    assert figures["k"] == best and figures["val_top1"] == on_val[best]
    test = reference_scores(*splits["train"], splits["test"][0], 5, best, 0.07)
    assert figures["top1"] == float((test.argmax(1) == splits["test"][1]).mean())
    assert figures["top5"] == 1.0  # 5 classes
    assert fit_knn(inputs) == {"pre_logits": figures}
