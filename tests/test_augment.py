"""Batched augmentation primitives against plain per-image references (the released code's
``preprocess.py`` and slim's ``inception_preprocessing.py``)."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ssltk.data import rng
from ssltk.data.augment import (
    InceptionParams,
    adjust_saturation_,
    apply_inception,
    brightness_deltas,
    center_crop_offsets,
    central_crop_boxes,
    crop,
    crop_and_resize,
    flip_mask,
    grayscale_mask,
    inception_crop_boxes,
    inception_preprocess,
    random_crop_offsets,
    resize_area,
    resize_bilinear,
    resize_small,
    sample_inception_params,
    saturation_factors,
    small_side_size,
    standardize,
    substream,
    to_float,
    to_gray,
    to_minus1_1,
)

DEMO = Path(__file__).resolve().parents[1] / "ssltk" / "assets" / "cifar10-demo.tar.gz"
FAST = settings(max_examples=25, deadline=None)
f32 = np.float32


def keys_for(n: int, seed: int = 0) -> torch.Tensor:
    return rng.sample_keys(seed, 0, torch.arange(n))


def random_images(seed: int, shape: tuple[int, ...], dtype: str = "float32") -> torch.Tensor:
    gen = np.random.default_rng(seed)
    if dtype == "uint8":
        return torch.from_numpy(gen.integers(0, 256, shape, dtype=np.uint8))
    return torch.from_numpy(gen.uniform(-0.2, 1.2, shape).astype(np.float32))


# --- plain per-image references -------------------------------------------------------------------


def ref_bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 legacy bilinear of one [C, H, W] float32 image, one output pixel at a time."""
    _, height, width = img.shape
    out = np.zeros((img.shape[0], out_h, out_w), np.float32)
    scale_y, scale_x = f32(height) / f32(out_h), f32(width) / f32(out_w)
    for i in range(out_h):
        sy = f32(i) * scale_y
        y0, y1, wy = int(np.floor(sy)), min(int(np.ceil(sy)), height - 1), sy - np.floor(sy)
        for j in range(out_w):
            sx = f32(j) * scale_x
            x0, x1, wx = int(np.floor(sx)), min(int(np.ceil(sx)), width - 1), sx - np.floor(sx)
            top = img[:, y0, x0] + (img[:, y0, x1] - img[:, y0, x0]) * wx
            bottom = img[:, y1, x0] + (img[:, y1, x1] - img[:, y1, x0]) * wx
            out[:, i, j] = top + (bottom - top) * wy
    return out


