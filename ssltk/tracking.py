"""MLflow conventions of ssltk, all in one place.

One experiment per study (``tracking.experiment``), created up front. A pretraining run carries
as params the flattened config sections that shape it (:data:`PRETRAIN_SECTIONS`), ``ssltk.*``
tags (kind, task, arch, widening, git commit, data hash, library versions, device), step metrics
``train/*`` and epoch metrics ``epoch/*``, and the artifacts ``config/params.yaml`` (the whole
config) and ``checkpoint/<file>`` (with its ``.sha256`` sidecar). Eval runs carry the ``eval.*``
params, are tagged ``ssltk.kind=eval`` and ``ssltk.pretrain_run_id`` and log
``probe/<method>/top<k>/<layer>`` metrics, which are also written back to the pretraining run.

The tracking URI defaults to ``mlflow.db`` beside the params file (see
:meth:`ssltk.config.TrackingConfig.resolved_uri`), and artifacts of a SQLite store go to
``mlruns/`` beside the database file. A new SQLite store is created and migrated in a temporary file
under a lock on its folder, then renamed into place, so concurrent first runs wait for one another
and an interrupted creation leaves nothing behind. Remote stores get bounded timeouts and retries
(unless the ``MLFLOW_HTTP_REQUEST_*`` variables say otherwise). A resumed run logs no step twice.
mlflow is imported lazily and kept quiet.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import secrets
import subprocess
import time
import warnings
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssltk import fsutil
from ssltk.config import PROJECT_ROOT, Config, dump_config
from ssltk.errors import UserError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

TAG_KIND = "ssltk.kind"
TAG_TASK = "ssltk.task"
TAG_ARCH = "ssltk.arch"
TAG_WIDENING = "ssltk.widening"
TAG_GIT_COMMIT = "ssltk.git_commit"
TAG_GIT_DIRTY = "ssltk.git_dirty"
TAG_DATA_HASH = "ssltk.data_hash"
TAG_DATA_SETTINGS = "ssltk.data_settings"
TAG_DEVICE = "ssltk.device"
TAG_WORLD_SIZE = "ssltk.world_size"
TAG_FAILURE = "ssltk.failure"
TAG_PRETRAIN_RUN_ID = "ssltk.pretrain_run_id"
TAG_WEIGHTS = "ssltk.weights_sha256"
TAG_VERSION_PREFIX = "ssltk.version."
TAG_RESUMED_PREFIX = "ssltk.resumed_with."
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"

KIND_PRETRAIN = "pretrain"
KIND_EVAL = "eval"
KIND_BASELINE = "baseline"

CONFIG_ARTIFACT = "config/params.yaml"
#: The config sections that shape pretraining (not ``eval``, ``study``, ``tracking``): a pretraining
#: run's params, and the sections a checkpoint's trajectory is drawn from.
PRETRAIN_SECTIONS = ("seed", "data", "model", "pretext", "pretrain")
CHECKPOINT_ARTIFACT_DIR = "checkpoint"

#: Bounds for a remote store (seconds, attempts), unless set in the environment: mlflow's defaults
#: retry an unreachable server for minutes without a word.
REMOTE_TIMEOUTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}

#: Libraries whose versions every run records.
TRACKED_LIBRARIES = ("torch", "numpy", "triton", "ssltk")


def train_metric(name: str) -> str:
    return f"train/{name}"


def epoch_metric(name: str) -> str:
    return f"epoch/{name}"


@dataclass(frozen=True)
class ProbeMetric:
    """The parts of a probe metric's name ``probe/<method>/<figure>/<layer>``."""

    method: str
    figure: str  # top1, top5, val_top1, l2, ...
    layer: str

    @property
    def top_k(self) -> int | None:
        """``k`` of a ``top<k>`` figure (on the report split), else None."""
        digits = self.figure.removeprefix("top")
        return int(digits) if self.figure.startswith("top") and digits.isdigit() else None


