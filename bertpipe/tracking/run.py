"""The MLflow run of one `pretrain`: params, per-step metrics and artifacts, delivered in order.

The training loop talks to a `Tracker`: `MlflowTracker` on rank 0 with `mlflow.enabled: true`,
`NullTracker`, which does nothing, everywhere else. After setup no MLflow error ends a run
(`bertpipe.tracking.delivery`). The run ends FINISHED when everything arrived or only params and
artifacts were refused (tag `bertpipe.refused` says which and what was done), FAILED when a metric was lost.
The closing warning line counts every record MLflow lacks and gives the status the run has there, or says
that none could be set (a server refusing the credentials shows the run RUNNING).

A run left RUNNING by a process that died (`kill -9`, a crash, a lost machine) would stay RUNNING
forever: each run is tagged with its process (host, pid, start time), and a RUNNING run whose process
on this host is gone is ended KILLED, through MLflow's API, the next time a run opens the experiment.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import psutil

from bertpipe.errors import first_line
from bertpipe.tracking.delivery import (
    Delivery,
    Record,
    artifact_record,
    dict_record,
    metrics_record,
    param_text,
    params_record,
    tag_record,
)
from bertpipe.tracking.store import client, fail_fast_http, open_experiment, setup_error, store_lock, tracking_uri
from bertpipe.tracking.ui import announce_run

log = logging.getLogger(__name__)
REFUSED_TAG = "bertpipe.refused"  # what MLflow refused of this run, and what was done instead
MAX_TAG_TEXT = 5000  # MLflow's tag values hold 8000 characters
PROCESS_TAGS = ("bertpipe.host", "bertpipe.pid", "bertpipe.process_started")
ENDED_TAG = "bertpipe.ended"  # why a run was ended by another


class Tracker(Protocol):
    """What the training loop calls: `MlflowTracker` or `NullTracker`."""

    run_id: str | None
    experiment_id: str | None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record metrics at `step` (or run-level ones when step is None)."""

    def log_dict(self, obj: Mapping[str, Any], name: str) -> None:
        """Attach a JSON document to the run."""

    def log_artifact(self, path: Path) -> None:
        """Attach a file to the run."""

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with MLflow's status (FINISHED, FAILED, KILLED)."""


