"""`bertpipe gc` (bertpipe/reclaim.py) on a repository state made by hand: which params resume a work folder, what a
dry run lists and leaves, what `--yes` removes and keeps, and that `mlflow gc` runs cleanly afterwards.

Work folders hold fake checkpoints (the files a checkpoint has, state.json with the real trajectory spec); a lock is
held by a child process with the mechanism WorkFolder.lock uses; the MLflow store is a real SQLite one with LoggedModels
of a few KB made through MlflowClient.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import BIN, params_with

from bertpipe.cli import main
from bertpipe.config import Params, build
from bertpipe.model.bert import BertConfig
from bertpipe.reclaim import describes, survey, tree_bytes
from bertpipe.training.checkpoint import fingerprint, trajectory_spec
from bertpipe.training.workdir import WORK_ROOT

VOCAB = 4271
CHECKPOINT_FILES = {"model.safetensors": 3000, "optimizer.pt": 6000, "rng.pt": 100}  # bytes; state.json besides


def params(overrides: dict[str, Any] | None = None) -> Params:
    return build(Params, params_with(overrides or {}))


def spec_for(run_params: Params, precision: str) -> dict[str, Any]:
    """The trajectory spec a run of `run_params` records, `auto` settled on `precision`, the data made up."""
    meta = {"vocab_size": VOCAB, "vocab_sha256": "0" * 64, "max_len": run_params.examples.max_len,
            "max_predictions": run_params.examples.max_predictions, "strategy": run_params.examples.strategy,
            "seed": run_params.seed, "params": run_params.examples.model_dump(),
            "examples": {"train": 4640, "valid": 500}, "copies": {"train": [[0, 4640]], "valid": [[0, 500]]}}
    train = run_params.train.model_copy(update={"precision": precision})
    return trajectory_spec(BertConfig.from_params(run_params.model, VOCAB), train, run_params.seed, meta)


def stopped_run(root: Path, spec: dict[str, Any], steps: tuple[int, ...] = (10, 20)) -> Path:
    """A work folder with a checkpoint per step, and its lock file, as a stopped pretrain run leaves them."""
    folder = root / WORK_ROOT / fingerprint(spec)
    for step in steps:
        checkpoint = folder / f"step-{step:07d}"
        checkpoint.mkdir(parents=True)
        for name, size in CHECKPOINT_FILES.items():
            (checkpoint / name).write_bytes(b"\0" * size)
        state = {"fingerprint": fingerprint(spec), "spec": spec, "state": {"step": step}}
        (checkpoint / "state.json").write_text(json.dumps(state, default=str))
    (folder.parent / f"{folder.name}.lock").touch()
    return folder


@pytest.fixture
def hold() -> Iterator[Any]:
    """`hold(path)` locks `path` from a child process (filelock, as WorkFolder.lock) until the test ends."""
    children: list[subprocess.Popen[str]] = []

    def start(lock: Path) -> None:
        code = ("import sys; from filelock import FileLock; lock = FileLock(sys.argv[1]); lock.acquire(); "
                "print('held', flush=True); sys.stdin.read()")  # held while `lock` lives
        child = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        children.append(child)
        assert child.stdout.readline().strip() == "held"

    yield start
    for child in children:
        child.stdin.close()
        child.wait(timeout=30)


def dvc_repository(root: Path, overrides: dict[str, Any] | None = None) -> Path:
    """A git and DVC repository at `root` with the repository's params.yaml (and `overrides`)."""
    from dvc.repo import Repo

    root.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    Repo.init(str(root)).close()
    (root / "params.yaml").write_text(json.dumps(params_with(overrides or {})))  # JSON is YAML
    return root


def files(root: Path) -> dict[str, int]:
    """Every file and folder under `root` but git's, DVC's and the SQLite database: relative path -> size."""
    found = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if Path(folder, d) not in (root / ".git", root / ".dvc")]
        for name in [*dirs, *names]:
            path = Path(folder, name)
            if not path.name.startswith("mlflow.db"):
                found[str(path.relative_to(root))] = path.lstat().st_size if path.is_file() else -1
    return found


def listed(output: str) -> set[str]:
    """The paths the dry run lists as reclaimable (each line: size, unit, path, why)."""
    section = output.split("\nreclaimable:", 1)[1].split("\ntotal: ", 1)[0]
    return {line.split()[2].rstrip("/") for line in section.splitlines()[1:]}


@pytest.mark.parametrize(("overrides", "precision", "described"), [
    ({}, "bf16", True),  # train.precision: auto matches what it settled on, either
    ({}, "fp32", True),
    ({"train.precision": "fp32"}, "fp32", True),
    ({"train.precision": "fp32"}, "bf16", False),
    ({"train.nproc": 2, "train.micro_batch_size": 64, "train.eval_every": 5, "train.checkpoint_every": 7}, "bf16",
     True),  # how the work is split, evaluated and saved does not change the trajectory
    ({"train.lr": 0.005}, "bf16", False),
    ({"train.steps": 100}, "bf16", False),
    ({"seed": 1}, "bf16", False),
    ({"model.num_hidden_layers": 3}, "bf16", False),
    ({"examples.mask_prob": 0.2}, "bf16", False),
])
def test_params_describe_the_trajectories_they_resume(overrides: dict[str, Any], precision: str,
                                                      described: bool) -> None:
    spec = json.loads(json.dumps(spec_for(params(), precision), default=str))  # as state.json holds it
    assert describes(params(overrides), fingerprint(spec_for(params(), precision)), spec) is described


