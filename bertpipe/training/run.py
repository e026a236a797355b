"""A training run's objects, and what the loop does with them besides stepping: evaluate, save.

Rank 0 alone writes checkpoints; every rank evaluates its share of the held-out split and sends
its RNG state to rank 0 for the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bertpipe.config import Params
from bertpipe.model.bert import BertConfig, BertForPreTraining
from bertpipe.model.memory import MemoryPlan
from bertpipe.tracking import Tracker
from bertpipe.training import checkpoint
from bertpipe.training.batches import Examples
from bertpipe.training.checkpoint import EVALUATION_COLUMNS, Progress
from bertpipe.training.distributed import World
from bertpipe.training.evaluate import evaluate
from bertpipe.training.precision import Compute
from bertpipe.training.workdir import WorkFolder


@dataclass
class Run:
    """Built once by `bertpipe.training.pretrain.setup`; `params` has no "auto" left (`bertpipe.resolve`)."""

    params: Params
    world: World
    model: BertForPreTraining  # the fp32 weights the optimizer updates and checkpoints hold
    compute: Compute  # what steps run on: the model or its bf16 copy, DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    train_set: Examples
    valid_set: Examples
    bert_config: BertConfig
    checkpoint_dir: Path
    spec: dict[str, Any]  # what the result depends on: checkpoints of another spec are not resumed
    memory: MemoryPlan
    work: WorkFolder  # where the checkpoints are written; `checkpoint_dir` (the stage's output) mirrors it
    progress: Progress = field(default_factory=Progress)
    last_checkpoint: Path | None = None  # in `checkpoint_dir`


def evaluation(run: Run, tracker: Tracker) -> bool:
    """Evaluate on the held-out split, keep it in the history and MLflow; whether it is the best so far."""
    state = run.progress.state
    metrics = held_out(run)
    tracker.log_metrics(metrics, step=state.step)
    run.progress.history.evaluations.append([state.step, *(metrics[k] for k in EVALUATION_COLUMNS[1:])])
    if state.best_valid_mlm_loss is not None and metrics["valid_mlm_loss"] >= state.best_valid_mlm_loss:
        return False
    state.best_valid_mlm_loss, state.best_step = metrics["valid_mlm_loss"], state.step
    return True


def held_out(run: Run) -> dict[str, float]:
    """valid_mlm_loss, valid_mlm_acc, valid_nsp_loss, valid_nsp_acc of the model as it is now."""
    return evaluate(run.compute.module, run.valid_set, run.params.train.eval_examples, run.world)


def save(run: Run) -> None:
    """Gather every rank's RNG state; rank 0 writes the checkpoint."""
    rng = checkpoint.capture_rng()
    states = [rng]
    if run.world.distributed:
        states = [None] * run.world.size
        torch.distributed.all_gather_object(states, rng)
    if run.world.is_main:
        written = checkpoint.save(run.work.folder, run.model, run.optimizer, run.progress, run.spec, states,
                                  run.params.train.keep_checkpoints)
        run.work.publish()
        run.last_checkpoint = run.checkpoint_dir / written.name
