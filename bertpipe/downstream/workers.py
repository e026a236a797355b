"""Fine-tuning runs one after another in this process, or several at once, one CPU thread each, in worker processes.

A small model fine-tunes on a CPU in ops too small to split across threads: BERT-tiny on CoLA runs nearly as
fast on one thread as on two, so two runs on two cores, one thread each, do nearly twice the work of one run
on both. Workers (multiprocessing's Pool) are spawned, not forked (this process has started tokenizers' and OpenMP's
threads), take one thread each, ignore Ctrl-C (this process stops them), die with this process (Linux's
parent-death signal), and report each training step through a queue for the progress bar. Their results come back here,
where they are recorded one at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import queue
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bertpipe.config import DownstreamConfig
from bertpipe.downstream.finetune import Encoded, Outcome, finetune
from bertpipe.downstream.tasks import TaskData

PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOPS = {signal.SIGINT, signal.SIGTERM}
_steps: Any = None  # a worker's queue to the parent, set by _start_worker


@dataclass(frozen=True)
class Job:
    """One fine-tuning run: `finetune`'s arguments."""

    model_dir: Path
    task: TaskData
    data: Encoded
    cfg: DownstreamConfig
    seed: int
    init: str
    device: str
    precision: str
    pad_id: int

    def run(self, on_step: Callable[[float], None]) -> Outcome:
        return finetune(self.model_dir, self.task, self.data, self.cfg, self.seed, self.init,
                        torch.device(self.device), self.precision, self.pad_id, on_step=on_step)


def processes_for(preference: int | str, device: torch.device, hidden_size: int, narrow: int) -> int:
    """`downstream.processes`: auto = one per CPU this process may use for a model narrower than `narrow` on a
    CPU (at most 8: each holds its own copy of torch), else 1 (a wide model or a GPU uses the threads itself)."""
    if preference != "auto":
        return int(preference)
    if device.type != "cpu" or hidden_size >= narrow:
        return 1
    return max(1, min(8, len(os.sched_getaffinity(0))))


@contextlib.contextmanager
def runner(processes: int) -> Iterator[Callable[..., None]]:
    """`run(jobs, on_step, on_done)`: every job, `on_step(loss)` per training step, `on_done(job, outcome)` here
    as each finishes; in this process with `processes` 1, else in that many workers (killed on the way out
    if a run failed or a signal stopped the stage)."""
    if processes <= 1:
        yield _in_process
        return
    context = multiprocessing.get_context("spawn")
    steps = context.Queue()
    # Started with Ctrl-C and SIGTERM blocked (a mask survives exec): one arriving now waits until every worker
    # has its start-up data, and in a worker until its initializer runs, instead of a traceback mid-start.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    try:
        pool = context.Pool(processes, initializer=_start_worker, initargs=(steps,))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    try:
        yield lambda jobs, on_step, on_done: _in_workers(pool, steps, jobs, on_step, on_done)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _in_process(jobs: Sequence[Job], on_step: Callable[[float], None],
                on_done: Callable[[Job, Outcome], None]) -> None:
    for job in jobs:
        on_done(job, job.run(on_step))


def _in_workers(pool: Any, steps: Any, jobs: Sequence[Job], on_step: Callable[[float], None],
                on_done: Callable[[Job, Outcome], None]) -> None:
    pending = [(job, pool.apply_async(_work, (job,))) for job in jobs]
    while pending:
        with contextlib.suppress(queue.Empty):
            on_step(steps.get(timeout=0.5))
            while True:
                on_step(steps.get_nowait())
        for job, result in [(job, result) for job, result in pending if result.ready()]:
            pending.remove((job, result))
            on_done(job, result.get())  # a worker's exception is raised here


def _start_worker(steps: Any) -> None:
    """One thread, Ctrl-C left to the parent, and death with it (Linux)."""
    global _steps
    _steps = steps
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)
    if sys.platform == "linux":
        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # it died before the signal was asked for
            os._exit(1)


def _work(job: Job) -> Outcome:
    return job.run(_steps.put)