class NullTracker:
    """A `Tracker` that does nothing: for ranks other than 0 and for `mlflow.enabled: false`."""

    run_id: str | None = None
    experiment_id: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_dict(self, obj: Mapping[str, Any], name: str) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker:
    """A live MLflow run (MLflow's active run, so system metrics follow it); records go through a `Delivery`."""

    def __init__(self, experiment: str, run_name: str | None, params: Mapping[str, Any], tags: Mapping[str, str],
                 system_metrics: bool, resume_run_id: str | None = None) -> None:
        import mlflow

        self._mlflow, self.uri = mlflow, tracking_uri()
        self._client = client(self.uri)
        self.experiment_id = open_experiment(self._client, self.uri, experiment)
        mlflow.set_tracking_uri(self.uri)
        with store_lock(self.uri), fail_fast_http():
            try:
                end_dead_runs(self._client, self.experiment_id)
                run = self._start(run_name, {**tags, **process_tags()}, system_metrics, resume_run_id)
            except Exception as err:
                raise setup_error(err, self.uri) from None
        self.run_id = run.info.run_id
        announce_run(self.uri, self.experiment_id, self.run_id)
        self._delivery = Delivery(self.uri)
        if resume_run_id != self.run_id:
            self._delivery.submit(params_record(self._client, self.run_id,
                                                {k: param_text(v) for k, v in params.items()}))

    def _start(self, run_name: str | None, tags: Mapping[str, str], system_metrics: bool,
               resume_run_id: str | None) -> Any:
        """Continue the checkpoint's MLflow run when there is one, else start a new run."""
        if resume_run_id:
            try:
                run = self._mlflow.start_run(run_id=resume_run_id, log_system_metrics=system_metrics)
                self._mlflow.set_tags({key: tags[key] for key in PROCESS_TAGS})  # the process it lives in now
                return run
            except Exception as err:
                log.warning("MLflow run %s cannot be continued (%s); starting a new run", resume_run_id,
                            first_line(err))
        return self._mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name, tags=dict(tags),
                                      log_system_metrics=system_metrics)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if metrics:
            self._delivery.submit(metrics_record(self._client, self.run_id, metrics, step))

    def log_dict(self, obj: Mapping[str, Any], name: str) -> None:
        self._delivery.submit(dict_record(self._client, self.run_id, obj, name))

    def log_artifact(self, path: Path) -> None:
        self._delivery.submit(artifact_record(self._client, self.run_id, path))

    def finish(self, status: str = "FINISHED") -> None:
        """Deliver what is queued (a few final attempts), note what was refused, end the run (FAILED instead of
        FINISHED when a metric is lost), and say in one line what MLflow lacks, counting every record lost
        (refused or undeliverable), and the status the run has there: the one set, or that none could be."""
        self._delivery.close()
        if self._delivery.changes:
            text = "; ".join(f"{name}: {note}" for name, note in self._delivery.changes.items())
            self._delivery.submit(tag_record(self._client, self.run_id, REFUSED_TAG, text[:MAX_TAG_TEXT]))
        lost = self._delivery.close()
        final = "FAILED" if status == "FINISHED" and self._delivery.lost_essential else status
        ended: list[str] = []
        self._delivery.submit(self._end_record(final, ended))
        self._delivery.close()
        if not ended:
            verdict = f"; its status {final} could not be set, so MLflow shows it RUNNING"
        else:
            verdict = f"; it is marked {final}" if final != status else ""
        if lost:
            log.warning("MLflow run %s is incomplete: it lacks %d records (%s)%s. DVC's metrics and plots files hold "
                        "everything", self.run_id, len(lost), ", ".join(sorted({r.name for r in lost})), verdict)
        elif verdict:
            log.warning("MLflow run %s%s", self.run_id, verdict)

    def _end_record(self, status: str, ended: list[str]) -> Record:
        """Ending the run with `status` (appended to `ended` once the store has it). MLflow's `end_run` drops its
        active run before it asks the store, so after a failure a retry would end nothing: it asks the store
        itself."""

        def send() -> None:
            active = self._mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                self._mlflow.end_run(status=status)  # also stops the run's system metrics
            else:
                self._client.set_terminated(self.run_id, status)
            ended.append(status)

        return Record("end_run", send)


def process_tags() -> dict[str, str]:
    """Which process a run belongs to, so a later run can tell whether it is still alive."""
    me = psutil.Process()
    return dict(zip(PROCESS_TAGS, (socket.gethostname(), str(me.pid), f"{me.create_time():.3f}"), strict=True))


def end_dead_runs(mlflow_client: Any, experiment_id: str) -> None:
    """End KILLED the experiment's RUNNING runs whose process, on this host, is gone."""
    host = socket.gethostname()
    runs = mlflow_client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                     max_results=1000)
    for run in runs:
        tags = run.data.tags
        if tags.get("bertpipe.host") != host or _alive(tags.get("bertpipe.pid"), tags.get("bertpipe.process_started")):
            continue
        mlflow_client.set_tag(run.info.run_id, ENDED_TAG, f"its process {tags.get('bertpipe.pid')} died; "
                                                                  "ended KILLED by the next run")
        mlflow_client.set_terminated(run.info.run_id, "KILLED")
        log.warning("MLflow run %s (%s) was left RUNNING by process %s, which died; it is marked KILLED",
                    run.info.run_id, run.info.run_name, tags.get("bertpipe.pid"))


def _alive(pid: str | None, started: str | None) -> bool:
    """Is the process still the one that started the run (a recycled pid is another process)?"""
    if not pid or not started or not pid.isdigit():
        return True  # not ours to judge
    try:
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < 1.0
    except (psutil.NoSuchProcess, ValueError):
        return False
    except psutil.AccessDenied:
        return os.path.exists(f"/proc/{pid}")


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
