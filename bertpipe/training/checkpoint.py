"""Training checkpoints: written atomically, the last k kept, loaded without unpickling.

A checkpoint is a folder `step-XXXXXXX/` that appears whole or not at all (built in a temporary
sibling, fsynced, renamed): `model.safetensors` (the fp32 model), `optimizer.pt` and `rng.pt`
(tensors, numbers and lists only, read with `torch.load(weights_only=True)`) and `state.json`
(the `RunRecord`: where the run stands, its history and throughput, its MLflow run; and the
fingerprint of everything that shapes the run). A checkpoint whose fingerprint differs from the
current run's is never loaded. When to save is the loop's `Checkpointer` (`bertpipe.training.loop`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from bertpipe.atomic import atomic_dir
from bertpipe.config import TrainConfig
from bertpipe.errors import STORAGE_ERRNOS, PipelineError, cause, free_space
from bertpipe.model.bert import BertConfig
from bertpipe.model.flops import matmul_peak, training_flops

_NAME = re.compile(r"step-(\d{7})")
_FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "state.json")
MLFLOW_RUN_FILE = "mlflow_run.json"  # beside the step folders: the MLflow run of the latest pretrain


class CheckpointError(PipelineError):
    """A checkpoint that cannot be read, or cannot be written."""


@dataclass
class RunState:
    """Where the run stands: what a restart continues from, besides weights, optimizer and RNG."""

    step: int = 0
    best_valid_mlm_loss: float | None = None
    best_step: int | None = None  # its checkpoint is never pruned; `export.checkpoint: best` exports it


@dataclass
class History:
    """What the run measured so far, as rows of named columns; a resumed run's plots and metrics need all of it."""

    losses: list[dict[str, float]] = field(default_factory=list)  # per step: mlm_loss, nsp_loss, lr (NaN: skipped)
    evaluations: list[dict[str, float]] = field(default_factory=list)  # per evaluation: step, valid_* metrics
    skipped_steps: int = 0

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> History:
        """state.json's history; checkpoints written before the columns had names hold positional rows."""
        losses = [row if isinstance(row, dict) else dict(zip(_OLD_LOSSES, row, strict=True))
                  for row in saved["losses"]]
        evaluations = [row if isinstance(row, dict) else dict(zip(_OLD_EVALUATIONS, row, strict=True))
                       for row in saved["evaluations"]]
        return cls(losses, evaluations, saved["skipped_steps"])


_OLD_LOSSES = ("mlm_loss", "nsp_loss", "lr")  # the order of the positional rows, frozen: never add to these
_OLD_EVALUATIONS = ("step", "valid_mlm_loss", "valid_mlm_acc", "valid_nsp_loss", "valid_nsp_acc")


@dataclass
class Throughput:
    """Work done and time spent training (evaluation and checkpoints excluded), over all ranks: the one
    owner of pairs/s, tokens/s and MFU for MLflow, the progress bar and metrics/pretrain.json."""

    pairs: int = 0
    tokens: int = 0
    flops: float = 0.0
    seconds: float = 0.0

    def count(self, config: BertConfig, lengths: np.ndarray, predictions: int) -> None:
        """One global batch: its real lengths and real MLM predictions."""
        self.pairs += len(lengths)
        self.tokens += int(lengths.sum())
        self.flops += training_flops(config, lengths, predictions)

    def lap(self, seconds: float, pairs: int) -> float:
        """Add the time of the steps since the last sync point; their `pairs` per second."""
        self.seconds += seconds
        return pairs / max(seconds, 1e-9)

    def summary(self, device: torch.device, precision: str, world_size: int) -> dict[str, float]:
        """The run's rates; MFU against the measured matmul peak of every rank's device."""
        seconds = max(self.seconds, 1e-9)
        peak = matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)
        return {"pairs_per_sec": self.pairs / seconds, "tokens_per_sec": self.tokens / seconds,
                "mfu": self.flops / seconds / (peak * world_size), "peak_flops": peak, "train_seconds": self.seconds}


@dataclass
class RunRecord:
    """Everything of a run that state.json keeps."""

    state: RunState = field(default_factory=RunState)
    history: History = field(default_factory=History)
    throughput: Throughput = field(default_factory=Throughput)
    mlflow_run_id: str | None = None  # the MLflow run a resumed run continues


