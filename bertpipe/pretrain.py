"""The `pretrain` stage's library: set up, resume, run the loop, checkpoint, report.

Rank 0 alone writes checkpoints, metrics, plots and the MLflow run; every rank trains. A run
resumes from the newest checkpoint whose fingerprint matches the current settings and data, and
SIGTERM/SIGINT stop it after the current step with a checkpoint, so `dvc repro` picks it up again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from bertpipe import checkpoint, memory
from bertpipe.atomic import write_json
from bertpipe.batches import Examples, examples_meta
from bertpipe.checkpoint import EVALUATION_COLUMNS, RunState
from bertpipe.config import Params, TrainConfig
from bertpipe.distributed import World, describe_devices
from bertpipe.errors import ConfigError, DataError, PipelineError
from bertpipe.flops import matmul_peak, training_flops
from bertpipe.memory import GiB, MemoryPlan
from bertpipe.model import BertConfig, BertForPreTraining
from bertpipe.plots import loss_table, write_csv, write_loss_csv, write_loss_png
from bertpipe.tracking import Tracker
from bertpipe.train import (
    Compute,
    NonFiniteLoss,
    StepPlan,
    build_optimizer,
    evaluate,
    get_lr,
    plan_step,
    resolve_precision,
    train_step,
    trajectory_spec,
)

log = logging.getLogger(__name__)


class Interrupted(PipelineError):
    """SIGTERM or SIGINT arrived; a checkpoint was written and the run can be resumed."""

    def __init__(self, signum: int, step: int, path: Path | None) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {path} "
                         "written, run `dvc repro` to resume")


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


@dataclass
class Run:
    """A training run's objects, built once by `setup`."""

    params: Params
    world: World
    model: BertForPreTraining  # the fp32 weights the optimizer updates and checkpoints hold
    optimizer: torch.optim.Optimizer
    train_set: Examples
    valid_set: Examples
    bert_config: BertConfig
    checkpoint_dir: Path
    spec: dict[str, Any]
    memory: MemoryPlan  # its `rows` is the micro-batch size
    compute: Compute | None = None  # what steps run on (set once resumed): the model or its bf16 copy, DDP-wrapped
    state: RunState = field(default_factory=RunState)
    last_checkpoint: Path | None = None
    stale_checkpoints: list[Path] = field(default_factory=list)  # of other settings, deleted at the first save


def setup(params: Params, examples_dir: Path, checkpoint_dir: Path, world: World) -> Run:
    """Load the examples, build model and optimizer, and resume from a matching checkpoint."""
    precision = resolve_precision(params.train.precision, world.device)
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, precision=precision))
    meta = examples_meta(examples_dir)
    copies = meta.get("copies", {}).get("train", []) if params.train.epoch_per_copy else []
    train_set, valid_set = Examples.load(examples_dir / "train", copies), Examples.load(examples_dir / "valid")
    _check_examples(params, meta, train_set, examples_dir, world)
    bert_config = BertConfig.from_params(params.model, meta["vocab_size"])
    memory_plan = memory.check(bert_config, params.train, _micro_batch(params, world), meta["max_len"],
                               meta["max_predictions"], world.device)
    log.info("memory: %s", memory_plan.describe())
    torch.manual_seed(params.seed)  # the same initial weights on every rank
    model = BertForPreTraining(bert_config)
    model.bert.encoder.gradient_checkpointing = params.train.activation_checkpointing
    _init_mlm_bias(model, _label_counts(train_set, bert_config.vocab_size, examples_dir))
    model.to(world.device)
    optimizer = build_optimizer(model, params.train)
    spec = trajectory_spec(bert_config, params.train, params.seed, meta)
    run = Run(params, world, model, optimizer, train_set, valid_set, bert_config, checkpoint_dir, spec, memory_plan)
    _resume(run)
    run.compute = Compute.build(model, params.train.precision, world)
    return run