def continued_spec(init: str) -> dict[str, Any]:
    """The spec a run continued from checkpoint `init` (2 layers of 32 units, its shape) records, `auto` on bf16."""
    run_params = params({"model.init": init, "prepare.tokenizer": "pretrained"})
    shape = replace(BertConfig.from_params(params().model, VOCAB), hidden_size=32, intermediate_size=64)
    start = {"model": init, "commit": None, "weights_sha256": "a"}
    return trajectory_spec(shape, run_params.train.model_copy(update={"precision": "bf16"}), run_params.seed,
                           spec_for(params(), "bf16")["examples"], start)


@pytest.mark.parametrize(("overrides", "described"), [
    ({"model.init": "org/bert", "prepare.tokenizer": "pretrained"}, True),  # the shape is the checkpoint's
    ({"model.init": "org/other", "prepare.tokenizer": "pretrained"}, False),
    ({"model.init": "org/bert", "prepare.tokenizer": "pretrained", "train.lr": 2e-5}, False),
    ({}, False),
])
def test_params_describe_a_continued_run_by_its_model_init(overrides: dict[str, Any], described: bool) -> None:
    spec = json.loads(json.dumps(continued_spec("org/bert"), default=str))
    assert describes(params(overrides), fingerprint(continued_spec("org/bert")), spec) is described
    scratch = json.loads(json.dumps(spec_for(params(), "bf16"), default=str))
    assert describes(params(overrides), fingerprint(spec_for(params(), "bf16")), scratch) is not bool(overrides)


def test_a_hard_linked_file_is_freed_only_with_its_last_link(tmp_path: Path) -> None:
    (tmp_path / "folder" / "inner").mkdir(parents=True)
    (tmp_path / "folder" / "alone").write_bytes(b"a" * 100)
    (tmp_path / "folder" / "shared").write_bytes(b"s" * 1000)
    os.link(tmp_path / "folder" / "shared", tmp_path / "elsewhere")
    (tmp_path / "folder" / "twice").write_bytes(b"t" * 10)
    os.link(tmp_path / "folder" / "twice", tmp_path / "folder" / "inner" / "twice")
    assert tree_bytes(tmp_path / "folder") == (110, 1110)


def mlflow_store(root: Path) -> tuple[Any, str, str, dict[str, str]]:
    """The store at root/mlflow.db: LoggedModels of a few KB from run `live`, `deleted` (deleted), `registered`
    (deleted, its model registered) and `gone` (deleted, then removed by `mlflow gc`). Client, URI, experiment id,
    model ids."""
    from bertpipe.tracking.store import client, open_experiment

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow_client = client(uri)
    experiment = open_experiment(mlflow_client, uri, "bertpipe")
    (root / "export").mkdir()
    (root / "export" / "model.safetensors").write_bytes(os.urandom(4096))
    runs, models = {}, {}
    for name in ("live", "deleted", "registered", "gone"):
        run = mlflow_client.create_run(experiment, run_name=name)
        model = mlflow_client.create_logged_model(experiment, name="model", source_run_id=run.info.run_id)
        mlflow_client.log_model_artifacts(model.model_id, str(root / "export"))
        mlflow_client.finalize_logged_model(model.model_id, "READY")
        mlflow_client.set_terminated(run.info.run_id)
        runs[name], models[name] = run.info.run_id, model.model_id
    mlflow_client.create_registered_model("bert")
    import mlflow  # as the export registers: a `models:/` source is resolved through the process's tracking URI

    mlflow.set_tracking_uri(uri)
    mlflow_client.create_model_version("bert", f"models:/{models['registered']}", run_id=runs["registered"])
    for name in ("deleted", "registered", "gone"):
        mlflow_client.delete_run(runs[name])
    mlflow_gc(uri, "--run-ids", runs["gone"])
    return mlflow_client, uri, experiment, models


def mlflow_gc(uri: str, *args: str) -> None:
    """The README's `mlflow gc` line."""
    subprocess.run([str(BIN / "mlflow"), "gc", "--backend-store-uri", uri, "--tracking-uri", uri, *args], check=True,
                   capture_output=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})


