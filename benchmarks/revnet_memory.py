"""RevNet memory-saving backward: memory, step time and numerical drift, side by side.

Three ways to train RevNet50 (small width) in one process, on the same weights and batch:
  plain          ordinary autograd (every activation stored),
  memory-saving  ``ssltk.models.reversible.reversible_sequence`` (stage outputs stored,
                 activations rebuilt from them during backward) and the stem max-pool saving
                 int8 window positions only,
  checkpoint     ``torch.utils.checkpoint`` around each unit (unit inputs stored, F run twice).
Reported per way: bytes autograd saves for backward (``saved_tensors_hooks``; each storage once,
parameters excluded), memory held after the forward pass and the step's peak (CPU: process RSS,
with glibc set to return freed blocks to the OS so RSS follows live memory; CUDA: allocator
statistics), and the median step time (forward + backward).

Then a depth sweep of one stage at 4, 8 and 16 units, the reconstruction drift per stage
(max-abs error of the rebuilt stage input, and the angle between memory-saving and plain
gradients) in fp32 and under bf16 autocast, and, on CUDA, the coupling kernels against their torch
references. The last line is JSON.

Targets: saved_bytes_ratio <= 0.30, time_ratio <= 1.35, depth_growth_4_to_16 <= 1.10.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels import dispatch
from kernels.revnet_coupling import (
    couple,
    couple_conv1x1,
    couple_conv1x1_reference,
    couple_reference,
    uncouple_conv1x1,
    uncouple_conv1x1_reference,
)
from ssltk.models import build_model
from ssltk.models.reversible import invert_sequence
from ssltk.models.revnet import CompactZeroPadMaxPool, ReversibleStage

STAGES = ("block1", "block2", "block3", "block4")
TARGETS = {"saved_bytes_ratio": 0.30, "time_ratio": 1.35, "depth_growth_4_to_16": 1.10}
MiB = 2.0**20


# ----------------------------------------------------------------------------- memory probes


class Memory:
    """Current and peak memory of the device the benchmark runs on.

    On CPU the figures come from the process RSS. While :meth:`tracking` is active, glibc serves
    every block over 64 KiB by mmap and returns it on free, so RSS follows live memory; outside it
    (timing) glibc keeps freed blocks for reuse as usual, since fresh pages would slow every step.
    """

    SMALL, LARGE = 1 << 12, 1 << 25
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.libc = None
        if not self.cuda:
            try:
                self.libc = ctypes.CDLL("libc.so.6")
                Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM)
            except OSError:
                self.libc = None
        self.peak_available = self.cuda or self.libc is not None
        self._malloc(self.LARGE)

    def _malloc(self, threshold: int) -> None:
        if self.libc is not None:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, threshold)
            self.libc.mallopt(self.M_TRIM_THRESHOLD, threshold)
            self.libc.malloc_trim(0)

    @contextmanager
    def tracking(self) -> Iterator[None]:
        self._malloc(self.SMALL)
        try:
            yield
        finally:
            self._malloc(self.LARGE)

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def current(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return self._status("VmRSS") if self.peak_available else 0

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.peak_available:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM") if self.peak_available else 0


class SavedBytes:
    """Bytes autograd saves for backward inside the context: each storage once, parameters
    excluded. Each storage is attributed to the innermost module running when it was first saved
    and to the op that produced it (its ``grad_fn``; none for the batch and for non-differentiable
    tensors such as pooling indices and BN statistics), and flagged when saved inside a
    reversible stage."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, tuple[int, bool, tuple[str, str, str]]] = {}
        self.stack: list[tuple[str, bool]] = [("(outside the model)", False)]

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.params and key not in self.storages:
            module, inside_stage = self.stack[-1]
            producer = "input" if t.is_leaf and t.requires_grad else "(no grad_fn)"
            if t.grad_fn is not None:
                producer = type(t.grad_fn).__name__.removesuffix("Backward0")
            dtype = str(t.dtype).removeprefix("torch.")
            self.storages[key] = (storage.nbytes(), inside_stage, (module, producer, dtype))
        return t

    def _enter(self, name: str, module: nn.Module) -> Callable[..., None]:
        label = f"{name or 'model'} ({type(module).__name__})"

        def hook(*_) -> None:
            inside = self.stack[-1][1] or isinstance(module, ReversibleStage)
            self.stack.append((label, inside))

        return hook

    def _leave(self, *_) -> None:
        self.stack.pop()

    def __enter__(self) -> SavedBytes:
        self._handles = []
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._enter(name, module)))
            self._handles.append(module.register_forward_hook(self._leave))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()

    @property
    def total(self) -> int:
        return sum(n for n, _, _ in self.storages.values())

    @property
    def in_stages(self) -> int:
        return sum(n for n, inside, _ in self.storages.values() if inside)

    def breakdown(self) -> dict[tuple[str, str, str], int]:
        """Saved bytes per (module, producing op, dtype)."""
        rows: dict[tuple[str, str, str], int] = {}
        for n, _, key in self.storages.values():
            rows[key] = rows.get(key, 0) + n
        return rows


