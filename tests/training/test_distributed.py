"""DDP on the CPU: 2 gloo processes give the 1-process result; a dead rank ends the run, and so does a
dead launcher; a stopped run says so once.

The stage is run as DVC runs it (a subprocess in a folder holding params.yaml); with
`train.nproc: 2` it starts its ranks through torchrun's launcher.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import BIN, REPO, free_port, params_with
from helpers.interrupt import STAGE, Target, Watched, checkpoints, interrupt_between_checkpoints
from helpers.job import as_job, training_ranks, wait_until_ended
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def stage_folder(root: Path, examples: Path, nproc: int, steps: int = 5, extra: dict | None = None) -> Path:
    """A stage folder; lr 1e-3 because Adam turns summation-order noise (~1e-10) in near-zero gradients
    into weight differences of up to lr/2: at the seed's 0.01 that alone exceeds the 1e-5 bound."""
    root.mkdir()
    (root / "examples").symlink_to(examples)
    settings = {"train.nproc": nproc, "train.batch_size": 64, "train.steps": steps, "train.lr": 1e-3,
                "train.precision": "fp32", "train.eval_every": 0, "train.eval_examples": 256,
                "mlflow.system_metrics": False, "model.hidden_dropout_prob": 0.0,
                "model.attention_probs_dropout_prob": 0.0, **(extra or {})}
    (root / "params.yaml").write_text(yaml.safe_dump(params_with(settings), sort_keys=False), encoding="utf-8")
    return root


