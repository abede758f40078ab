"""The L-BFGS linear probe: scikit-learn's optimum on real features, determinism, the L2 path,
chunked streaming, top-5 and train-only standardisation."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from ssltk.config import DataConfig
from ssltk.data.sources import EncodedSplit, decode_image, open_source
from ssltk.evaluate import lbfgs
from ssltk.models import build_model

Features = tuple[np.ndarray, np.ndarray]


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Small matmuls gain nothing from threads, and on a busy machine threaded BLAS stalls."""
    with threadpool_limits(limits=1):
        yield


def _per_class(labels: np.ndarray, start: int, count: int) -> np.ndarray:
    """Indices of items ``start .. start + count`` of every class, in class order."""
    return np.concatenate([np.flatnonzero(labels == c)[start : start + count] for c in range(10)])


@pytest.fixture(scope="module")
def features() -> dict[str, Features]:
    """Global-average-pooled ``pre_logits`` (512-d) of a seeded random ResNet50 k=1 on real
    CIFAR-10 images of the shipped demo archive: train 400, val 200, test 200 (balanced)."""
    source = open_source(DataConfig(source="demo"))
    picks = {
        "train": ("train", _per_class(source.splits["train"].labels, 0, 40)),
        "val": ("train", _per_class(source.splits["train"].labels, 40, 20)),
        "test": ("test", _per_class(source.splits["test"].labels, 0, 20)),
    }
    torch.manual_seed(0)
    model = build_model("resnet50_v1", widening=1, num_classes=None).eval()
    out = {}
    for name, (split_name, index) in picks.items():
        split = source.splits[split_name]
        assert isinstance(split, EncodedSplit) and split.blobs is not None
        images = np.stack([decode_image(split.blobs[i], 32) for i in index])
        with torch.no_grad():
            x = model(torch.from_numpy(images).float() / 127.5 - 1.0)["pre_logits"]
        out[name] = (x.flatten(1).numpy().astype(np.float32), split.labels[index].copy())
    return out


def objective(probe: lbfgs.LinearProbe, X: np.ndarray, y: np.ndarray, l2: float) -> float:
    """Mean cross-entropy + l2/2 ‖W‖² in float64, written independently of the module."""
    return _objective(probe.standardizer, probe.weight, probe.bias, X, y, l2)


def _objective(std, weight, bias, X, y, l2) -> float:
    z = ((X - std.mean) / std.scale) @ weight + bias
    z -= z.max(axis=1, keepdims=True)
    ce = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]
    return float(ce.mean() + 0.5 * l2 * np.sum(weight**2))


@pytest.mark.parametrize("l2", [1e-1, 1e-3])
def test_reaches_sklearn_objective_and_accuracy(features: dict[str, Features], l2: float) -> None:
    (X, y), (test_X, test_y) = features["train"], features["test"]
    ours = lbfgs.fit(X, y, l2)
    std = ours.standardizer
    Xs = (X - std.mean) / std.scale
    # sklearn: C·Σ CE + ½‖W‖² (1.9: mean CE + ½/(C·n)‖W‖²), our optimum at C = 1/(l2·n).
    sk = LogisticRegression(C=1.0 / (l2 * len(X)), tol=1e-10, max_iter=10_000).fit(Xs, y)
    f_ours = objective(ours, X, y, l2)
    f_sk = _objective(std, sk.coef_.T, sk.intercept_, X, y, l2)
    assert abs(f_ours - f_sk) <= 1e-4 * f_sk, (f_ours, f_sk)
    assert ours.loss == pytest.approx(f_ours, rel=1e-5)  # the float32 matmuls cost no accuracy
    sk_acc = sk.score((test_X - std.mean) / std.scale, test_y)
    assert abs(ours.score(test_X, test_y).top1 - sk_acc) <= 0.005
    assert ours.converged
    # The preconditioner changes the path L-BFGS takes, not the minimiser.
    plain = lbfgs.fit(X, y, l2, precondition=False)
    assert abs(objective(plain, X, y, l2) - f_sk) <= 1e-4 * f_sk
    # So does the low-rank one the CPU uses above PRECONDITION_MAX_FEATURES (rank 256 of 512).
    low_rank = lbfgs.fit(X, y, l2, precondition="low_rank")
    assert abs(objective(low_rank, X, y, l2) - f_sk) <= 1e-4 * f_sk
    assert low_rank.converged


