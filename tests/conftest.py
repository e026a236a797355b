"""Shared fixtures: the real WikiText-2 sample, a raw folder in the canonical layout, params.yaml writers.

The sample lives outside the repository, in ../shared/data/wikitext-2 (validation and test splits
only); tests that need it skip when it is absent, and the project never reads it at run time.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers share the machine's cores: one OpenMP thread each (and in the processes they start),
    # or idle OpenMP threads spin against the other worker's. Set before torch is imported, which reads it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
import yaml
from helpers.http_server import Server

from bertpipe.devices import resolve_precision

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: dvc, mlflow, and the python DVC runs the stages with
# BERTPIPE_WIKITEXT points elsewhere, e.g. on a GPU machine that has only a copy (bench/gpu_check.sh).
SHARED_WIKITEXT = Path(os.environ.get("BERTPIPE_WIKITEXT") or REPO.parent / "shared" / "data" / "wikitext-2")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules holding a `slow` test first, so that xdist (--dist loadfile, no reordering) starts the long
    files early and the short ones fill the gaps at the end."""
    slow = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in slow)


@pytest.fixture(autouse=True)
def mlflow_tracking_uri_kept() -> Iterator[None]:
    """`mlflow.set_tracking_uri` sets a process-wide URI and, for subprocesses, MLFLOW_TRACKING_URI: a test that calls
    it (as the stages do in their own process) would point every later test of its pytest worker at its store.
    Both are put back after each test, as a fresh process would find them."""
    environ = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    tracking = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if tracking is not None:
        tracking._tracking_uri = None  # MLflow's own "not set": get_tracking_uri() then reads the environment
    if environ is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = environ


@pytest.fixture(scope="session")
def shared_wikitext() -> Path:
    """The folder holding the real wiki.valid.tokens and wiki.test.tokens; skip the test without it."""
    if not all((SHARED_WIKITEXT / f"wiki.{split}.tokens").is_file() for split in ("valid", "test")):
        pytest.skip(f"needs the WikiText-2 sample in {SHARED_WIKITEXT}")
    return SHARED_WIKITEXT


@pytest.fixture
def sample_raw(shared_wikitext: Path, tmp_path: Path) -> Path:
    """A folder with wiki.{train,valid,test}.tokens, as the download stage writes it.

    The shared sample has no training split: the validation split stands in for train, and the
    test split for both valid and test.
    """
    raw = tmp_path / "raw"
    raw.mkdir()
    for name, split in (("train", "valid"), ("valid", "test"), ("test", "test")):
        shutil.copyfile(shared_wikitext / f"wiki.{split}.tokens", raw / f"wiki.{name}.tokens")
    return raw


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a test's server or rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, server: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    """Until `url` answers (a server the test started, writing to `log`); fail naming its last output."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {seconds} s: {log.read_text()[-3000:]}")


