"""The `downstream` stage: every task of data/tasks fine-tuned from models/bert, its dev splits scored.

Each task runs every seed twice, from the export's weights and from a random start of the same shape (the
floor: what the same fine-tuning reaches without pretraining), and the majority class is scored beside them.
A continued run (`model.init`) runs every seed a third time, from the checkpoint it started from (models/init):
what continued pretraining bought is the difference, the answer a domain-adaptive run is for.
Per metric the report gives the median and the spread (max - min) over seeds, and one aggregate score with
its rule (`bertpipe.downstream.metrics`).

Finished runs are kept in the repository's `.bertpipe/downstream/`, each under a key of everything its result
depends on (the weights, config.json and tokenizer.json of the export, the task's files, the recipe, the seed,
the start, the device kind and precision, the fine-tuning code and library versions). So a killed stage, run
again, redoes only the runs it had not finished, and the random-start floor, which depends on the model's
shape and tokenizer but not on its pretraining, is computed once for every experiment that shares them
(`--temp` and queued experiments included: the folder is the real repository's).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertpipe.atomic import write_json
from bertpipe.config import DownstreamConfig, MlflowConfig, flatten
from bertpipe.devices import resolve_device, resolve_precision
from bertpipe.downstream import finetune as finetune_module
from bertpipe.downstream import metrics as metrics_module
from bertpipe.downstream.finetune import DownstreamError, Outcome, batches_per_run, encode, runs_of
from bertpipe.downstream.metrics import SCORE_RULE, majority, median_and_spread, task_score
from bertpipe.downstream.tasks import TaskData, read_tasks
from bertpipe.downstream.workers import Job, processes_for, runner
from bertpipe.errors import ConfigError, Interrupted, first_line
from bertpipe.init.folder import read_start
from bertpipe.progress import Progress
from bertpipe.repo import repo_root

log = logging.getLogger(__name__)
RECIPE = ("epochs", "batch_size", "lr", "warmup_ratio", "weight_decay", "max_len")  # what a run's result depends on
DIGITS = 2  # scores are x100, as GLUE reports them


@dataclass
class TaskResult:
    """A task's finished runs by (init, seed), those to do, its majority-class scores, and what its text looked
    like to the tokenizer."""

    task: TaskData
    runs: dict[tuple[str, int], Outcome] = field(default_factory=dict)
    todo: list[Job] = field(default_factory=list)
    majority: dict[str, float] = field(default_factory=dict)
    unk_fraction: float = 0.0
    truncated: float = 0.0


def run_downstream(model_dir: Path, tasks_dir: Path, export_metrics: Path, cfg: DownstreamConfig,
                   tracking: MlflowConfig, init_dir: Path | None = None) -> dict[str, Any]:
    """Fine-tune and score every task; return the report (metrics/downstream.json).

    Args:
        model_dir: the export's Hugging Face folder (models/bert).
        tasks_dir: the tasks stage's folder (data/tasks).
        export_metrics: metrics/export.json, which names the MLflow run that trained the checkpoint.
        cfg: params.downstream, the recipe and seeds.
        tracking: params.mlflow (enabled).
        init_dir: the init stage's folder (models/init); a checkpoint there is fine-tuned too, as `init`.
    """
    tasks = read_tasks(tasks_dir)
    if not tasks:
        log.info("downstream.tasks is empty: nothing to fine-tune")
        return {"tasks": 0}
    config = _check_export(model_dir, cfg)
    device = resolve_device(cfg.device, key="downstream.device")
    precision = fine_tuning_precision(cfg.precision, device, config["hidden_size"])
    tokenizer = _tokenizer(model_dir)
    keys = _fingerprints(model_dir, cfg, device.type, precision)
    start = read_start(init_dir) if init_dir is not None else None
    if start is not None:  # the starting checkpoint's runs depend on its weights instead of the export's
        keys["start"] = {"weights": start.record["weights_sha256"], "config": _sha256(start.folder / "config.json")}
    mlflow_log = _mlflow_log(export_metrics) if tracking.enabled else None
    processes = processes_for(cfg.processes, device, config["hidden_size"], NARROW)
    log.info("Fine-tuning %s on %d task(s) on %s (%s, %s), max_len %d of %d positions", model_dir, len(tasks),
             device.type, precision, f"{processes} runs at once" if processes > 1 else "one run at a time",
             cfg.max_len, config["max_position_embeddings"])
    started = time.perf_counter()
    with _stop_on_signals(), runner(processes) as run_jobs:
        setting = Setting(model_dir, cfg, device.type, precision, keys, start.folder if start is not None else None)
        results = _fine_tune(tasks, tokenizer, setting, mlflow_log, run_jobs)
    report = build_report(results, (time.perf_counter() - started) / 60, device.type, precision)
    if mlflow_log is not None:
        mlflow_log.finish(report)
    _log_table(report, results)
    return report


@dataclass(frozen=True)
class Setting:
    """What every fine-tuning run of the stage shares, and the fingerprints its kept results are filed under."""

    model_dir: Path
    cfg: DownstreamConfig
    device: str
    precision: str
    keys: dict[str, Any]
    init_dir: Path | None = None  # the checkpoint a continued run started from, fine-tuned as `init`


def _fine_tune(tasks: list[TaskData], tokenizer: Any, setting: Setting, mlflow_log: Any,
               run_jobs: Callable[..., None]) -> list[TaskResult]:
    """Every run of every task not finished earlier, the longest first, so that no worker is left alone with one
    at the end; each recorded here as it finishes (`_record`)."""
    results = {task.name: _start(task, tokenizer, setting) for task in tasks}
    jobs = sorted((job for result in results.values() for job in result.todo), reverse=True,
                  key=lambda job: sum(map(len, job.data.ids["train"])))
    steps = sum(batches_per_run(job.task.rows["train"], setting.cfg) for job in jobs)
    runs = sum(len(result.runs) + len(result.todo) for result in results.values())
    with Progress(steps, f"fine-tuning ({len(jobs)} of {runs} runs to do)", "step", leave=False) as bar:
        run_jobs(jobs, lambda loss: bar.update(1, loss=f"{loss:.3f}"),
                 lambda job, outcome: _record(results[job.task.name], job, outcome, setting, mlflow_log))
    return list(results.values())


def _start(task: TaskData, tokenizer: Any, setting: Setting) -> TaskResult:
    """A task tokenized, its runs finished earlier read back, the others as jobs; its majority-class floor."""
    data = encode(tokenizer, task, setting.cfg.max_len)
    result = TaskResult(task, unk_fraction=data.unk_fraction, truncated=data.truncated,
                        majority=majority(task.metrics, data.labels["train"],
                                          {s: data.labels[s] for s in task.scored}, task.labels is None))
    runs = list(runs_of(task, setting.cfg))
    if setting.init_dir is not None:
        runs += [("init", seed) for init, seed in runs if init == "pretrained"]
    for init, seed in runs:
        outcome = _read_memo(_memo_path(setting.keys, task, init, seed))
        if outcome is None:
            start = setting.init_dir if init == "init" else setting.model_dir  # the export's tokenizer is its own
            result.todo.append(Job(start, task, data, setting.cfg, seed, init, setting.device,
                                   setting.precision, tokenizer.pad_token_id))
        else:
            result.runs[init, seed] = outcome
            log.info("%s %s seed %d: %s (finished earlier)", task.name, init, seed, _scores_text(outcome.scores))
    return result


def _record(result: TaskResult, job: Job, outcome: Outcome, setting: Setting, mlflow_log: Any) -> None:
    """One finished run, here and one at a time: its child run, its result kept for a rerun, a log line."""
    name = f"{job.task.name} {job.init} seed {job.seed}"
    if mlflow_log is not None:
        cost = {"seconds": outcome.seconds, "examples_per_sec": outcome.examples_per_sec}
        mlflow_log.log_run(name, _run_params(setting.cfg, job.task, job.init, job.seed), outcome.epochs, cost)
    write_json(_memo_path(setting.keys, job.task, job.init, job.seed), asdict(outcome))
    result.runs[job.init, job.seed] = outcome
    log.info("%s: %s (%.1f min, %s examples/s)", name, _scores_text(outcome.scores), outcome.seconds / 60,
             f"{outcome.examples_per_sec:,.0f}")
    if all((j.init, j.seed) in result.runs for j in result.todo):
        log.info("%s: all %d runs done", job.task.name, len(result.runs))


def build_report(results: list[TaskResult], minutes: float, device: str, precision: str) -> dict[str, Any]:
    """metrics/downstream.json: per task the median and spread over seeds from the export, the same from a
    random start, the majority class; then the aggregate of each over the GLUE tasks, and its rule."""
    report: dict[str, Any] = {"tasks": len(results), "minutes": round(minutes, 2), "device": device,
                              "precision": precision}
    totals: dict[str, list[float]] = {"": [], "_random_init": [], "_majority": []}
    for result in results:
        pretrained, spread = median_and_spread([o.scores for (init, _), o in result.runs.items()
                                                if init == "pretrained"])
        random_init, _ = median_and_spread([o.scores for (init, _), o in result.runs.items() if init == "random"])
        starts = [o.scores for (init, _), o in result.runs.items() if init == "init"]
        start = median_and_spread(starts)[0] if starts else {}
        seeds = sorted({seed for _, seed in result.runs})
        report[result.task.name] = {
            **_rounded(pretrained), **_rounded({f"{k}_spread": v for k, v in spread.items()}),
            "score": round(task_score(pretrained), DIGITS),
            "random_init": _rounded(random_init) | {"score": round(task_score(random_init), DIGITS)},
            "majority": _rounded(result.majority) | {"score": round(task_score(result.majority), DIGITS)},
            **({"init": _rounded(start) | {"score": round(task_score(start), DIGITS)}} if start else {}),
            "seeds": len(seeds), "train_examples": result.task.rows["train"],
            "unk_fraction": round(result.unk_fraction, 4), "truncated": round(result.truncated, 4),
            "minutes": round(sum(o.seconds for o in result.runs.values()) / 60, 2),
            "examples_per_sec": round(float(np.median([o.examples_per_sec for o in result.runs.values()])))}
        if result.task.glue:
            for suffix, scores in (("", pretrained), ("_random_init", random_init), ("_majority", result.majority),
                                   ("_init", start)):
                if scores:
                    totals.setdefault(suffix, []).append(task_score(scores))
    if totals[""]:
        for suffix, scores in totals.items():
            report[f"glue_score{suffix}"] = round(float(np.mean(scores)), DIGITS)
        report["score_rule"] = SCORE_RULE
    return report


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {k: round(v, DIGITS) for k, v in scores.items()}


def _scores_text(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in scores.items())


def _log_table(report: dict[str, Any], results: list[TaskResult]) -> None:
    """One line per task: the export's score (median, spread), the random start's, the majority class's."""
    log.info("%-12s %-24s %-24s %-12s %s", "task", "pretrained (median ± spread)", "random init", "majority",
             "minutes of its runs")
    for result in results:
        row = report[result.task.name]
        spread = max((v for k, v in row.items() if k.endswith("_spread")), default=0.0)
        log.info("%-12s %-24s %-24s %-12s %.1f", result.task.name, f"{row['score']:.2f} ± {spread:.2f}",
                 f"{row['random_init']['score']:.2f}", f"{row['majority']['score']:.2f}", row["minutes"])
    if "glue_score" in report:
        start = f", the checkpoint it continued {report['glue_score_init']:.2f}" if "glue_score_init" in report else ""
        log.info("GLUE score %.2f (random init %.2f, majority %.2f%s): %s", report["glue_score"],
                 report["glue_score_random_init"], report["glue_score_majority"], start, report["score_rule"])


