"""The pretraining loop and one step of it, in reading order: `train` (set the learning rate, step, and
at each sync point read the losses back, record and log them, evaluate, checkpoint, stop), then
`train_step` (micro-batches, loss, backward, clip, optimizer), the loss that training and evaluation
share (`loss_sums`), `evaluate`, and the `Checkpointer` that decides when to save and saves.

nanoGPT's `train.py` (lines 255-333) shows its step on one screen; this file keeps that order, with
the parts as functions so that tests can call them, and torchtitan's components that own their
decision and their action (`checkpointer.save(step, last_step=...)`).

Every collective (the losses' all-reduce, evaluation, a checkpoint's RNG gather) happens at steps
that depend only on the step and the config, so all ranks reach them in the same order whatever
else happens: a SIGTERM or SIGINT on any rank is only remembered, and rides to the other ranks
with the next losses' all-reduce (every `train.log_every` steps), after which all ranks checkpoint
and stop together.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bertpipe.config import Params, TrainConfig
from bertpipe.errors import Interrupted, PipelineError
from bertpipe.model.bert import BertConfig, BertForPreTraining, PreTrainingOutput
from bertpipe.model.memory import MemoryPlan
from bertpipe.progress import Progress
from bertpipe.tracking import Tracker
from bertpipe.training import checkpoint
from bertpipe.training.batches import IGNORE_INDEX, Batch, Examples, global_batch, micro_batches, rank_share
from bertpipe.training.checkpoint import RunRecord
from bertpipe.training.distributed import World, unwrap
from bertpipe.training.optim import get_lr, set_lr
from bertpipe.training.precision import Compute
from bertpipe.training.workdir import WorkFolder

EVAL_BATCH = 512  # rows per evaluation micro-batch (no gradients are kept)


class NonFiniteLoss(PipelineError):
    """The loss became NaN or infinite."""


@dataclass
class Run:
    """A run's objects, built once by `bertpipe.training.pretrain.setup`; `params` has no "auto" left."""

    params: Params
    world: World
    model: BertForPreTraining  # the fp32 weights the optimizer updates and checkpoints hold
    compute: Compute  # `compute.module`: what steps run on (the model or its bf16 copy, DDP-wrapped when distributed)
    optimizer: torch.optim.Optimizer
    train_set: Examples
    valid_set: Examples
    bert_config: BertConfig
    memory: MemoryPlan
    checkpointer: Checkpointer
    record: RunRecord = field(default_factory=RunRecord)  # what state.json keeps: step, history, throughput


class Pending(NamedTuple):
    """A step whose losses have not been read back yet."""

    losses: torch.Tensor  # [2] this rank's share of the step's MLM and NSP loss, on the device
    lr: float
    skipped: bool


def train(run: Run, tracker: Tracker) -> None:
    """Steps until `train.steps`, logging, evaluating and checkpointing on the way."""
    cfg, state, throughput = run.params.train, run.record.state, run.record.throughput
    pending: list[Pending] = []
    bar = Progress(cfg.steps, "pretrain", "step", initial=state.step, enabled=run.world.is_main)
    with StopFlag() as stop, bar:
        started = time.perf_counter()
        while state.step < cfg.steps:
            lr = get_lr(state.step, cfg)
            set_lr(run.optimizer, lr)
            plan = plan_step(state.step, run.train_set, cfg, run.params.seed, run.world, cfg.micro_batch_size)
            try:
                losses, skipped = train_step(run.compute, run.optimizer, run.train_set, plan, cfg, run.world)
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not isinstance(err, torch.OutOfMemoryError) and "allocate" not in str(err):
                    raise
                raise out_of_memory(run, plan) from None
            pending.append(Pending(losses, lr, skipped))
            state.step += 1
            throughput.count(run.bert_config, plan.lengths, plan.predictions)
            last_step = state.step == cfg.steps
            eval_due = bool(cfg.eval_every and state.step % cfg.eval_every == 0) or last_step  # last: final metrics
            if not (state.step % cfg.log_every == 0 or eval_due or run.checkpointer.due(state.step, last_step)):
                continue  # no sync point: the losses stay on the device
            synced, stopping = sync(run.world, pending, stop.signum)
            pairs_per_sec = throughput.lap(time.perf_counter() - started, cfg.batch_size * len(pending))
            record_steps(run, synced, pending)
            log_progress(run, tracker, bar, len(pending), pairs_per_sec)
            pending = []
            improved = False
            if eval_due:
                metrics = evaluate(run.compute.module, run.valid_set, cfg.eval_examples, run.world)
                tracker.log_metrics(metrics, step=state.step)
                improved = record_evaluation(run.record, metrics)
            run.checkpointer.save(run, last_step=last_step, force=improved or stopping)  # the best, or a stop
            if stopping:
                raise Interrupted(stop.signum or signal.SIGTERM, state.step, run.checkpointer.last,
                                  run.checkpointer.work.folder)
            started = time.perf_counter()


