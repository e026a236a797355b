"""The `pretrain` stage's library: build the run, resume it, train it (`bertpipe.training.loop`), report it.

Rank 0 alone writes checkpoints, plots and the MLflow run; every rank trains. SIGTERM/SIGINT stop a
run with a checkpoint, so `dvc repro` picks it up again. A run continues from the newest checkpoint
of its own trajectory (`bertpipe.training.workdir`: the work folder, or the stage's output folder as
DVC restored it); one made under other settings (model shape, data, seed, optimizer, ...) is never
loaded: the run names the first settings that differ and starts fresh, and the other checkpoints go
only once this run has one of its own (`WorkFolder.publish`), so a run that fails early destroys nothing.
Continued pretraining (`model.init`) starts from the checkpoint models/init holds (`bertpipe.init.weights`),
whose identity joins the trajectory's settings; a run from scratch is as it always was.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bertpipe.atomic import write_json
from bertpipe.config import Params, flatten
from bertpipe.data import examples_folder
from bertpipe.errors import DataError, Interrupted
from bertpipe.init.folder import Start
from bertpipe.init.weights import load_start, start_ids
from bertpipe.model.bert import BertConfig, BertForPreTraining
from bertpipe.model.memory import GiB, MemoryPlan
from bertpipe.repo import repo_root
from bertpipe.resolve import resolve, training_here
from bertpipe.tracking import MlflowTracker, NullTracker, Tracker, dvc_tags, git_commit
from bertpipe.training import checkpoint
from bertpipe.training.batches import Examples
from bertpipe.training.checkpoint import MLFLOW_RUN_FILE
from bertpipe.training.distributed import (
    World,
    close_world,
    describe_devices,
    die_with_parent,
    init_world,
    launch,
    pass_on_stop,
    under_torchrun,
)
from bertpipe.training.loop import Checkpointer, Run, evaluate, train
from bertpipe.training.optim import build_optimizer
from bertpipe.training.plots import loss_table, write_csv, write_loss_csv, write_loss_png
from bertpipe.training.precision import Compute
from bertpipe.training.workdir import WorkFolder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outputs:
    checkpoint_dir: Path
    loss_csv: Path
    loss_png: Path
    valid_csv: Path


def run_stage(params: Params, examples_dir: Path, outputs: Outputs, argv: list[str],
              start: Start | None = None) -> dict[str, Any] | None:
    """The stage: settle every "auto" (`bertpipe.resolve`), start the ranks through torchrun's launcher
    when `train.nproc` > 1 (each rank runs `argv` again, under torchrun, and dies with this process), else
    train in this process. Returns metrics/pretrain.json's content on rank 0, None elsewhere."""
    if under_torchrun():
        die_with_parent()
    with training_here():  # before `train.threads` is settled: trainings that start together count each other
        meta = examples_folder.read_meta(examples_dir)  # read once per run, passed down
        params, memory = resolve(params, meta)
        log.info("resolved: %s", " ".join(f"train.{key}={getattr(params.train, key)}" for key in RESOLVED))
        if params.train.nproc > 1 and not under_torchrun():
            launch(params.train.nproc, argv)
            return None
        torch.set_num_threads(params.train.threads)
        world = init_world(torch.device(params.train.device))
        try:
            return pretrain(params, memory, examples_dir, meta, outputs, world, start)
        except Interrupted as stop:
            pass_on_stop(stop, world)  # one line for the run, however many ranks stopped
            raise
        finally:
            close_world(world)


RESOLVED = ("device", "nproc", "precision", "threads", "micro_batch_size")  # the keys that may say "auto"


def pretrain(params: Params, memory: MemoryPlan, examples_dir: Path, meta: dict[str, Any], outputs: Outputs,
             world: World, start: Start | None = None) -> dict[str, Any] | None:
    """Train (or resume), then on rank 0 write the plots and complete the MLflow run; returns
    metrics/pretrain.json's content there (None on the other ranks). `params` is resolved."""
    bert_config, work = trajectory(params, meta, outputs.checkpoint_dir, start)
    with work.lock() if world.is_main else contextlib.nullcontext():  # a run of the same settings: wait for it
        run = setup(params, memory, examples_dir, meta, bert_config, work, world, start)
        resume(run)
        tracker = _tracker(run, start) if world.is_main else NullTracker()
        run.record.mlflow_run_id = tracker.run_id
        if world.is_main:  # the run the export completes: this one, even when no checkpoint follows
            write_json(outputs.checkpoint_dir / MLFLOW_RUN_FILE, {"mlflow_run_id": tracker.run_id})
        try:
            train(run, tracker)
            metrics = final_metrics(run)
        except BaseException as err:
            tracker.finish("KILLED" if isinstance(err, Interrupted | KeyboardInterrupt) else "FAILED")
            raise
        if world.is_main:
            _write_plots(run, outputs)
            _log_outputs(run, metrics, outputs, tracker)
            nsp = f", NSP loss {metrics['train_nsp_loss']:.3f}" if "train_nsp_loss" in metrics else ""
            log.info("MLM loss %.3f%s", metrics["train_mlm_loss"], nsp)
            log.info("%.1f sentence pairs/sec on %s", metrics["pairs_per_sec"], describe_devices(world))  # d2l's
            work.discard()  # complete: the checkpoints are in models/checkpoint, which DVC keeps
        tracker.finish()
    if not world.is_main:
        return None
    links = {"mlflow_run_id": tracker.run_id, "mlflow_experiment_id": tracker.experiment_id}
    return metrics | {k: v for k, v in links.items() if v is not None}