def test_same_inputs_give_bit_identical_outputs(features: dict[str, Features]) -> None:
    runs = [
        lbfgs.fit_path(*features["train"], *features["val"], [1e-1, 1e-2], max_iter=50)
        for _ in range(2)
    ]
    for a, b in zip(runs[0].points, runs[1].points, strict=True):
        assert np.array_equal(a.probe.weight, b.probe.weight)
        assert np.array_equal(a.probe.bias, b.probe.bias)
        assert a.val == b.val and a.probe.loss == b.probe.loss


def test_path_warm_starts_to_each_optimum_and_picks_the_best_val_l2(
    features: dict[str, Features],
) -> None:
    (X, y), (val_X, val_y) = features["train"], features["val"]
    l2s = [1e-2, 1e3, 1e-1]  # any order; 1e3 shrinks W to ~0 and loses on val
    path = lbfgs.fit_path(X, y, val_X, val_y, l2s)
    assert [p.l2 for p in path.points] == [1e3, 1e-1, 1e-2]  # strong → weak
    tops = [p.val.top1 for p in path.points]
    assert path.l2 == path.points[int(np.argmax(tops))].l2 != 1e3
    assert path.points[0].val.top1 < max(tops)
    for point in path.points:
        assert point.val == point.probe.score(val_X, val_y)
        cold = lbfgs.fit(X, y, point.l2)
        assert objective(point.probe, X, y, point.l2) == pytest.approx(
            objective(cold, X, y, point.l2), rel=1e-4
        )
    # The chosen point is the fit on train at the chosen strength, reported on any split.
    assert path.score(*features["test"]) == path.probe.score(*features["test"])


def test_ties_on_val_choose_the_stronger_l2(features: dict[str, Features]) -> None:
    (X, y), (val_X, val_y) = features["train"], features["val"]
    # Class 0 is 4x as frequent as the others; at these strengths W is ~0, so both fits predict
    # class 0 (the bias, log prior) everywhere: all of class 0's val images are right, for both.
    keep = (y == 0) | (np.arange(len(y)) % 4 == 0)
    path = lbfgs.fit_path(X[keep], y[keep], val_X[val_y == 0], val_y[val_y == 0], [1e6, 1e7])
    assert [p.val.top1 for p in path.points] == [1.0, 1.0]
    assert path.l2 == 1e7


def test_memory_mapped_features_stream_in_chunks_to_the_same_probe(
    features: dict[str, Features], tmp_path: Path
) -> None:
    X, y = features["train"]
    np.save(tmp_path / "X.npy", X)
    mapped = np.load(tmp_path / "X.npy", mmap_mode="r")
    whole = lbfgs.fit(X, y, 1e-2, chunk_rows=len(X))
    streamed = lbfgs.fit(mapped, y, 1e-2, chunk_rows=37, resident=False)
    # Standardised once into memory or every pass from disk: the same float32 chunks, bit for bit.
    once = lbfgs.fit(mapped, y, 1e-2, chunk_rows=37)
    assert np.array_equal(once.weight, streamed.weight) and once.loss == streamed.loss
    np.testing.assert_allclose(streamed.standardizer.mean, whole.standardizer.mean, rtol=1e-12)
    np.testing.assert_allclose(streamed.standardizer.scale, whole.standardizer.scale, rtol=1e-12)
    assert streamed.loss == pytest.approx(whole.loss, rel=1e-5)
    np.testing.assert_allclose(streamed.weight, whole.weight, rtol=1e-2, atol=1e-4)
    np.testing.assert_array_equal(streamed.predict(mapped), whole.predict(X))


