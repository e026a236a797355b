"""The pretraining loop: loss = MLM + NSP, as the seed, with the MLM loss over real predictions only.

One step takes the global batch of `train.batch_size` examples (`bertpipe.batches`), this rank's
share of it in length-sorted micro-batches, and accumulates
`sum(cross-entropy over real predicted tokens) / predictions in the global batch`
plus `sum(NSP cross-entropy) / batch_size`, times the world size because DDP averages gradients.
So the result does not depend on how many processes or micro-batches share the work, and padded
prediction slots never count (the flaw d2l-en#2582 describes in the seed's code).
Losses are read back to the host only every `train.log_every` steps.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bertpipe.batches import IGNORE_INDEX, Examples, global_batch, micro_batches, rank_share
from bertpipe.config import TrainConfig
from bertpipe.distributed import World
from bertpipe.errors import PipelineError
from bertpipe.model import BertForPreTraining

log = logging.getLogger(__name__)
EVAL_BATCH = 512


class NonFiniteLoss(PipelineError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class StepPlan:
    """Everything a step needs to know about its global batch, computed from numpy metadata."""

    shares: list[np.ndarray]  # this rank's micro-batches
    predictions: int  # real MLM slots in the global batch
    lengths: np.ndarray  # real lengths of the whole global batch (for FLOPs)

    @property
    def pairs(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())


def plan_step(step: int, examples: Examples, cfg: TrainConfig, seed: int, world: World, micro: int) -> StepPlan:
    indices = global_batch(step, examples.epoch_ranges(), cfg.batch_size, seed)
    lengths = np.asarray(examples.lengths[indices], dtype=np.int64)
    share = rank_share(indices, lengths, world.rank, world.size)
    return StepPlan(micro_batches(share, micro), examples.predictions(indices), lengths)


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then constant, linear or cosine decay to 0 at `steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the seed's) or AdamW; weight decay skips biases and LayerNorm weights, as BERT does."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(groups, lr=cfg.lr, foreach=True)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`train.precision`: auto = bf16 where the hardware computes it natively, else fp32.

    CPUs without AVX-512 BF16 or AMX emulate bf16 matrix products about 100x slower than fp32.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


@dataclass
class Compute:
    """The module a step's forward and backward run on, and the way its gradients reach the weights.

    In fp32 it is the model itself. In bf16 it is a bf16 copy of the model, as FSDP's
    MixedPrecision(param_dtype=bfloat16) runs: the weights are cast once per step (not once per
    matrix product and micro-batch, as autocast does), activations and gradients are bf16, and the
    fp32 model keeps the master weights that the optimizer updates and checkpoints save. Under DDP
    the module is wrapped, so gradients are all-reduced in its dtype.
    """

    model: BertForPreTraining  # fp32: the optimizer's and the checkpoints' weights
    module: nn.Module  # what forward runs on: `model` or its bf16 copy, DDP-wrapped when distributed

    @classmethod
    def build(cls, model: BertForPreTraining, precision: str, world: World) -> Compute:
        replica = copy.deepcopy(model).to(torch.bfloat16) if precision == "bf16" else model
        if not world.distributed:
            return cls(model, replica)
        device_ids = [world.device.index] if world.device.type == "cuda" else None
        return cls(model, DistributedDataParallel(replica, device_ids=device_ids))

    @property
    def replica(self) -> nn.Module:
        return self.module.module if isinstance(self.module, DistributedDataParallel) else self.module

    def pull_gradients(self) -> None:
        """The bf16 gradients, as fp32, into the master weights' .grad (nothing to do in fp32)."""
        if self.replica is self.model:
            return
        for master, low in zip(self.model.parameters(), self.replica.parameters(), strict=True):
            master.grad = None if low.grad is None else low.grad.float()
            low.grad = None

    def push_weights(self) -> None:
        """The updated master weights, cast, into the bf16 copy."""
        if self.replica is self.model:
            return
        with torch.no_grad():
            for master, low in zip(self.model.parameters(), self.replica.parameters(), strict=True):
                low.copy_(master)