def _check_export(model_dir: Path, cfg: DownstreamConfig) -> dict[str, Any]:
    """The export's config.json, whose position table must hold downstream.max_len tokens."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        positions = int(config["max_position_embeddings"])
        config["hidden_size"] = int(config["hidden_size"])
    except FileNotFoundError:
        raise DownstreamError(f"{model_dir}/config.json does not exist: run the export stage first "
                              "(dvc repro export)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DownstreamError(f"{model_dir}/config.json is not a BERT's config ({err.__class__.__name__}); rerun "
                              "the export stage") from None
    if cfg.max_len > positions:
        raise ConfigError("downstream.max_len", cfg.max_len, f"at most the export's max_position_embeddings "
                                                             f"({positions}, {model_dir}/config.json)")
    return config


NARROW = 256  # hidden units below which bf16 autocast costs a CPU more than it saves


def fine_tuning_precision(preference: str, device: torch.device, hidden_size: int) -> str:
    """`downstream.precision`: auto is `train.precision`'s rule (bf16 where native), except for a narrow model on a
    CPU. Autocast casts every weight at every op, which for BERT-tiny outweighs the faster products: measured on
    2 cores of an AMX Xeon, CoLA fine-tuned at 2,900 examples/s in fp32 and 1,400 in bf16 (BERT-base: 13 in
    fp32, 24 in bf16)."""
    if preference == "auto" and device.type == "cpu" and hidden_size < NARROW:
        return "fp32"
    return resolve_precision(preference, device)


def _tokenizer(model_dir: Path) -> Any:
    """The export's tokenizer, as `AutoTokenizer` reads it (the way every user of the folder does)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DownstreamError("the downstream stage fine-tunes with transformers, which is not installed "
                              "(pip install -e .)") from None
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise DownstreamError(f"{model_dir} has no tokenizer transformers can read ({first_line(err)}); rerun "
                              "the export stage") from None