@dataclass(frozen=True)
class StepPlan:
    """Everything a step needs to know about its global batch, computed from numpy metadata."""

    micro_batches: list[np.ndarray]  # this rank's share of the global batch, in micro-batches
    predictions: int  # real MLM slots in the global batch
    lengths: np.ndarray  # real lengths of the whole global batch (for FLOPs)

    @property
    def pairs(self) -> int:
        return len(self.lengths)


def plan_step(step: int, examples: Examples, cfg: TrainConfig, seed: int, world: World, micro: int) -> StepPlan:
    indices = global_batch(step, examples.epoch_ranges(), cfg.batch_size, seed)
    lengths = np.asarray(examples.lengths[indices], dtype=np.int64)
    share = rank_share(indices, lengths, world.rank, world.size)
    return StepPlan(micro_batches(share, micro), examples.predictions(indices), lengths)


def train_step(compute: Compute, optimizer: torch.optim.Optimizer, examples: Examples, plan: StepPlan,
               cfg: TrainConfig, world: World, unmask_full: bool | None = None) -> tuple[torch.Tensor, bool]:
    """Forward/backward over this rank's micro-batches, then one optimizer step on the master weights.

    loss = MLM + NSP, as the seed (MLM alone with `train.objective: mlm`), with the MLM loss over real
    predictions only: each micro-batch adds
    `sum(cross-entropy over real predicted tokens) / predictions in the global batch` plus
    `sum(NSP cross-entropy) / batch_size`, times the world size because DDP averages gradients. So
    the result does not depend on how many processes or micro-batches share the work, and padded
    prediction slots never count (the flaw d2l-en#2582 describes in the seed's code).

    Returns this rank's share of the step's [MLM loss, NSP loss], still on the device (summing over
    ranks gives the global means), and whether the step was skipped for a non-finite gradient;
    that check reads the gradient norm back, so it only runs with `train.skip_nonfinite`.
    `unmask_full`: micro-batches without padding attend without a key mask (`Batch.to`; default on CUDA).
    """
    losses = torch.zeros(2, device=world.device)
    for i, indices in enumerate(plan.micro_batches):
        batch = examples.batch(indices, pin=world.device.type == "cuda").to(world.device, unmask_full)
        last = i == len(plan.micro_batches) - 1
        # DDP all-reduces gradients in the last micro-batch's backward only
        sync = contextlib.nullcontext() if last or not world.distributed else compute.module.no_sync()
        with sync:
            mlm, nsp = loss_sums(compute.module(*batch.inputs), batch)
            step_losses = torch.stack([mlm / max(plan.predictions, 1), nsp / plan.pairs])
            (step_losses.sum() * world.size).backward()
        losses += step_losses.detach()
    compute.pull_gradients()  # bf16: the copy's gradients into the fp32 weights
    grad_norm = nn.utils.clip_grad_norm_(compute.model.parameters(), cfg.grad_clip or math.inf)
    skip = cfg.skip_nonfinite and not bool(torch.isfinite(grad_norm))  # reads back: a CPU-GPU sync point
    if not skip:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    compute.push_weights()  # bf16: the updated weights into the copy
    return losses, skip