def train(run: Run, tracker: Tracker) -> None:
    """Steps until `train.steps`, logging, evaluating and checkpointing on the way."""
    cfg, state, world = run.params.train, run.state, run.world
    bar = tqdm(total=cfg.steps, initial=state.step, desc="pretrain", unit="step", disable=not world.is_main)
    pending: list[torch.Tensor] = []  # per step: this rank's [mlm, nsp] shares, still on the device
    pending_meta: list[tuple[float, bool]] = []  # per step: lr, skipped
    started = time.perf_counter()
    with StopFlag() as stop, bar:
        while state.step < cfg.steps:
            lr = get_lr(state.step, cfg)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            plan = plan_step(state.step, run.train_set, cfg, run.params.seed, world, run.memory.rows)
            losses, skipped = _step(run, plan)
            pending.append(losses)
            pending_meta.append((lr, skipped))
            state.step += 1
            state.pairs += plan.pairs
            state.tokens += plan.tokens
            state.flops += training_flops(run.bert_config, plan.lengths, plan.predictions)
            eval_due = bool(cfg.eval_every and state.step % cfg.eval_every == 0) or state.step == cfg.steps
            save_due = state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps
            if pending and (state.step % cfg.log_every == 0 or eval_due or save_due or stop.signum):
                stopping = _record(run, pending, pending_meta, stop.signum, tracker, bar,
                                   time.perf_counter() - started)
                pending, pending_meta = [], []
                if eval_due and _evaluation(run, tracker):
                    save_due = True  # the best model so far must be a checkpoint, to be exported
                if save_due or stopping:
                    _save(run)
                if stopping:
                    raise Interrupted(stop.signum or signal.SIGTERM, state.step, run.last_checkpoint)
                started = time.perf_counter()


def _step(run: Run, plan: StepPlan) -> tuple[torch.Tensor, bool]:
    """One training step; running out of memory becomes advice instead of a traceback."""
    try:
        return train_step(run.compute, run.optimizer, run.train_set, plan, run.params.train, run.world)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not isinstance(err, torch.OutOfMemoryError) and "allocate" not in str(err):
            raise
        rows = max(len(share) for share in plan.shares)
        raise PipelineError(f"out of memory in step {run.state.step + 1} on {run.world.device} with micro-batches "
                            f"of {rows} rows (train.batch_size = {run.params.train.batch_size}); set "
                            "train.micro_batch_size lower, or to auto, to accumulate gradients over smaller "
                            "micro-batches") from None


def final_metrics(run: Run) -> dict[str, Any]:
    """metrics/pretrain.json: the seed's mean training losses, held-out metrics and throughput."""
    history = np.array(run.state.history or [[np.nan] * 3], dtype=np.float64)
    state, seconds = run.state, max(run.state.seconds, 1e-9)
    peak = matmul_peak(run.world.device, torch.bfloat16 if run.params.train.precision == "bf16" else torch.float32)
    last = dict(zip(EVALUATION_COLUMNS, state.evaluations[-1], strict=True)) if state.evaluations else {}
    held_out = {k: v for k, v in last.items() if k != "step"} if last.get("step") == state.step else _evaluate(run)
    return {"train_mlm_loss": float(np.nanmean(history[:, 0])), "train_nsp_loss": float(np.nanmean(history[:, 1])),
            **held_out, "best_valid_mlm_loss": state.best_valid_mlm_loss, "best_step": state.best_step,
            "pairs_per_sec": state.pairs / seconds, "tokens_per_sec": state.tokens / seconds,
            "mfu": state.flops / seconds / (peak * run.world.size), "peak_flops": peak, "steps": state.step,
            "skipped_steps": state.skipped_steps, "train_seconds": state.seconds,
            "micro_batch_rows": run.memory.rows, "memory_estimate_gib": run.memory.total / GiB}


