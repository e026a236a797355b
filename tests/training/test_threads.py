"""`train.threads`: auto shares the CPUs a process may use among the bertpipe trainings running on the machine,
so that trainings side by side (`dvc exp run --run-all -j N`, several ranks) do not oversubscribe the cores."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import PRETRAIN_OUTS, REPO, pretrain_folder

from bertpipe import resolve
from bertpipe.config import ModelConfig, TrainConfig
from bertpipe.model.bert import BertConfig
from bertpipe.resolve import resolve_threads, training_here
from bertpipe.training.checkpoint import trajectory_spec

# Another training on the machine: registered as the stage registers one, until its stdin closes. With
# LOCAL_RANK and WORLD_SIZE set it is a rank of the process that started it (torchrun's agent).
TRAINING = """
import sys
from pathlib import Path
from bertpipe import resolve
resolve.TRAININGS = Path(sys.argv[1])
with resolve.training_here():
    print("training", flush=True)
    sys.stdin.read()
"""

ON_ONE_CPU = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); os.execv(sys.argv[2], sys.argv[2:])"


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A machine of 12 CPUs, OMP_NUM_THREADS unset, whose trainings register in a folder of the test's."""
    monkeypatch.setattr(resolve, "TRAININGS", tmp_path / "trainings")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return tmp_path / "trainings"


@pytest.fixture
def start_training(machine: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """`start_training(rank_of_mine=False)`: a process counted as a training until the test ends."""
    started: list[subprocess.Popen] = []

    def start(rank_of_mine: bool = False) -> subprocess.Popen:
        env = {**os.environ, **({"LOCAL_RANK": "0", "WORLD_SIZE": "2"} if rank_of_mine else {})}
        proc = subprocess.Popen([sys.executable, "-c", TRAINING, str(machine)], env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline() == "training\n"
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def test_an_explicit_count_is_taken_as_it_is(machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_threads(3, local_processes=4) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resolve_threads(3, local_processes=1) == 3


def test_auto_takes_omp_num_threads_when_it_is_set(machine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resolve_threads("auto", local_processes=1) == torch.get_num_threads()


def test_auto_shares_the_cpus_among_the_trainings_on_the_machine(
        machine: Path, start_training: Callable[..., subprocess.Popen]) -> None:
    assert resolve_threads("auto", local_processes=1) == 12
    assert resolve_threads("auto", local_processes=2) == 6  # this run's ranks
    others = [start_training() for _ in range(3)]
    with training_here():  # this process's own file is not another training
        assert resolve_threads("auto", local_processes=1) == 3
    start_training(rank_of_mine=True)  # a rank this process started: counted in local_processes, not here
    assert resolve_threads("auto", local_processes=1) == 3
    others[0].send_signal(signal.SIGKILL)
    others[0].wait()
    assert resolve_threads("auto", local_processes=1) == 4  # a killed training no longer counts
    assert len(list(machine.iterdir())) == 3  # and its file is gone
    for proc in others[1:]:
        proc.communicate("")
    assert resolve_threads("auto", local_processes=1) == 12
    assert resolve_threads("auto", local_processes=24) == 1


def test_the_thread_count_is_not_part_of_the_trajectory() -> None:
    """How many threads a run uses no more changes its result than how many processes: a rerun beside another
    training (fewer threads) resumes the checkpoints of the first."""
    bert, meta = BertConfig.from_params(ModelConfig(), 100), {"vocab_size": 100}
    one, two = (trajectory_spec(bert, TrainConfig(threads=threads), 0, meta) for threads in (1, 2))
    assert one == two


def test_the_stage_settles_the_threads_from_its_cpus(sample_examples: Path, tmp_path: Path) -> None:
    """The stage allowed one CPU (as taskset, a container's cpuset or a batch scheduler allows it) trains with
    one thread under auto, and says so."""
    cpu = str(min(os.sched_getaffinity(0)))
    command = [sys.executable, "-c", ON_ONE_CPU, cpu, sys.executable, str(REPO / "stages" / "pretrain.py"),
               "examples", *PRETRAIN_OUTS]
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    folder = pretrain_folder(tmp_path / "run", sample_examples, {"train.steps": 2, "train.threads": "auto"})
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"^resolved: .* train\.threads=1 ", done.stderr, re.MULTILINE), done.stderr[-3000:]
