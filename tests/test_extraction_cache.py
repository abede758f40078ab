"""Feature extraction for large splits: float16 caches, loader workers giving the same bytes, and
the cache's size announced and checked against the disk before anything is allocated."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ssltk.data.dataset import ArrayBackedSplit
from ssltk.evaluate import features as features_module
from ssltk.evaluate.features import FeatureCache, extract_features
from ssltk.fsutil import WriteError


class _Task(torch.nn.Module):
    """A fixed random projection of the pixels as endpoint ``proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(
            torch.randn(3 * 8 * 8, 40, generator=torch.Generator().manual_seed(0))
        )

    def representation(self, images, layers, *, pool=None, keys=None):
        return {"proj": images.float().flatten(1) @ self.weight / 100}


@pytest.fixture
def split(tmp_path: Path) -> ArrayBackedSplit:
    rng = np.random.default_rng(0)
    path = tmp_path / "train_images.npy"
    np.save(path, rng.integers(0, 256, size=(70, 3, 8, 8), dtype=np.uint8))
    return ArrayBackedSplit(path, "train", ["a", "b"], torch.tensor(rng.integers(0, 2, 70)))


def _extract(split, root: Path, **kwargs):
    return extract_features(
        _Task(),
        split,
        ["proj"],
        identity={"weights": "w" * 16, "dtype": kwargs.get("dtype", "float32")},
        cache=FeatureCache(root),
        batch_size=16,
        max_features=9000,
        progress=False,
        **kwargs,
    )


def test_float16_cache_and_workers_give_the_same_features(split, tmp_path: Path, capsys) -> None:
    full = _extract(split, tmp_path / "a")
    assert "1 layers, 0.0 MiB of float32 to write" in capsys.readouterr().err
    half = _extract(split, tmp_path / "b", dtype="float16")
    assert half.layers["proj"].dtype == np.float16 and full.layers["proj"].dtype == np.float32
    np.testing.assert_array_equal(half.layers["proj"], full.layers["proj"].astype(np.float16))
    again = _extract(split, tmp_path / "c", workers=2)  # torch's threads differ: float sums too
    np.testing.assert_allclose(again.layers["proj"], full.layers["proj"], rtol=1e-5, atol=1e-5)
    twice = _extract(split, tmp_path / "e", workers=2)
    np.testing.assert_array_equal(twice.layers["proj"], again.layers["proj"])  # bit for bit
    manifest = json.loads(next((tmp_path / "b").rglob("*.json")).read_text())
    assert manifest["dtype"] == "float16" and manifest["shape"] == [70, 40]
    assert _extract(split, tmp_path / "b", dtype="float16").cached


def test_a_disk_too_small_is_one_line_before_any_array_exists(split, tmp_path: Path, monkeypatch):
    free = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(features_module.shutil, "disk_usage", lambda path: free)
    with pytest.raises(WriteError) as err:
        _extract(split, tmp_path / "d")
    assert "needs 0.0 MiB and the disk has 0.0 MiB free" in str(err.value)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "d").rglob("*.npy*"))
