"""The pipeline through DVC, in fresh copies of it: the data stages, then everything.

A copy holds dvc.yaml (its data stages only, or all of it), params.yaml, stages/ and bertpipe/ (the
stages' declared deps; the package itself is imported from its editable install), with
`data.source` pointing at the shared WikiText-2 sample. Changing `examples.max_len` must invalidate
`examples` only; a full `dvc repro` must leave what `dvc metrics show`, `dvc plots show` and the
MLflow client read. Whether the whole dvc.yaml passes DVC's own schema is a separate, fast test.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import BIN, DATA_STAGES, REPO, SMALL_DOWNSTREAM, data_stages, make_project, pretrain_params, runner

pytestmark = pytest.mark.slow


def test_repro_then_max_len_change_reruns_only_examples(tmp_path: Path, sample_raw: Path,
                                                       write_params: Callable[..., Path]) -> None:
    project = make_project(tmp_path / "project", data_stages())
    run = runner(project, tmp_path)
    dvc = str(BIN / "dvc")
    run("git", "init", "-q")
    run(dvc, "init", "-q")
    (project / ".dvc" / "config").write_text("[core]\n    analytics = false\n    check_update = false\n")
    write_params(project, {"data.source": str(sample_raw)})

    out = run(dvc, "repro", "examples").stdout
    for stage in DATA_STAGES:
        assert f"Running stage '{stage}'" in out
    assert (project / "data" / "raw" / "wiki.train.tokens").read_bytes() == (
        sample_raw / "wiki.train.tokens").read_bytes()
    assert (project / "data" / "prepared" / "vocab.parquet").is_file()
    assert (project / "data" / "examples" / "train" / "token_ids.npy").is_file()
    metrics = json.loads((project / "metrics" / "examples.json").read_text())
    assert metrics["max_len"] == 64 and metrics["train"]["examples"] > 1000 and metrics["valid"]["examples"] > 1000
    assert set(DATA_STAGES) <= set(yaml.safe_load((project / "dvc.lock").read_text())["stages"])

    write_params(project, {"data.source": str(sample_raw), "examples.max_len": 48})
    status = json.loads(run(dvc, "status", "--json").stdout)
    assert status["examples"] == [{"changed deps": {"params.yaml": {"examples": "modified"}}}]
    assert not {"download", "prepare"} & set(status)

    out = run(dvc, "repro", "examples").stdout
    assert "Stage 'download' didn't change, skipping" in out
    assert "Stage 'prepare' didn't change, skipping" in out
    assert "Running stage 'examples'" in out
    assert "Running stage 'prepare'" not in out and "Running stage 'download'" not in out
    assert json.loads((project / "metrics" / "examples.json").read_text())["max_len"] == 48


def test_dvc_yaml_passes_dvc_schema() -> None:
    """DVC's own schema takes our dvc.yaml and refuses one with a misspelt key, so the check is real."""
    from dvc.schema import COMPILED_MULTI_STAGE_SCHEMA  # what DVC validates dvc.yaml with
    from voluptuous import Invalid

    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert set(COMPILED_MULTI_STAGE_SCHEMA(dvc_yaml)["stages"]) == {"init", "download", "prepare", "examples",
                                                                    "pretrain", "export", "tasks", "downstream"}
    dvc_yaml["stages"]["pretrain"]["dep"] = dvc_yaml["stages"]["pretrain"].pop("deps")
    with pytest.raises(Invalid):
        COMPILED_MULTI_STAGE_SCHEMA(dvc_yaml)


