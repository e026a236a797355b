"""A stage started as a shell starts a job: the leader of a process group of its own, which a terminal's
Ctrl-C (SIGINT to the foreground group) or `kill -9 -PGID` reaches whole, without reaching pytest's group;
and the ranks such a stage starts."""

from __future__ import annotations

import contextlib
import sys
import time

import psutil
import pytest
from helpers.interrupt import Watched

# setpgid, then exec: the same pid in a group of its own, as Popen(process_group=0) makes it
IN_OWN_GROUP = "import os, sys; os.setpgid(0, 0); os.execv(sys.argv[1], sys.argv[1:])"


def as_job(args: list[str]) -> list[str]:
    """`args` run as the leader of a new process group."""
    return [sys.executable, "-c", IN_OWN_GROUP, *args]


def training_ranks(launcher: Watched, nproc: int, timeout: float = 120.0) -> list[psutil.Process]:
    """The launcher's ranks once rank 0 has reported a step (so every rank has trained one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and launcher.proc.poll() is None:
        if launcher.steps_done():
            ranks = [p for p in psutil.Process(launcher.proc.pid).children(recursive=True)
                     if "pretrain.py" in " ".join(p.cmdline())]
            assert len(ranks) == nproc, ranks
            return ranks
        time.sleep(0.1)
    pytest.fail(f"no training step within {timeout} s:\n{launcher.output[-3000:]}")


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie has ended: only its exit status waits to be collected)."""
    running = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
    return running


def wait_until_ended(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Poll until none of `processes` runs or `timeout` passes; those still running."""
    deadline = time.monotonic() + timeout
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive(processes)
