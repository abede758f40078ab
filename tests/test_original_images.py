"""Files storage keeps the original image, and the paper's crops see all of it (#24, item 5).

The image is 4:3 (48×64): grey, with a red strip in columns 0..7 and a green one in 56..63, i.e.
exactly the parts outside the 48² centre square that files storage used to keep.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ssltk.config import Config, load_config
from ssltk.data import rng
from ssltk.data.augment import (
    center_crop_offsets,
    crop,
    inception_crop_boxes_each,
    random_crop_offsets,
    resize_bilinear,
    resize_grid,
    resize_small,
    small_side_crops,
)
from ssltk.data.dataset import PreparedDataset
from ssltk.data.image_list import ImageList
from ssltk.data.loader import PREFETCH, DeterministicLoader, _write_slot, images_in_workers
from ssltk.data.prepare import prepare
from ssltk.pretext import build_task

HEIGHT, WIDTH, STRIP = 48, 64, 8
TASKS = ("rotation", "exemplar", "jigsaw", "relative_patch_location")


def bordered_image() -> np.ndarray:
    pixels = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
    pixels[:, :STRIP] = (255, 0, 0)
    pixels[:, WIDTH - STRIP :] = (0, 255, 0)
    return pixels


@pytest.fixture(scope="module")
def files_storage(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    """An ImageFolder of 4:3 images prepared as a file list (``data.image_size`` 48)."""
    root = tmp_path_factory.mktemp("fidelity")
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / "raw" / split / label).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(bordered_image()).save(root / "raw" / split / label / f"{i}.png")
    data = {"source": "imagefolder", "root": str(root / "raw"), "prepared_dir": str(root / "p")}
    config = Config.model_validate({"data": {**data, "image_size": 48, "max_in_memory_images": 1}})
    assert prepare(config, progress=False)["storage"] == "files"
    return PreparedDataset.open(root / "p")


def task_for(name: str, size: int, preprocessing: str):
    sets = [f"pretext.input_size={size}", f"data.image_size={size}", "model.widening=1"]
    sets += [f"pretext.task={name}", f"pretext.preprocessing={preprocessing}"]
    return build_task(load_config(None, sets)).eval()


@pytest.mark.parametrize("preprocessing", ["symmetric", "tf1"])
def test_inception_crops_of_a_4_3_image_reach_its_left_and_right_borders(
    files_storage: PreparedDataset, preprocessing: str
) -> None:
    image = files_storage.split("train").images([0])[0]
    assert tuple(image.shape) == (3, HEIGHT, WIDTH)  # the whole file, not its 48² centre
    keys = rng.sample_keys(0, 0, torch.arange(256))
    boxes = inception_crop_boxes_each(keys, 0, [(HEIGHT, WIDTH)] * 256, preprocessing=preprocessing)
    left, right = boxes[:, 1], boxes[:, 1] + boxes[:, 3]
    assert (left < STRIP).any() and (right > WIDTH - STRIP).any()
    task = task_for("rotation", 32, preprocessing)
    batch = task.prepare_batch(ImageList([image] * 256), keys, rng.batch_key(0, 0, 0), train=True)
    x = batch.inputs.view(256, 4, 3, 32, 32)[:, 0]  # the unrotated copies, in [-1, 1]
    red, green = x[:, 0] - x[:, 1], x[:, 1] - x[:, 0]  # grey stays grey under the colour jitter
    assert (red > 0.5).any() and (green > 0.5).any()


@pytest.mark.parametrize("preprocessing", ["symmetric", "tf1"])
@pytest.mark.parametrize("name", ["jigsaw", "relative_patch_location"])
def test_patch_tasks_resize_the_whole_image_to_292_before_the_grid(
    files_storage: PreparedDataset, name: str, preprocessing: str
) -> None:
    task = task_for(name, 224, preprocessing)
    assert task.layout.resize == 292
    images = files_storage.split("train").images([0, 1])
    keys = rng.sample_keys(0, 0, torch.arange(2))
    square = task.resize_whole(images, keys, train=False)
    assert square.shape == (2, 3, 292, 292)
    whole = torch.from_numpy(bordered_image()).permute(2, 0, 1)[None].expand(2, -1, -1, -1)
    expected = resize_bilinear(whole, 292, grid=resize_grid(preprocessing))
    assert torch.equal(square, expected)  # aspect ignored: 48×64 → 292×292
    assert (square[:, :, :, 0] == torch.tensor([255.0, 0, 0])[:, None]).all()  # red left edge
    assert (square[:, :, :, -1] == torch.tensor([0.0, 255, 0])[:, None]).all()  # green right
    patches = task.sample_patches(images, keys, train=True)
    assert patches.shape == (2, 9, 3, task.layout.patch, task.layout.patch)


@pytest.mark.parametrize("preprocessing", ["symmetric", "tf1"])
@pytest.mark.parametrize("name", TASKS)
def test_a_list_of_equal_images_is_preprocessed_as_the_batch_tensor(
    name: str, preprocessing: str
) -> None:
    """Per-image cropping changes no pixel: the arrays path's output, bit for bit (also tf1)."""
    task = task_for(name, 32, preprocessing)
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    keys, batch_key = rng.sample_keys(3, 0, torch.arange(2)), rng.batch_key(3, 0, 0)
    for train in (True, False):
        tensor = task.prepare_batch(images, keys, batch_key, train=train)
        listed = task.prepare_batch(ImageList(images), keys, batch_key, train=train)
        assert torch.equal(tensor.inputs, listed.inputs)
        assert torch.equal(tensor.labels, listed.labels)
    for crop_keys in (None, keys):
        tensor_repr = task.representation(images, None, keys=crop_keys)
        listed_repr = task.representation(ImageList(images), None, keys=crop_keys)
        assert all(torch.equal(tensor_repr[k], listed_repr[k]) for k in tensor_repr)


