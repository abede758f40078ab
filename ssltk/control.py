"""Noise controls: a pretext task trained briefly on i.i.d. noise and scored on noise it never saw.

Noise images carry no content, so a pretext metric above chance on unseen noise means the task can
be solved from preprocessing artifacts alone (a resize grid, a crop rule, a patch slot's
statistics), and its features will learn the artifact instead of the images. The control reuses the
task, backbone, preprocessing and optimiser settings of the config unchanged; only the images are
replaced by fresh noise at every step.

Exemplar is instance discrimination: distinct noise images are distinct instances, so its control
is reported without a verdict.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image
from scipy import stats

from ssltk.config import Config
from ssltk.data import rng
from ssltk.data.sources import resize_and_center_crop
from ssltk.errors import UserError
from ssltk.pretext import build_task, task_class
from ssltk.train.determinism import seed_everything
from ssltk.train.engine import Trainer, build_optimizer
from ssltk.train.schedule import build_schedule

__all__ = ["ControlResult", "noise_images", "run_control", "verdict_of"]

#: One-sided significance of "above chance" (a t-test over held-out batches).
LEAK_P_VALUE = 1e-3
#: Tasks whose noise control has no verdict, and why.
NO_VERDICT = {"exemplar": "instance discrimination: distinct noise images are distinct instances"}

_TRAIN, _HELD_OUT = 0, 1
_MASK64 = (1 << 64) - 1


def _image_seed(seed: int, namespace: int, index: int) -> int:
    # SplitMix64-style mixing, so neighbouring indices give unrelated generator seeds.
    z = (seed * 0x9E3779B97F4A7C15 + namespace * 0xBF58476D1CE4E5B9 + index) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def noise_images(
    seed: int, namespace: int, indices: range, size: int, native_size: int | None = None
) -> torch.Tensor:
    """uint8 ``[len(indices), 3, size, size]`` i.i.d. uniform noise, image ``i`` a function of
    ``(seed, namespace, i)`` only.

    ``native_size`` (default ``size``): draw the noise at that side and bring it to ``size`` the
    way ``ssltk prepare`` stores an image (area resize of the shorter side, centre crop).
    """
    native = size if native_size is None else native_size
    out = torch.empty(len(indices), 3, size, size, dtype=torch.uint8)
    generator = torch.Generator()
    for row, index in enumerate(indices):
        generator.manual_seed(_image_seed(seed, namespace, index))
        image = torch.randint(0, 256, (3, native, native), generator=generator, dtype=torch.uint8)
        if native != size:
            pil = Image.fromarray(image.permute(1, 2, 0).numpy())
            image = torch.from_numpy(resize_and_center_crop(pil, size))
        out[row] = image
    return out


@dataclass
class ControlResult:
    """What a noise control measured: the task's pretext metric on held-out noise vs chance."""

    task: str
    arch: str
    metric: str
    chance: float
    score: float  # mean over held-out batches
    score_sem: float  # standard error of that mean
    p_value: float | None  # one-sided, H0: the metric is at chance
    verdict: str  # "leaks", "clean", or "n/a" (see NO_VERDICT)
    steps: int
    batch_size: int
    held_out_images: int
    image_size: int
    noise_size: int
    settings: dict[str, str]
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, train metric)

    def to_json(self) -> dict:
        return asdict(self)


def verdict_of(task: str, scores: np.ndarray, chance: float) -> tuple[float | None, str]:
    """``(p_value, verdict)`` of held-out batch scores against ``chance``.

    Held-out batches are independent draws of noise, so a one-sided t-test over their means is
    valid whatever the correlation of predictions within a batch.
    """
    if task in NO_VERDICT:
        return None, "n/a"
    mean = float(scores.mean())
    if scores.std() == 0:  # e.g. a constant prediction: exactly at chance for balanced labels
        p = 0.0 if mean > chance else 1.0
    else:
        p = float(stats.ttest_1samp(scores, chance, alternative="greater").pvalue)
    return p, "leaks" if p < LEAK_P_VALUE else "clean"


def _settings(config: Config) -> dict[str, str]:
    """The preprocessing settings a control's verdict depends on, for its table row."""
    pretext = config.pretext
    section = getattr(pretext, pretext.task, None)
    shown = {
        "preprocessing": pretext.preprocessing,
        "input_size": str(pretext.input_size),
    }
    crop = getattr(section, "crop", None)
    if crop is not None:
        shown["crop"] = str(crop)
    return shown


def run_control(
    config: Config,
    *,
    steps: int,
    held_out_batches: int,
    noise_size: int | None = None,
    log_every: int = 10,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> ControlResult:
    """Train ``config``'s task for ``steps`` updates on fresh noise, then score it on
    ``held_out_batches`` batches of noise it has not seen (training-mode preprocessing and
    forward pass, no update: the figure the training log would show on those images)."""
    name = config.pretext.task
    size = config.data.image_size
    batch = config.pretrain.batch_size
    seed_everything(config.seed)
    try:
        task = build_task(config)
    except ValueError as err:
        raise UserError(f"model/pretext: {err}") from None
    if batch < task.min_batch_size:
        raise UserError(f"pretrain.batch_size={batch}: {name} needs {task.min_batch_size}")
    optimizer = build_optimizer(task, config)
    epochs = config.pretrain.epochs
    schedule = build_schedule(config.pretrain, max(1, math.ceil(steps / epochs)))
    trainer = Trainer(task, optimizer, schedule, device=torch.device("cpu"))
    metric = task.metric

    def batch_inputs(namespace: int, number: int):
        indices = range(number * batch, (number + 1) * batch)
        images = noise_images(config.seed, namespace, indices, size, noise_size)
        keys = rng.sample_keys(config.seed, namespace, torch.arange(indices.start, indices.stop))
        batch_key = rng.batch_key(config.seed, namespace, number)
        return task.prepare_batch(images, keys, batch_key, train=True)

    task.train()
    curve: list[tuple[int, float]] = []
    window: list[float] = []
    for step in range(steps):
        _, metrics = trainer.step(batch_inputs(_TRAIN, step), step)
        values = {key: float(value) for key, value in metrics.items()}
        if not math.isfinite(values["loss"]):
            raise UserError(f"control: {name}'s loss is {values['loss']} at step {step}")
        window.append(values[metric])
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append((step + 1, float(np.mean(window))))
            window.clear()
        if on_step is not None:
            on_step(step + 1, values)

    scores = []
    with torch.no_grad():
        for number in range(held_out_batches):
            scores.append(float(task(batch_inputs(_HELD_OUT, number)).metrics[metric]))
    scores_np = np.asarray(scores)
    chance = task_class(name).chance_level(config)
    p_value, verdict = verdict_of(name, scores_np, chance)
    sem = float(scores_np.std(ddof=1) / math.sqrt(len(scores))) if len(scores) > 1 else 0.0
    return ControlResult(
        task=name,
        arch=config.model.arch,
        metric=metric,
        chance=chance,
        score=float(scores_np.mean()),
        score_sem=sem,
        p_value=p_value,
        verdict=verdict,
        steps=steps,
        batch_size=batch,
        held_out_images=held_out_batches * batch,
        image_size=size,
        noise_size=size if noise_size is None else noise_size,
        settings=_settings(config),
        curve=curve,
    )
