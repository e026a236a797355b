"""One training step: loss = MLM + NSP, as the seed, with the MLM loss over real predictions only.

One step takes the global batch of `train.batch_size` examples (`bertpipe.training.batches`), this rank's
share of it in length-sorted micro-batches, and accumulates
`sum(cross-entropy over real predicted tokens) / predictions in the global batch`
plus `sum(NSP cross-entropy) / batch_size`, times the world size because DDP averages gradients.
So the result does not depend on how many processes or micro-batches share the work, and padded
prediction slots never count (the flaw d2l-en#2582 describes in the seed's code).
Losses are read back to the host only every `train.log_every` steps.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bertpipe.config import TrainConfig
from bertpipe.errors import PipelineError
from bertpipe.training.batches import IGNORE_INDEX, Examples, global_batch, micro_batches, rank_share
from bertpipe.training.distributed import World
from bertpipe.training.precision import Compute


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


def loss_sums(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed MLM cross-entropy over real predictions and summed NSP cross-entropy of one micro-batch."""
    out = model(batch.input_ids, batch.token_type_ids, batch.valid_lens, batch.masked_positions)
    mlm = F.cross_entropy(out.mlm_logits.float(), batch.mlm_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    nsp = F.cross_entropy(out.nsp_logits.float(), batch.nsp_labels, reduction="sum")
    return mlm, nsp


def train_step(compute: Compute, optimizer: torch.optim.Optimizer, examples: Examples, plan: StepPlan,
               cfg: TrainConfig, world: World, unmask_full: bool | None = None) -> tuple[torch.Tensor, bool]:
    """Forward/backward over this rank's micro-batches, then one optimizer step on the master weights.

    Returns this rank's share of the step's [MLM loss, NSP loss], still on the device (summing over
    ranks gives the global means), and whether the step was skipped for a non-finite gradient;
    that check reads the gradient norm back, so it only runs with `train.skip_nonfinite`.
    `unmask_full`: micro-batches without padding attend without a key mask (`Batch.to`; default on CUDA).
    """
    losses = torch.zeros(2, device=world.device)
    for i, indices in enumerate(plan.shares):
        batch = examples.batch(indices, pin=world.device.type == "cuda").to(world.device, unmask_full)
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
