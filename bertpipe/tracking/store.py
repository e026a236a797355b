"""The tracking store: which one, created and migrated once under a lock, the experiment in it, and setup errors.

- The store is `MLFLOW_TRACKING_URI`, or the embedded SQLite store `mlflow.db` at the repository
  root, whatever folder the stage runs in (DVC runs `--temp` and queued experiments inside
  `.dvc/tmp/exps/...`, a folder it deletes afterwards).
- For a SQLite store the artifacts live beside it, in `mlruns/`, MLflow's own `Default` experiment's
  too (MLflow's default is the working directory, which would be that scratch folder). A server
  decides for itself.
- Creating and migrating the store and creating the experiment happen once, under a file lock
  (`filelock`), so any number of runs may start together on a missing or an existing store.
- An embedded store whose artifacts went astray is mended when a run opens it (`relocate`): an
  experiment whose artifacts go into DVC's scratch folder (older bertpipe versions made them there for
  `--temp` and queued runs) is pointed at the repository's `mlruns/`; a repository moved or copied with
  its `mlflow.db` still names the old location's `mlruns/` in every experiment, run and model, and the
  rows are pointed at the `mlruns/` beside the database now (the copy of the artifacts came along), so
  nothing is written into the other repository. A server's store is the server's to keep.
- Setup errors stop the stage before training with one line naming the cause.

MLflow's API has no call that moves artifacts: an experiment's, a run's, a logged model's and a model
version's locations are set once, at creation. So `relocate` runs SQL `UPDATE`s on MLflow's own tables
(`ARTIFACT_COLUMNS`), written for its schema at alembic revision `SCHEMA_REVISION`, which
tests/tracking/test_mlflow_schema.py pins against the installed MLflow. A store at any other revision
is not written: the stage stops with one line naming the way out.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import unquote, urlparse

from bertpipe.errors import PipelineError, cause
from bertpipe.repo import repo_root

log = logging.getLogger(__name__)

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow 3: a training experiment
DEFAULT_EXPERIMENT = "Default"  # MLflow's own experiment, created with every store
# Every column that names an artifact location, by table; `experiments` is also updated by `experiment_id`.
ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("logged_models", "artifact_location"), ("model_versions", "source"),
                    ("model_versions", "storage_location"))
SCHEMA_REVISION = "dc11669786a5"  # the alembic head of MLflow 3.17's tracking store
SCHEMA_MLFLOW = "3.17"  # the MLflow whose schema that is
_CONNECTION_TEXT = ("Max retries exceeded", "Connection refused", "Failed to establish", "Read timed out",
                    "Name or service not known", "Connection aborted", "Connection reset")
# A server's 401 or 403 is about who asks, not what: what mends it is the credentials MLflow's client sends.
CREDENTIALS_REFUSED = {
    401: "not authenticated: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, "
         "to credentials the server accepts (expired ones are refused too)",
    403: "permission denied: the user that MLFLOW_TRACKING_USERNAME (or MLFLOW_TRACKING_TOKEN) names lacks EDIT "
         "permission on the experiment; grant it, or set them to a user who has it"}


class TrackingError(PipelineError):
    """MLflow cannot be set up for this run; the message names the cause and the fix."""


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI, or None for any other store."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite" or not parsed.path or parsed.path == "/:memory:":
        return None
    return Path(unquote(parsed.path[1:] if parsed.path.startswith("//") else parsed.path))


def artifact_root(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: `mlruns/` beside a SQLite file; a server's own choice."""
    database = sqlite_path(uri)
    return (database.resolve().parent / "mlruns").as_uri() if database else None


