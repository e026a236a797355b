"""The `tasks` and `downstream` stages as DVC runs them, on a real labelled task (tests/helpers/labelled.py):
fine-tuning from the export and from a random start, the report and the MLflow runs, both tokenizers,
resuming after a kill, and each bad input as one line that leaves the earlier outputs as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import yaml
from conftest import REPO, STAGE_ENV, params_with
from helpers.forked_stage import run_stage
from helpers.labelled import export, heading_task
from helpers.one_line import one_error_line

from bertpipe.config import DownstreamConfig
from bertpipe.downstream.finetune import encode, finetune
from bertpipe.downstream.tasks import read_tasks

pytestmark = pytest.mark.slow
RECIPE = {"downstream.tasks": ["./headings"], "downstream.seeds": [0, 1], "downstream.epochs": 2,
          "downstream.batch_size": 16, "downstream.lr": 1e-3, "downstream.device": "cpu",
          "downstream.precision": "fp32", "mlflow.enabled": False}
OUTS = ["data/tasks", "metrics/downstream.json"]


def write_params(folder: Path, overrides: dict) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(params_with(overrides), sort_keys=False), encoding="utf-8")


def run_tasks(folder: Path, env: dict = STAGE_ENV) -> subprocess.CompletedProcess[str]:
    return run_stage(REPO / "stages" / "tasks.py", ["data/tasks"], folder, env)


def run_downstream(folder: Path, env: dict = STAGE_ENV) -> subprocess.CompletedProcess[str]:
    args = ["models/bert", "data/tasks", "metrics/export.json", "metrics/downstream.json"]
    return run_stage(REPO / "stages" / "downstream.py", args, folder, env, timeout=300)


@pytest.fixture(scope="module")
def project(shared_wikitext: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out as the pipeline's root: the heading task in ./headings, an export of a tiny BERT over
    its words, params.yaml with a small recipe; the tasks stage run, not yet the downstream stage."""
    folder = tmp_path_factory.mktemp("downstream") / "project"
    task = heading_task(shared_wikitext, folder / "headings", train=160, validation=60)
    texts = [*pd.read_csv(task / "train.csv")["text"], *pd.read_csv(task / "validation.csv")["text"]]
    export(folder / "models" / "bert", texts)
    (folder / "metrics").mkdir()
    (folder / "metrics" / "export.json").write_text("{}")
    write_params(folder, RECIPE)
    done = run_tasks(folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def finished(project: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """A copy of `project` where the downstream stage ran, into a fresh MLflow store whose run it completes."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("finished") / "project"
    shutil.copytree(project, folder)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("bertpipe"), run_name="pretrain")
    (folder / "metrics" / "export.json").write_text(json.dumps({"mlflow_run_id": run.info.run_id}))
    write_params(folder, {**RECIPE, "mlflow.enabled": True})
    done = run_downstream(folder, {**STAGE_ENV, "MLFLOW_TRACKING_URI": uri})
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, done


def test_fine_tuning_beats_the_majority_class_and_reports_the_floor(finished: tuple) -> None:
    folder, done = finished
    report = json.loads((folder / "metrics" / "downstream.json").read_text())
    headings = report["headings"]
    assert headings["seeds"] == 2 and headings["train_examples"] == 160
    assert 0 < headings["unk_fraction"] < 0.1  # WikiText's own <unk> marks, which the vocabulary reads as unknown
    assert headings["accuracy"] > headings["majority"]["accuracy"] + 20  # learnt, from the export ...
    assert headings["random_init"]["accuracy"] > headings["majority"]["accuracy"] + 20  # ... and from scratch
    assert {"accuracy_spread", "macro_f1", "score", "minutes", "examples_per_sec"} <= set(headings)
    assert "glue_score" not in report  # your own task is reported beside GLUE's aggregate, not in it
    assert "headings pretrained seed 1: accuracy" in done.stderr and "random init" in done.stderr


def test_the_scores_complete_the_pretrain_run_with_a_child_run_per_fine_tuning(finished: tuple) -> None:
    from mlflow.tracking import MlflowClient

    folder, _ = finished
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("bertpipe").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`mlflow.runName` = 'pretrain'")
    report = json.loads((folder / "metrics" / "downstream.json").read_text())
    assert parent.data.metrics["downstream/headings/accuracy"] == report["headings"]["accuracy"]
    assert parent.data.metrics["downstream/headings/random_init/accuracy"] == report["headings"]["random_init"][
        "accuracy"]
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == [f"headings {init} seed {s}" for init in
                                                         ("pretrained", "random") for s in (0, 1)]
    child = children[0]
    assert child.data.params["downstream.lr"] == "0.001" and child.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(child.info.run_id, "accuracy")] == [1, 2]  # per epoch
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"downstream.json"}


def test_words_the_export_cannot_read_are_counted(project: Path, tmp_path: Path) -> None:
    """A vocabulary that lacks half the task's words: unk_fraction says so ([CLS] and [SEP] not counted)."""
    (task,) = read_tasks(project / "data" / "tasks")
    words = sorted({w for text in task.read("train")["text"] for w in text.lower().split()})
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(export(tmp_path / "bert", words[::2]))
    data = encode(tokenizer, task, 128)
    train = [w for text in task.read("train")["text"] for w in text.lower().split()]
    assert data.unk_fraction == pytest.approx(sum(w not in set(words[::2]) for w in train) / len(train))
    assert 0.2 < data.unk_fraction < 0.8


def test_a_wordpiece_export_fine_tunes_too(project: Path, tmp_path: Path) -> None:
    (task,) = read_tasks(project / "data" / "tasks")
    texts = [*task.read("train")["text"], *task.read("validation")["text"]]
    from transformers import AutoTokenizer

    model_dir = export(tmp_path / "bert", texts, tokenizer="wordpiece")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert type(tokenizer).__name__.startswith("BertTokenizer")  # BERT's own class, as for Google's checkpoints
    data = encode(tokenizer, task, 128)
    cfg = DownstreamConfig(**{k.removeprefix("downstream."): v for k, v in RECIPE.items() if "downstream" in k})
    torch.set_num_threads(1)
    outcome = finetune(model_dir, task, data, cfg, 0, "pretrained", torch.device("cpu"), "fp32",
                       tokenizer.pad_token_id)
    assert data.unk_fraction == 0.0 and outcome.scores["accuracy"] > 75 and len(outcome.epochs) == 2


def test_a_checkpoint_without_a_pooler_fine_tunes_and_one_without_its_encoder_is_one_line(project: Path,
                                                                                         tmp_path: Path) -> None:
    """A Hub checkpoint may hold no pooler whatever its config.json's `architectures` says: the classifier starts one
    afresh. A missing encoder tensor is an error naming the stage that writes the folder."""
    from safetensors.torch import load_file, save_file

    from bertpipe.downstream.finetune import DownstreamError, load_classifier

    (task,) = read_tasks(project / "data" / "tasks")
    folder = tmp_path / "init"
    shutil.copytree(project / "models" / "bert", folder)
    weights = {k: v for k, v in load_file(folder / "model.safetensors").items() if not k.startswith("bert.pooler.")}
    save_file(weights, folder / "model.safetensors")
    assert load_classifier(folder, task, "pretrained").bert.pooler is not None
    save_file({k: v for k, v in weights.items() if "layer.0.output" not in k}, folder / "model.safetensors")
    with pytest.raises(DownstreamError, match=r"lacks weights .*bert\.encoder\.layer\.0\.output.*; rerun the stage"):
        load_classifier(folder, task, "pretrained")


def finished_runs(kept: Path) -> list[str]:
    """The runs kept as finished; a kill may also leave a result's temporary file (a dot name), which is not one."""
    return sorted(p.name for p in kept.iterdir() if not p.name.startswith(".")) if kept.is_dir() else []


def test_a_killed_stage_does_not_redo_the_runs_it_finished(project: Path, tmp_path: Path) -> None:
    folder = tmp_path / "project"
    shutil.copytree(project, folder)
    kept = folder / ".bertpipe" / "downstream"
    command = [sys.executable, str(REPO / "stages" / "downstream.py"), "models/bert", "data/tasks",
               "metrics/export.json", "metrics/downstream.json"]
    first = subprocess.Popen(command, cwd=folder, env=STAGE_ENV, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    deadline = time.monotonic() + 120
    while not finished_runs(kept) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    finished = finished_runs(kept)
    assert 1 <= len(finished) < 4 and not (folder / "metrics" / "downstream.json").exists()

    done = run_downstream(folder)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("finished earlier") == len(finished)
    assert done.stderr.count("examples/s)") == 4 - len(finished)  # the runs fine-tuned this time
    assert len(finished_runs(kept)) == 4
    assert json.loads((folder / "metrics" / "downstream.json").read_text())["headings"]["seeds"] == 2


def start_stage(folder: Path) -> tuple[subprocess.Popen, list[str]]:
    """The downstream stage in its own session, its stderr lines collected as they come."""
    command = [sys.executable, str(REPO / "stages" / "downstream.py"), "models/bert", "data/tasks",
               "metrics/export.json", "metrics/downstream.json"]
    stage = subprocess.Popen(command, cwd=folder, env=STAGE_ENV, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(stage.stderr), daemon=True).start()
    return stage, lines


def until(condition: Callable[[], bool], stage: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and stage.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def test_an_interrupt_stops_the_workers_with_130_and_one_line(project: Path, tmp_path: Path) -> None:
    """Ctrl-C while two workers fine-tune: `Stopped:` and exit 130, as the pretrain stage does, no traceback."""
    folder = tmp_path / "project"
    shutil.copytree(project, folder)
    stage, lines = start_stage(folder)
    until(lambda: len(psutil.Process(stage.pid).children()) >= 2, stage)  # the pool's workers
    workers = psutil.Process(stage.pid).children()
    stage.send_signal(signal.SIGINT)
    stage.wait(timeout=60)
    err = "".join(lines)
    assert stage.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("Stopped: stopped by SIGINT") and "Traceback" not in err
    _, alive = psutil.wait_procs(workers, timeout=15)  # one still starting stops once its start-up is done
    assert not [w for w in alive if w.status() != psutil.STATUS_ZOMBIE]


def test_workers_die_with_a_killed_stage(project: Path, tmp_path: Path) -> None:
    """kill -9 of the stage alone (an OOM kill): its workers get the parent-death signal, none trains on."""
    folder = tmp_path / "project"
    shutil.copytree(project, folder)
    stage, _ = start_stage(folder)
    until(lambda: len(psutil.Process(stage.pid).children()) >= 2, stage)
    workers = psutil.Process(stage.pid).children()
    assert len(workers) >= 2
    stage.kill()
    stage.wait()
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not [w for w in alive if w.status() != psutil.STATUS_ZOMBIE]  # a zombie awaits its reaper, idle


def spoil_task(folder: Path, change: Callable[[pd.DataFrame], pd.DataFrame], split: str = "validation") -> None:
    path = folder / "headings" / f"{split}.csv"
    change(pd.read_csv(path)).to_csv(path, index=False)


def fake_cola_zip(size: int) -> Callable[[Path], None]:
    """downstream.source holding a CoLA.zip of `size` zero bytes (GLUE's has 376,971)."""

    def spoil(folder: Path) -> None:
        (folder / "glue").mkdir()
        (folder / "glue" / "CoLA.zip").write_bytes(bytes(size))
        write_params(folder, {**RECIPE, "downstream.tasks": ["cola"], "downstream.source": "glue"})

    return spoil


def positions(folder: Path, n: int) -> None:
    config = folder / "models" / "bert" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_position_embeddings": n}))


# stage, how a copy of the finished project is spoilt, what the one error line names
CASES = {
    "unknown task": ("tasks", lambda f: write_params(f, {**RECIPE, "downstream.tasks": ["colaa"]}),
                     ("downstream.tasks[0]", "'colaa'", "GLUE task")),
    "checksum mismatch": ("tasks", fake_cola_zip(376_971), ("checksum mismatch for CoLA.zip", "expected sha256:f212")),
    "truncated file": ("tasks", fake_cola_zip(1000), ("CoLA.zip has 1,000 bytes", "GLUE's has 376,971")),
    "no label column": ("tasks", lambda f: spoil_task(f, lambda d: d.rename(columns={"label": "class"}), "train"),
                        ("headings/train.csv", "no column label")),
    "no text column": ("tasks", lambda f: spoil_task(f, lambda d: d.rename(columns={"text": "sentence"})),
                       ("headings/validation.csv", "no column text")),
    "unseen label": ("tasks", lambda f: spoil_task(f, lambda d: d.assign(label=d["label"].where(d.index > 0, "odd"))),
                     ("validation.csv", "'odd'", "never has")),
    "empty split": ("tasks", lambda f: spoil_task(f, lambda d: d[:0]), ("validation.csv", "no rows")),
    "max_len beyond the params' positions": (
        "downstream", lambda f: write_params(f, {**RECIPE, "downstream.max_len": 1024}),
        ("downstream.max_len = 1024", "model.max_position_embeddings (512)")),
    "max_len beyond the export's positions": ("downstream", lambda f: positions(f, 64),
                                              ("downstream.max_len = 128", "max_position_embeddings (64")),
    "no export": ("downstream", lambda f: shutil.rmtree(f / "models" / "bert"),
                  ("models/bert/config.json does not exist", "export")),
}


def snapshot(folder: Path) -> dict[str, str]:
    files = [p for out in OUTS for p in ([folder / out] if (folder / out).is_file() else (folder / out).rglob("*"))
             if p.is_file()]
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def outcomes(finished: tuple, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Every case in its own copy of the finished project, two at a time: (result, outputs before, after)."""
    root = tmp_path_factory.mktemp("bad")

    def one(name: str) -> tuple:
        folder = root / name.replace(" ", "-").replace("'", "")
        shutil.copytree(finished[0], folder)
        stage, spoil, _ = CASES[name]
        spoil(folder)
        before = snapshot(folder)
        done = (run_tasks if stage == "tasks" else run_downstream)(folder)
        return done, before, snapshot(folder)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CASES, pool.map(one, CASES), strict=True))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_keeps_earlier_results(outcomes: dict, case: str) -> None:
    done, before, after = outcomes[case]
    one_error_line(done, *CASES[case][2])
    assert after == before and any(name.startswith("metrics/downstream.json") for name in before)


def test_a_continued_run_reports_the_checkpoint_it_started_from(project: Path, tmp_path: Path) -> None:
    """With a checkpoint in models/init (model.init), every seed also fine-tunes it: a third row, `init`, beside
    the export and the random start. Here the start is the export with every weight zero: its encoder says the same
    of every input, so its row scores as one class for all at best, while the export's beats that."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "project"
    shutil.copytree(project, folder)
    start = folder / "models" / "init"
    shutil.copytree(folder / "models" / "bert", start)
    weights = load_file(start / "model.safetensors")
    save_file({key: torch.zeros_like(tensor) for key, tensor in weights.items()}, start / "model.safetensors")
    (start / "init.json").write_text(json.dumps({"model": "start", "weights_sha256": "0" * 64}))
    write_params(folder, {**RECIPE, "downstream.seeds": [0], "downstream.processes": 1})
    args = ["models/bert", "data/tasks", "metrics/export.json", "metrics/downstream.json", "--init", "models/init"]
    done = run_stage(REPO / "stages" / "downstream.py", args, folder, STAGE_ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((folder / "metrics" / "downstream.json").read_text())["headings"]
    assert set(report["init"]) == {"accuracy", "macro_f1", "score"}
    constant = max(report["majority"]["accuracy"], 100 - report["majority"]["accuracy"])  # one class for all (2)
    assert report["init"]["accuracy"] <= constant < report["accuracy"], report
    assert "headings init seed 0" in done.stderr