def _record(run: Run, pending: list[torch.Tensor], meta: list[tuple[float, bool]], signum: int,
            tracker: Tracker, bar: tqdm, elapsed: float) -> bool:
    """Sync the steps since the last record: global losses, history, MLflow, progress bar.

    Returns whether any rank was asked to stop: the flag rides along with the losses' all-reduce.
    """
    state = run.state
    rows = torch.cat([torch.stack(pending), pending[0].new_tensor([[float(signum), 0.0]])])  # [steps + 1, 2]
    if run.world.distributed:
        torch.distributed.all_reduce(rows)
    *losses, (stop, _) = rows.tolist()
    first = state.step - len(losses) + 1
    for i, ((mlm, nsp), (lr, skipped)) in enumerate(zip(losses, meta, strict=True)):
        if skipped:
            state.skipped_steps += 1
            mlm = nsp = float("nan")
        elif not (np.isfinite(mlm) and np.isfinite(nsp)):
            raise NonFiniteLoss(f"the loss became non-finite (MLM {mlm}, NSP {nsp}) at step {first + i}; "
                                f"last good checkpoint: {run.last_checkpoint or 'none yet'}")
        state.history.append([mlm, nsp, lr])
    state.seconds += elapsed
    pairs_per_sec = run.params.train.batch_size * len(losses) / max(elapsed, 1e-9)
    mlm, nsp, lr = state.history[-1]
    tracker.log_metrics({"mlm_loss": mlm, "nsp_loss": nsp, "lr": lr, "step_pairs_per_sec": pairs_per_sec},
                        step=state.step)
    bar.set_postfix(mlm=f"{mlm:.3f}", nsp=f"{nsp:.3f}", pairs_s=f"{pairs_per_sec:.0f}", refresh=False)
    bar.update(len(losses))
    return stop > 0


def _evaluation(run: Run, tracker: Tracker) -> bool:
    """Evaluate on the held-out split, keep it in the run's state and MLflow; whether it is the best so far."""
    state = run.state
    metrics = _evaluate(run)
    tracker.log_metrics(metrics, step=state.step)
    state.evaluations.append([state.step, *(metrics[k] for k in EVALUATION_COLUMNS[1:])])
    if state.best_valid_mlm_loss is not None and metrics["valid_mlm_loss"] >= state.best_valid_mlm_loss:
        return False
    state.best_valid_mlm_loss, state.best_step = metrics["valid_mlm_loss"], state.step
    return True


def _evaluate(run: Run) -> dict[str, float]:
    cfg = run.params.train
    return evaluate(run.compute.module, run.valid_set, cfg.eval_examples, run.world)


def _save(run: Run) -> None:
    """Gather every rank's RNG state; rank 0 writes the checkpoint."""
    rng = checkpoint.capture_rng()
    states = [rng]
    if run.world.distributed:
        states = [None] * run.world.size
        torch.distributed.all_gather_object(states, rng)
    if run.world.is_main:
        run.last_checkpoint = checkpoint.save(run.checkpoint_dir, run.model, run.optimizer, run.state,
                                              run.spec, states, run.params.train.keep_checkpoints,
                                              discard=run.stale_checkpoints)
        run.stale_checkpoints = []


def _resume(run: Run) -> None:
    """Continue from the newest checkpoint made under the same spec; otherwise start fresh.

    Checkpoints of other settings are only marked stale here: `_save` deletes them once the new run
    has a checkpoint of its own, so a run that fails early destroys nothing.
    """
    if run.world.is_main:
        checkpoint.remove_partial_writes(run.checkpoint_dir)
    found = checkpoint.list_checkpoints(run.checkpoint_dir)
    if not found:
        return
    latest = found[-1]
    saved = checkpoint.read_state(latest)
    if saved["fingerprint"] != checkpoint.fingerprint(run.spec):
        log.warning("%s was made with other settings or data (%s); starting fresh", latest,
                    _spec_difference(saved.get("spec", {}), run.spec))
        run.stale_checkpoints = found
        return
    run.state, rng_states = checkpoint.restore(latest, run.model, run.optimizer)
    run.last_checkpoint = latest
    if len(rng_states) == run.world.size:
        checkpoint.apply_rng(rng_states[run.world.rank])
    else:
        log.warning("%s holds RNG states of %d processes, this run has %d: dropout streams start afresh",
                    latest, len(rng_states), run.world.size)
    log.info("resuming from %s (step %d of %d)", latest, run.state.step, run.params.train.steps)


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


def _spec_difference(old: dict[str, Any], new: dict[str, Any], shown: int = 6) -> str:
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


def check_batch(cfg: TrainConfig, processes: int) -> None:
    """Every process needs at least one example of each global batch."""
    if cfg.batch_size < processes:
        raise ConfigError("train.batch_size", cfg.batch_size, f"at least the number of processes ({processes})")


