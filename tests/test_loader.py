"""DeterministicLoader: seeded order, same batches for any worker count, resumable, shardable."""

from __future__ import annotations

import pickle
import re
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ssltk.config import Config
from ssltk.data import rng
from ssltk.data.dataset import PreparedDataset, PreparedSplit
from ssltk.data.errors import BadImageError, DataError
from ssltk.data.loader import Batch, DeterministicLoader
from ssltk.data.prepare import prepare


def examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> PreparedDataset:
    out = tmp_path_factory.mktemp("prepared") / "demo"
    prepare(Config.model_validate({"data": {"prepared_dir": str(out)}}), progress=False)
    return PreparedDataset.open(out)


def same_batches(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        x.step == y.step
        and x.epoch == y.epoch
        and torch.equal(x.indices, y.indices)
        and torch.equal(x.images, y.images)
        and torch.equal(x.labels, y.labels)
        and torch.equal(x.keys, y.keys)
        for x, y in zip(a, b, strict=True)
    )


def test_an_epoch_is_a_seeded_permutation_in_full_batches(demo: PreparedDataset) -> None:
    val = demo.split("val")  # 500 images
    loader = DeterministicLoader(val, 64, seed=3)
    assert loader.steps_per_epoch == len(loader) == 500 // 64
    batches = list(loader.epoch(2))
    assert [b.step for b in batches] == list(range(7)) and all(b.epoch == 2 for b in batches)
    seen = torch.cat([b.indices for b in batches])
    assert len(seen) == 7 * 64 and len(set(seen.tolist())) == 7 * 64  # no repeats; 52 dropped
    assert torch.equal(seen, loader.order(2)[: 7 * 64])
    assert sorted(loader.order(2).tolist()) == list(range(500))
    first = batches[0]
    assert first.images.shape == (64, 3, 32, 32) and first.images.dtype == torch.uint8
    assert torch.equal(first.images, val.images(first.indices))
    assert (
        torch.equal(first.labels, val.labels[first.indices]) and first.labels.dtype == torch.int64
    )
    assert torch.equal(first.keys, rng.sample_keys(3, 2, first.indices))
    assert not torch.equal(loader.order(2), loader.order(3))
    assert not torch.equal(loader.order(2), DeterministicLoader(val, 64, seed=4).order(2))


def test_order_does_not_touch_torch_global_rng(demo: PreparedDataset) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first = list(DeterministicLoader(demo.split("val"), 100, seed=1).epoch(0))
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(123)
    again = list(DeterministicLoader(demo.split("val"), 100, seed=1).epoch(0))
    assert same_batches(first, again)


def test_without_shuffle_or_drop_last_every_item_comes_once(demo: PreparedDataset) -> None:
    loader = DeterministicLoader(demo.split("val"), 64, seed=0, shuffle=False, drop_last=False)
    batches = list(loader.epoch(0))
    assert len(batches) == loader.steps_per_epoch == 8 and len(batches[-1]) == 500 - 7 * 64
    assert torch.equal(torch.cat([b.indices for b in batches]), torch.arange(500))


@examples(6)
@given(
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 50),
    batch_size=st.sampled_from([16, 48, 100]),
    workers=st.sampled_from([1, 2]),
    start=st.integers(0, 3),
)
def test_same_batches_for_any_worker_count_and_after_resume(
    demo: PreparedDataset, seed: int, epoch: int, batch_size: int, workers: int, start: int
) -> None:
    val = demo.split("val")
    single = list(DeterministicLoader(val, batch_size, seed=seed).epoch(epoch))
    pooled = list(DeterministicLoader(val, batch_size, seed=seed, workers=workers).epoch(epoch))
    assert same_batches(single, pooled)
    resumed = DeterministicLoader(val, batch_size, seed=seed, workers=workers).epoch(epoch, start)
    assert same_batches(single[start:], list(resumed))


@examples(25)
@given(
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 9),
    batch_size=st.sampled_from([2, 10, 64, 128]),
    start=st.integers(0, 5),
)
def test_resume_mid_epoch_repeats_the_remaining_batches(
    demo: PreparedDataset, seed: int, epoch: int, batch_size: int, start: int
) -> None:
    loader = DeterministicLoader(demo.split("test"), batch_size, seed=seed)
    start = min(start, loader.steps_per_epoch)
    tail = list(islice(loader.epoch(epoch), start, start + 3))
    assert same_batches(tail, list(islice(loader.epoch(epoch, start_step=start), 3)))


