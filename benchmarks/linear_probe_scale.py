"""The L-BFGS probe at ImageNet's width and class count on this CPU, with a projection to
ImageNet's size.

Features: synthetic, ``--rows`` x ``--dim`` float16 on disk (a memory map, as ``eval.cache_dtype:
float16`` caches them), with a power-law spectrum (covariance eigenvalues ∝ 1/k over a 128-d
latent space, plus isotropic noise: pooled CNN features are as correlated) and ``--classes``
labels from a linear teacher on the latent factors.

Measured, each row count in its own process (peak RSS is per process):

* seconds per objective evaluation (value and gradient, the probe's unit of work), streamed from
  the memory map a chunk at a time, at several row counts up to ``--rows``: peak RSS stays a
  chunk, whatever the rows;
* evaluations to converge at one L2 strength on a ``--fit-rows`` subsample, ours (low-rank
  preconditioner, and none) beside scikit-learn's ``LogisticRegression(lbfgs)`` on the same rows
  (same objective, C = 1 / (l2 · n)), each judged by one float64 objective.

Projection (printed with its figures): seconds = (s per evaluation per row) × rows × evaluations
× L2 strengths, the per-row cost from the largest timed row count. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

IMAGENET_ROWS = 1_281_167
LATENT = 128


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--timed-rows", type=int, nargs="+", default=[8192, 32768, 200_000])
    parser.add_argument("--evaluations", type=int, default=1, help="timed per row count")
    parser.add_argument("--fit-rows", type=int, default=2048)
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--grid", type=int, default=4, help="L2 strengths in the projection")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ssltk-probe-scale"))
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


def _paths(args: argparse.Namespace) -> tuple[Path, Path]:
    stem = args.dir / f"X-{args.rows}x{args.dim}-k{args.classes}"
    return stem.with_suffix(".npy"), stem.with_name(stem.name + "-y.npy")


def make_features(args: argparse.Namespace) -> None:
    """Write X (float16) and y once; reruns reuse them."""
    from numpy.lib.format import open_memmap

    x_path, y_path = _paths(args)
    if x_path.is_file() and y_path.is_file():
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    spectrum = (1.0 / np.arange(1, LATENT + 1)) ** 0.5
    mixing = (spectrum[:, None] * rng.standard_normal((LATENT, args.dim))).astype(np.float32)
    mixing *= np.float32(4.0 / np.sqrt(spectrum @ spectrum))
    teacher = rng.standard_normal((64, args.classes)).astype(np.float32)
    tmp = x_path.with_suffix(".tmp.npy")
    X = open_memmap(tmp, mode="w+", dtype=np.float16, shape=(args.rows, args.dim))
    y = np.empty(args.rows, dtype=np.int64)
    clock = time.perf_counter()
    for start in range(0, args.rows, 8192):
        n = min(8192, args.rows - start)
        latent = rng.standard_normal((n, LATENT), dtype=np.float32)
        noise = rng.standard_normal((n, args.dim), dtype=np.float32)
        X[start : start + n] = np.maximum(latent @ mixing + noise, 0)  # ReLU'd like CNN features
        scores = latent[:, :64] @ teacher + rng.gumbel(size=(n, args.classes)) * 2
        y[start : start + n] = scores.argmax(axis=1)
        print(f"  wrote {start + n}/{args.rows} rows", file=sys.stderr, flush=True)
    X.flush()
    del X
    os.replace(tmp, x_path)
    np.save(y_path, y)
    print(f"  features written in {time.perf_counter() - clock:.0f} s", file=sys.stderr)


def child(args: argparse.Namespace) -> None:
    """Time objective evaluations on the first ``args.child`` rows, streamed; print JSON."""
    from ssltk.evaluate import lbfgs

    x_path, y_path = _paths(args)
    X = np.load(x_path, mmap_mode="r")[: args.child]
    y = np.load(y_path)[: args.child]
    std = lbfgs.Standardizer.fit(X)
    rows = lbfgs._Rows(X, y, std, lbfgs.CHUNK_ROWS, resident=False)
    objective = lbfgs._Objective(rows, args.classes, args.l2, None)
    theta = np.zeros(args.dim * args.classes + args.classes)
    theta[: args.dim * args.classes] = 1e-3  # away from zero's symmetric softmax
    times = []
    peaks = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample() -> None:  # the anonymous (heap) and file-backed (memory map) parts of RSS
        while not done.wait(0.01):
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(args.evaluations):
        clock = time.perf_counter()
        objective(theta)
        times.append(time.perf_counter() - clock)
    done.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"rows": args.child, "s_per_eval": min(times), "peak_rss": peak}
    result.update(peak_anon=peaks["RssAnon"], peak_file=peaks["RssFile"])
    print(json.dumps(result))


def timed(args: argparse.Namespace, rows: int) -> dict:
    command = [sys.executable, __file__, "--child", str(rows)]
    for key in ("rows", "dim", "classes", "evaluations", "l2"):
        command += [f"--{key}", str(getattr(args, key))]
    command += ["--dir", str(args.dir)]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def objective64(Xs: np.ndarray, y: np.ndarray, weight, bias, l2: float) -> float:
    z = Xs @ weight + bias
    z -= z.max(axis=1, keepdims=True)
    ce = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]
    return float(ce.mean() + 0.5 * l2 * np.sum(weight**2))


def fits(args: argparse.Namespace) -> list[dict]:
    from sklearn.linear_model import LogisticRegression

    from ssltk.evaluate import lbfgs

    x_path, y_path = _paths(args)
    X = np.asarray(np.load(x_path, mmap_mode="r")[: args.fit_rows], dtype=np.float32)
    # scikit-learn fits only the classes present: both sides get those, numbered 0..k-1
    present, y = np.unique(np.load(y_path)[: args.fit_rows], return_inverse=True)
    classes = len(present)
    out = []
    std = None
    for kind in ("low_rank", "none"):
        clock = time.perf_counter()
        probe = lbfgs.fit(
            X, y, args.l2, num_classes=classes, max_iter=args.max_iter, precondition=kind
        )
        seconds = time.perf_counter() - clock
        std = probe.standardizer
        Xs = (X - std.mean) / std.scale
        print(f"  fit {kind}: {seconds:.0f} s", file=sys.stderr, flush=True)
        out.append(
            {
                "solver": f"ssltk ({kind})",
                "s": seconds,
                "evals": probe.evaluations,
                "iters": probe.n_iter,
                "converged": probe.converged,
                "f": objective64(Xs, y, probe.weight, probe.bias, args.l2),
            }
        )
    assert std is not None
    Xs = ((X - std.mean) / std.scale).astype(np.float32)
    clock = time.perf_counter()
    sk = LogisticRegression(C=1 / (args.l2 * len(X)), tol=1e-4, max_iter=args.max_iter).fit(Xs, y)
    seconds = time.perf_counter() - clock
    out.append(
        {
            "solver": "scikit-learn",
            "s": seconds,
            "evals": None,
            "iters": int(sk.n_iter_[0]),
            "converged": int(sk.n_iter_[0]) < args.max_iter,
            "f": objective64(Xs.astype(np.float64), y, sk.coef_.T, sk.intercept_, args.l2),
        }
    )
    return out, classes


def main() -> None:
    args = parse_args()
    if args.child is not None:
        child(args)
        return
    make_features(args)
    timings = []
    for n in sorted(set(min(n, args.rows) for n in args.timed_rows)):
        timings.append(timed(args, n))
        print(f"  timed: {json.dumps(timings[-1])}", file=sys.stderr, flush=True)
    fitted, fit_classes = fits(args)
    big = timings[-1]
    per_row = big["s_per_eval"] / big["rows"]
    from ssltk.evaluate.lbfgs import preconditioner_kind

    default = next(f for f in fitted if preconditioner_kind(None, args.dim, False) in f["solver"])
    evals = default["evals"]
    projected = per_row * IMAGENET_ROWS * evals * args.grid
    lines = [
        f"# L-BFGS probe at d={args.dim}, K={args.classes} on this CPU ({os.cpu_count()} cores)",
        "",
        f"features: synthetic float16 memory map {args.rows:,} x {args.dim:,} "
        f"({args.rows * args.dim * 2 / 2**30:.2f} GiB), power-law spectrum, {args.classes} classes",
        "",
        "| rows | s / evaluation | peak RSS MiB | of it heap (anon) | of it memory map (file) |",
        "|---|---|---|---|---|",
        *(
            f"| {t['rows']:,} | {t['s_per_eval']:.2f} | {t['peak_rss'] / 2**20:.0f} | "
            f"{t['peak_anon'] / 2**20:.0f} | {t['peak_file'] / 2**20:.0f} |"
            for t in timings
        ),
        "",
        "(heap and map sampled every 10 ms; the map's pages are the kernel's page cache, "
        "dropped under pressure: the probe's own memory is the heap)",
        "",
        f"fits at l2={args.l2:g} on the first {args.fit_rows:,} rows, the {fit_classes} classes "
        f"among them (max_iter {args.max_iter}):",
        "",
        "| solver | s | evaluations | iterations | converged | float64 objective |",
        "|---|---|---|---|---|---|",
        *(
            f"| {f['solver']} | {f['s']:.1f} | {f['evals'] or '-'} | {f['iters']} | "
            f"{f['converged']} | {f['f']:.6f} |"
            for f in fitted
        ),
        "",
        f"projection to ImageNet train ({IMAGENET_ROWS:,} rows), {args.grid} L2 strengths, "
        "this CPU:",
        f"  s = (s/eval/row) x rows x evals x strengths = {per_row:.3e} x {IMAGENET_ROWS:,} x "
        f"{evals} x {args.grid} = {projected:,.0f} s ({projected / 3600:.1f} h)",
        f"  (evaluations per strength measured on the {args.fit_rows:,}-row subsample by "
        f"{default['solver']}, the default here"
        + ("" if default["converged"] else f", stopped by max_iter {args.max_iter}: a lower bound")
        + "; warm starts along the path need fewer)",
        "",
        json.dumps(
            {
                "dim": args.dim,
                "classes": args.classes,
                "rows_on_disk": args.rows,
                "s_per_eval": {str(t["rows"]): round(t["s_per_eval"], 3) for t in timings},
                "peak_rss_mib": {str(t["rows"]): round(t["peak_rss"] / 2**20) for t in timings},
                "peak_heap_mib": {str(t["rows"]): round(t["peak_anon"] / 2**20) for t in timings},
                "fit": {
                    f["solver"]: {"s": round(f["s"], 1), "evals": f["evals"], "iters": f["iters"]}
                    for f in fitted
                },
                "projected_imagenet_s": round(projected),
            }
        ),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