@pytest.mark.parametrize("preprocessing", ["symmetric", "tf1"])
@pytest.mark.parametrize("name", ["rotation", "jigsaw", "relative_patch_location"])
def test_each_image_of_a_mixed_batch_is_cropped_as_if_alone(name: str, preprocessing: str) -> None:
    task = task_for(name, 32, preprocessing)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((30, 40), (44, 33))]
    keys, batch_key = rng.sample_keys(5, 0, torch.arange(2)), rng.batch_key(5, 0, 0)
    mixed = task.prepare_batch(ImageList(images), keys, batch_key, train=True).inputs
    per = mixed.shape[0] // 2
    for i, image in enumerate(images):
        alone = task.prepare_batch(image[None], keys[i : i + 1], batch_key, train=True).inputs
        if name == "rotation":
            assert torch.equal(mixed[i * per : (i + 1) * per], alone)
        else:  # the patch kernel's standardisation sums in an order that depends on the batch
            assert torch.allclose(mixed[i * per : (i + 1) * per], alone, rtol=0, atol=1e-5)
            squares = task.resize_whole(ImageList(images), keys, train=True)
            assert torch.equal(
                squares[i], task.resize_whole(image[None], keys[i : i + 1], train=True)[0]
            )


@pytest.mark.parametrize("random", [False, True])
def test_evaluation_crop_of_each_original_is_the_released_resize_small_and_crop(random):
    """Shorter side to 36 (area, aspect kept), then a 32² crop: centred, or drawn from the key."""
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((48, 64), (50, 37))]
    keys = rng.sample_keys(5, 0, torch.arange(2)) if random else None
    crops = small_side_crops(ImageList(images), 36, 32, keys, stream=11)
    for i, image in enumerate(images):
        resized = resize_small(image[None], 36)
        in_hw = tuple(resized.shape[-2:])
        assert min(in_hw) == 36 and max(in_hw) in (48, 49)
        if random:
            offsets = random_crop_offsets(keys[i : i + 1], 11, in_hw, 32)
        else:
            offsets = center_crop_offsets(in_hw, 32, 1)
        assert torch.equal(crops[i], crop(resized, offsets, 32)[0])


