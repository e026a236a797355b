"""A catalogue of bad inputs: each ends its stage with exit 1 and one `Error:` line naming the cause.

The stages are run as DVC runs them (a process of their own in a folder holding params.yaml, forked
from one that has imported their libraries: tests/helpers/forked_stage.py), in a copy of a folder
where a good run of the same stage has already written its outputs; those outputs must be
byte-identical afterwards. A module fixture runs every case of a stage, two processes at a time, and
one test per case checks its outcome. Faults that cannot be staged from outside (a full disk, a
non-finite loss, running out of memory) are injected in-process into the library the stage calls.
Already covered elsewhere: archives, `../` entries, HTTP errors and missing split files of the
download stage (test_download.py), params at the library level (test_config.py), the export
stage's vocabulary mismatch (test_export.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import PRETRAIN_OUTS, REPO, SMALL_PRETRAIN, STAGE_ENV, small_run
from helpers.forked_stage import run_stage
from helpers.one_line import one_error_line, write_params_file

from bertpipe.errors import PipelineError
from bertpipe.model.bert import BertForPreTraining
from bertpipe.tracking import NullTracker
from bertpipe.training import checkpoint
from bertpipe.training.checkpoint import CheckpointError
from bertpipe.training.distributed import World
from bertpipe.training.loop import NonFiniteLoss, train
from bertpipe.training.optim import build_optimizer
from bertpipe.training.pretrain import final_metrics

# in-process runs (the faults injected at the end) on one thread, like the stages
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
PREPARE_OUTS = ["data/prepared", "metrics/prepare.json"]
UNREACHABLE = {**STAGE_ENV, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}  # the discard port: nothing listens
CPU = World(0, 1, 0, torch.device("cpu"))


def run_prepare(folder: Path, env: Mapping[str, str] = STAGE_ENV) -> subprocess.CompletedProcess[str]:
    return run_stage(REPO / "stages" / "prepare.py", ["raw", *PREPARE_OUTS], folder, env)


def run_pretrain(folder: Path, env: Mapping[str, str] = STAGE_ENV) -> subprocess.CompletedProcess[str]:
    return run_stage(REPO / "stages" / "pretrain.py", ["examples", *PRETRAIN_OUTS], folder, env)


def snapshot(folder: Path, outs: list[str]) -> dict[str, str]:
    """sha256 of every file under the stage's outputs, by relative path."""
    files = {}
    for out in outs:
        root = folder / out
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            files[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


@dataclass(frozen=True)
class Case:
    """One bad input: how it spoils a copy of a folder where the stage ran well, and what the error names."""

    spoil: Callable[[Path], object]
    words: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=lambda: STAGE_ENV)
    marks: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Outcome:
    folder: Path
    done: subprocess.CompletedProcess[str]
    before: dict[str, str]  # the outputs' hashes once spoiled, before the stage ran
    after: dict[str, str]
    seconds: float


def run_cases(good: Path, root: Path, cases: Mapping[str, Case], stage: Callable[..., Any],
              outs: list[str]) -> dict[str, Outcome]:
    """Each case in its own copy of `good`, two stage processes at a time (one per core: they run one thread)."""

    def one(name: str) -> Outcome:
        folder = root / name
        shutil.copytree(good, folder, symlinks=True)
        cases[name].spoil(folder)
        before = snapshot(folder, outs)
        started = time.monotonic()
        done = stage(folder, cases[name].env)
        return Outcome(folder, done, before, snapshot(folder, outs), time.monotonic() - started)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(cases, pool.map(one, cases), strict=True))


def case_params(cases: Mapping[str, Case]) -> list[Any]:
    return [pytest.param(name, marks=case.marks, id=name) for name, case in cases.items()]


# --- the pretrain stage ------------------------------------------------------------------------------------


def bad_params(overrides: Mapping[str, Any], *words: str) -> Case:
    return Case(lambda folder: write_params_file(folder, {**SMALL_PRETRAIN, **overrides}), ("params.yaml: ", *words))


