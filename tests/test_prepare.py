"""``prepare`` writes a complete, deterministic, atomically replaced dataset directory."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssltk.config import Config
from ssltk.data.dataset import ArrayBackedSplit, FileBackedSplit, PreparedDataset
from ssltk.data.errors import BadImageError, DatasetNotFoundError, PreparedDataError
from ssltk.data.image_list import ImageList
from ssltk.data.prepare import held_out_mask, prepare
from ssltk.data.sources import resize_and_center_crop
from ssltk.errors import UserError


def make_config(out: Path, **data: object) -> Config:
    return Config.model_validate({"data": {"prepared_dir": str(out), **data}})


def write_tagged_cifar10(root: Path, per_batch: int) -> None:
    """CIFAR-10 python batches whose image ``i`` (train, then test) carries ``i`` in pixel 0."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    for number, name in enumerate(names):
        ids = np.arange(number * per_batch, (number + 1) * per_batch)
        data = np.zeros((per_batch, 3072), np.uint8)
        data[:, 0], data[:, 1] = ids // 256, ids % 256
        batch = {"data": data, "labels": (ids % 10).tolist(), "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": [f"c{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def tags(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(int) * 256 + images[:, 0, 0, 1]


def write_tree(root: Path, bad: str | None = None) -> list[Path]:
    """An ImageFolder tree of 12×10 PNGs (2 classes × 4 train, × 1 val); ``bad`` is truncated."""
    files = []
    for split, per_class in (("train", 4), ("val", 1)):
        for label, name in enumerate(("ant", "bee")):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                path = root / split / name / f"{i}.png"
                Image.new("RGB", (12, 10), (label * 100, i * 20, 7)).save(path)
                files.append(path)
    if bad is not None:
        (root / bad).write_bytes((root / bad).read_bytes()[:40])
    return files


def test_demo_prepare_and_repeat_gives_identical_bytes(tmp_path: Path) -> None:
    first = prepare(make_config(tmp_path / "a"), progress=False)
    assert first["source"] == "demo" and first["storage"] == "arrays"
    assert first["counts"] == {"train": 4500, "val": 500, "test": 1000}
    assert first["splits"]["val"]["class_counts"] == [50] * 10
    assert first["skipped_images"] == 0 and first["image_size"] == 32
    second = prepare(make_config(tmp_path / "b"), progress=False)
    assert second["content_hash"] == first["content_hash"]
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    dataset = PreparedDataset.open(tmp_path / "a")
    assert dataset.manifest == first and dataset.num_classes == 10
    train = dataset.split("train")
    assert isinstance(train, ArrayBackedSplit) and len(train) == 4500
    images = train.images(np.array([0, 4499]))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8


def test_val_is_held_out_per_class_from_train_by_seed(tmp_path: Path) -> None:
    write_tagged_cifar10(tmp_path / "raw", per_batch=20)  # 100 train (10 per class), 20 test
    config = make_config(tmp_path / "p", source="cifar10", root=str(tmp_path / "raw"))
    config.data.val_fraction = 0.25
    manifest = prepare(config, progress=False)
    assert manifest["counts"] == {
        "train": 70,
        "val": 30,
        "test": 20,
    }  # round(10 · 0.25) = 3 per class
    dataset = PreparedDataset.open(tmp_path / "p")
    train, val = dataset.split("train"), dataset.split("val")
    train_ids = tags(train.images(np.arange(len(train))).numpy())
    val_ids = tags(val.images(np.arange(len(val))).numpy())
    assert sorted(np.concatenate([train_ids, val_ids]).tolist()) == list(range(100))
    assert (np.diff(train_ids) > 0).all() and (np.diff(val_ids) > 0).all()  # source order kept
    np.testing.assert_array_equal(val.labels.numpy(), val_ids % 10)
    assert np.bincount(val.labels.numpy()).tolist() == [3] * 10
    assert tags(dataset.split("test").images(np.arange(20)).numpy()).tolist() == list(
        range(100, 120)
    )
    config.seed = 1
    other = prepare(config, progress=False)
    other_val = tags(
        PreparedDataset.open(tmp_path / "p").split("val").images(np.arange(30)).numpy()
    )
    assert set(other_val.tolist()) != set(val_ids.tolist())
    assert other["content_hash"] != manifest["content_hash"]


def test_held_out_mask_counts_and_determinism() -> None:
    labels = np.repeat(np.arange(3), [10, 5, 1])
    mask = held_out_mask(labels, 0.2, seed=7)
    assert [int(mask[labels == c].sum()) for c in range(3)] == [2, 1, 0]
    np.testing.assert_array_equal(mask, held_out_mask(labels, 0.2, seed=7))
    assert not held_out_mask(labels, 0.0, seed=7).any()


def test_zero_val_fraction_still_writes_an_empty_val_split(tmp_path: Path) -> None:
    write_tagged_cifar10(tmp_path / "raw", per_batch=2)
    config = make_config(tmp_path / "p", source="cifar10", root=str(tmp_path / "raw"))
    config.data.val_fraction = 0.0
    assert prepare(config, progress=False)["counts"] == {"train": 10, "val": 0, "test": 2}
    val = PreparedDataset.open(tmp_path / "p").split("val")
    assert len(val) == 0 and val.images(np.array([], dtype=np.int64)).shape == (0, 3, 32, 32)


def test_corrupt_image_fails_naming_the_file_and_a_skip_rerun_lists_it(tmp_path: Path) -> None:
    write_tree(tmp_path / "raw", bad="train/bee/2.png")
    out = tmp_path / "p"
    with pytest.raises(BadImageError, match=r"train/bee/2\.png") as info:
        prepare(make_config(out, source="imagefolder", root=str(tmp_path / "raw")), progress=False)
    assert isinstance(info.value, UserError) and "on_bad_image" in str(info.value)
    # Nothing looks prepared; the pass's work so far waits, hidden, for a rerun.
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [".p.partial", "raw"]
    config = make_config(out, source="imagefolder", root=str(tmp_path / "raw"), on_bad_image="skip")
    manifest = prepare(config, progress=False)
    assert manifest["skipped_images"] == 1 and manifest["skipped_list"] == "skipped.txt"
    assert manifest["content_hash_covers"] == "labels and the stored pixels"
    bad = str(tmp_path / "raw" / "train/bee/2.png")
    assert (out / "skipped.txt").read_text() == f"{bad}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "raw"]


@pytest.mark.parametrize("limit", [1000, 2])  # arrays, and a lazily decoded file list
def test_skip_policy_leaves_bad_images_out_and_counts_them(tmp_path: Path, limit: int) -> None:
    write_tree(tmp_path / "raw", bad="val/ant/0.png")
    config = make_config(
        tmp_path / "p", source="imagefolder", root=str(tmp_path / "raw"), on_bad_image="skip"
    )
    config.data.max_in_memory_images = limit
    config.data.image_size = 8
    manifest = prepare(config, progress=False)
    assert manifest["storage"] == ("arrays" if limit == 1000 else "files")
    assert manifest["skipped_images"] == 1
    assert manifest["skipped"] == [str((tmp_path / "raw" / "val/ant/0.png").resolve())]
    assert manifest["counts"] == {"train": 8, "val": 0, "test": 1}  # round(4 · 0.1) = 0 held out
    stored = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert stored["skipped_images"] == 1
    test = PreparedDataset.open(tmp_path / "p").split("test")
    assert test.labels.tolist() == [1]
    assert test.images([0])[0][0, 0, 0].item() == 100  # the good "bee" image


def test_file_list_storage_keeps_the_original_images(cifar_demo: Path, tmp_path: Path) -> None:
    """Files storage decodes each file whole; brought to the stored size as ``prepare`` does, it
    gives the arrays' pixels."""
    small = make_config(tmp_path / "a", source="imagefolder", root=str(cifar_demo))
    large = make_config(tmp_path / "f", source="imagefolder", root=str(cifar_demo))
    large.data.max_in_memory_images = 100
    for config in (small, large):
        config.data.image_size = 24  # resized from 32 with the area filter, then centre-cropped
    a, f = prepare(small, progress=False), prepare(large, progress=False)
    assert (a["storage"], f["storage"]) == ("arrays", "files")
    assert a["counts"] == f["counts"] == {"train": 4500, "val": 500, "test": 1000}
    assert f["root"] == str(cifar_demo.resolve())
    assert (tmp_path / "f" / "val_files.txt").read_text().count("\n") == 500
    arrays, files = PreparedDataset.open(tmp_path / "a"), PreparedDataset.open(tmp_path / "f")
    assert isinstance(files.split("val"), FileBackedSplit)
    pick = np.array([0, 499, 17, 250])
    for name in ("val", "test"):
        split = files.split(name)
        got = split.images(pick)
        assert isinstance(got, ImageList) and len(got) == 4
        stored = arrays.split(name).images(pick)
        for row, index in enumerate(pick):
            image = got[row]
            assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)  # not 24²
            with Image.open(split.root / split.files[index]) as original:
                rgb = np.asarray(original.convert("RGB")).transpose(2, 0, 1)
                assert (image.numpy() == rgb).all()
                assert (resize_and_center_crop(original, 24) == stored[row].numpy()).all()
        assert (files.split(name).labels == arrays.split(name).labels).all()
    assert prepare(large, progress=False)["content_hash"] == f["content_hash"]


def test_stl10_prepare_keeps_unlabeled_and_resizes(tmp_path: Path) -> None:
    folder = tmp_path / "raw" / "stl10_binary"
    folder.mkdir(parents=True)
    (folder / "class_names.txt").write_text("\n".join(f"k{i}" for i in range(10)))
    gen = np.random.default_rng(3)
    for split, n in (("train", 50), ("test", 3), ("unlabeled", 4)):
        (folder / f"{split}_X.bin").write_bytes(gen.integers(0, 256, n * 27648, np.uint8).tobytes())
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes(
                ((np.arange(n) % 10) + 1).astype(np.uint8).tobytes()
            )
    config = make_config(tmp_path / "p", source="stl10", root=str(tmp_path / "raw"))
    config.data.image_size = 48
    manifest = prepare(config, progress=False)
    assert manifest["counts"] == {"train": 40, "val": 10, "test": 3, "unlabeled": 4}
    assert manifest["splits"]["unlabeled"]["labeled"] is False and manifest["native_size"] == 96
    dataset = PreparedDataset.open(tmp_path / "p")
    both = dataset.split("train+unlabeled")
    assert len(both) == 44 and both.labels[-4:].tolist() == [-1] * 4
    raw = np.frombuffer((folder / "unlabeled_X.bin").read_bytes(), np.uint8).reshape(4, 3, 96, 96)
    full = raw.transpose(0, 1, 3, 2).astype(float)  # column-major on disk
    blocks = full.reshape(4, 3, 48, 2, 48, 2).mean(axis=(3, 5))  # area mean, exact factor 2
    got = dataset.split("unlabeled").images(np.arange(4)).numpy()
    np.testing.assert_array_equal(got, np.rint(blocks))  # one rounding, ties to even


def test_missing_root_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(DatasetNotFoundError, match=str(missing)):
        prepare(make_config(tmp_path / "p", source="cifar10", root=str(missing)), progress=False)
    assert not (tmp_path / "p").exists()


def test_failed_prepare_keeps_the_previous_dataset(tmp_path: Path) -> None:
    write_tagged_cifar10(tmp_path / "raw", per_batch=2)
    config = make_config(tmp_path / "p", source="cifar10", root=str(tmp_path / "raw"))
    before = prepare(config, progress=False)
    (tmp_path / "raw" / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(UserError, match="test_batch"):
        prepare(config, progress=False)
    assert PreparedDataset.open(tmp_path / "p").content_hash == before["content_hash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "raw"]  # no temporary dirs left


def test_interrupted_write_is_never_taken_for_a_dataset(tmp_path: Path) -> None:
    stale = tmp_path / ".p.tmp-999999999"  # what a killed run leaves: never named like the target
    stale.mkdir()
    (stale / "train_images.npy").write_bytes(b"partial")
    with pytest.raises(PreparedDataError, match="not found"):
        PreparedDataset.open(tmp_path / "p")
    write_tagged_cifar10(tmp_path / "raw", per_batch=1)
    prepare(
        make_config(tmp_path / "p", source="cifar10", root=str(tmp_path / "raw")), progress=False
    )
    assert not stale.exists()  # its process is gone, so the next run clears it


def test_open_reports_missing_and_corrupt_manifests(tmp_path: Path) -> None:
    write_tagged_cifar10(tmp_path / "raw", per_batch=1)
    prepare(
        make_config(tmp_path / "p", source="cifar10", root=str(tmp_path / "raw")), progress=False
    )
    manifest = tmp_path / "p" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(PreparedDataError, match=r"manifest\.json is corrupt"):
        PreparedDataset.open(tmp_path / "p")
    manifest.write_text(json.dumps({"format": "something-else/9"}))
    with pytest.raises(PreparedDataError, match="format 'something-else/9'"):
        PreparedDataset.open(tmp_path / "p")
    manifest.unlink()
    with pytest.raises(PreparedDataError, match=r"manifest\.json is missing"):
        PreparedDataset.open(tmp_path / "p")


def test_open_reports_missing_arrays_and_unknown_splits(tmp_path: Path) -> None:
    write_tagged_cifar10(tmp_path / "raw", per_batch=1)
    prepare(
        make_config(tmp_path / "p", source="cifar10", root=str(tmp_path / "raw")), progress=False
    )
    dataset = PreparedDataset.open(tmp_path / "p")
    with pytest.raises(PreparedDataError, match="no split 'unlabeled'"):
        dataset.split("train+unlabeled")
    with pytest.raises(IndexError, match="index 5 out of range"):
        dataset.split("train").images([0, 5])
    (tmp_path / "p" / "test_images.npy").unlink()
    with pytest.raises(PreparedDataError, match=r"test_images\.npy is missing"):
        dataset.split("test")
