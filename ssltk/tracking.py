"""MLflow conventions of ssltk, all in one place.

One experiment per study (``tracking.experiment``), created up front. A pretraining run carries
as params the flattened config sections that shape it (:data:`PRETRAIN_SECTIONS`), ``ssltk.*``
tags (kind, task, arch, widening, git commit, data hash, library versions, device), step metrics
``train/*`` and epoch metrics ``epoch/*``, and the artifacts ``config/params.yaml`` (the whole
config) and ``checkpoint/<file>`` (with its ``.sha256`` sidecar). Eval runs carry the ``eval.*``
params, are tagged ``ssltk.kind=eval`` and ``ssltk.pretrain_run_id`` and log
``probe/<method>/top<k>/<layer>`` metrics, which are also written back to the pretraining run
(for its final weights only), each layer's with a ``ssltk.probe.<method>.<layer>`` tag saying how
it was measured (:func:`probe_measurement`, the weights, the figures written).

What the MLflow UI shows: the experiment is a training one (:data:`ssltk.store.EXPERIMENT_KIND`);
every run records the prepared data as dataset inputs (one per split, the content hash as digest,
the split as context) and its source as MLflow's ``mlflow.source.*`` tags. Runs nest the way a
study reads: the experiment's study run (:func:`study_run_id`; ``ssltk report`` logs the report onto
it) is the parent of its pretraining and baseline runs, and a pretraining run of its evals.

The tracking URI defaults to ``mlflow.db`` beside the params file (see
:meth:`ssltk.config.TrackingConfig.resolved_uri`); :mod:`ssltk.store` opens it. A resumed run logs
no step twice.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssltk import fsutil
from ssltk.config import PROJECT_ROOT, Config, DataConfig, EvalConfig, dump_config
from ssltk.errors import UserError
from ssltk.store import client, ensure_experiment, find_run, sqlite_path

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

TAG_KIND = "ssltk.kind"
TAG_TASK = "ssltk.task"
TAG_ARCH = "ssltk.arch"
TAG_WIDENING = "ssltk.widening"
#: On runs of a cell with an extra representation layer (``model.representation_size``) only.
TAG_REPRESENTATION_SIZE = "ssltk.representation_size"
TAG_GIT_COMMIT = "ssltk.git_commit"
TAG_GIT_DIRTY = "ssltk.git_dirty"
TAG_DATA_HASH = "ssltk.data_hash"
TAG_DATA_SETTINGS = "ssltk.data_settings"
#: On an eval or baseline run on another dataset than the run's own: its key (``data-<hash16>``).
TAG_EVAL_DATA = "ssltk.eval_data"
TAG_DEVICE = "ssltk.device"
TAG_WORLD_SIZE = "ssltk.world_size"
TAG_FAILURE = "ssltk.failure"
TAG_PRETRAIN_RUN_ID = "ssltk.pretrain_run_id"
TAG_WEIGHTS = "ssltk.weights_sha256"
TAG_CHECKPOINT = "ssltk.checkpoint_sha256"
#: On an eval run: ``final`` (a finished run's final checkpoint) or why the weights are not.
TAG_WEIGHTS_STATE = "ssltk.weights_state"
TAG_PROBE_PREFIX = "ssltk.probe."
TAG_VERSION_PREFIX = "ssltk.version."
TAG_RESUMED_PREFIX = "ssltk.resumed_with."
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
MLFLOW_GIT_REPO = "mlflow.source.git.repoURL"
MLFLOW_SOURCE_NAME = "mlflow.source.name"
MLFLOW_SOURCE_TYPE = "mlflow.source.type"
MLFLOW_PARENT_RUN = "mlflow.parentRunId"
MLFLOW_DATASET_CONTEXT = "mlflow.data.context"
#: MLflow stores a dataset digest in 36 characters; the full content hash is in its profile.
DATASET_DIGEST_CHARS = 16

KIND_PRETRAIN = "pretrain"
KIND_EVAL = "eval"
KIND_BASELINE = "baseline"
KIND_STUDY = "study"

CONFIG_ARTIFACT = "config/params.yaml"
#: The config sections that shape pretraining (not ``eval``, ``study``, ``tracking``): a pretraining
#: run's params, and the sections a checkpoint's trajectory is drawn from.
PRETRAIN_SECTIONS = ("seed", "data", "model", "pretext", "pretrain")
CHECKPOINT_ARTIFACT_DIR = "checkpoint"

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
    #: None on the run's own data, else the evaluation dataset's key (``data-<hash16>``).
    dataset: str | None = None

    @property
    def top_k(self) -> int | None:
        """``k`` of a ``top<k>`` figure (on the report split), else None."""
        digits = self.figure.removeprefix("top")
        return int(digits) if self.figure.startswith("top") and digits.isdigit() else None


def probe_metric(method: str, figure: str | int, layer: str, dataset: str | None = None) -> str:
    """``probe/<method>/<figure>/<layer>``, e.g. ``probe/lbfgs/top1/pre_logits``; an int
    ``figure`` ``k`` stands for ``top<k>``; figures on another dataset than the run's own end in
    ``/<dataset key>``. :func:`parse_probe_metric` reads it back."""
    figure = f"top{figure}" if isinstance(figure, int) else figure
    return f"probe/{method}/{figure}/{layer}" + (f"/{dataset}" if dataset else "")


def parse_probe_metric(name: str) -> ProbeMetric | None:
    """The parts of a metric named by :func:`probe_metric`; None for any other metric."""
    parts = name.split("/")
    if len(parts) not in (4, 5) or parts[0] != "probe" or not all(parts[1:]):
        return None
    return ProbeMetric(*parts[1:])


def cell_name(task: str, arch: str, widening: int, representation_size: int | None = None) -> str:
    """``<task>-<arch>-w<widening>`` (``-r<size>`` after it with a representation layer): a study
    cell's run name and run directory name."""
    size = f"-r{representation_size}" if representation_size is not None else ""
    return f"{task}-{arch}-w{widening}{size}"


