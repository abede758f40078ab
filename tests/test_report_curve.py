"""``ssltk report`` reads a bounded number of points of each loss curve from the store."""

from __future__ import annotations

from pathlib import Path

from mlflow.entities import Metric

from ssltk import store
from ssltk.report.results import CURVE_POINTS, loss_curve


def test_a_long_loss_curve_is_read_as_at_most_curve_points_with_its_ends(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = store.client(uri)
    run_id = client.create_run(store.ensure_experiment(client, "curve", uri)).info.run_id
    steps = range(0, 5 * CURVE_POINTS, 2)  # 2.5× the bound
    metrics = [Metric("train/loss", 10.0 - s / 1000, 0, s) for s in steps]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000], synchronous=True)
    curve = loss_curve(client, run_id)
    assert 0.9 * CURVE_POINTS <= len(curve) <= CURVE_POINTS
    assert curve[0] == (0, 10.0) and curve[-1] == (steps[-1], 10.0 - steps[-1] / 1000)
    assert [s for s, _ in curve] == sorted({s for s, _ in curve})  # sampled, in order