def trajectory(params: Params, meta: dict[str, Any], checkpoint_dir: Path,
               start: Start | None = None) -> tuple[BertConfig, WorkFolder]:
    """The run's model config (built once, passed down) and the work folder of its trajectory: what the
    result depends on (`bertpipe.training.checkpoint.trajectory_spec`)."""
    bert_config = BertConfig.from_params(params.model, meta["vocab_size"])
    spec = checkpoint.trajectory_spec(bert_config, params.train, params.seed, meta,
                                      start.identity() if start is not None else None)
    return bert_config, WorkFolder(checkpoint_dir, spec)


def setup(params: Params, memory: MemoryPlan, examples_dir: Path, meta: dict[str, Any], bert_config: BertConfig,
          work: WorkFolder, world: World, start: Start | None = None) -> Run:
    """Load the examples, build model, optimizer, compute copy and checkpointer (`resume` restores them); the
    model starts from `start`'s weights when continuing a checkpoint (`model.init`)."""
    copies = meta.get("copies", {}).get("train", []) if params.train.epoch_per_copy else []
    train_set, valid_set = Examples.load(examples_dir / "train", copies), Examples.load(examples_dir / "valid")
    examples_folder.check_meta(meta, train_set.arrays, examples_dir, params.model.max_position_embeddings,
                               params.train.objective)
    log.info("memory: %s", memory.describe())
    torch.manual_seed(params.seed)  # the same initial weights on every rank
    model = BertForPreTraining(bert_config, next_sentence=params.train.objective == "mlm+nsp")
    model.bert.encoder.gradient_checkpointing = params.train.activation_checkpointing
    _init_mlm_bias(model, _label_counts(train_set, bert_config.vocab_size, examples_dir))
    if start is not None:  # continued pretraining: the checkpoint's weights, its MLM bias included
        load_start(model, start, start_ids(start, meta["vocab_sha256"]))
    model.to(world.device)
    optimizer = build_optimizer(model, params.train)
    compute = Compute.build(model, params.train.precision, world)
    checkpointer = Checkpointer(work, params.train.checkpoint_every, params.train.keep_checkpoints)
    return Run(params, world, model, compute, optimizer, train_set, valid_set, bert_config, memory, checkpointer)


def resume(run: Run) -> None:
    """Restore weights, optimizer, record and RNG from the newest checkpoint of the run's trajectory."""
    work = run.checkpointer.work
    if run.world.is_main:
        for folder in (work.folder, work.out):
            checkpoint.remove_partial_writes(folder)
        work.adopt()
    if run.world.distributed:
        torch.distributed.barrier()  # rank 0 has adopted what there is before any rank looks
    found = checkpoint.list_checkpoints(work.folder)
    if not found:
        _report_other_settings(run)
        return
    latest = found[-1]
    run.record, rng_states = checkpoint.restore(latest, run.model, run.optimizer)
    run.compute.push_weights()
    run.checkpointer.last = work.out / latest.name
    if run.world.is_main:
        work.publish()
    if len(rng_states) == run.world.size:
        checkpoint.apply_rng(rng_states[run.world.rank])
    else:
        log.warning("%s holds RNG states of %d processes, this run has %d: dropout streams start afresh",
                    latest, len(rng_states), run.world.size)
    log.info("resuming from %s (step %d of %d), kept in %s", run.checkpointer.last, run.record.state.step,
             run.params.train.steps, work.folder)


def _report_other_settings(run: Run) -> None:
    """The output folder's newest checkpoint, when it is of another trajectory: what differs."""
    found = checkpoint.list_checkpoints(run.checkpointer.work.out)
    if found and run.world.is_main:
        saved = checkpoint.read_state(found[-1])
        log.warning("%s was made with other settings or data (%s); starting fresh", found[-1],
                    spec_difference(saved.get("spec", {}), run.checkpointer.work.spec))