def own_examples(folder: Path) -> Path:
    """Replace the folder's examples link by a copy the case may change."""
    link = folder / "examples"
    target = link.resolve()
    link.unlink()
    shutil.copytree(target, link)
    return link


def other_meta(**changes: Any) -> Callable[[Path], None]:
    def spoil(folder: Path) -> None:
        meta_file = own_examples(folder) / "meta.json"
        meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), **changes}))

    return spoil


def shorter_labels(folder: Path) -> None:
    labels_file = own_examples(folder) / "train" / "nsp_labels.npy"
    np.save(labels_file, np.load(labels_file)[:-7])


def truncated_tokens(folder: Path) -> None:
    tokens_file = own_examples(folder) / "train" / "token_ids.npy"
    tokens_file.write_bytes(tokens_file.read_bytes()[:5000])


class NotOurs:
    """A harmless class: torch.load(weights_only=True) must refuse to rebuild it from a pickle."""


def in_newest_checkpoint(name: str, spoil: Callable[[Path], object]) -> Callable[[Path], object]:
    return lambda folder: spoil(folder / "models" / "checkpoint" / "step-0000008" / name)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def fresh_with_mlflow(folder: Path) -> None:
    """No outputs yet (so none may appear: the stage must fail before its first step), MLflow on."""
    for out in ("models", "metrics", "plots"):
        shutil.rmtree(folder / out)
    write_params_file(folder, {**SMALL_PRETRAIN, "mlflow.enabled": True})


def deleted_experiment(folder: Path) -> None:
    """The default store (mlflow.db in the folder) holds experiment `bertpipe`, deleted in the UI."""
    from mlflow.tracking import MlflowClient

    write_params_file(folder, {**SMALL_PRETRAIN, "mlflow.enabled": True})
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    client.delete_experiment(client.create_experiment("bertpipe"))


DEFAULT_STORE = {k: v for k, v in STAGE_ENV.items() if k != "MLFLOW_TRACKING_URI"}
NEWEST = "/step-0000008"  # in the work folder or in models/checkpoint, whichever the stage reads first
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="train.device: cuda is valid where a GPU is visible")