@examples(25)
@given(
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 9),
    batch_size=st.sampled_from([2, 8, 64, 250]),
    drop_last=st.booleans(),
)
def test_rank_shards_concatenate_to_the_global_batch(
    demo: PreparedDataset, seed: int, epoch: int, batch_size: int, drop_last: bool
) -> None:
    val = demo.split("val")
    whole = list(DeterministicLoader(val, batch_size, seed=seed, drop_last=drop_last).epoch(epoch))
    ranks = [
        list(
            DeterministicLoader(
                val, batch_size, seed=seed, drop_last=drop_last, rank=r, world_size=2
            ).epoch(epoch)
        )
        for r in range(2)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(whole)
    for full, zero, one in zip(whole, ranks[0], ranks[1], strict=True):
        assert not set(zero.indices.tolist()) & set(one.indices.tolist())
        if len(full) == batch_size:
            assert len(zero) == len(one) == batch_size // 2
        for field in ("indices", "images", "labels", "keys"):
            joined = torch.cat([getattr(zero, field), getattr(one, field)])
            assert torch.equal(joined, getattr(full, field)), field


def test_sharded_workers_match_single_process(demo: PreparedDataset) -> None:
    val = demo.split("train+val")
    whole = list(islice(DeterministicLoader(val, 64, seed=5).epoch(1, 10), 4))
    shard = list(
        islice(
            DeterministicLoader(val, 64, seed=5, workers=2, rank=1, world_size=4).epoch(1, 10), 4
        )
    )
    for full, part in zip(whole, shard, strict=True):
        assert torch.equal(part.images, full.images[16:32])
        assert torch.equal(part.keys, full.keys[16:32])


def test_bad_arguments_are_clear_errors(demo: PreparedDataset) -> None:
    val: PreparedSplit = demo.split("val")
    with pytest.raises(DataError, match="batch_size 10 is not divisible by world_size 4"):
        DeterministicLoader(val, 10, seed=0, world_size=4)
    with pytest.raises(DataError, match=r"rank 2 is not in 0\.\.world_size-1"):
        DeterministicLoader(val, 8, seed=0, rank=2, world_size=2)
    with pytest.raises(DataError, match="batch_size 501 is larger than split 'val'"):
        DeterministicLoader(val, 501, seed=0)
    loader = DeterministicLoader(val, 100, seed=0)
    with pytest.raises(DataError, match=r"start_step 6 is not in 0\.\.5"):
        next(loader.epoch(0, start_step=6))
    assert list(loader.epoch(0, start_step=5)) == []  # resuming at the end of an epoch


def test_split_workers_reopen_memory_maps(demo: PreparedDataset) -> None:
    split = demo.split("test")
    split.images([0])  # open the memory map in this process
    clone = pickle.loads(pickle.dumps(split))
    assert len(pickle.dumps(split)) < 100_000  # the map is reopened by path, not copied
    pick = np.array([3, 999, 0])
    assert torch.equal(clone.images(pick), split.images(pick))


@pytest.mark.parametrize("workers", [0, 1])
def test_lazily_decoded_image_gone_bad_is_a_one_line_error(tmp_path: Path, workers: int) -> None:
    for label in ("a", "b"):
        for split in ("train", "val"):
            (tmp_path / "raw" / split / label).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (9, 9), (i, 0, 0)).save(
                    tmp_path / "raw" / split / label / f"{i}.png"
                )
    out = tmp_path / "p"
    config = {"source": "imagefolder", "root": str(tmp_path / "raw"), "prepared_dir": str(out)}
    config["max_in_memory_images"] = 1
    prepare(Config.model_validate({"data": config}), progress=False)
    bad = tmp_path / "raw" / "val" / "b" / "1.png"
    bad.write_bytes(b"not a png any more")
    loader = DeterministicLoader(
        PreparedDataset.open(out).split("test"), 6, seed=0, workers=workers
    )
    with pytest.raises(BadImageError, match=re.escape(str(bad.resolve()))) as info:
        list(loader.epoch(0))
    assert "\n" not in str(info.value)
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)


def test_workers_leave_the_global_torch_generator_alone(demo: PreparedDataset) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    loader = DeterministicLoader(demo.split("val"), 100, seed=0, workers=2)
    assert sum(1 for _ in loader.epoch(0)) == loader.steps_per_epoch == 5
    assert torch.equal(torch.rand(3), expected)
