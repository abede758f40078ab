"""Sources read the real on-disk formats pixel- and label-exactly."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssltk.config import Config
from ssltk.data.errors import DataError, DatasetNotFoundError, MissingFileError
from ssltk.data.sources import (
    ArraySplit,
    EncodedSplit,
    Source,
    decode_image,
    open_source,
    resize_and_center_crop,
)
from ssltk.errors import UserError

CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def data_config(**data: object) -> Config:
    return Config.model_validate({"data": data})


def decoded(split: ArraySplit | EncodedSplit, size: int) -> np.ndarray:
    images = [image for image, reason in split.decoded(size)]
    assert all(image is not None for image in images)
    return np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8)


# --------------------------------------------------------------------------------------------------
# CIFAR-10, python version: dicts with 'data' (uint8 [N, 3072], R then G then B planes, row-major),
# 'labels' (list of int), 'batch_label', 'filenames'; batches.meta holds 'label_names'.


def write_cifar10(root: Path, per_batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write the six batches and the meta file; returns all (images [N, 32, 32, 3], labels)."""
    gen = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    all_images, all_labels = [], []
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        hwc = gen.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        labels = gen.integers(0, 10, per_batch).tolist()
        rows = hwc.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # R plane, G plane, B plane
        batch = {
            "batch_label": f"{name} of 6",
            "labels": labels,
            "data": rows,
            "filenames": [f"img_{i}.png" for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        all_images.append(hwc)
        all_labels.append(labels)
    meta = {"num_cases_per_batch": per_batch, "label_names": CIFAR_CLASSES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return np.concatenate(all_images), np.concatenate(all_labels).astype(np.int64)


def test_cifar10_pickles_read_pixel_and_label_exact(tmp_path: Path) -> None:
    hwc, labels = write_cifar10(tmp_path, per_batch=3)
    source = open_source(data_config(source="cifar10", root=str(tmp_path)).data)
    assert source.class_names == CIFAR_CLASSES
    assert source.native_size == 32 and set(source.splits) == {"train", "test"}
    train, test = source.splits["train"], source.splits["test"]
    assert len(train) == 15 and len(test) == 3
    np.testing.assert_array_equal(train.labels, labels[:15])
    np.testing.assert_array_equal(test.labels, labels[15:])
    np.testing.assert_array_equal(decoded(train, 32), hwc[:15].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(decoded(test, 32), hwc[15:].transpose(0, 3, 1, 2))


def test_cifar10_pickles_accept_bytes_keys_and_the_folder_itself(tmp_path: Path) -> None:
    hwc, labels = write_cifar10(tmp_path, per_batch=2)
    folder = tmp_path / "cifar-10-batches-py"
    for path in folder.iterdir():  # as written by a python-2 pickler read with encoding='bytes'
        batch = pickle.loads(path.read_bytes())
        path.write_bytes(pickle.dumps({k.encode(): v for k, v in batch.items()}, protocol=2))
    source = open_source(data_config(source="cifar10", root=str(folder)).data)
    np.testing.assert_array_equal(source.splits["test"].labels, labels[10:])
    np.testing.assert_array_equal(
        decoded(source.splits["test"], 32), hwc[10:].transpose(0, 3, 1, 2)
    )


def test_cifar10_missing_batch_names_the_file(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=1)
    missing = tmp_path / "cifar-10-batches-py" / "data_batch_4"
    missing.unlink()
    with pytest.raises(MissingFileError, match="data_batch_4") as info:
        open_source(data_config(source="cifar10", root=str(tmp_path)).data)
    assert info.value.path == missing


def test_cifar10_pickle_cannot_run_code(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=1)
    evil = tmp_path / "cifar-10-batches-py" / "data_batch_2"

    class Payload:
        def __reduce__(self) -> tuple:
            return (print, ("this must never run",))

    evil.write_bytes(pickle.dumps({"data": Payload(), "labels": [0]}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_2.*refusing to load global .*print"):
        open_source(data_config(source="cifar10", root=str(tmp_path)).data)


def test_cifar10_image_folder_tree(tmp_path: Path) -> None:
    pixels = np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(pixels).save(tmp_path / split / name / "a.png")
    source = open_source(data_config(source="cifar10", root=str(tmp_path)).data)
    assert source.class_names == ["cat", "dog"] and source.layout == "imagefolder"
    np.testing.assert_array_equal(source.splits["test"].labels, [0, 1])
    np.testing.assert_array_equal(decoded(source.splits["test"], 32)[1], pixels.transpose(2, 0, 1))


# --------------------------------------------------------------------------------------------------
# STL-10, binary version: uint8 images of 3×96×96 stored channel by channel, each channel column by
# column (column-major); labels uint8 1..10; class_names.txt one name per line.

STL_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def stl_bytes(chw: np.ndarray) -> bytes:
    """One image in the STL-10 file layout: for each channel, the columns one after another."""
    return b"".join(chw[c, :, col].tobytes() for c in range(3) for col in range(96))


def write_stl10(root: Path, counts: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    (folder / "class_names.txt").write_text("\n".join(STL_CLASSES) + "\n")
    gen = np.random.default_rng(seed)
    out = {}
    for split, n in counts.items():
        chw = gen.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        (folder / f"{split}_X.bin").write_bytes(b"".join(stl_bytes(image) for image in chw))
        out[split] = chw
        if split != "unlabeled":
            labels = gen.integers(1, 11, n, dtype=np.uint8)  # 1-based on disk
            (folder / f"{split}_y.bin").write_bytes(labels.tobytes())
            out[f"{split}_y"] = labels
    return out


def test_stl10_binaries_read_pixel_and_label_exact(tmp_path: Path) -> None:
    written = write_stl10(tmp_path, {"train": 2, "test": 1, "unlabeled": 2})
    source = open_source(data_config(source="stl10", root=str(tmp_path), image_size=96).data)
    assert source.class_names == STL_CLASSES and source.native_size == 96
    for split in ("train", "test", "unlabeled"):
        np.testing.assert_array_equal(decoded(source.splits[split], 96), written[split])
    np.testing.assert_array_equal(source.splits["train"].labels, written["train_y"].astype(int) - 1)
    np.testing.assert_array_equal(source.splits["test"].labels, written["test_y"].astype(int) - 1)
    np.testing.assert_array_equal(source.splits["unlabeled"].labels, [-1, -1])


def test_stl10_column_major_orientation(tmp_path: Path) -> None:
    written = write_stl10(tmp_path, {"train": 1, "test": 1})
    image = np.zeros((3, 96, 96), np.uint8)
    image[0, 5, :] = 255  # a horizontal red line on row 5
    (tmp_path / "stl10_binary" / "test_X.bin").write_bytes(stl_bytes(image))
    # the raw file holds it column by column: byte col*96 + 5 of the red plane is set
    raw = np.frombuffer((tmp_path / "stl10_binary" / "test_X.bin").read_bytes(), np.uint8)
    assert raw[7 * 96 + 5] == 255 and raw[5 * 96 + 7] == 0
    source = open_source(data_config(source="stl10", root=str(tmp_path), image_size=96).data)
    got = decoded(source.splits["test"], 96)[0]
    assert (got[0, 5, :] == 255).all() and got[0].sum() == 255 * 96
    assert written["train"].shape == (1, 3, 96, 96)


def test_stl10_unlabeled_required_only_when_pretraining_on_it(tmp_path: Path) -> None:
    write_stl10(tmp_path, {"train": 1, "test": 1})
    plain = open_source(data_config(source="stl10", root=str(tmp_path)).data)
    assert set(plain.splits) == {"train", "test"}
    config = data_config(source="stl10", root=str(tmp_path), pretrain_split="train+unlabeled")
    with pytest.raises(MissingFileError, match=r"unlabeled_X\.bin"):
        open_source(config.data)


def test_stl10_truncated_and_bad_labels_name_the_file(tmp_path: Path) -> None:
    write_stl10(tmp_path, {"train": 2, "test": 1})
    folder = tmp_path / "stl10_binary"
    config = data_config(source="stl10", root=str(tmp_path)).data
    (folder / "train_X.bin").write_bytes((folder / "train_X.bin").read_bytes()[:-10])
    with pytest.raises(DataError, match=r"train_X\.bin.*whole number of 3×96×96"):
        open_source(config)
    write_stl10(tmp_path / "again", {"train": 1, "test": 1})
    (tmp_path / "again" / "stl10_binary" / "test_y.bin").write_bytes(bytes([0]))
    again = data_config(source="stl10", root=str(tmp_path / "again")).data
    with pytest.raises(DataError, match=r"test_y\.bin.*1\.\.10"):
        open_source(again)


# --------------------------------------------------------------------------------------------------
# ImageFolder trees and file lists


def test_imagefolder_reads_real_cifar10_images(cifar_demo: Path) -> None:
    source = open_source(data_config(source="imagefolder", root=str(cifar_demo)).data)
    assert source.class_names == CIFAR_CLASSES
    train, test = source.splits["train"], source.splits["test"]
    assert len(train) == 5_000 and len(test) == 1_000
    assert np.bincount(train.labels).tolist() == [500] * 10
    root, names = train.files()
    assert root == cifar_demo.resolve() and names[:2] == [
        "train/airplane/0000.jpg",
        "train/airplane/0001.jpg",
    ]
    first = next(iter(train.decoded(32)))[0]
    with Image.open(cifar_demo / names[0]) as image:
        np.testing.assert_array_equal(first, np.asarray(image.convert("RGB")).transpose(2, 0, 1))
    assert train.labels[0] == 0 and train.labels[-1] == 9


def test_imagefolder_file_list_with_class_names_and_indices(
    cifar_demo: Path, tmp_path: Path
) -> None:
    lines = [
        "# path label",
        "train/cat/0000.jpg cat",
        "train/dog/0001.jpg dog",
        "test/cat/0002.jpg cat",
    ]
    (tmp_path / "names.txt").write_text("\n".join(lines) + "\n")
    config = data_config(
        source="imagefolder", root=str(cifar_demo), file_list=str(tmp_path / "names.txt")
    )
    source = open_source(config.data)
    assert source.class_names == ["cat", "dog"]
    assert source.splits["train"].labels.tolist() == [0, 1] and len(source.splits["test"]) == 1
    (tmp_path / "ints.txt").write_text("train/cat/0000.jpg 3\nval/dog/0001.jpg 5\n")
    config.data.file_list = tmp_path / "ints.txt"
    source = open_source(config.data)
    assert len(source.class_names) == 6 and source.splits["test"].labels.tolist() == [5]
    (tmp_path / "bad.txt").write_text("train/cat/0000.jpg 3\nelsewhere/x.jpg 1\n")
    config.data.file_list = tmp_path / "bad.txt"
    with pytest.raises(DataError, match=r"bad\.txt:2: expected"):
        open_source(config.data)


def test_resize_shorter_side_with_area_filter_then_centre_crop() -> None:
    stripes = np.zeros((60, 40, 3), np.uint8)  # 60 high, 40 wide: red, green, blue bands of 20 rows
    stripes[:20, :, 0] = stripes[20:40, :, 1] = stripes[40:, :, 2] = 200
    out = resize_and_center_crop(Image.fromarray(stripes), 20)  # → 30×20, rows 5..24 kept
    assert out.shape == (3, 20, 20) and out.dtype == np.uint8
    assert (out[0, :5] == 200).all() and (out[1, 5:15] == 200).all() and (out[2, 15:] == 200).all()
    assert out[:, :5].sum() == 200 * 5 * 20
    wide = resize_and_center_crop(Image.new("RGB", (10, 7), (1, 2, 3)), 7)
    assert wide.shape == (3, 7, 7) and wide[:, 3, 3].tolist() == [1, 2, 3]


def test_decode_image_converts_gray_and_palette_to_rgb(tmp_path: Path) -> None:
    Image.new("L", (8, 8), 77).save(tmp_path / "gray.png")
    Image.new("P", (8, 8), 3).save(tmp_path / "pal.gif")
    gray = decode_image(tmp_path / "gray.png", 8)
    assert gray.shape == (3, 8, 8) and (gray == 77).all()
    assert decode_image((tmp_path / "pal.gif").read_bytes(), 4).shape == (3, 4, 4)


def test_demo_source_reads_the_embedded_archive() -> None:
    source = open_source(data_config().data)
    assert isinstance(source, Source) and source.name == "demo"
    assert source.class_names == CIFAR_CLASSES
    assert len(source.splits["train"]) == 5000 and len(source.splits["test"]) == 1000
    assert np.bincount(source.splits["test"].labels).tolist() == [100] * 10
    first = next(iter(source.splits["test"].decoded(32)))[0]
    assert first.shape == (3, 32, 32) and first.std() > 10  # a real photo, not a blank


# --------------------------------------------------------------------------------------------------
# Configuration errors


def test_missing_root_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for source in ("cifar10", "stl10", "imagefolder"):
        with pytest.raises(DatasetNotFoundError, match=str(missing)) as info:
            open_source(data_config(source=source, root=str(missing)).data)
        assert isinstance(info.value, UserError)
    with pytest.raises(UserError, match=r"data\.root: required for source stl10"):
        open_source(data_config(source="stl10").data)


def test_imagefolder_without_test_split_names_it(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "a" / "x.png")
    with pytest.raises(MissingFileError, match=str(tmp_path / "val")):
        open_source(data_config(source="imagefolder", root=str(tmp_path)).data)
    (tmp_path / "val" / "b").mkdir(parents=True)
    with pytest.raises(DataError, match=r"val/b: class folder not present in train"):
        open_source(data_config(source="imagefolder", root=str(tmp_path)).data)


def test_options_that_a_source_cannot_honour_are_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"data\.file_list"):
        open_source(data_config(source="demo", file_list=str(tmp_path / "list.txt")).data)
    with pytest.raises(UserError, match=r"data\.pretrain_split.*only source stl10"):
        open_source(data_config(source="demo", pretrain_split="unlabeled").data)