def test_streaming_peak_memory_is_a_chunk_not_the_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(16_384, 128)).astype(np.float32)  # 8 MiB
    y = rng.integers(0, 10, size=len(X))
    np.save(tmp_path / "X.npy", X)
    mapped = np.load(tmp_path / "X.npy", mmap_mode="r")
    tracemalloc.start()
    probe = lbfgs.fit(mapped, y, 1e-2, max_iter=3, chunk_rows=512, resident=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < X.nbytes / 4, peak
    tracemalloc.start()
    lbfgs.fit(X, y, 1e-2, max_iter=3, chunk_rows=512)
    _, peak_in_memory = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak_in_memory >= X.nbytes  # in memory: one standardised float32 copy, by design
    assert probe.n_iter <= 3


def test_topk_ranks_the_label_and_breaks_ties_like_argmax() -> None:
    logits = np.array(
        [
            [0.0, 5.0, 4.0, 3.0, 2.0, 1.0, -1.0],  # label 0: rank 5 → top-5 miss, top-6 hit
            [9.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # label 0: rank 0
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # all equal: label 3 ranks after 0, 1, 2
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # label 0 ranks first, like argmax
        ]
    )
    labels = np.array([0, 0, 3, 0])
    assert lbfgs.topk_accuracy(logits, labels, 1) == 0.5
    assert lbfgs.topk_accuracy(logits, labels, 5) == 0.75
    assert lbfgs.topk_accuracy(logits, labels, 6) == 1.0


def test_score_top5_matches_a_sort_of_the_logits(features: dict[str, Features]) -> None:
    probe = lbfgs.fit(*features["train"], 1e-2)
    test_X, test_y = features["test"]
    logits = probe.logits(test_X)
    top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    expected = float((top5 == test_y[:, None]).any(axis=1).mean())
    score = probe.score(test_X, test_y)
    assert score.top5 == expected
    assert score.top1 == float((probe.predict(test_X) == test_y).mean())
    assert score.top1 < score.top5 < 1.0


def test_standardisation_uses_train_statistics_only(features: dict[str, Features]) -> None:
    (X, y), (val_X, val_y) = features["train"], features["val"]
    X = X.copy()
    X[:, 3] = 7.25  # constant on train: standardises to exactly 0, its weights to ~0
    path = lbfgs.fit_path(X, y, val_X * 100 + 50, val_y, [1e-2], max_iter=30)
    std = path.probe.standardizer
    train64 = X.astype(np.float64)
    constant = np.ptp(X, axis=0) == 0  # column 3, and ReLU units dead on every train image
    assert constant[3]
    np.testing.assert_allclose(std.mean, np.where(constant, X[0], train64.mean(0)), rtol=1e-9)
    np.testing.assert_allclose(std.scale, np.where(constant, 1.0, train64.std(0)), rtol=1e-9)
    assert not np.any(std.transform(X)[:, constant])
    assert np.abs(path.probe.weight[constant]).max() < 1e-12  # 0 up to the basis rounding
    # Standardisation makes the probe blind to a per-feature affine change of the inputs.
    scale = np.linspace(0.5, 4.0, X.shape[1], dtype=np.float32)
    shifted = lbfgs.fit(X * scale - 3.0, y, 1e-2)
    plain = lbfgs.fit(X, y, 1e-2)
    assert shifted.loss == pytest.approx(plain.loss, rel=1e-5)
    test_X = features["test"][0]
    agree = np.mean(shifted.predict(test_X * scale - 3.0) == plain.predict(test_X))
    assert agree >= 0.99


def test_numpy_arrays_use_numpy() -> None:
    assert lbfgs.array_module(np.zeros(3)) is np


@pytest.mark.cuda
def test_cupy_features_give_the_numpy_probe(features: dict[str, Features]) -> None:
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("CuPy finds no GPU")
    except cupy.cuda.runtime.CUDARuntimeError as err:
        pytest.skip(f"CuPy finds no usable GPU ({err})")
    (X, y), (val_X, val_y) = features["train"], features["val"]
    on_gpu = lbfgs.fit_path(
        cupy.asarray(X), cupy.asarray(y), cupy.asarray(val_X), cupy.asarray(val_y), [1e-1, 1e-2]
    )
    on_cpu = lbfgs.fit_path(X, y, val_X, val_y, [1e-1, 1e-2])
    assert on_gpu.l2 == on_cpu.l2
    assert on_gpu.probe.loss == pytest.approx(on_cpu.probe.loss, rel=1e-5)
    np.testing.assert_allclose(on_gpu.probe.weight, on_cpu.probe.weight, rtol=1e-2, atol=1e-4)
