"""bertpipe.tracking against real MLflow stores: SQLite files in tmp_path (a server: test_experiments.py).

Setting up a store is what many runs do at once (`dvc exp run --run-all -j N`), inside DVC's scratch
folders, against stores in every state (missing, migrated, holding a deleted experiment or one
whose artifacts went to a scratch folder); after setup, no MLflow failure may end a training run.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import sqlite3
from pathlib import Path

import pytest
import torch
import yaml
from conftest import small_run

from bertpipe import tracking
from bertpipe.config import flatten
from bertpipe.tracking import MlflowTracker, TrackingError, client, delivery, open_experiment
from bertpipe.tracking import store as tracking_store
from bertpipe.tracking.delivery import param_text
from bertpipe.training.distributed import World, describe_devices
from bertpipe.training.loop import train


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


@pytest.mark.slow
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
    """`dvc exp run --temp` and queue workers run stages in .dvc/tmp/exps/..., a copy of the repository with its
    own .dvc/: store and artifacts stay at the root, MLflow's own `Default` experiment's too."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = tmp_path / "repo"
    scratch = repo / ".dvc" / "tmp" / "exps" / "tmpabc123"
    (scratch / ".dvc").mkdir(parents=True)
    (repo / "stages").mkdir()
    monkeypatch.chdir(repo / "stages")
    assert tracking.tracking_uri() == f"sqlite:///{repo / 'mlflow.db'}"  # from a subfolder too
    monkeypatch.chdir(scratch)
    uri = tracking.tracking_uri()
    assert uri == f"sqlite:///{repo / 'mlflow.db'}"
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment(open_experiment(mlflow_client, uri, "bertpipe"))
    assert experiment.artifact_location == (repo / "mlruns").as_uri()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # a training experiment
    assert mlflow_client.get_experiment_by_name("Default").artifact_location == (repo / "mlruns" / "0").as_uri()


