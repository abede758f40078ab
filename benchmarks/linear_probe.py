"""The L-BFGS linear probe against scikit-learn on the same real features, same L2 path.

Features: ``pre_logits`` (2048-d at k=4) of a randomly initialised (seeded) ResNet50 v1 in eval
mode, on the real CIFAR-10 JPEGs of ``cifar10-mini`` at 32 px mapped to [-1, 1]: train = its 10,000
train images, val / test = alternate images of its 2,000 test images. They are extracted once and
cached as ``.npy`` under ``--cache-dir`` (keyed by the archive's hash and the network), so reruns
skip the network.

Both sides run in this process under the same thread limit, from raw features:

* ours: ``ssltk.evaluate.lbfgs.fit_path`` (standardise, strong → weak L2, warm starts, pick on val);
* scikit-learn: ``StandardScaler`` then one ``LogisticRegression(solver="lbfgs", warm_start=True)``
  refitted per ``C = 1 / (l2 · n)`` in the same order, scored on val after each fit, as a user
  would write the same path. Same ``tol`` and ``max_iter``.

Both fits at each L2 are judged by one float64 evaluation of the objective. Last line: one JSON
object with ``time_ratio`` (ours / scikit-learn), ``acc_delta`` (test top-1 points, ours − theirs)
and the sizes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from _timing import Stopwatch

DEFAULT_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-mini.tar.gz"
DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache"
SPLITS = ("train", "val", "test")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--arch", default="resnet50_v1")
    parser.add_argument("--widening", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--l2", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3, 1e-4])
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--device", default="cpu", help="cuda: extract on the GPU and give ours CuPy features"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the output here")
    return parser.parse_args()


# --------------------------------------------------------------------------------------------------
# Features


def extract(
    archive: Path, arch: str, widening: int, seed: int, threads: int, device: str
) -> dict[str, tuple]:
    """``{split: (X float32 [n, d], y int64 [n])}`` from the network's ``pre_logits``."""
    import torch

    from ssltk.config import DataConfig
    from ssltk.data.sources import open_source
    from ssltk.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_model(arch, widening=widening, num_classes=None).eval().to(device)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        (root,) = [p for p in Path(tmp).iterdir() if p.is_dir()]
        source = open_source(DataConfig(source="imagefolder", root=root))
        out = {}
        for split in ("train", "test"):
            images = source.splits[split]
            feats = []
            batch: list[np.ndarray] = []
            for i, (image, reason) in enumerate(images.decoded(32)):
                if image is None:
                    raise SystemExit(f"error: {images.name_of(i)}: {reason}")
                batch.append(image)
                if len(batch) == 250 or i == len(images) - 1:
                    x = torch.from_numpy(np.stack(batch)).float() / 127.5 - 1.0
                    with torch.no_grad():
                        feats.append(model(x.to(device))["pre_logits"].flatten(1).cpu().numpy())
                    batch = []
                    print(f"  extracted {split} {i + 1}/{len(images)}", file=sys.stderr)
            out[split] = (np.concatenate(feats).astype(np.float32), images.labels.copy())
    test_X, test_y = out.pop("test")
    # Alternate test images (sorted by class) make val and test splits of equal class balance.
    out["val"] = (test_X[0::2], test_y[0::2])
    out["test"] = (test_X[1::2], test_y[1::2])
    return out


def cached_features(args: argparse.Namespace) -> tuple[dict[str, tuple], bool]:
    digest = hashlib.sha256(args.archive.read_bytes()).hexdigest()[:16]
    key = f"{digest}-{args.arch}-k{args.widening}-s{args.seed}-pre_logits"
    paths = {
        s: (args.cache_dir / f"{key}-{s}-X.npy", args.cache_dir / f"{key}-{s}-y.npy")
        for s in SPLITS
    }
    if all(x.is_file() and y.is_file() for x, y in paths.values()):
        return {s: (np.load(x), np.load(y)) for s, (x, y) in paths.items()}, True
    features = extract(args.archive, args.arch, args.widening, args.seed, args.threads, args.device)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    for split, (x_path, y_path) in paths.items():
        np.save(x_path, features[split][0])
        np.save(y_path, features[split][1])
    return features, False


# --------------------------------------------------------------------------------------------------
# The two probes


def objective(
    Xs: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray, l2: float
) -> float:
    """Mean cross-entropy + l2/2 ‖W‖², in float64, on standardised features."""
    z = Xs @ weight + bias
    z -= z.max(axis=1, keepdims=True)
    ce = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]
    return float(ce.mean() + 0.5 * l2 * np.sum(weight**2))


def run_ours(data: dict, l2s: list[float], args: argparse.Namespace) -> dict:
    from ssltk.evaluate import lbfgs

    (train_X, train_y), (val_X, val_y) = data["train"], data["val"]
    if args.device.startswith("cuda"):
        import cupy

        train_X, train_y, val_X, val_y = map(cupy.asarray, (train_X, train_y, val_X, val_y))
    marks: list[tuple[float, lbfgs.PathPoint]] = []
    watch = Stopwatch()
    path = lbfgs.fit_path(
        train_X,
        train_y,
        val_X,
        val_y,
        l2s,
        max_iter=args.max_iter,
        tol=args.tol,
        on_point=lambda p: marks.append((watch.elapsed(), p)),
    )
    return {"path": path, "total": watch.elapsed(), "marks": marks}


