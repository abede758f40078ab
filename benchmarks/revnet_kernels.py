"""RevNet coupling kernels against the torch reference on CUDA (RevNet50 k=4 stage-1 shapes).

Rows per F dtype: ``coupling`` (the Triton kernel vs ``torch.cat``), and for F's last 1×1 conv
plus the coupling three ways: the fused Triton GEMM + coupling kernel, cuDNN's conv followed by
the coupling kernel, and the torch reference (cuDNN conv + ``cat``). ``ssltk.kernels.dispatch``
sends 16-bit F to the fused kernel and fp32 to cuDNN + coupling kernel; this table is the evidence.
GPU time from CUDA-graph replay (Triton's ``do_bench_cudagraph``), TF32 off. On CPU it prints
that it needs CUDA. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ssltk.kernels import dispatch
from ssltk.kernels.revnet_coupling import _launch_coupling_conv1x1, coupling, coupling_conv1x1


def cuda_ms(fn: Callable[[], torch.Tensor]) -> float:
    from triton.testing import do_bench_cudagraph

    fn()  # compile and allocate outside the capture
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=50)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    if args.device != "cuda" or not torch.cuda.is_available():
        print("revnet_kernels: needs a CUDA device (--device cuda); nothing measured")
        print(json.dumps({"device": args.device, "skipped": "needs a CUDA device"}))
        return 0
    n, channels, side = args.batch, 256, 56
    half, inner = channels // 2, channels // 8
    x = torch.randn(n, channels, side, side, device="cuda")
    w = torch.randn(half, inner, 1, 1, device="cuda") / math.sqrt(inner)
    rows = []
    torch.backends.cudnn.allow_tf32 = False
    for dtype in (torch.float32, torch.bfloat16):
        fx = torch.randn(n, half, side, side, device="cuda", dtype=dtype)
        h = torch.randn(n, inner, side, side, device="cuda", dtype=dtype)

        def cudnn_then_kernel(h=h):
            with dispatch.force("triton"):
                return coupling(x, F.conv2d(h, w.to(h.dtype)))

        def coupling_kernel(fx=fx):
            with dispatch.force("triton"):
                return coupling(x, fx)

        def reference(fn, *a):
            with dispatch.force("torch"):
                return fn(*a)

        cases = {
            "coupling / triton": coupling_kernel,
            "coupling / torch": lambda fx=fx: reference(coupling, x, fx),
            "conv+coupling / fused triton": lambda h=h: _launch_coupling_conv1x1(x, h, w, False),
            "conv+coupling / cuDNN + triton": cudnn_then_kernel,
            "conv+coupling / torch": lambda h=h: reference(coupling_conv1x1, x, h, w),
        }
        for name, fn in cases.items():
            rows.append({"case": name, "F dtype": str(dtype).removeprefix("torch."),
                         "ms": cuda_ms(fn)})  # fmt: skip
        with dispatch.force("triton"):
            chosen = coupling_conv1x1(x, h, w)
        fused = dispatch.fuse_conv1x1(h)
        rows.append({"case": f"dispatch picks: {'fused' if fused else 'cuDNN + triton'}",
                     "F dtype": str(dtype).removeprefix("torch."),
                     "max_abs_diff_vs_torch": (chosen - reference(coupling_conv1x1, x, h, w))
                     .abs().max().item()})  # fmt: skip
    print(f"batch {n} × {channels} × {side}², {torch.cuda.get_device_name()}")
    for r in rows:
        figure = f"{r['ms']:.3f} ms" if "ms" in r else f"max|diff| {r['max_abs_diff_vs_torch']:.2e}"
        print(f"{r['case']:<34}{r['F dtype']:<10}{figure}")
    print(json.dumps({"device": "cuda", "gpu": torch.cuda.get_device_name(), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