def _fingerprints(model_dir: Path, cfg: DownstreamConfig, device: str, precision: str) -> dict[str, Any]:
    """What every run's result depends on besides its task, seed and start."""
    code = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (finetune_module, metrics_module)))
    return {"weights": _sha256(model_dir / "model.safetensors"), "config": _sha256(model_dir / "config.json"),
            "tokenizer": _sha256(model_dir / "tokenizer.json"), "recipe": cfg.model_dump(include=set(RECIPE)),
            "device": device, "precision": precision, "code": code.hexdigest(),
            "versions": {name: version(name) for name in ("torch", "transformers")}}


def _memo_path(keys: dict[str, Any], task: TaskData, init: str, seed: int) -> Path:
    """Where run (task, init, seed) is kept once finished: a random start does not depend on the weights, a start
    from the checkpoint a continued run began with (`init`) depends on that checkpoint's."""
    parts = {**keys, "task": task.sha256, "init": init, "seed": seed}
    start = parts.pop("start", None)
    if init == "random":
        parts.pop("weights")
    elif init == "init":
        parts["weights"] = start
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return repo_root() / ".bertpipe" / "downstream" / f"{task.name}-{init}-{seed}-{digest[:24]}.json"


def _read_memo(path: Path) -> Outcome | None:
    try:
        return Outcome(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _run_params(cfg: DownstreamConfig, task: TaskData, init: str, seed: int) -> dict[str, Any]:
    recipe = {f"downstream.{k}": v for k, v in flatten(cfg).items() if k in RECIPE}
    return {"task": task.name, "init": init, "seed": seed, **recipe}


def _mlflow_log(export_metrics: Path) -> Any:
    """The MLflow log of the pretrain run the export names, or None (one line says why)."""
    try:
        run_id = json.loads(export_metrics.read_text(encoding="utf-8"))["mlflow_run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s names no MLflow run (pretrain ran with mlflow.enabled: false?): the scores go to "
                    "DVC's metrics only", export_metrics)
        return None
    from bertpipe.tracking.downstream import DownstreamLog

    return DownstreamLog.open(run_id, "the scores are in metrics/downstream.json")


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT stop the stage at once with `Interrupted`: finished runs are kept, the run under
    way is redone by the next `dvc repro`."""

    def stop(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
