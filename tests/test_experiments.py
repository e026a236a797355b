"""Experiments as users run them: `dvc exp run --queue` / `--run-all -j 2` / `--temp`, then `dvc exp show`,
`dvc plots diff` and the MLflow runs; and a real `mlflow server` as the team's tracking store.

Each test starts from a fresh git repository holding the pipeline (the repository's .gitignore
included, so git tracks exactly what it tracks in a clone) and no mlflow.db, with `data.source`
pointing at the WikiText-2 sample.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import (
    BIN,
    EXPONENT_FORMS,
    PRETRAIN_OUTS,
    REPO,
    SMALL_DOWNSTREAM,
    SMALL_PRETRAIN,
    free_port,
    make_project,
    pretrain_params,
    runner,
)

pytestmark = pytest.mark.slow

SMALL = {"train.batch_size": 64, "train.steps": 2, "train.eval_every": 1, "train.eval_examples": 256,
         "mlflow.system_metrics": False, **SMALL_DOWNSTREAM, "downstream.tasks": ["./labelled/headings"]}
# Two at once (the store made once); q2 is MLM alone, RoBERTa's objective, on single segments.
QUEUE = {"q1": ["train.steps=1"], "q2": ["train.steps=2", "train.lr=0.02", "train.objective=mlm",
                                          "examples.strategy=segments"]}


@pytest.fixture
def repo(tmp_path: Path, sample_raw: Path, labelled_task: Path, write_params: Callable[..., Path],
         monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Callable[..., subprocess.CompletedProcess[str]]]:
    """A committed pipeline repository with the default tracking store (none yet), and a command runner. Its
    labelled task is a folder inside it that git ignores, named by a relative path: queued and --temp
    experiments, which run in a copy of what git tracks, must find it in the repository itself."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = make_project(tmp_path / "project")
    run = runner(project, tmp_path, timeout=600)
    run("git", "init", "-q")
    run("git", "config", "user.email", "test@example.com")
    run("git", "config", "user.name", "test")
    run(str(BIN / "dvc"), "init", "-q")
    shutil.copytree(labelled_task, project / "labelled" / "headings")
    (project / ".git" / "info" / "exclude").write_text("/labelled/\n")
    write_params(project, {"data.source": str(sample_raw), **SMALL})
    run("git", "add", "-A")
    run("git", "commit", "-qm", "pipeline")
    return project, run