def loss_sums(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed MLM cross-entropy over real predictions and summed NSP cross-entropy of one micro-batch."""
    out = model(batch.input_ids, batch.token_type_ids, batch.valid_lens, batch.masked_positions)
    mlm = F.cross_entropy(out.mlm_logits.float(), batch.mlm_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    nsp = F.cross_entropy(out.nsp_logits.float(), batch.nsp_labels, reduction="sum")
    return mlm, nsp


def train_step(compute: Compute, optimizer: torch.optim.Optimizer, examples: Examples, plan: StepPlan,
               cfg: TrainConfig, world: World) -> tuple[torch.Tensor, bool]:
    """Forward/backward over this rank's micro-batches, then one optimizer step on the master weights.

    Returns this rank's share of the step's [MLM loss, NSP loss], still on the device (summing over
    ranks gives the global means), and whether the step was skipped for a non-finite gradient;
    that check reads the gradient norm back, so it only runs with `train.skip_nonfinite`.
    """
    losses = torch.zeros(2, device=world.device)
    for i, indices in enumerate(plan.shares):
        batch = examples.batch(indices, pin=world.device.type == "cuda").to(world.device)
        last = i == len(plan.shares) - 1
        sync = contextlib.nullcontext() if last or not world.distributed else compute.module.no_sync()
        with sync:
            mlm, nsp = loss_sums(compute.module, batch)
            step_losses = torch.stack([mlm / max(plan.predictions, 1), nsp / plan.pairs])
            (step_losses.sum() * world.size).backward()
        losses += step_losses.detach()
    compute.pull_gradients()
    grad_norm = nn.utils.clip_grad_norm_(compute.model.parameters(), cfg.grad_clip or math.inf)
    skip = cfg.skip_nonfinite and not bool(torch.isfinite(grad_norm))
    if not skip:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    compute.push_weights()
    return losses, skip


@torch.no_grad()
def evaluate(model: nn.Module, examples: Examples, limit: int, world: World) -> dict[str, float]:
    """Held-out MLM and NSP loss and accuracy of `model` (a Compute's module), in eval mode, over the
    first `limit` examples (0 = all)."""
    was_training = model.training
    model.eval()
    n = len(examples) if limit == 0 else min(limit, len(examples))
    mine = np.arange(world.rank, n)[::world.size]
    mine = mine[np.argsort(examples.lengths[mine], kind="stable")]
    totals = torch.zeros(6, dtype=torch.float64, device=world.device)
    for indices in micro_batches(mine, EVAL_BATCH):
        batch = examples.batch(indices).to(world.device)
        out = model(batch.input_ids, batch.token_type_ids, batch.valid_lens, batch.masked_positions)
        mlm_logits, nsp_logits = out.mlm_logits.float(), out.nsp_logits.float()
        totals += torch.stack([
            F.cross_entropy(mlm_logits, batch.mlm_labels, ignore_index=IGNORE_INDEX, reduction="sum"),
            (mlm_logits.argmax(-1) == batch.mlm_labels).sum(), (batch.mlm_labels != IGNORE_INDEX).sum(),
            F.cross_entropy(nsp_logits, batch.nsp_labels, reduction="sum"),
            (nsp_logits.argmax(-1) == batch.nsp_labels).sum(), torch.tensor(len(batch.nsp_labels)),
        ]).double()
    if world.distributed:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    mlm_loss, mlm_correct, preds, nsp_loss, nsp_correct, pairs = totals.tolist()
    return {"valid_mlm_loss": mlm_loss / max(preds, 1), "valid_mlm_acc": mlm_correct / max(preds, 1),
            "valid_nsp_loss": nsp_loss / max(pairs, 1), "valid_nsp_acc": nsp_correct / max(pairs, 1)}


def trajectory_spec(bert_config: Any, cfg: TrainConfig, seed: int, examples_meta: dict) -> dict[str, Any]:
    """What a run's result depends on: a checkpoint made under a different spec is never resumed.

    How the work is split (device count, micro-batch size) is left out on purpose: it does not
    change the result, so a run may resume with more or fewer processes.
    """
    how = {"device", "nproc", "micro_batch_size", "length_buckets", "activation_checkpointing",
           "eval_every", "eval_examples", "log_every", "checkpoint_every", "keep_checkpoints"}
    return {"model": asdict(bert_config), "train": {k: v for k, v in asdict(cfg).items() if k not in how},
            "seed": seed, "examples": examples_meta}
