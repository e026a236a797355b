"""Links into the MLflow UI that open on the training view, printed by every stage that logs.

MLflow >= 3.10 ignores the experiment's `mlflow.experimentKind` tag: a browser that has not picked
"Model training" (top left) opens every experiment on the GenAI overview. The query
`?workflowType=machine_learning` picks it, for the runs table, a run, or a logged model alike.
For a SQLite store there is no UI running: the link is for `bertpipe ui` (or the `mlflow ui`
command printed with it), which serves on 127.0.0.1:UI_PORT.
"""

from __future__ import annotations

import logging
import shlex
from urllib.parse import urlparse

from bertpipe.tracking.store import sqlite_path

log = logging.getLogger(__name__)
UI_PORT = 5000  # `mlflow ui`'s default
TRAINING_VIEW = "workflowType=machine_learning"


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
