"""Feature extraction at 224 px with 0/1/2 loader workers (``eval.workers``), beside a plain PIL
decode + resize of the same files in a torch DataLoader.

Data: a synthetic ImageFolder of 400 x 350 JPEGs (quality 90, smooth colour fields with texture
and noise: 60-120 KB each, as ImageNet's photos), prepared with files storage (the originals are
decoded on every pass, as at ImageNet size).

Rows:

* ``ssltk extract_features, decode only``: the extraction loop (workers decode whole files; the
  main process writes the cache) with a representation that costs nothing (channel means): what
  a GPU would see, where preprocessing and the forward pass are cheap next to decoding;
* ``ssltk extract_features, <arch>``: the same with the backbone's forward pass on this CPU;
* ``PIL + DataLoader``: ``Image.open -> convert("RGB") -> resize(224, 224)`` per file in a
  Dataset, batched by a DataLoader with the same workers (the honest alternative a user writes);
* ``... 1 torch thread``: the 0-worker loop on one core (it otherwise resizes on all threads);
* ``PIL whole-file decode in independent processes``: 1 and 2 processes sharing nothing, the
  most any loader's 2-over-1 speed-up can reach on this machine.

Each figure is the best of ``--repeats`` passes (this machine is shared; the spread is printed).
Last line: JSON with the speed-ups of 2 workers over 0.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

SIZE = 224


ONE_THREAD = "ssltk extract_features, decode only, 1 torch thread"
CEILING = "PIL whole-file decode in independent processes (workers = processes; the ceiling)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--arch", default="resnet50_v1", help="'' skips the network rows")
    parser.add_argument("--widening", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


def make_folder(root: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        coarse = rng.uniform(0, 255, size=(8, 9, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((400, 350), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32)
        texture = (
            rng.normal(0, 18, size=(350, 400, 1)) * np.sin(np.arange(400) / 3.0)[None, :, None]
        )
        pixels = np.clip(pixels + texture + rng.normal(0, 10, size=pixels.shape), 0, 255)
        path = root / f"class{i % 2}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


class _PilFiles(Dataset):
    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as image:
            pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


def pil_loader(paths: list[Path], workers: int, batch: int) -> float:
    clock = time.perf_counter()
    for images in DataLoader(_PilFiles(paths), batch_size=batch, num_workers=workers):
        images.float().mean()
    return len(paths) / (time.perf_counter() - clock)


def _decode_files(paths: list[Path]) -> None:
    for path in paths:
        with Image.open(path) as image:
            np.asarray(image.convert("RGB"))


def independent_decode(paths: list[Path], processes: int) -> float:
    """Whole-file decodes split over ``processes`` that share nothing: the ceiling on this
    machine for any loader's speed-up (no batches cross processes)."""
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(_decode_files, [[] for _ in range(processes)])  # started, not timed
        clock = time.perf_counter()
        pool.map(_decode_files, [paths[i::processes] for i in range(processes)])
        return len(paths) / (time.perf_counter() - clock)