PRETRAIN_CASES: dict[str, Case] = {
    # params.yaml
    "unknown-preset": bad_params({"model.preset": "huge"}, "model.preset = 'huge'", "tiny, base, large"),
    "unknown-device": bad_params({"train.device": "tpu"}, "train.device = 'tpu'", "auto, cpu, cuda"),
    "cuda-without-gpu": Case(bad_params({"train.device": "cuda"}).spoil, ("train.device = 'cuda'", "no CUDA device"),
                             marks=(NO_GPU,)),
    "heads-do-not-divide-hidden": bad_params({"model.hidden_size": 129}, "model.hidden_size = 129",
                                             "num_attention_heads"),
    "max-len-above-position-table": bad_params({"model.max_position_embeddings": 32}, "examples.max_len = 64",
                                               "model.max_position_embeddings (32)"),
    "examples-wider-than-position-table": bad_params({"examples.max_len": 32, "model.max_position_embeddings": 32,
                                                      "downstream.max_len": 32},
                                                     "model.max_position_embeddings = 32", "max_len (64)"),
    "batch-below-processes": bad_params({"train.batch_size": 1, "train.nproc": 2}, "train.batch_size = 1",
                                        "number of processes (2)"),
    "wrong-type": bad_params({"train.steps": "ten"}, "train.steps = 'ten'", "an integer"),
    "out-of-range": bad_params({"train.keep_checkpoints": 0}, "train.keep_checkpoints = 0", ">= 1"),
    "unknown-key": bad_params({"train.bogus": 1}, "train.bogus = 1", "one of the keys"),
    # data/examples of another run
    "examples-meta-of-another-max-len": Case(other_meta(max_len=48),
                                             ("holds arrays of another run", "max_len 64 vs 48")),
    "examples-arrays-of-different-lengths": Case(shorter_labels, ("example arrays disagree in length", "nsp_labels")),
    "examples-array-truncated": Case(truncated_tokens, ("train/token_ids.npy is not a valid .npy array",)),
    "examples-ids-outside-the-vocabulary": Case(other_meta(vocab_size=1000), ("vocab",)),
    # the newest checkpoint, truncated or not ours
    "checkpoint-weights-truncated": Case(in_newest_checkpoint("model.safetensors", truncate),
                                         (NEWEST, "truncated or not a bertpipe checkpoint", "SafetensorError")),
    "checkpoint-state-not-json": Case(in_newest_checkpoint("state.json", lambda p: p.write_text("{not json")),
                                      (NEWEST, "state.json is not JSON")),
    "checkpoint-file-missing": Case(in_newest_checkpoint("optimizer.pt", Path.unlink),
                                    (NEWEST, "is not a bertpipe checkpoint", "missing optimizer.pt")),
    "checkpoint-optimizer-not-a-torch-file": Case(
        in_newest_checkpoint("optimizer.pt", lambda p: p.write_bytes(b"not a torch file\n" * 10)), (NEWEST,)),
    "checkpoint-rng-pickle-of-a-class": Case(
        in_newest_checkpoint("rng.pt", lambda p: torch.save([{"python": NotOurs()}], p)), (NEWEST,)),
    # MLflow
    "mlflow-unreachable": Case(lambda folder: write_params_file(folder, {**SMALL_PRETRAIN, "mlflow.enabled": True}),
                               ("MLflow tracking server http://127.0.0.1:9 is unreachable", "mlflow.enabled: false"),
                               env=UNREACHABLE),
    "mlflow-unreachable-in-a-fresh-folder": Case(fresh_with_mlflow, ("MLflow tracking server", "unreachable"),
                                                 env=UNREACHABLE),
    "mlflow-unreachable-with-other-model-shape": Case(
        lambda folder: write_params_file(folder, {**SMALL_PRETRAIN, "model.hidden_size": 64, "mlflow.enabled": True}),
        ("MLflow tracking server http://127.0.0.1:9 is unreachable",), env=UNREACHABLE),
    "mlflow-experiment-deleted": Case(deleted_experiment, ("experiment 'bertpipe'", "is deleted", "restore it"),
                                      env=DEFAULT_STORE),
}


