"""bertpipe.tracking against real MLflow stores: SQLite files in tmp_path (a server: test_experiments.py).

Setting up a store is what many runs do at once (`dvc exp run --run-all -j N`), inside DVC's scratch
folders, against stores in every state (missing, migrated, holding a deleted experiment or one
whose artifacts went to a scratch folder); after setup, no MLflow failure may end a training run.
"""

from __future__ import annotations

import logging
import multiprocessing
import sqlite3
from pathlib import Path

import pytest
import torch
from conftest import small_run

from bertpipe import tracking
from bertpipe.distributed import World, describe_devices
from bertpipe.loop import train
from bertpipe.tracking import MlflowTracker, TrackingError, client, open_experiment


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """MLFLOW_TRACKING_URI: a SQLite file that does not exist yet."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _open(uri: str, barrier: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue) -> None:
    barrier.wait()  # every process asks for the store at the same moment
    try:
        results.put(open_experiment(client(uri), uri, "bertpipe"))
    except Exception as err:
        results.put(repr(err))


def test_concurrent_processes_create_the_store_and_the_experiment_once(tmp_path: Path) -> None:
    """Four processes on a missing store: one schema, one experiment, no half-migrated tables."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_open, args=(uri, barrier, results)) for _ in range(4)]
    for process in processes:
        process.start()
    ids = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join()
    assert ids == [ids[0]] * 4, ids
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        experiments = db.execute("SELECT name, artifact_location FROM experiments WHERE name = 'bertpipe'").fetchall()
    assert not [name for name in tables if name.startswith("_alembic_tmp")]
    assert experiments == [("bertpipe", (tmp_path / "mlruns").as_uri())]


def test_artifacts_live_beside_the_default_store_from_dvc_scratch_folders(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc exp run --temp` and queue workers run stages in .dvc/tmp/exps/...: store and artifacts stay at the root."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    scratch = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    scratch.mkdir(parents=True)
    monkeypatch.chdir(scratch)
    uri = tracking.tracking_uri()
    assert uri == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment(open_experiment(mlflow_client, uri, "bertpipe"))
    assert experiment.artifact_location == (tmp_path / "repo" / "mlruns").as_uri()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs


def test_an_experiment_pointing_into_dvc_scratch_is_repaired(store: str, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    mlflow_client = client(store)
    scratch = (tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123" / "mlruns").as_uri()
    experiment_id = mlflow_client.create_experiment("bertpipe", artifact_location=scratch)
    with caplog.at_level(logging.WARNING):
        assert open_experiment(mlflow_client, store, "bertpipe") == experiment_id
    assert mlflow_client.get_experiment(experiment_id).artifact_location == (tmp_path / "mlruns").as_uri()
    assert "scratch folder" in caplog.text


def test_a_deleted_experiment_is_named_with_the_way_out(store: str) -> None:
    mlflow_client = client(store)
    mlflow_client.delete_experiment(mlflow_client.create_experiment("bertpipe"))
    with pytest.raises(TrackingError, match=r"'bertpipe' .* is deleted .* restore it .*mlflow\.experiment") as caught:
        open_experiment(mlflow_client, store, "bertpipe")
    assert "unreachable" not in str(caught.value)


def test_setup_errors_say_unreachable_only_when_a_connection_failed(tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match=r"server http://127.0.0.1:9 is unreachable"):
        client("http://127.0.0.1:9")  # the discard port: nothing listens
    (tmp_path / "mlflow.db").write_bytes(b"not a database\n" * 100)
    with pytest.raises(TrackingError, match=r"could not be set up \(.*not a database") as caught:
        client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "unreachable" not in str(caught.value)


def _failing(*args: object, **kwargs: object) -> None:
    raise ConnectionError("the tracking server went away")


def test_mlflow_failures_never_end_training_and_an_incomplete_run_ends_failed(
        store: str, sample_examples: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, one_thread: None) -> None:
    import mlflow

    monkeypatch.setattr(tracking, "RETRY_SECONDS", (0.0,))
    tracker = MlflowTracker("bertpipe", "flaky", {"train.steps": 4}, {}, system_metrics=False)
    monkeypatch.setattr(mlflow, "log_metrics", _failing)
    run = small_run(sample_examples, tmp_path)
    with caplog.at_level(logging.WARNING):
        train(run, tracker)
        tracker.finish()
    assert run.progress.state.step == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert all("\n" not in w for w in warnings) and any("log_metrics failed" in w for w in warnings)
    assert any("incomplete" in w and "FAILED" in w for w in warnings)
    assert client(store).get_run(tracker.run_id).info.status == "FAILED"


def test_records_that_failed_are_delivered_in_order_once_mlflow_recovers(
        store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.setattr(tracking, "RETRY_SECONDS", (0.0,))
    tracker = MlflowTracker("bertpipe", "recovers", {}, {}, system_metrics=False)
    log_metrics = mlflow.log_metrics
    monkeypatch.setattr(mlflow, "log_metrics", _failing)
    tracker.log_metrics({"mlm_loss": 3.0}, step=1)
    tracker.log_metrics({"mlm_loss": 2.0}, step=2)
    monkeypatch.setattr(mlflow, "log_metrics", log_metrics)
    tracker.log_metrics({"mlm_loss": 1.0}, step=3)
    tracker.finish()
    mlflow_client = client(store)
    history = mlflow_client.get_metric_history(tracker.run_id, "mlm_loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert mlflow_client.get_run(tracker.run_id).info.status == "FINISHED"


@pytest.mark.parametrize(("size", "per_node", "text"), [
    (1, None, "cpu"), (2, "2", "cpu (2 processes)"), (4, "2", "cpu (2 processes) x 2 nodes")])
def test_devices_read_as_text(size: int, per_node: str | None, text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if per_node is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", per_node)
    assert describe_devices(World(0, size, 0, torch.device("cpu"))) == text


def test_an_experiment_created_meanwhile_by_another_run_is_used(store: str) -> None:
    """On a server no lock is shared: a run that loses the race to create the experiment takes the winner's."""
    mlflow_client = client(store)
    existing = mlflow_client.create_experiment("bertpipe")
    assert tracking._create_experiment(mlflow_client, store, "bertpipe").experiment_id == existing
