"""Noise controls of every task at 32–224 px in both geometries (reports/noise_controls.md).

    python scripts/noise_controls.py --jsonl runs/noise_controls.jsonl [--render-only]

Each row is :func:`ssltk.control.run.run_control` on params.yaml with the overrides of ``PLAN``,
once with ``pretext.preprocessing=tf1`` (the released code's geometry) and once with the default
``symmetric``. Results are appended to ``--jsonl`` as they finish (a rerun skips rows already
there), then rendered as a markdown table. Steps and batch shrink with the image size so that the
whole plan fits a 2-core CPU; the table says what each row ran.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ssltk.config import load_config
from ssltk.control.run import run_control

#: (image side, task, rotation crop, noise drawn at, steps, batch), in the order they are run.
PLAN = [
    (64, "rotation", "center", None, 150, 32),
    (64, "rotation", "inception", None, 150, 32),
    (64, "rotation", "center", 32, 150, 32),
    (32, "rotation", "center", None, 300, 64),
    (32, "rotation", "inception", None, 300, 64),
    (32, "jigsaw", None, None, 300, 64),
    (32, "relative_patch_location", None, None, 300, 64),
    (96, "rotation", "center", None, 80, 16),
    (96, "rotation", "inception", None, 80, 16),
    (224, "rotation", "center", None, 40, 8),
    (32, "exemplar", None, None, 100, 32),
    (64, "jigsaw", None, None, 150, 32),
    (64, "relative_patch_location", None, None, 150, 32),
    (96, "jigsaw", None, None, 80, 16),
    (96, "relative_patch_location", None, None, 80, 16),
    (224, "rotation", "inception", None, 40, 8),
    (224, "jigsaw", None, None, 40, 8),
    (224, "relative_patch_location", None, None, 40, 8),
    # The bar (300 steps of 64) at 64 px, where Rotation's tf1 leak is strongest.
    (64, "rotation", "center", None, 300, 64),
    (64, "jigsaw", None, None, 300, 64),
    (64, "relative_patch_location", None, None, 300, 64),
    (64, "rotation", "inception", None, 300, 64),
]
TASK_ORDER = ("rotation", "jigsaw", "relative_patch_location", "exemplar")
GEOMETRIES = ("tf1", "symmetric")
#: Noise images each control is scored on (rows made before this constant scored 512 at 64 px).
HELD_OUT_IMAGES = 1024


def overrides(size: int, task: str, crop: str | None, noise: int | None, steps: int, batch: int):
    sets = [
        f"data.image_size={size}",
        f"pretext.input_size={size}",
        f"pretext.task={task}",
        f"pretrain.batch_size={batch}",
        f"control.steps={steps}",
        f"control.held_out_batches={max(1, HELD_OUT_IMAGES // batch)}",
    ]
    if crop is not None:
        sets.append(f"pretext.rotation.crop={crop}")
    if noise is not None:
        sets.append(f"control.noise_size={noise}")
    return sets


def key_of(result: dict) -> tuple:
    crop = result["settings"].get("crop")
    noise = result["noise_size"] if result["noise_size"] != result["image_size"] else None
    geometry = result["settings"]["preprocessing"]
    size, steps, batch = result["image_size"], result["steps"], result["batch_size"]
    return (size, result["task"], crop, noise, steps, batch, geometry)


def run(params: Path, jsonl: Path) -> None:
    done = set()
    if jsonl.is_file():
        done = {key_of(json.loads(line)) for line in jsonl.read_text().splitlines() if line}
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    with jsonl.open("a") as out:
        for row in PLAN:
            for geometry in GEOMETRIES:
                if (*row, geometry) in done:
                    continue
                sets = [*overrides(*row), f"pretext.preprocessing={geometry}"]
                started = time.perf_counter()
                result = run_control(load_config(params, sets))
                seconds = round(time.perf_counter() - started, 1)
                out.write(json.dumps(result.to_json() | {"wall_s": seconds}) + "\n")
                out.flush()
                print(f"{result.summary()} [{geometry}, {seconds} s]", flush=True)


def _cell(result: dict | None) -> str:
    if result is None:
        return "not run"
    figure = f"{100 * result['score']:.1f} ± {100 * result['score_sem']:.1f}"
    verdict = {"leaks": "**leaks**", "clean": "clean", "n/a": "no verdict"}[result["verdict"]]
    return f"{figure} ({verdict})"


def render(jsonl: Path) -> str:
    results = {key_of(r): r for r in map(json.loads, jsonl.read_text().splitlines()) if r}
    lines = [
        "# Noise controls at 32, 64, 96 and 224 px\n",
        "Each task trained with `ssltk control` on fresh i.i.d. uniform noise images and scored "
        "on held-out noise it never saw (mean ± standard error over the held-out batches, %; "
        "verdict: one-sided t-test against chance, p < 0.001). Everything else is "
        "params.yaml (resnet50_v2, widening 1, the study's optimiser settings compressed into "
        "the control's steps). `tf1`: the released code's TensorFlow 1 crop and resize "
        "geometry; `symmetric`: ssltk's default. Steps and batch shrink with the image size so "
        "that the plan fits a 2-core CPU: 300 × 64 at 32 px and for the main rows at 64 px, "
        "fewer (the steps × batch column) at 96 and 224 px; `not run` rows did not fit the "
        "session that made this file. Produced by `python scripts/noise_controls.py` (a rerun "
        "continues it).\n",
        "| px | task | rotation crop | noise | steps × batch | held-out images | chance | tf1 "
        "| symmetric |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    table_order = sorted(PLAN, key=lambda row: (TASK_ORDER.index(row[1]), row[0], row[2] or ""))
    for size, task, crop, noise, steps, batch in table_order:
        row = (size, task, crop, noise, steps, batch)
        tf1, sym = results.get((*row, "tf1")), results.get((*row, "symmetric"))
        known = tf1 or sym
        chance = f"{100 * known['chance']:.1f}" if known else "–"
        drawn = f"{noise} px, stored at {size}" if noise else f"native {size} px"
        held_out = " / ".join(sorted({str(r["held_out_images"]) for r in (tf1, sym) if r})) or "–"
        lines.append(
            f"| {size} | {task} | {crop or '–'} | {drawn} | {steps} × {batch} | {held_out} | "
            f"{chance} | {_cell(tf1)} | {_cell(sym)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--jsonl", type=Path, default=Path("runs/noise_controls.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("reports/noise_controls.md"))
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.render_only:
        run(args.params, args.jsonl)
    args.out.write_text(render(args.jsonl), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