class _DecodeOnly(torch.nn.Module):
    """A task whose representation is each decoded image's channel means: no network cost."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def representation(self, images, layers, *, pool=None, keys=None):
        return {"pixels": torch.stack([image.float().mean(dim=(1, 2)) for image in images])}


def ssltk_extract(task, split, layers: list[str], workers: int, batch: int) -> float:
    from ssltk.evaluate.features import FeatureCache, extract_features

    with tempfile.TemporaryDirectory() as cache:
        clock = time.perf_counter()
        extract_features(
            task,
            split,
            layers,
            identity={"weights": "bench"},
            cache=FeatureCache(Path(cache)),
            batch_size=batch,
            max_features=9000,
            progress=False,
            workers=workers,
        )
        return len(split) / (time.perf_counter() - clock)


def best(fn, repeats: int) -> tuple[float, float]:
    rates = [fn() for _ in range(repeats)]
    return max(rates), min(rates)


def main() -> None:
    args = parse_args()
    from ssltk.config import Config
    from ssltk.data.dataset import PreparedDataset
    from ssltk.data.prepare import prepare
    from ssltk.pretext import build_task

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_folder(root / "images" / "train", args.images)
        make_folder(root / "images" / "val", 4)  # the layout asks for one; not timed
        sizes = [p.stat().st_size for p in paths]
        config = Config.model_validate(
            {
                "data": {
                    "source": "imagefolder",
                    "root": str(root / "images"),
                    "image_size": SIZE,
                    "val_fraction": 0,
                    "max_in_memory_images": 1,
                    "prepared_dir": str(root / "prepared"),
                },
                "model": {"arch": args.arch or "resnet50_v1", "widening": args.widening},
                "pretext": {"task": "rotation", "input_size": SIZE},
            }
        )
        prepare(config, progress=False)
        split = PreparedDataset.for_config(config).split("train")
        rows: list[tuple[str, int, float, float]] = []
        tasks = [("ssltk extract_features, decode only", _DecodeOnly(), ["pixels"])]
        if args.arch:
            torch.manual_seed(0)
            tasks.append(
                (
                    f"ssltk extract_features, {args.arch} k={args.widening}",
                    build_task(config).eval(),
                    ["pre_logits"],
                )
            )
        for name, task, layers in tasks:
            for workers in args.workers:
                run = (task, split, layers, workers, args.batch)
                hi, lo = best(lambda run=run: ssltk_extract(*run), args.repeats)
                rows.append((name, workers, hi, lo))
                print(f"  {name} workers={workers}: {hi:.1f} img/s", file=sys.stderr, flush=True)
        # The 0-worker loop resizes on all of torch's threads; one thread gives the per-core
        # decode rate the workers scale from.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        run = (tasks[0][1], split, tasks[0][2], 0, args.batch)
        hi, lo = best(lambda: ssltk_extract(*run), args.repeats)
        torch.set_num_threads(threads)
        rows.append((ONE_THREAD, 0, hi, lo))
        for processes in (1, 2):
            hi, lo = best(lambda p=processes: independent_decode(paths, p), args.repeats)
            rows.append((CEILING, processes, hi, lo))
        for workers in args.workers:
            hi, lo = best(lambda w=workers: pil_loader(paths, w, args.batch), args.repeats)
            rows.append(("PIL + DataLoader", workers, hi, lo))
            print(f"  PIL workers={workers}: {hi:.1f} img/s", file=sys.stderr, flush=True)

    def speedup(name: str) -> float | None:
        rate = {w: hi for n, w, hi, _ in rows if n == name}
        low = 1 if name == CEILING else 0
        return round(rate[2] / rate[low], 3) if low in rate and 2 in rate else None

    one_core = next(hi for n, _, hi, _ in rows if n == ONE_THREAD)
    two_workers = next(hi for n, w, hi, _ in rows if n == tasks[0][0] and w == 2)

    load = os.getloadavg()[0]
    lines = [
        f"# Feature extraction at {SIZE} px: loader workers (eval.workers) vs PIL + DataLoader",
        "",
        f"{args.images} synthetic 400x350 JPEGs, mean {np.mean(sizes) / 1024:.0f} KB "
        f"(min {min(sizes) / 1024:.0f}, max {max(sizes) / 1024:.0f}); batch {args.batch}; "
        f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}; load average "
        f"{load:.1f} at the end (shared machine); best of {args.repeats} (worst beside it)",
        "",
        "| pipeline | workers | img/s (best) | img/s (worst) |",
        "|---|---|---|---|",
        *(f"| {n} | {w} | {hi:.1f} | {lo:.1f} |" for n, w, hi, lo in rows),
        "",
        "speed-up of 2 workers over 0 (over 1 process for the ceiling; target >= 1.7 for the "
        "extraction loop):",
        *(f"  {n}: {speedup(n)}" for n in dict.fromkeys(n for n, *_ in rows) if n != ONE_THREAD),
        f"speed-up of 2 workers over one core decoding in the main process: "
        f"{two_workers / one_core:.3f}",
        "",
        json.dumps(
            {
                "images": args.images,
                "mean_kb": round(float(np.mean(sizes)) / 1024, 1),
                "speedup_2_over_0": {
                    name: speedup(name) for name in dict.fromkeys(n for n, *_ in rows)
                },
                "speedup_2_workers_over_one_core": round(two_workers / one_core, 3),
                "img_per_s": {f"{n}|{w}": round(hi, 1) for n, w, hi, _ in rows},
                "load_average": round(load, 1),
            }
        ),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
