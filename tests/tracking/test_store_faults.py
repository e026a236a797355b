"""The MLflow store under the faults users meet: a killed run, a moved repository, another store, read-only places.

A run whose process died must not stay RUNNING; a repository moved or copied must write into its own
`mlruns/`; an export whose run is in another store must say so in one line, at once; a store whose
folder or file cannot be written is one line naming the path and the cause.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import STAGE_ENV, pretrain_folder, run_pretrain
from helpers.interrupt import STAGE, STEPS, Target, Watched, interrupt_between_checkpoints

from bertpipe.tracking import MlflowTracker, TrackingError, client, log_export, open_experiment

pytestmark = pytest.mark.slow


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def in_another_process(code: str, uri: str) -> str:
    """Run `code` (with `uri`, `client`, `open_experiment` defined) in a fresh interpreter, as an earlier
    stage would: MLflow caches per process, e.g. each run's artifact repository."""
    prelude = f"from bertpipe.tracking import client, open_experiment\nuri = {uri!r}\n"
    done = subprocess.run([sys.executable, "-c", prelude + code], env=STAGE_ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_run_whose_process_died_is_ended_killed_by_the_next(store: str, caplog: pytest.LogCaptureFixture) -> None:
    mlflow_client = client(store)
    experiment_id = open_experiment(mlflow_client, store, "bertpipe")
    tags = {"bertpipe.host": socket.gethostname(), "bertpipe.pid": str(dead_pid()),
            "bertpipe.process_started": "1.0"}
    orphan = mlflow_client.create_run(experiment_id, run_name="killed", tags=tags).info.run_id
    elsewhere = mlflow_client.create_run(experiment_id, tags={**tags, "bertpipe.host": "another-host"}).info.run_id
    with caplog.at_level(logging.WARNING):
        tracker = MlflowTracker("bertpipe", "next", {}, {}, system_metrics=False)
    tracker.finish()
    assert mlflow_client.get_run(orphan).info.status == "KILLED"
    assert "died; ended KILLED by the next run" in mlflow_client.get_run(orphan).data.tags["bertpipe.ended"]
    assert mlflow_client.get_run(elsewhere).info.status == "RUNNING"  # not ours to judge
    assert mlflow_client.get_run(tracker.run_id).data.tags["bertpipe.pid"] != tags["bertpipe.pid"]
    assert f"MLflow run {orphan} (killed) was left RUNNING" in caplog.text


def test_a_run_killed_after_a_checkpoint_is_resumed_into_not_doubled(sample_examples: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = pretrain_folder(tmp_path / "run", sample_examples, {"mlflow.enabled": True})
    env = {**STAGE_ENV, "MLFLOW_TRACKING_URI": uri}
    with Watched(STAGE, folder, env) as watched:
        interrupt_between_checkpoints([Target(watched, folder / "models" / "checkpoint", lambda: watched.proc.pid)])
        watched.finish()
    done = run_pretrain(folder, env)
    assert done.returncode == 0, done.stderr[-3000:]
    mlflow_client = client(uri)
    (run,) = mlflow_client.search_runs([open_experiment(mlflow_client, uri, "bertpipe")])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in mlflow_client.get_metric_history(run.info.run_id, "mlm_loss")]
    assert sorted(set(steps)) == list(range(1, STEPS + 1))  # the steps after the checkpoint come again


def test_a_moved_repository_writes_into_its_own_mlruns(store: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "note.txt").write_text("x")
    run_id = in_another_process(f"""
c = client(uri)
run_id = c.create_run(open_experiment(c, uri, "bertpipe")).info.run_id
c.log_artifact(run_id, {str(tmp_path / "note.txt")!r})
print(run_id)""", store)
    old, new = tmp_path / "repo", tmp_path / "moved"
    shutil.move(old, new)
    uri = f"sqlite:///{new / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    moved = client(uri)
    experiment_id = open_experiment(moved, uri, "bertpipe")
    assert moved.get_experiment(experiment_id).artifact_location == (new / "mlruns").as_uri()
    assert moved.get_run(run_id).info.artifact_uri == (new / "mlruns" / run_id / "artifacts").as_uri()
    assert [a.path for a in moved.list_artifacts(run_id)] == ["note.txt"]
    moved.log_artifact(run_id, str(tmp_path / "note.txt"), "again")
    assert (new / "mlruns" / run_id / "artifacts" / "again" / "note.txt").is_file() and not old.exists()


def test_an_export_whose_run_is_in_another_store_says_so_at_once(store: str, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    open_experiment(client(store), store, "bertpipe")
    with caplog.at_level(logging.WARNING):
        assert log_export("0" * 32, tmp_path, {"step": 1}) is None
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"MLflow run {'0' * 32} is not in {store}" in line and "MLFLOW_TRACKING_URI" in line
    assert "dvc repro -f export" not in line


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder holding a working store, remounted read-only (needs root, as on these machines and CI)."""
    point = tmp_path / "ro"
    point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(point)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        in_another_process("open_experiment(client(uri), uri, 'bertpipe')", f"sqlite:///{point / 'mlflow.db'}")
        subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=True)


def test_a_read_only_store_folder_is_one_line_naming_the_lock_file(read_only_folder: Path) -> None:
    uri = f"sqlite:///{read_only_folder / 'mlflow.db'}"
    with pytest.raises(TrackingError) as caught:
        client(uri)
    assert str(caught.value).startswith(f"MLflow store {read_only_folder / 'mlflow.db'}: its lock file ")
    assert "cannot be made (Read-only file system); make" in str(caught.value) and "\n" not in str(caught.value)


def test_a_read_only_database_is_named_as_such(store: str, tmp_path: Path) -> None:
    open_experiment(client(store), store, "bertpipe")
    read_only = f"sqlite:///file:{tmp_path / 'repo' / 'mlflow.db'}?mode=ro&uri=true"  # what a foreign file gives
    with pytest.raises(TrackingError) as caught:
        open_experiment(client(read_only), read_only, "another")
    message = str(caught.value)
    assert "is read-only (OperationalError: attempt to write a readonly database)" in message
    assert "autoflush" not in message and "\n" not in message