def fingerprint(spec: dict[str, Any]) -> str:
    """A stable hash of the settings and data a run's trajectory depends on."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders start with a dot and never match)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.fullmatch(p.name)), key=lambda p: p.name)


def remove_partial_writes(folder: Path) -> None:
    """Delete what a write killed half-way left: atomic_dir's `.step-*.tmp` and `.step-*.old` siblings."""
    for path in folder.glob(".step-*") if folder.is_dir() else ():
        shutil.rmtree(path, ignore_errors=True)


def save(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, record: RunRecord, spec: dict[str, Any],
         rng_states: list[dict[str, Any]], keep: int) -> Path:
    """Write checkpoint `step-<state.step>`, then delete all but the newest `keep` and the best.

    `spec` is what the run's result depends on (see `trajectory_spec`).
    """
    state = record.state
    target = folder / f"step-{state.step:07d}"
    try:
        with atomic_dir(target) as tmp:
            save_model(model, str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(rng_states, tmp / "rng.pt")
            saved = {"fingerprint": fingerprint(spec), "spec": spec, **asdict(record)}
            (tmp / "state.json").write_text(json.dumps(saved, default=str) + "\n")
    except (OSError, RuntimeError, SafetensorError) as err:  # torch and safetensors report a full disk their way
        previous = list_checkpoints(folder)
        kept = f"{previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"writing checkpoint {target} failed ({_write_failure(err, folder)}); {kept}") from None
    best = None if state.best_step is None else folder / f"step-{state.best_step:07d}"
    for old in list_checkpoints(folder)[:-keep]:
        if old != best:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _write_failure(err: Exception, folder: Path) -> str:
    """Why a checkpoint could not be written, in words. torch's zip writer says only `unexpected pos ...`
    (inline_container.cc) and safetensors `I/O error`, so a nearly full device is named as the cause."""
    if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
        return STORAGE_ERRNOS[err.errno] + free_space(folder)
    free = shutil.disk_usage(folder).free if folder.exists() else None
    if free is not None and free < LOW_SPACE:
        return STORAGE_ERRNOS[errno.ENOSPC] + free_space(folder)
    return cause(err)


LOW_SPACE = 64 << 20  # bytes: a failed write with less than this left is taken for a full disk


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json; refuses folders that are not complete bertpipe checkpoints."""
    missing = [name for name in _FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path} is not a bertpipe checkpoint (missing {', '.join(missing)})")
    try:
        state = json.loads((path / "state.json").read_text())
    except ValueError:
        _not_ours(path, "state.json is not JSON")
    if not isinstance(state, dict) or "fingerprint" not in state or "step" not in state.get("state", {}):
        _not_ours(path, "state.json lacks the step or fingerprint")
    return state


def restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[RunRecord, list[dict[str, Any]]]:
    """Load weights and optimizer state in place; return the run's record and the per-rank RNG states."""
    state = read_state(path)
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        if not missing and not unexpected:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
            rng_states = torch.load(path / "rng.pt", weights_only=True)
    except Exception as err:  # safetensors, unpickling (weights_only refuses foreign pickles), shape errors ...
        _not_ours(path, cause(err))
    if missing or unexpected:
        _not_ours(path, f"model keys differ (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    record = RunRecord(RunState(**state["state"]), History.from_json(state["history"]),
                       Throughput(**state["throughput"]), state.get("mlflow_run_id"))
    return record, rng_states


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (python, numpy's global, torch CPU and CUDA) as tensors and lists."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(words), gauss], "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos,
                                                               has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def apply_rng(states: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    version, words, gauss = states["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _not_ours(path: Path, why: str) -> NoReturn:
    raise CheckpointError(f"{path} is truncated or not a bertpipe checkpoint ({why}); "
                          "delete it to resume from an earlier one or start fresh")


def trajectory_spec(bert_config: BertConfig, cfg: TrainConfig, seed: int, examples_meta: dict,
                    init: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a run's result depends on: a checkpoint made under a different spec is never resumed.

    How the work is split (device count, micro-batch size) is left out on purpose: it does not
    change the result, so a run may resume with more or fewer processes. A continued run also depends on
    the weights it starts from (`init`: `bertpipe.init.folder.Start.identity`); a run from scratch has no
    such key, so its spec is as it was before continued pretraining existed.
    """
    how = {"device", "nproc", "threads", "micro_batch_size", "length_buckets", "activation_checkpointing",
           "eval_every", "eval_examples", "log_every", "checkpoint_every", "keep_checkpoints"}
    spec = {"model": asdict(bert_config), "train": cfg.model_dump(exclude=how), "seed": seed, "examples": examples_meta}
    return spec if init is None else spec | {"init": init}
