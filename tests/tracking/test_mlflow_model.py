"""The export as MLflow 3 users expect a model: a LoggedModel of the pretrain run (transformers flavour, task
fill-mask) in the run's and the experiment's Models view, loaded by `runs:/` and `models:/` URIs, registered,
and served over HTTP by `mlflow models serve`, refusing what `bertpipe fill-mask` refuses in its words; plain
files of the run where transformers is missing.

The tiny exported model of test_export.py, its checkpoint trained in an MLflow run of a SQLite store in tmp_path.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import BIN, free_port, params_with, wait_for
from helpers.exported import MAX_POSITIONS, STEP, make_project, run_stage

from bertpipe.cli import main
from bertpipe.export import hf_compat
from bertpipe.export.encode import Vocab, encode, fill_mask
from bertpipe.tracking import MlflowTracker, client

pytestmark = pytest.mark.slow
QUERY = "a crane is <mask> ."
NO_MASK = "a crane is flying ."
LONG = " ".join(["crane"] * 600) + " <mask>"  # 603 tokens, for a model of MAX_POSITIONS


@dataclass(frozen=True)
class Exported:
    uri: str  # the tracking store
    run_id: str  # the pretrain run the checkpoint names
    experiment_id: str
    root: Path  # the project: models/bert, metrics/export.json


def export_with_mlflow(root: Path, monkeypatch: pytest.MonkeyPatch, register_as: str = "") -> Exported:
    """A pretrain run in a SQLite store under `root` (mlm_loss at the checkpoint's step), then the export stage."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = MlflowTracker("bertpipe", "pretrain", {"train.steps": STEP}, {}, system_metrics=False)
    tracker.log_metrics({"mlm_loss": 2.5}, step=STEP)
    tracker.finish()
    project = make_project(root / "project", mlflow_run_id=tracker.run_id)
    params = params_with({"mlflow.register_model": register_as})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    hosts: list[str] = []
    getaddrinfo = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *args, **kwargs: hosts.append(host) or getaddrinfo(
        host, *args, **kwargs))
    result = run_stage(project)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert result.exit_code == 0, result.output
    assert hosts == []  # no Hugging Face Hub (a SQLite store needs no network at all)
    return Exported(uri, tracker.run_id, tracker.experiment_id, project)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    pytest.importorskip("transformers")
    with pytest.MonkeyPatch.context() as monkeypatch:
        return export_with_mlflow(tmp_path_factory.mktemp("mlflow_model"), monkeypatch, register_as="bert-tiny")


def logged_models(exported: Exported) -> list:
    return list(client(exported.uri).search_logged_models(experiment_ids=[exported.experiment_id]))


def our_top_word(exported: Exported) -> str:
    """What `bertpipe fill-mask` puts first at the mask of QUERY."""
    model, tokens = hf_compat.load_pretrained(exported.root / "models" / "bert")
    vocab = Vocab(tokens)
    [prediction] = fill_mask(model, vocab, encode(vocab, [QUERY], MAX_POSITIONS), top_k=1)
    return prediction.tokens[0]


def test_the_export_is_a_logged_model_of_the_pretrain_run_and_its_step(exported: Exported) -> None:
    (model,) = logged_models(exported)
    assert (model.source_run_id, model.name, str(model.status)) == (exported.run_id, "model", "READY")
    mlflow_client = client(exported.uri)
    run = mlflow_client.get_run(exported.run_id)
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model.model_id, STEP)]  # the Model column
    metrics = {m.key: (m.step, m.value) for m in model.metrics}
    assert metrics["mlm_loss"] == (STEP, 2.5) and metrics["export/step"] == (STEP, STEP)
    assert model.params["train.steps"] == str(STEP)
    (version,) = mlflow_client.search_model_versions("name='bert-tiny'")
    assert (version.source, version.run_id) == (f"models:/{model.model_id}", exported.run_id)
    listed = json.loads(mlflow_client.get_logged_model(model.model_id).tags["mlflow.modelVersions"])
    assert listed == [{"name": "bert-tiny", "version": version.version}]  # the model's page links the version
    flavour = yaml.safe_load(Path(model.artifact_location.removeprefix("file://"), "MLmodel").read_text())
    assert flavour["flavors"]["transformers"]["task"] == "fill-mask"
    assert flavour["flavors"]["transformers"]["pipeline_model_type"] == "BertForMaskedLM"


