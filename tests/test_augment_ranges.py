"""The training augmentation's parameters, in the units the docs give (slim's inception
preprocessing, paper §2): brightness deltas in [-32/255, 32/255) on [0, 1] images, saturation
factors in [0.5, 1.5), flips with probability 1/2, crop area fractions in [0.1, 1]
(``min_object_covered``) and aspect ratios in [3/4, 4/3]; and each parameter applied in those
units.

Each range is checked at both ends: every draw inside it, and the draws reaching close to each
end (a delta in 0–255 units, or a halved range, fails one side or the other).
"""

from __future__ import annotations

import pytest
import torch

from ssltk.data import augment
from ssltk.data.rng import sample_keys

N = 4000
STREAM = 123


@pytest.fixture(scope="module")
def params() -> dict[str, augment.InceptionParams]:
    keys = sample_keys(3, 0, torch.arange(N))
    return {
        mode: augment.sample_inception_params(keys, STREAM, (64, 48), preprocessing=mode)
        for mode in augment.PREPROCESSING
    }


def spans(values: torch.Tensor, low: float, high: float, slack: float) -> None:
    """Every value in [low, high), and the extremes within ``slack`` of both ends."""
    values = values.double()
    assert values.min() >= low and values.max() < high, (values.min(), values.max())
    assert values.min() < low + slack and values.max() > high - slack, (values.min(), values.max())


@pytest.mark.parametrize("mode", augment.PREPROCESSING)
def test_colour_and_flip_parameters_have_the_documented_ranges(params, mode):
    p = params[mode]
    assert p.brightness.dtype == torch.float32 and p.saturation.dtype == torch.float32
    spans(p.brightness, -32 / 255, 32 / 255, slack=0.01 * 32 / 255)
    assert abs(p.brightness.double().mean()) < 0.01  # symmetric about 0
    spans(p.saturation, 0.5, 1.5, slack=0.01)
    assert abs(p.flip.double().mean() - 0.5) < 0.03


@pytest.mark.parametrize("mode", augment.PREPROCESSING)
def test_crop_boxes_cover_10_to_100_percent_of_the_image_at_3_4_to_4_3(params, mode):
    top, left, height, width = params[mode].boxes.double().unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= 64).all() and (left + width <= 48).all()
    # area (0.05, 1.0), but min_object_covered 0.1 of the whole-image object box: at least 10 %.
    area = height * width / (64 * 48)
    # symmetric bounds both sides by the shorter one (48): at most 48² of the 64×48 image.
    largest = 1.0 if mode == "tf1" else 48 / 64
    assert area.min() >= 0.1 and area.max() <= largest
    assert area.min() < 0.12 and area.max() > 0.9 * largest
    # Rounding to whole pixels moves the aspect ratio a little past its bounds on a 64×48 image.
    aspect = width / height
    assert aspect.min() > 0.75 * 0.9 and aspect.max() < (4 / 3) / 0.9
    assert aspect.min() < 0.8 and aspect.max() > 1.25


def test_each_parameter_is_applied_in_its_units():
    """A flat grey image makes every step visible: the box and flip change nothing, the
    brightness delta adds to [0, 1] values, saturation leaves grey alone, and the output is
    ``(x - 0.5) · 2``."""
    grey = torch.full((3, 3, 16, 16), 100, dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, 16, 16], [2, 3, 8, 10], [0, 0, 16, 16]])
    brightness = torch.tensor([0.0, 0.1, -32 / 255], dtype=torch.float32)
    params = augment.InceptionParams(
        boxes=boxes,
        flip=torch.tensor([False, True, False]),
        brightness=brightness,
        saturation=torch.tensor([1.5, 0.5, 1.0], dtype=torch.float32),
    )
    out = augment.apply_inception(grey, params, 8)
    expected = ((100 / 255 + brightness.double()) - 0.5) * 2
    for i in range(3):
        torch.testing.assert_close(out[i].double(), expected[i].expand(3, 8, 8), atol=1e-5, rtol=0)
    # Saturation scales the spread about the brightest channel: factor 0.5 halves it.
    colour = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    colour[:, 0], colour[:, 1], colour[:, 2] = 200, 100, 50
    half = augment.InceptionParams(
        boxes=torch.tensor([[0, 0, 4, 4]]),
        flip=torch.tensor([False]),
        brightness=torch.zeros(1),
        saturation=torch.tensor([0.5]),
    )
    x = (augment.apply_inception(colour, half, 4)[0, :, 0, 0].double() / 2 + 0.5) * 255
    expected = torch.tensor([200.0, 150.0, 125.0], dtype=torch.float64)
    torch.testing.assert_close(x, expected, atol=1e-3, rtol=0)