def test_workers_pass_original_images_through_unchanged(files_storage: PreparedDataset) -> None:
    split = files_storage.split("train+val")
    inline = [b.images for b in DeterministicLoader(split, 4, seed=0, workers=0).epoch(0)]
    pooled = [b.images for b in DeterministicLoader(split, 4, seed=0, workers=1).epoch(0)]
    assert all(isinstance(b, ImageList) for b in pooled)
    for a, b in zip(inline, pooled, strict=True):
        assert all(
            torch.equal(x, y) and x.shape == (3, HEIGHT, WIDTH) for x, y in zip(a, b, strict=True)
        )


def test_a_pickled_image_list_travels_as_one_buffer_and_comes_back_equal() -> None:
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in [(5, 7), (9, 4)]]
    clone = pickle.loads(pickle.dumps(ImageList(images)))
    assert [tuple(i.shape) for i in clone] == [(3, 5, 7), (3, 9, 4)]
    assert all(torch.equal(a, b) for a, b in zip(images, clone, strict=True))
    assert len({i.untyped_storage().data_ptr() for i in clone}) == 1
    mixed = ImageList([images[0], images[1].float()])
    clone = pickle.loads(pickle.dumps(mixed))
    assert [i.dtype for i in clone] == [torch.uint8, torch.float32]


@pytest.fixture(scope="module")
def distinct_files(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    """40 distinct random training originals, 40 x 52 but for one of 120 x 90, as a file list."""
    root = tmp_path_factory.mktemp("distinct")
    generator = np.random.default_rng(0)
    for split, count in (("train", 20), ("val", 1)):
        for label in ("a", "b"):
            (root / "raw" / split / label).mkdir(parents=True)
            for i in range(count):
                size = (90, 120) if (split, label, i) == ("train", "b", 7) else (40, 52)
                pixels = generator.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "raw" / split / label / f"{i}.png")
    data = {"source": "imagefolder", "root": str(root / "raw"), "prepared_dir": str(root / "p")}
    data |= {"image_size": 32, "max_in_memory_images": 1, "val_fraction": 0}
    assert prepare(Config.model_validate({"data": data}), progress=False)["storage"] == "files"
    return PreparedDataset.open(root / "p")


def test_reused_shared_buffers_keep_every_batch_and_the_one_before_it_intact(
    distinct_files: PreparedDataset,
) -> None:
    split = distinct_files.split("train")
    batches = [torch.arange(i, min(i + 2, len(split))) for i in range(0, len(split), 2)]
    slots = 2 * PREFETCH + 2
    assert len(batches) > slots + 1  # every slot is written more than once
    inline = [split.images(b) for b in batches]
    kept: list[ImageList] = []  # alive to the end, so no storage address is handed out twice
    for i, images in enumerate(images_in_workers(split, batches, 2, reuse_buffers=True)):
        assert all(torch.equal(x, y) for x, y in zip(inline[i], images, strict=True)), i
        if kept:  # the batch before is still intact once this one has arrived
            assert all(torch.equal(x, y) for x, y in zip(inline[i - 1], kept[-1], strict=True))
        kept.append(images)
    storages = {image.untyped_storage().data_ptr() for images in kept for image in images}
    # Batch 0 (decoded here, 2 storages) and the batch holding the 120 x 90 original (too large
    # for a slot, 1) have their own; every other batch lies in a slot. Fresh buffers: 20.
    assert len(storages) <= slots + 3 < len(batches)


def test_a_batch_larger_than_its_slot_travels_on_its_own() -> None:
    images = ImageList(
        [torch.ones(3, 4, 5, dtype=torch.uint8), torch.ones(3, 2, 2, dtype=torch.uint8)]
    )
    small = [torch.zeros(10, dtype=torch.uint8)]
    assert _write_slot(images, small, 0) is images
    fits = [torch.zeros(100, dtype=torch.uint8)]
    written = _write_slot(images, fits, 0)
    assert all(torch.equal(a, b) for a, b in zip(images, written.read(fits), strict=True))
