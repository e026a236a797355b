"""Experiments as users run them: `dvc exp run --queue` / `--run-all -j 3` / `--temp`, then `dvc exp show`,
`dvc plots diff` and the MLflow runs; and a real `mlflow server` as the team's tracking store.

Each test starts from a fresh git repository holding the pipeline (the repository's .gitignore
included, so git tracks exactly what it tracks in a clone) and no mlflow.db, with `data.source`
pointing at the WikiText-2 sample.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import BIN, EXPONENT_FORMS, PRETRAIN_OUTS, REPO, SMALL_PRETRAIN, free_port, make_project, runner, wait_for

pytestmark = pytest.mark.slow

SMALL = {"train.batch_size": 64, "train.steps": 2, "train.eval_every": 1, "train.eval_examples": 256,
         "mlflow.system_metrics": False}
QUEUE = {"q1": ["train.steps=1"], "q2": ["train.steps=2"], "q3": ["train.steps=1", "train.lr=0.02"]}


@pytest.fixture
def repo(tmp_path: Path, sample_raw: Path, write_params: Callable[..., Path],
         monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Callable[..., subprocess.CompletedProcess[str]]]:
    """A committed pipeline repository with the default tracking store (none yet), and a command runner."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = make_project(tmp_path / "project")
    run = runner(project, tmp_path, timeout=600)
    run("git", "init", "-q")
    run("git", "config", "user.email", "test@example.com")
    run("git", "config", "user.name", "test")
    run(str(BIN / "dvc"), "init", "-q")
    write_params(project, {"data.source": str(sample_raw), **SMALL})
    run("git", "add", "-A")
    run("git", "commit", "-qm", "pipeline")
    return project, run


def mlflow_runs(project: Path) -> tuple[object, object, dict[str, object]]:
    """The default store's client, experiment `bertpipe`, and its runs by name."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bertpipe")
    return client, experiment, {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def test_queued_experiments_run_together_and_each_carries_its_results(repo: tuple) -> None:
    project, run = repo
    dvc = str(BIN / "dvc")
    for name, settings in QUEUE.items():
        run(dvc, "exp", "run", "--queue", "-n", name, *(arg for s in settings for arg in ("-S", s)))
    run(dvc, "exp", "run", "--run-all", "-j", "3")

    (baseline,) = [row for row in json.loads(run(dvc, "exp", "show", "--json").stdout) if row["rev"] != "workspace"]
    shown = {e["name"]: e["revs"][0]["data"]["metrics"] for e in baseline["experiments"]}
    assert set(shown) == set(QUEUE)
    client, experiment, runs = mlflow_runs(project)
    assert set(runs) == set(QUEUE)  # one MLflow run per DVC experiment, named after it
    assert experiment.artifact_location == (project / "mlruns").as_uri()
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    for name, metrics in shown.items():
        pretrain = metrics["metrics/pretrain.json"]["data"]
        mlflow_run = runs[name]
        assert pretrain["steps"] == int(QUEUE[name][0].split("=")[1])
        assert pretrain["mlflow_run_id"] == mlflow_run.info.run_id
        assert mlflow_run.data.tags["dvc.exp_name"] == name
        assert mlflow_run.data.tags["dvc.exp_ref"].endswith(f"/{name}")
        assert mlflow_run.data.tags["mlflow.source.git.commit"] == baseline["rev"]
        assert mlflow_run.info.status == "FINISHED"
        history = client.get_metric_history(mlflow_run.info.run_id, "mlm_loss")
        assert [m.step for m in history] == list(range(1, pretrain["steps"] + 1))
        artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
        assert {"loss.png", "params.yaml", "config.json", "model"} <= artifacts
        assert Path(mlflow_run.info.artifact_uri.removeprefix("file://"), "model", "model.safetensors").is_file()

    plots = json.loads(run(dvc, "plots", "diff", "q1", "q2", "--json").stdout)["data"]["plots/loss.csv"][0]
    assert {p["rev"] for p in plots["content"]["data"]["values"]} == {"q1", "q2"}
    assert "train.lr" in run(dvc, "exp", "diff", "q1", "q3").stdout


def test_the_first_temp_run_of_a_fresh_repository_keeps_its_artifacts(repo: tuple) -> None:
    project, run = repo
    run(str(BIN / "dvc"), "exp", "run", "--temp", "-n", "t1")
    assert not (project / ".dvc" / "tmp" / "exps").exists() or not any((project / ".dvc" / "tmp" / "exps").glob("tmp*"))
    _, experiment, runs = mlflow_runs(project)
    assert experiment.artifact_location == (project / "mlruns").as_uri()
    folder = Path(runs["t1"].info.artifact_uri.removeprefix("file://"))
    assert folder.is_relative_to(project / "mlruns")
    assert {"loss.png", "params.yaml", "config.json", "model"} <= {p.name for p in folder.iterdir()}


def test_dvc_exp_run_sets_every_float_key_in_exponent_form(repo: tuple) -> None:
    """`-S train.lr=5e-5` makes DVC write `lr: 5e-05` (YAML 1.2); every stage must read such a float."""
    from bertpipe.config import flatten, load_params

    project, run = repo
    settings = [arg for key, literal in EXPONENT_FORMS.items() for arg in ("-S", f"{key}={literal}")]
    run(str(BIN / "dvc"), "exp", "run", "pretrain", *settings)
    params = flatten(load_params(project / "params.yaml"))
    assert {key: params[key] for key in EXPONENT_FORMS} == {k: float(v) for k, v in EXPONENT_FORMS.items()}
    assert json.loads((project / "metrics" / "pretrain.json").read_text())["steps"] == SMALL["train.steps"]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with a SQLite backend and artifacts it serves itself, all in tmp_path."""
    port, folder = free_port(), tmp_path / "server"
    folder.mkdir()
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(folder / "server.log", "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", server, folder / "server.log")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started
        server.wait(timeout=30)