@pytest.fixture(scope="module")
def pretrain_outcomes(pretrained_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every case in a copy of a folder where the stage ran well (checkpoints step-6 and step-8, metrics, plots)."""
    cases = {name: case for name, case in PRETRAIN_CASES.items()
             if name != "cuda-without-gpu" or not torch.cuda.is_available()}
    return run_cases(pretrained_folder, tmp_path_factory.mktemp("bad_pretrain"), cases, run_pretrain,
                     list(PRETRAIN_OUTS))


@pytest.mark.parametrize("case", case_params(PRETRAIN_CASES))
def test_pretrain_stage_fails_cleanly_and_keeps_earlier_outputs(case: str,
                                                               pretrain_outcomes: dict[str, Outcome]) -> None:
    """Exit 1 with one error line, outputs untouched (none written in the fresh folder), within a minute:
    every one of these is found before the first training step."""
    outcome = pretrain_outcomes[case]
    one_error_line(outcome.done, *PRETRAIN_CASES[case].words)
    assert outcome.after == outcome.before
    assert outcome.seconds < 60


@pytest.mark.parametrize("case", ["wrong-type", "examples-wider-than-position-table",
                                  "examples-meta-of-another-max-len", "examples-array-truncated"])
def test_bad_params_and_examples_stop_the_stage_before_torch_is_imported(case: str, pretrained_folder: Path,
                                                                         tmp_path: Path) -> None:
    """A real `python stages/pretrain.py` (not forked): `-X importtime` lists every module it imported."""
    folder = tmp_path / case
    shutil.copytree(pretrained_folder, folder, symlinks=True)
    PRETRAIN_CASES[case].spoil(folder)
    command = [sys.executable, "-X", "importtime", str(REPO / "stages" / "pretrain.py"), "examples", *PRETRAIN_OUTS]
    done = subprocess.run(command, cwd=folder, env=STAGE_ENV, capture_output=True, text=True, timeout=120)
    one_error_line(done, *PRETRAIN_CASES[case].words)
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "click" in imported and "torch" not in imported


# --- the prepare stage -------------------------------------------------------------------------------------


def split_file(name: str, data: bytes | None) -> Callable[[Path], None]:
    """Give raw/<name> new bytes, or remove it (None)."""

    def spoil(folder: Path) -> None:
        path = folder / "raw" / name
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data)

    return spoil


PREPARE_CASES: dict[str, Case] = {
    "empty-corpus": Case(split_file("wiki.train.tokens", b""), ("raw/wiki.train.tokens", "no paragraph")),
    "no-paragraph-of-two-sentences": Case(
        split_file("wiki.train.tokens", b" = Title = \n\n one sentence only\n\n another one\n"),
        ("raw/wiki.train.tokens", "' . '")),
    "not-utf8": Case(split_file("wiki.train.tokens", b" a . b\n" * 100 + b" c \xff d . e\n"),
                     ("raw/wiki.train.tokens is not UTF-8", "offset 703")),
    "missing-split-file": Case(split_file("wiki.valid.tokens", None), ("raw/wiki.valid.tokens is missing",)),
    "vocab-below-the-alphabet": Case(
        lambda f: write_params_file(f, {"prepare.tokenizer": "wordpiece", "prepare.vocab_size": 100}),
        ("prepare.vocab_size = 100 is not allowed; expected at least 165", "the 80 characters of the train split")),
    "whole-words-of-a-word-vocabulary": Case(
        lambda f: write_params_file(f, {"examples.whole_word_mask": True}),
        ("examples.whole_word_mask = True is not allowed; expected false with prepare.tokenizer: word",)),
}


@pytest.fixture(scope="module")
def prepare_outcomes(shared_wikitext: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """A good run on the sample (valid stands in for train, test for valid), then every case in a copy."""
    root = tmp_path_factory.mktemp("bad_prepare")
    good = root / "good"
    (good / "raw").mkdir(parents=True)
    for name, split in (("train", "valid"), ("valid", "test"), ("test", "test")):
        shutil.copyfile(shared_wikitext / f"wiki.{split}.tokens", good / "raw" / f"wiki.{name}.tokens")
    write_params_file(good, {})
    done = run_prepare(good)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_cases(good, root / "cases", PREPARE_CASES, run_prepare, PREPARE_OUTS)


@pytest.mark.parametrize("case", case_params(PREPARE_CASES))
def test_prepare_stage_fails_cleanly_and_keeps_earlier_outputs(case: str,
                                                              prepare_outcomes: dict[str, Outcome]) -> None:
    outcome = prepare_outcomes[case]
    one_error_line(outcome.done, *PREPARE_CASES[case].words)
    assert outcome.after == outcome.before
    assert sorted(p.name for p in (outcome.folder / "data").iterdir()) == ["prepared"]  # no temporary folder left


# --- faults injected in-process ----------------------------------------------------------------------------






@pytest.mark.parametrize(("target", "failing_call"), [("save_model", 2), ("torch.save", 4)])
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(
        target: str, failing_call: int, sample_examples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC in the 2nd checkpoint (weights, or the last torch.save of it): the 1st stays usable."""
    module, name = (checkpoint, "save_model") if target == "save_model" else (torch, "save")
    real, attempts = getattr(module, name), []

    def full_disk(*args: Any, **kwargs: Any) -> None:
        attempts.append(args)
        if len(attempts) == failing_call:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args, **kwargs)

    run = small_run(sample_examples, tmp_path)
    monkeypatch.setattr(module, name, full_disk)
    with pytest.raises(CheckpointError) as info:
        train(run, NullTracker())
    monkeypatch.undo()
    message = str(info.value)
    folder, work = tmp_path / "checkpoint", run.checkpointer.work.folder  # the output mirrors the work folder (workdir)
    assert "\n" not in message
    assert f"writing checkpoint {work / 'step-0000004'} failed (no space left on device (" in message
    assert f"{work / 'step-0000002'} is intact" in message
    for kept in (folder, work):
        assert sorted(p.name for p in kept.iterdir()) == ["step-0000002"]  # no temporary folder left behind

    model = BertForPreTraining(run.bert_config)
    progress, rng = checkpoint.restore(folder / "step-0000002", model, build_optimizer(model, run.params.train))
    assert progress.state.step == 2 and len(progress.history.losses) == 2 and len(rng) == 1
    resumed = small_run(sample_examples, tmp_path)
    assert resumed.record.state.step == 2
    train(resumed, NullTracker())
    assert resumed.record.state.step == 4


