"""MLflow conventions: experiment, artifact location, params, tags, resume, failure, quietness."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssltk import store as mlflow_store
from ssltk import tracking
from ssltk.config import Config, dump_config, load_config
from ssltk.errors import UserError
from ssltk.evaluate.target import fetch_checkpoint
from ssltk.train.checkpoint import save_checkpoint, sidecar_path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlflow") / "mlflow.db"


def config_for(store: Path, *overrides: str) -> Config:
    return load_config(
        None,
        [
            f"tracking.uri=sqlite:///{store}",
            "tracking.experiment=unit study",
            "pretext.task=jigsaw",
            "model.arch=revnet50",
            "model.widening=2",
            *overrides,
        ],
    )


def test_names():
    config = config_for(Path("/x.db"))
    assert tracking.run_name(config) == "jigsaw-revnet50-w2"
    assert tracking.probe_metric("lbfgs", 1, "pre_logits") == "probe/lbfgs/top1/pre_logits"
    assert tracking.train_metric("loss") == "train/loss"
    assert tracking.epoch_metric("accuracy") == "epoch/accuracy"
    assert tracking.param_value("rotation") == "rotation"
    assert tracking.param_value([15, 25]) == "[15, 25]"
    assert tracking.param_value(None) == "null" and tracking.param_value(True) == "true"


def test_artifacts_of_a_sqlite_store_live_beside_it():
    assert mlflow_store.artifact_location("sqlite:////data/p/mlflow.db", "my study/1") == (
        "file:///data/p/mlruns/my_study_1"
    )
    assert mlflow_store.artifact_location("http://localhost:5000", "x") is None


@pytest.mark.parametrize("name", ["..", ".", "../../etc", "/abs/..", ".hidden", "a/../.."])
def test_an_experiment_name_never_puts_artifacts_outside_mlruns(tmp_path: Path, name: str):
    """Issue 20.9: ``tracking.experiment=..`` put a run's artifacts beside the store's folder."""
    root = (tmp_path / "mlruns").resolve()
    location = mlflow_store.artifact_location(f"sqlite:///{tmp_path / 'mlflow.db'}", name)
    folder = Path(location.removeprefix("file://"))
    assert folder.parent == root and not folder.name.startswith(".")


def test_the_store_is_created_quietly(store: Path, capfd):
    uri = f"sqlite:///{store}"
    client = mlflow_store.client(uri)
    experiment_id = mlflow_store.ensure_experiment(client, "quiet", uri)
    assert mlflow_store.ensure_experiment(client, "quiet", uri) == experiment_id
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert store.is_file()


def test_pretrain_run_records_params_tags_and_config(store: Path):
    config = config_for(store)
    run = tracking.start_pretrain_run(config, data_hash="abc123", device="cpu")
    got = run.client.get_run(run.run_id)
    assert got.info.status == "RUNNING"
    flat = config.flat()
    sections = {"seed", "data", "model", "pretext", "pretrain"}
    expected = {k: tracking.param_value(v) for k, v in flat.items() if k.split(".")[0] in sections}
    assert got.data.params == expected and "pretrain.epochs" in expected and "seed" in expected
    assert not [k for k in got.data.params if k.startswith(("eval.", "study.", "tracking."))]
    assert any(k.startswith("eval.") for k in flat) and any(k.startswith("study.") for k in flat)
    tags = got.data.tags
    assert tags[tracking.TAG_KIND] == "pretrain"
    assert (tags["ssltk.task"], tags["ssltk.arch"], tags["ssltk.widening"]) == (
        "jigsaw",
        "revnet50",
        "2",
    )
    assert tags[tracking.TAG_DATA_HASH] == "abc123" and tags[tracking.TAG_DEVICE] == "cpu"
    assert tags["ssltk.version.torch"] == torch.__version__
    assert {"ssltk.version.numpy", "ssltk.version.triton", "ssltk.version.python"} <= set(tags)
    assert len(tags[tracking.TAG_GIT_COMMIT]) in (40, len("unknown"))
    assert tags["mlflow.runName"] == "jigsaw-revnet50-w2"
    experiment = run.client.get_experiment(run.experiment_id)
    assert experiment.name == "unit study"
    assert experiment.artifact_location == (store.parent / "mlruns" / "unit_study").as_uri()
    local = Path(run.client.download_artifacts(run.run_id, tracking.CONFIG_ARTIFACT))
    assert local.read_text() == dump_config(config)

    run.log_metrics([(0, {"train/loss": 2.0}), (1, {"train/loss": 1.5, "train/lr": 0.1})])
    history = run.client.get_metric_history(run.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(0, 2.0), (1, 1.5)]
    run.finish("FAILED", failure="loss is nan at step 3")
    got = run.client.get_run(run.run_id)
    assert got.info.status == "FAILED"
    assert got.data.tags[tracking.TAG_FAILURE] == "loss is nan at step 3"


def test_resume_reopens_the_run_and_notes_changed_params(store: Path):
    first = tracking.start_pretrain_run(config_for(store), data_hash="h", device="cpu")
    first.finish("KILLED")
    longer = config_for(store, "pretrain.epochs=50")
    again = tracking.start_pretrain_run(
        longer, data_hash="h", device="cpu", resume_run_id=first.run_id
    )
    assert again.run_id == first.run_id
    got = again.client.get_run(again.run_id)
    assert got.info.status == "RUNNING"
    assert got.data.params["pretrain.epochs"] == "35"  # params are write-once
    assert got.data.tags[f"{tracking.TAG_RESUMED_PREFIX}pretrain.epochs"] == "50"


def test_a_stale_running_attempt_is_marked_killed(store: Path):
    config = config_for(store)
    stale = tracking.start_pretrain_run(config, data_hash="h", device="cpu")
    fresh = tracking.start_pretrain_run(
        config, data_hash="h", device="cpu", stale_run_id=stale.run_id
    )
    assert fresh.run_id != stale.run_id
    assert fresh.client.get_run(stale.run_id).info.status == "KILLED"
    unknown = tracking.start_pretrain_run(
        config, data_hash="h", device="cpu", resume_run_id="0" * 32
    )
    assert unknown.run_id not in (stale.run_id, fresh.run_id)


def test_checkpoint_artifact_round_trip(store: Path, tmp_path: Path):
    run = tracking.start_pretrain_run(config_for(store), data_hash="h", device="cpu")
    info = save_checkpoint({"w": torch.arange(4.0)}, tmp_path / "ckpts", 12)
    run.log_artifact(info.path, tracking.CHECKPOINT_ARTIFACT_DIR)
    run.log_artifact(sidecar_path(info.path), tracking.CHECKPOINT_ARTIFACT_DIR)
    fetched = fetch_checkpoint(run.client, run.run_id, tmp_path / "fetched")
    assert fetched.name == "ckpt-00000012.pt"
    assert fetched.read_bytes() == info.path.read_bytes()


def test_eval_run_points_at_its_pretraining_run(store: Path):
    config = config_for(store, "eval.method=sgd")
    pretrain = tracking.start_pretrain_run(config, data_hash="d", device="cpu")
    run = tracking.start_eval_run(
        config, pretrain.run_id, device="cuda:0", data_hash="d", splits=["train", "test"]
    )
    got = run.client.get_run(run.run_id)
    tags = got.data.tags
    assert tags[tracking.TAG_KIND] == "eval"
    assert tags[tracking.TAG_PRETRAIN_RUN_ID] == pretrain.run_id
    assert (tags[tracking.TAG_TASK], tags[tracking.TAG_DATA_HASH]) == ("jigsaw", "d")
    assert tags["mlflow.runName"] == "eval-jigsaw-revnet50-w2" and tags["ssltk.device"] == "cuda:0"
    assert got.data.params["eval.method"] == "sgd"
    assert all(key.startswith("eval.") for key in got.data.params)

    back = tracking.open_run(config, pretrain.run_id)
    metric = tracking.probe_metric("sgd", 1, "pre_logits")
    back.log_metrics([(0, {metric: 0.42})])
    assert run.client.get_run(pretrain.run_id).data.metrics[metric] == 0.42
    with pytest.raises(UserError, match="no such run"):
        tracking.start_eval_run(config, "f" * 32, device="cpu", data_hash="d", splits=["train"])


def test_an_unwritable_sqlite_store_is_a_one_line_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot create"):
        mlflow_store.client(f"sqlite:///{blocker / 'store.db'}")
    folder = tmp_path / "store.db"
    folder.mkdir()
    with pytest.raises(UserError, match="cannot be opened for writing"):
        mlflow_store.client(f"sqlite:///{folder}")
    fresh = tmp_path / "new" / "store.db"
    mlflow_store.client(f"sqlite:///{fresh}")
    assert fresh.parent.is_dir()