def probe_metric(method: str, figure: str | int, layer: str) -> str:
    """``probe/<method>/<figure>/<layer>``, e.g. ``probe/lbfgs/top1/pre_logits``; an int
    ``figure`` ``k`` stands for ``top<k>``. :func:`parse_probe_metric` reads it back."""
    figure = f"top{figure}" if isinstance(figure, int) else figure
    return f"probe/{method}/{figure}/{layer}"


def parse_probe_metric(name: str) -> ProbeMetric | None:
    """The parts of a metric named by :func:`probe_metric`; None for any other metric."""
    parts = name.split("/", 3)
    if len(parts) != 4 or parts[0] != "probe" or not all(parts[1:]):
        return None
    return ProbeMetric(*parts[1:])


def run_name(config: Config) -> str:
    """``<task>-<arch>-w<widening>``: also the default output directory name."""
    return f"{config.pretext.task}-{config.model.arch}-w{config.model.widening}"


def quiet_mlflow() -> None:
    """Silence mlflow's and alembic's INFO chatter and mlflow's warnings.

    mlflow sets up its own logger when imported, so it is imported first and then turned down.
    """
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow  # noqa: F401

    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"mlflow(\..*)?")
    warnings.filterwarnings("ignore", message=r".*mlflow.*", category=FutureWarning)


def client(tracking_uri: str) -> MlflowClient:
    """A quiet ``MlflowClient`` for ``tracking_uri``: a SQLite store is created if missing, a
    remote one must answer within :data:`REMOTE_TIMEOUTS` (else a one-line ``UserError``)."""
    quiet_mlflow()
    db = sqlite_path(tracking_uri)
    if db is not None:
        ensure_sqlite_store(db)
    remote = tracking_uri.startswith(("http://", "https://"))
    if remote:
        for name, value in REMOTE_TIMEOUTS.items():
            os.environ.setdefault(name, value)
    from mlflow.tracking import MlflowClient

    mlflow_client = MlflowClient(tracking_uri)
    if remote:
        _probe(mlflow_client, tracking_uri)
    return mlflow_client


def _probe(mlflow_client: MlflowClient, tracking_uri: str) -> None:
    try:
        mlflow_client.search_experiments(max_results=1)
    except Exception as err:  # mlflow wraps connection errors in several ways
        text = " ".join(str(err).split())
        reason = next(
            (
                r
                for r in ("Connection refused", "timed out", "Name or service not known")
                if r in text
            ),
            text[:200],
        )
        raise UserError(
            f"tracking.uri {tracking_uri}: the server does not answer ({reason})"
        ) from None


def ensure_sqlite_store(db: Path) -> None:
    """Create the SQLite store ``db`` if it does not exist, atomically.

    The schema is created and migrated in a temporary file while holding a lock on the store's
    folder, then renamed into place: a process that waits for the lock finds a complete store, and
    one interrupted at any point leaves no store (its temporary file is removed, or cleared by the
    next creator). A store that cannot be written is a one-line user error (else SQLAlchemy
    retries for minutes before it fails with a traceback).
    """
    if not db.exists():
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"tracking.uri: cannot create {db.parent} ({err.strerror})") from None
        try:
            with fsutil.locked(db.parent / f".{db.name}.lock", wait=True, remove=True):
                if not db.exists():
                    _create_sqlite_store(db)
        except fsutil.WriteError:
            raise UserError(f"tracking.uri: cannot create the SQLite store {db}") from None
    if not (db.is_file() and os.access(db, os.R_OK | os.W_OK)):
        raise UserError(f"tracking.uri: the SQLite store {db} cannot be opened for writing")


