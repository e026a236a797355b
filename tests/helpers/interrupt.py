"""Stages run as DVC runs them, watched as they run and interrupted between checkpoints (test_resume and
test_store_faults)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import PRETRAIN_OUTS, REPO, SMALL_PRETRAIN, STAGE_ENV

STEPS = SMALL_PRETRAIN["train.steps"]
STAGE = [sys.executable, str(REPO / "stages" / "pretrain.py"), "examples", *PRETRAIN_OUTS]


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoints in `folder`, or in the work folders under it (`.bertpipe/checkpoints`). os.walk, not
    rglob: a checkpoint's temporary folder is renamed while the run saves, and rglob fails on one that vanished."""
    found = []
    for root, dirs, _ in os.walk(folder):
        found += [Path(root, name) for name in dirs if name.startswith("step-")]
        dirs[:] = [name for name in dirs if not name.startswith(("step-", ".step-"))]
    return sorted(found, key=lambda path: path.name)


class Watched:
    """A subprocess whose stdout and stderr are collected as they come, so a test can act mid-run."""

    def __init__(self, args: list[str], cwd: Path, env: Mapping[str, str] = STAGE_ENV) -> None:
        env = {**env, "BERTPIPE_PROGRESS_SECONDS": "0"}  # a progress line per recorded step (bertpipe.progress)
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self._readers = [threading.Thread(target=self._read, args=(name,), daemon=True) for name in self._chunks]
        for reader in self._readers:
            reader.start()

    def _read(self, name: str) -> None:
        stream = getattr(self.proc, name)
        for chunk in iter(lambda: stream.read1(65536), b""):
            self._chunks[name].append(chunk)

    @property
    def stderr(self) -> str:
        return b"".join(self._chunks["stderr"]).decode(errors="replace")

    @property
    def output(self) -> str:
        return self.stderr + b"".join(self._chunks["stdout"]).decode(errors="replace")

    def steps_done(self) -> int:
        """The last step count the progress lines (on stderr) showed: steps recorded by the loop."""
        counts = re.findall(r"pretrain: ([\d,]+)/[\d,]+ step", self.stderr)
        return int(counts[-1].replace(",", "")) if counts else 0

    def __enter__(self) -> Watched:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Kill the process and whatever it started, if still running (a failed test must not leave them)."""
        if self.proc.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
            self.proc.kill()
            self.proc.wait()

    def finish(self, timeout: float = 180) -> str:
        """Wait for the process to end (killing it after `timeout`); its whole output."""
        try:
            self.proc.wait(timeout)
        finally:
            self.stop()
        for reader in self._readers:
            reader.join(10)
        return self.output


@dataclass(frozen=True)
class Target:
    """A run to interrupt: its output, its checkpoint folder, the pid to signal (found late, for DVC), the signal."""

    watched: Watched
    checkpoint_dir: Path
    victim: Callable[[], int]
    signum: int = signal.SIGKILL


def interrupt_between_checkpoints(targets: list[Target], timeout: float = 120) -> list[int]:
    """Signal each run once it has a checkpoint and has recorded a later step; the steps each had reached."""
    reached = [0] * len(targets)
    deadline = time.monotonic() + timeout
    while not all(reached) and time.monotonic() < deadline:
        for i, target in enumerate(targets):
            if reached[i]:
                continue
            if target.watched.proc.poll() is not None:
                pytest.fail(f"the run ended before it could be interrupted:\n{target.watched.output[-3000:]}")
            saved = [int(p.name.split("-")[1]) for p in checkpoints(target.checkpoint_dir)]
            done = target.watched.steps_done()
            if saved and saved[-1] < done < STEPS:
                os.kill(target.victim(), target.signum)
                reached[i] = done
        time.sleep(0.01)
    if not all(reached):
        pytest.fail(f"no checkpoint and later step within {timeout} s")
    return reached
