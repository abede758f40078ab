"""ssltk's training step against a bare PyTorch loop: same model, batch, optimiser, weights.

The ssltk step is what ``ssltk pretrain`` runs per update: the scheduled rate written to every
parameter group, the pretext task's forward (loss and metrics), backward and SGD, the metrics
kept on the device, a host flush every ``--log-every`` steps, all under deterministic mode. The
bare loop is the shortest honest equivalent: backbone forward, cross-entropy, backward, SGD with
the same weight-decay groups at a fixed rate, default torch settings. Both consume the same
prepared batch (the data pipeline is outside both) and alternate in rounds. A third loop runs
the ssltk step with torch's default (non-deterministic) settings, to split the overhead into the
step's own bookkeeping and the price of deterministic kernels.

The headline ``overhead_ratio`` (ssltk as ``ssltk pretrain`` runs it, over bare) compares the
fastest round of each loop (as ``timeit`` advises: slower rounds measure other processes on a
shared machine); ratios of medians are reported beside it. Target: ``overhead_ratio`` <= 1.05.
On CPU the default is one intra-op thread, since OpenMP barriers stall for whole seconds when
other processes compete for the cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _timing import Stopwatch

from ssltk.config import load_config
from ssltk.data import rng
from ssltk.models import weight_decay_groups
from ssltk.pretext import build_task
from ssltk.train.determinism import deterministic_mode, seed_everything
from ssltk.train.engine import Trainer, build_optimizer
from ssltk.train.meters import MetricWindow
from ssltk.train.schedule import StepSchedule

TARGET = 1.05


def time_steps(step: Callable[[], None], count: int, device: torch.device) -> float:
    """Seconds per step over ``count`` consecutive steps."""
    watch = Stopwatch(device)
    for _ in range(count):
        step()
    return watch.elapsed() / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--arch", default="resnet50_v1")
    parser.add_argument("--widening", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64, help="source images per step")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="steps per round and loop")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 3 steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.rounds, args.steps = 3, 3
    device = torch.device(args.device)
    bf16 = args.precision == "bf16"

    config = load_config(
        None,
        [
            "pretext.task=rotation",
            f"pretext.input_size={args.input_size}",
            f"model.arch={args.arch}",
            f"model.widening={args.widening}",
            f"pretrain.batch_size={args.batch}",
            f"pretrain.precision={args.precision}",
        ],
    )
    seed_everything(0)
    task = build_task(config).to(device).train()
    bare_model = copy.deepcopy(task.backbone)
    generator = torch.Generator().manual_seed(0)
    size = args.input_size
    images = torch.randint(
        0, 256, (args.batch, 3, size, size), dtype=torch.uint8, generator=generator
    )
    keys = rng.sample_keys(0, 0, torch.arange(args.batch)).to(device)
    with torch.no_grad():
        inputs = task.prepare_batch(images.to(device), keys, rng.batch_key(0, 0, 0), train=True)

    schedule = StepSchedule.from_config(config.pretrain, steps_per_epoch=1000)
    trainer = Trainer(
        task, build_optimizer(task, config), schedule, device=device, precision=args.precision
    )
    window = MetricWindow()
    position = {"step": 0}

    def ssltk_step() -> None:
        step = position["step"]
        lr, values = trainer.step(inputs, step)
        window.add(step, lr, values)
        position["step"] = step + 1
        if position["step"] % args.log_every == 0:
            window.flush()

    bare_optimizer = torch.optim.SGD(
        weight_decay_groups(bare_model, config.pretrain.weight_decay),
        lr=schedule.peak,
        momentum=config.pretrain.momentum,
    )

    def bare_step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits = bare_model(inputs.inputs)["logits"]
        loss = F.cross_entropy(logits, inputs.labels)
        bare_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        bare_optimizer.step()

    def run_ssltk(count: int) -> float:
        with deterministic_mode():
            return time_steps(ssltk_step, count, device)

    loops: dict[str, Callable[[int], float]] = {
        "ssltk": run_ssltk,
        "ssltk-nondet": lambda count: time_steps(ssltk_step, count, device),
        "bare": lambda count: time_steps(bare_step, count, device),
    }
    for loop in loops.values():
        loop(2)  # warm-up: allocator, kernel selection, first-call costs
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.rounds):
        for name, loop in loops.items():
            times[name].append(loop(args.steps))
    window.flush()

    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = best["ssltk"] / best["bare"]
    median_ratio = median["ssltk"] / median["bare"]
    step_ratio = best["ssltk-nondet"] / best["bare"]
    name = f"rotation {args.arch} w{args.widening}, {args.batch} images ({4 * args.batch} inputs)"
    print(f"training step: {name} at {size}px, {args.precision}, on {device}")
    header = ("loop", "best ms/step", "median ms/step", "worst ms/step", "images/s")
    print("{:<13} {:>13} {:>15} {:>14} {:>9}".format(*header))
    for name, values in times.items():
        worst = max(values) * 1e3
        print(
            f"{name:<13} {best[name] * 1e3:>13.2f} {median[name] * 1e3:>15.2f} {worst:>14.2f} "
            f"{args.batch / best[name]:>9.1f}"
        )
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(f"overhead ratio {ratio:.3f} best/best, {median_ratio:.3f} median/median")
    print(f"  without deterministic mode {step_ratio:.3f} (the step's own bookkeeping)")
    print(f"target overhead_ratio <= {TARGET}: {verdict}")
    figures = {
        "benchmark": "train_step",
        "device": str(device),
        "precision": args.precision,
        "arch": args.arch,
        "widening": args.widening,
        "batch_images": args.batch,
        "input_size": size,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "ssltk_ms_per_step": round(best["ssltk"] * 1e3, 3),
        "ssltk_nondeterministic_ms_per_step": round(best["ssltk-nondet"] * 1e3, 3),
        "bare_ms_per_step": round(best["bare"] * 1e3, 3),
        "overhead_ratio": round(ratio, 4),
        "median_overhead_ratio": round(median_ratio, 4),
        "nondeterministic_overhead_ratio": round(step_ratio, 4),
        "ssltk_median_ms_per_step": round(median["ssltk"] * 1e3, 3),
        "bare_median_ms_per_step": round(median["bare"] * 1e3, 3),
        "target": TARGET,
        "target_met": ratio <= TARGET,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