def _create_sqlite_store(db: Path) -> None:
    import sqlalchemy
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    for stale in db.parent.glob(f".{db.name}.tmp-*"):  # left by a killed creator (we hold the lock)
        stale.unlink(missing_ok=True)
    tmp = db.with_name(f".{db.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    uri = f"sqlite:///{tmp}"
    # No fsync per migration (they take seconds that way): the file is invisible until renamed,
    # and it is synced once before that.
    engine = sqlalchemy.create_engine(uri)
    sqlalchemy.event.listen(engine, "connect", _unsynchronised)
    SqlAlchemyStore._engine_map[uri] = engine
    try:
        SqlAlchemyStore(uri, (db.parent.resolve() / "mlruns").as_uri())
        engine.dispose()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, db)
    except OSError as err:
        raise UserError(f"tracking.uri: cannot create {db} ({err.strerror or err})") from None
    finally:
        SqlAlchemyStore._engine_map.pop(uri, None)
        engine.dispose()
        with suppress(OSError):
            tmp.unlink(missing_ok=True)


def _unsynchronised(connection: Any, record: Any) -> None:
    connection.execute("PRAGMA synchronous=OFF")
    connection.execute("PRAGMA journal_mode=MEMORY")


def sqlite_path(tracking_uri: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(tracking_uri[len(prefix) :]) if tracking_uri.startswith(prefix) else None


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """``file://<db folder>/mlruns/<experiment>`` for SQLite stores; mlflow's default otherwise."""
    db = sqlite_path(tracking_uri)
    if db is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("_") or "default"
    return (db.parent.resolve() / "mlruns" / slug).as_uri()


def ensure_experiment(mlflow_client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created (with its artifact location) if missing."""
    from mlflow.exceptions import MlflowException

    found = mlflow_client.get_experiment_by_name(name)
    if found is None:
        try:
            return mlflow_client.create_experiment(
                name, artifact_location=artifact_location(tracking_uri, name)
            )
        except MlflowException:  # created meanwhile by a concurrent run
            found = mlflow_client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        mlflow_client.restore_experiment(found.experiment_id)
    return found.experiment_id


def git_state(cwd: Path | None = None) -> tuple[str, bool | None]:
    """``(commit, dirty)`` of the git checkout at ``cwd``; ``("unknown", None)`` outside one."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return commit, dirty


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def param_value(value: Any) -> str:
    """How a config value is written as an MLflow param: strings as-is, the rest as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def pretrain_params(config: Config) -> dict[str, Any]:
    """The flat config values of :data:`PRETRAIN_SECTIONS`: what a pretraining run logs."""
    return {k: v for k, v in config.flat().items() if k.split(".")[0] in PRETRAIN_SECTIONS}


def provenance_tags(device: str) -> dict[str, str]:
    """Git commit (and whether the tree was dirty), library versions and device."""
    commit, dirty = git_state()
    if dirty is None:  # not run from a checkout: the code's own (editable) source tree
        commit, dirty = git_state(PROJECT_ROOT)
    tags = {
        TAG_GIT_COMMIT: commit,
        MLFLOW_GIT_COMMIT: commit,
        TAG_GIT_DIRTY: "unknown" if dirty is None else str(dirty).lower(),
        TAG_DEVICE: device,
    }
    tags.update({f"{TAG_VERSION_PREFIX}{k}": v for k, v in library_versions().items()})
    return tags


def pretrain_tags(
    config: Config,
    *,
    data_hash: str,
    device: str,
    world_size: int = 1,
    data_settings: str | None = None,
) -> dict[str, str]:
    return {
        TAG_KIND: KIND_PRETRAIN,
        TAG_TASK: config.pretext.task,
        TAG_ARCH: config.model.arch,
        TAG_WIDENING: str(config.model.widening),
        TAG_DATA_HASH: data_hash,
        **({TAG_DATA_SETTINGS: data_settings} if data_settings else {}),
        TAG_WORLD_SIZE: str(world_size),
        "mlflow.runName": run_name(config),
        **provenance_tags(device),
    }


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class TrackedRun:
    """One MLflow run that the engine logs to (only rank 0 holds one)."""

    client: MlflowClient
    run_id: str
    experiment_id: str
    tracking_uri: str
    #: Highest step already logged per metric: a resumed run re-runs the steps after its
    #: checkpoint, and their points (the same values, the run being deterministic) are not resent.
    logged_steps: dict[str, int] = field(default_factory=dict)

    def log_metrics(self, rows: Iterable[tuple[int, Mapping[str, float]]]) -> None:
        """``rows`` of ``(step, {name: value})``, sent in as few requests as allowed."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(name, float(value), now, step)
            for step, values in rows
            for name, value in values.items()
            if step > self.logged_steps.get(name, -1)
        ]
        for chunk in _chunks(metrics, 1000):
            self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for chunk in _chunks(items, 100):
            self.client.log_batch(self.run_id, tags=chunk, synchronous=True)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, param_value(v)[:6000]) for k, v in params.items()]
        for chunk in _chunks(items, 100):
            self.client.log_batch(self.run_id, params=chunk, synchronous=True)

    def log_artifact(self, path: Path, artifact_dir: str) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def finish(self, status: str = "FINISHED", failure: str | None = None) -> None:
        """End the run as FINISHED, FAILED or KILLED (``failure`` is kept as a tag)."""
        if failure:
            self.set_tags({TAG_FAILURE: failure[:5000]})
        self.client.set_terminated(self.run_id, status)


