"""A batch of images of different sizes, as files storage gives them (the original images).

Arrays storage gives one uint8 ``[B, 3, S, S]`` tensor; files storage gives an :class:`ImageList`
of uint8 ``[3, H_i, W_i]`` tensors, each the whole decoded file. The preprocessing crops each one
to the network's fixed size on the way in and batches only after the crop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["ImageList", "Images", "image_sizes"]


class ImageList:
    """uint8 ``[3, H_i, W_i]`` images moved and indexed as one batch.

    Not a ``Sequence`` on purpose: DataLoader passes it through workers as one object.
    """

    def __init__(self, images: Iterable[torch.Tensor]) -> None:
        self.images = list(images)
        for image in self.images:
            if not isinstance(image, torch.Tensor) or image.ndim != 3:
                got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image)
                raise ValueError(f"ImageList: each image must be [C, H, W], got {got}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.images)

    def __repr__(self) -> str:
        return f"ImageList(n={len(self)}, sizes={image_sizes(self)[:4]}...)"

    @property
    def device(self) -> torch.device:
        return self.images[0].device if self.images else torch.device("cpu")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ImageList:
        return ImageList(image.to(device, non_blocking=non_blocking) for image in self.images)

    def __getstate__(self) -> dict[str, Any]:
        # A loader worker sends each tensor through a shared-memory segment of its own; packing
        # the batch into one buffer makes that one segment a batch, not one an image.
        images = self.images
        if not images or len({(i.dtype, i.device) for i in images}) > 1:
            return {"images": images}
        # Written straight into shared memory: torch.cat and then sharing would copy it twice.
        flat = torch.empty(sum(i.numel() for i in images), dtype=images[0].dtype)
        if images[0].device.type == "cpu":
            flat.share_memory_()
        torch.cat([image.reshape(-1) for image in images], out=flat)
        return {"flat": flat, "shapes": [tuple(image.shape) for image in images]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "images" in state:
            self.images = state["images"]
            return
        sizes = [math.prod(shape) for shape in state["shapes"]]
        parts = torch.split(state["flat"], sizes)
        self.images = [part.view(shape) for part, shape in zip(parts, state["shapes"], strict=True)]


#: What a loader's batch holds: one tensor (arrays storage) or an :class:`ImageList` (files).
Images = torch.Tensor | ImageList


def image_sizes(images: Images) -> list[tuple[int, int]]:
    """``(height, width)`` of every image of the batch."""
    if isinstance(images, ImageList):
        return [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
    return [(int(images.shape[-2]), int(images.shape[-1]))] * int(images.shape[0])


def by_size(sizes: list[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor]:
    """``{(height, width): int64 indices of the images of that size}``, in first-seen order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(size, []).append(index)
    return {size: torch.tensor(rows, dtype=torch.int64) for size, rows in groups.items()}
