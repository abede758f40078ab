"""A deterministic, resumable, shardable batch loader over a prepared split.

The order of an epoch is a permutation drawn from ``(seed, epoch)`` by :mod:`ssltk.data.rng`, never
from torch's global generator, and every batch's indices are fixed before any worker starts. Workers
only gather/decode images, so batch ``b`` holds the same images for any worker count, after a resume
at ``start_step`` and, concatenated over ranks, for any ``world_size``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from ssltk.data import rng
from ssltk.data.dataset import PreparedSplit
from ssltk.data.errors import DataError
from ssltk.data.image_list import ImageList, Images

# The epoch order uses a batch key at a step no real batch reaches, on its own stream.
_ORDER_STEP = 2**63 - 1
#: Batches each loader worker decodes ahead (DataLoader's prefetch_factor).
PREFETCH = 2


@dataclass(frozen=True)
class Batch:
    """One rank's share of a global batch."""

    images: torch.Tensor  # uint8 [B, 3, S, S]
    labels: torch.Tensor  # int64 [B]; -1 where unlabeled
    indices: torch.Tensor  # int64 [B], item indices in the split
    keys: torch.Tensor  # int64 [B], rng.sample_keys(seed, epoch, indices)
    epoch: int
    step: int

    def __len__(self) -> int:
        return len(self.indices)


class _Gather(Dataset):
    """Item ``i`` is the images of the ``i``-th index batch; run in DataLoader workers.

    A :class:`DataError` (e.g. an image file that went bad after ``prepare``) is returned rather
    than raised, so the main process re-raises it with its own type and one-line message instead
    of DataLoader's wrapped traceback. With ``slots``, batch ``i``'s original images are written
    into ``slots[i % len(slots)]`` and only their shapes travel (:class:`_InSlot`).
    """

    def __init__(
        self,
        split: PreparedSplit,
        batches: list[torch.Tensor],
        slots: list[torch.Tensor] | None = None,
    ):
        self.split = split
        self.batches = batches
        self.slots = slots

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> Images | _InSlot | DataError:
        try:
            images = self.split.images(self.batches[i])
        except DataError as err:
            return err
        if self.slots is None or not isinstance(images, ImageList):
            return images
        return _write_slot(images, self.slots, i % len(self.slots))


@dataclass(frozen=True)
class _InSlot:
    """A batch of original images that a worker wrote into a shared slot."""

    slot: int
    shapes: list[tuple[int, ...]]

    def read(self, slots: list[torch.Tensor]) -> ImageList:
        """Views of the slot (no copy): valid until the slot is written again."""
        sizes = [math.prod(shape) for shape in self.shapes]
        parts = torch.split(slots[self.slot][: sum(sizes)], sizes)
        return ImageList(part.view(shape) for part, shape in zip(parts, self.shapes, strict=True))


def _write_slot(images: ImageList, slots: list[torch.Tensor], slot: int) -> ImageList | _InSlot:
    buffer = slots[slot]
    if any(image.dtype != buffer.dtype for image in images):
        return images
    if sum(image.numel() for image in images) > buffer.numel():
        return images  # larger than the slots were sized for: a segment of its own
    offset = 0
    for image in images:
        buffer[offset : offset + image.numel()].view(image.shape).copy_(image)
        offset += image.numel()
    return _InSlot(slot, [tuple(image.shape) for image in images])


def _shared_slots(first: Images, count: int) -> list[torch.Tensor] | None:
    """``count`` shared uint8 buffers of 1.25x the first batch's originals, created before the
    workers fork so that they inherit them; ``None`` for dense batches or no shared memory."""
    if not isinstance(first, ImageList) or not len(first):
        return None
    capacity = int(1.25 * sum(image.numel() for image in first))
    try:
        return [torch.zeros(capacity, dtype=torch.uint8).share_memory_() for _ in range(count)]
    except RuntimeError:  # e.g. a small /dev/shm: each batch then travels in a segment of its own
        return None


