"""MLflow as a mirror of the DVC metrics: one run per `pretrain`, params, curves, artifacts, tags.

DVC's metrics and plots files stay the source of truth; this logger (in the spirit of
torchtitan's `BaseLogger.log(metrics, step)`) copies them into MLflow for comparison in its UI.
The tracking URI is `MLFLOW_TRACKING_URI` or the embedded SQLite store `mlflow.db` at the
repository root (an absolute path, so DVC's temporary experiment folders log to the same
store). An unreachable server fails the stage before training; a hiccup during training is
logged as a warning and retried at the next call, never fatal.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bertpipe.config import MlflowConfig
from bertpipe.errors import PipelineError

log = logging.getLogger(__name__)


def repo_root(start: Path | None = None) -> Path:
    """The repository a stage runs for, also from inside `.dvc/tmp/exps/...` (dvc exp run --temp)."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if folder.name == ".dvc":
            return folder.parent
    return Path(os.environ.get("DVC_ROOT", start)).resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


class Tracker:
    """Does nothing: for ranks other than 0 and for `mlflow.enabled: false`."""

    run_id: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record metrics at `step` (or run-level ones when step is None)."""

    def log_artifact(self, path: Path) -> None:
        """Attach a file to the run."""

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with MLflow's status (FINISHED, FAILED, KILLED)."""


class MlflowTracker(Tracker):
    def __init__(self, cfg: MlflowConfig, params: Mapping[str, Any], tags: Mapping[str, str],
                 resume_run_id: str | None = None) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        self._mlflow, self._pending = mlflow, []
        uri = tracking_uri()
        mlflow.set_tracking_uri(uri)
        with _fail_fast_http():
            try:
                experiment = mlflow.set_experiment(cfg.experiment)
            except Exception as err:  # MLflow raises many types for an unreachable store
                raise PipelineError(f"MLflow tracking server {uri} is unreachable ({_first_line(err)}); fix "
                                    "MLFLOW_TRACKING_URI or set mlflow.enabled: false") from None
        run = self._start(experiment.experiment_id, cfg, tags, resume_run_id)
        self.run_id = run.info.run_id
        if resume_run_id != self.run_id:
            mlflow.log_params({k: _param_value(v) for k, v in params.items()})

    def _start(self, experiment_id: str, cfg: MlflowConfig, tags: Mapping[str, str],
               resume_run_id: str | None) -> Any:
        """Continue the checkpoint's MLflow run when there is one, else start a new run."""
        mlflow = self._mlflow
        name = cfg.run_name or os.environ.get("DVC_EXP_NAME") or None
        if resume_run_id:
            try:
                return mlflow.start_run(run_id=resume_run_id, log_system_metrics=cfg.system_metrics)
            except Exception as err:
                log.warning("MLflow run %s cannot be continued (%s); starting a new run", resume_run_id,
                            _first_line(err))
        return mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=dict(tags),
                                log_system_metrics=cfg.system_metrics)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._pending.append((dict(metrics), step))
        self._flush()

    def log_artifact(self, path: Path) -> None:
        self._call(self._mlflow.log_artifact, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        self._flush()
        self._call(self._mlflow.end_run, status=status)

    def _flush(self) -> None:
        while self._pending:
            metrics, step = self._pending[0]
            if not self._call(self._mlflow.log_metrics, metrics, step=step):
                return
            self._pending.pop(0)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> bool:
        try:
            fn(*args, **kwargs)
            return True
        except Exception as err:  # a tracking hiccup must not end a long run
            log.warning("MLflow %s failed (%s); will retry, DVC's metrics files are unaffected", fn.__name__,
                        _first_line(err))
            return False


def git_commit(root: Path) -> str:
    """HEAD of the repository, or 'unknown' outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextmanager
def _fail_fast_http():
    """One quick try, no retries, while checking that the tracking server answers."""
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


def _param_value(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{err.__class__.__name__}: {text[0][:200]}" if text else err.__class__.__name__
