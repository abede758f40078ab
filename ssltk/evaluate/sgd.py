"""The released linear evaluation: heads trained with SGD on a frozen backbone.

One head per endpoint, trained together (the loss is the sum of their mean cross-entropies), with
momentum 0.9, ``base_lr`` per 256 images, ×0.1 decays and no warm-up, as the official
``self_supervision/linear_eval.py``. A head is a Linear layer, or the released MLP head (1000
hidden units, ReLU, dropout 0.5). With ``augment`` each step reads the backbone on random crops of
the batch (the training augmentation); without it the heads train on the cached centre-crop
features. Batches, crops and head initialisation come from the seed, so the result is
deterministic. Registers probes ``sgd``
and ``mlp``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssltk.data.dataset import PreparedSplit
from ssltk.data.loader import DeterministicLoader
from ssltk.evaluate.finite import require_finite
from ssltk.evaluate.lbfgs import topk_accuracy
from ssltk.evaluate.pooling import make_pool
from ssltk.evaluate.probe import Figures, ProbeInputs, register_probe
from ssltk.pretext.base import TaskOutput
from ssltk.sections import MlpProbeConfig, SgdProbeConfig
from ssltk.train.engine import Trainer
from ssltk.train.schedule import StepSchedule

__all__ = ["ProbeHeads", "predict", "train_heads"]

#: Reads pooled endpoints of uint8 images; random crops where keys are given.
Represent = Callable[[torch.Tensor, torch.Tensor | None], Mapping[str, torch.Tensor]]


def _glorot(layer: nn.Linear) -> nn.Linear:
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _head(features: int, classes: int, mlp: MlpProbeConfig | None) -> nn.Module:
    if mlp is None:
        return _glorot(nn.Linear(features, classes))
    return nn.Sequential(
        _glorot(nn.Linear(features, mlp.hidden)),
        nn.ReLU(inplace=True),
        nn.Dropout(mlp.dropout),
        _glorot(nn.Linear(mlp.hidden, classes)),
    )


class ProbeHeads(nn.ModuleDict):
    """``{layer: head}``; calling it on ``{layer: features}`` returns ``{layer: logits}``."""

    def __init__(
        self, dims: Mapping[str, int], classes: int, mlp: MlpProbeConfig | None = None
    ) -> None:
        # ModuleDict keys cannot contain dots; endpoint names never do.
        super().__init__({layer: _head(d, classes, mlp) for layer, d in dims.items()})

    def forward(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {layer: head(features[layer]) for layer, head in self.items()}


class _SummedLoss(nn.Module):
    """The heads as the pretraining engine's :class:`Trainer` sees a task: the loss of a
    ``(features, labels)`` batch is the sum of the heads' mean cross-entropies."""

    def __init__(self, heads: ProbeHeads) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, batch: tuple[Mapping[str, torch.Tensor], torch.Tensor]) -> TaskOutput:
        features, labels = batch
        logits = self.heads(features)
        return TaskOutput(sum(F.cross_entropy(v, labels) for v in logits.values()), {})


def train_heads(
    split: PreparedSplit,
    dims: Mapping[str, int],
    config: SgdProbeConfig,
    *,
    seed: int,
    represent: Represent | None = None,
    features: Mapping[str, np.ndarray] | None = None,
    device: torch.device = torch.device("cpu"),
    log: Callable[[int, int, float], None] | None = None,
) -> ProbeHeads:
    """Train heads on ``split``: from ``represent`` (augmented, online) when
    ``config.augment``, else from the cached ``features`` rows of the split.
    """
    if config.augment and represent is None:
        raise ValueError("train_heads: augment needs a represent function")
    if not config.augment and features is None:
        raise ValueError("train_heads: without augment it needs cached features")
    mlp = config if isinstance(config, MlpProbeConfig) else None
    batch = min(config.batch_size, len(split))
    loader = DeterministicLoader(split, batch, seed=seed, shuffle=True, drop_last=True)
    steps_per_epoch = loader.steps_per_epoch
    schedule = StepSchedule.from_epochs(
        base_lr=config.base_lr,
        batch_size=batch,
        steps_per_epoch=steps_per_epoch,
        warmup_epochs=0,
        decay_epochs=config.decay_epochs,
        decay_factor=0.1,
    )
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)  # head init and dropout; the caller's stream is restored below
    try:
        heads = ProbeHeads(dims, split.num_classes, mlp).to(device).train()
        optimizer = torch.optim.SGD(
            heads.parameters(), lr=0.0, momentum=0.9, weight_decay=config.weight_decay
        )
        trainer = Trainer(_SummedLoss(heads), optimizer, schedule, device=device)
        step = 0
        for epoch in range(config.epochs):
            total = 0.0
            for item in loader.epoch(epoch):
                if config.augment:
                    images = item.images.to(device)
                    inputs = represent(images, item.keys.to(device))
                else:
                    rows = item.indices.numpy()
                    inputs = {
                        layer: torch.tensor(np.asarray(features[layer][rows]), device=device)
                        for layer in dims
                    }
                features_now = {layer: inputs[layer].float() for layer in dims}
                _, metrics = trainer.step((features_now, item.labels.to(device)), step)
                total += float(metrics["loss"])
                step += 1
            if log is not None:
                log(epoch + 1, config.epochs, total / steps_per_epoch)
    finally:
        torch.set_rng_state(generator_state)
    return heads.eval()


@torch.no_grad()
def predict(
    heads: ProbeHeads, features: Mapping[str, np.ndarray], *, batch_size: int = 4096
) -> dict[str, np.ndarray]:
    """Logits of every head over cached features, in row order."""
    device = next(heads.parameters()).device
    out: dict[str, list[np.ndarray]] = {layer: [] for layer in heads}
    rows = len(next(iter(features.values())))
    for start in range(0, rows, batch_size):
        chunk = {
            layer: torch.tensor(
                np.asarray(features[layer][start : start + batch_size]), device=device
            )
            for layer in heads
        }
        for layer, logits in heads(chunk).items():
            out[layer].append(logits.float().cpu().numpy())
    return {layer: np.concatenate(parts) for layer, parts in out.items()}


def _fit_heads(inputs: ProbeInputs) -> Figures:
    """Probes ``sgd`` and ``mlp``: heads on ``train`` (:func:`train_heads`), scored on the
    report split's cached features."""
    ev, train = inputs.target.config.eval, inputs.features["train"]
    dims = {layer: int(train.layers[layer].shape[1]) for layer in inputs.layers}
    pool = make_pool(ev.max_features, ev.pooling)

    def represent(images: torch.Tensor, keys: torch.Tensor | None):
        return inputs.target.task.representation(images, inputs.layers, pool=pool, keys=keys)

    heads = train_heads(
        inputs.splits["train"],
        dims,
        inputs.section,
        seed=inputs.target.config.seed,
        represent=represent,
        features=train.layers,
        device=inputs.device,
        log=lambda epoch, total, loss: inputs.log(
            f"probe {ev.method} epoch {epoch}/{total}: loss {loss:.4f}"
        ),
    )
    for layer, head in heads.items():
        for weights in head.parameters():
            require_finite(weights, "probe weights", layer, "train")
    report = inputs.features[inputs.report_split]
    logits = predict(heads, report.layers)
    for layer in inputs.layers:
        require_finite(logits[layer], "logits", layer, inputs.report_split)
    return {
        layer: {
            "top1": topk_accuracy(logits[layer], report.labels, 1),
            "top5": topk_accuracy(logits[layer], report.labels, 5),
        }
        for layer in inputs.layers
    }


register_probe("sgd")(_fit_heads)
register_probe("mlp")(_fit_heads)