def run_name(config: Config) -> str:
    """``<task>-<arch>-w<widening>[-r<size>]``: also the default output directory name."""
    model = config.model
    return cell_name(config.pretext.task, model.arch, model.widening, model.representation_size)


def _size_tag(config: Config) -> dict[str, str]:
    size = config.model.representation_size
    return {TAG_REPRESENTATION_SIZE: str(size)} if size is not None else {}


def probe_tag(method: str, layer: str, dataset: str | None = None) -> str:
    """``ssltk.probe.<method>.<layer>``: how the probe figures of that layer were measured
    (``.<dataset key>`` after it for figures on another dataset than the run's own)."""
    return f"{TAG_PROBE_PREFIX}{method}.{layer}" + (f".{dataset}" if dataset else "")


def probe_measurement(ev: EvalConfig, method: str | None = None) -> dict[str, Any]:
    """What makes two probe figures comparable: the split they are reported on, the pooling, the
    feature budget and the probe with its own settings (``eval.lbfgs``: the L2 grid, ...)."""
    method = method or ev.method
    section = getattr(ev, method, None)
    return {
        "split": ev.report_split,
        "pooling": ev.pooling,
        "max_features": ev.max_features,
        "method": method,
        "probe": section.model_dump(mode="json") if section is not None else None,
    }


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


