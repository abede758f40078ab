"""The official list formats: ImageNet's flat ``val/`` with its label file (Kaggle's
``LOC_val_solution.csv`` or the devkit's ground truth and ``meta.mat``), Places205's lists, and
splits that would be empty refused when the data is prepared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from demo_images import demo_imagefolder
from typer.testing import CliRunner

from ssltk.cli import app
from ssltk.config import Config
from ssltk.data.errors import DataError
from ssltk.data.sources import open_source

WNIDS = {"airplane": "n02690373", "automobile": "n02814533", "bird": "n01530575"}
# Flat val/ files in name order and their true classes: not grouped, not in class order.
TRUTH = ["bird", "airplane", "bird", "automobile", "airplane", "automobile"]


def imagenet_like(root: Path) -> Path:
    """``train/<wnid>/`` and a flat ``val/`` of ILSVRC2012_val_<n>.JPEG, cut from demo images."""
    demo_imagefolder(root / "demo", 2, 2)
    for name, wnid in WNIDS.items():
        (root / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "demo" / "train" / name).rename(root / "train" / wnid)
    (root / "val").mkdir()
    held = {name: sorted((root / "demo" / "test" / name).iterdir()) for name in WNIDS}
    for number, name in enumerate(TRUTH, start=1):
        held[name].pop().rename(root / "val" / f"ILSVRC2012_val_{number:08d}.JPEG")
    return root


def labels_of(root: Path) -> dict[str, str]:
    source = open_source(
        Config.model_validate({"data": {"source": "imagefolder", "root": str(root)}}).data
    )
    test = source.splits["test"]
    return {
        Path(n).name: source.class_names[label]
        for n, label in zip(test.names, test.labels, strict=True)
    }


def expected() -> dict[str, str]:
    return {f"ILSVRC2012_val_{i:08d}.JPEG": WNIDS[name] for i, name in enumerate(TRUTH, start=1)}


def test_a_flat_val_is_labelled_by_loc_val_solution(tmp_path: Path):
    root = imagenet_like(tmp_path)
    rows = [
        f"ILSVRC2012_val_{i:08d},{WNIDS[n]} 1 2 30 40 {WNIDS[n]} 5 6 7 8"
        for i, n in enumerate(TRUTH, 1)
    ]
    (root / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "\n".join(rows[::-1]) + "\n"
    )
    assert labels_of(root) == expected()


def test_a_flat_val_is_labelled_by_the_devkit_ground_truth_in_file_name_order(tmp_path: Path):
    from scipy.io import savemat

    root = imagenet_like(tmp_path)
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    # ILSVRC2012_IDs are not the sorted-wnid order; a non-leaf synset (children) is not a class.
    ids = {"n02814533": 1, "n01530575": 2, "n02690373": 3, "n00001740": 4}
    synsets = np.zeros(4, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for row, (wnid, number) in enumerate(ids.items()):
        synsets[row] = (number, wnid, 5 if number == 4 else 0)
    savemat(data / "meta.mat", {"synsets": synsets})
    truth = [str(ids[WNIDS[name]]) for name in TRUTH]
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(truth) + "\n")
    assert labels_of(root) == expected()
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(truth[:-1]) + "\n")
    with pytest.raises(DataError, match="5 labels for 6 images"):
        labels_of(root)


def prepare_line(root: Path, tmp_path: Path, *sets: str) -> tuple[int, str]:
    argv = ["prepare", "--params", str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text("seed: 0\n")
    for item in (
        "data.source=imagefolder",
        f"data.root={root}",
        f"data.prepared_dir={tmp_path / 'p'}",
        *sets,
    ):
        argv += ["--set", item]
    result = CliRunner().invoke(app, argv)
    return result.exit_code, result.output


def test_a_flat_val_without_labels_or_an_empty_split_is_one_line_at_prepare_time(tmp_path: Path):
    root = imagenet_like(tmp_path / "flat")
    code, output = prepare_line(root, tmp_path)
    assert code == 2 and len(output.strip().splitlines()) == 1
    assert str(root / "val") in output and "LOC_val_solution.csv" in output
    assert not (tmp_path / "p").exists()

    empty = demo_imagefolder(tmp_path / "empty", 1)
    for folder in (empty / "test").iterdir():
        for image in folder.iterdir():
            image.unlink()
    code, output = prepare_line(empty, tmp_path)
    assert code == 2 and "the test split would be empty" in output
    assert len(output.strip().splitlines()) == 1

    listing = tmp_path / "list.txt"
    listing.write_text("train/cat/0000.jpg 0\ntrain/dog/0000.jpg 1\n")
    code, output = prepare_line(empty, tmp_path, f"data.file_list={listing}")
    assert code == 2 and "no val/ or test/ entries" in output and str(listing) in output


def test_places205_lists_name_classes_by_their_folders(tmp_path: Path):
    root = tmp_path / "images"
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train_places205.csv").write_text(
        "a/abbey/1.jpg 0\na/apartment_building/outdoor/2.jpg 1\n"
    )
    (lists / "val_places205.csv").write_text("a/abbey/3.jpg 0\n")
    root.mkdir()
    data = Config.model_validate(
        {"data": {"source": "places205", "root": str(root), "file_list": str(lists)}}
    ).data
    source = open_source(data)
    assert source.class_names == ["abbey", "apartment_building/outdoor"]
    assert source.splits["train"].labels.tolist() == [0, 1]
    assert source.splits["test"].names == ["a/abbey/3.jpg"]
    (lists / "val_places205.csv").write_text("a/abbey/3.jpg 1\n")
    with pytest.raises(DataError, match=r"val_places205\.csv:1: label 1 is class"):
        open_source(data)
