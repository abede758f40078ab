"""Batched augmentation vs the same ops applied one image at a time.

Two pipelines from the paper's pretext tasks run on real CIFAR-10 images (decoded once, up front;
only augmentation is timed, including drawing the per-sample keys):

* rotation: training ``inception_preprocess`` to S px, then the 4 rotated copies (``rotate_all``);
* patch:    TF1 bilinear resize to S → grey with p = 0.66 → random crop → standardisation.

Each S of ``--sizes`` gets its own rows; the first S gives the headline figures.

"batched" calls each op once per batch of ``--batch`` images. "per-sample" is the honest
alternative: a Dataset-style transform that calls the very same functions on one image at a time,
then collates each batch. Both produce bit-identical outputs (checked on the first two batches).
Each figure is the best of ``--repeats`` passes over all images, which filters out other
processes on a shared machine.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from _timing import repeat
from PIL import Image

from ssltk.data import rng
from ssltk.data.augment import (
    crop,
    grayscale_mask,
    inception_preprocess,
    random_crop_offsets,
    resize_bilinear,
    standardize,
    to_gray,
)
from ssltk.pretext.rotation import rotate_all

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (
    ROOT.parent / "shared" / "data" / "cifar10-mini.tar.gz",
    ROOT / "ssltk" / "assets" / "cifar10-demo.tar.gz",
)
TARGET_RATIO = 5.0

Pipeline = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def load_images(count: int) -> tuple[torch.Tensor, str]:
    """The first ``count`` training JPEGs of the first archive found, as uint8 ``[N, 3, H, W]``."""
    archive_path = next((path for path in SOURCES if path.is_file()), None)
    if archive_path is None:
        sys.exit(f"no image archive found; looked for {', '.join(map(str, SOURCES))}")
    arrays = []
    with tarfile.open(archive_path) as archive:
        for member in archive:
            if member.isfile() and "/train/" in member.name and member.name.endswith(".jpg"):
                data = archive.extractfile(member).read()
                arrays.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
                if len(arrays) == count:
                    break
    if len(arrays) < count:
        sys.exit(f"{archive_path} holds only {len(arrays)} training images, asked for {count}")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, archive_path.name


def rotation_pipeline(size: int) -> Pipeline:
    def run(images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return rotate_all(inception_preprocess(images, keys, 0, size))

    return run


def patch_pipeline(resize: int, crop_size: int) -> Pipeline:
    def run(images: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        x = resize_bilinear(images, resize)
        x = to_gray(x, grayscale_mask(keys, 1, 0.66))
        x = crop(x, random_crop_offsets(keys, 2, (resize, resize), crop_size), crop_size)
        return standardize(x)

    return run


def run_batched(pipeline: Pipeline, images: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    indices = torch.arange(len(images), device=images.device)
    for start in range(0, len(images), batch):
        keys = rng.sample_keys(0, 0, indices[start : start + batch])
        yield pipeline(images[start : start + batch], keys)


def run_per_sample(pipeline: Pipeline, images: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    indices = torch.arange(len(images), device=images.device)
    for start in range(0, len(images), batch):
        samples = [
            pipeline(images[i : i + 1], rng.sample_keys(0, 0, indices[i : i + 1]))
            for i in range(start, min(start + batch, len(images)))
        ]
        yield torch.cat(samples)  # the DataLoader's collate step


def best_time(
    runner: Callable[..., Iterator[torch.Tensor]],
    pipeline: Pipeline,
    images: torch.Tensor,
    batch: int,
    repeats: int,
) -> float:
    """Best wall time of ``repeats`` passes; each batch is dropped once made, as a training loop
    consumes it (keeping them all would time page faults of fresh memory instead)."""

    def one_pass(images: torch.Tensor) -> None:
        deque(runner(pipeline, images, batch), maxlen=0)

    one_pass(images[:batch])  # warm-up
    return min(repeat(lambda: one_pass(images), repeats, images.device, warmup=0))


def figures(images: int, batched_s: float, per_sample_s: float) -> dict[str, float]:
    return {
        "batched_img_s": round(images / batched_s, 1),
        "per_sample_img_s": round(images / per_sample_s, 1),
        "ratio": round(per_sample_s / batched_s, 2),
    }


def measure_size(images: torch.Tensor, size: int, args: argparse.Namespace) -> dict[str, dict]:
    """Both pipelines at one output size; prints one table row each plus their sum."""
    crop_size = round(size * 255 / 292)  # Jigsaw's crop-to-resize proportion
    pipelines = {
        "rotation": (f"rotation {size}: inception + 4 rotations", rotation_pipeline(size)),
        "patch": (
            f"patch {size}: resize, grey, crop {crop_size}, standardise",
            patch_pipeline(size, crop_size),
        ),
    }
    results, total_batched, total_per_sample = {}, 0.0, 0.0
    for key, (label, pipeline) in pipelines.items():
        check = images[: 2 * args.batch]
        pairs = zip(
            run_batched(pipeline, check, args.batch),
            run_per_sample(pipeline, check, args.batch),
            strict=True,
        )
        if not all(torch.equal(one, other) for one, other in pairs):
            sys.exit(f"{label}: batched and per-sample outputs differ")
        batched_s = best_time(run_batched, pipeline, images, args.batch, args.repeats)
        per_sample_s = best_time(run_per_sample, pipeline, images, args.batch, args.repeats)
        total_batched += batched_s
        total_per_sample += per_sample_s
        results[key] = figures(len(images), batched_s, per_sample_s)
        print_row(label, results[key])
    results["both"] = figures(len(images), total_batched, total_per_sample)
    print_row(f"both at {size} (each image through both)", results["both"])
    return results


def print_row(label: str, row: dict[str, float]) -> None:
    print(
        f"{label:52s} {row['batched_img_s']:14.1f} {row['per_sample_img_s']:17.1f} "
        f"{row['ratio']:6.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--sizes",
        default="64,128",
        help="output sides, comma-separated; the first gives the headline figures",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (both modes)")
    parser.add_argument("--quick", action="store_true", help="256 images, 2 repeats, size 64")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats, args.sizes = 256, 2, "64"
    sizes = [int(size) for size in args.sizes.split(",")]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images, source = load_images(args.images)
    images = images.to(device)

    print(
        f"data_pipeline: {len(images)} images {tuple(images.shape[1:])} from {source}, "
        f"batch {args.batch}, device {device}, {args.threads} CPU thread(s), "
        f"best of {args.repeats}; outputs checked identical in both modes"
    )
    header = f"{'pipeline':52s} {'batched img/s':>14s} {'per-sample img/s':>17s} {'ratio':>7s}"
    print(header)
    print("-" * len(header))
    by_size = {str(size): measure_size(images, size, args) for size in sizes}
    headline = by_size[str(sizes[0])]["both"]
    met = headline["ratio"] >= TARGET_RATIO
    print(
        f"target: ratio >= {TARGET_RATIO:g} at size {sizes[0]}: "
        f"{'met' if met else 'NOT met'} ({headline['ratio']:.2f}x)"
    )
    summary = {
        **headline,
        "size": sizes[0],
        "target_ratio": TARGET_RATIO,
        "target_met": met,
        "by_size": by_size,
        "device": str(device),
        "threads": args.threads,
        "images": len(images),
        "batch": args.batch,
        "source": source,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