def spec_difference(old: dict[str, Any], new: dict[str, Any], shown: int = 6) -> str:
    """The first `shown` settings that differ, as `key: old -> new`, and how many more there are."""
    changes = _changes(old, new)
    more = f"; and {len(changes) - shown} more" if len(changes) > shown else ""
    return "; ".join(changes[:shown]) + more


def _changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def final_metrics(run: Run) -> dict[str, Any]:
    """metrics/pretrain.json: the seed's mean training losses, held-out metrics, best, throughput."""
    history, state, cfg = run.record.history, run.record.state, run.params.train
    losses = pd.DataFrame(history.losses)
    last = history.evaluations[-1] if history.evaluations else {}
    held = ({k: v for k, v in last.items() if k != "step"} if last.get("step") == state.step
            else evaluate(run.compute.module, run.valid_set, cfg.eval_examples, run.world))
    nsp = {"train_nsp_loss": _mean(losses, "nsp_loss")} if run.model.next_sentence else {}
    return {"train_mlm_loss": _mean(losses, "mlm_loss"), **nsp, **held,
            "best_valid_mlm_loss": state.best_valid_mlm_loss, "best_step": state.best_step,
            **run.record.throughput.summary(run.world.device, cfg.precision, run.world.size), "steps": state.step,
            "skipped_steps": history.skipped_steps, "micro_batch_rows": run.memory.rows,
            "memory_estimate_gib": run.memory.total / GiB}


def _mean(table: pd.DataFrame, column: str) -> float:
    """The mean over the steps that were not skipped (NaN when there are none)."""
    return float(np.nanmean(table[column])) if column in table else float("nan")


def _label_counts(examples: Examples, vocab_size: int, folder: Path) -> np.ndarray:
    """How often each word is an MLM label; ids beyond the vocabulary mean the examples are another run's."""
    labels = examples.arrays["mlm_labels"][examples.arrays["mlm_weights"].astype(bool)]
    counts = np.bincount(labels, minlength=vocab_size)
    if len(counts) > vocab_size:
        raise DataError(f"{folder} holds word ids up to {len(counts) - 1} but its meta.json says vocab_size "
                        f"{vocab_size}: arrays of another run; rerun the examples stage")
    return counts


def _init_mlm_bias(model: BertForPreTraining, label_counts: np.ndarray) -> None:
    """Start the MLM decoder's bias at the log-frequency of the training labels (add-one smoothed).

    The untrained model then predicts the unigram distribution instead of a uniform one, which a bias
    moving ~lr per Adam step would need hundreds of steps to learn; the steps go to context instead.
    """
    counts = label_counts + 1.0
    with torch.no_grad():
        model.cls.predictions.bias.copy_(torch.from_numpy(np.log(counts / counts.sum())))


def _tracker(run: Run, start: Start | None = None) -> Tracker:
    """The MLflow run mirroring this one (rank 0, `mlflow.enabled`), linked to its DVC experiment."""
    cfg = run.params.mlflow
    if not cfg.enabled:
        return NullTracker()
    commit = git_commit(repo_root())
    tags = {"mlflow.source.git.commit": commit, **dvc_tags(commit), "devices": describe_devices(run.world),
            "torch_version": torch.__version__, "precision": run.params.train.precision,
            **(start.tags() if start is not None else {})}
    run_name = cfg.run_name or os.environ.get("DVC_EXP_NAME") or None
    # downstream.* are the fine-tuning's, which may rerun alone on this checkpoint with other values (MLflow
    # params cannot change): its child runs carry them (bertpipe.tracking.downstream).
    params = {key: value for key, value in flatten(run.params).items() if not key.startswith("downstream.")}
    return MlflowTracker(cfg.experiment, run_name, params, tags, cfg.system_metrics,
                         resume_run_id=run.record.mlflow_run_id)


def _write_plots(run: Run, outputs: Outputs) -> None:
    """plots/loss.{csv,png} (the seed's curves) and plots/valid.csv (one row per evaluation)."""
    table = loss_table(run.record.history.losses)
    write_loss_csv(table, outputs.loss_csv)
    write_loss_png(table, outputs.loss_png)
    evaluations = pd.DataFrame(run.record.history.evaluations)
    write_csv(evaluations.astype({"step": int}) if len(evaluations) else evaluations, outputs.valid_csv)


def _log_outputs(run: Run, metrics: dict[str, Any], outputs: Outputs, tracker: Tracker) -> None:
    """The run-level values (under keys no per-step series uses, so the UI shows the file's values;
    valid_* went in as series at each evaluation) and the artifacts."""
    tracker.log_metrics({k: v for k, v in metrics.items() if not k.startswith("valid_")})
    tracker.log_artifact(outputs.loss_png)
    tracker.log_artifact(Path("params.yaml"))
    tracker.log_dict(asdict(run.bert_config), "config.json")
