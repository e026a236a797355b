"""Every "auto" of params.yaml settled once, into the concrete settings a run uses and its stage logs.

`train.device` (CUDA when present), `train.nproc` (one process per visible GPU, 1 on a CPU),
`train.precision` (bf16 where the hardware computes it natively), `train.threads` (the CPUs a process
may use shared among the machine's bertpipe trainings) and `train.micro_batch_size` (this rank's share
of the batch cut into length buckets, or with `auto` the largest micro-batch the memory planner finds
room for; an explicit size must fit). Nothing else in the pipeline decides them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from bertpipe.config import Params, TrainConfig
from bertpipe.devices import resolve_device, resolve_precision
from bertpipe.errors import ConfigError
from bertpipe.model import memory
from bertpipe.model.bert import BertConfig
from bertpipe.model.memory import MemoryPlan
from bertpipe.training.distributed import under_torchrun

# One file per bertpipe training process on this machine, locked (flock) by that process: the kernel drops the
# lock when the process ends, SIGKILL included, so a file that nobody holds is a leftover.
TRAININGS = Path(tempfile.gettempdir()) / "bertpipe-trainings"


def resolve(params: Params, examples_meta: dict) -> tuple[Params, MemoryPlan]:
    """`params` with no "auto" left, and the memory plan behind its micro-batch size.

    The world size is torchrun's (several machines) or the resolved `train.nproc` (one machine).
    """
    cfg = params.train
    device = resolve_device(cfg.device)
    nproc = resolve_nproc(cfg.nproc, device)
    world_size = int(os.environ.get("WORLD_SIZE", nproc))
    if cfg.batch_size < world_size:
        raise ConfigError("train.batch_size", cfg.batch_size, f"at least the number of processes ({world_size})")
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", nproc))  # this run's, on this machine
    cfg = cfg.model_copy(update={"device": device.type, "nproc": nproc,
                                 "precision": resolve_precision(cfg.precision, device),
                                 "threads": resolve_threads(cfg.threads, local_processes)})
    bert_config = BertConfig.from_params(params.model, examples_meta["vocab_size"])
    plan = memory.check(bert_config, cfg, bucket_rows(cfg, world_size), examples_meta["max_len"],
                        examples_meta["max_predictions"], device)
    return params.model_copy(update={"train": cfg.model_copy(update={"micro_batch_size": plan.rows})}), plan


def resolve_nproc(nproc: int | str, device: torch.device) -> int:
    """`train.nproc`: auto = one process per visible GPU, 1 on a CPU-only machine."""
    if nproc == "auto":
        return torch.cuda.device_count() if device.type == "cuda" else 1
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError("train.nproc", nproc, f"at most the {torch.cuda.device_count()} visible GPUs")
    return int(nproc)


def resolve_threads(threads: int | str, local_processes: int) -> int:
    """`train.threads`: auto = the CPUs this process may use (its affinity: taskset, a container's cpuset, a
    batch scheduler's share) divided among this run's `local_processes` and the other bertpipe trainings
    running on the machine (`other_trainings`), at least 1; what OMP_NUM_THREADS says when it is set.

    Torch's default, every CPU, collapses beside another busy process (its idle OpenMP threads spin): two
    queued runs of `dvc exp run --run-all -j 2` on 2 cores trained at 192 pairs/s each, one alone at 1,091.
    A training counts those that started before it or with it, not those that start later; the stage also
    lets idle threads sleep (OMP_WAIT_POLICY, stages/pretrain.py), so an earlier run's extra threads cost little.
    """
    if threads != "auto":
        return int(threads)
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()  # as torch read it
    return max(1, len(os.sched_getaffinity(0)) // (local_processes + other_trainings()))


def other_trainings() -> int:
    """How many bertpipe training processes outside this run are alive on this machine (`training_here`
    counts each); files of dead ones are removed on the way."""
    mine = _run_key()
    return sum(1 for entry in TRAININGS.glob("[!.]*") if entry.name.split(".")[0] != mine and _alive(entry))


@contextlib.contextmanager
def training_here() -> Iterator[None]:
    """Counted by `other_trainings` elsewhere while the block runs: a file in TRAININGS named after this
    run, locked before it is renamed into view, so that it is never taken for a dead process's. A launcher
    counts as one more process of its run: it registers before it knows it will only wait for its ranks."""
    with contextlib.suppress(FileExistsError):
        TRAININGS.mkdir()
        TRAININGS.chmod(0o1777)  # as /tmp: every user's trainings count; each removes only its own files
    fd, temporary = tempfile.mkstemp(dir=TRAININGS, prefix=".")
    entry = TRAININGS / f"{_run_key()}{Path(temporary).name}"
    try:
        os.fchmod(fd, 0o644)  # other users' trainings open it to test the lock
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(temporary, entry)
        yield
    finally:
        for path in (entry, Path(temporary)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        os.close(fd)


def _run_key() -> str:
    """What this run's processes on this machine share: torchrun's agent (the local ranks' parent), or this
    process. `resolve_threads` counts them as `local_processes`, not as other trainings."""
    return str(os.getppid() if under_torchrun() else os.getpid())


def _alive(entry: Path) -> bool:
    """Whether a process holds `entry`'s lock; a file nobody holds is removed (another user's stays)."""
    try:
        fd = os.open(entry, os.O_RDONLY)
    except FileNotFoundError:  # its training ended meanwhile
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        with contextlib.suppress(OSError):
            entry.unlink()
        return False
    finally:
        os.close(fd)


def bucket_rows(cfg: TrainConfig, world_size: int) -> int:
    """Rows per micro-batch: this rank's share of the batch cut into `train.length_buckets` runs of
    similar length, fewer if `train.micro_batch_size` says so (`auto` is settled by the planner)."""
    share = -(-cfg.batch_size // world_size)
    rows = -(-share // cfg.length_buckets)
    return rows if cfg.micro_batch_size in (None, "auto") else min(cfg.micro_batch_size, rows)