def ref_area(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF area resize of one image: coverage-weighted mean over each output footprint."""
    _, height, width = img.shape
    sy, sx = height / out_h, width / out_w
    out = np.zeros((img.shape[0], out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            total = np.zeros(img.shape[0])
            for r in range(math.floor(i * sy), math.ceil((i + 1) * sy)):
                wy = min(r + 1, (i + 1) * sy) - max(r, i * sy)
                for c in range(math.floor(j * sx), math.ceil((j + 1) * sx)):
                    wx = min(c + 1, (j + 1) * sx) - max(c, j * sx)
                    total += img[:, min(r, height - 1), min(c, width - 1)] * wy * wx
            out[:, i, j] = total / (sy * sx)
    return out


def ref_saturation(img: np.ndarray, factor: float) -> np.ndarray:
    """TensorFlow's AdjustSaturation kernel, pixel by pixel: RGB→HSV, scale and clip S, HSV→RGB."""
    out = np.empty_like(img, dtype=np.float64)
    for y in range(img.shape[1]):
        for x in range(img.shape[2]):
            r, g, b = (float(v) for v in img[:, y, x])
            v = max(r, g, b)
            spread = v - min(r, g, b)
            s = spread / v if v > 0 else 0.0
            if spread <= 0:
                h = 0.0
            elif r == v:
                h = (g - b) / (6 * spread)
            elif g == v:
                h = (b - r) / (6 * spread) + 2 / 6
            else:
                h = (r - g) / (6 * spread) + 4 / 6
            h = h + 1 if h < 0 else h
            s = min(1.0, max(0.0, s * factor))
            c, m, dh = s * v, v - s * v, h * 6
            part = c * (1 - abs(dh % 2 - 1))
            rgb = [(c, part, 0), (part, c, 0), (0, c, part), (0, part, c), (part, 0, c)]
            rgb += [(c, 0, part)]
            out[:, y, x] = np.array(rgb[min(int(dh), 5)]) + m
    return out


def ref_standardize(img: np.ndarray) -> np.ndarray:
    x = img.astype(np.float64)
    return (x - x.mean()) / max(x.std(), 1 / math.sqrt(x.size))


def ref_box(
    u: np.ndarray, height: int, width: int, area=(0.05, 1.0), ratio=(0.75, 1.33), cover=0.1
):
    """sample_distorted_bounding_box with the whole image as object box, attempt by attempt."""
    min_area, max_area = (
        f32(area[0]) * f32(width) * f32(height),
        f32(area[1]) * f32(width) * f32(height),
    )

    def below(value: float, n: int) -> int:
        return min(int(value * n), n - 1)

    for attempt in u:
        aspect = f32(attempt[0]) * (f32(ratio[1]) - f32(ratio[0])) + f32(ratio[0])
        h = int(np.rint(np.sqrt(min_area / aspect)))
        max_h = int(np.rint(np.sqrt(max_area / aspect)))
        if np.rint(f32(max_h) * aspect) > width:
            max_h = int((width + 0.5 - float(f32(1e-7))) / float(aspect))
            if np.rint(f32(max_h) * aspect) > width:
                max_h -= 1
        max_h = min(max_h, height)
        h = min(h, max_h)
        if h < max_h:
            h += below(attempt[1], max_h - h + 1)
        w = int(np.rint(f32(h) * aspect))
        if w * h < min_area:
            h += 1
            w = int(np.rint(f32(h) * aspect))
        if w * h > max_area:
            h -= 1
            w = int(np.rint(f32(h) * aspect))
        if not (min_area <= w * h <= max_area and 0 < w <= width and 0 < h <= height):
            continue
        top = below(attempt[2], height - h) if h < height else 0
        left = below(attempt[3], width - w) if w < width else 0
        if f32(w * h) / f32(width * height) >= f32(cover):
            return [top, left, h, w]
    return [0, 0, height, width]


def ref_inception(img: np.ndarray, box, flip: bool, delta: float, factor: float, out: int):
    x = img.astype(np.float32) * f32(1.0 / 255.0)
    top, left, h, w = box
    x = ref_bilinear(x[:, top : top + h, left : left + w], out, out)
    x = x[:, :, ::-1] if flip else x
    x = ref_saturation(x + f32(delta), factor)
    return (np.clip(x, 0.0, 1.0) - 0.5) * 2.0


# --- resizing -------------------------------------------------------------------------------------


def test_bilinear_uses_the_tf1_legacy_grid_not_half_pixel_centres():
    row = torch.tensor([0.0, 10.0]).view(1, 1, 1, 2)
    # src = dst * in / out = 0, 0.5, 1, 1.5 (clamped): TF1 gives 0, 5, 10, 10; torch's default
    # half-pixel grid would give 0, 2.5, 7.5, 10.
    assert resize_bilinear(row, (1, 4), grid="tf1").flatten().tolist() == [0.0, 5.0, 10.0, 10.0]
    assert resize_bilinear(row, (1, 4)).flatten().tolist() == [0.0, 2.5, 7.5, 10.0]


@FAST
@given(
    seed=st.integers(0, 2**31),
    batch=st.integers(1, 3),
    in_hw=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    out_hw=st.tuples(st.integers(1, 12), st.integers(1, 12)),
)
def test_resize_bilinear_matches_reference(seed, batch, in_hw, out_hw):
    x = random_images(seed, (batch, 3, *in_hw))
    got = resize_bilinear(x, out_hw, grid="tf1")
    assert got.shape == (batch, 3, *out_hw) and got.dtype == torch.float32
    for i in range(batch):
        np.testing.assert_allclose(got[i].numpy(), ref_bilinear(x[i].numpy(), *out_hw), atol=1e-6)
    torch_default = F.interpolate(x, size=out_hw, mode="bilinear", align_corners=False)
    torch.testing.assert_close(resize_bilinear(x, out_hw), torch_default, atol=1e-5, rtol=0)


@FAST
@given(seed=st.integers(0, 2**31), batch=st.integers(1, 4), out=st.integers(1, 10))
def test_crop_and_resize_is_slice_then_resize(seed, batch, out):
    height, width = 11, 8
    x = random_images(seed, (batch, 3, height, width))
    gen = np.random.default_rng(seed)
    box_h, box_w = gen.integers(1, height + 1, batch), gen.integers(1, width + 1, batch)
    top, left = gen.integers(0, height - box_h + 1), gen.integers(0, width - box_w + 1)
    boxes = torch.from_numpy(np.stack([top, left, box_h, box_w], 1))
    got = crop_and_resize(x, boxes, out, grid="tf1")
    for i, (t, lf, h, w) in enumerate(boxes.tolist()):
        expected = ref_bilinear(x[i, :, t : t + h, lf : lf + w].numpy(), out, out)
        np.testing.assert_allclose(got[i].numpy(), expected, atol=1e-6)


def test_crop_and_resize_flip_equals_flipping_afterwards():
    x = random_images(5, (3, 3, 9, 13))
    boxes = torch.tensor([[0, 0, 9, 13], [1, 2, 5, 7], [3, 4, 6, 9]])
    flip = torch.tensor([True, False, True])
    unflipped = crop_and_resize(x, boxes, (6, 10))
    expected = torch.where(flip[:, None, None, None], unflipped.flip(-1), unflipped)
    assert torch.equal(crop_and_resize(x, boxes, (6, 10), flip=flip), expected)


def test_crop_and_resize_rejects_boxes_outside_the_image():
    with pytest.raises(ValueError, match="box"):
        crop_and_resize(torch.zeros(1, 3, 8, 8), torch.tensor([[4, 0, 5, 8]]), 4)


@FAST
@given(
    seed=st.integers(0, 2**31),
    in_hw=st.tuples(st.integers(1, 10), st.integers(1, 10)),
    out_hw=st.tuples(st.integers(1, 10), st.integers(1, 10)),
    uint8=st.booleans(),
)
def test_resize_area_matches_reference(seed, in_hw, out_hw, uint8):
    x = random_images(seed, (2, 3, *in_hw), "uint8" if uint8 else "float32")
    got = resize_area(x, out_hw)
    assert got.shape == (2, 3, *out_hw) and got.dtype == torch.float32
    for i in range(2):
        expected = ref_area(x[i].numpy().astype(np.float64), *out_hw)
        np.testing.assert_allclose(got[i].numpy(), expected, rtol=1e-5, atol=1e-4)


def test_resize_area_integer_factor_is_average_pooling():
    x = random_images(3, (2, 3, 12, 8))
    expected = x.view(2, 3, 4, 3, 2, 4).mean(dim=(3, 5))
    torch.testing.assert_close(resize_area(x, (4, 2)), expected)


def test_resize_small_keeps_aspect_and_rounds_half_to_even():
    assert small_side_size((375, 500), 224) == (224, 299)
    assert small_side_size((500, 375), 256) == (341, 256)
    assert small_side_size((4, 6), 3) == (3, 4)  # 6 * 0.75 = 4.5 rounds to even
    x = random_images(0, (2, 3, 6, 9), "uint8")
    got = resize_small(x, 4)
    assert got.shape == (2, 3, 4, 6)
    torch.testing.assert_close(got, resize_area(x, (4, 6)))


# --- crops ----------------------------------------------------------------------------------------


@FAST
@given(seed=st.integers(0, 2**31), batch=st.integers(1, 5), out=st.integers(1, 7))
def test_crop_matches_slicing_and_keeps_dtype(seed, batch, out):
    x = random_images(seed, (batch, 3, 7, 9), "uint8")
    offsets = random_crop_offsets(keys_for(batch, seed), 1, (7, 9), out)
    got = crop(x, offsets, out)
    assert got.dtype == torch.uint8 and got.shape == (batch, 3, out, out)
    for i, (top, left) in enumerate(offsets.tolist()):
        assert torch.equal(got[i], x[i, :, top : top + out, left : left + out])


def test_random_crop_offsets_reach_every_position_and_centre_is_floor():
    offsets = random_crop_offsets(keys_for(2000), 5, (10, 7), (6, 7))
    assert sorted(set(offsets[:, 0].tolist())) == [0, 1, 2, 3, 4]
    assert set(offsets[:, 1].tolist()) == {0}
    assert center_crop_offsets((10, 7), (5, 4), 3).tolist() == [[2, 1]] * 3
    assert center_crop_offsets((292, 292), 255, 1).tolist() == [[18, 18]]


def test_crop_errors_name_the_argument():
    with pytest.raises(ValueError, match="out_hw"):
        crop(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="offset"):
        crop(torch.zeros(1, 3, 8, 8), torch.tensor([[0, 5]]), 4)
    with pytest.raises(ValueError, match="offsets"):
        crop(torch.zeros(2, 3, 8, 8), torch.zeros(1, 2, dtype=torch.long), 4)


# --- flips, colour, grey, standardisation -------------------------------------------------------


def test_brightness_deltas_span_the_paper_range():
    deltas = brightness_deltas(keys_for(500), 2)
    assert deltas.dtype == torch.float32
    assert deltas.abs().max() <= 32 / 255 and deltas.min() < -0.1 and deltas.max() > 0.1


@FAST
@given(seed=st.integers(0, 2**31), factors=st.lists(st.floats(0.0, 2.0), min_size=2, max_size=2))
def test_adjust_saturation_matches_tf_hsv_round_trip(seed, factors):
    x = random_images(seed, (2, 3, 4, 5))
    x[0, :, 0, 0] = 0.4  # a grey pixel
    x[1, :, 0, 0] = torch.tensor([-0.1, -0.15, -0.05])  # value below zero
    got = adjust_saturation_(x.clone(), torch.tensor(factors, dtype=torch.float32))
    for i, factor in enumerate(factors):
        np.testing.assert_allclose(got[i].numpy(), ref_saturation(x[i].numpy(), factor), atol=1e-5)


def test_adjust_saturation_works_in_place():
    x = random_images(4, (2, 3, 5, 5))
    before = x.clone()
    assert adjust_saturation_(x, torch.tensor([0.3, 1.7])) is x
    assert not torch.equal(x, before)


def test_saturation_factors_and_identity():
    factors = saturation_factors(keys_for(500), 3)
    assert 0.5 <= factors.min() < 0.6 and 1.4 < factors.max() < 1.5
    x = random_images(0, (2, 3, 6, 6)).clamp(0, 1)
    torch.testing.assert_close(adjust_saturation_(x.clone(), torch.ones(2)), x)


@FAST
@given(seed=st.integers(0, 2**31), uint8=st.booleans())
def test_to_gray_is_the_plain_channel_mean_for_masked_images(seed, uint8):
    x = random_images(seed, (4, 3, 3, 5), "uint8" if uint8 else "float32")
    mask = torch.tensor([True, False, True, False])
    got = to_gray(x, mask)
    assert got.dtype == x.dtype and got.shape == x.shape
    for i in range(4):
        img = x[i].numpy()
        if not mask[i]:
            expected = img
        elif uint8:
            expected = np.broadcast_to(img.astype(np.int64).sum(0) // 3, img.shape)
        else:
            expected = np.broadcast_to(img.sum(0, dtype=np.float32) / f32(3), img.shape)
        np.testing.assert_allclose(got[i].numpy(), expected, rtol=1e-6)


def test_grayscale_mask_rate_follows_p():
    mask = grayscale_mask(keys_for(4000), 7, 0.66)
    assert mask.dtype == torch.bool and abs(mask.float().mean().item() - 0.66) < 0.03
    assert not grayscale_mask(keys_for(50), 7, 0.0).any()
    with pytest.raises(ValueError, match="p"):
        grayscale_mask(keys_for(2), 7, 1.5)


@FAST
@given(seed=st.integers(0, 2**31), lead=st.lists(st.integers(1, 3), min_size=1, max_size=2))
def test_standardize_matches_reference_on_any_leading_dims(seed, lead):
    x = random_images(seed, (*lead, 3, 4, 4), "uint8")
    got = standardize(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    flat_x, flat_got = x.reshape(-1, 3, 4, 4).numpy(), got.reshape(-1, 3, 4, 4).numpy()
    for img, out in zip(flat_x, flat_got, strict=True):
        np.testing.assert_allclose(out, ref_standardize(img), rtol=1e-4, atol=1e-5)


def test_standardize_floors_the_std_for_flat_images():
    x = torch.full((1, 3, 4, 4), 7.0)
    x[0, 0, 0, 0] = 7.0 + 1e-3  # std far below 1/sqrt(48)
    got = standardize(x)
    expected = (x - x.mean()) * math.sqrt(48)
    torch.testing.assert_close(got, expected)


def test_value_range_maps():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8)
    assert to_float(x).dtype == torch.float32 and to_float(x).tolist() == [0.0, 128.0, 255.0]
    torch.testing.assert_close(to_minus1_1(x), torch.tensor([-1.0, 128 / 255 * 2 - 1, 1.0]))


# --- inception crop and preprocessing -------------------------------------------------------------


@pytest.mark.parametrize("in_hw", [(224, 224), (32, 32), (375, 500), (500, 333), (7, 40)])
def test_inception_boxes_satisfy_the_constraints(in_hw):
    height, width = in_hw
    boxes = inception_crop_boxes(keys_for(3000), 11, in_hw, preprocessing="tf1")
    top, left, h, w = boxes.T
    assert boxes.dtype == torch.int64 and boxes.shape == (3000, 4)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    whole = (h == height) & (w == width)
    # TF draws offsets in [0, H - h): the last position is never used by a strict sub-crop.
    assert ((top < height - h) | (h == height)).all() and ((left < width - w) | (w == width)).all()
    fraction = (h * w).double() / (height * width)
    assert (fraction >= 0.1).all() and (fraction <= 1).all()
    sampled = ~whole
    aspect_low, aspect_high = 0.75 * h - 0.5, 1.33 * h + 0.5
    assert ((w >= aspect_low) & (w <= aspect_high))[sampled].all()
    if max(in_hw) < 2 * min(in_hw):  # a near-square image admits the whole area range
        assert fraction.min() < 0.15 and fraction.max() > 0.8


@pytest.mark.parametrize("in_hw", [(224, 224), (32, 32), (64, 64)])
def test_symmetric_inception_boxes_are_as_likely_transposed_and_reach_every_offset(in_hw):
    height, width = in_hw
    boxes = inception_crop_boxes(keys_for(20000), 11, in_hw)
    top, left, h, w = boxes.T
    assert (top + h <= height).all() and (left + w <= width).all()
    sub = (h < height) & (w < width)
    assert ((top == height - h) & sub).any() and ((left == width - w) & sub).any()
    assert ((w >= 0.75 * h - 0.5) & (w <= 4 / 3 * h + 0.5)).all()
    wide, tall = (w > h).sum().item(), (h > w).sum().item()
    # Transposed boxes are equally likely: a binomial split, 4 standard deviations.
    assert abs(wide - tall) < 4 * (wide + tall) ** 0.5
    tf1 = inception_crop_boxes(keys_for(20000), 11, in_hw, preprocessing="tf1")
    tf1_wide, tf1_tall = (tf1[:, 3] > tf1[:, 2]).sum().item(), (tf1[:, 2] > tf1[:, 3]).sum().item()
    assert tf1_wide - tf1_tall > 4 * (tf1_wide + tf1_tall) ** 0.5  # TF's uniform aspect: wider


@FAST
@given(
    seed=st.integers(0, 2**31),
    in_hw=st.tuples(st.integers(1, 300), st.integers(1, 300)),
    stream=st.integers(0, 2**40 - 1),
)
def test_inception_boxes_match_the_attempt_by_attempt_reference(seed, in_hw, stream):
    keys = keys_for(6, seed)
    boxes = inception_crop_boxes(keys, stream, in_hw, preprocessing="tf1")
    uniforms = rng.uniform(keys, stream, 400).numpy().reshape(6, 100, 4)
    for i in range(6):
        assert boxes[i].tolist() == ref_box(uniforms[i], *in_hw)


def test_inception_boxes_fall_back_to_the_whole_image():
    # Every crop of a 2x2 image covers at least 1/4 of it, above the 0.2 maximum area.
    boxes = inception_crop_boxes(keys_for(20), 0, (2, 2), area=(0.05, 0.2))
    assert boxes.tolist() == [[0, 0, 2, 2]] * 20
    # Full coverage required but at most half the area allowed: impossible. The released code
    # falls back to the whole image; symmetric to the central square (no squeeze, see its doc).
    impossible = {"area": (0.05, 0.5), "min_object_covered": 1}
    boxes = inception_crop_boxes(keys_for(20), 0, (50, 60), **impossible, preprocessing="tf1")
    assert boxes.tolist() == [[0, 0, 50, 60]] * 20
    boxes = inception_crop_boxes(keys_for(20), 0, (50, 60), **impossible)
    assert boxes.tolist() == [[0, 5, 50, 50]] * 20
    # With a single attempt some images fail and fall back while others keep their crop.
    boxes = inception_crop_boxes(keys_for(400), 0, (50, 60), min_object_covered=0.6, attempts=1)
    whole = (boxes == torch.tensor([0, 5, 50, 50])).all(1)
    assert 0 < whole.sum() < 400
    assert ((boxes[:, 2] * boxes[:, 3])[~whole] >= 0.6 * 3000).all()


def test_inception_box_arguments_are_checked():
    with pytest.raises(ValueError, match="area"):
        inception_crop_boxes(keys_for(2), 0, (8, 8), area=(0.5, 0.1))
    with pytest.raises(ValueError, match="attempts"):
        inception_crop_boxes(keys_for(2), 0, (8, 8), attempts=0)
    with pytest.raises(ValueError, match="keys"):
        inception_crop_boxes(torch.zeros(2, 2, dtype=torch.long), 0, (8, 8))


@FAST
@given(seed=st.integers(0, 2**31), in_hw=st.tuples(st.integers(4, 14), st.integers(4, 14)))
def test_apply_inception_matches_reference(seed, in_hw):
    images = random_images(seed, (3, 3, *in_hw), "uint8")
    params = sample_inception_params(keys_for(3, seed), 4, in_hw, preprocessing="tf1")
    params = params._replace(flip=torch.tensor([True, False, True]))
    got = apply_inception(images, params, 6, grid="tf1")
    assert got.shape == (3, 3, 6, 6) and got.dtype == torch.float32
    assert got.min() >= -1 and got.max() <= 1
    for i in range(3):
        expected = ref_inception(
            images[i].numpy(),
            params.boxes[i].tolist(),
            bool(params.flip[i]),
            params.brightness[i].item(),
            params.saturation[i].item(),
            6,
        )
        np.testing.assert_allclose(got[i].numpy(), expected, atol=2e-5)


def test_inception_params_draw_from_separate_substreams():
    keys = keys_for(2000)
    params = sample_inception_params(keys, 9, (64, 64))
    assert torch.equal(params.flip, flip_mask(keys, substream(9, 1)))
    assert abs(params.flip.float().mean().item() - 0.5) < 0.04
    # brightness and saturation come from different streams: uncorrelated.
    corr = np.corrcoef(params.brightness.numpy(), params.saturation.numpy())[0, 1]
    assert abs(corr) < 0.1
    other = sample_inception_params(keys, 10, (64, 64))
    assert not torch.equal(params.boxes, other.boxes)


def test_inception_eval_is_central_crop_then_resize():
    assert central_crop_boxes((224, 224), 0.875, 1).tolist() == [[14, 14, 196, 196]]
    assert central_crop_boxes((375, 500), 0.875, 1).tolist() == [[23, 31, 329, 438]]
    images = random_images(2, (2, 3, 16, 24), "uint8")
    got = inception_preprocess(images, None, 0, 8, train=False, preprocessing="tf1")
    top, left, h, w = central_crop_boxes((16, 24), 0.875, 1)[0].tolist()
    for i in range(2):
        x = images[i].numpy().astype(np.float32) * f32(1 / 255)
        expected = (ref_bilinear(x[:, top : top + h, left : left + w], 8, 8) - 0.5) * 2
        np.testing.assert_allclose(got[i].numpy(), expected, atol=1e-6)


def test_inception_preprocess_wants_uint8_and_keys():
    with pytest.raises(TypeError, match="uint8"):
        inception_preprocess(torch.zeros(1, 3, 8, 8), keys_for(1), 0, 4)
    with pytest.raises(ValueError, match="keys"):
        inception_preprocess(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), None, 0, 4)
    with pytest.raises(ValueError, match="channels"):
        inception_preprocess(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), keys_for(1), 0, 4)


