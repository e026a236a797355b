"""MLflow's UI: links that open it on the training runs, printed by every stage that logs, and `bertpipe ui`.

MLflow >= 3.10 ignores the experiment's `mlflow.experimentKind` tag: a browser that has not picked
"Model training" (top left) opens every experiment on the GenAI overview. The query
`?workflowType=machine_learning` picks it, for the runs table, a run, or a logged model alike.

`bertpipe ui` serves MLflow's UI on the project's store, bound to 127.0.0.1 (UI_PORT unless told),
and echoes the link that opens on the runs. The store is the one the stages log to (`mlflow.db` at the
repository root, from any folder, or `MLFLOW_TRACKING_URI`); for a tracking server there is nothing
to start: its own UI is linked.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from urllib.parse import urlparse

from bertpipe.repo import repo_root
from bertpipe.tracking.store import TrackingError, client, sqlite_path, tracking_uri

log = logging.getLogger(__name__)
UI_PORT = 5000  # `mlflow ui`'s default
TRAINING_VIEW = "workflowType=machine_learning"
READY_SECONDS = 120  # mlflow ui takes 5-20 s to answer on a busy 2-core machine


def ui_address(uri: str, port: int = UI_PORT) -> str | None:
    """The UI's address for the store at `uri`: a server's own, `mlflow ui`'s on this machine for SQLite,
    None for stores without one (a file store, Databricks)."""
    if urlparse(uri).scheme in ("http", "https"):
        return uri.rstrip("/")
    return f"http://127.0.0.1:{port}" if sqlite_path(uri) else None


def runs_link(address: str, experiment_id: str) -> str:
    """The experiment's runs table."""
    return f"{address}/#/experiments/{experiment_id}?{TRAINING_VIEW}"


def run_link(address: str, experiment_id: str, run_id: str) -> str:
    return f"{address}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def model_link(address: str, experiment_id: str, model_id: str) -> str:
    """A logged model's page (the experiment's Models view lists it)."""
    return f"{address}/#/experiments/{experiment_id}/models/{model_id}?{TRAINING_VIEW}"


def ui_command(uri: str, port: int = UI_PORT) -> str:
    """The `mlflow ui` command serving the SQLite store at `uri` on this machine only."""
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)} --host 127.0.0.1 --port {port}"


def announce_run(uri: str, experiment_id: str, run_id: str) -> None:
    """Log where the run and its experiment's runs table are, and how to start the UI for a SQLite store."""
    address = ui_address(uri)
    if address is None:
        return
    log.info("MLflow run: %s", run_link(address, experiment_id, run_id))
    log.info("MLflow runs table: %s%s", runs_link(address, experiment_id), _serve_hint(uri))


def announce_model(uri: str, experiment_id: str, model_id: str) -> None:
    """Log where the logged model is (after `announce_run`, which says how to start the UI)."""
    address = ui_address(uri)
    if address is not None:
        log.info("MLflow model: %s", model_link(address, experiment_id, model_id))


def _serve_hint(uri: str) -> str:
    if sqlite_path(uri) is None:
        return ""
    return f" (serve it with `bertpipe ui`, or `{ui_command(uri)}`)"


def serve(port: int, experiment: str | None, echo: Callable[[str], None]) -> int:
    """Run `mlflow ui` on the project's SQLite store until it stops (Ctrl+C), echoing the runs link once
    it answers; returns its exit status. For a server store, echo the link to its own UI and return 0.

    Args:
        port: the port on 127.0.0.1 (nothing else may listen on it).
        experiment: the experiment to link; None: params.yaml's `mlflow.experiment` at the repository root.
    """
    uri = tracking_uri()
    address = ui_address(uri, port)
    if address is None:
        raise TrackingError(f"MLflow store {uri} has no UI that bertpipe can start or link")
    local = sqlite_path(uri) is not None
    if local:
        _check_free(port)
    name = experiment or _experiment_name()
    experiment_id = _experiment_id(uri, name)
    link = runs_link(address, experiment_id) if experiment_id else address
    note = "" if experiment_id else f" (experiment {name!r} has no runs yet)"
    if not local:
        echo(f"MLflow UI of the tracking server: {link}{note}")
        return 0
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get(
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}  # GenAI jobs (judges): a process the runs table does not need
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    process = subprocess.Popen(command, env=env)
    signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))  # mlflow passes it on
    try:
        _wait_ready(address, process)
        echo(f"MLflow UI on {uri}: {link}{note} (Ctrl+C stops it)")
        return process.wait()
    except KeyboardInterrupt:  # the terminal sent SIGINT to mlflow too
        return process.wait()


def _experiment_name() -> str:
    from bertpipe.config import load_params

    params = repo_root() / "params.yaml"
    return load_params(params).mlflow.experiment if params.is_file() else "bertpipe"


def _experiment_id(uri: str, name: str) -> str | None:
    """The experiment's id, the store created first (with `Default`'s artifacts beside it) when it is new."""
    experiment = client(uri).get_experiment_by_name(name)
    return experiment.experiment_id if experiment else None


def _check_free(port: int) -> None:
    """Refuse a port in use: another UI answering there would look like ours."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise TrackingError(f"port {port} on 127.0.0.1 is in use; pick another with --port") from None


def _wait_ready(address: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise TrackingError(f"mlflow ui exited with status {process.returncode} before answering")
        try:
            with urllib.request.urlopen(f"{address}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise TrackingError(f"mlflow ui did not answer at {address} within {READY_SECONDS} s")