def _root_cause(err: BaseException) -> BaseException:
    """The error at the bottom of `err`'s chain (a driver's `orig`, `__cause__`, `__context__`)."""
    seen = {id(err)}
    while (inner := getattr(err, "orig", None) or err.__cause__ or err.__context__) is not None:
        if id(inner) in seen:
            break
        seen.add(id(inner))
        err = inner
    return err


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """A lock shared by every process using the same SQLite file (SQLite has no server to serialise
    schema migrations); nothing for a tracking server, which serialises its own. A folder where the
    lock file cannot be made (read-only, not ours) is a TrackingError naming it."""
    database = sqlite_path(uri)
    if database is None:
        yield
        return
    from filelock import FileLock

    lock = FileLock(f"{database}.lock", timeout=600)
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as err:
        raise TrackingError(f"MLflow store {database}: its lock file {lock.lock_file} cannot be made "
                            f"({err.strerror or err}); make {database.parent} writable, or set MLFLOW_TRACKING_URI or "
                            "mlflow.enabled: false") from None
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def fail_fast_http() -> Iterator[None]:
    """Bounded HTTP calls: one try and 10 seconds each; retrying is the caller's job."""
    with mock.patch.dict(os.environ, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10"):
        yield


def client(uri: str) -> Any:
    """An `MlflowClient` for `uri`, the store created or migrated under `store_lock` on first use.

    A new SQLite store is created with the repository's artifact root, so that MLflow's `Default`
    experiment (made with the tables) keeps its artifacts in `mlruns/0` too, not in the working folder.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    with store_lock(uri), fail_fast_http():
        try:
            if sqlite_path(uri) is not None:
                from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

                SqlAlchemyStore(uri, artifact_root(uri))  # tables, migrations and `Default`, if new
            mlflow_client = MlflowClient(uri, registry_uri=uri)  # not MLflow's global registry, whatever set it
            mlflow_client.search_experiments(max_results=1)  # reachable, and the schema is current
        except Exception as err:
            raise setup_error(err, uri) from None
    return mlflow_client


def open_experiment(mlflow_client: Any, uri: str, name: str) -> str:
    """The id of experiment `name`, created once (under the store's lock) with artifacts beside the store.

    An experiment made by an older bertpipe inside DVC's scratch folder, and MLflow's `Default` made
    there by an older store setup, are pointed back at the repository's `mlruns/`; a deleted
    experiment is an error naming the way out.
    """
    with store_lock(uri), fail_fast_http():
        try:
            experiment = mlflow_client.get_experiment_by_name(name) or _create_experiment(mlflow_client, uri, name)
        except Exception as err:
            raise setup_error(err, uri) from None
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} (id {experiment.experiment_id}) is deleted in {uri}; "
                                f"restore it (mlflow experiments restore -x {experiment.experiment_id}) or set "
                                "mlflow.experiment to another name")
        _mend_location(experiment, uri)
        if sqlite_path(uri) is not None:  # read after the mend, which may have moved it along
            default = mlflow_client.get_experiment_by_name(DEFAULT_EXPERIMENT)
            relocate(uri, default, f"{artifact_root(uri)}/{default.experiment_id}")
        for key, value in EXPERIMENT_KIND.items():
            if experiment.tags.get(key) != value:
                mlflow_client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def _create_experiment(mlflow_client: Any, uri: str, name: str) -> Any:
    """A new experiment; on a server another run may create it first, and then that one is used."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_experiment(mlflow_client.create_experiment(
            name, artifact_location=artifact_root(uri), tags=EXPERIMENT_KIND))
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow_client.get_experiment_by_name(name)


def _mend_location(experiment: Any, uri: str) -> None:
    """Artifacts that go into DVC's scratch folder or another repository's `mlruns/` come back beside the
    store (`relocate`); a server's experiment in a scratch folder is an error."""
    target = artifact_root(uri)
    if target is not None:
        relocate(uri, experiment, target)
        return
    local = local_path(experiment.artifact_location)
    if local is not None and ".dvc" in local.parts:
        raise TrackingError(f"MLflow experiment {experiment.name!r} keeps artifacts in {local}, a DVC scratch "
                            "folder that DVC deletes; set mlflow.experiment to a new name")


def local_path(location: str) -> Path | None:
    """The folder of a `file:` (or schemeless) location; None for any other scheme."""
    parsed = urlparse(location)
    return Path(unquote(parsed.path)) if parsed.scheme in ("", "file") else None