def start_pretrain_run(
    config: Config,
    *,
    data_hash: str,
    device: str,
    world_size: int = 1,
    resume_run_id: str | None = None,
    stale_run_id: str | None = None,
    data_settings: str | None = None,
) -> TrackedRun:
    """Create the pretraining run, or reopen ``resume_run_id`` when the store still has it.

    ``data_settings`` is the prepared data's settings fingerprint. ``stale_run_id`` is an earlier
    attempt that left no checkpoint; if it is still RUNNING it is
    marked KILLED before a new run starts.

    A reopened run keeps its params; values that changed since (e.g. ``pretrain.epochs`` raised
    to train longer) are recorded as ``ssltk.resumed_with.<key>`` tags, since MLflow params are
    write-once.
    """
    uri = config.tracking.resolved_uri()
    mlflow_client = client(uri)
    experiment_id = ensure_experiment(mlflow_client, config.tracking.experiment, uri)
    params = pretrain_params(config)
    tags = pretrain_tags(
        config,
        data_hash=data_hash,
        device=device,
        world_size=world_size,
        data_settings=data_settings,
    )

    existing = find_run(mlflow_client, resume_run_id) if resume_run_id else None
    if existing is not None and existing.info.experiment_id == experiment_id:
        logged = {
            name: max(
                (m.step for m in mlflow_client.get_metric_history(resume_run_id, name)), default=-1
            )
            for name in existing.data.metrics
        }
        run = TrackedRun(mlflow_client, existing.info.run_id, experiment_id, uri, logged)
        mlflow_client.update_run(run.run_id, status="RUNNING")
        logged = existing.data.params
        missing = {k: v for k, v in params.items() if k not in logged}
        changed = {
            f"{TAG_RESUMED_PREFIX}{k}": param_value(v)
            for k, v in params.items()
            if k in logged and logged[k] != param_value(v)[:6000]
        }
        run.log_params(missing)
        run.set_tags({**tags, **changed})
        run.log_text(dump_config(config), CONFIG_ARTIFACT)
        return run

    stale = find_run(mlflow_client, stale_run_id) if stale_run_id else None
    if stale is not None and stale.info.status == "RUNNING":
        mlflow_client.set_terminated(stale.info.run_id, "KILLED")
    created = mlflow_client.create_run(experiment_id, tags=tags, run_name=run_name(config))
    run = TrackedRun(mlflow_client, created.info.run_id, experiment_id, uri)
    run.log_params(params)
    run.log_text(dump_config(config), CONFIG_ARTIFACT)
    return run