def test_dvc_repro_runs_everything_into_dvc_metrics_plots_and_mlflow(
        tmp_path: Path, sample_raw: Path, labelled_task: Path, write_params: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc repro` through pretrain, export and the downstream stage; DVC shows the metrics and plots, MLflow
    holds the run, its downstream scores and a child run per fine-tuning."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store: mlflow.db at the repo root
    project = make_project(tmp_path / "project")
    run = runner(project, tmp_path)
    dvc = str(BIN / "dvc")
    run("git", "init", "-q")
    run(dvc, "init", "-q")
    settings = {"data.source": str(sample_raw), "train.batch_size": 64, "train.steps": 4, "train.eval_every": 2,
                "train.eval_examples": 256, "mlflow.system_metrics": False, **SMALL_DOWNSTREAM,
                "downstream.tasks": [str(labelled_task)]}
    write_params(project, settings)
    previous = os.umask(0o002)  # a group-shared project: every output must be group-readable and -writable
    try:
        done = run(dvc, "repro")
    finally:
        os.umask(previous)
    assert all(f"Running stage '{stage}'" in done.stdout for stage in ("pretrain", "export", "tasks", "downstream"))
    assert_modes_follow_the_umask(project, 0o002)
    assert "sentence pairs/sec on cpu\n" in done.stderr  # the seed's line, the devices as text (not a repr)

    metrics = json.loads(run(dvc, "metrics", "show", "--json").stdout)
    pretrain = metrics[""]["data"]["metrics/pretrain.json"]["data"]
    assert pretrain["steps"] == 4 and 0 < pretrain["valid_mlm_loss"] < 10 and pretrain["pairs_per_sec"] > 0
    plots = json.loads(run(dvc, "plots", "show", "--json").stdout)["data"]
    (curve,) = plots["plots/loss.csv"]
    points = curve["content"]["data"]["values"]
    assert {p["field"] for p in points} == {"mlm_loss", "nsp_loss"} and len(points) == 2 * 4
    assert plots["plots/loss.png"][0]["type"] == "image"
    assert (project / "models" / "bert" / "model.safetensors").is_file()
    downstream = metrics[""]["data"]["metrics/downstream.json"]["data"]
    assert downstream["headings"]["seeds"] == 1 and 0 <= downstream["headings"]["accuracy"] <= 100

    assert_mlflow_run(project / "mlflow.db", settings, pretrain, downstream)


def assert_modes_follow_the_umask(project: Path, umask: int) -> None:
    """Every file and folder the five stages wrote has the modes the umask gives, none private (0600)."""
    paths = [p for out in ("data", "models", "metrics", "plots") for p in (project / out).rglob("*")]
    assert any(p.name == "model.safetensors" for p in paths) and len(paths) > 40
    wrong = {str(p.relative_to(project)): oct(stat.S_IMODE(p.stat().st_mode)) for p in paths
             if stat.S_IMODE(p.stat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~umask}
    assert not wrong


def assert_mlflow_run(database: Path, settings: dict, pretrain: dict, downstream: dict) -> None:
    """One pretrain run in experiment bertpipe with every params.yaml key but the fine-tuning's, the curves,
    artifacts and tags, its run-level values metrics/pretrain.json's (which names the run) and
    metrics/downstream.json's; a child run per fine-tuning."""
    from mlflow.tracking import MlflowClient

    from bertpipe.config import load_params

    client = MlflowClient(f"sqlite:///{database}")
    runs = client.search_runs([client.get_experiment_by_name("bertpipe").experiment_id])
    (run,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["headings pretrained seed 0", "headings random seed 0"]
    assert run.data.metrics["downstream/headings/accuracy"] == downstream["headings"]["accuracy"]
    assert (pretrain["mlflow_run_id"], pretrain["mlflow_experiment_id"]) == (run.info.run_id, run.info.experiment_id)
    assert set(run.data.params) == pretrain_params(load_params(database.parent / "params.yaml"))
    assert run.data.params["train.steps"] == "4" and run.data.params["data.source"] == settings["data.source"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "mlm_loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "valid_mlm_loss")] == [2, 4]
    assert {"train_mlm_loss", "train_nsp_loss", "pairs_per_sec", "tokens_per_sec", "mfu", "lr"} <= set(
        run.data.metrics)
    assert_series_or_summaries(client, run)
    for key in ("pairs_per_sec", "tokens_per_sec", "mfu", "train_mlm_loss"):
        assert run.data.metrics[key] == pytest.approx(pretrain[key])  # what the UI shows is the file's value
    assert [m.step for m in client.get_metric_history(run.info.run_id, "step_pairs_per_sec")] == [1, 2, 3, 4]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "loss.png", "params.yaml", "config.json", "export.json", "downstream.json"}
    (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])  # the export, as an MLflow model
    assert model.source_run_id == run.info.run_id and model.name == "model"
    assert run.data.tags["devices"] == "cpu" and run.data.tags["torch_version"] == torch_version()
    assert run.data.tags["mlflow.source.git.commit"]  # "unknown" here: the project has no commit yet
    assert run.info.status == "FINISHED"


def assert_series_or_summaries(client: object, run: object) -> None:
    """Each metric key is either a per-step series (steps >= 1) or one run-level value (step 0), never both."""
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == [0] or min(steps) >= 1, f"{key}: {steps}"


def torch_version() -> str:
    import torch

    return torch.__version__


def test_a_refused_value_keeps_the_tracked_metrics_and_an_equal_one_is_the_same(
        tmp_path: Path, sample_raw: Path, write_params: Callable[..., Path]) -> None:
    """DVC deletes a stage's outputs before running it and cannot restore git-tracked (cache: false)
    ones; they persist, so a value bertpipe refuses loses nothing. A value DVC deems equal to the last
    one (64.0 for 64) reruns nothing, and bertpipe reads it as that value."""
    from bertpipe.config import load_params

    project = make_project(tmp_path / "project", data_stages())
    run = runner(project, tmp_path)
    dvc = str(BIN / "dvc")
    run("git", "init", "-q")
    run(dvc, "init", "-q")
    write_params(project, {"data.source": str(sample_raw)})
    run(dvc, "repro", "examples")
    before = (project / "metrics" / "examples.json").read_bytes()

    write_params(project, {"data.source": str(sample_raw), "examples.max_len": 64.5})
    failed = subprocess.run([dvc, "repro", "examples"], cwd=project, capture_output=True, text=True,
                            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    assert failed.returncode != 0
    assert "examples.max_len = 64.5 is not allowed; expected an integer" in failed.stderr + failed.stdout
    assert (project / "metrics" / "examples.json").read_bytes() == before

    run(dvc, "checkout")  # the cached outputs DVC removed before the refused run come back from its cache
    write_params(project, {"data.source": str(sample_raw), "examples.max_len": 64.0})
    assert json.loads(run(dvc, "status", "--json").stdout) == {}
    assert load_params(project / "params.yaml").examples.max_len == 64
