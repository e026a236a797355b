"""torch.distributed plumbing: which process this is, DDP's wrapper, and starting the others with torchrun.

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment) a process joins the world torchrun
made, over NCCL on GPUs or gloo on CPUs. A plain `python stages/pretrain.py` that wants N > 1
processes starts them through torchrun's own launcher (`torch.distributed.launcher.api`, the code
behind `torchrun --standalone`), so multi-node runs use torchrun's rendezvous unchanged and a
failing rank ends the whole run instead of leaving the others waiting at a collective.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bertpipe.errors import Interrupted, PipelineError

# A rank that dies mid-collective is caught by torchrun's agent; this bounds the wait otherwise.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


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
    """Run `python argv...` as `nproc` local processes under torchrun's launcher (standalone rendezvous)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id="bertpipe",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.5)
    try:
        elastic_launch(config, sys.executable)(*argv)
    except ChildFailedError as err:
        stopped = {abs(failure.exitcode) % 128 for failure in err.failures.values()}
        if stopped <= {signal.SIGTERM, signal.SIGINT}:  # every rank checkpointed and stopped on a signal
            raise Interrupted(stopped.pop()) from None
        rank, failure = err.get_first_failure()  # the root cause; the others were stopped after it
        raise PipelineError(f"rank {rank} of {nproc} failed with exit code {failure.exitcode} (its error is"
                            " printed above); torchrun stopped the other ranks") from None