def start_eval_run(
    config: Config,
    pretrain_run_id: str,
    *,
    device: str,
    extra_tags: Mapping[str, str] | None = None,
) -> TrackedRun:
    """An eval run in the study's experiment, tagged with the pretraining run it evaluates (whose
    task, arch, widening and data hash it copies); params are the ``eval.*`` values.
    """
    uri = config.tracking.resolved_uri()
    mlflow_client = client(uri)
    pretrain = find_run(mlflow_client, pretrain_run_id)
    if pretrain is None:
        raise UserError(f"--run-id {pretrain_run_id}: no such run in {uri}")
    copied = (TAG_TASK, TAG_ARCH, TAG_WIDENING, TAG_DATA_HASH)
    tags = {
        TAG_KIND: KIND_EVAL,
        TAG_PRETRAIN_RUN_ID: pretrain_run_id,
        **{k: v for k, v in pretrain.data.tags.items() if k in copied},
        "mlflow.runName": f"eval-{pretrain.data.tags.get('mlflow.runName', pretrain_run_id)}",
        **(extra_tags or {}),
    }
    return _start_probe_run(mlflow_client, config, tags, device)


def start_baseline_run(
    config: Config, *, device: str, data_hash: str, extra_tags: Mapping[str, str] | None = None
) -> TrackedRun:
    """A baseline run: the evaluation of a randomly initialised network of ``config``'s task,
    arch and widening, tagged like a pretraining run of that cell so reports can pair them.
    """
    mlflow_client = client(config.tracking.resolved_uri())
    tags = {
        TAG_KIND: KIND_BASELINE,
        TAG_TASK: config.pretext.task,
        TAG_ARCH: config.model.arch,
        TAG_WIDENING: str(config.model.widening),
        TAG_DATA_HASH: data_hash,
        "mlflow.runName": f"baseline-{run_name(config)}",
        **(extra_tags or {}),
    }
    return _start_probe_run(mlflow_client, config, tags, device)


def _start_probe_run(
    mlflow_client: MlflowClient, config: Config, tags: dict[str, str], device: str
) -> TrackedRun:
    uri = config.tracking.resolved_uri()
    experiment_id = ensure_experiment(mlflow_client, config.tracking.experiment, uri)
    tags = {**tags, **provenance_tags(device)}
    created = mlflow_client.create_run(experiment_id, tags=tags, run_name=tags["mlflow.runName"])
    run = TrackedRun(mlflow_client, created.info.run_id, experiment_id, uri)
    run.log_params({k: v for k, v in config.flat().items() if k.startswith("eval.")})
    run.log_text(dump_config(config), CONFIG_ARTIFACT)
    return run


def open_run(config: Config, run_id: str) -> TrackedRun:
    """An existing run, e.g. the pretraining run that an evaluation writes its figures back to."""
    uri = config.tracking.resolved_uri()
    mlflow_client = client(uri)
    found = find_run(mlflow_client, run_id)
    if found is None:
        raise UserError(f"--run-id {run_id}: no such run in {uri}")
    return TrackedRun(mlflow_client, run_id, found.info.experiment_id, uri)


def find_run(mlflow_client: MlflowClient, run_id: str) -> Any:
    """The run ``run_id`` of the store, or None when it has none."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_run(run_id)
    except MlflowException:
        return None


def fetch_checkpoint(mlflow_client: MlflowClient, run_id: str, destination: Path) -> Path:
    """Download a pretraining run's checkpoint into ``destination``, verified by its sidecar."""
    from ssltk.train.checkpoint import SIDECAR_SUFFIX, verify_checkpoint

    destination.mkdir(parents=True, exist_ok=True)
    folder = Path(
        mlflow_client.download_artifacts(run_id, CHECKPOINT_ARTIFACT_DIR, str(destination))
    )
    files = sorted(p for p in folder.iterdir() if not p.name.endswith(SIDECAR_SUFFIX))
    if not files:
        raise FileNotFoundError(
            f"run {run_id}: no checkpoint under artifacts/{CHECKPOINT_ARTIFACT_DIR}"
        )
    verify_checkpoint(files[-1])
    return files[-1]
