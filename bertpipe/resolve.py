"""Every "auto" of params.yaml settled once, into the concrete settings a run uses and its stage logs.

`train.device` (CUDA when present), `train.nproc` (one process per visible GPU, 1 on a CPU),
`train.precision` (bf16 where the hardware computes it natively) and `train.micro_batch_size`
(this rank's share of the batch cut into length buckets, or with `auto` the largest micro-batch the
memory planner finds room for; an explicit size must fit). Nothing else in the pipeline decides them.
"""

from __future__ import annotations

import os

import torch

from bertpipe.config import Params, TrainConfig
from bertpipe.devices import resolve_device, resolve_precision
from bertpipe.errors import ConfigError
from bertpipe.model import memory
from bertpipe.model.bert import BertConfig
from bertpipe.model.memory import MemoryPlan


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
    cfg = cfg.model_copy(update={"device": device.type, "nproc": nproc,
                                 "precision": resolve_precision(cfg.precision, device)})
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


def bucket_rows(cfg: TrainConfig, world_size: int) -> int:
    """Rows per micro-batch: this rank's share of the batch cut into `train.length_buckets` runs of
    similar length, fewer if `train.micro_batch_size` says so (`auto` is settled by the planner)."""
    share = -(-cfg.batch_size // world_size)
    rows = -(-share // cfg.length_buckets)
    return rows if cfg.micro_batch_size in (None, "auto") else min(cfg.micro_batch_size, rows)
