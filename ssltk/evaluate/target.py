"""What an evaluation reads: a pretraining run's task with its trained weights, or a random init.

A pretraining run is found in the tracking store by id (``--run-id``) or through its run
directory's ``run.json`` (``--run-dir``). The task is rebuilt from the run's own resolved config
(its ``config/params.yaml`` artifact), so today's params.yaml cannot change what is evaluated;
only the ``eval`` and ``tracking`` sections and ``data.prepared_dir`` come from today's config
(``eval.data`` names another dataset to evaluate on: :mod:`ssltk.evaluate.eval_data`).

Only a finished run's final checkpoint is evaluated (``FINISHED`` in the store and ``finished``
in run.json); another state needs ``allow_unfinished`` and is recorded on the target, whose
figures then stay on the eval run, never on the pretraining run.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ssltk import store, tracking
from ssltk.config import Config, config_from_dict
from ssltk.errors import UserError
from ssltk.evaluate.features import weights_digest
from ssltk.pretext import PretextTask, build_task
from ssltk.train.checkpoint import (
    SIDECAR_SUFFIX,
    CheckpointError,
    load_checkpoint,
    sha256_file,
    verify_checkpoint,
)
from ssltk.train.determinism import seed_everything
from ssltk.train.rundir import RunRecord, read_run_record

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["EvalTarget", "baseline_target", "target_from_run_dir", "target_from_run_id"]


@dataclass
class EvalTarget:
    """A task ready for feature extraction and the facts an evaluation run records."""

    config: Config
    task: PretextTask
    kind: str  # tracking.KIND_EVAL or tracking.KIND_BASELINE
    weights: str  # digest of the backbone's state (the feature cache key)
    pretrain_run_id: str | None = None
    checkpoint_sha256: str | None = None
    #: None for a finished run's final checkpoint (or a baseline), else what the weights are.
    unfinished: str | None = None
    #: Content hash of the data the run was pretrained on (None for a baseline).
    data_hash: str | None = None

    @property
    def name(self) -> str:
        return tracking.run_name(self.config)


def _build(config: Config) -> PretextTask:
    try:
        return build_task(config)
    except ValueError as err:
        raise UserError(f"model/pretext: {err}") from None


def baseline_target(config: Config) -> EvalTarget:
    """A randomly initialised task of ``config`` (seeded by ``config.seed``)."""
    seed_everything(config.seed)
    task = _build(config).eval()
    return EvalTarget(config, task, tracking.KIND_BASELINE, weights_digest(task.backbone))


def _run_config(run_id: str, current: Config, mlflow_client) -> Config:
    """The pretraining run's logged config, with today's eval/tracking/prepared-data settings."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow_client.download_artifacts(run_id, tracking.CONFIG_ARTIFACT, tmp)
            tree = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except Exception as err:  # mlflow raises many types for a missing artifact
            raise UserError(
                f"run {run_id}: its config artifact {tracking.CONFIG_ARTIFACT} cannot be read "
                f"({type(err).__name__})"
            ) from None
    if not isinstance(tree, dict):
        raise UserError(f"run {run_id}: {tracking.CONFIG_ARTIFACT} is not a mapping")
    tree["eval"] = current.eval.model_dump(mode="json")
    if current.eval.data is not None:  # only the keys given: the others are the run's own
        tree["eval"]["data"] = current.eval.data.model_dump(mode="json", exclude_unset=True)
    tree["tracking"] = current.tracking.model_dump(mode="json")
    tree.setdefault("data", {})["prepared_dir"] = str(current.data.prepared_dir)
    config = config_from_dict(tree, origin=f"run {run_id} {tracking.CONFIG_ARTIFACT}")
    config.tracking._root = current.tracking._root  # relative store paths resolve as today's
    return config


def _pretrain_run(config: Config, run_id: str):
    """The MLflow run ``run_id``, checked to be a pretraining run."""
    mlflow_client = store.client(config.tracking.resolved_uri())
    run = store.find_run(mlflow_client, run_id)
    if run is None:
        raise UserError(f"--run-id {run_id}: no such run in {config.tracking.resolved_uri()}")
    kind = run.data.tags.get(tracking.TAG_KIND)
    if kind != tracking.KIND_PRETRAIN:
        parent = run.data.tags.get(tracking.TAG_PRETRAIN_RUN_ID)
        hint = f" (it evaluates pretraining run {parent})" if parent else ""
        raise UserError(
            f"--run-id {run_id}: a {kind or 'untagged'} run, not a pretraining run{hint}"
        )
    return mlflow_client, run


