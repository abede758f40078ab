"""``ssltk eval`` end to end: a pretraining run's features, the L-BFGS probe, MLflow write-back,
the feature cache, random-init baselines and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from demo_images import demo_imagefolder
from typer.testing import CliRunner

from ssltk import store as mlflow_store
from ssltk import tracking
from ssltk.cli import app
from ssltk.config import Config, load_config
from ssltk.data.dataset import PreparedDataset
from ssltk.data.prepare import prepare

# The evaluation internals these tests pin, in one place (a restructure moves one import block):
# the feature identity evaluation builds (_features), the probes, the cache and the run's task.
from ssltk.evaluate import evaluation, lbfgs, sgd
from ssltk.evaluate.features import FeatureCache, Features, extract_features
from ssltk.evaluate.pooling import make_pool, pooled_shape
from ssltk.evaluate.target import target_from_run_dir
from ssltk.models import build_model
from ssltk.sections import MlpProbeConfig, SgdProbeConfig
from ssltk.train.checkpoint import load_checkpoint, save_checkpoint, sha256_file, sidecar_path

LAYERS = ["block3", "pre_logits"]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Prepared data (300 train, 50 val, 100 test) and a 4-step rotation pretraining run."""
    root = tmp_path_factory.mktemp("eval")
    store = root / "mlflow.db"
    params = {
        "seed": 3,
        "data": {
            "source": "imagefolder",
            "root": str(demo_imagefolder(root / "images", 35, 10)),
            "val_fraction": 0.15,
            "prepared_dir": str(root / "prepared"),
        },
        "model": {"arch": "resnet50_v1", "widening": 1},
        "pretext": {"task": "rotation", "input_size": 32},
        "pretrain": {
            "epochs": 1,
            "max_steps": 4,
            "batch_size": 16,
            "checkpoint_every": 4,
            "device": "cpu",
        },
        "eval": {
            "layers": LAYERS,
            "batch_size": 64,
            "lbfgs": {"l2": [0.1, 0.01], "max_iter": 60},
        },
        "tracking": {"uri": f"sqlite:///{store}", "experiment": "eval-test"},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    prepare(load_config(path), progress=False)
    out = root / "runs" / "rot"
    result = CliRunner().invoke(app, ["pretrain", "--params", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    return {"root": root, "params": path, "out": out, "run_id": run["run_id"], "store": store}


def ssltk_eval(study: dict, *args: str):
    argv = ["eval", "--params", str(study["params"]), *args]
    return CliRunner().invoke(app, argv, catch_exceptions=False)


@pytest.fixture(scope="module")
def evaluated(study: dict) -> dict:
    """``ssltk eval --run-id`` of the study's run: its metrics.json."""
    out = study["root"] / "eval-a"
    first = ssltk_eval(study, "--run-id", study["run_id"], "--out", str(out))
    assert first.exit_code == 0, first.output
    return json.loads((out / "metrics.json").read_text())


def test_eval_by_run_id_logs_every_layer_on_both_runs_and_repeats_exactly(
    study: dict, evaluated: dict
):
    out = study["root"] / "eval-a"
    summary = evaluated
    client = mlflow_store.client(f"sqlite:///{study['store']}")
    eval_run = client.get_run(summary["run_id"])
    pretrain_run = client.get_run(study["run_id"])
    assert eval_run.data.tags[tracking.TAG_KIND] == tracking.KIND_EVAL
    assert eval_run.data.tags[tracking.TAG_PRETRAIN_RUN_ID] == study["run_id"]
    for layer in LAYERS:
        for k in (1, 5):
            name = tracking.probe_metric("lbfgs", k, layer)
            assert eval_run.data.metrics[name] == pretrain_run.data.metrics[name]
            assert 0.0 <= eval_run.data.metrics[name] <= 1.0
            assert pretrain_run.data.metrics[name] == summary["layers"][layer][f"top{k}"]
        # The val figure the report chooses the best layer by is written back too.
        val_name = f"probe/lbfgs/val_top1/{layer}"
        assert pretrain_run.data.metrics[val_name] == summary["layers"][layer]["val_top1"]
        assert summary["layers"][layer]["l2"] in (0.1, 0.01)
    # The top-5 of 10 classes is never below the top-1.
    assert all(f["top5"] >= f["top1"] for f in summary["layers"].values())

    # A second evaluation (here from the run directory, reading the cache) gives the same figures,
    # and so does a cold one that recomputes the features. One layer each: that every layer's
    # figures are the refit of its cached arrays is test_reported_figures_are_the_train_fit_...
    one = ["--set", "eval.layers=[pre_logits]"]
    second = ssltk_eval(study, "--run-dir", str(study["out"]), "--out", str(out), *one)
    assert second.exit_code == 0, second.output
    again = json.loads((out / "metrics.json").read_text())
    assert again["layers"]["pre_logits"] == summary["layers"]["pre_logits"]
    assert again["run_id"] != summary["run_id"]
    cold_out = study["root"] / "b"
    cold = ssltk_eval(study, "--run-dir", str(study["out"]), "--out", str(cold_out), *one)
    assert cold.exit_code == 0, cold.output
    fresh = json.loads((cold_out / "metrics.json").read_text())
    assert fresh["layers"] == {"pre_logits": summary["layers"]["pre_logits"]}


def test_baseline_is_a_seeded_random_init_logged_as_its_own_kind(study: dict, evaluated: dict):
    out = study["root"] / "baseline"
    result = ssltk_eval(study, "--baseline", "--set", "eval.layers=[pre_logits]", "--out", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "metrics.json").read_text())
    run = mlflow_store.client(f"sqlite:///{study['store']}").get_run(summary["run_id"])
    assert run.data.tags[tracking.TAG_KIND] == tracking.KIND_BASELINE
    assert (run.data.tags[tracking.TAG_TASK], run.data.tags[tracking.TAG_ARCH]) == (
        "rotation",
        "resnet50_v1",
    )
    assert tracking.probe_metric("lbfgs", 1, "pre_logits") in run.data.metrics
    assert summary["pretrain_run_id"] is None
    # Its weights differ from the pretrained ones: the cache never mixes them up.
    assert summary["weights_sha256"] != evaluated["weights_sha256"]


def test_a_changed_checkpoint_never_hits_the_feature_cache(tmp_path: Path):
    cache = FeatureCache(tmp_path)
    identity = {"weights": "0" * 64, "data_hash": "d"}
    assert cache.load(identity, "train", "pre_logits") is None
    writer = cache.writer(identity, "train", "pre_logits", (2, 3))
    writer.array[:] = np.arange(6, dtype=np.float32).reshape(2, 3)
    writer.commit()
    assert cache.load(identity, "train", "pre_logits") is not None
    assert cache.load({**identity, "weights": "0" * 63 + "1"}, "train", "pre_logits") is None
    assert cache.load({**identity, "data_hash": "e"}, "train", "pre_logits") is None


@pytest.fixture
def scored(monkeypatch) -> list:
    """What the SGD/MLP probe's figures are computed from: ``(rows per layer, logits)`` of every
    ``predict`` call evaluation makes."""
    calls = []
    original = sgd.predict

    def spy(heads, features, **kwargs):
        logits = original(heads, features, **kwargs)
        calls.append(({layer: len(rows) for layer, rows in features.items()}, logits))
        return logits

    monkeypatch.setattr(sgd, "predict", spy)
    return calls


def assert_figures_score_the_test_split(study: dict, figures: dict, scored: list) -> None:
    """Each layer's top-1 and top-5 are its head's logits on the 100 test rows, against their
    labels (top-k counted here by hand)."""
    (rows, logits), *others = scored
    assert not others and rows == {layer: 100 for layer in figures}
    data = PreparedDataset.for_config(load_config(study["params"]))
    labels = data.split("test").labels.numpy()
    for layer, got in figures.items():
        ranked = np.argsort(-logits[layer], axis=1, kind="stable")
        assert got["top1"] == float(np.mean(ranked[:, 0] == labels)), layer
        assert got["top5"] == float(np.mean((ranked[:, :5] == labels[:, None]).any(axis=1)))
        assert got["top5"] > got["top1"], layer  # 10 classes: top-5 is a different figure


def shared_cache(study: dict) -> list[str]:
    """``eval.cache_dir`` of the first evaluation: a probe on the same features skips the
    network (the cache itself is tested above)."""
    return ["--set", f"eval.cache_dir={study['root'] / 'eval-a' / 'features'}"]


def test_sgd_probe_on_random_crops_reports_its_heads_on_the_test_split(
    study: dict, evaluated: dict, scored
):
    """One augmented SGD evaluation (the probe's determinism and data order are pinned without
    the network, in ``test_the_probe_*``)."""
    args = ["--run-dir", str(study["out"]), "--set", "eval.method=sgd", *shared_cache(study)]
    args += ["--set", "eval.sgd.epochs=2", "--set", "eval.sgd.batch_size=64"]
    args += ["--set", "eval.sgd.augment=true", "--out", str(study["root"] / "sgd")]
    result = ssltk_eval(study, *args)
    assert result.exit_code == 0, result.output
    summary = json.loads((study["root"] / "sgd" / "metrics.json").read_text())
    assert (summary["method"], summary["split"]) == ("sgd", "test")
    assert_figures_score_the_test_split(study, summary["layers"], scored)
    pretrain_run = mlflow_store.client(f"sqlite:///{study['store']}").get_run(study["run_id"])
    for layer in LAYERS:
        for k in (1, 5):
            name = tracking.probe_metric("sgd", k, layer)
            assert pretrain_run.data.metrics[name] == summary["layers"][layer][f"top{k}"]


def test_mlp_probe_on_cached_features_learns_above_chance(study: dict, evaluated: dict, scored):
    out = study["root"] / "mlp"
    args = ["--run-dir", str(study["out"]), "--out", str(out), "--set", "eval.method=mlp"]
    args += shared_cache(study)
    args += ["--set", "eval.mlp.epochs=30", "--set", "eval.mlp.batch_size=64"]
    args += ["--set", "eval.mlp.augment=false", "--set", "eval.mlp.decay_epochs=[20]"]
    result = ssltk_eval(study, *args)
    assert result.exit_code == 0, result.output
    layers = json.loads((out / "metrics.json").read_text())["layers"]
    assert set(layers) == set(LAYERS)
    assert_figures_score_the_test_split(study, layers, scored)
    # 10 classes: chance is 10 % top-1 and 50 % top-5.
    assert max(f["top1"] for f in layers.values()) > 0.15


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(study: dict, evaluated: dict, tmp_path: Path):
    unknown = one_line_error(ssltk_eval(study, "--run-id", "0" * 32))
    assert "no such run" in unknown

    eval_run = evaluated["run_id"]
    assert "not a pretraining run" in one_line_error(ssltk_eval(study, "--run-id", eval_run))

    layer = one_line_error(
        ssltk_eval(study, "--run-dir", str(study["out"]), "--set", "eval.layers=[fc6]")
    )
    assert "'fc6'" in layer and "pre_logits" in layer and "block4" in layer

    assert "eval.method" in one_line_error(
        ssltk_eval(study, "--run-dir", str(study["out"]), "--set", "eval.method=svm")
    )
    assert "exactly one" in one_line_error(ssltk_eval(study))

    # A run still running is not evaluated; one that finished without a checkpoint artifact fails.
    config = load_config(study["params"])
    bare = tracking.start_pretrain_run(config, data_hash="x", device="cpu")
    assert "is running in the store" in one_line_error(ssltk_eval(study, "--run-id", bare.run_id))
    bare.finish("FINISHED")
    assert "no checkpoint" in one_line_error(ssltk_eval(study, "--run-id", bare.run_id))

    # A checkpoint whose bytes no longer match their sidecar.
    copy = tmp_path / "run"
    copy.mkdir()
    record = json.loads((study["out"] / "run.json").read_text())
    ckpt = study["out"] / record["checkpoint"]
    bad = copy / ckpt.name
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    sidecar_path(bad).write_text(sidecar_path(ckpt).read_text())
    (copy / "run.json").write_text(json.dumps({**record, "checkpoint": str(bad)}))
    assert "SHA-256" in one_line_error(ssltk_eval(study, "--run-dir", str(copy)))

    # A tracking store that cannot be read.
    folder = tmp_path / "store.db"
    folder.mkdir()
    store = one_line_error(
        ssltk_eval(
            study, "--run-dir", str(study["out"]), "--set", f"tracking.uri=sqlite:///{folder}"
        )
    )
    assert "tracking.uri" in store


def test_pooled_sizes_match_the_paper_table_for_resnet50_k4_at_224():
    """Paper §4.2: after_root 11×11×64, block1 5×5×256, block2 4×4×512, block3 2×2×1024,
    block4 1×1×2048, pre_logits 2048 (max pooling to at most 9000 features)."""
    model = build_model("resnet50_v1", widening=4, num_classes=None).eval()
    with torch.no_grad():
        endpoints = model(torch.zeros(1, 3, 224, 224))
    expected = {
        "after_root": (64, 11, 11),
        "block1": (256, 5, 5),
        "block2": (512, 4, 4),
        "block3": (1024, 2, 2),
        "block4": (2048, 1, 1),
        "pre_logits": (2048,),
    }
    pool = make_pool(9000, "max")
    for layer, shape in expected.items():
        got = endpoints[layer]
        assert pooled_shape(tuple(got.shape[1:]), 9000) == shape, layer
        assert pool(got).shape == (1, int(np.prod(shape))), layer


def test_the_eval_command_runs_as_a_process(study: dict):
    """What DVC calls: a subprocess with the run directory, exit 0 and a one-line summary."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ssltk",
            "eval",
            "--params",
            str(study["params"]),
            "--run-dir",
            str(study["out"]),
            "--set",
            "eval.layers=[pre_logits]",
        ],
        cwd=study["root"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("eval rotation-resnet50_v1-w1: lbfgs top-1 on test")
    assert (study["out"] / "eval" / "metrics.json").is_file()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_the_mlflow_ui_finds_pretraining_runs_with_their_probe_metrics(
    study: dict, evaluated: dict
):
    """What the UI's compare view reads: ``runs/search`` on ``mlflow server`` over the store."""
    import time
    import urllib.request

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{study['store']}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=study["root"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, "mlflow server exited"
                assert time.monotonic() < deadline, "mlflow server did not start in 120 s"
                time.sleep(0.5)
        with urllib.request.urlopen(
            f"{base}/experiments/get-by-name?experiment_name=eval-test", timeout=10
        ) as reply:
            experiment_id = json.load(reply)["experiment"]["experiment_id"]
        query = json.dumps(
            {
                "experiment_ids": [experiment_id],
                "filter": f"tags.`{tracking.TAG_KIND}` = 'pretrain'",
            }
        ).encode()
        request = urllib.request.Request(
            f"{base}/runs/search", data=query, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            runs = json.load(reply)["runs"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    found = {run["info"]["run_id"]: run for run in runs}
    assert study["run_id"] in found
    metrics = {m["key"]: m["value"] for m in found[study["run_id"]]["data"]["metrics"]}
    tags = {t["key"]: t["value"] for t in found[study["run_id"]]["data"]["tags"]}
    for layer in LAYERS:
        name = tracking.probe_metric("lbfgs", 1, layer)
        assert metrics[name] == evaluated["layers"][layer]["top1"]
    assert (tags[tracking.TAG_TASK], tags[tracking.TAG_ARCH], tags[tracking.TAG_WIDENING]) == (
        "rotation",
        "resnet50_v1",
        "1",
    )


def test_a_cache_hit_skips_the_network(study: dict, tmp_path: Path):
    class Counting(torch.nn.Module):
        """A stand-in task: two endpoints of pixel means, counting its calls."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))
            self.calls = 0

        def representation(self, images, layers, *, pool=None, keys=None):
            self.calls += 1
            x = images.float().mean(dim=(2, 3))
            out = {"a": x * self.weight, "b": x[:, :1]}
            return {name: out[name] for name in layers}

    split = PreparedDataset.open(load_config(study["params"]).data.prepared_dir).split("val")
    cache, task = FeatureCache(tmp_path), Counting()
    identity = {"weights": "ab" * 32, "data_hash": "d"}
    kwargs = dict(identity=identity, cache=cache, batch_size=16, max_features=9000, progress=False)
    first = extract_features(task, split, ["a", "b"], **kwargs)
    calls = task.calls
    assert calls == -(-len(split) // 16) and not first.cached
    second = extract_features(task, split, ["a", "b"], **kwargs)
    assert task.calls == calls and second.cached
    for layer in ("a", "b"):
        np.testing.assert_array_equal(second.layers[layer], first.layers[layer])
    assert second.layers["a"].shape == (len(split), 3) and second.layers["b"].shape[1] == 1


# --------------------------------------------------------------------------------------------------
# Each figure belongs to the split, features and data order it claims


def cached_features(study: dict, evaluated: dict, split: str, layer: str) -> np.ndarray:
    folder = study["root"] / "eval-a" / "features" / evaluated["weights_sha256"][:16]
    return np.load(folder / f"{split}.{layer}.npy")


def test_reported_figures_are_the_train_fit_scored_on_the_test_split(study: dict, evaluated):
    """A refit from the cached arrays: the same L-BFGS path on the train rows, chosen on the val
    rows, scored on the test rows, gives exactly the figures evaluation reported; the cached
    rows are each split's own images (their sizes, and the first test images recomputed)."""
    config = load_config(study["params"])
    data = PreparedDataset.for_config(config)
    splits = {name: data.split(name) for name in ("train", "val", "test")}
    sizes = {name: len(split) for name, split in splits.items()}
    assert sizes == {"train": 300, "val": 50, "test": 100}
    assert evaluated["split"] == "test"
    labels = {name: split.labels.numpy() for name, split in splits.items()}
    target = target_from_run_dir(config, study["out"])
    assert target.weights == evaluated["weights_sha256"]
    pool = make_pool(config.eval.max_features, config.eval.pooling)
    first = splits["test"].images(torch.arange(8))
    fresh = target.task.eval().representation(first, LAYERS, pool=pool)
    for layer in LAYERS:
        X = {name: cached_features(study, evaluated, name, layer) for name in splits}
        assert {name: len(x) for name, x in X.items()} == sizes, layer
        np.testing.assert_allclose(X["test"][:8], fresh[layer].numpy(), rtol=1e-4, atol=1e-5)
        path = lbfgs.fit_path(
            X["train"],
            labels["train"],
            X["val"],
            labels["val"],
            config.eval.lbfgs.l2,
            num_classes=10,
            max_iter=config.eval.lbfgs.max_iter,
        )
        test, val = path.score(X["test"], labels["test"]), path.score(X["val"], labels["val"])
        assert test.top1 != val.top1, "the fixture cannot tell the splits apart"
        figures = evaluated["layers"][layer]
        assert (figures["top1"], figures["top5"]) == (test.top1, test.top5), layer
        assert (figures["l2"], figures["val_top1"]) == (path.l2, val.top1), layer


def _changed(value):
    """Another value of the same kind (validation is bypassed: only the identity is read)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 + 0.125
    if isinstance(value, str):
        return value + "-changed"
    if value is None:
        return 3
    if isinstance(value, list):
        return [*value, value[-1]] if value else [1]
    raise TypeError(f"no rule to change {value!r}")


def _with(model, dotted: str, value):
    head, _, rest = dotted.partition(".")
    new = _with(getattr(model, head), rest, value) if rest else value
    return model.model_copy(update={head: new})


@pytest.fixture
def identity_of(monkeypatch, tmp_path: Path):
    """The feature-cache identity evaluation itself builds for a config, weights and data."""
    seen: list[dict] = []

    def spy(task, split, layers, *, identity, cache, **kwargs):
        # What the features are computed with must be what the identity says.
        assert (kwargs["pooling"], kwargs["max_features"]) == (
            identity["pooling"],
            identity["max_features"],
        )
        seen.append(dict(identity))
        return Features({}, np.zeros(0, dtype=np.int64), cached=False)

    monkeypatch.setattr(evaluation, "extract_features", spy)

    def identity_of(config: Config, weights: str = "a" * 64, data_hash: str = "d" * 64) -> dict:
        target = SimpleNamespace(config=config, weights=weights, task=None)
        with warnings.catch_warnings():  # serialising a bypassed-validation value warns
            warnings.simplefilter("ignore")
            evaluation._features(
                target, {"train": None}, ["pre_logits"], data_hash, tmp_path, "cpu", False
            )
        return seen.pop()

    return identity_of


def test_the_feature_cache_identity_changes_with_everything_the_features_depend_on(
    identity_of, tmp_path: Path
):
    base_config = Config()
    base = identity_of(base_config)
    assert (base["pooling"], base["max_features"]) == ("max", 9000)
    assert identity_of(_with(base_config, "eval.pooling", "avg"))["pooling"] == "avg"
    assert identity_of(Config()) == base  # a function of its inputs
    changes = {
        "eval.pooling=avg": identity_of(_with(base_config, "eval.pooling", "avg")),
        "eval.max_features": identity_of(_with(base_config, "eval.max_features", 4096)),
        "weights": identity_of(base_config, weights="b" * 64),
        "weights (past the first 16)": identity_of(base_config, weights="a" * 63 + "b"),
        "data hash": identity_of(base_config, data_hash="e" * 64),
    }
    flat = base_config.flat()
    keys = [k for k in flat if k.split(".")[0] in ("pretext", "model")]
    assert len(keys) > 20 and "pretext.preprocessing" in keys and "model.last_relu" in keys
    for key in keys:
        changes[key] = identity_of(_with(base_config, key, _changed(flat[key])))
    same = [name for name, identity in changes.items() if identity == base]
    assert not same, f"the identity ignores {same}"

    # The cache compares the whole identity: every changed identity misses, the base one hits.
    cache = FeatureCache(tmp_path / "cache")
    writer = cache.writer(base, "train", "pre_logits", (2, 3))
    writer.array[:] = 1.0
    writer.commit()
    assert cache.load(base, "train", "pre_logits") is not None
    hits = [
        name
        for name, identity in changes.items()
        if cache.load(identity, "train", "pre_logits") is not None
    ]
    assert not hits, f"a cache hit although {hits} changed"

    # What only the probe reads keeps the features: a second evaluation reuses them.
    for key, value in [
        ("eval.method", "sgd"),
        ("eval.report_split", "val"),
        ("eval.batch_size", 7),
        ("eval.layers", ["block1"]),
        ("seed", 1234),
    ]:
        assert identity_of(_with(base_config, key, value)) == base, key


class _ClassSortedSplit:
    """A stand-in train split of 64 rows sorted by class, 8 classes of 8 (as an ImageFolder
    tree lists them): an unshuffled batch of 16 holds two classes."""

    name = "train"
    num_classes = 8

    def __init__(self) -> None:
        self.labels = torch.arange(64) // 8

    def __len__(self) -> int:
        return 64

    def images(self, index: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(index), 3, 4, 4, dtype=torch.uint8)


class _RecordedRows:
    """Cached features that record the rows each step reads."""

    def __init__(self, array: np.ndarray, log: list) -> None:
        self.array, self.log = array, log

    def __getitem__(self, rows):
        self.log.append(np.asarray(rows).copy())
        return self.array[rows]


@pytest.mark.parametrize("method", ["sgd", "mlp"])
def test_the_probe_reads_every_row_once_per_epoch_in_a_fresh_seeded_shuffle(monkeypatch, method):
    steps: list[torch.Tensor] = []

    class RecordingTrainer(sgd.Trainer):
        def step(self, batch, step):
            steps.append(batch[1].clone())
            return super().step(batch, step)

    monkeypatch.setattr(sgd, "Trainer", RecordingTrainer)
    split = _ClassSortedSplit()
    features = np.eye(8, dtype=np.float32)[split.labels.numpy()]
    options = dict(epochs=3, batch_size=16, decay_epochs=[2], augment=False)
    config = SgdProbeConfig(**options) if method == "sgd" else MlpProbeConfig(**options, hidden=4)

    def rows_of(seed: int) -> list[np.ndarray]:
        log: list[np.ndarray] = []
        steps.clear()
        sgd.train_heads(
            split, {"a": 8}, config, seed=seed, features={"a": _RecordedRows(features, log)}
        )
        # The labels each step trains on are those of the rows it read.
        assert len(steps) == len(log)
        for rows, labels in zip(log, steps, strict=True):
            assert torch.equal(labels, split.labels[torch.from_numpy(rows)])
        return log

    log = rows_of(seed=5)
    assert len(log) == 3 * 4 and all(len(rows) == 16 for rows in log)
    epochs = [np.concatenate(log[e * 4 : (e + 1) * 4]) for e in range(3)]
    for e, order in enumerate(epochs):
        assert sorted(order.tolist()) == list(range(64)), f"epoch {e} is not a permutation"
        # Shuffled: a batch of 16 from 8 classes of 8 spans more than the two of sorted order.
        classes = [len(set((rows // 8).tolist())) for rows in log[e * 4 : (e + 1) * 4]]
        assert min(classes) >= 4, f"epoch {e}: classes per batch {classes}"
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # The order comes from the seed: the same seed repeats it, another seed does not.
    assert all(np.array_equal(a, b) for a, b in zip(rows_of(seed=5), log, strict=True))
    assert not np.array_equal(np.concatenate(rows_of(seed=6)[:4]), epochs[0])


@pytest.mark.parametrize("augment", [False, True])
def test_the_probe_heads_are_a_function_of_the_seed_alone(augment):
    """Same seed, same heads, whatever the caller's RNG stream; another seed, other heads. With
    ``augment`` the heads read ``represent`` of each batch's images and sample keys."""
    split = _ClassSortedSplit()
    features = np.eye(8, dtype=np.float32)[split.labels.numpy()]

    def represent(images, keys):
        assert keys is not None and len(keys) == len(images)
        base = torch.from_numpy(features[:1]).expand(len(images), 8)
        return {"a": base + (keys % 7).float()[:, None]}

    config = MlpProbeConfig(epochs=2, batch_size=16, decay_epochs=[1], augment=augment, hidden=4)

    def heads(seed: int, stream: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(stream)
        state = torch.get_rng_state()
        trained = sgd.train_heads(
            split, {"a": 8}, config, seed=seed, represent=represent, features={"a": features}
        )
        assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is left alone
        return trained.state_dict()

    first, again, other = heads(5, stream=1), heads(5, stream=2), heads(6, stream=1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_pooling_takes_the_maximum_or_the_mean_of_each_window(mode):
    """32 values to at most 8: stride ceil(sqrt(32 / 8)) = 2, so 2x2 windows (paper §4.2)."""
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4) ** 2
    windows = x.reshape(1, 2, 2, 2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(1, 2, 2, 2, 4)
    expected = windows.amax(-1) if mode == "max" else windows.mean(-1)
    assert torch.equal(make_pool(8, mode)(x), expected.flatten(1))
    assert torch.equal(make_pool(32, mode)(x), x.flatten(1))  # small enough: only flattened


# --------------------------------------------------------------------------------------------------
# Issue 20: every figure is the one its run earned; evaluation as fault-proof as pretraining


def the_error(result) -> str:
    """The one ``error:`` line of a failed eval, last, after at most its progress lines."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith(("features ", "probe "))]
    assert len(errors) == 1 and errors[0].startswith("error: ") and lines[-1] == errors[0], lines
    return errors[0]


def run_copy(study: dict, where: Path, state: dict | None = None, **record) -> Path:
    """A copy of the study's run directory (its checkpoint replaced by ``state``, its run.json
    updated by ``record``) naming the same MLflow run."""
    shutil.copytree(study["out"], where, ignore=shutil.ignore_patterns("eval", ".lock"))
    original = json.loads((where / "run.json").read_text())
    if state is not None:
        shutil.rmtree(where / "checkpoints")
        info = save_checkpoint(state, where / "checkpoints", original["global_step"])
        original["checkpoint"] = f"checkpoints/{info.path.name}"
        original["checkpoint_sha256"] = info.sha256
    (where / "run.json").write_text(json.dumps({**original, **record}))
    return where


def pretrain_metrics(study: dict) -> dict[str, float]:
    client = mlflow_store.client(f"sqlite:///{study['store']}")
    return client.get_run(study["run_id"]).data.metrics


def last_eval_run(study: dict):
    client = mlflow_store.client(f"sqlite:///{study['store']}")
    experiment = client.get_experiment_by_name("eval-test")
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{tracking.TAG_KIND}` = 'eval'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]


def test_nan_weights_end_in_one_line_naming_layer_and_split_and_write_nothing_back(
    study: dict, evaluated: dict, tmp_path: Path
):
    """Issue 20.1: NaN features once scored 100 % top-1 and were written back with exit 0."""
    state = load_checkpoint(study["out"] / "checkpoints" / "ckpt-00000004.pt")
    state["model"] = {
        k: v.float().fill_(float("nan")) if v.is_floating_point() else v
        for k, v in state["model"].items()
    }
    copy = run_copy(study, tmp_path / "diverged", state)
    before = pretrain_metrics(study)
    line = the_error(ssltk_eval(study, "--run-dir", str(copy), "--set", "eval.layers=[pre_logits]"))
    assert "non-finite features at layer pre_logits on split 'train'" in line
    assert pretrain_metrics(study) == before
    assert last_eval_run(study).info.status == "FAILED"
    assert not (copy / "eval" / "metrics.json").exists()


def test_a_corrupt_cached_array_fails_its_checksum_and_is_recomputed(study: dict, tmp_path: Path):
    """Issue 20.1: 4 KB of garbage in a cached .npy was read back as features."""
    split = PreparedDataset.open(load_config(study["params"]).data.prepared_dir).split("val")
    task = build_model("resnet50_v1", widening=1, num_classes=None).eval()

    class Task(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.calls = task, 0

        def representation(self, images, layers, *, pool=None, keys=None):
            self.calls += 1
            x = images.float().mean(dim=(2, 3))
            return {"mean": x}

    cache, probe = FeatureCache(tmp_path), Task()
    identity = {"weights": "cd" * 32, "data_hash": "d"}
    kwargs = dict(identity=identity, cache=cache, batch_size=64, max_features=9000, progress=False)
    first = np.array(extract_features(probe, split, ["mean"], **kwargs).layers["mean"])
    (array,) = tmp_path.rglob("val.mean.npy")
    data = bytearray(array.read_bytes())
    data[128 : 128 + 4096] = os.urandom(min(4096, len(data) - 128))
    array.write_bytes(bytes(data))
    calls = probe.calls
    again = extract_features(probe, split, ["mean"], **kwargs)
    assert not again.cached and probe.calls > calls
    np.testing.assert_array_equal(again.layers["mean"], first)


def test_topk_never_counts_a_nan_row_as_correct():
    logits = np.array([[np.nan, np.nan, np.nan], [1.0, 1.0, 1.0], [0.0, 2.0, np.nan]])
    labels = np.array([0, 1, 1])
    # NaN rows are wrong at any k; a three-way tie ranks the lower class first (class 1 second).
    assert lbfgs.topk_accuracy(logits, labels, 1) == 0.0
    assert lbfgs.topk_accuracy(logits, labels, 2) == pytest.approx(1 / 3)
    assert lbfgs.topk_accuracy(logits[1:2], labels[1:2], 1) == 0.0


def test_only_a_finished_runs_final_checkpoint_is_evaluated(
    study: dict, evaluated: dict, tmp_path: Path
):
    """Issue 20.2: a killed run's figures were written onto its pretraining run."""
    copy = run_copy(study, tmp_path / "killed", status="killed", global_step=2, total_steps=4)
    line = the_error(ssltk_eval(study, "--run-dir", str(copy)))
    assert "killed at step 2 of 4 by run.json" in line and "--unfinished" in line
    before = pretrain_metrics(study)
    forced = ssltk_eval(
        study, "--run-dir", str(copy), "--unfinished", "--set", "eval.layers=[pre_logits]"
    )
    assert forced.exit_code == 0, forced.output
    assert "kept off the pretraining run" in forced.output
    assert pretrain_metrics(study) == before
    eval_run = last_eval_run(study)
    assert "killed" in eval_run.data.tags[tracking.TAG_WEIGHTS_STATE]
    assert eval_run.data.metrics[tracking.probe_metric("lbfgs", 1, "pre_logits")] >= 0


def test_written_back_figures_carry_how_they_were_measured(study: dict, evaluated: dict):
    """Issue 20.3: probe figures on the pretraining run said nothing of split, pooling, probe."""
    client = mlflow_store.client(f"sqlite:///{study['store']}")
    tags = client.get_run(study["run_id"]).data.tags
    record = json.loads((study["out"] / "run.json").read_text())
    for layer in LAYERS:
        measured = json.loads(tags[tracking.probe_tag("lbfgs", layer)])
        assert measured["split"] == "test" and measured["pooling"] == "max"
        assert measured["max_features"] == 9000 and measured["method"] == "lbfgs"
        assert measured["probe"] == {"l2": [0.1, 0.01], "max_iter": 60, "tol": 1e-5}
        assert measured["weights_sha256"] == evaluated["weights_sha256"]
        assert measured["checkpoint_sha256"] == record["checkpoint_sha256"]
        assert measured["figures"] == ["top1", "top5", "val_top1"]


@contextmanager
def full_disk(folder: Path, size: str = "256k"):
    """``folder`` on a tiny tmpfs where mounting is allowed (root), else None: the caller then
    limits the file size as the pretraining test does (writes past it fail, as on a full disk)."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    mounted = shutil.which("mount") is not None and subprocess.run(mount).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


def _file_size_limit(limit: int):
    def limited() -> None:  # in the child, before exec: SIGXFSZ ignored, writes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return limited


def test_a_full_disk_during_eval_is_one_line_leaves_no_litter_and_fails_the_run(
    study: dict, tmp_path: Path
):
    """Issue 20.5: SIGBUS (exit 135), the disk full of .npy.tmp, the eval run left RUNNING."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    argv = [sys.executable, "-m", "ssltk", "eval", "--params", str(study["params"])]
    argv += ["--run-dir", str(study["out"]), "--out", str(out), "--set", "eval.layers=[block1]"]
    argv += ["--set", f"eval.cache_dir={cache}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with full_disk(cache) as mounted:
        done = subprocess.run(
            argv,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=None if mounted else _file_size_limit(3 << 20),  # the store fits
        )
        litter = [p for p in cache.rglob("*") if p.name.endswith(".tmp")]
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and done.stderr.strip().splitlines()[-1] == errors[0], done.stderr
    assert "cannot write the feature cache" in errors[0]
    if mounted:  # checked before any array is allocated: the size it needs and what is free
        assert "of train to" in errors[0] and "MiB free" in errors[0]
    else:  # free space looks ample; allocating the array hits the file size limit
        assert "train.block1.npy" in errors[0] and "File too large" in errors[0]
    assert litter == []
    record = json.loads((out / "eval.json").read_text())
    client = mlflow_store.client(f"sqlite:///{study['store']}")
    assert record["status"] == "failed"
    assert client.get_run(record["run_id"]).info.status == "FAILED"


def test_a_killed_eval_leaves_no_temporary_files_and_its_run_is_marked_killed(
    study: dict, tmp_path: Path
):
    """Issue 20.6: after SIGKILL, .npy.tmp files stayed and the eval run stayed RUNNING."""
    out = tmp_path / "out"
    argv = [
        sys.executable,
        "-m",
        "ssltk",
        "eval",
        "--params",
        str(study["params"]),
        "--run-dir",
        str(study["out"]),
        "--out",
        str(out),
        "--set",
        "eval.layers=[pre_logits]",
        "--set",
        "eval.batch_size=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not list(out.rglob("*.npy.tmp")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert list(out.rglob("*.npy.tmp")), "extraction never started"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    dead = json.loads((out / "eval.json").read_text())["run_id"]
    client = mlflow_store.client(f"sqlite:///{study['store']}")
    assert client.get_run(dead).info.status == "RUNNING"
    again = ssltk_eval(
        study,
        "--run-dir",
        str(study["out"]),
        "--out",
        str(out),
        "--set",
        "eval.layers=[pre_logits]",
    )
    assert again.exit_code == 0, again.output
    assert client.get_run(dead).info.status == "KILLED"
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize(
    ("text", "culprit"),
    [
        ("[1, 2]", "expected a JSON object, found list"),
        ('{"run_id": 5}', "run_id: input should be a valid string (found 5)"),
        ('{"status": "finished", "run_id": "r", "checkpoint": ["x"]}', "checkpoint:"),
    ],
)
def test_run_json_of_the_wrong_types_is_one_line(study: dict, tmp_path: Path, text, culprit):
    """Issue 20.7: wrong JSON types in run.json were 39–53-line tracebacks."""
    (tmp_path / "run.json").write_text(text)
    line = the_error(ssltk_eval(study, "--run-dir", str(tmp_path)))
    assert str(tmp_path / "run.json") in line and culprit in line


def test_run_json_names_its_checkpoint_relative_to_a_moved_run_directory(
    study: dict, tmp_path: Path, monkeypatch
):
    """Issue 20.8: run.json held the checkpoint relative to where pretraining ran."""
    from ssltk.train.rundir import read_run_record

    record = json.loads((study["out"] / "run.json").read_text())
    assert record["checkpoint"] == "checkpoints/ckpt-00000004.pt"
    moved = run_copy(study, tmp_path / "moved")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert read_run_record(moved).checkpoint_path(moved) == moved / record["checkpoint"]
    target = target_from_run_dir(load_config(study["params"]), moved)
    assert target.checkpoint_sha256 == record["checkpoint_sha256"]
    # A record of an older version (absolute path) still finds the file of a moved directory.
    legacy = {**record, "checkpoint": str(tmp_path / "gone" / "ckpt-00000004.pt")}
    (moved / "run.json").write_text(json.dumps(legacy))
    assert target_from_run_dir(load_config(study["params"]), moved).weights == target.weights


class _Exploit:
    def __reduce__(self):
        return (os.system, ("true",))


def test_a_pickled_object_checkpoint_is_one_line(study: dict, tmp_path: Path):
    """Issue 20.10: refused in three lines quoting torch's advice to set weights_only=False."""
    copy = run_copy(study, tmp_path / "evil")
    evil = copy / "checkpoints" / "ckpt-00000004.pt"
    torch.save({"format": 1, "model": _Exploit()}, evil)
    sidecar_path(evil).write_text(f"{sha256_file(evil)}  {evil.name}\n")
    record = json.loads((copy / "run.json").read_text())
    record.update(checkpoint=str(evil), checkpoint_sha256=sha256_file(evil))
    (copy / "run.json").write_text(json.dumps(record))
    line = the_error(ssltk_eval(study, "--run-dir", str(copy)))
    assert "refused" in line and "weights_only" not in line