class DeterministicLoader:
    """Batches of ``split`` in a seeded order; ``batch_size`` is the global batch over all ranks."""

    def __init__(
        self,
        split: PreparedSplit,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_last: bool = True,
        workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
        if batch_size % world_size:
            raise DataError(
                f"batch_size {batch_size} is not divisible by world_size {world_size}: every rank "
                "must take an equal share of the global batch"
            )
        if workers < 0:
            raise DataError(f"workers must be >= 0, got {workers}")
        if drop_last and batch_size > len(split):
            raise DataError(
                f"batch_size {batch_size} is larger than split {split.name!r} ({len(split)} "
                "images): with drop_last no batch would be produced"
            )
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.workers = workers
        self.rank = rank
        self.world_size = world_size

    @property
    def per_rank_batch_size(self) -> int:
        return self.batch_size // self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """``floor(N / batch_size)`` with ``drop_last``, else ``ceil(N / batch_size)``."""
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's item order, int64 ``[N]``: a permutation from ``(seed, epoch)``."""
        n = len(self.split)
        if not self.shuffle:
            return torch.arange(n, dtype=torch.int64)
        key = rng.batch_key(self.seed, epoch, _ORDER_STEP)
        return rng.permutation(key, rng.Stream.LOADER_ORDER, n)[0]

    def _shard(self, global_batch: torch.Tensor) -> torch.Tensor:
        if len(global_batch) == self.batch_size:
            share = self.per_rank_batch_size
            return global_batch[self.rank * share : (self.rank + 1) * share]
        return torch.tensor_split(global_batch, self.world_size)[self.rank]  # a last partial batch

    def batch_indices(self, epoch: int, step: int) -> torch.Tensor:
        """This rank's item indices for ``step`` of ``epoch``."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} is not in 0..{self.steps_per_epoch - 1}")
        order = self.order(epoch)
        return self._shard(order[step * self.batch_size : (step + 1) * self.batch_size])

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from ``start_step`` on (resume mid-epoch with the next step)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise DataError(f"start_step {start_step} is not in 0..{self.steps_per_epoch}")
        order = self.order(epoch)
        steps = range(start_step, self.steps_per_epoch)
        index_batches = [
            self._shard(order[s * self.batch_size : (s + 1) * self.batch_size]) for s in steps
        ]
        images = self._images(index_batches)
        for step, indices, pixels in zip(steps, index_batches, images, strict=True):
            yield Batch(
                images=pixels,
                labels=self.split.labels[indices],
                indices=indices,
                keys=rng.sample_keys(self.seed, epoch, indices),
                epoch=epoch,
                step=step,
            )

    def _images(self, index_batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        return images_in_workers(self.split, index_batches, self.workers, self.seed)


def images_in_workers(
    split: PreparedSplit,
    index_batches: list[torch.Tensor],
    workers: int,
    seed: int = 0,
    *,
    reuse_buffers: bool = False,
) -> Iterator[Images]:
    """``split.images(b)`` for each index batch ``b`` in order, decoded by ``workers`` loader
    processes ahead of the consumer (0: in this process, when asked).

    ``reuse_buffers``: original images (an :class:`ImageList`) come back in shared buffers that
    are reused round-robin, which saves a fresh shared-memory segment per batch (its page faults
    cost about a third of a JPEG decode). A batch is then valid only until the consumer asks for
    the batch after the next one; the first batch is decoded here to size the buffers.
    """
    if workers == 0 or not index_batches:
        return (split.images(indices) for indices in index_batches)
    if reuse_buffers:
        return _in_reused_buffers(split, index_batches, workers, seed)
    return _raise_errors(_loader(_Gather(split, index_batches), workers, seed))


def _loader(dataset: _Gather, workers: int, seed: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=min(workers, len(dataset)),
        prefetch_factor=PREFETCH,
        # Workers only decode; their base seed must not come from (and advance) torch's
        # global generator, which the model's dropout draws from.
        generator=torch.Generator().manual_seed(seed),
    )


def _in_reused_buffers(
    split: PreparedSplit, index_batches: list[torch.Tensor], workers: int, seed: int
) -> Iterator[Images]:
    first = split.images(index_batches[0])
    rest = index_batches[1:]
    # DataLoader asks for batch i + workers * PREFETCH when it hands out batch i: one more slot
    # keeps batch i intact, a second the one before it.
    if not rest:
        yield first
        return
    slots = _shared_slots(first, min(workers, len(rest)) * PREFETCH + 2)
    ahead = iter(_loader(_Gather(split, rest, slots), workers, seed))  # decoding starts now
    yield first
    for item in _raise_errors(ahead):
        yield item.read(slots) if isinstance(item, _InSlot) else item


def _raise_errors(loader: Iterable[Images | _InSlot | DataError]) -> Iterator[Images | _InSlot]:
    for item in loader:
        if isinstance(item, DataError):
            raise item
        yield item