def fill_mask_says(exported: Exported, text: str) -> str:
    """What `bertpipe fill-mask` says of a `text` it refuses (its `Error: ` line, without the prefix)."""
    result = CliRunner().invoke(main, ["fill-mask", text, "--model", str(exported.root / "models" / "bert")])
    assert result.exit_code == 1, result.output
    return result.output.strip().removeprefix("Error: ")


def test_pyfunc_refuses_what_fill_mask_refuses_in_its_words(exported: Exported) -> None:
    """No mask token, or more tokens than the model has positions: MLflow's INVALID_PARAMETER_VALUE naming the input
    and the problem as `bertpipe fill-mask` does, not transformers' PipelineException or a tensor size mismatch."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(exported.uri)
    model = mlflow.pyfunc.load_model(f"runs:/{exported.run_id}/model")
    for inputs, n in (([NO_MASK], 1), ([LONG], 1), ([QUERY, NO_MASK], 2)):
        with pytest.raises(MlflowException) as caught:
            model.predict(inputs)
        assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
        assert caught.value.message == f"input {n} of {len(inputs)}: {fill_mask_says(exported, inputs[n - 1])}"
    assert "no <mask> to fill" in fill_mask_says(exported, NO_MASK)
    assert f"603 tokens with <cls> and <sep>, more than the model's {MAX_POSITIONS}" in fill_mask_says(exported, LONG)


def test_pyfunc_fills_the_mask_from_runs_and_models_uris(exported: Exported) -> None:
    import mlflow

    (model,) = logged_models(exported)
    mlflow.set_tracking_uri(exported.uri)
    expected = [our_top_word(exported)]
    for uri in (f"runs:/{exported.run_id}/model", f"models:/{model.model_id}", "models:/bert-tiny/1"):
        assert mlflow.pyfunc.load_model(uri).predict([QUERY]) == expected, uri


def invoke(port: int, inputs: list[str]) -> tuple[int, dict]:
    """The served model's HTTP status and JSON answer to `inputs`."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                     data=json.dumps({"inputs": inputs}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def test_the_served_model_answers_fill_mask_over_http(exported: Exported, tmp_path: Path) -> None:
    """`mlflow models serve --env-manager local` on 127.0.0.1 (its uvicorn found beside it), stopped by its process
    id: the answer to a query, and a 400 naming the problem of an input it refuses, with no server traceback."""
    (model,) = logged_models(exported)
    port, log = free_port(), tmp_path / "serve.log"
    command = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{model.model_id}", "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": exported.uri, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with open(log, "wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", server, log, seconds=180)
        assert invoke(port, [QUERY]) == (200, {"predictions": [our_top_word(exported)]})
        for text in (NO_MASK, LONG):
            status, answer = invoke(port, [text])
            assert (status, answer["error_code"]) == (400, "INVALID_PARAMETER_VALUE")
            assert answer["message"].endswith(f"input 1 of 1: {fill_mask_says(exported, text)}")
            assert "stack_trace" not in answer and "Traceback" not in answer["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the worker it started
        server.wait(timeout=30)


def test_without_transformers_the_model_is_plain_files_of_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with caplog.at_level(logging.WARNING):
        exported = export_with_mlflow(tmp_path, monkeypatch)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "transformers is not installed" in line and "plain files under model/" in line
    assert not logged_models(exported)
    files = {a.path for a in client(exported.uri).list_artifacts(exported.run_id, "model")}
    assert {"model/config.json", "model/model.safetensors", "model/tokenizer.json"} <= files
