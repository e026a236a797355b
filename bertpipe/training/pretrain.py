"""The `pretrain` stage's library: build the run, resume it, train it, report it.

Rank 0 alone writes checkpoints, plots and the MLflow run; every rank trains. A run resumes from the
newest checkpoint whose fingerprint matches the current settings and data, and SIGTERM/SIGINT stop
it with a checkpoint (`bertpipe.training.loop`), so `dvc repro` picks it up again.
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
from bertpipe.data.arrays import check_meta
from bertpipe.errors import DataError, Interrupted
from bertpipe.model.bert import BertConfig, BertForPreTraining
from bertpipe.model.flops import matmul_peak
from bertpipe.model.memory import GiB, MemoryPlan
from bertpipe.repo import repo_root
from bertpipe.resolve import resolve
from bertpipe.tracking import MlflowTracker, Tracker, dvc_tags, git_commit
from bertpipe.training import checkpoint
from bertpipe.training.batches import Examples, examples_meta
from bertpipe.training.checkpoint import EVALUATION_COLUMNS, MLFLOW_RUN_FILE
from bertpipe.training.distributed import World, close_world, describe_devices, init_world, launch, under_torchrun
from bertpipe.training.loop import train
from bertpipe.training.optim import build_optimizer
from bertpipe.training.plots import loss_table, write_csv, write_loss_csv, write_loss_png
from bertpipe.training.precision import Compute
from bertpipe.training.resume import resume
from bertpipe.training.run import Run, held_out
from bertpipe.training.workdir import WorkFolder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outputs:
    checkpoint_dir: Path
    loss_csv: Path
    loss_png: Path
    valid_csv: Path


def run_stage(params: Params, examples_dir: Path, outputs: Outputs, argv: list[str]) -> dict[str, Any] | None:
    """The stage: settle every "auto" (`bertpipe.resolve`), start the ranks through torchrun's launcher
    when `train.nproc` > 1 (each rank runs `argv` again, under torchrun), else train in this process.
    Returns metrics/pretrain.json's content on rank 0, None elsewhere."""
    params, memory = resolve(params, examples_meta(examples_dir))
    log.info("resolved: %s", " ".join(f"train.{key}={getattr(params.train, key)}" for key in RESOLVED))
    if params.train.nproc > 1 and not under_torchrun():
        launch(params.train.nproc, argv)
        return None
    world = init_world(torch.device(params.train.device))
    try:
        return pretrain(params, memory, examples_dir, outputs, world)
    finally:
        close_world(world)


RESOLVED = ("device", "nproc", "precision", "micro_batch_size")  # the keys that may say "auto"


def pretrain(params: Params, memory: MemoryPlan, examples_dir: Path, outputs: Outputs,
             world: World) -> dict[str, Any] | None:
    """Train (or resume), then on rank 0 write the plots and complete the MLflow run; returns
    metrics/pretrain.json's content there (None on the other ranks). `params` is resolved."""
    work = WorkFolder(outputs.checkpoint_dir, trajectory(params, examples_meta(examples_dir)))
    with work.lock() if world.is_main else contextlib.nullcontext():  # a run of the same settings: wait for it
        run = setup(params, memory, examples_dir, outputs.checkpoint_dir, world)
        tracker = _tracker(run) if world.is_main else Tracker()
        run.progress.mlflow_run_id = tracker.run_id
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
            log.info("MLM loss %.3f, NSP loss %.3f", metrics["train_mlm_loss"], metrics["train_nsp_loss"])
            log.info("%.1f sentence pairs/sec on %s", metrics["pairs_per_sec"], describe_devices(world))  # d2l's
            work.discard()  # complete: the checkpoints are in models/checkpoint, which DVC keeps
        tracker.finish()
    if not world.is_main:
        return None
    links = {"mlflow_run_id": tracker.run_id, "mlflow_experiment_id": tracker.experiment_id}
    return metrics | {k: v for k, v in links.items() if v is not None}