def mlflow_runs(project: Path) -> tuple[object, object, dict[str, object]]:
    """The default store's client, experiment `bertpipe`, and its pretrain runs (not their children) by name."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bertpipe")
    return client, experiment, {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])
                                if "mlflow.parentRunId" not in r.data.tags}


def logged_model(client: object, experiment: object, run_id: str) -> object:
    """The one LoggedModel the export made of run `run_id`."""
    (model,) = [m for m in client.search_logged_models(experiment_ids=[experiment.experiment_id])
                if m.source_run_id == run_id]
    return model


def test_queued_experiments_run_together_and_each_carries_its_results(repo: tuple) -> None:
    project, run = repo
    dvc = str(BIN / "dvc")
    for name, settings in QUEUE.items():
        run(dvc, "exp", "run", "--queue", "-n", name, *(arg for s in settings for arg in ("-S", s)))
    run(dvc, "exp", "run", "--run-all", "-j", "2")

    (baseline,) = [row for row in json.loads(run(dvc, "exp", "show", "--json").stdout) if row["rev"] != "workspace"]
    shown = {e["name"]: e["revs"][0]["data"]["metrics"] for e in baseline["experiments"]}
    assert set(shown) == set(QUEUE)
    client, experiment, runs = mlflow_runs(project)
    assert set(runs) == set(QUEUE)  # one MLflow run per DVC experiment, named after it
    assert experiment.artifact_location == (project / "mlruns").as_uri()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    downstream = {name: metrics["metrics/downstream.json"]["data"]["headings"] for name, metrics in shown.items()}
    assert all(0 <= scores["accuracy"] <= 100 and scores["seeds"] == 1 for scores in downstream.values())
    for name, metrics in shown.items():
        pretrain = metrics["metrics/pretrain.json"]["data"]
        mlflow_run = runs[name]
        assert mlflow_run.data.metrics["downstream/headings/accuracy"] == downstream[name]["accuracy"]
        assert pretrain["steps"] == int(QUEUE[name][0].split("=")[1])
        assert pretrain["mlflow_run_id"] == mlflow_run.info.run_id
        assert mlflow_run.data.tags["dvc.exp_name"] == name
        assert mlflow_run.data.tags["dvc.exp_ref"].endswith(f"/{name}")
        assert mlflow_run.data.tags["mlflow.source.git.commit"] == baseline["rev"]
        assert mlflow_run.info.status == "FINISHED"
        history = client.get_metric_history(mlflow_run.info.run_id, "mlm_loss")
        assert [m.step for m in history] == list(range(1, pretrain["steps"] + 1))
        artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
        assert {"loss.png", "params.yaml", "config.json", "export.json", "downstream.json"} <= artifacts
        model = logged_model(client, experiment, mlflow_run.info.run_id)
        assert Path(model.artifact_location.removeprefix("file://"), "model", "model.safetensors").is_file()
        nsp = name == "q1"  # q2 trains no NSP head: no NSP series, not one of zeros
        assert ("train_nsp_loss" in pretrain) == ("valid_nsp_loss" in pretrain) == nsp
        assert ("nsp_loss" in mlflow_run.data.metrics) == nsp

    plots = json.loads(run(dvc, "plots", "diff", "q1", "q2", "--json").stdout)["data"]["plots/loss.csv"][0]
    assert {p["rev"] for p in plots["content"]["data"]["values"]} == {"q1", "q2"}
    assert "train.lr" in run(dvc, "exp", "diff", "q1", "q2").stdout
    table = run(dvc, "exp", "show", "--csv", "--keep", "headings.accuracy").stdout.splitlines()
    column = table[0].split(",").index("headings.accuracy")
    assert {row.split(",")[0]: row.split(",")[column] for row in table[1:] if row.split(",")[0] in QUEUE} == {
        name: str(downstream[name]["accuracy"]) for name in QUEUE}  # side by side, as a user reads them


def test_the_first_temp_run_of_a_fresh_repository_keeps_its_artifacts(repo: tuple) -> None:
    project, run = repo
    run(str(BIN / "dvc"), "exp", "run", "--temp", "-n", "t1")
    assert not (project / ".dvc" / "tmp" / "exps").exists() or not any((project / ".dvc" / "tmp" / "exps").glob("tmp*"))
    client, experiment, runs = mlflow_runs(project)
    assert experiment.artifact_location == (project / "mlruns").as_uri()
    folder = Path(runs["t1"].info.artifact_uri.removeprefix("file://"))
    assert folder.is_relative_to(project / "mlruns")
    assert {"loss.png", "params.yaml", "config.json", "export.json"} <= {p.name for p in folder.iterdir()}
    model = Path(logged_model(client, experiment, runs["t1"].info.run_id).artifact_location.removeprefix("file://"))
    assert model.is_relative_to(project / "mlruns") and (model / "MLmodel").is_file()
    assert client.get_experiment_by_name("Default").artifact_location == (project / "mlruns" / "0").as_uri()


def test_dvc_exp_run_sets_every_float_key_in_exponent_form(repo: tuple) -> None:
    """`-S train.lr=5e-5` makes DVC write `lr: 5e-05` (YAML 1.2); every stage must read such a float."""
    from bertpipe.config import flatten, load_params

    project, run = repo
    settings = [arg for key, literal in EXPONENT_FORMS.items() for arg in ("-S", f"{key}={literal}")]
    run(str(BIN / "dvc"), "exp", "run", "pretrain", *settings)
    params = flatten(load_params(project / "params.yaml"))
    assert {key: params[key] for key in EXPONENT_FORMS} == {k: float(v) for k, v in EXPONENT_FORMS.items()}
    assert json.loads((project / "metrics" / "pretrain.json").read_text())["steps"] == SMALL["train.steps"]


def test_a_team_mlflow_server_receives_params_curves_the_model_and_its_registration(
        sample_examples: Path, sample_prepared: Path, tmp_path: Path, mlflow_server: str,
        write_params: Callable[..., Path]) -> None:
    """pretrain and export with MLFLOW_TRACKING_URI=http://127.0.0.1:PORT, against a server that refuses
    over-long values (MLFLOW_TRUNCATE_LONG_VALUES=false there): the one long param is shortened, the run is
    FINISHED with everything else, and the model reads back through the server."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from transformers import BertForMaskedLM

    from bertpipe.config import load_params

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "examples").symlink_to(sample_examples)
    (folder / "prepared").symlink_to(sample_prepared)
    settings = {**SMALL_PRETRAIN, "train.steps": 3, "mlflow.enabled": True, "mlflow.register_model": "bert-tiny",
                "export.sentences": [["a crane is flying"], ["a crane driver came", "he left " + "z" * 6000]]}
    write_params(folder, settings)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "OMP_NUM_THREADS": "1"}
    output = {}
    for stage, args in (("pretrain", ["examples", *PRETRAIN_OUTS]),
                        ("export", ["models/checkpoint", "prepared", "models/bert", "embeddings",
                                    "metrics/export.json"])):
        done = subprocess.run([sys.executable, str(REPO / "stages" / f"{stage}.py"), *args], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        output[stage] = done.stderr

    client = MlflowClient(mlflow_server)
    run_id = json.loads((folder / "metrics" / "pretrain.json").read_text())["mlflow_run_id"]
    mlflow_run = client.get_run(run_id)
    experiment = client.get_experiment(mlflow_run.info.experiment_id)
    assert mlflow_run.data.params["train.steps"] == "3" and mlflow_run.info.status == "FINISHED"
    assert len(mlflow_run.data.params["export.sentences"]) == 6000 and "shortened" in mlflow_run.data.params[
        "export.sentences"]
    assert set(mlflow_run.data.params) == pretrain_params(load_params(folder / "params.yaml"))  # the others too
    assert [m.step for m in client.get_metric_history(run_id, "mlm_loss")] == [1, 2, 3]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"loss.png", "params.yaml", "config.json"}
    model = logged_model(client, experiment, run_id)
    links = (f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs/{run_id}?workflowType=machine_learning",
             f"{mlflow_server}/#/experiments/{experiment.experiment_id}/models/{model.model_id}"
             "?workflowType=machine_learning")
    assert links[0] in output["pretrain"] and links[1] in output["export"]
    mlflow.set_tracking_uri(mlflow_server)
    (version,) = client.search_model_versions("name='bert-tiny'")
    assert version.run_id == run_id
    for uri in (f"runs:/{run_id}/model", "models:/bert-tiny/1"):
        target = tmp_path / "downloads" / uri.replace(":", "").replace("/", "_")
        path = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(target)), "model")  # the HF folder
        assert BertForMaskedLM.from_pretrained(path).config.num_hidden_layers == 2
        assert mlflow.pyfunc.load_model(uri).predict(["a crane is <mask> ."])[0]