# ----------------------------------------------------------------------------- the three ways


class CheckpointedUnit(nn.Module):
    """A reversible unit run under ``torch.utils.checkpoint`` (the usual alternative)."""

    def __init__(self, unit: nn.Module) -> None:
        super().__init__()
        self.unit = unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.unit, x, use_reentrant=False)


def set_memory_saving(model: nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, ReversibleStage | CompactZeroPadMaxPool):
            module.memory_saving = enabled


def variants(width: int, device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    plain = build_model("revnet50", widening=width, num_classes=10, memory_saving=False)
    saving = copy.deepcopy(plain)
    set_memory_saving(saving, True)
    ckpt = copy.deepcopy(plain)
    for module in ckpt.modules():
        if isinstance(module, ReversibleStage):
            module.units = nn.ModuleList(CheckpointedUnit(u) for u in module.units)
    models = {"plain": plain, "memory-saving": saving, "checkpoint/unit": ckpt}
    return {name: m.to(device).train() for name, m in models.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_step(
    model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], memory: Memory
) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    with memory.tracking():
        memory.reset_peak()
        before = memory.current()
        with SavedBytes(model) as saved:
            loss = loss_fn(model)
        held = memory.current() - before
        loss.backward()
        peak = memory.peak() - before
        del loss
    return {
        "saved": saved.total,
        "saved_in_stages": saved.in_stages,
        "held": held,
        "peak": peak,
        "breakdown": saved.breakdown(),
    }


def time_steps(
    models: dict[str, nn.Module],
    loss_fn: Callable[[nn.Module], torch.Tensor],
    steps: int,
    device: torch.device,
) -> dict[str, tuple[float, float]]:
    """(fastest, median) step time per model. The models take turns so that machine noise hits
    all alike; the fastest step is the least disturbed one, so ratios use it."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(steps + 2):
        for name, model in models.items():
            model.zero_grad(set_to_none=True)
            sync(device)
            start = time.perf_counter()
            loss_fn(model).backward()
            sync(device)
            if i >= 2:  # two warm-up rounds (allocator, Triton compilation)
                times[name].append(time.perf_counter() - start)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def model_comparison(
    args, device: torch.device, memory: Memory, amp: bool = False
) -> dict[str, dict[str, float]]:
    models = variants(args.width, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    labels = torch.randint(0, 10, (args.batch,), generator=gen).to(device)

    def loss_fn(model: nn.Module) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)["logits"]
        return F.cross_entropy(logits.float(), labels)

    for model in models.values():  # warm up once so the memory figures exclude first-call costs
        loss_fn(model).backward()
    results = {name: measure_step(m, loss_fn, memory) for name, m in models.items()}
    for name, (fastest, median) in time_steps(models, loss_fn, args.steps, device).items():
        results[name]["time"], results[name]["time_median"] = fastest, median
    return results


def print_comparison(title: str, models: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}; step ms = fastest (median) of the timed steps")
    print(f"{'way':<16}{'saved MiB':>10}{'in stages':>10}{'held MiB':>10}{'peak MiB':>10}"
          f"{'step ms':>18}{'saved ×':>9}{'time ×':>8}")  # fmt: skip
    base = models["plain"]
    for name, r in models.items():
        step = f"{1e3 * r['time']:.1f} ({1e3 * r['time_median']:.1f})"
        print(
            f"{name:<16}{mib(r['saved']):>10}{mib(r['saved_in_stages']):>10}{mib(r['held']):>10}"
            f"{mib(r['peak']):>10}{step:>18}{r['saved'] / base['saved']:>9.3f}"
            f"{r['time'] / base['time']:>8.3f}"
        )


def print_breakdown(models: dict[str, dict], rows: int = 12) -> None:
    """The largest saved-tensor groups, by module and producing op, for each way."""
    ways = list(models)
    keys: set[tuple[str, str, str]] = set().union(*(models[w]["breakdown"] for w in ways))
    ranked = sorted(keys, key=lambda k: max(models[w]["breakdown"].get(k, 0) for w in ways))
    ranked.reverse()
    print(f"\nSaved for backward by module and producing op (largest {rows} groups, MiB)")
    print(f"{'module':<34}{'produced by':<24}{'dtype':<9}" + "".join(f"{w:>17}" for w in ways))
    for module, producer, dtype in ranked[:rows]:
        sizes = "".join(
            f"{models[w]['breakdown'].get((module, producer, dtype), 0) / MiB:>17.2f}" for w in ways
        )
        print(f"{module[:33]:<34}{producer[:23]:<24}{dtype:<9}{sizes}")
    rest = [
        sum(n for k, n in models[w]["breakdown"].items() if k not in ranked[:rows]) for w in ways
    ]
    print(f"{'(everything else)':<67}" + "".join(f"{n / MiB:>17.2f}" for n in rest))


def depth_sweep(args, device: torch.device, memory: Memory) -> dict[int, dict[str, dict]]:
    channels = 64 * args.width
    gen = torch.Generator().manual_seed(1)
    side = args.size // 4
    x = torch.randn(args.batch, channels, side, side, generator=gen).to(device)
    x.requires_grad_()
    results: dict[int, dict[str, dict]] = {}
    for depth in (4, 8, 16):
        torch.manual_seed(depth)
        plain = ReversibleStage(channels, depth, memory_saving=False).to(device)
        saving = copy.deepcopy(plain)
        saving.memory_saving = True

        def loss_fn(stage: nn.Module) -> torch.Tensor:
            return stage(x).square().mean()

        models = {"plain": plain, "memory-saving": saving}
        results[depth] = {name: measure_step(m, loss_fn, memory) for name, m in models.items()}
        timed = time_steps(models, loss_fn, max(2, args.steps // 2), device)
        for name, (fastest, median) in timed.items():
            results[depth][name]["time"], results[depth][name]["time_median"] = fastest, median
    return results


# ----------------------------------------------------------------------------- drift


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    cos = (torch.dot(a, b) / (a.norm() * b.norm())).item()
    return math.degrees(math.acos(min(1.0, max(-1.0, cos))))


def stage_grads(model: nn.Module, stage: str) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in getattr(model, stage).parameters()])


def keep_fp32_stream(model: nn.Module) -> None:
    """Feed each stage's first unit an fp32 tensor in the plain model, as memory saving does."""
    for module in model.modules():
        if isinstance(module, ReversibleStage):
            module.units[0].register_forward_pre_hook(lambda _, args: (args[0].float(),))


def drift(args, device: torch.device, bf16: bool) -> dict[str, list[float]]:
    """Per stage: max-abs reconstruction error of the stage input, and the angle (degrees) and
    relative error between memory-saving and plain gradients of the stage's parameters."""
    torch.manual_seed(0)
    plain = build_model("revnet50", widening=args.width, num_classes=10, memory_saving=False)
    plain = plain.to(device).train()
    keep_fp32_stream(plain)
    saving = copy.deepcopy(plain)
    set_memory_saving(saving, True)
    probe = copy.deepcopy(saving)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
    labels = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

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
    all_plain = torch.cat([p.grad.flatten() for p in plain.parameters()])
    all_saving = torch.cat([p.grad.flatten() for p in saving.parameters()])
    angles = [angle_deg(stage_grads(plain, s), stage_grads(saving, s)) for s in STAGES]
    rel = [
        (
            (stage_grads(plain, s) - stage_grads(saving, s)).norm() / stage_grads(plain, s).norm()
        ).item()
        for s in STAGES
    ]
    return {
        "recon_max_abs": recon,
        "grad_angle_deg": angles,
        "grad_rel_err": rel,
        "model_angle_deg": angle_deg(all_plain, all_saving),
        "model_grads": all_plain,
    }


# ----------------------------------------------------------------------------- kernels (CUDA)


def cuda_time(fn: Callable[[], torch.Tensor]) -> float:
    """GPU time of one call in seconds, replayed from a CUDA graph so that Python and launch
    overhead do not count (the median of Triton's measurements)."""
    from triton.testing import do_bench_cudagraph

    fn()  # compile and allocate outside the capture
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=50) / 1e3