def setup(params: Params, memory: MemoryPlan, examples_dir: Path, checkpoint_dir: Path, world: World) -> Run:
    """Load the examples, build model, optimizer and compute copy, and resume from a matching checkpoint."""
    meta = examples_meta(examples_dir)
    copies = meta.get("copies", {}).get("train", []) if params.train.epoch_per_copy else []
    train_set, valid_set = Examples.load(examples_dir / "train", copies), Examples.load(examples_dir / "valid")
    check_meta(meta, train_set.arrays, examples_dir, params.model.max_position_embeddings)
    bert_config = BertConfig.from_params(params.model, meta["vocab_size"])
    log.info("memory: %s", memory.describe())
    torch.manual_seed(params.seed)  # the same initial weights on every rank
    model = BertForPreTraining(bert_config)
    model.bert.encoder.gradient_checkpointing = params.train.activation_checkpointing
    _init_mlm_bias(model, _label_counts(train_set, bert_config.vocab_size, examples_dir))
    model.to(world.device)
    optimizer = build_optimizer(model, params.train)
    spec = trajectory(params, meta)
    compute = Compute.build(model, params.train.precision, world)
    run = Run(params, world, model, compute, optimizer, train_set, valid_set, bert_config, checkpoint_dir, spec,
              memory, WorkFolder(checkpoint_dir, spec))
    resume(run)
    return run


def trajectory(params: Params, meta: dict[str, Any]) -> dict[str, Any]:
    """What the run's result depends on (`bertpipe.training.checkpoint.trajectory_spec`)."""
    bert_config = BertConfig.from_params(params.model, meta["vocab_size"])
    return checkpoint.trajectory_spec(bert_config, params.train, params.seed, meta)


def final_metrics(run: Run) -> dict[str, Any]:
    """metrics/pretrain.json: the seed's mean training losses, held-out metrics, best, throughput."""
    progress = run.progress
    losses = np.array(progress.history.losses or [[np.nan] * 3], dtype=np.float64)
    throughput, state = progress.throughput, progress.state
    seconds = max(throughput.seconds, 1e-9)
    peak = matmul_peak(run.world.device, torch.bfloat16 if run.params.train.precision == "bf16" else torch.float32)
    evaluations = progress.history.evaluations
    last = dict(zip(EVALUATION_COLUMNS, evaluations[-1], strict=True)) if evaluations else {}
    held = {k: v for k, v in last.items() if k != "step"} if last.get("step") == state.step else held_out(run)
    return {"train_mlm_loss": float(np.nanmean(losses[:, 0])), "train_nsp_loss": float(np.nanmean(losses[:, 1])),
            **held, "best_valid_mlm_loss": state.best_valid_mlm_loss, "best_step": state.best_step,
            "pairs_per_sec": throughput.pairs / seconds, "tokens_per_sec": throughput.tokens / seconds,
            "mfu": throughput.flops / seconds / (peak * run.world.size), "peak_flops": peak, "steps": state.step,
            "skipped_steps": progress.history.skipped_steps, "train_seconds": throughput.seconds,
            "micro_batch_rows": run.memory.rows, "memory_estimate_gib": run.memory.total / GiB}


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


def _tracker(run: Run) -> Tracker:
    """The MLflow run mirroring this one (rank 0, `mlflow.enabled`), linked to its DVC experiment."""
    cfg = run.params.mlflow
    if not cfg.enabled:
        return Tracker()
    commit = git_commit(repo_root())
    tags = {"mlflow.source.git.commit": commit, **dvc_tags(commit), "devices": describe_devices(run.world),
            "torch_version": torch.__version__, "precision": run.params.train.precision}
    run_name = cfg.run_name or os.environ.get("DVC_EXP_NAME") or None
    # downstream.* are the fine-tuning's, which may rerun alone on this checkpoint with other values (MLflow
    # params cannot change): its child runs carry them (bertpipe.tracking.downstream).
    params = {key: value for key, value in flatten(run.params).items() if not key.startswith("downstream.")}
    return MlflowTracker(cfg.experiment, run_name, params, tags, cfg.system_metrics,
                         resume_run_id=run.progress.mlflow_run_id)


def _write_plots(run: Run, outputs: Outputs) -> None:
    """plots/loss.{csv,png} (the seed's curves) and plots/valid.csv (one row per evaluation)."""
    table = loss_table(run.progress.history.losses)
    write_loss_csv(table, outputs.loss_csv)
    write_loss_png(table, outputs.loss_png)
    evaluations = pd.DataFrame(run.progress.history.evaluations, columns=list(EVALUATION_COLUMNS))
    write_csv(evaluations.astype({"step": int}), outputs.valid_csv)


def _log_outputs(run: Run, metrics: dict[str, Any], outputs: Outputs, tracker: Tracker) -> None:
    """The run-level values (under keys no per-step series uses, so the UI shows the file's values;
    valid_* went in as series at each evaluation) and the artifacts."""
    tracker.log_metrics({k: v for k, v in metrics.items() if not k.startswith("valid_")})
    tracker.log_artifact(outputs.loss_png)
    tracker.log_artifact(Path("params.yaml"))
    tracker.log_dict(asdict(run.bert_config), "config.json")