class Gate:
    """A port on 127.0.0.1 that forwards to `target` while open and refuses connections while closed, so a
    real server can go away and come back under a client that keeps its address."""

    def __init__(self, target: str) -> None:
        self.target = urlparse(target).port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._connections: list[socket.socket] = []

    def open(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def close(self) -> None:
        """Refuse new connections and cut the open ones (a pooled keep-alive connection sees a reset)."""
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in the other thread
        self._listener.close()
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._connections.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def test_records_wait_for_a_server_that_went_away_and_arrive_in_order(
        mlflow_server: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Connection refused and reset by a real server's address are transient: nothing is dropped, nothing reordered."""
    from mlflow.tracking import MlflowClient

    from bertpipe.tracking import MlflowTracker, delivery

    monkeypatch.setattr(delivery, "RETRY_SECONDS", (0.0,))
    gate = Gate(mlflow_server)
    gate.open()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", gate.url)
    tracker = MlflowTracker("gate", "comes back", {"train.steps": 3}, {}, system_metrics=False)
    tracker.log_metrics({"mlm_loss": 3.0}, step=1)
    gate.close()
    with caplog.at_level(logging.WARNING):
        tracker.log_metrics({"mlm_loss": 2.0}, step=2)  # refused: waits at the head of the queue
    assert "MLflow metric mlm_loss failed" in caplog.text and "will retry" in caplog.text
    gate.open()
    tracker.log_metrics({"mlm_loss": 1.0}, step=3)
    tracker.finish()
    client = MlflowClient(mlflow_server)
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "mlm_loss")] == [
        (1, 3.0), (2, 2.0), (3, 1.0)]
    mlflow_run = client.get_run(tracker.run_id)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.params == {"train.steps": "3"}
