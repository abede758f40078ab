"""Tune the demo study: pretrain one cell, then linear-probe it and its random init on ``val``.

    python scripts/study_probe.py --name rot-v1 --set pretext.task=rotation [--set ...]

Pretrains with :func:`ssltk.train.engine.pretrain` (params.yaml plus the overrides), then for the
trained task and a random-init task built from the same config and seed: extracts every endpoint
of ``task.representation`` on the train and val splits, max-pools each to at most 9000 features
(paper §4.2), standardises with train statistics and fits a multinomial logistic regression
(L-BFGS, a small C sweep) on train, scored on val. Prints one JSON line per cell and appends it to
``--log``. Random-init probes are cached by config (they do not depend on training settings).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ssltk.config import load_config
from ssltk.data.dataset import PreparedDataset
from ssltk.pretext import build_task
from ssltk.train.determinism import seed_everything
from ssltk.train.engine import pretrain

L2 = (1e-2, 1e-3)  # per-sample-mean CE + l2·|W|², strongest first (warm starts)


def max_rule_pool(x: torch.Tensor, max_features: int = 9000) -> torch.Tensor:
    if x.dim() == 2:
        return x
    _, c, h, w = x.shape
    s = min(max(math.ceil(math.sqrt(h * w * c / max_features)), 1), h)
    return F.max_pool2d(x, s, s).flatten(1) if s > 1 else x.flatten(1)


@torch.no_grad()
def features(task, split, layers, batch=250) -> dict[str, np.ndarray]:
    out: dict[str, list] = {layer: [] for layer in layers}
    for start in range(0, len(split), batch):
        images = split.images(np.arange(start, min(start + batch, len(split))))
        for layer, value in task.representation(images, layers, pool=max_rule_pool).items():
            out[layer].append(value.flatten(1).numpy())
    return {layer: np.concatenate(v) for layer, v in out.items()}


def probe(task, config) -> dict[str, float]:
    task.eval()
    data = PreparedDataset.open(config.data.prepared_dir)
    train, val = data.split("train"), data.split("val")
    # Every endpoint of the backbone up to pre_logits (its own names, whatever the arch).
    layers = list(task.representation(train.images(np.arange(1)), None))
    layers = layers[: layers.index("pre_logits") + 1]
    ftr, fva = features(task, train, layers), features(task, val, layers)
    ytr, yva = train.labels.numpy(), val.labels.numpy()
    result = {}
    for layer in layers:
        mean, std = ftr[layer].mean(0), ftr[layer].std(0) + 1e-6
        a = torch.from_numpy((ftr[layer] - mean) / std).float()
        b = torch.from_numpy((fva[layer] - mean) / std).float()
        result[layer] = round(
            100 * logistic_best(a, torch.from_numpy(ytr), b, torch.from_numpy(yva)), 1
        )
    return result


def logistic_best(a, ya, b, yb, classes: int = 10) -> float:
    """Multinomial logistic regression by full-batch L-BFGS; best val accuracy over ``L2``."""
    w = torch.zeros(a.shape[1] + 1, classes, requires_grad=True)
    a1 = torch.cat([a, torch.ones(len(a), 1)], 1)
    b1 = torch.cat([b, torch.ones(len(b), 1)], 1)
    best = 0.0
    for l2 in L2:
        opt = torch.optim.LBFGS(
            [w], lr=1, max_iter=60, line_search_fn="strong_wolfe", tolerance_grad=1e-5
        )

        def closure(opt=opt, l2=l2):
            opt.zero_grad()
            loss = F.cross_entropy(a1 @ w, ya) + l2 * w[:-1].square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            best = max(best, float(((b1 @ w).argmax(1) == yb).float().mean()))
    return best


def random_key(config) -> str:
    relevant = {k: v for k, v in config.flat().items() if k.split(".")[0] in ("model", "pretext")}
    relevant["seed"] = config.seed
    relevant["data"] = str(config.data.prepared_dir)
    return hashlib.sha1(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--runs", default="/tmp/study/runs")
    parser.add_argument("--log", default="/tmp/study/log.jsonl")
    parser.add_argument("--no-random", action="store_true")
    parser.add_argument("--no-probe", action="store_true")
    parser.add_argument(
        "--rotation-eval-crop",
        action="store_true",
        help="experiment: rotation trains on the eval preprocessing (no inception crop)",
    )
    args = parser.parse_args()
    overrides = ["tracking.uri=sqlite:////tmp/study/mlflow.db", "tracking.experiment=tune"]
    config = load_config(args.params, overrides + args.set)
    if args.rotation_eval_crop:
        import ssltk.pretext.rotation as rotation

        plain = rotation.inception_preprocess

        def eval_crop(images, keys, stream, size, *, train):
            return plain(images, keys, stream, size, train=False)

        rotation.inception_preprocess = eval_crop

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    result = pretrain(config, Path(args.runs) / args.name, restart=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    load = Path("/proc/loadavg").read_text().split()[:3]
    metrics = {k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}

    task = build_task(config)
    task.load_state_dict(torch.load(result.checkpoint, weights_only=False)["model"])
    t1 = time.perf_counter()
    trained = probe(task, config) if not args.no_probe else {"none": 0.0}
    probe_s = time.perf_counter() - t1
    args.no_random |= args.no_probe

    cache = Path(args.runs) / "random_cache.json"
    cached = json.loads(cache.read_text()) if cache.exists() else {}

    def random_init(cfg) -> dict[str, float]:
        key = random_key(cfg)
        if key not in cached and not args.no_random:
            seed_everything(cfg.seed)
            cached[key] = probe(build_task(cfg), cfg)
            cache.write_text(json.dumps(cached))
        return cached.get(key, {})

    rand = random_init(config)
    # The paper-init random network too, when the run used zero_init_residual.
    plain = config.model_copy(deep=True)
    plain.model.zero_init_residual = False
    rand_plain = random_init(plain)
    best = max(trained, key=trained.get)
    row = {
        "name": args.name,
        "set": args.set,
        "steps": result.steps,
        "pretext": metrics,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "load": load,
        "probe_s": round(probe_s, 1),
        "trained": trained,
        "random": rand,
        "random_paper_init": rand_plain,
        "best_layer": best,
        "best": trained[best],
        "random_best": max(rand.values()) if rand else None,
        "gain_at_best": round(trained[best] - rand.get(best, float("nan")), 1),
        "gain_vs_paper_init": round(trained[best] - rand_plain.get(best, float("nan")), 1),
    }
    print(json.dumps(row))
    with open(args.log, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("PROBE_THREADS", "1")))
    main()