def poison_one_step(monkeypatch: pytest.MonkeyPatch, run: Any, step: int) -> None:
    """Make the MLM loss NaN in the first micro-batch of 1-based `step` (gradients become NaN too)."""
    import bertpipe.training.loop

    real, fired = bertpipe.training.loop.loss_sums, []

    def loss_sums(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        mlm, nsp = real(*args, **kwargs)
        if run.record.state.step == step - 1 and not fired:
            fired.append(True)
            mlm = mlm * float("nan")
        return mlm, nsp

    monkeypatch.setattr(bertpipe.training.loop, "loss_sums", loss_sums)


def test_nonfinite_loss_names_the_step_and_the_last_good_checkpoint(
        sample_examples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = small_run(sample_examples, tmp_path)
    poison_one_step(monkeypatch, run, step=3)
    with pytest.raises(NonFiniteLoss) as info:
        train(run, NullTracker())
    message = str(info.value)
    assert "\n" not in message
    assert "MLM nan" in message and "at step 3" in message
    assert f"last good checkpoint: {tmp_path / 'checkpoint' / 'step-0000002'}" in message
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-0000002"]


def test_skip_nonfinite_skips_the_batch_and_counts_it(sample_examples: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run = small_run(sample_examples, tmp_path, **{"train.skip_nonfinite": True})
    poison_one_step(monkeypatch, run, step=3)
    train(run, NullTracker())
    metrics = final_metrics(run)
    assert metrics["skipped_steps"] == 1 and metrics["steps"] == 4
    history = np.array([[row["mlm_loss"], row["nsp_loss"], row["lr"]] for row in run.record.history.losses])
    assert np.isnan(history[2, :2]).all()
    assert np.isfinite(np.delete(history, 2, axis=0)).all()
    assert np.isfinite(metrics["train_mlm_loss"]) and np.isfinite(metrics["valid_mlm_loss"])
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    saved = json.loads((tmp_path / "checkpoint" / "step-0000004" / "state.json").read_text())
    assert saved["history"]["skipped_steps"] == 1


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 2147483648 bytes"),
], ids=["cuda", "cpu"])
def test_out_of_memory_names_the_batch_and_suggests_accumulation(
        error: Exception, sample_examples: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bertpipe.training.loop

    def train_step(*args: Any, **kwargs: Any) -> None:
        raise error

    run = small_run(sample_examples, tmp_path)
    monkeypatch.setattr(bertpipe.training.loop, "train_step", train_step)
    with pytest.raises(PipelineError) as info:
        train(run, NullTracker())
    message = str(info.value)
    assert "\n" not in message
    for words in ("out of memory in step 1", "micro-batches of 16 rows", "train.batch_size = 64",
                  "train.micro_batch_size", "accumulate gradients"):
        assert words in message, message
    assert not (tmp_path / "checkpoint").exists()