def launch_time(fn: Callable[[], torch.Tensor], repeats: int = 50) -> float:
    """Host time per call with the device kept busy: Python, checks and kernel launch."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    host = (time.perf_counter() - start) / repeats
    torch.cuda.synchronize()
    return host


def kernel_comparison(args) -> list[dict]:
    """The coupling kernels against their references at RevNet50 stage-1 shapes (k = 4)."""
    n, channels, side = args.kernel_batch, 256, 56
    half, inner = channels // 2, channels // 8
    dev = "cuda"
    x = torch.randn(n, channels, side, side, device=dev)
    rows = []
    for h_dtype in (torch.float32, torch.bfloat16):
        fx = torch.randn(n, half, side, side, device=dev, dtype=h_dtype)
        h = torch.randn(n, inner, side, side, device=dev, dtype=h_dtype)
        w = torch.randn(half, inner, 1, 1, device=dev) / math.sqrt(inner)
        cases = {
            "couple": (
                lambda fx=fx: couple(x, fx),
                lambda fx=fx: couple_reference(x, fx),
            ),
            "couple_conv1x1": (
                lambda h=h, w=w: couple_conv1x1(x, h, w),
                lambda h=h, w=w: couple_conv1x1_reference(x, h, w),
            ),
            "uncouple_conv1x1": (
                lambda h=h, w=w: uncouple_conv1x1(x, h, w),
                lambda h=h, w=w: uncouple_conv1x1_reference(x, h, w),
            ),
        }
        for name, (kernel, reference) in cases.items():
            with dispatch.force("triton"):
                out = kernel()
                t_kernel = cuda_time(kernel)
                host = launch_time(kernel)
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                expected = reference()
            t_ref = cuda_time(reference)
            moved = 2 * x.numel() * x.element_size() + (h if "conv" in name else fx).nbytes
            rows.append(
                {
                    "op": name,
                    "dtype": str(h_dtype).removeprefix("torch."),
                    "kernel_ms": 1e3 * t_kernel,
                    "reference_ms": 1e3 * t_ref,
                    "speedup": t_ref / t_kernel,
                    "kernel_GBps": moved / t_kernel / 1e9,
                    "host_us_per_call": 1e6 * host,
                    "max_abs_diff": (out - expected).abs().max().item(),
                }
            )
    return rows


# ----------------------------------------------------------------------------- report


def mib(n: float) -> str:
    return f"{n / MiB:9.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smaller batch and fewer steps")
    parser.add_argument("--width", type=int, default=None, help="RevNet widening k")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="input side in pixels")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per way")
    parser.add_argument("--kernel-batch", type=int, default=32)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    cpu_defaults = (1, 8, 64, 3) if args.quick else (1, 16, 96, 5)
    cuda_defaults = (2, 16, 128, 5) if args.quick else (4, 64, 128, 10)
    defaults = cuda_defaults if device.type == "cuda" else cpu_defaults
    for name, value in zip(("width", "batch", "size", "steps"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    # Memory saving runs F without TF32 (see ssltk.models.reversible); the plain and checkpointed
    # models do the same here, so that all three do identical arithmetic.
    torch.backends.cudnn.allow_tf32 = False
    memory = Memory(device)
    where = "CUDA allocator" if memory.cuda else "process RSS" if memory.peak_available else "n/a"
    print(
        f"RevNet50 k={args.width}, batch {args.batch} × 3 × {args.size}², device {device}, "
        f"torch {torch.__version__}; memory figures from {where}"
    )

    models = model_comparison(args, device, memory)
    print_comparison("Training step (forward + backward), fp32", models)
    print("  'in stages': saved while a reversible stage ran; the rest is stem, pool and head.")
    print("  Checkpoint keeps unit inputs outside autograd's saved-tensor hooks: see 'held'.")
    print_breakdown(models)
    amp_models = model_comparison(args, device, memory, amp=True) if memory.cuda else None
    if amp_models:
        print_comparison("Training step, bf16 autocast", amp_models)

    sweep = depth_sweep(args, device, memory)
    print(f"\nDepth sweep: one stage, {64 * args.width} channels, batch {args.batch}, "
          f"{args.size // 4}² pixels")  # fmt: skip
    print(f"{'units':>6}{'way':>16}{'saved MiB':>11}{'peak MiB':>10}{'step ms':>18}")
    for depth, ways in sweep.items():
        for name, r in ways.items():
            step = f"{1e3 * r['time']:.1f} ({1e3 * r['time_median']:.1f})"
            print(f"{depth:>6}{name:>16}{mib(r['saved']):>11}{mib(r['peak']):>10}{step:>18}")

    drift32 = drift(args, device, bf16=False)
    drift16 = drift(args, device, bf16=True)
    bf16_vs_fp32 = angle_deg(drift32["model_grads"], drift16["model_grads"])
    print("\nDrift of memory saving vs plain autograd (plain keeps the fp32 coupling stream too)")
    print(f"{'stage':<8}{'precision':<11}{'recon max|err|':>16}{'grad angle °':>14}"
          f"{'grad rel err':>14}")  # fmt: skip
    for label, d in (("fp32", drift32), ("bf16 amp", drift16)):
        for i, stage in enumerate(STAGES):
            print(f"{stage:<8}{label:<11}{d['recon_max_abs'][i]:>16.3e}"
                  f"{d['grad_angle_deg'][i]:>14.2e}{d['grad_rel_err'][i]:>14.2e}")  # fmt: skip
    print(f"whole model: angle {drift32['model_angle_deg']:.2e}° (fp32), "
          f"{drift16['model_angle_deg']:.2e}° (bf16 amp); for scale, plain bf16 vs plain fp32 "
          f"gradients differ by {bf16_vs_fp32:.2f}°")  # fmt: skip

    kernels = kernel_comparison(args) if device.type == "cuda" else []
    if kernels:
        print(f"\nCoupling kernels vs torch references, batch {args.kernel_batch} × 256 × 56²"
              " (GPU time from CUDA-graph replay; host µs = Python + launch per call)")  # fmt: skip
        print(f"{'op':<18}{'F dtype':<10}{'kernel ms':>10}{'ref ms':>9}{'speedup':>9}"
              f"{'GB/s':>8}{'host µs':>9}{'max|diff|':>11}")  # fmt: skip
        for r in kernels:
            print(
                f"{r['op']:<18}{r['dtype']:<10}{r['kernel_ms']:>10.3f}{r['reference_ms']:>9.3f}"
                f"{r['speedup']:>9.2f}{r['kernel_GBps']:>8.0f}{r['host_us_per_call']:>9.0f}"
                f"{r['max_abs_diff']:>11.2e}"
            )

    base, saving = models["plain"], models["memory-saving"]
    figures = {
        "device": str(device),
        "width": args.width,
        "batch": args.batch,
        "size": args.size,
        "saved_bytes_ratio": saving["saved"] / base["saved"],
        "stage_saved_bytes_ratio": saving["saved_in_stages"] / base["saved_in_stages"],
        "time_ratio": saving["time"] / base["time"],
        "time_ratio_median": saving["time_median"] / base["time_median"],
        "depth_growth_4_to_16": sweep[16]["memory-saving"]["saved"]
        / sweep[4]["memory-saving"]["saved"],
        "plain_depth_growth_4_to_16": sweep[16]["plain"]["saved"] / sweep[4]["plain"]["saved"],
        "peak_ratio": saving["peak"] / base["peak"] if base["peak"] > 0 else None,
        "checkpoint_peak_ratio": models["checkpoint/unit"]["peak"] / base["peak"]
        if base["peak"] > 0
        else None,
        "checkpoint_time_ratio": models["checkpoint/unit"]["time"] / base["time"],
        "bf16_saved_bytes_ratio": amp_models["memory-saving"]["saved"]
        / amp_models["plain"]["saved"]
        if amp_models
        else None,
        "bf16_time_ratio": amp_models["memory-saving"]["time"] / amp_models["plain"]["time"]
        if amp_models
        else None,
        "depth16_time_ratio": sweep[16]["memory-saving"]["time"] / sweep[16]["plain"]["time"],
        "recon_max_abs_fp32": drift32["recon_max_abs"],
        "recon_max_abs_bf16": drift16["recon_max_abs"],
        "grad_angle_deg_fp32": drift32["grad_angle_deg"],
        "grad_angle_deg_bf16": drift16["grad_angle_deg"],
        "model_grad_angle_deg_fp32": drift32["model_angle_deg"],
        "model_grad_angle_deg_bf16": drift16["model_angle_deg"],
        "plain_bf16_vs_fp32_angle_deg": bf16_vs_fp32,
        "kernels": kernels,
    }
    print("\nTargets")
    for key, limit in TARGETS.items():
        status = "met" if figures[key] <= limit else "NOT MET"
        print(f"  {key:<22} {figures[key]:.3f}  (target <= {limit})  {status}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
