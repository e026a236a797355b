"""torch.distributed plumbing: which process this is, DDP's wrapper, and starting the others with torchrun.

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment) a process joins the world torchrun
made, over NCCL on GPUs or gloo on CPUs. A plain `python stages/pretrain.py` that wants N > 1
processes starts them through torchrun's own launcher (`torch.distributed.launcher.api`, the code
behind `torchrun --standalone`), so multi-node runs use torchrun's rendezvous unchanged and a
failing rank ends the whole run instead of leaving the others waiting at a collective. A rank dies
with the process that started it, and a stopped run says so once, in rank 0's words.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bertpipe.atomic import write_json
from bertpipe.errors import Interrupted, PipelineError

# A rank that dies mid-collective is caught by torchrun's agent; this bounds the wait otherwise.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
LAUNCHER_PID = "BERTPIPE_LAUNCHER_PID"  # set by `launch` for its ranks: the process each one dies with
STOP_REPORT = "BERTPIPE_STOP_REPORT"  # set by `launch` for its ranks: where rank 0 leaves how it stopped


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def die_with_parent() -> None:
    """Have Linux SIGKILL this rank when its parent, torchrun's agent (in `launch`'s process, or `torchrun`),
    dies. torchrun starts each rank in a session of its own, so killing the launcher's process group (an OOM
    kill, a wrapper that dies) would miss the ranks: they would train on, write outputs nobody waits for and
    hold the run's lock against a rerun. The agent starts the ranks from its main thread, whose end (the
    process's) is what the signal follows."""
    if sys.platform != "linux":
        return
    parent = int(os.environ.get(LAUNCHER_PID, os.getppid()))
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before the signal was asked for
        os._exit(1)


def init_world(device: torch.device) -> World:
    """Join torchrun's process group if there is one; otherwise a world of one."""
    if not under_torchrun():
        return World(0, 1, 0, device)
    rank, size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    return World(rank, size, local_rank, device)


def wrap(module: nn.Module, world: World) -> nn.Module:
    """`module` under DDP when the world has several processes (gradients all-reduced in backward), else itself."""
    if not world.distributed:
        return module
    return DistributedDataParallel(module, device_ids=[world.device.index] if world.device.type == "cuda" else None)


def unwrap(module: nn.Module) -> nn.Module:
    """The module DDP wraps (or `module` itself)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


def describe_devices(world: World) -> str:
    """Every rank's device as text: `cpu`, `cpu (2 processes)`, `cuda:0-7 (NVIDIA H200)`, `... x 2 nodes`."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    nodes = max(1, world.size // per_node)
    if world.device.type == "cuda":
        indices = "0" if per_node == 1 else f"0-{per_node - 1}"
        text = f"cuda:{indices} ({torch.cuda.get_device_name(world.device)})"
    else:
        text = "cpu" if per_node == 1 else f"cpu ({per_node} processes)"
    return text if nodes == 1 else f"{text} x {nodes} nodes"


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> None:
    """Run `python argv...` as `nproc` local processes under torchrun's launcher (standalone rendezvous).

    A signal to this process (Ctrl-C reaches only its process group: torchrun starts each rank in a session
    of its own) is passed on to the ranks by torchrun's agent, which waits for them; either way a stopped run
    ends here with rank 0's `Interrupted` (`pass_on_stop`), said once."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id="bertpipe",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.5)
    with tempfile.TemporaryDirectory(prefix="bertpipe-launch-") as folder:
        report = Path(folder) / "stop.json"
        ranks_inherit = {LAUNCHER_PID: str(os.getpid()), STOP_REPORT: str(report)}  # this process keeps its own
        try:
            with mock.patch.dict(os.environ, ranks_inherit):
                elastic_launch(config, sys.executable)(*argv)
        except SignalException as signalled:  # torchrun's agent has passed it on and waited for the ranks
            raise _reported_stop(report, signalled.sigval) from None
        except ChildFailedError as err:
            stopped = {abs(failure.exitcode) % 128 for failure in err.failures.values()}
            if stopped <= {signal.SIGTERM, signal.SIGINT}:  # every rank checkpointed and stopped on a signal
                raise _reported_stop(report, stopped.pop()) from None
            rank, failure = err.get_first_failure()  # the root cause; the others were stopped after it
            raise PipelineError(f"rank {rank} of {nproc} failed with exit code {failure.exitcode} (its error is"
                                " printed above); torchrun stopped the other ranks") from None


def pass_on_stop(stop: Interrupted, world: World) -> None:
    """A distributed run's stop is said once, by rank 0: under `launch` the launcher says it (rank 0 leaves its
    words in STOP_REPORT) and every rank exits with 128 + the signal in silence, which the launcher reads;
    under a torchrun of the user's, rank 0 says it and the others exit in silence. Returns on the rank that
    says it (rank 0 of a user's torchrun, or a single process), whose caller raises `stop`."""
    report = os.environ.get(STOP_REPORT)
    if world.is_main and report is None:
        return
    if world.is_main:
        write_json(report, {"signum": stop.signum, "message": str(stop)})
    sys.exit(128 + stop.signum)


class RankStopped(Interrupted):
    """A launched run's stop in rank 0's words (the step and checkpoint it stopped at), said by the launcher."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(signum)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _reported_stop(report: Path, signum: int) -> Interrupted:
    """Rank 0's stop as it reported it; without its report (stopped before training, or killed), the signal."""
    if not report.exists():
        return Interrupted(signum)
    said = json.loads(report.read_text())
    return RankStopped(said["signum"], said["message"])