def test_a_team_mlflow_server_receives_params_curves_artifacts_and_the_registered_model(
        sample_examples: Path, sample_prepared: Path, tmp_path: Path, mlflow_server: str,
        write_params: Callable[..., Path]) -> None:
    """pretrain and export with MLFLOW_TRACKING_URI=http://127.0.0.1:PORT; everything reads back through it."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from transformers import BertForPreTraining

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "examples").symlink_to(sample_examples)
    (folder / "prepared").symlink_to(sample_prepared)
    settings = {**SMALL_PRETRAIN, "train.steps": 3, "mlflow.enabled": True, "mlflow.register_model": "bert-tiny"}
    write_params(folder, settings)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "OMP_NUM_THREADS": "1"}
    for stage, args in (("pretrain", ["examples", *PRETRAIN_OUTS]),
                        ("export", ["models/checkpoint", "prepared", "models/bert", "embeddings",
                                    "metrics/export.json"])):
        done = subprocess.run([sys.executable, str(REPO / "stages" / f"{stage}.py"), *args], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    client = MlflowClient(mlflow_server)
    run_id = json.loads((folder / "metrics" / "pretrain.json").read_text())["mlflow_run_id"]
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.data.params["train.steps"] == "3" and mlflow_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "mlm_loss")] == [1, 2, 3]
    assert {a.path for a in client.list_artifacts(run_id)} >= {"loss.png", "params.yaml", "config.json", "model"}
    mlflow.set_tracking_uri(mlflow_server)
    (version,) = client.search_model_versions("name='bert-tiny'")
    assert version.run_id == run_id
    for uri in (f"runs:/{run_id}/model", "models:/bert-tiny/1"):
        target = tmp_path / "downloads" / uri.replace(":", "").replace("/", "_")
        model = BertForPreTraining.from_pretrained(mlflow.artifacts.download_artifacts(uri, dst_path=str(target)))
        assert model.config.num_hidden_layers == 2