def test_gc_lists_without_removing_then_removes_exactly_what_it_listed(tmp_path: Path, hold: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = dvc_repository(tmp_path / "repo")  # the workspace: the repository's params, train.precision auto
    work = root / WORK_ROOT
    current = stopped_run(root, spec_for(params(), "bf16"))
    stopped = stopped_run(root, spec_for(params({"train.lr": 0.005}), "fp32"))
    (root / "models" / "checkpoint").mkdir(parents=True)  # the stopped run's last checkpoint, mirrored by hard links
    os.link(stopped / "step-0000020" / "optimizer.pt", root / "models" / "checkpoint" / "optimizer.pt")
    running = stopped_run(root, spec_for(params({"train.lr": 0.002}), "fp32"))
    hold(running.parent / f"{running.name}.lock")
    unfinished = work / ("e" * 16) / ".step-0000010.tmp"  # killed while writing its first checkpoint
    unfinished.mkdir(parents=True)
    (unfinished / "optimizer.pt").write_bytes(b"\0" * 500)
    stale_lock, held_lock = work / f"{'a' * 16}.lock", work / f"{'b' * 16}.lock"
    stale_lock.touch()
    held_lock.touch()
    hold(held_lock)
    outside = stopped_run(tmp_path / "elsewhere", spec_for(params({"train.lr": 0.003}), "fp32"))
    (work / outside.name).symlink_to(outside, target_is_directory=True)  # a link out of the repository
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")  # registering reads it too
    mlflow_client, uri, experiment, models = mlflow_store(root)
    model_folders = {name: root / "mlruns" / "models" / model_id for name, model_id in models.items()}
    stopped_bytes = 2 * sum(CHECKPOINT_FILES.values()) - CHECKPOINT_FILES["optimizer.pt"] + sum(
        (checkpoint / "state.json").stat().st_size for checkpoint in stopped.iterdir())
    expected = {stopped: stopped_bytes, work / ("e" * 16): 500, stale_lock: 0,
                model_folders["deleted"]: 4096, model_folders["gone"]: 4096}
    assert {item.path: item.size for item in survey(root, uri).reclaimable} == expected
    before = files(tmp_path)

    dry = CliRunner().invoke(main, ["gc"])
    assert dry.exit_code == 0, dry.output
    assert listed(dry.output) == {str(path.relative_to(root)) for path in expected}
    assert f"total: {sum(expected.values()) / 1024:.1f} KiB" in dry.output
    assert "the workspace's params.yaml resumes it (step 20 of 50)" in dry.output
    assert "a pretrain run holds its lock" in dry.output and "a symbolic link" in dry.output
    assert "a registered model version is made from it" in dry.output
    assert "`mlflow gc --backend-store-uri" in dry.output
    assert files(tmp_path) == before
    assert {m.model_id for m in mlflow_client.search_logged_models([experiment])} == set(models.values())

    real = CliRunner().invoke(main, ["gc", "--yes"])
    assert real.exit_code == 0, real.output
    assert f"freed: {sum(expected.values()) / 1024:.1f} KiB" in real.output and "kept" not in real.output
    gone = [*expected, stopped.parent / f"{stopped.name}.lock"]
    assert files(tmp_path) == {path: size for path, size in before.items()
                               if not any((tmp_path / path).is_relative_to(removed) for removed in gone)}
    assert (root / "models" / "checkpoint" / "optimizer.pt").stat().st_size == CHECKPOINT_FILES["optimizer.pt"]
    assert current.is_dir() and running.is_dir() and outside.is_dir() and held_lock.exists()
    left = {m.model_id for m in mlflow_client.search_logged_models([experiment])}
    assert left == {models["live"], models["registered"]}
    mlflow_gc(uri)  # drops the rows of the models marked deleted, whose folders are gone already
    assert listed(CliRunner().invoke(main, ["gc"]).output) == set()


def test_a_queued_experiment_keeps_the_folder_it_would_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = dvc_repository(tmp_path / "repo")
    (root / "dvc.yaml").write_text("stages:\n  pretrain:\n    cmd: 'true'\n    params: [seed, train]\n")
    (root / ".gitignore").write_text("/.bertpipe/\n")
    for key, value in {"user.name": "test", "user.email": "test@example.com"}.items():
        subprocess.run(["git", "config", key, value], cwd=root, check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "pipeline"], cwd=root, check=True)
    queued = stopped_run(root, spec_for(params({"train.lr": 0.005}), "fp32"))
    stopped = stopped_run(root, spec_for(params({"train.lr": 0.007}), "fp32"))
    subprocess.run([str(BIN / "dvc"), "exp", "run", "--queue", "-n", "slower", "-S", "train.lr=0.005"], cwd=root,
                   check=True, capture_output=True)
    found = survey(root, f"sqlite:///{root / 'mlflow.db'}")
    assert [item.path for item in found.reclaimable] == [stopped]
    assert [item.why for item in found.kept] == ["DVC experiment slower's params.yaml resumes it (step 20 of 50)"]
    assert found.kept[0].path == queued


def test_params_that_cannot_be_read_keep_every_work_folder(tmp_path: Path) -> None:
    root = dvc_repository(tmp_path / "repo")
    (root / "params.yaml").write_text("train: {lr: -1}\n")
    folder = stopped_run(root, spec_for(params({"train.lr": 0.005}), "fp32"))
    found = survey(root, f"sqlite:///{root / 'mlflow.db'}")
    assert found.reclaimable == [] and [item.path for item in found.kept] == [folder]
    assert found.kept[0].why.startswith("the workspace's params.yaml, which cannot be read (params.yaml: train.lr")
