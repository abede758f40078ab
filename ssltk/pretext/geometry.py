"""Patch geometry of Jigsaw and Relative Patch Location, scaled with ``pretext.input_size``.

The released numbers (``config/jigsaw/imagenet.sh``) are for ``input_size`` 224. Fields of
``pretext.patches`` left ``None`` scale with ``s = input_size / 224``, rounding half up:

* ``resize = round(292 s)``: the square side the image is resized to (aspect ignored);
* ``crop = round(255 s)``: the training crop (random; centred in eval);
* ``cell = crop // grid``: the grid cell side;
* ``jitter = round(21 s)``: the per-patch random shift inside its cell (centred in eval);
* ``patch = cell - jitter``: the patch side seen by the network.

At 224 this gives 292 / 255 / 85 / 21 / 64, the released configuration. The linear-evaluation
readout (``self_supervision/patch_utils.py``) uses ``resize_small = input_size`` (224 at s = 1), a
centred ``grid · patch`` crop (192) and the grid with no jitter, so its patches have the training
patch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ssltk.config import PatchGeometry

__all__ = ["PatchLayout", "resolve_patch_layout", "round_half_up"]

#: The paper's geometry at input_size 224.
PAPER_INPUT_SIZE = 224
PAPER_RESIZE = 292
PAPER_CROP = 255
PAPER_JITTER = 21


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


@dataclass(frozen=True)
class PatchLayout:
    """Resolved patch geometry, in pixels."""

    resize: int
    crop: int
    grid: int
    jitter: int
    eval_resize: int

    @property
    def cell(self) -> int:
        return self.crop // self.grid

    @property
    def patch(self) -> int:
        return self.cell - self.jitter

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def eval_crop(self) -> int:
        return self.grid * self.patch


def resolve_patch_layout(patches: PatchGeometry, input_size: int) -> PatchLayout:
    """Fill ``None`` fields of ``patches`` by the scale rule and check the result is consistent."""
    scale = input_size / PAPER_INPUT_SIZE
    resize = patches.resize if patches.resize is not None else round_half_up(PAPER_RESIZE * scale)
    crop = patches.crop if patches.crop is not None else round_half_up(PAPER_CROP * scale)
    jitter = patches.jitter if patches.jitter is not None else round_half_up(PAPER_JITTER * scale)
    layout = PatchLayout(resize, crop, patches.grid, jitter, eval_resize=input_size)
    if crop > resize:
        raise ValueError(
            f"pretext.patches.crop={crop} is larger than pretext.patches.resize={resize}"
        )
    if layout.patch < 1:
        raise ValueError(
            f"pretext.patches: cell {layout.cell} (crop {crop} // grid {layout.grid}) leaves no "
            f"patch after jitter {jitter}"
        )
    if layout.eval_crop > input_size:
        raise ValueError(
            f"pretext.input_size={input_size} is smaller than the evaluation crop "
            f"grid·patch = {layout.grid}·{layout.patch} = {layout.eval_crop}"
        )
    return layout