def _unfinished(
    option: str, run_id: str, store_status: str, record: RunRecord | None, allow: bool
) -> str | None:
    """None when the run finished (by the store and by run.json), else a note on its state;
    refused unless ``allow``."""
    states = [f"{store_status.lower()} in the store"] if store_status != "FINISHED" else []
    if record is not None and record.status != "finished":
        at = f" at step {record.global_step} of {record.total_steps}" if record.total_steps else ""
        states.append(f"{record.status}{at} by run.json")
    if not states:
        return None
    note = f"run {run_id} is {' and '.join(states)}"
    if not allow:
        raise UserError(
            f"{option}: {note}; only a finished run's final checkpoint is evaluated "
            "(--unfinished evaluates it anyway, kept off the pretraining run)"
        )
    return note


def _with_weights(
    config: Config,
    run_id: str,
    checkpoint: Path,
    expected_sha256: str | None = None,
    unfinished: str | None = None,
    data_hash: str | None = None,
) -> EvalTarget:
    try:
        state = load_checkpoint(checkpoint)
    except CheckpointError as err:
        raise UserError(str(err).splitlines()[0]) from None
    digest = sha256_file(checkpoint)
    if expected_sha256 is not None and digest != expected_sha256:
        raise UserError(f"{checkpoint}: SHA-256 differs from the one run.json records")
    task = _build(config)
    try:
        task.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as err:
        raise UserError(
            f"{checkpoint}: weights do not fit {tracking.run_name(config)} "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from None
    task.eval()
    return EvalTarget(
        config,
        task,
        tracking.KIND_EVAL,
        weights_digest(task.backbone),
        pretrain_run_id=run_id,
        checkpoint_sha256=digest,
        unfinished=unfinished,
        data_hash=data_hash,
    )


def target_from_run_id(
    current: Config, run_id: str, scratch: Path, *, allow_unfinished: bool = False
) -> EvalTarget:
    """The pretraining run ``run_id``: its config artifact and its checkpoint artifact."""
    mlflow_client, run = _pretrain_run(current, run_id)
    state = _unfinished("--run-id", run_id, run.info.status, None, allow_unfinished)
    config = _run_config(run_id, current, mlflow_client)
    try:
        checkpoint = fetch_checkpoint(mlflow_client, run_id, scratch)
    except CheckpointError as err:
        raise UserError(str(err)) from None
    except Exception as err:  # no artifact: mlflow raises OSError or MlflowException
        raise UserError(
            f"--run-id {run_id}: the run has no checkpoint artifact (status "
            f"{run.info.status}; did it finish?) ({type(err).__name__})"
        ) from None
    return _with_weights(config, run_id, checkpoint, unfinished=state, data_hash=_data_hash(run))


def target_from_run_dir(
    current: Config, run_dir: Path, *, allow_unfinished: bool = False
) -> EvalTarget:
    """The run recorded in ``run_dir/run.json``, with the checkpoint file that it names."""
    run_dir = Path(run_dir)
    record = read_run_record(run_dir)
    path = run_dir / "run.json"
    checkpoint = record.checkpoint_path(run_dir)
    if not record.run_id or checkpoint is None:
        raise UserError(f"{path}: no run id or checkpoint recorded (did the run start?)")
    mlflow_client, run = _pretrain_run(current, record.run_id)
    state = _unfinished("--run-dir", record.run_id, run.info.status, record, allow_unfinished)
    config = _run_config(record.run_id, current, mlflow_client)
    if not checkpoint.is_file():
        raise UserError(f"{path}: its checkpoint {record.checkpoint} does not exist")
    return _with_weights(
        config, record.run_id, checkpoint, record.checkpoint_sha256, state, _data_hash(run)
    )


def _data_hash(run) -> str | None:
    return run.data.tags.get(tracking.TAG_DATA_HASH)


def fetch_checkpoint(mlflow_client: MlflowClient, run_id: str, destination: Path) -> Path:
    """Download a pretraining run's checkpoint into ``destination``, verified by its sidecar."""
    destination.mkdir(parents=True, exist_ok=True)
    folder = Path(
        mlflow_client.download_artifacts(run_id, tracking.CHECKPOINT_ARTIFACT_DIR, str(destination))
    )
    files = sorted(p for p in folder.iterdir() if not p.name.endswith(SIDECAR_SUFFIX))
    if not files:
        raise FileNotFoundError(
            f"run {run_id}: no checkpoint under artifacts/{tracking.CHECKPOINT_ARTIFACT_DIR}"
        )
    verify_checkpoint(files[-1])
    return files[-1]