def loss_sums(out: PreTrainingOutput, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of training and evaluation: summed MLM cross-entropy over real predictions, summed NSP
    cross-entropy of one micro-batch (in fp32 whatever the logits' dtype); NSP is 0 for a model without
    the NSP head (`train.objective: mlm`)."""
    mlm = F.cross_entropy(out.mlm_logits.float(), batch.mlm_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if out.nsp_logits is None:
        return mlm, torch.zeros_like(mlm)
    nsp = F.cross_entropy(out.nsp_logits.float(), batch.nsp_labels, reduction="sum")
    return mlm, nsp


def out_of_memory(run: Run, plan: StepPlan) -> PipelineError:
    """Running out of memory in a step, as advice instead of a traceback."""
    rows = max(len(indices) for indices in plan.micro_batches)
    return PipelineError(f"out of memory in step {run.record.state.step + 1} on {run.world.device} with "
                         f"micro-batches of {rows} rows (train.batch_size = {run.params.train.batch_size}); set "
                         "train.micro_batch_size lower, or to auto, to accumulate gradients over smaller "
                         "micro-batches")


def sync(world: World, pending: list[Pending], signum: int) -> tuple[list[list[float]], bool]:
    """The one all-reduce of a sync point: every pending step's global [MLM, NSP] losses, and whether
    any rank was asked to stop (its signal rides along as one more row)."""
    rows = torch.cat([torch.stack([step.losses for step in pending]),
                      pending[0].losses.new_tensor([[float(signum), 0.0]])])  # [steps + 1, 2]
    if world.distributed:
        torch.distributed.all_reduce(rows)
    *losses, (stop, _) = rows.tolist()
    return losses, stop > 0


def record_steps(run: Run, losses: list[list[float]], pending: list[Pending]) -> None:
    """The synced steps into the history, one row of named columns each (no nsp_loss without the NSP
    head: a series of zeros would read as a perfect NSP); a non-finite loss stops the run."""
    history, step = run.record.history, run.record.state.step
    for i, ((mlm, nsp), pending_step) in enumerate(zip(losses, pending, strict=True)):
        if pending_step.skipped:
            history.skipped_steps += 1
            mlm = nsp = float("nan")
        elif not (np.isfinite(mlm) and np.isfinite(nsp)):
            raise NonFiniteLoss(f"the loss became non-finite (MLM {mlm}, NSP {nsp}) at step "
                                f"{step - len(losses) + 1 + i}; last good checkpoint: "
                                f"{run.checkpointer.last or 'none yet'}")
        nsp_column = {"nsp_loss": nsp} if run.model.next_sentence else {}
        history.losses.append({"mlm_loss": mlm, **nsp_column, "lr": pending_step.lr})


def log_progress(run: Run, tracker: Tracker, bar: Progress, steps: int, pairs_per_sec: float) -> None:
    """The newest step's row and the recent throughput to MLflow and the progress bar."""
    row = run.record.history.losses[-1]
    tracker.log_metrics({**row, "step_pairs_per_sec": pairs_per_sec}, step=run.record.state.step)
    nsp = {"nsp": f"{row['nsp_loss']:.3f}"} if "nsp_loss" in row else {}
    bar.update(steps, mlm=f"{row['mlm_loss']:.3f}", **nsp, pairs_s=f"{pairs_per_sec:.0f}")


@torch.no_grad()
def evaluate(model: nn.Module, examples: Examples, limit: int, world: World) -> dict[str, float]:
    """Held-out MLM and NSP loss (`loss_sums`, as in training) and accuracy of `model` (a Compute's
    module) in eval mode, over the first `limit` examples (0 = all), each rank a share; MLM only for a
    model without the NSP head."""
    was_training = model.training
    model.eval()
    n = len(examples) if limit == 0 else min(limit, len(examples))
    mine = np.arange(world.rank, n)[::world.size]
    mine = mine[np.argsort(examples.lengths[mine], kind="stable")]
    totals = torch.zeros(6, dtype=torch.float64, device=world.device)
    next_sentence = unwrap(model).next_sentence  # also on a rank with no held-out examples of its own
    for indices in micro_batches(mine, EVAL_BATCH):
        batch = examples.batch(indices).to(world.device)
        out = model(*batch.inputs)
        mlm, nsp = loss_sums(out, batch)
        nsp_correct = (out.nsp_logits.argmax(-1) == batch.nsp_labels).sum() if next_sentence else torch.zeros_like(mlm)
        totals += torch.stack([
            mlm, (out.mlm_logits.argmax(-1) == batch.mlm_labels).sum(), (batch.mlm_labels != IGNORE_INDEX).sum(),
            nsp, nsp_correct, torch.tensor(len(batch.nsp_labels)),
        ]).double()
    if world.distributed:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    mlm_loss, mlm_correct, preds, nsp_loss, nsp_correct, pairs = totals.tolist()
    metrics = {"valid_mlm_loss": mlm_loss / max(preds, 1), "valid_mlm_acc": mlm_correct / max(preds, 1)}
    if next_sentence:
        metrics |= {"valid_nsp_loss": nsp_loss / max(pairs, 1), "valid_nsp_acc": nsp_correct / max(pairs, 1)}
    return metrics


def record_evaluation(record: RunRecord, metrics: dict[str, float]) -> bool:
    """The evaluation into the history; whether it is the best so far (lowest held-out MLM loss)."""
    state = record.state
    record.history.evaluations.append({"step": state.step, **metrics})
    if state.best_valid_mlm_loss is not None and metrics["valid_mlm_loss"] >= state.best_valid_mlm_loss:
        return False
    state.best_valid_mlm_loss, state.best_step = metrics["valid_mlm_loss"], state.step
    return True


class Checkpointer:
    """When to save, and the save (torchtitan's `checkpointer.save(step, last_step=...)`): every `every`
    steps, at the last step, and when forced (a held-out evaluation that is the best so far, so the
    best can be exported; a stop). Rank 0 writes into the work folder and mirrors it into the stage's
    output (`bertpipe.training.workdir`); `checkpoint.save` keeps the newest `keep` and the best."""

    def __init__(self, work: WorkFolder, every: int, keep: int) -> None:
        self.work, self.every, self.keep = work, every, keep
        self.last: Path | None = None  # the newest checkpoint, in the stage's output folder

    def due(self, step: int, last_step: bool) -> bool:
        return step % self.every == 0 or last_step

    def save(self, run: Run, *, last_step: bool, force: bool = False) -> None:
        """Every rank calls it at a sync point: every rank's RNG state is gathered, rank 0 writes."""
        if not (force or self.due(run.record.state.step, last_step)):
            return
        rng = checkpoint.capture_rng()
        states = [rng]
        if run.world.distributed:
            states = [None] * run.world.size
            torch.distributed.all_gather_object(states, rng)
        if run.world.is_main:
            written = checkpoint.save(self.work.folder, run.model, run.optimizer, run.record, self.work.spec,
                                      states, self.keep)
            self.work.publish()
            self.last = self.work.out / written.name


class StopFlag:
    """Remembers SIGTERM/SIGINT instead of dying mid-step (torchrun forwards them to every rank)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum:  # asked twice: stop now, without the checkpoint
            raise KeyboardInterrupt
        self.signum = signum
