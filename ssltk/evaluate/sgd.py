"""The released linear evaluation: heads trained with SGD on a frozen backbone.

One head per endpoint, trained together (the loss is the sum of their mean cross-entropies), with
momentum 0.9, ``base_lr`` per 256 images, ×0.1 decays and no warm-up, as the official
``self_supervision/linear_eval.py``. A head is a Linear layer, or the released MLP head (1000
hidden units, ReLU, dropout 0.5). With ``augment`` each step reads the backbone on random crops of
the batch (the training augmentation); without it the heads train on the cached centre-crop
features. Batches, crops and head initialisation come from the seed, so the result is
deterministic. Training checkpoints after every epoch and, on SIGTERM or Ctrl-C, after the step it
is in (then exit 130); a rerun resumes there and ends with the uninterrupted run's heads. With
``train_split: trainval`` the heads train on train and val together (the released protocol).
Registers probes ``sgd`` and ``mlp``.
"""

from __future__ import annotations

import hashlib
import io
import json
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssltk.data.dataset import ConcatSplit, PreparedSplit
from ssltk.data.loader import DeterministicLoader
from ssltk.evaluate.finite import require_finite
from ssltk.evaluate.lbfgs import topk_accuracy
from ssltk.evaluate.pooling import make_pool
from ssltk.evaluate.probe import Figures, ProbeInputs, register_probe
from ssltk.fsutil import write_atomic
from ssltk.pretext.base import TaskOutput
from ssltk.sections import MlpProbeConfig, SgdProbeConfig, trains_on_val
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
    checkpoint: Path | None = None,
    fingerprint: str = "",
    workers: int = 0,
) -> ProbeHeads:
    """Train heads on ``split``: from ``represent`` (augmented, online) when
    ``config.augment``, else from the cached ``features`` rows of the split.

    ``checkpoint``: where training state is kept (see the module docstring); a checkpoint of
    another ``fingerprint`` (other inputs) is ignored. ``workers`` loader processes decode images.
    """
    if config.augment and represent is None:
        raise ValueError("train_heads: augment needs a represent function")
    if not config.augment and features is None:
        raise ValueError("train_heads: without augment it needs cached features")
    mlp = config if isinstance(config, MlpProbeConfig) else None
    batch = min(config.batch_size, len(split))
    loader = DeterministicLoader(
        split,
        batch,
        seed=seed,
        shuffle=True,
        drop_last=True,
        workers=workers if config.augment else 0,
    )
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
        start_epoch, start_step, total = _load(checkpoint, fingerprint, heads, optimizer)
        step = start_epoch * steps_per_epoch + start_step
        with _stop_on_signal() as stop:
            for epoch in range(start_epoch, config.epochs):
                total = total if epoch == start_epoch else 0.0
                first = start_step if epoch == start_epoch else 0
                for item in loader.epoch(epoch, first):
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
                    if stop.is_set():  # checkpoint the finished step, then stop (exit 130)
                        position = (epoch, item.step + 1, total)
                        _save(checkpoint, fingerprint, heads, optimizer, position)
                        raise KeyboardInterrupt
                _save(checkpoint, fingerprint, heads, optimizer, (epoch + 1, 0, 0.0))
                if log is not None:
                    log(epoch + 1, config.epochs, total / steps_per_epoch)
    finally:
        torch.set_rng_state(generator_state)
    return heads.eval()


@contextmanager
def _stop_on_signal() -> Iterator[threading.Event]:
    """SIGTERM / SIGINT set the event (the loop checkpoints after its step, then stops); a
    second one interrupts at once. Outside the main thread: no handlers, the event never set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _save(
    path: Path | None,
    fingerprint: str,
    heads: nn.Module,
    optimizer: torch.optim.Optimizer,
    position: tuple[int, int, float],
) -> None:
    if path is None:
        return
    state = {
        "fingerprint": fingerprint,
        "heads": heads.state_dict(),
        "optimizer": optimizer.state_dict(),
        "position": position,  # (epoch, next step in it, loss summed over its earlier steps)
        "rng": torch.get_rng_state(),  # dropout's stream
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue())


def _load(
    path: Path | None, fingerprint: str, heads: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, int, float]:
    """Restore a checkpoint of these inputs; ``(epoch, step, loss so far)`` to go on from."""
    if path is None or not path.is_file():
        return 0, 0, 0.0
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError):
        return 0, 0, 0.0  # unreadable (torn by a crash): start over
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        return 0, 0, 0.0
    heads.load_state_dict(state["heads"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    epoch, step, total = state["position"]
    return int(epoch), int(step), float(total)


def fingerprint_of(*parts: object) -> str:
    """SHA-256 of the JSON of ``parts``: what a checkpoint must match to be resumed."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


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
    split, rows = inputs.splits["train"], train.layers
    if inputs.section.train_split == "trainval":
        split = ConcatSplit([inputs.splits["train"], inputs.splits["val"]])
        val = inputs.features["val"]
        rows = {layer: _Stacked(train.layers[layer], val.layers[layer]) for layer in dims}
    work_dir = getattr(inputs, "work_dir", None)
    checkpoint = None if work_dir is None else Path(work_dir) / f"probe-{ev.method}.ckpt"
    fingerprint = fingerprint_of(
        inputs.target.weights,
        inputs.section.model_dump(mode="json"),
        inputs.target.config.seed,
        dims,
        split.name,
        len(split),
    )

    def represent(images: torch.Tensor, keys: torch.Tensor | None):
        return inputs.target.task.representation(images, inputs.layers, pool=pool, keys=keys)

    heads = train_heads(
        split,
        dims,
        inputs.section,
        seed=inputs.target.config.seed,
        represent=represent,
        features=rows,
        device=inputs.device,
        log=lambda epoch, total, loss: inputs.log(
            f"probe {ev.method} epoch {epoch}/{total}: loss {loss:.4f}"
        ),
        checkpoint=checkpoint,
        fingerprint=fingerprint,
        workers=ev.workers,
    )
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)  # trained: a rerun starts over
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


class _Stacked:
    """Rows of ``a`` then ``b`` (cached train and val features), read by index arrays."""

    def __init__(self, a: np.ndarray, b: np.ndarray) -> None:
        self.a, self.b = a, b

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        out = np.empty((len(rows), self.a.shape[1]), dtype=self.a.dtype)
        first = rows < len(self.a)
        out[first] = self.a[rows[first]]
        out[~first] = self.b[rows[~first] - len(self.a)]
        return out


register_probe("sgd", needs_val=trains_on_val)(_fit_heads)
register_probe("mlp", needs_val=trains_on_val)(_fit_heads)
