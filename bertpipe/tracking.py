"""MLflow as a mirror of the DVC metrics: one run per `pretrain`, completed by `export` with the model.

DVC's metrics and plots files stay the source of truth; this logger (in the spirit of
torchtitan's `BaseLogger.log(metrics, step)`) copies them into MLflow for comparison in its UI.

- The store is `MLFLOW_TRACKING_URI`, or the embedded SQLite store `mlflow.db` at the repository
  root, whatever folder the stage runs in (DVC runs `--temp` and queued experiments inside
  `.dvc/tmp/exps/...`, a folder it deletes afterwards).
- For a SQLite store the artifacts live beside it, in `mlruns/` (MLflow's own default is the
  working directory, which would be that scratch folder). A server decides for itself.
- Creating and migrating the store and creating the experiment happen once, under a file lock
  (`filelock`), so any number of runs may start together on a missing or an existing store.
- Setup errors stop the stage before training with one line naming the cause. After setup no
  MLflow error ends a run: each failed call is one warning line and is retried later, in order;
  a run whose records could not all be delivered ends FAILED instead of FINISHED.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

from bertpipe.errors import PipelineError

log = logging.getLogger(__name__)
T = TypeVar("T")

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow 3: a training experiment
RETRY_SECONDS = (5.0, 30.0, 120.0, 300.0)  # waits between delivery attempts while MLflow keeps failing
FINAL_ATTEMPTS = 3  # deliveries tried at the end of a run, RETRY_SECONDS[0] apart


class TrackingError(PipelineError):
    """MLflow cannot be set up for this run; the message names the cause and the fix."""


def repo_root(start: Path | None = None) -> Path:
    """The repository a stage runs for, also from inside `.dvc/tmp/exps/...` (dvc exp run --temp, queue)."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if folder.name == ".dvc":
            return folder.parent
    return Path(os.environ.get("DVC_ROOT", start)).resolve()


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


def store_lock(uri: str) -> contextlib.AbstractContextManager:
    """A lock shared by every process using the same SQLite file (SQLite has no server to serialise
    schema migrations); nothing for a tracking server, which serialises its own."""
    database = sqlite_path(uri)
    if database is None:
        return contextlib.nullcontext()
    from filelock import FileLock

    database.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{database}.lock", timeout=600)


@contextlib.contextmanager
def fail_fast_http() -> Iterator[None]:
    """Bounded HTTP calls: one try and 10 seconds each; retrying is the caller's job."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def client(uri: str) -> Any:
    """An `MlflowClient` for `uri`, the store created or migrated under `store_lock` on first use."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    with store_lock(uri), fail_fast_http():
        try:
            mlflow_client = MlflowClient(uri)
            mlflow_client.search_experiments(max_results=1)  # builds (and migrates) the store now, locked
        except Exception as err:
            raise setup_error(err, uri) from None
    return mlflow_client


def open_experiment(mlflow_client: Any, uri: str, name: str) -> str:
    """The id of experiment `name`, created once (under the store's lock) with artifacts beside the store.

    An experiment made by an older bertpipe inside DVC's scratch folder is pointed back at the
    repository's `mlruns/`; a deleted experiment is an error naming the way out.
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
        _repair_scratch_location(experiment, uri)
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


def _repair_scratch_location(experiment: Any, uri: str) -> None:
    """Point an experiment whose artifacts were going into DVC's scratch folder back beside the store."""
    location = urlparse(experiment.artifact_location)
    local = Path(unquote(location.path)) if location.scheme in ("", "file") else None
    if local is None or ".dvc" not in local.parts:
        return
    database, target = sqlite_path(uri), artifact_root(uri)
    if database is None:
        raise TrackingError(f"MLflow experiment {experiment.name!r} keeps artifacts in {local}, a DVC scratch "
                            "folder that DVC deletes; set mlflow.experiment to a new name")
    import sqlalchemy

    with sqlalchemy.create_engine(uri).begin() as connection:  # the embedded store is ours to mend
        connection.execute(sqlalchemy.text("UPDATE experiments SET artifact_location = :target WHERE "
                                           "experiment_id = :id"), {"target": target, "id": experiment.experiment_id})
    log.warning("MLflow experiment %r kept artifacts in DVC's scratch folder %s (deleted after each experiment); "
                "new runs keep them in %s", experiment.name, local, target)


