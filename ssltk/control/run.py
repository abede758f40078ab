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

import numpy as np
import torch
from PIL import Image

from ssltk.config import Config
from ssltk.control.result import ControlResult, verdict_of
from ssltk.data import rng
from ssltk.data.image_list import ImageList
from ssltk.data.sources import resize_and_center_crop
from ssltk.errors import UserError
from ssltk.pretext import PretextInputs, PretextTask, build_task
from ssltk.train.determinism import seed_everything
from ssltk.train.distributed import resolve_device
from ssltk.train.engine import Trainer, build_optimizer
from ssltk.train.schedule import build_schedule

__all__ = ["noise_images", "noise_originals", "run_control"]

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


def original_shape(short_side: int, aspect: float) -> tuple[int, int]:
    """``(height, width)`` of an original whose shorter side is ``short_side`` and whose
    width/height is ``aspect`` (rounded)."""
    long_side = round(short_side * max(aspect, 1 / aspect))
    return (short_side, long_side) if aspect >= 1 else (long_side, short_side)


def noise_originals(
    seed: int, namespace: int, indices: range, short_side: int, aspect: float
) -> ImageList:
    """i.i.d. uniform noise originals of width/height ``aspect``, each kept whole, as files
    storage gives a batch (image ``i`` a function of ``(seed, namespace, i)`` only)."""
    height, width = original_shape(short_side, aspect)
    generator = torch.Generator()
    images = []
    for index in indices:
        generator.manual_seed(_image_seed(seed, namespace, index))
        images.append(
            torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
        )
    return ImageList(images)


def _settings(config: Config) -> dict[str, str]:
    """The preprocessing settings a control's verdict depends on, for its table row."""
    pretext = config.pretext
    shown = {"preprocessing": pretext.preprocessing, "input_size": str(pretext.input_size)}
    crop = getattr(getattr(pretext, pretext.task, None), "crop", None)
    if crop is not None:
        shown["crop"] = str(crop)
    control = config.control
    if control.noise_aspect is not None:
        height, width = original_shape(
            control.noise_size or config.data.image_size, control.noise_aspect
        )
        shown["noise originals"] = f"{height}×{width} px (aspect {control.noise_aspect:g})"
    elif control.noise_size is not None:
        shown["noise drawn at"] = f"{control.noise_size} px"
    return shown


def _noise_batch(
    task: PretextTask, config: Config, namespace: int, number: int, device: torch.device
) -> PretextInputs:
    """Batch ``number`` of ``namespace`` (training or held-out noise), prepared for training."""
    batch = config.pretrain.batch_size
    indices = range(number * batch, (number + 1) * batch)
    control = config.control
    images: torch.Tensor | ImageList
    if control.noise_aspect is not None:
        short_side = control.noise_size or config.data.image_size
        images = noise_originals(config.seed, namespace, indices, short_side, control.noise_aspect)
    else:
        images = noise_images(
            config.seed, namespace, indices, config.data.image_size, control.noise_size
        )
    keys = rng.sample_keys(config.seed, namespace, torch.arange(indices.start, indices.stop))
    with torch.no_grad():
        return task.prepare_batch(
            images.to(device),
            keys.to(device),
            rng.batch_key(config.seed, namespace, number),
            train=True,
        )


def run_control(
    config: Config,
    *,
    log_every: int = 10,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> ControlResult:
    """Train ``config``'s task for ``control.steps`` updates on fresh noise, then score it on
    ``control.held_out_batches`` batches of noise it has not seen (training-mode preprocessing
    and forward pass, no update: what the training log would show on those images)."""
    name, steps = config.pretext.task, config.control.steps
    device = resolve_device(config.pretrain.device)
    seed_everything(config.seed)
    try:
        task = build_task(config).to(device)
    except ValueError as err:
        raise UserError(f"model/pretext: {err}") from None
    # The pretraining schedule compressed into the control's steps (warm-up, decay and all).
    steps_per_epoch = max(1, math.ceil(steps / config.pretrain.epochs))
    schedule = build_schedule(config.pretrain, steps_per_epoch)
    trainer = Trainer(
        task,
        build_optimizer(task, config),
        schedule,
        device=device,
        precision=config.pretrain.precision,
    )
    metric = task.metric

    task.train()
    curve: list[tuple[int, float]] = []
    window: list[float] = []
    for step in range(steps):
        # Every batch is new noise, so the metric of each step is measured on unseen images.
        _, metrics = trainer.step(_noise_batch(task, config, _TRAIN, step, device), step)
        values = {key: float(value) for key, value in metrics.items()}
        if not math.isfinite(values["loss"]):
            raise UserError(f"control: {name}'s loss is {values['loss']} at step {step + 1}")
        window.append(values[metric])
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append((step + 1, float(np.mean(window))))
            window.clear()
        if on_step is not None:
            on_step(step + 1, values)

    held_out = config.control.held_out_batches
    with torch.no_grad():
        scores = np.asarray(
            [
                float(task(_noise_batch(task, config, _HELD_OUT, number, device)).metrics[metric])
                for number in range(held_out)
            ]
        )
    chance = type(task).chance_level(config)
    p_value, verdict = verdict_of(name, scores, chance)
    sem = float(scores.std(ddof=1) / math.sqrt(len(scores))) if len(scores) > 1 else 0.0
    size = config.data.image_size
    return ControlResult(
        task=name,
        arch=config.model.arch,
        metric=metric,
        chance=chance,
        score=float(scores.mean()),
        score_sem=sem,
        p_value=p_value,
        verdict=verdict,
        steps=steps,
        batch_size=config.pretrain.batch_size,
        held_out_images=held_out * config.pretrain.batch_size,
        image_size=size,
        noise_size=config.control.noise_size or size,
        settings=_settings(config),
        curve=curve,
    )
