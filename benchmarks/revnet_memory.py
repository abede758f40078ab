"""RevNet50 training-step memory: plain autograd, memory saving and checkpoint per unit.

Three ways to train RevNet50 in one process, on the same weights and batch:
  plain            ordinary autograd (every activation stored),
  memory saving    ``ssltk.models.reversible.reversible_sequence`` (stage outputs and one bit per
                   ReLU input stored, unit inputs rebuilt during backward) and the stem max-pool
                   saving int8 window positions,
  checkpoint/unit  ``torch.utils.checkpoint`` around each unit of the plain model (unit inputs
                   stored, each unit run twice).
Per way and size: bytes saved for backward (``saved_tensors_hooks``), bytes held after the forward
pass, the step's peak and the transient (peak - held), all from the allocator (see
``_revnet_probe.MemoryTrace``), and the fastest (median) step time: on CPU the CPU time of one
thread, which a shared machine's load barely moves. Then a depth sweep: the peak of one stage at
4, 8 and 16 units.

Targets, at k=2, batch 32, 128 px: peak_ratio <= 0.6 and <= checkpoint_peak_ratio,
time_ratio <= 1.35; depth_growth_4_to_16 <= 1.10 (peak, memory saving). The last line is JSON.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F
from _revnet_probe import load_note, measure_step, mib, revnet_ways, time_steps
from torch import nn

from ssltk.models.revnet import ReversibleStage

HEADLINE = (2, 32, 128)  # widening k, batch, pixels: the size the targets are stated at


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        width, batch, side = (int(v) for v in text.split("x"))
    except ValueError:
        msg = f"{text!r}: expected KxBATCHxPIXELS, e.g. 2x32x128"
        raise argparse.ArgumentTypeError(msg) from None
    return width, batch, side


def size_name(size: tuple[int, int, int]) -> str:
    return "k={} batch={} px={}".format(*size)


def compare_ways(size, device: torch.device, steps: int) -> dict[str, dict]:
    width, batch, side = size
    ways = revnet_ways(width, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, side, side, generator=gen).to(device)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)

    def loss_fn(model: nn.Module) -> torch.Tensor:
        return F.cross_entropy(model(x)["logits"], labels)

    for model in ways.values():  # first calls allocate caches and pick algorithms
        loss_fn(model).backward()
    results = {name: measure_step(m, loss_fn, device) for name, m in ways.items()}
    for name, (fastest, median) in time_steps(ways, loss_fn, steps, device).items():
        results[name]["time"], results[name]["time_median"] = fastest, median
    return results


def depth_sweep(size, device: torch.device) -> dict[int, dict[str, dict]]:
    """One stage of RevNet50's first-stage shape at ``size`` with 4, 8 and 16 units."""
    width, batch, side = size
    channels = 64 * width
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, side // 4, side // 4, generator=gen).to(device)
    x.requires_grad_()

    def loss_fn(stage: nn.Module) -> torch.Tensor:
        return stage(x).square().mean()

    results: dict[int, dict[str, dict]] = {}
    for depth in (4, 8, 16):
        torch.manual_seed(depth)
        plain = ReversibleStage(channels, depth, memory_saving=False).to(device).train()
        saving = copy.deepcopy(plain)
        saving.memory_saving = True
        ways = {"plain": plain, "memory saving": saving}
        for stage in ways.values():
            loss_fn(stage).backward()
        results[depth] = {name: measure_step(m, loss_fn, device) for name, m in ways.items()}
        x.grad = None
    return results


def print_ways(size, ways: dict[str, dict]) -> None:
    width, batch, side = size
    print(f"\nRevNet50 k={width}, batch {batch}, {side}² px, fp32 (MiB above the level before "
          "the step; step ms = fastest (median) of the timed steps)")  # fmt: skip
    print(f"{'way':<17}{'saved':>8}{'held':>8}{'peak':>8}{'transient':>11}{'peak ×':>8}"
          f"{'step ms':>19}{'time ×':>8}  peak during")  # fmt: skip
    base = ways["plain"]
    for name, r in ways.items():
        step = f"{1e3 * r['time']:.0f} ({1e3 * r['time_median']:.0f})"
        print(
            f"{name:<17}{mib(r['saved']):>8}{mib(r['held']):>8}{mib(r['peak']):>8}"
            f"{mib(r['transient']):>11}{r['peak'] / base['peak']:>8.2f}{step:>19}"
            f"{r['time'] / base['time']:>8.2f}  {r['peak_op'][:48]}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--sizes",
        type=lambda s: [parse_size(v) for v in s.split(",")],
        default=[(1, 16, 96), HEADLINE],
        help="comma-separated KxBATCHxPIXELS (default 1x16x96,2x32x128)",
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per way")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if device.type == "cpu":
        torch.set_num_threads(1)  # CPU-time timing (see _revnet_probe.time_steps)
    # Memory saving runs F without TF32 (see ssltk.models.reversible); so do the other ways here.
    torch.backends.cudnn.allow_tf32 = False
    if HEADLINE not in args.sizes:
        args.sizes.append(HEADLINE)
    clock = "wall clock" if device.type == "cuda" else "CPU time of the process"
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"step times are {clock}; {load_note()} at start")  # fmt: skip

    by_size = {}
    for size in args.sizes:
        by_size[size] = compare_ways(size, device, args.steps)
        print_ways(size, by_size[size])

    sweep = depth_sweep(HEADLINE, device)
    width, batch, side = HEADLINE
    print(f"\nDepth sweep: one stage, {64 * width} channels, batch {batch}, {side // 4}² px (MiB)")
    print(f"{'units':>6}{'way':>16}{'saved':>8}{'held':>8}{'peak':>8}{'transient':>11}")
    for depth, ways in sweep.items():
        for name, r in ways.items():
            print(
                f"{depth:>6}{name:>16}{mib(r['saved']):>8}{mib(r['held']):>8}"
                f"{mib(r['peak']):>8}{mib(r['transient']):>11}"
            )
    print(f"{load_note()} at the end")

    head = by_size[HEADLINE]
    base, saving, ckpt = head["plain"], head["memory saving"], head["checkpoint/unit"]
    figures = {
        "device": str(device),
        "size": size_name(HEADLINE),
        "peak_ratio": saving["peak"] / base["peak"],
        "checkpoint_peak_ratio": ckpt["peak"] / base["peak"],
        "time_ratio": saving["time"] / base["time"],
        "time_ratio_median": saving["time_median"] / base["time_median"],
        "checkpoint_time_ratio": ckpt["time"] / base["time"],
        "depth_growth_4_to_16": sweep[16]["memory saving"]["peak"]
        / sweep[4]["memory saving"]["peak"],
        "plain_depth_growth_4_to_16": sweep[16]["plain"]["peak"] / sweep[4]["plain"]["peak"],
        "peak_mib": {
            size_name(size): {way: r["peak"] / 2**20 for way, r in ways.items()}
            for size, ways in by_size.items()
        },
    }
    targets = {
        "peak_ratio": min(0.6, figures["checkpoint_peak_ratio"]),
        "time_ratio": 1.35,
        "depth_growth_4_to_16": 1.10,
    }
    print("\nTargets")
    for key, limit in targets.items():
        status = "met" if figures[key] <= limit else "NOT MET"
        print(f"  {key:<22} {figures[key]:.3f}  (target <= {limit:.3f})  {status}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
