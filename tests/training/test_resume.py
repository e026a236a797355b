"""Resumable training through the pretrain stage, run as DVC runs it: a subprocess, killed and rerun.

A run killed at any moment (SIGKILL included) and rerun must end with the weights and the loss
history of a run that was never interrupted, bit for bit, on the CPU: the stage alone, and under
`dvc repro` in a temporary git + DVC repository (models/checkpoint is `persist: true`). Dropout stays
on (the tiny preset's 0.2), so this also checks that the RNG streams are restored, and the kill lands
between checkpoints, so the steps after the last one are done again. A checkpoint made with other
settings or data is never loaded: the stage says so and starts fresh. The uninterrupted reference is
conftest's `pretrained_folder` (steps 8, a checkpoint every 2, the last 2 kept).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import yaml
from conftest import (
    BIN,
    REPO,
    SMALL_PRETRAIN,
    STAGE_ENV,
    params_with,
    pretrain_folder,
    run_pretrain,
    small_run,
)
from helpers.interrupt import STAGE, STEPS, Target, Watched, checkpoints, interrupt_between_checkpoints
from safetensors.torch import load_file

from bertpipe.tracking import NullTracker
from bertpipe.training.distributed import World
from bertpipe.training.loop import train

CPU = World(0, 1, 0, torch.device("cpu"))


def write_params(folder: Path, overrides: Mapping[str, Any]) -> None:
    params = params_with({**SMALL_PRETRAIN, **overrides})
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def final_result(checkpoint_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The newest checkpoint's state.json and weights."""
    newest = checkpoints(checkpoint_dir)[-1]
    return json.loads((newest / "state.json").read_text()), load_file(newest / "model.safetensors")


def assert_same_run(checkpoint_dir: Path, reference_dir: Path) -> None:
    state, weights = final_result(checkpoint_dir)
    ref_state, ref_weights = final_result(reference_dir)
    assert state["state"]["step"] == ref_state["state"]["step"] == STEPS
    assert state["history"] == ref_state["history"]
    assert weights.keys() == ref_weights.keys()
    for name, tensor in ref_weights.items():
        assert torch.equal(weights[name], tensor), name


@dataclass(frozen=True)
class Stopped:
    folder: Path
    reached: int  # steps the run had recorded when it ended
    returncode: int
    stderr: str
    left: list[str]  # the checkpoint folder's entries after the interruption
    metrics_written: bool  # whether metrics/pretrain.json existed after the interruption
    rerun: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def stopped(sample_examples: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Stopped]:
    """A run killed by SIGKILL and one stopped by SIGTERM between checkpoints, side by side, then both rerun."""
    root = tmp_path_factory.mktemp("stopped")
    signums = [signal.SIGKILL, signal.SIGTERM]
    folders = [pretrain_folder(root / signal.Signals(signum).name, sample_examples) for signum in signums]
    with Watched(STAGE, folders[0]) as killed, Watched(STAGE, folders[1]) as terminated:
        runs = [killed, terminated]
        interrupt_between_checkpoints([
            Target(run, folder / "models" / "checkpoint", lambda run=run: run.proc.pid, signum)
            for run, folder, signum in zip(runs, folders, signums, strict=True)])
        for run in runs:
            run.finish()
    reached = [run.steps_done() for run in runs]
    left = [sorted(p.name for p in (folder / "models" / "checkpoint").iterdir()) for folder in folders]
    metrics_written = [(folder / "metrics" / "pretrain.json").exists() for folder in folders]
    with ThreadPoolExecutor(max_workers=2) as pool:
        reruns = list(pool.map(run_pretrain, folders))
    return {signum: Stopped(*fields) for signum, *fields in zip(
        signums, folders, reached, [run.proc.returncode for run in runs], [run.stderr for run in runs], left,
        metrics_written, reruns, strict=True)}


