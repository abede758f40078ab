"""RevNet50 memory-saving gradients against plain autograd, per stage.

The same weights and batch through the plain model and the memory-saving one; per stage, the
largest reconstruction error of the stage input (``invert_sequence`` from the stage output) and
the angle and relative error between the two gradients of the stage's parameters. Rows:
  fp32            the memory-saving backward as shipped,
  fp32 ablation   the same with each ReLU's derivative recomputed from the reconstructed input
                  instead of the stored sign (what the backward did before it stored signs),
  bf16 autocast   F in bf16, the coupling stream in fp32 (the plain model keeps it fp32 too),
  fp32 TF32       (CUDA) cuDNN's TF32 allowed outside F; F itself always runs without it.

Target: fp32 angle <= 0.05° in every stage, at each size. The last line is JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from _revnet_probe import STAGES, angle_deg, load_note, set_memory_saving

from ssltk.models import build_model
from ssltk.models import reversible as reversible_module
from ssltk.models.reversible import invert_sequence
from ssltk.models.revnet import ReversibleStage

TARGET_DEG = 0.05


@contextlib.contextmanager
def recomputed_relu_signs() -> Iterator[None]:
    """Ablation: the recomputation's ReLUs ignore the stored signs."""
    original = reversible_module._SignedReLU.apply
    reversible_module._SignedReLU.apply = lambda x, positive: torch.relu(x)
    try:
        yield
    finally:
        reversible_module._SignedReLU.apply = original


def keep_fp32_stream(model: torch.nn.Module) -> None:
    """Feed each stage's first unit an fp32 tensor in the plain model, as memory saving does."""
    for module in model.modules():
        if isinstance(module, ReversibleStage):
            module.units[0].register_forward_pre_hook(lambda _, args: (args[0].float(),))


def stage_grads(model: torch.nn.Module, stage: str) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in getattr(model, stage).parameters()])


def drift(size, device: torch.device, mode: str) -> dict[str, list[float]]:
    width, batch, side = size
    torch.manual_seed(0)
    plain = build_model("revnet50", widening=width, num_classes=10, memory_saving=False)
    plain = plain.to(device).train()
    keep_fp32_stream(plain)
    saving = copy.deepcopy(plain)
    set_memory_saving(saving, True)
    probe = copy.deepcopy(saving)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, side, side, generator=gen).to(device)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16 autocast")
    ablation = recomputed_relu_signs() if mode == "fp32 ablation" else contextlib.nullcontext()
    tf32 = torch.backends.cudnn.flags(enabled=True, allow_tf32=mode == "fp32 TF32")
    with tf32, ablation:
        for model in (plain, saving):
            with autocast:
                logits = model(x)["logits"]
            F.cross_entropy(logits.float(), labels).backward()
        recon = []
        with torch.no_grad(), autocast:
            ends = probe(x)
            previous = ends["after_root"]
            for name in STAGES:
                stage = getattr(probe, name)
                stage_input = stage.entry(previous).float()
                rebuilt = invert_sequence(ends[name], stage.units)
                recon.append((rebuilt - stage_input).abs().max().item())
                previous = ends[name]
    angles, rel = [], []
    for s in STAGES:
        a, b = stage_grads(plain, s), stage_grads(saving, s)
        angles.append(angle_deg(a, b))
        rel.append(((a - b).norm() / a.norm()).item())
    return {"recon_max_abs": recon, "grad_angle_deg": angles, "grad_rel_err": rel}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    sizes = [(1, 16, 96), (2, 32, 128)]
    modes = ["fp32", "fp32 ablation", "bf16 autocast"]
    if device.type == "cuda":
        modes.append("fp32 TF32")
    print(f"device {device}, torch {torch.__version__}, {load_note()}")
    print(f"\n{'size':<22}{'mode':<15}{'stage':<8}{'recon max|err|':>15}{'angle °':>11}"
          f"{'rel err':>11}")  # fmt: skip
    results: dict[str, dict[str, dict]] = {}
    for size in sizes:
        name = "k={} batch={} px={}".format(*size)
        results[name] = {}
        for mode in modes:
            if mode == "bf16 autocast" and device.type == "cpu" and size != sizes[0]:
                continue  # CPU bf16 convolutions are slow; the default size shows the effect
            d = results[name][mode] = drift(size, device, mode)
            for i, stage in enumerate(STAGES):
                print(f"{name:<22}{mode:<15}{stage:<8}{d['recon_max_abs'][i]:>15.2e}"
                      f"{d['grad_angle_deg'][i]:>11.2e}{d['grad_rel_err'][i]:>11.2e}")  # fmt: skip
    worst = {name: max(r["fp32"]["grad_angle_deg"]) for name, r in results.items()}
    print(f"\nTarget: fp32 angle <= {TARGET_DEG}° in every stage")
    for name, angle in worst.items():
        status = "met" if angle <= TARGET_DEG else "NOT MET"
        print(f"  {name:<22} worst stage {angle:.2e}°  {status}")
    figures = {
        "device": str(device),
        "max_grad_angle_deg_fp32": worst,
        "grad_angle_deg": {
            name: {mode: d["grad_angle_deg"] for mode, d in r.items()}
            for name, r in results.items()
        },
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