def relocate(uri: str, experiment: Any, target: str) -> None:
    """Point `experiment`'s artifacts at `target` when they go into DVC's scratch folder, or point every
    row under another repository's `mlruns/` at this one's."""
    old, new = local_path(experiment.artifact_location), local_path(target)
    if old is None or new is None or old == new:
        return
    import sqlalchemy

    old_runs, new_runs = (path if path.name == "mlruns" else path.parent for path in (old, new))
    if ".dvc" in old.parts:
        statements = [("UPDATE experiments SET artifact_location = :new WHERE experiment_id = :id",
                       {"new": target, "id": experiment.experiment_id})]
        why = "DVC's scratch folder, deleted after each experiment"
    elif old_runs.name == "mlruns" and old_runs != new_runs and _another_repository(old_runs.parent):
        prefix = {"old": old_runs.as_uri(), "new": new_runs.as_uri(), "cut": len(old_runs.as_uri()) + 1}
        statements = [(f"UPDATE {table} SET {column} = :new || substr({column}, :cut) "
                       f"WHERE substr({column}, 1, :cut - 1) = :old", prefix) for table, column in ARTIFACT_COLUMNS]
        why = "the repository's old place (moved or copied)"
    else:
        return
    with sqlalchemy.create_engine(uri).begin() as connection:  # the embedded store is ours to mend
        revision = connection.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).scalar()
        if revision != SCHEMA_REVISION:
            raise TrackingError(f"MLflow experiment {experiment.name!r} keeps artifacts in {old}, {why}, and bertpipe "
                                f"moves them only in a store of MLflow {SCHEMA_MLFLOW}'s schema (revision "
                                f"{SCHEMA_REVISION}), not {revision}; install mlflow=={SCHEMA_MLFLOW}.*, or set "
                                "mlflow.experiment to a new name")
        for statement, values in statements:
            connection.execute(sqlalchemy.text(statement), values)
    log.warning("MLflow experiment %r kept artifacts in %s, %s; they go to %s now", experiment.name, old, why, new)


def _another_repository(folder: Path) -> bool:
    """Where a repository was (nothing there now) or is (its own mlflow.db): not a folder a user chose."""
    return not folder.exists() or (folder / "mlflow.db").exists()


def setup_error(err: Exception, uri: str) -> TrackingError:
    """One line naming why MLflow could not be set up; "unreachable" only when a connection failed. The
    cause is the innermost error: SQLAlchemy's own text ("... autoflush ...") hides sqlite's."""
    refused = credentials_refused(err)
    err = _root_cause(err)
    text = cause(err)
    if refused is not None:
        return TrackingError(f"MLflow tracking server {uri} refused bertpipe ({text}): {refused}; or set "
                             "mlflow.enabled: false")
    database = sqlite_path(uri)
    if database is not None and "readonly database" in str(err):
        return TrackingError(f"MLflow store {database} is read-only ({text}); make it writable, or set "
                             "MLFLOW_TRACKING_URI or mlflow.enabled: false")
    if is_connection_failure(err):
        return TrackingError(f"MLflow tracking server {uri} is unreachable ({text}); start it, fix "
                             "MLFLOW_TRACKING_URI, or set mlflow.enabled: false")
    return TrackingError(f"MLflow store {uri} could not be set up ({text}); fix it or set mlflow.enabled: false")


def is_connection_failure(err: BaseException) -> bool:
    """No connection could be made: MLflow's REST client wraps requests' errors, their text tells them apart."""
    if isinstance(err, ConnectionError | TimeoutError):
        return True
    return any(s in str(err) for s in _CONNECTION_TEXT)


def http_status(err: BaseException) -> int | None:
    """The HTTP status of the store's answer: MLflow's errors by their error code (a local store's too, and a
    failed connection as 500), requests' (artifact uploads to a server) by their response; None otherwise."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.get_http_status_code()
    return getattr(getattr(err, "response", None), "status_code", None)


def credentials_refused(err: BaseException) -> str | None:
    """What mends a 401 or 403, which refuses the credentials (missing, expired, or a permission revoked) rather
    than a record, so no retry and no other form of the record gets past it; None for any other error."""
    return CREDENTIALS_REFUSED.get(http_status(err))