def setup_error(err: Exception, uri: str) -> TrackingError:
    """One line naming why MLflow could not be set up; "unreachable" only when a connection failed."""
    text = f"{err.__class__.__name__}: {first_line(err)}"
    if _is_connection_failure(err):
        return TrackingError(f"MLflow tracking server {uri} is unreachable ({text}); start it, fix "
                             "MLFLOW_TRACKING_URI, or set mlflow.enabled: false")
    return TrackingError(f"MLflow store {uri} could not be set up ({text}); fix it or set mlflow.enabled: false")


def _is_connection_failure(err: BaseException) -> bool:
    """MLflow's REST client wraps requests' errors in an MlflowException; their text tells them apart."""
    if isinstance(err, ConnectionError | TimeoutError):
        return True
    return any(s in str(err) for s in ("Max retries exceeded", "Connection refused", "Failed to establish",
                                       "Read timed out", "Name or service not known"))


class Tracker:
    """Does nothing: for ranks other than 0 and for `mlflow.enabled: false`."""

    run_id: str | None = None
    experiment_id: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record metrics at `step` (or run-level ones when step is None)."""

    def log_dict(self, obj: Mapping[str, Any], name: str) -> None:
        """Attach a JSON document to the run."""

    def log_artifact(self, path: Path) -> None:
        """Attach a file to the run."""

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with MLflow's status (FINISHED, FAILED, KILLED)."""


class MlflowTracker(Tracker):
    """A live MLflow run. Records queue in order; a failed delivery waits (RETRY_SECONDS) and retries."""

    def __init__(self, experiment: str, run_name: str | None, params: Mapping[str, Any], tags: Mapping[str, str],
                 system_metrics: bool, resume_run_id: str | None = None) -> None:
        import mlflow

        self._mlflow, self.uri = mlflow, tracking_uri()
        self._client = client(self.uri)
        self.experiment_id = open_experiment(self._client, self.uri, experiment)
        mlflow.set_tracking_uri(self.uri)
        with store_lock(self.uri), fail_fast_http():
            try:
                run = self._start(run_name, tags, system_metrics, resume_run_id)
            except Exception as err:
                raise setup_error(err, self.uri) from None
        self.run_id = run.info.run_id
        self._pending: list[tuple[str, Callable[[], object]]] = []
        self._failures, self._next_try = 0, 0.0
        if resume_run_id != self.run_id:
            self._submit("log_params", lambda: mlflow.log_params({k: str(v) for k, v in params.items()}))

    def _start(self, run_name: str | None, tags: Mapping[str, str], system_metrics: bool,
               resume_run_id: str | None) -> Any:
        """Continue the checkpoint's MLflow run when there is one, else start a new run."""
        if resume_run_id:
            try:
                return self._mlflow.start_run(run_id=resume_run_id, log_system_metrics=system_metrics)
            except Exception as err:
                log.warning("MLflow run %s cannot be continued (%s); starting a new run", resume_run_id,
                            first_line(err))
        return self._mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name, tags=dict(tags),
                                      log_system_metrics=system_metrics)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        values = dict(metrics)
        self._submit("log_metrics", lambda: self._mlflow.log_metrics(values, step=step))

    def log_dict(self, obj: Mapping[str, Any], name: str) -> None:
        document = dict(obj)
        self._submit("log_dict", lambda: self._mlflow.log_dict(document, name))

    def log_artifact(self, path: Path) -> None:
        self._submit("log_artifact", lambda: self._mlflow.log_artifact(str(path)))

    def finish(self, status: str = "FINISHED") -> None:
        _retried(lambda: self._flush(now=True) or None)
        if self._pending:
            log.warning("MLflow run %s is incomplete (%d records could not be delivered); it is marked FAILED. "
                        "DVC's metrics and plots files hold everything", self.run_id, len(self._pending))
            status = "FAILED"
        self._call("end_run", lambda: self._mlflow.end_run(status=status))

    def _submit(self, name: str, call: Callable[[], object]) -> None:
        self._pending.append((name, call))
        self._flush()

    def _flush(self, now: bool = False) -> bool:
        """Deliver queued records in order (`now`: even while waiting to retry); stop at the first failure.
        Returns whether all went."""
        if not now and time.monotonic() < self._next_try:
            return False
        while self._pending:
            name, call = self._pending[0]
            if not self._call(name, call):
                wait = RETRY_SECONDS[min(self._failures, len(RETRY_SECONDS) - 1)]
                self._failures += 1
                self._next_try = time.monotonic() + wait
                return False
            self._pending.pop(0)
            self._failures = 0
        return True

    def _call(self, name: str, call: Callable[[], object]) -> bool:
        try:
            with store_lock(self.uri), fail_fast_http():
                call()
            return True
        except Exception as err:  # a tracking hiccup must not end a long run
            log.warning("MLflow %s failed (%s); will retry, DVC's metrics files are unaffected", name, first_line(err))
            return False