def test_sigkill_then_rerun_equals_uninterrupted_run(stopped: dict[int, Stopped], pretrained_folder: Path) -> None:
    run = stopped[signal.SIGKILL]
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    assert run.left and int(run.left[-1][5:]) < STEPS, "the kill came too late to test a resume"
    assert not run.metrics_written

    assert run.rerun.returncode == 0, run.rerun.stderr[-3000:]
    resumed_from = re.search(rf"resuming from models/checkpoint/(step-\d{{7}}) \(step (\d+) of {STEPS}\)",
                             run.rerun.stderr)
    assert resumed_from, run.rerun.stderr[-3000:]
    assert resumed_from[1] == run.left[-1]
    assert int(resumed_from[2]) < run.reached  # the kill came between checkpoints: recorded steps were lost
    assert_same_run(run.folder / "models" / "checkpoint", pretrained_folder / "models" / "checkpoint")
    assert (run.folder / "plots" / "loss.csv").read_bytes() == (pretrained_folder / "plots" / "loss.csv").read_bytes()


def test_sigterm_checkpoints_exits_143_and_rerun_completes(stopped: dict[int, Stopped],
                                                           pretrained_folder: Path) -> None:
    run = stopped[signal.SIGTERM]
    assert run.returncode == 143, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    message = re.search(r"stopped by SIGTERM after step (\d+); checkpoint (\S+) written", run.stderr)
    assert message, run.stderr[-3000:]
    step = int(message[1])
    assert step == run.reached  # it stopped right after the step it was in
    assert Path(message[2]) == Path("models/checkpoint") / f"step-{step:07d}"
    assert run.left[-1] == f"step-{step:07d}"

    assert run.rerun.returncode == 0, run.rerun.stderr[-3000:]
    assert f"resuming from models/checkpoint/step-{step:07d} (step {step} of {STEPS})" in run.rerun.stderr
    assert_same_run(run.folder / "models" / "checkpoint", pretrained_folder / "models" / "checkpoint")


def test_lamb_sigkill_then_rerun_equals_uninterrupted_run(sample_examples: Path, tmp_path: Path) -> None:
    """LAMB keeps more than Adam's moments (its step count in the parameter groups, the library's norms and
    trust ratios in the state): a LAMB run with BERT's large-batch schedule (a warm-up share, polynomial decay)
    and weight decay, killed between checkpoints and rerun, ends bit for bit as the same run never
    interrupted, which goes alongside."""
    lamb = {"train.optimizer": "lamb", "train.weight_decay": 0.01, "train.schedule": "poly", "train.warmup_ratio": 0.25}
    killed, straight = (pretrain_folder(tmp_path / name, sample_examples, lamb) for name in ("killed", "straight"))
    with Watched(STAGE, straight) as reference, Watched(STAGE, killed) as watched:
        [reached] = interrupt_between_checkpoints([Target(watched, killed / "models" / "checkpoint",
                                                          lambda: watched.proc.pid)])
        watched.finish()
        rerun = run_pretrain(killed)
        output = reference.finish()
    assert watched.proc.returncode == -signal.SIGKILL, watched.stderr[-3000:]
    assert reference.proc.returncode == 0, output[-3000:]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed_from = re.search(rf"resuming from models/checkpoint/step-\d{{7}} \(step (\d+) of {STEPS}\)", rerun.stderr)
    assert resumed_from and int(resumed_from[1]) < reached, rerun.stderr[-3000:]  # recorded steps were lost
    assert_same_run(killed / "models" / "checkpoint", straight / "models" / "checkpoint")
    assert final_result(straight / "models" / "checkpoint")[0]["spec"]["train"]["optimizer"] == "lamb"


def test_only_the_last_checkpoints_are_kept(pretrained_folder: Path) -> None:
    """checkpoint_every 2, steps 8, keep_checkpoints 2: steps 6 and 8 remain, and no temporary folder."""
    names = sorted(p.name for p in (pretrained_folder / "models" / "checkpoint").iterdir())
    assert names == ["mlflow_run.json", "step-0000006", "step-0000008"]  # mlflow_run.json: the latest run's link
    for path in checkpoints(pretrained_folder / "models" / "checkpoint"):
        assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optimizer.pt", "rng.pt",
                                                          "state.json"]