def run_sklearn(data: dict, l2s: list[float], args: argparse.Namespace) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    (train_X, train_y), (val_X, val_y) = data["train"], data["val"]
    n = len(train_X)
    watch = Stopwatch()
    scaler = StandardScaler().fit(train_X)
    train_s, val_s = scaler.transform(train_X), scaler.transform(val_X)
    model = LogisticRegression(
        solver="lbfgs", tol=args.tol, max_iter=args.max_iter, warm_start=True
    )
    points, best = [], None
    for l2 in sorted(l2s, reverse=True):
        model.set_params(C=1.0 / (l2 * n)).fit(train_s, train_y)
        val_top1 = float(model.score(val_s, val_y))
        snapshot = (model.coef_.T.copy(), model.intercept_.copy())
        points.append((watch.elapsed(), l2, val_top1, int(model.n_iter_[0]), snapshot))
        if best is None or val_top1 > best[0]:
            best = (val_top1, l2, snapshot)
    total = watch.elapsed()
    assert best is not None
    return {"total": total, "points": points, "best": best, "scaler": scaler}


def main() -> None:
    args = parse_args()
    if not args.archive.is_file():
        print(f"skip: real-image archive not found at {args.archive}")
        return
    from threadpoolctl import threadpool_limits

    data, hit = cached_features(args)
    train_X, train_y = data["train"]
    test_X, test_y = data["test"]
    n, d = train_X.shape
    classes = int(train_y.max()) + 1
    l2s = sorted(set(args.l2), reverse=True)

    with threadpool_limits(limits=args.threads):
        ours = run_ours(data, l2s, args)
        theirs = run_sklearn(data, l2s, args)

    # Judge both sides' solutions with one float64 objective on one standardisation (ours).
    from ssltk.evaluate import lbfgs

    std = ours["path"].probe.standardizer
    train_s = (train_X - std.mean) / std.scale
    sk_std = theirs["scaler"]
    sk_train = sk_std.transform(train_X).astype(np.float64)
    sk_test = sk_std.transform(test_X).astype(np.float64)

    lines = [
        f"# Linear probe: ssltk L-BFGS vs scikit-learn {__import__('sklearn').__version__}",
        "",
        f"features: {args.arch} k={args.widening} pre_logits (random init, seed {args.seed}), "
        f"train {n} x {d}, val {len(data['val'][0])}, test {len(test_X)}, {classes} classes "
        f"({'cached' if hit else 'extracted now'}); threads {args.threads}; tol {args.tol}, "
        f"max_iter {args.max_iter}; ours on {args.device}",
        "",
        "| l2 | C | ours s | sklearn s | ours iters | sklearn iters | ours val top1 | "
        "sklearn val top1 | objective ours | objective sklearn | rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    prev_ours, prev_sk = 0.0, 0.0  # seconds since each fit started
    for (t_ours, point), (t_sk, l2, sk_val, sk_iter, (w, b)) in zip(
        ours["marks"], theirs["points"], strict=True
    ):
        f_sk = objective(sk_train, train_y, w, b, l2)
        f_ours = objective(train_s, train_y, point.probe.weight, point.probe.bias, l2)
        lines.append(
            f"| {l2:g} | {1 / (l2 * n):.4g} | {t_ours - prev_ours:.2f} | {t_sk - prev_sk:.2f} | "
            f"{point.probe.n_iter} | {sk_iter} | {100 * point.val.top1:.2f} | {100 * sk_val:.2f} | "
            f"{f_ours:.6f} | {f_sk:.6f} | {(f_ours - f_sk) / f_sk:+.1e} |"
        )
        prev_ours, prev_sk = t_ours, t_sk
    path = ours["path"]
    f_final = objective(train_s, train_y, path.probe.weight, path.probe.bias, path.l2)
    ours_test = path.score(test_X, test_y)
    _, sk_l2, (w, b) = theirs["best"]
    sk_logits = sk_test @ w + b
    sk_top1 = lbfgs.topk_accuracy(sk_logits, test_y, 1)
    sk_top5 = lbfgs.topk_accuracy(sk_logits, test_y, 5)
    ratio = ours["total"] / theirs["total"]
    delta = 100 * (ours_test.top1 - sk_top1)
    lines += [
        "",
        "| | chosen l2 | path time s | test top1 | test top5 |",
        "|---|---|---|---|---|",
        f"| ours | {path.l2:g} | {ours['total']:.2f} | {100 * ours_test.top1:.2f} | "
        f"{100 * ours_test.top5:.2f} |",
        f"| scikit-learn | {sk_l2:g} | {theirs['total']:.2f} | {100 * sk_top1:.2f} | "
        f"{100 * sk_top5:.2f} |",
        "",
        f"ours at the chosen l2, float64 objective {f_final:.6f} (reported {path.probe.loss:.6f}).",
        f"time ratio (ours / scikit-learn): {ratio:.3f} (target <= 0.5); "
        f"test top-1 delta: {delta:+.2f} points (target |delta| <= 0.5)",
        "",
        json.dumps(
            {
                "time_ratio": round(ratio, 4),
                "acc_delta": round(delta, 3),
                "ours_s": round(ours["total"], 3),
                "sklearn_s": round(theirs["total"], 3),
                "n_train": n,
                "n_features": d,
                "n_classes": classes,
                "n_l2": len(l2s),
                "threads": args.threads,
            }
        ),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
