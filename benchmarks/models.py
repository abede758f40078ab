"""Forward+backward throughput of each backbone at a small width, beside its parameter count.

Each arch is built at widening k (default 2) and trained for a few steps on random 64 px images
(batch 8, train-mode BN, loss = sum of squared logits, no optimizer step). The figure is the median
images/s over the timed steps after two warm-up steps. There is no external baseline (torchvision
is not installed); RevNet50 is timed with plain autograd and, when ``ssltk.models.reversible`` is
available, with memory saving as well. Last line: one JSON object of figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics

import torch
from _timing import repeat

from ssltk.models import arch_names, arch_traits, build_model, count_parameters

WARMUP = 2  # untimed steps that warm up allocators and kernels


def step_times(model: torch.nn.Module, x: torch.Tensor, steps: int) -> list[float]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x)["logits"].square().sum().backward()

    return repeat(step, steps, x.device, warmup=WARMUP)


def variants() -> list[tuple[str, str, dict]]:
    """Every registered backbone; one with memory saving also with it on, where it exists."""
    reversible = importlib.util.find_spec("ssltk.models.reversible") is not None
    rows = []
    for arch in arch_names():
        saving = arch_traits(arch).memory_saving
        rows.append((arch, arch, {"memory_saving": False} if saving else {}))
        if saving and reversible:
            rows.append((f"{arch}_memory_saving", arch, {"memory_saving": True}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--widening", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="2 timed steps per arch")
    args = parser.parse_args()
    steps = 2 if args.quick else args.steps
    device = torch.device(args.device)

    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    figures: dict[str, float] = {}
    print(
        f"forward+backward, k={args.widening}, {args.size} px, batch {args.batch}, "
        f"{steps} timed steps, device {device}, {torch.get_num_threads()} threads"
    )
    print(f"{'model':<24}{'params':>12}{'ms/step':>10}{'img/s':>10}")
    for name, arch, extra in variants():
        model = build_model(
            arch, widening=args.widening, num_classes=1000, input_size=args.size, **extra
        ).to(device)
        median = statistics.median(step_times(model, x, steps))
        params = count_parameters(model)
        images_per_s = args.batch / median
        print(f"{name:<24}{params:>12,}{median * 1e3:>10.1f}{images_per_s:>10.1f}")
        figures[f"{name}_img_s"] = round(images_per_s, 2)
        figures[f"{name}_params"] = params
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