def test_checkpoint_of_another_model_shape_starts_fresh(pretrained_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "changed"
    shutil.copytree(pretrained_folder, folder, symlinks=True)
    write_params(folder, {"model.hidden_size": 64})
    done = run_pretrain(folder)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "models/checkpoint/step-0000008 was made with other settings or data" in done.stderr
    assert "model.hidden_size: 128 -> 64" in done.stderr
    assert "starting fresh" in done.stderr and "resuming from" not in done.stderr
    state, weights = final_result(folder / "models" / "checkpoint")
    assert state["state"]["step"] == STEPS and len(state["history"]["losses"]) == STEPS
    assert state["spec"]["model"]["hidden_size"] == 64
    assert weights["bert.embeddings.word_embeddings.weight"].shape[1] == 64


# --- in-process: the same loop the stage runs, where a subprocess would only add start-up time -------------






@pytest.fixture(scope="module")
def other_vocab_examples(sample_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/examples of another run: the same sample prepared with prepare.min_freq 3 (another vocabulary)."""
    from bertpipe.config import ExamplesConfig, PrepareConfig
    from bertpipe.data.examples import build_examples
    from bertpipe.data.prepare import prepare

    root = tmp_path_factory.mktemp("other_vocab")
    prepare(sample_prepared.parent / "raw", root / "prepared", PrepareConfig(min_freq=3))
    build_examples(root / "prepared", root / "examples", ExamplesConfig(), seed=0)
    return root / "examples"


@pytest.mark.usefixtures("one_thread")
def test_checkpoint_of_other_data_starts_fresh(sample_examples: Path, other_vocab_examples: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Examples built against another vocabulary: another data hash, so the checkpoint is not loaded."""
    train(small_run(sample_examples, tmp_path, **{"train.steps": 2}), NullTracker())
    fresh = small_run(other_vocab_examples, tmp_path, **{"train.steps": 2})
    assert fresh.record.state.step == 0 and fresh.checkpointer.last is None
    assert "step-0000002 was made with other settings or data" in caplog.text
    assert "examples.vocab_s" in caplog.text  # vocab_sha256 or vocab_size, whichever is listed first
    train(fresh, NullTracker())
    assert fresh.record.state.step == 2 and len(fresh.record.history.losses) == 2


@pytest.mark.usefixtures("one_thread")
def test_rerun_removes_a_checkpoint_write_cut_short(sample_examples: Path, tmp_path: Path) -> None:
    """A SIGKILL during `checkpoint.save` leaves atomic_dir's temporary sibling; the rerun must not keep it."""
    straight = small_run(sample_examples, tmp_path)
    train(straight, NullTracker())
    checkpoint_dir, work = tmp_path / "checkpoint", straight.checkpointer.work.folder  # written to work, mirrored
    for folder in (checkpoint_dir, work):  # killed while writing step 4: step 2 is the newest
        shutil.rmtree(folder / "step-0000004")
        partial = folder / ".step-0000004.k1ll3d.tmp"
        partial.mkdir()
        (partial / "model.safetensors").write_bytes(b"\0" * 1000)
    resumed = small_run(sample_examples, tmp_path)
    assert resumed.record.state.step == 2
    train(resumed, NullTracker())
    assert resumed.record.history.losses == straight.record.history.losses
    for folder in (checkpoint_dir, work):
        assert sorted(p.name for p in folder.iterdir()) == ["step-0000002", "step-0000004"]


# --- the same through `dvc repro` in a temporary git + DVC repository --------------------------------------


def make_repo(folder: Path, raw: Path) -> Path:
    """dvc.yaml, params.yaml, stages/ and bertpipe/ of this repository, in a fresh git + DVC repository."""
    folder.mkdir()
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copyfile(REPO / name, folder / name)
    for name in ("stages", "bertpipe"):
        shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    write_params(folder, {"data.source": str(raw)})
    for args in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(args, cwd=folder, env=dvc_env(folder), check=True, capture_output=True, timeout=60)
    (folder / ".dvc" / "config").write_text("[core]\n    analytics = false\n    check_update = false\n")
    return folder


def dvc_env(folder: Path) -> dict[str, str]:
    """The venv first on PATH (DVC runs `python stages/...` with it), DVC offline."""
    return STAGE_ENV | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
                         "DVC_SITE_CACHE_DIR": str(folder.parent / f"{folder.name}-dvc-site-cache")}


def repro(folder: Path) -> str:
    done = subprocess.run([str(BIN / "dvc"), "repro", "pretrain"], cwd=folder, env=dvc_env(folder),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def training_process(dvc: psutil.Process) -> int:
    """The python process DVC started for the pretrain stage (not the shell DVC may start it through)."""
    for child in dvc.children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "stages/pretrain.py" in cmdline and "python" in Path(cmdline[0]).name:
            return child.pid
    pytest.fail("the pretrain stage's python process was not found among dvc's children")


@pytest.mark.slow
def test_dvc_repro_after_sigkill_equals_uninterrupted_repro(sample_raw: Path, tmp_path: Path) -> None:
    """Kill the stage's python process under `dvc repro`, repro again; compare with a second repository's
    uninterrupted `dvc repro` (run alongside, to save time)."""
    killed, straight = make_repo(tmp_path / "killed", sample_raw), make_repo(tmp_path / "straight", sample_raw)
    with Watched([str(BIN / "dvc"), "repro", "pretrain"], straight, dvc_env(straight)) as reference_repro:
        with Watched([str(BIN / "dvc"), "repro", "pretrain"], killed, dvc_env(killed)) as watched:
            dvc = psutil.Process(watched.proc.pid)
            interrupt_between_checkpoints([Target(watched, killed / "models" / "checkpoint",
                                                  lambda: training_process(dvc))])
            output = watched.finish()
        assert watched.proc.returncode != 0, output[-3000:]
        left = checkpoints(killed / "models" / "checkpoint")  # persist: true, DVC leaves it in place
        assert left and int(left[-1].name[5:]) < STEPS

        output = repro(killed)
        assert "Running stage 'pretrain'" in output and "Running stage 'examples'" not in output
        assert f"resuming from models/checkpoint/{left[-1].name}" in output
        output = reference_repro.finish(timeout=300)
    assert reference_repro.proc.returncode == 0, output[-3000:]
    assert "resuming from" not in output
    assert_same_run(killed / "models" / "checkpoint", straight / "models" / "checkpoint")


def exp_run(folder: Path, *args: str) -> Watched:
    """`dvc exp run ARGS pretrain`: the stage that resumes, without the export after it."""
    return Watched([str(BIN / "dvc"), "exp", "run", *args, "pretrain"], folder, dvc_env(folder))


def work_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints of interrupted runs, kept where DVC does not delete them (bertpipe.training.workdir)."""
    return sorted((folder / ".bertpipe" / "checkpoints").glob("*/step-*"))


@pytest.mark.slow
def test_an_interrupted_dvc_exp_run_resumes_when_run_again(sample_raw: Path, tmp_path: Path) -> None:
    """`dvc exp run --temp` (a folder DVC deletes) stopped by SIGTERM, and `dvc exp run` in the workspace
    (whose checkpoints DVC replaces with the committed ones) killed by SIGKILL: the stop message is true,
    and running the same command again resumes."""
    folder = make_repo(tmp_path / "repo", sample_raw)
    for args in ([str(BIN / "dvc"), "repro", "examples"], ["git", "add", "-A"], ["git", "commit", "-qm", "baseline"]):
        subprocess.run(args, cwd=folder, env=dvc_env(folder), check=True, capture_output=True, timeout=120)
    for run_args, signum in ((["--temp"], signal.SIGTERM), ([], signal.SIGKILL)):
        with exp_run(folder, *run_args) as watched:
            dvc = psutil.Process(watched.proc.pid)
            interrupt_between_checkpoints([Target(watched, folder / ".bertpipe", lambda dvc=dvc: training_process(dvc),
                                                  signum)])
            output = watched.finish()
        kept = work_checkpoints(folder)
        assert kept and int(kept[-1].name[5:]) < STEPS, output[-3000:]
        if signum == signal.SIGTERM:
            assert f"kept in {kept[-1].parent}, which DVC does not delete" in output, output[-3000:]
            assert "run the same command again" in output
        with exp_run(folder, *run_args) as again:
            output = again.finish(timeout=300)
        assert again.proc.returncode == 0, output[-3000:]
        assert f"resuming from models/checkpoint/{kept[-1].name} (step {kept[-1].name[5:].lstrip('0')} of" in output
        assert work_checkpoints(folder) == []  # complete: the work folder is gone, DVC holds the result