def git_remote(cwd: Path | None = None) -> str | None:
    """The ``origin`` URL of the checkout at ``cwd``, if it has one."""
    try:
        url = subprocess.run(
            ["git", "remote", "get-url", "origin"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return url or None


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


def provenance_tags(device: str, command: str) -> dict[str, str]:
    """:func:`source_tags`, library versions and device."""
    tags = {**source_tags(command), TAG_DEVICE: device}
    tags.update({f"{TAG_VERSION_PREFIX}{k}": v for k, v in library_versions().items()})
    return tags


def source_tags(command: str) -> dict[str, str]:
    """Git commit (and whether the tree was dirty) and the ``ssltk`` command as MLflow's
    source."""
    checkout: Path | None = None
    commit, dirty = git_state()
    if dirty is None:  # not run from a checkout: the code's own (editable) source tree
        checkout = PROJECT_ROOT
        commit, dirty = git_state(checkout)
    repo = git_remote(checkout) if dirty is not None else None
    tags = {
        TAG_GIT_COMMIT: commit,
        MLFLOW_GIT_COMMIT: commit,
        **({MLFLOW_GIT_REPO: repo} if repo else {}),
        MLFLOW_SOURCE_NAME: f"ssltk {command}",
        MLFLOW_SOURCE_TYPE: "LOCAL",
        TAG_GIT_DIRTY: "unknown" if dirty is None else str(dirty).lower(),
    }
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
        **_size_tag(config),
        TAG_DATA_HASH: data_hash,
        **({TAG_DATA_SETTINGS: data_settings} if data_settings else {}),
        TAG_WORLD_SIZE: str(world_size),
        "mlflow.runName": run_name(config),
        **provenance_tags(device, "pretrain"),
    }


def dataset_inputs(
    config: Config, data_hash: str, splits: Iterable[str], data: DataConfig | None = None
) -> list[Any]:
    """The prepared data (``data``, default ``config.data``) as MLflow dataset inputs, one per
    split (``mlflow.data.context``)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    data = data or config.data
    prepared = Path(data.prepared_dir)
    if not prepared.is_absolute():
        prepared = config.tracking.project_root() / prepared
    source = json.dumps({"uri": prepared.resolve().as_uri()})
    profile = json.dumps({"content_hash": data_hash, "image_size": data.image_size})
    name = f"{data.source}-{data.image_size}px"
    return [
        DatasetInput(
            Dataset(
                name=f"{name}-{split}",
                digest=data_hash[:DATASET_DIGEST_CHARS],
                source_type="local",
                source=source,
                profile=profile,
            ),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, split)],
        )
        for split in dict.fromkeys(splits)
    ]


def study_run_id(mlflow_client: MlflowClient, experiment_id: str, name: str, uri: str) -> str:
    """The study run of experiment ``experiment_id`` (one experiment per study), created on
    first use: the parent of its pretraining and baseline runs, holding the report. First runs
    racing on one SQLite store (``uri``) create it once, under a lock beside the store."""
    db = sqlite_path(uri)
    lock = (
        fsutil.locked(db.parent / f".{db.name}.study.lock", wait=True, remove=True) if db else None
    )
    with lock or nullcontext():
        found = mlflow_client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{TAG_KIND}` = '{KIND_STUDY}'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        if found:  # the oldest, should first runs on a remote store have raced
            return found[0].info.run_id
        created = mlflow_client.create_run(
            experiment_id, tags={TAG_KIND: KIND_STUDY}, run_name=f"study-{name}"
        )
        mlflow_client.set_terminated(created.info.run_id, "FINISHED")
        return created.info.run_id


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

    def log_figures(self, metrics: Mapping[str, float], tags: Mapping[str, str]) -> None:
        """Step-0 ``metrics`` with the ``tags`` that say how they were measured, in one request
        where the store allows it, so that a figure never stands beside another one's record."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        values = [Metric(name, float(value), now, 0) for name, value in metrics.items()]
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        if len(values) <= 1000 and len(items) <= 100:
            self.client.log_batch(self.run_id, metrics=values, tags=items, synchronous=True)
        else:
            self.set_tags(tags)
            self.log_metrics([(0, metrics)])

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

    tags[MLFLOW_PARENT_RUN] = study_run_id(
        mlflow_client, experiment_id, config.tracking.experiment, uri
    )
    datasets = dataset_inputs(config, data_hash, [config.data.pretrain_split])

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
        mlflow_client.log_inputs(run.run_id, datasets)  # a dataset already logged is skipped
        run.log_text(dump_config(config), CONFIG_ARTIFACT)
        return run

    stale = find_run(mlflow_client, stale_run_id) if stale_run_id else None
    if stale is not None and stale.info.status == "RUNNING":
        mlflow_client.set_terminated(stale.info.run_id, "KILLED")
    created = mlflow_client.create_run(experiment_id, tags=tags, run_name=run_name(config))
    run = TrackedRun(mlflow_client, created.info.run_id, experiment_id, uri)
    run.log_params(params)
    mlflow_client.log_inputs(run.run_id, datasets)
    run.log_text(dump_config(config), CONFIG_ARTIFACT)
    return run


def start_eval_run(
    config: Config,
    pretrain_run_id: str,
    *,
    device: str,
    data_hash: str,
    splits: Iterable[str],
    extra_tags: Mapping[str, str] | None = None,
    eval_data: DataConfig | None = None,
) -> TrackedRun:
    """An eval run in the study's experiment, tagged with the pretraining run it evaluates (whose
    task, arch, widening and data hash it copies) and nested under it; params are the ``eval.*``
    values, ``splits`` of the data ``data_hash`` its dataset inputs.
    """
    uri = config.tracking.resolved_uri()
    mlflow_client = client(uri)
    pretrain = find_run(mlflow_client, pretrain_run_id)
    if pretrain is None:
        raise UserError(f"--run-id {pretrain_run_id}: no such run in {uri}")
    copied = (TAG_TASK, TAG_ARCH, TAG_WIDENING, TAG_REPRESENTATION_SIZE, TAG_DATA_HASH)
    tags = {
        TAG_KIND: KIND_EVAL,
        TAG_PRETRAIN_RUN_ID: pretrain_run_id,
        **{k: v for k, v in pretrain.data.tags.items() if k in copied},
        "mlflow.runName": f"eval-{pretrain.data.tags.get('mlflow.runName', pretrain_run_id)}",
        **(extra_tags or {}),
    }
    experiment_id = ensure_experiment(mlflow_client, config.tracking.experiment, uri)
    if pretrain.info.experiment_id == experiment_id:  # the UI nests runs of one experiment only
        tags[MLFLOW_PARENT_RUN] = pretrain_run_id
    datasets = dataset_inputs(config, data_hash, splits, eval_data)
    return _start_probe_run(mlflow_client, config, tags, device, "eval", datasets)


def start_baseline_run(
    config: Config,
    *,
    device: str,
    data_hash: str,
    splits: Iterable[str],
    extra_tags: Mapping[str, str] | None = None,
    eval_data: DataConfig | None = None,
) -> TrackedRun:
    """A baseline run: the evaluation of a randomly initialised network of ``config``'s task,
    arch and widening, tagged like a pretraining run of that cell so reports can pair them, and
    nested under the study run.
    """
    uri = config.tracking.resolved_uri()
    mlflow_client = client(uri)
    experiment_id = ensure_experiment(mlflow_client, config.tracking.experiment, uri)
    tags = {
        TAG_KIND: KIND_BASELINE,
        TAG_TASK: config.pretext.task,
        TAG_ARCH: config.model.arch,
        TAG_WIDENING: str(config.model.widening),
        **_size_tag(config),
        TAG_DATA_HASH: data_hash,
        "mlflow.runName": f"baseline-{run_name(config)}",
        MLFLOW_PARENT_RUN: study_run_id(
            mlflow_client, experiment_id, config.tracking.experiment, uri
        ),
        **(extra_tags or {}),
    }
    datasets = dataset_inputs(config, data_hash, splits, eval_data)
    return _start_probe_run(mlflow_client, config, tags, device, "eval --baseline", datasets)


def _start_probe_run(
    mlflow_client: MlflowClient,
    config: Config,
    tags: dict[str, str],
    device: str,
    command: str,
    datasets: list[Any],
) -> TrackedRun:
    uri = config.tracking.resolved_uri()
    experiment_id = ensure_experiment(mlflow_client, config.tracking.experiment, uri)
    tags = {**tags, **provenance_tags(device, command)}
    created = mlflow_client.create_run(experiment_id, tags=tags, run_name=tags["mlflow.runName"])
    run = TrackedRun(mlflow_client, created.info.run_id, experiment_id, uri)
    run.log_params({k: v for k, v in config.flat().items() if k.startswith("eval.")})
    mlflow_client.log_inputs(run.run_id, datasets)
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
