"""The pretraining loop, top to bottom as nanoGPT's: set the learning rate, step, and at each sync
point read the losses back, log, evaluate, checkpoint and stop.

Every collective (the losses' all-reduce, evaluation, a checkpoint's RNG gather) happens at steps
that depend only on the step and the config, so all ranks reach them in the same order whatever
else happens: a SIGTERM or SIGINT on any rank is only remembered, and rides to the other ranks
with the next losses' all-reduce (every `train.log_every` steps), after which all ranks checkpoint
and stop together.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import numpy as np
import torch

from bertpipe.errors import Interrupted, PipelineError
from bertpipe.model.flops import training_flops
from bertpipe.progress import Progress
from bertpipe.tracking import Tracker
from bertpipe.training.checkpoint import Checkpointer
from bertpipe.training.evaluate import evaluation_due
from bertpipe.training.optim import get_lr, set_lr
from bertpipe.training.run import Run, evaluation, save
from bertpipe.training.step import NonFiniteLoss, StepPlan, plan_step, train_step


def train(run: Run, tracker: Tracker) -> None:
    """Steps until `train.steps`, logging, evaluating and checkpointing on the way."""
    cfg, state = run.params.train, run.progress.state
    checkpointer = Checkpointer(cfg.checkpoint_every, cfg.steps)
    pending: list[tuple[torch.Tensor, float, bool]] = []  # per step since the last sync: losses, lr, skipped
    bar = Progress(cfg.steps, "pretrain", "step", initial=state.step, enabled=run.world.is_main)
    with StopFlag() as stop, bar:
        started = time.perf_counter()
        while state.step < cfg.steps:
            lr = get_lr(state.step, cfg)
            set_lr(run.optimizer, lr)
            plan = plan_step(state.step, run.train_set, cfg, run.params.seed, run.world, cfg.micro_batch_size)
            losses, skipped = guarded_step(run, plan)
            pending.append((losses, lr, skipped))
            state.step += 1
            count_work(run, plan)
            eval_due = evaluation_due(state.step, cfg)
            if not (state.step % cfg.log_every == 0 or eval_due or checkpointer.cadence(state.step)):
                continue
            global_losses, stopping = sync(run, pending, stop.signum)
            elapsed = time.perf_counter() - started
            run.progress.throughput.seconds += elapsed
            record(run, global_losses, pending)
            log_progress(run, tracker, bar, len(pending), elapsed)
            pending = []
            improved = eval_due and evaluation(run, tracker)
            if checkpointer.due(state.step, improved, stopping):
                save(run)
            if stopping:
                raise Interrupted(stop.signum or signal.SIGTERM, state.step, run.last_checkpoint, run.work.folder)
            started = time.perf_counter()


def guarded_step(run: Run, plan: StepPlan) -> tuple[torch.Tensor, bool]:
    """One training step; running out of memory becomes advice instead of a traceback."""
    try:
        return train_step(run.compute, run.optimizer, run.train_set, plan, run.params.train, run.world)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not isinstance(err, torch.OutOfMemoryError) and "allocate" not in str(err):
            raise
        rows = max(len(share) for share in plan.shares)
        raise PipelineError(f"out of memory in step {run.progress.state.step + 1} on {run.world.device} with "
                            f"micro-batches of {rows} rows (train.batch_size = {run.params.train.batch_size}); set "
                            "train.micro_batch_size lower, or to auto, to accumulate gradients over smaller "
                            "micro-batches") from None


def count_work(run: Run, plan: StepPlan) -> None:
    throughput = run.progress.throughput
    throughput.pairs += plan.pairs
    throughput.tokens += plan.tokens
    throughput.flops += training_flops(run.bert_config, plan.lengths, plan.predictions)


def sync(run: Run, pending: list[tuple[torch.Tensor, float, bool]], signum: int) -> tuple[list[list[float]], bool]:
    """The one all-reduce of a sync point: every pending step's global [MLM, NSP] losses, and whether
    any rank was asked to stop (its signal rides along as one more row)."""
    rows = torch.cat([torch.stack([losses for losses, _, _ in pending]),
                      pending[0][0].new_tensor([[float(signum), 0.0]])])  # [steps + 1, 2]
    if run.world.distributed:
        torch.distributed.all_reduce(rows)
    *losses, (stop, _) = rows.tolist()
    return losses, stop > 0


def record(run: Run, losses: list[list[float]], pending: list[tuple[torch.Tensor, float, bool]]) -> None:
    """The synced steps into the history; a non-finite loss stops the run, naming the step."""
    history, step = run.progress.history, run.progress.state.step
    for i, ((mlm, nsp), (_, lr, skipped)) in enumerate(zip(losses, pending, strict=True)):
        if skipped:
            history.skipped_steps += 1
            mlm = nsp = float("nan")
        elif not (np.isfinite(mlm) and np.isfinite(nsp)):
            raise NonFiniteLoss(f"the loss became non-finite (MLM {mlm}, NSP {nsp}) at step "
                                f"{step - len(losses) + 1 + i}; last good checkpoint: "
                                f"{run.last_checkpoint or 'none yet'}")
        history.losses.append([mlm, nsp, lr])


def log_progress(run: Run, tracker: Tracker, bar: Progress, steps: int, seconds: float) -> None:
    """The newest step's losses and the recent throughput to MLflow and the progress bar."""
    mlm, nsp, lr = run.progress.history.losses[-1]
    pairs_per_sec = run.params.train.batch_size * steps / max(seconds, 1e-9)
    tracker.log_metrics({"mlm_loss": mlm, "nsp_loss": nsp, "lr": lr, "step_pairs_per_sec": pairs_per_sec},
                        step=run.progress.state.step)
    bar.update(steps, mlm=f"{mlm:.3f}", nsp=f"{nsp:.3f}", pairs_s=f"{pairs_per_sec:.0f}")


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
