"""What a store needs mending when a run opens it: artifact folders that moved, and runs whose process died.

- An experiment whose artifacts go into DVC's scratch folder (older bertpipe versions made them there
  for `--temp` and queued runs) is pointed at the repository's `mlruns/`.
- A repository moved or copied with its `mlflow.db` still names the old location's `mlruns/` in every
  experiment, run and model: the rows are pointed at the `mlruns/` beside the database now (the copy
  of the artifacts came along), so nothing is written into the other repository.
- A run left RUNNING by a process that died (`kill -9`, a crash, a lost machine) would stay RUNNING
  forever: each run is tagged with its process (host, pid, start time), and a RUNNING run whose process
  on this host is gone is ended KILLED the next time a run opens the experiment.

Only the embedded SQLite store is mended in place; a server's store is the server's to keep.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import psutil

log = logging.getLogger(__name__)
PROCESS_TAGS = ("bertpipe.host", "bertpipe.pid", "bertpipe.process_started")
ENDED_TAG = "bertpipe.ended"  # why a run was ended by another
_TABLES = (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("logged_models", "artifact_location"),
           ("model_versions", "source"), ("model_versions", "storage_location"))


def process_tags() -> dict[str, str]:
    """Which process a run belongs to, so a later run can tell whether it is still alive."""
    me = psutil.Process()
    return dict(zip(PROCESS_TAGS, (socket.gethostname(), str(me.pid), f"{me.create_time():.3f}"), strict=True))


def local_path(location: str) -> Path | None:
    parsed = urlparse(location)
    return Path(unquote(parsed.path)) if parsed.scheme in ("", "file") else None


def relocate(uri: str, experiment: Any, target: str) -> bool:
    """Point `experiment`'s artifacts at `target` when they go into DVC's scratch folder, or point every
    row under another repository's `mlruns/` at this one's; returns whether anything changed."""
    old, new = local_path(experiment.artifact_location), local_path(target)
    if old is None or new is None or old == new:
        return False
    import sqlalchemy

    old_runs, new_runs = (path if path.name == "mlruns" else path.parent for path in (old, new))
    if ".dvc" in old.parts:
        statements = [("UPDATE experiments SET artifact_location = :new WHERE experiment_id = :id",
                       {"new": target, "id": experiment.experiment_id})]
        why = "DVC's scratch folder, deleted after each experiment"
    elif old_runs.name == "mlruns" and old_runs != new_runs and _another_repository(old_runs.parent):
        prefix = {"old": old_runs.as_uri(), "new": new_runs.as_uri(), "cut": len(old_runs.as_uri()) + 1}
        statements = [(f"UPDATE {table} SET {column} = :new || substr({column}, :cut) "
                       f"WHERE substr({column}, 1, :cut - 1) = :old", prefix) for table, column in _TABLES]
        why = "the repository's old place (moved or copied)"
    else:
        return False
    with sqlalchemy.create_engine(uri).begin() as connection:  # the embedded store is ours to mend
        for statement, values in statements:
            connection.execute(sqlalchemy.text(statement), values)
    log.warning("MLflow experiment %r kept artifacts in %s, %s; they go to %s now", experiment.name, old, why, new)
    return True


def _another_repository(folder: Path) -> bool:
    """Where a repository was (nothing there now) or is (its own mlflow.db): not a folder a user chose."""
    return not folder.exists() or (folder / "mlflow.db").exists()


def end_dead_runs(mlflow_client: Any, experiment_id: str) -> list[str]:
    """End KILLED the experiment's RUNNING runs whose process, on this host, is gone; their ids."""
    host, ended = socket.gethostname(), []
    runs = mlflow_client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                     max_results=1000)
    for run in runs:
        tags = run.data.tags
        if tags.get("bertpipe.host") != host or _alive(tags.get("bertpipe.pid"), tags.get("bertpipe.process_started")):
            continue
        mlflow_client.set_tag(run.info.run_id, ENDED_TAG, f"its process {tags.get('bertpipe.pid')} died; "
                                                                  "ended KILLED by the next run")
        mlflow_client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
        log.warning("MLflow run %s (%s) was left RUNNING by process %s, which died; it is marked KILLED",
                    run.info.run_id, run.info.run_name, tags.get("bertpipe.pid"))
    return ended


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