@pytest.fixture
def server() -> Iterator[Server]:
    """A local HTTP server (tests/helpers/http_server.py) for the test's downloads, on a thread of its own."""
    srv = Server()
    thread = threading.Thread(target=srv.httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with a SQLite backend and artifacts it serves itself, for the session. Like a
    server with a hard limit, it refuses over-long values (MLFLOW_TRUNCATE_LONG_VALUES=false) instead of cutting."""
    port, folder = free_port(), tmp_path_factory.mktemp("mlflow_server")
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_TRUNCATE_LONG_VALUES": "false"}
    with open(folder / "server.log", "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", server, folder / "server.log")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started
        server.wait(timeout=30)


def params_with(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The repository's params.yaml as a dict (read as DVC reads it), with dotted keys set to new values."""
    from ruamel.yaml import YAML

    params = YAML(typ="safe").load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        node = params
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    return params


# Every float key of params.yaml, written as people and `dvc exp run -S` write numbers: an exponent
# without a decimal point, which YAML 1.2 (DVC) reads as a float and YAML 1.1 (PyYAML) as a string.
EXPONENT_FORMS = {"examples.mask_prob": "15e-2", "examples.mask_token_prob": "8e-1",
                  "examples.random_token_prob": "1e-1", "examples.short_seq_prob": "1e-1",
                  "model.hidden_dropout_prob": "2e-1", "model.attention_probs_dropout_prob": "2e-1",
                  "model.layer_norm_eps": "1e-12", "model.initializer_range": "2e-2", "train.lr": "5e-5",
                  "train.weight_decay": "1e-2", "train.grad_clip": "1e0", "downstream.lr": "1e-4",
                  "downstream.warmup_ratio": "1e-1", "downstream.weight_decay": "1e-2",
                  "train.warmup_ratio": "2843e-4", "train.poly_power": "5e-1"}


@pytest.fixture
def write_params() -> Callable[..., Path]:
    """`write_params(folder, {"train.lr": 0})` writes folder/params.yaml and returns its path."""

    def write(folder: Path, overrides: Mapping[str, Any] | None = None) -> Path:
        path = Path(folder) / "params.yaml"
        path.write_text(yaml.safe_dump(params_with(overrides or {}), sort_keys=False), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def sample_prepared(shared_wikitext: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/prepared built once per session from the sample (validation split as train, test as valid)."""
    from bertpipe.config import PrepareConfig
    from bertpipe.data.prepare import prepare

    root = tmp_path_factory.mktemp("sample_pipeline")
    raw = root / "raw"
    raw.mkdir()
    for name, split in (("train", "valid"), ("valid", "test"), ("test", "test")):
        shutil.copyfile(shared_wikitext / f"wiki.{split}.tokens", raw / f"wiki.{name}.tokens")
    prepare(raw, root / "prepared", PrepareConfig())
    return root / "prepared"


@pytest.fixture(scope="session")
def sample_examples(sample_prepared: Path) -> Path:
    """data/examples built once per session from the sample (default params: max_len 64, seed 0)."""
    from bertpipe.config import ExamplesConfig
    from bertpipe.data.examples import build_examples

    build_examples(sample_prepared, sample_prepared.parent / "examples", ExamplesConfig(), seed=0)
    return sample_prepared.parent / "examples"


# The pretrain stage run as DVC runs it: a subprocess in a folder holding params.yaml (test_resume.py,
# test_bad_inputs.py). One thread per process: results are the same run to run either way, and a stage
# does not slow down tenfold with OpenMP spinning against whatever else uses the second core.
# Precision is pinned to fp32: `auto` is bf16 on CPUs with AVX-512 BF16/AMX and fp32 elsewhere, and
# the tests that compare numbers must mean the same thing on every CPU (bf16 has tests of its own).
PRETRAIN_OUTS = (
    "models/checkpoint", "metrics/pretrain.json", "plots/loss.csv", "plots/loss.png", "plots/valid.csv")
SMALL_PRETRAIN = {"train.batch_size": 64, "train.steps": 8, "train.checkpoint_every": 2, "train.keep_checkpoints": 2,
                  "train.eval_every": 0, "train.eval_examples": 256, "train.device": "cpu", "train.precision": "fp32",
                  "mlflow.enabled": False, "mlflow.system_metrics": False}
NATIVE_BF16 = pytest.mark.skipif(resolve_precision("auto", torch.device("cpu")) != "bf16",
                                 reason="needs native bf16 (AVX-512 BF16 or AMX); emulated bf16 is ~100x slower")
STAGE_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def pretrain_folder(folder: Path, examples: Path, overrides: Mapping[str, Any] | None = None) -> Path:
    """`folder` laid out as the pipeline root for the pretrain stage: an `examples` link and params.yaml."""
    folder.mkdir(parents=True)
    (folder / "examples").symlink_to(examples)
    params = params_with({**SMALL_PRETRAIN, **(overrides or {})})
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return folder


def run_pretrain(folder: Path, env: Mapping[str, str] = STAGE_ENV) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(REPO / "stages" / "pretrain.py"), "examples", *PRETRAIN_OUTS]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="session")
def pretrained_folder(sample_examples: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where the pretrain stage ran uninterrupted with SMALL_PRETRAIN (dropout on): checkpoints
    step-0000006 and step-0000008, metrics and plots. Tests copy it before changing anything."""
    folder = pretrain_folder(tmp_path_factory.mktemp("pretrained") / "run", sample_examples)
    done = run_pretrain(folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def pretrain_params(params: Any) -> set[str]:
    """The params keys the pretrain run logs to MLflow: all but the fine-tuning's (bertpipe/training/pretrain.py)."""
    from bertpipe.config import flatten

    return {key for key in flatten(params) if not key.startswith("downstream.")}


# The downstream stage in the pipeline tests: a labelled task drawn from the WikiText sample
# (tests/helpers/labelled.py, `labelled_task` writes it), one seed, one epoch, on the CPU in fp32, in the
# stage's own process (worker processes start in seconds, longer than these runs take; tests/downstream has them).
SMALL_DOWNSTREAM = {"downstream.seeds": [0], "downstream.epochs": 1, "downstream.batch_size": 16,
                    "downstream.lr": 1e-3, "downstream.device": "cpu", "downstream.precision": "fp32",
                    "downstream.processes": 1}


@pytest.fixture(scope="session")
def labelled_task(shared_wikitext: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labelled folder (train.csv, validation.csv: heading or text), made once per session."""
    from helpers.labelled import heading_task

    return heading_task(shared_wikitext, tmp_path_factory.mktemp("labelled") / "headings", train=64, validation=32)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """In-process training on one thread, like the stage subprocesses; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_run(params: Any, examples: Path, checkpoint_dir: Path, device: str = "cpu") -> Any:
    """An in-process pretrain Run on `device`, its "auto" settings resolved as the stage resolves them."""
    from bertpipe.data.examples_folder import read_meta as examples_meta
    from bertpipe.resolve import resolve
    from bertpipe.training.distributed import World
    from bertpipe.training.pretrain import resume, setup, trajectory

    meta = examples_meta(examples)
    resolved, memory = resolve(params, meta)
    bert_config, work = trajectory(resolved, meta, checkpoint_dir)
    run = setup(resolved, memory, examples, meta, bert_config, work, World(0, 1, 0, torch.device(device)))
    resume(run)
    return run


def small_run(examples: Path, folder: Path, **overrides: Any) -> Any:
    """An in-process pretrain Run with SMALL_PRETRAIN for 4 steps, checkpointing into folder/checkpoint."""
    from bertpipe.config import Params, build

    params = build(Params, params_with({**SMALL_PRETRAIN, "train.steps": 4, **overrides}))
    return build_run(params, examples, folder / "checkpoint")


# A copy of the pipeline that DVC runs (test_pipeline_dvc.py, test_experiments.py): dvc.yaml, params.yaml,
# stages/, bertpipe/ (the stages' declared deps; the package itself is imported from its editable install)
# and the repository's ignore files, so git tracks exactly what it tracks in a clone.
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore")


def make_project(folder: Path, stages: Mapping[str, Any] | None = None) -> Path:
    """The pipeline in `folder`; `stages` replaces dvc.yaml's stages (e.g. the data stages only)."""
    folder.mkdir()
    for name in PROJECT_FILES:
        shutil.copyfile(REPO / name, folder / name)
    if stages is not None:
        (folder / "dvc.yaml").write_text(yaml.safe_dump({"stages": dict(stages)}, sort_keys=False))
    for name in ("stages", "bertpipe"):
        shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return folder


def runner(project: Path, tmp_path: Path, env: Mapping[str, str] | None = None,
           timeout: float = 120) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run a command in `project` with the venv first on PATH and DVC offline, failing on a non-zero exit."""
    env = {**(env or os.environ), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
           "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site-cache")}
    assert Path(shutil.which("python", path=env["PATH"])).parent == BIN  # what DVC runs the stages with

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{args}: {proc.stdout}\n{proc.stderr}"
        return proc

    return run


DATA_STAGES = ("init", "download", "prepare", "examples")  # init: prepare reads models/init (empty: a marker)


def data_stages() -> dict:
    """The definitions of the data stages in the repository's dvc.yaml."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(DATA_STAGES) <= set(stages), f"dvc.yaml lacks a data stage: {sorted(stages)}"
    return {name: stages[name] for name in DATA_STAGES}