def _micro_batch(params: Params, world: World) -> int:
    """Rows per micro-batch: this rank's share of the batch cut into `train.length_buckets` runs of
    similar length (each trimmed to its longest row), smaller if `train.micro_batch_size` says so
    (`auto` is settled by the memory planner)."""
    cfg = params.train
    check_batch(cfg, world.size)
    share = -(-cfg.batch_size // world.size)
    rows = -(-share // cfg.length_buckets)
    return rows if cfg.micro_batch_size in (None, "auto") else min(cfg.micro_batch_size, rows)


def _check_examples(params: Params, meta: dict, train_set: Examples, folder: Path, world: World) -> None:
    """The examples must fit the model's position table and match their own meta.json."""
    width = train_set.arrays["token_ids"].shape[1]
    if width != meta["max_len"] or len(train_set) != meta["examples"]["train"]:
        raise DataError(f"{folder} holds arrays of another run (max_len {width} vs {meta['max_len']}, "
                        f"{len(train_set)} vs {meta['examples']['train']} examples); rerun the examples stage")
    if meta["max_len"] > params.model.max_position_embeddings:
        raise ConfigError("model.max_position_embeddings", params.model.max_position_embeddings,
                          f"at least the examples' max_len ({meta['max_len']})")


@dataclass(frozen=True)
class Outputs:
    checkpoint_dir: Path
    metrics_file: Path
    loss_csv: Path
    loss_png: Path
    valid_csv: Path


def run_stage(params: Params, examples_dir: Path, outputs: Outputs, world: World) -> dict[str, Any] | None:
    """Train (or resume), then on rank 0 write metrics, plots and the MLflow run; returns the metrics there."""
    run = setup(params, examples_dir, outputs.checkpoint_dir, world)
    tracker = _tracker(run) if world.is_main else Tracker()
    run.state.mlflow_run_id = tracker.run_id
    try:
        train(run, tracker)
        metrics = final_metrics(run)
    except BaseException as err:
        tracker.finish("KILLED" if isinstance(err, Interrupted | KeyboardInterrupt) else "FAILED")
        raise
    if world.is_main:
        _write_outputs(run, metrics, outputs, tracker)
    tracker.finish()
    return metrics if world.is_main else None


def _tracker(run: Run) -> Tracker:
    """The MLflow run mirroring this one (rank 0, `mlflow.enabled`), linked to its DVC experiment."""
    cfg = run.params.mlflow
    if not cfg.enabled:
        return Tracker()
    from bertpipe.config import flatten
    from bertpipe.tracking import MlflowTracker, dvc_tags, git_commit, repo_root

    commit = git_commit(repo_root())
    tags = {"mlflow.source.git.commit": commit, **dvc_tags(commit), "devices": describe_devices(run.world),
            "torch_version": torch.__version__, "precision": run.params.train.precision}
    run_name = cfg.run_name or os.environ.get("DVC_EXP_NAME") or None
    return MlflowTracker(cfg.experiment, run_name, flatten(run.params), tags, cfg.system_metrics,
                         resume_run_id=run.state.mlflow_run_id)


def _write_outputs(run: Run, metrics: dict[str, Any], outputs: Outputs, tracker: Tracker) -> None:
    """Plots and metrics/pretrain.json (with the MLflow run's ids), then their copies in MLflow.

    Held-out metrics went to MLflow as series at each evaluation; the rest are run-level summaries
    under keys that no per-step series uses, so the UI's value is the file's value.
    """
    table = loss_table(run.state.history)
    write_loss_csv(table, outputs.loss_csv)
    write_loss_png(table, outputs.loss_png)
    write_csv(pd.DataFrame(run.state.evaluations, columns=list(EVALUATION_COLUMNS)).astype({"step": int}),
              outputs.valid_csv)
    links = {"mlflow_run_id": tracker.run_id, "mlflow_experiment_id": tracker.experiment_id}
    write_json(outputs.metrics_file, metrics | {k: v for k, v in links.items() if v is not None})
    tracker.log_metrics({k: v for k, v in metrics.items() if not k.startswith("valid_")})  # valid_*: at each evaluation
    tracker.log_artifact(outputs.loss_png)
    tracker.log_artifact(Path("params.yaml"))
    tracker.log_dict(asdict(run.bert_config), "config.json")