# --- determinism and batch independence -----------------------------------------------------------


def demo_images(count: int) -> torch.Tensor:
    """The first ``count`` real CIFAR-10 images of the embedded demo archive, uint8 [B, 3, H, W]."""
    arrays = []
    with tarfile.open(DEMO) as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".jpg"):
                data = archive.extractfile(member).read()
                arrays.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                if len(arrays) == count:
                    break
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def patch_pipeline(images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    x = resize_bilinear(images, 40)
    x = to_gray(x, grayscale_mask(keys, 1, 0.66))
    x = crop(x, random_crop_offsets(keys, 2, (40, 40), 33), 33)
    return standardize(x)


@pytest.mark.parametrize("pipeline", ["inception", "patch"])
def test_same_keys_same_output_whatever_the_batch(pipeline):
    images = demo_images(8)
    keys = keys_for(8, seed=123)

    def run(idx: list[int]) -> torch.Tensor:
        if pipeline == "inception":
            return inception_preprocess(images[idx], keys[idx], 3, 24)
        return patch_pipeline(images[idx], keys[idx])

    full = run(list(range(8)))
    assert torch.equal(full, run(list(range(8))))
    order = [5, 2, 7, 0]
    assert torch.equal(run(order), full[order])
    for i in (0, 6):
        assert torch.equal(run([i]), full[i : i + 1])
    other = rng.sample_keys(124, 0, torch.arange(8))
    changed = (
        inception_preprocess(images, other, 3, 24)
        if pipeline == "inception"
        else patch_pipeline(images, other)
    )
    assert not torch.equal(changed, full)


def test_inception_on_real_images_keeps_range_and_parameters_are_typed():
    images = demo_images(16)
    params = sample_inception_params(keys_for(16), 0, (32, 32))
    assert isinstance(params, InceptionParams)
    assert params.flip.dtype == torch.bool and params.brightness.dtype == torch.float32
    out = apply_inception(images, params, 32)
    assert out.shape == (16, 3, 32, 32) and out.min() >= -1 and out.max() <= 1
    assert out.std() > 0.2  # real content survives


@pytest.mark.cuda
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    images = demo_images(8)
    keys = keys_for(8)
    cpu = inception_preprocess(images, keys, 3, 24)
    gpu = inception_preprocess(images.cuda(), keys.cuda(), 3, 24)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        patch_pipeline(images.cuda(), keys.cuda()).cpu(), patch_pipeline(images, keys)
    )
