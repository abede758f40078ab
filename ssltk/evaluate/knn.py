"""Probe ``knn``: a weighted k-nearest-neighbour classifier on the cached features of each layer.

Cosine similarity between a query and every training row; the ``k`` most similar vote for their
labels with weight ``exp(similarity / temperature)`` (Wu et al. 2018, "Unsupervised feature
learning via non-parametric instance discrimination"; the protocol DINO's ``eval_knn.py`` and
solo-learn's ``knn.py`` report, T = 0.07). ``k`` is chosen on ``val`` (ties: the smaller ``k``)
when ``eval.knn.ks`` lists more than one, and the figures are those of that ``k`` on the report
split. Nothing is trained or drawn at random: the same features give the same figures.

Training rows are streamed in blocks (memory-mapped caches are never copied whole), and each
query block keeps a running top-``k`` over them, so memory is a block of similarities.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ssltk.errors import UserError
from ssltk.evaluate.finite import require_finite
from ssltk.evaluate.lbfgs import topk_accuracy
from ssltk.evaluate.probe import Figures, ProbeInputs, register_probe

__all__ = ["fit_knn", "knn_class_scores", "nearest"]

#: Training rows per similarity block.
TRAIN_BLOCK = 16384


def _normalized(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    block = torch.from_numpy(np.array(rows, dtype=np.float32)).to(device)  # a copy: writable
    return F.normalize(block, dim=1)


def nearest(
    train: np.ndarray,
    query: np.ndarray,
    k: int,
    *,
    batch_size: int = 1024,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` training rows most cosine-similar to each query row: ``(similarities, indices)``,
    each ``[len(query), k]``, most similar first."""
    device = device or torch.device("cpu")
    k = min(k, len(train))
    sims, index = [], []
    for start in range(0, len(query), batch_size):
        q = _normalized(query[start : start + batch_size], device)
        best = torch.full((len(q), 0), -torch.inf, device=device)
        best_index = torch.zeros((len(q), 0), dtype=torch.int64, device=device)
        for offset in range(0, len(train), TRAIN_BLOCK):
            block = q @ _normalized(train[offset : offset + TRAIN_BLOCK], device).T
            ids = torch.arange(offset, offset + block.shape[1], device=device).expand_as(block)
            merged = torch.cat([best, block], dim=1)
            merged_ids = torch.cat([best_index, ids], dim=1)
            best, at = merged.topk(min(k, merged.shape[1]), dim=1)
            best_index = merged_ids.gather(1, at)
        sims.append(best.cpu())
        index.append(best_index.cpu())
    return torch.cat(sims), torch.cat(index)


def knn_class_scores(
    sims: torch.Tensor,
    index: torch.Tensor,
    train_labels: np.ndarray,
    num_classes: int,
    k: int,
    temperature: float,
) -> np.ndarray:
    """float64 ``[m, num_classes]``: each class's sum of ``exp(sim / T)`` over the first ``k``
    neighbours of each query (``sims``/``index`` from :func:`nearest`)."""
    k = min(k, sims.shape[1])
    labels = torch.from_numpy(np.asarray(train_labels, dtype=np.int64))[index[:, :k]]
    weights = (sims[:, :k].double() / temperature).exp()
    scores = torch.zeros((len(sims), num_classes), dtype=torch.float64)
    return scores.scatter_add_(1, labels, weights).numpy()


def _scores(
    inputs: ProbeInputs, layer: str, split: str, ks: Sequence[int]
) -> dict[int, np.ndarray]:
    """Class scores of every row of ``split`` at ``layer``, for each ``k`` of ``ks``."""
    section, train = inputs.section, inputs.features["train"]
    sims, index = nearest(
        train.layers[layer],
        inputs.features[split].layers[layer],
        max(ks),
        batch_size=section.batch_size,
        device=inputs.device,
    )
    num_classes = inputs.splits["train"].num_classes
    return {
        k: knn_class_scores(sims, index, train.labels, num_classes, k, section.temperature)
        for k in ks
    }


@register_probe("knn")
def fit_knn(inputs: ProbeInputs) -> Figures:
    section, split = inputs.section, inputs.report_split
    labels = inputs.features[split].labels
    ks: Sequence[int] = sorted(set(section.ks))
    figures: Figures = {}
    wanted = inputs.layers if section.layers is None else section.layers
    for layer in wanted:
        if layer not in inputs.layers:
            raise UserError(
                f"eval.knn.layers: {layer!r} is not among eval.layers ({', '.join(inputs.layers)})"
            )
    for layer in (name for name in inputs.layers if name in wanted):
        clock = time.perf_counter()
        k, chosen = ks[0], {}
        if "val" in inputs.features and len(ks) > 1:
            val_labels = inputs.features["val"].labels
            on_val = {
                kk: topk_accuracy(s, val_labels, 1)
                for kk, s in _scores(inputs, layer, "val", ks).items()
            }
            k = max(ks, key=lambda kk: (on_val[kk], -kk))  # best on val; ties: the smaller k
            chosen = {"val_top1": on_val[k]}
        scores = _scores(inputs, layer, split, [k])[k]
        require_finite(scores, "knn class scores", layer, split)
        top1, top5 = (topk_accuracy(scores, labels, t) for t in (1, 5))
        figures[layer] = {"top1": top1, "top5": top5, "k": float(k), **chosen}
        inputs.log(
            f"probe knn {layer}: top-1 {top1:.4f} on {split} "
            f"(k {k}, T {section.temperature:g}, {time.perf_counter() - clock:.1f} s)"
        )
    return figures