def run_stage(folder: Path, tracking: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    return subprocess.run(STAGE, cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def final_checkpoint(folder: Path) -> Path:
    return sorted((folder / "models" / "checkpoint").glob("step-*"))[-1]


@pytest.fixture(scope="module")
def one_process(sample_examples: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The 1-process reference both multi-process tests compare with, and the store it logged to."""
    root = tmp_path_factory.mktemp("one_process")
    folder, tracking = stage_folder(root / "nproc1", sample_examples, nproc=1), f"sqlite:///{root / 'mlflow.db'}"
    done = run_stage(folder, tracking)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("sentence pairs/sec on") == 1
    return folder, tracking


def test_two_processes_reproduce_one(one_process: tuple[Path, str], sample_examples: Path, tmp_path: Path) -> None:
    single, tracking = one_process
    folder = stage_folder(tmp_path / "nproc2", sample_examples, nproc=2)
    done = run_stage(folder, tracking)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("sentence pairs/sec on") == 1
    assert sorted(p.name for p in (folder / "plots").iterdir()) == ["loss.csv", "loss.png", "valid.csv"]
    (history_1, weights_1), (history_2, weights_2) = (
        (json.loads((final_checkpoint(f) / "state.json").read_text())["history"]["losses"],
         load_file(final_checkpoint(f) / "model.safetensors")) for f in (single, folder))
    assert len(history_1) == len(history_2) == 5
    for row_1, row_2 in zip(history_1, history_2, strict=True):
        assert all(abs(row_1[loss] - row_2[loss]) <= 1e-5 for loss in ("mlm_loss", "nsp_loss"))
    assert weights_1.keys() == weights_2.keys()
    for name, tensor in weights_1.items():
        assert (tensor - weights_2[name]).abs().max() <= 1e-5, name
    assert_one_mlflow_run_each(tracking)


@pytest.fixture(scope="module")
def mlm_examples(sample_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Single-segment examples for `train.objective: mlm`."""
    from bertpipe.config import ExamplesConfig
    from bertpipe.data.examples import build_examples

    folder = tmp_path_factory.mktemp("mlm") / "examples"
    build_examples(sample_prepared, folder, ExamplesConfig(strategy="segments"), seed=0, objective="mlm")
    return folder


def test_two_processes_reproduce_one_for_mlm_alone(mlm_examples: Path, tmp_path: Path) -> None:
    """`train.objective: mlm` has no NSP head and no pooler, so DDP finds every parameter in the loss, and the
    split of the work still does not change the result."""
    mlm = {"train.objective": "mlm", "examples.strategy": "segments", "train.lr": 5e-4}  # see stage_folder on lr
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folders = [stage_folder(tmp_path / f"nproc{n}", mlm_examples, nproc=n, steps=3, extra=mlm) for n in (1, 2)]
    for folder in folders:
        done = run_stage(folder, tracking)
        assert done.returncode == 0, done.stderr[-2000:]
    (history_1, weights_1), (history_2, weights_2) = (
        (json.loads((final_checkpoint(f) / "state.json").read_text())["history"]["losses"],
         load_file(final_checkpoint(f) / "model.safetensors")) for f in folders)
    assert [set(row) for row in history_1] == [{"mlm_loss", "lr"}] * 3  # no NSP series of zeros
    for row_1, row_2 in zip(history_1, history_2, strict=True):
        assert abs(row_1["mlm_loss"] - row_2["mlm_loss"]) <= 1e-5
    assert weights_1.keys() == weights_2.keys() and not any("pooler" in k or "seq_relationship" in k for k in weights_1)
    for name, tensor in weights_1.items():
        assert (tensor - weights_2[name]).abs().max() <= 1e-5, name
    metrics = json.loads((folders[1] / "metrics" / "pretrain.json").read_text())
    assert "train_nsp_loss" not in metrics and "valid_nsp_loss" not in metrics and metrics["valid_mlm_loss"] > 0
    assert (folders[1] / "plots" / "loss.csv").read_text().splitlines()[:2] == [
        "step,mlm_loss,nsp_loss", f"1,{history_2[0]['mlm_loss']:.6g},"]  # no NSP: empty cells, not zeros


def assert_one_mlflow_run_each(tracking: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("bertpipe").experiment_id])
    assert len(runs) == 2  # one per stage invocation, none from rank 1
    assert sorted(run.data.tags["devices"] for run in runs) == ["cpu", "cpu (2 processes)"]


def test_a_killed_rank_ends_the_run(sample_examples: Path, tmp_path: Path) -> None:
    folder = stage_folder(tmp_path / "run", sample_examples, nproc=2, steps=100_000)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    with Watched(STAGE, folder, env) as launcher:
        os.kill(training_rank(launcher, rank=1), signal.SIGKILL)
        launcher.finish(timeout=90)
    assert launcher.proc.returncode != 0
    assert "rank 1 of 2 failed" in launcher.stderr


def training_rank(launcher: Watched, rank: int, timeout: float = 120.0) -> int:
    """The pid of worker `rank` once rank 0 has reported a step (so both ranks have trained one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and launcher.proc.poll() is None:
        if launcher.steps_done():
            workers = [p for p in psutil.Process(launcher.proc.pid).children(recursive=True)
                       if "pretrain.py" in " ".join(p.cmdline())]
            return next(p.pid for p in workers if p.environ().get("RANK") == str(rank))
        time.sleep(0.1)
    pytest.fail(f"no training step within {timeout} s:\n{launcher.output[-3000:]}")


def readme_multinode_command() -> list[str]:
    """The README's torchrun command for several machines, as a user would copy it."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("torchrun --nnodes 2"))
    text = lines[start].rstrip("\\") + " " + lines[start + 1]
    return shlex.split(text)


def test_two_torchrun_nodes_reproduce_one_process(one_process: tuple[Path, str], sample_examples: Path,
                                                  tmp_path: Path) -> None:
    """Two "nodes" on 127.0.0.1, started as two separate commands (the README's, one process each), meet at a
    c10d rendezvous and train as one process does: fp32, dropout off, within 1e-5."""
    single, _ = one_process
    nodes = stage_folder(tmp_path / "nodes", sample_examples, nproc=1)  # a shared file system
    (nodes / "data").mkdir()
    (nodes / "examples").rename(nodes / "data" / "examples")
    command = readme_multinode_command()
    assert command[:2] == ["torchrun", "--nnodes"]
    port = free_port()
    substitutions = {"torchrun": str(BIN / "torchrun"), "8": "1", "HOST:29500": f"127.0.0.1:{port}",
                     "stages/pretrain.py": str(REPO / "stages" / "pretrain.py")}
    command = [substitutions.get(arg, arg) for arg in command]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'nodes.db'}", "OMP_NUM_THREADS": "1"}
    launchers = [subprocess.Popen(command, cwd=nodes, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    try:
        outputs = [launcher.communicate(timeout=300) for launcher in launchers]
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
    for launcher, (_, stderr) in zip(launchers, outputs, strict=True):
        assert launcher.returncode == 0, stderr[-3000:]
    assert sum("sentence pairs/sec on cpu x 2 nodes\n" in err for _, err in outputs) == 1  # rank 0 reports
    one = json.loads((final_checkpoint(single) / "state.json").read_text())["history"]["losses"]
    two = json.loads((final_checkpoint(nodes) / "state.json").read_text())["history"]["losses"]
    assert len(one) == len(two) == 5
    for a, b in zip(one, two, strict=True):
        assert all(abs(a[loss] - b[loss]) <= 1e-5 for loss in ("mlm_loss", "nsp_loss"))


def test_sigterm_to_one_rank_stops_both_with_a_checkpoint(sample_examples: Path, tmp_path: Path) -> None:
    """With log_every > 1, a SIGTERM that reaches only rank 1 rides to rank 0 with the next losses' all-reduce:
    both ranks reach the same collectives, write one checkpoint at that sync point, and exit; nothing hangs."""
    folder = stage_folder(tmp_path / "run", sample_examples, nproc=2, steps=100_000,
                          extra={"train.log_every": 5, "train.checkpoint_every": 100_000})
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    with Watched(STAGE, folder, env) as launcher:
        os.kill(training_rank(launcher, rank=1), signal.SIGTERM)
        launcher.finish(timeout=120)
    stderr = launcher.stderr
    assert launcher.proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("Stopped: stopped by SIGTERM") and "of 2 failed" not in stderr
    (saved,) = sorted((folder / "models" / "checkpoint").glob("step-*"))
    step = json.loads((saved / "state.json").read_text())["state"]["step"]
    assert step % 5 == 0  # a sync point
    assert len(torch.load(saved / "rng.pt", weights_only=True)) == 2  # both ranks reached the gather


def test_ranks_die_with_their_launcher_and_a_rerun_resumes(sample_examples: Path, tmp_path: Path) -> None:
    """`kill -9` of the launcher's process group (an OOM kill, a wrapper that dies) also ends the ranks, which
    torchrun starts in sessions of their own: none trains on alone to write the stage's outputs, and a rerun
    resumes from the newest checkpoint and finishes."""
    folder = stage_folder(tmp_path / "run", sample_examples, nproc=2, steps=24, extra={"train.checkpoint_every": 2})
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    with Watched(as_job(STAGE), folder, env) as launcher:
        ranks = training_ranks(launcher, nproc=2)
        try:
            interrupt_between_checkpoints([Target(launcher, folder, lambda: -launcher.proc.pid)])  # the group
            launcher.finish(timeout=30)
            assert not wait_until_ended(ranks, timeout=15), f"ranks outlived their launcher:\n{launcher.output[-3000:]}"
        finally:
            for rank in wait_until_ended(ranks, timeout=0):
                rank.kill()
    assert not (folder / "metrics" / "pretrain.json").exists()
    newest = int(checkpoints(folder)[-1].name.split("-")[1])
    assert newest < 24
    again = run_stage(folder, env["MLFLOW_TRACKING_URI"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"(step {newest} of 24)" in again.stderr, again.stderr[-3000:]
    assert json.loads((final_checkpoint(folder) / "state.json").read_text())["state"]["step"] == 24


def test_ctrl_c_stops_every_rank_with_one_line_and_status_130(sample_examples: Path, tmp_path: Path) -> None:
    """Ctrl-C reaches the launcher's process group (torchrun's agent passes it on to the ranks): one `Stopped:`
    line, rank 0's, naming its checkpoint, no traceback, and 128 + SIGINT, as with one process."""
    folder = stage_folder(tmp_path / "run", sample_examples, nproc=2, steps=100_000)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    with Watched(as_job(STAGE), folder, env) as launcher:
        training_ranks(launcher, nproc=2)
        os.killpg(launcher.proc.pid, signal.SIGINT)
        launcher.finish(timeout=120)
    stderr = launcher.stderr
    assert launcher.proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    (stop,) = [line for line in stderr.splitlines() if "Stopped:" in line]
    assert stop.startswith("Stopped: stopped by SIGINT after step ") and " checkpoint models/checkpoint/step-" in stop
    assert "Traceback" not in stderr and "checkpoint None" not in stderr


def test_launch_gives_its_ranks_what_they_die_with_and_keeps_its_own_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher's pid and the stop report travel to the ranks only: a caller that runs a stage in-process
    afterwards (a benchmark, a notebook) must not find them, or it would take itself for a rank."""
    import torch.distributed.launcher.api as launcher_api

    from bertpipe.training.distributed import LAUNCHER_PID, STOP_REPORT, launch

    seen = {}
    monkeypatch.setattr(launcher_api, "elastic_launch",
                        lambda config, entrypoint: lambda *argv: seen.update({k: os.environ.get(k) for k in
                                                                             (LAUNCHER_PID, STOP_REPORT)}))
    monkeypatch.delenv(LAUNCHER_PID, raising=False)
    monkeypatch.delenv(STOP_REPORT, raising=False)
    launch(2, ["stages/pretrain.py"])
    assert seen[LAUNCHER_PID] == str(os.getpid()) and seen[STOP_REPORT].endswith("stop.json")
    assert LAUNCHER_PID not in os.environ and STOP_REPORT not in os.environ