def test_an_experiment_pointing_into_dvc_scratch_is_repaired(store: str, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    mlflow_client = client(store)
    scratch = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123" / "mlruns"
    experiment_id = mlflow_client.create_experiment("bertpipe", artifact_location=scratch.as_uri())
    with sqlite3.connect(tmp_path / "mlflow.db") as db:  # as an older bertpipe left MLflow's `Default`
        db.execute("UPDATE experiments SET artifact_location = ? WHERE name = 'Default'", ((scratch / "0").as_uri(),))
    with caplog.at_level(logging.WARNING):
        assert open_experiment(mlflow_client, store, "bertpipe") == experiment_id
    assert mlflow_client.get_experiment(experiment_id).artifact_location == (tmp_path / "mlruns").as_uri()
    assert mlflow_client.get_experiment_by_name("Default").artifact_location == (tmp_path / "mlruns" / "0").as_uri()
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


@pytest.fixture
def no_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries without the waits between them."""
    monkeypatch.setattr(delivery, "RETRY_SECONDS", (0.0,))


def test_mlflow_failures_never_end_training_and_an_incomplete_run_ends_failed(
        store: str, sample_examples: Path, tmp_path: Path, no_waits: None,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, one_thread: None) -> None:
    from mlflow.tracking import MlflowClient

    tracker = MlflowTracker("bertpipe", "flaky", {"train.steps": 4}, {}, system_metrics=False)
    monkeypatch.setattr(MlflowClient, "log_batch", _failing)
    run = small_run(sample_examples, tmp_path)
    with caplog.at_level(logging.WARNING):
        train(run, tracker)
        tracker.finish()
    assert run.record.state.step == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert all("\n" not in w for w in warnings) and any("metrics failed" in w for w in warnings)
    assert any("incomplete" in w and "FAILED" in w for w in warnings)
    assert client(store).get_run(tracker.run_id).info.status == "FAILED"


def test_records_that_failed_are_delivered_in_order_once_mlflow_recovers(
        store: str, no_waits: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    tracker = MlflowTracker("bertpipe", "recovers", {}, {}, system_metrics=False)
    log_batch = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch", _failing)
    tracker.log_metrics({"mlm_loss": 3.0}, step=1)
    tracker.log_metrics({"mlm_loss": 2.0}, step=2)
    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
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
    assert tracking_store._create_experiment(mlflow_client, store, "bertpipe").experiment_id == existing


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_refused_over_long_param_is_shortened_and_everything_else_arrives(
        store: str, sample_examples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, one_thread: None) -> None:
    """A store that refuses over-long values (a server's hard limit; here MLflow's own switch) refuses one
    param: that param alone is shortened, with a marker; training, metrics and the other params are unaffected."""
    monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", "false")
    sentences = [["a crane is flying " * 400]]  # 7,200 characters, over MLflow's 6,000
    run = small_run(sample_examples, tmp_path, **{"export.sentences": sentences})
    params = flatten(run.params)
    tracker = MlflowTracker("bertpipe", "long", params, {}, system_metrics=False)
    with caplog.at_level(logging.WARNING):
        train(run, tracker)
        tracker.finish()
    mlflow_run = client(store).get_run(tracker.run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert [m.step for m in client(store).get_metric_history(tracker.run_id, "mlm_loss")] == [1, 2, 3, 4]
    logged = mlflow_run.data.params
    assert set(logged) == set(params)
    assert {k: v for k, v in logged.items() if k != "export.sentences"} == {
        k: param_text(v) for k, v in params.items() if k != "export.sentences"}
    shortened = logged["export.sentences"]
    assert len(shortened) == 6000 and shortened.endswith("[shortened from 7206 characters for MLflow]")
    assert param_text(params["export.sentences"]).startswith(shortened[:5900])
    assert "param export.sentences: sent shortened to 6000" in mlflow_run.data.tags["bertpipe.refused"]
    (warning,) = _warnings(caplog)
    assert "export.sentences" in warning and "shortened" in warning and "\n" not in warning


def test_a_refused_metric_is_dropped_alone_and_the_run_ends_failed(
        store: str, caplog: pytest.LogCaptureFixture) -> None:
    tracker = MlflowTracker("bertpipe", "bad metric", {}, {}, system_metrics=False)
    with caplog.at_level(logging.WARNING):
        tracker.log_metrics({"mlm_loss": 3.0}, step=1)
        tracker.log_metrics({"mlm_loss": 2.0, "bad name!": 1.0}, step=2)  # MLflow refuses the name
        tracker.log_metrics({"mlm_loss": 1.0, "bad name!": 1.0}, step=3)
        tracker.finish()
    mlflow_client = client(store)
    assert [(m.step, m.value) for m in mlflow_client.get_metric_history(tracker.run_id, "mlm_loss")] == [
        (1, 3.0), (2, 2.0), (3, 1.0)]
    mlflow_run = mlflow_client.get_run(tracker.run_id)
    assert mlflow_run.info.status == "FAILED"  # a metric is lost
    assert mlflow_run.data.tags["bertpipe.refused"] == "metric bad name!: dropped"
    refused, failed = _warnings(caplog)  # one line for the metric, however often it is refused
    assert "bad name!" in refused and "dropped" in refused and "FAILED" in failed


def _rest(code: str) -> Exception:
    from mlflow.exceptions import RestException

    return RestException({"error_code": code, "message": "from the server"})


def _mlflow(code: str, message: str = "a failure") -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2

    return MlflowException(message, error_code=getattr(databricks_pb2, code))


def _http(status: int) -> Exception:
    """What an artifact upload to a server raises for an error answer (requests' HTTPError, an OSError)."""
    import requests

    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} Error for url: http://h/api/2.0/mlflow-artifacts/...", response=response)


@pytest.mark.parametrize(("make", "transient"), [
    (lambda: ConnectionError("refused"), True),
    (lambda: TimeoutError("timed out"), True),
    (lambda: _mlflow("INTERNAL_ERROR", "API request to http://h/api failed with exception Max retries exceeded"), True),
    (lambda: _mlflow("TEMPORARILY_UNAVAILABLE", "(sqlite3.OperationalError) database is locked"), True),
    (lambda: _rest("INTERNAL_ERROR"), True),
    (lambda: _rest("503"), True),
    (lambda: _rest("REQUEST_LIMIT_EXCEEDED"), True),
    (lambda: sqlite3.OperationalError("database is locked"), True),
    (lambda: _mlflow("INVALID_PARAMETER_VALUE", "'Param value' exceeds the maximum length"), False),
    (lambda: _rest("INVALID_PARAMETER_VALUE"), False),
    (lambda: _rest("PERMISSION_DENIED"), False),
    (lambda: _rest("RESOURCE_DOES_NOT_EXIST"), False),
    (lambda: TypeError("not a number"), False),
    (lambda: _http(503), True),
    (lambda: _http(403), False),
    (lambda: _http(401), False),
], ids=["connection", "timeout", "rest-unreachable", "sqlite-locked", "5xx", "503", "429", "sqlite3-locked",
        "invalid", "rest-invalid", "403", "404", "type", "upload-503", "upload-403", "upload-401"])
def test_transient_failures_are_told_from_permanent_refusals(make: object, transient: bool) -> None:
    from bertpipe.tracking.delivery import is_transient

    assert is_transient(make()) is transient


def test_params_read_as_params_yaml_writes_them(store: str) -> None:
    """Lists and mappings as JSON (YAML's flow style), not Python's reprs; null and booleans as YAML has them."""
    params = {"data.urls": ("https://a.example/w.zip", "https://b.example/w.zip"),
              "export.sentences": (("a crane is flying",), ("a crane driver came", "he just left")),
              "train.micro_batch_size": None, "mlflow.enabled": True, "train.lr": 0.01, "train.nproc": "auto"}
    tracker = MlflowTracker("bertpipe", "readable", params, {}, system_metrics=False)
    tracker.finish()
    logged = client(store).get_run(tracker.run_id).data.params
    assert logged["data.urls"] == '["https://a.example/w.zip", "https://b.example/w.zip"]'
    assert logged["export.sentences"] == '[["a crane is flying"], ["a crane driver came", "he just left"]]'
    assert {k: logged[k] for k in ("train.micro_batch_size", "mlflow.enabled", "train.lr", "train.nproc")} == {
        "train.micro_batch_size": "null", "mlflow.enabled": "true", "train.lr": "0.01", "train.nproc": "auto"}
    assert {k: yaml.safe_load(v) for k, v in logged.items()} == {
        k: json.loads(json.dumps(v)) for k, v in params.items()}


def test_the_run_link_opens_the_training_view(store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """MLflow >= 3.10 opens experiments on GenAI unless the link says `workflowType=machine_learning`."""
    with caplog.at_level(logging.INFO):
        tracker = MlflowTracker("bertpipe", "linked", {}, {}, system_metrics=False)
        tracker.finish()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MLflow run")]
    experiment = tracker.experiment_id
    assert lines == [f"MLflow run: http://127.0.0.1:5000/#/experiments/{experiment}/runs/{tracker.run_id}"
                     "?workflowType=machine_learning",
                     f"MLflow runs table: http://127.0.0.1:5000/#/experiments/{experiment}?workflowType=machine_learning"
                     f" (serve it with `bertpipe ui`, or `mlflow ui --backend-store-uri {store} --host 127.0.0.1 "
                     "--port 5000`)"]