def git_commit(root: Path) -> str:
    """The commit a run starts from: DVC's experiment baseline, else HEAD, else 'unknown' outside git."""
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        return os.environ["DVC_EXP_BASELINE_REV"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_tags(commit: str) -> dict[str, str]:
    """The DVC experiment a run belongs to, when DVC started it: its name and its git ref."""
    name = os.environ.get("DVC_EXP_NAME")
    if not name:
        return {}
    from dvc.repo.experiments.refs import ExpRefInfo

    tags = {"dvc.exp_name": name}
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc.exp_ref"] = str(ExpRefInfo(commit, name))
    return tags


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else err.__class__.__name__


def log_export(run_id: str, model_dir: Path, metrics: Mapping[str, Any], register_as: str = "") -> str | None:
    """Complete pretrain's MLflow run with the export: the Hugging Face folder as artifacts under `model/`
    (`from_pretrained` loads what `mlflow.artifacts.download_artifacts` returns), the export metrics
    under `export/...` and as `export.json`, and, with `register_as`, a new version of that registered
    model. Returns the version's source URI, or None when MLflow failed (one warning line each time).
    """
    uri = tracking_uri()
    try:
        mlflow_client = client(uri)
    except TrackingError as err:
        log.warning("%s", err)
    else:
        source = _retried(lambda: _attempt_export(mlflow_client, uri, run_id, model_dir, metrics, register_as))
        if source is not None:
            return source
    log.warning("MLflow run %s lacks the exported model; it is in %s (rerun with `dvc repro -f export`)",
                run_id, model_dir)
    return None


def _attempt_export(mlflow_client: Any, uri: str, run_id: str, model_dir: Path, metrics: Mapping[str, Any],
                    register_as: str) -> str | None:
    """One try of `_log_export`; a failure is one warning line and None."""
    try:
        return _log_export(mlflow_client, uri, run_id, model_dir, metrics, register_as)
    except Exception as err:  # MLflow raises many types
        log.warning("MLflow: logging the export to run %s failed (%s)", run_id, first_line(err))
        return None


def _retried(attempt: Callable[[], T | None]) -> T | None:
    """`attempt()` until it returns something, at most FINAL_ATTEMPTS times, RETRY_SECONDS[0] apart."""
    for n in range(FINAL_ATTEMPTS):
        if (result := attempt()) is not None:
            return result
        if n < FINAL_ATTEMPTS - 1:
            time.sleep(RETRY_SECONDS[0])
    return None


def _log_export(mlflow_client: Any, uri: str, run_id: str, model_dir: Path, metrics: Mapping[str, Any],
                register_as: str) -> str:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    scalars = [Metric(f"export/{k}", float(v), now, 0) for k, v in metrics.items()
               if isinstance(v, int | float) and not isinstance(v, bool)]
    with store_lock(uri), fail_fast_http():
        mlflow_client.log_artifacts(run_id, str(model_dir), "model")
        mlflow_client.log_dict(run_id, dict(metrics), "export.json")
        mlflow_client.log_batch(run_id, metrics=scalars)
        source = f"{mlflow_client.get_run(run_id).info.artifact_uri}/model"
        if register_as:
            version = _register(mlflow_client, register_as, source, run_id)
            log.info("registered %s as version %s of MLflow model %r", source, version, register_as)
    return source


def _register(mlflow_client: Any, name: str, source: str, run_id: str) -> str:
    """A new version of registered model `name` (created if new) pointing at `source`."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return mlflow_client.create_model_version(name, source, run_id=run_id).version
