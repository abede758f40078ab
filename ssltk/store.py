"""The tracking store's plumbing: a quiet ``MlflowClient`` for a URI, SQLite stores created
atomically, remote stores with bounded timeouts, experiments created on first use.

Artifacts of a SQLite store go to ``mlruns/`` beside the database file. A new SQLite store is
created and migrated in a temporary file under a lock on its folder, then renamed into place, so
concurrent first runs wait for one another and an interrupted creation leaves nothing behind.
Remote stores get bounded timeouts and retries (unless the ``MLFLOW_HTTP_REQUEST_*`` variables say
otherwise). mlflow is imported lazily and kept quiet.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import warnings
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssltk import fsutil
from ssltk.errors import UserError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["artifact_location", "client", "ensure_experiment", "ensure_sqlite_store", "find_run"]

#: Bounds for a remote store (seconds, attempts), unless set in the environment: mlflow's defaults
#: retry an unreachable server for minutes without a word.
REMOTE_TIMEOUTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}


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
    return (db.parent.resolve() / "mlruns" / experiment_folder(experiment)).as_uri()


def experiment_folder(experiment: str) -> str:
    """One path component for ``experiment``: never ``.``, ``..`` or hidden, so that every
    experiment's artifacts stay inside ``mlruns/``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._-")
    return slug or "default"


#: MLflow 3's UI opens an experiment by its kind: a training one on the runs table (else on the
#: GenAI overview of traces).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(mlflow_client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created (with its artifact location and
    :data:`EXPERIMENT_KIND`) if missing."""
    from mlflow.exceptions import MlflowException

    found = mlflow_client.get_experiment_by_name(name)
    if found is None:
        try:
            return mlflow_client.create_experiment(
                name, artifact_location=artifact_location(tracking_uri, name), tags=EXPERIMENT_KIND
            )
        except MlflowException:  # created meanwhile by a concurrent run
            found = mlflow_client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        mlflow_client.restore_experiment(found.experiment_id)
    for key, value in EXPERIMENT_KIND.items():  # made before ssltk set it; a user's own kind stays
        if key not in found.tags:
            mlflow_client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def find_run(mlflow_client: MlflowClient, run_id: str) -> Any:
    """The run ``run_id`` of the store, or None when it has none."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_run(run_id)
    except MlflowException:
        return None
