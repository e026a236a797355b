"""The data stages end to end through DVC: `dvc repro examples` in a fresh copy of the pipeline.

The copy holds the data stages of dvc.yaml (download, prepare, examples, as written there),
params.yaml, stages/ and bertpipe/ (the stages' declared deps; the package itself is imported from
its editable install), with `data.source` pointing at the shared WikiText-2 sample. Changing
`examples.max_len` must invalidate `examples` only. Whether the whole dvc.yaml passes DVC's own
schema is a separate, fast test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATA_STAGES = ("download", "prepare", "examples")

pytestmark = pytest.mark.slow


def data_stages() -> dict:
    """The definitions of the data stages in the repository's dvc.yaml."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(DATA_STAGES) <= set(stages), f"dvc.yaml lacks a data stage: {sorted(stages)}"
    return {name: stages[name] for name in DATA_STAGES}


def make_project(folder: Path) -> Path:
    """A folder holding the data stages of the pipeline: dvc.yaml, params.yaml, stages/ and bertpipe/."""
    folder.mkdir()
    (folder / "dvc.yaml").write_text(yaml.safe_dump({"stages": data_stages()}, sort_keys=False))
    shutil.copyfile(REPO / "params.yaml", folder / "params.yaml")
    for name in ("stages", "bertpipe"):
        shutil.copytree(REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return folder


def runner(project: Path, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run a command in `project` with the venv first on PATH and DVC offline, failing on a non-zero exit."""
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
                        "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site-cache")}
    assert Path(shutil.which("python", path=env["PATH"])).parent == BIN  # what DVC runs the stages with

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{args}: {proc.stdout}\n{proc.stderr}"
        return proc

    return run


def test_repro_then_max_len_change_reruns_only_examples(tmp_path: Path, sample_raw: Path,
                                                       write_params: Callable[..., Path]) -> None:
    project = make_project(tmp_path / "project")
    run = runner(project, tmp_path)
    dvc = str(BIN / "dvc")
    run("git", "init", "-q")
    run(dvc, "init", "-q")
    (project / ".dvc" / "config").write_text("[core]\n    analytics = false\n    check_update = false\n")
    write_params(project, {"data.source": str(sample_raw)})

    out = run(dvc, "repro", "examples").stdout
    for stage in DATA_STAGES:
        assert f"Running stage '{stage}'" in out
    assert (project / "data" / "raw" / "wikitext-2" / "wiki.train.tokens").read_bytes() == (
        sample_raw / "wiki.train.tokens").read_bytes()
    assert (project / "data" / "prepared" / "vocab.parquet").is_file()
    assert (project / "data" / "examples" / "train" / "token_ids.npy").is_file()
    metrics = json.loads((project / "metrics" / "examples.json").read_text())
    assert metrics["max_len"] == 64 and metrics["train"]["examples"] > 1000 and metrics["valid"]["examples"] > 1000
    assert set(DATA_STAGES) <= set(yaml.safe_load((project / "dvc.lock").read_text())["stages"])

    write_params(project, {"data.source": str(sample_raw), "examples.max_len": 48})
    status = json.loads(run(dvc, "status", "--json").stdout)
    assert status["examples"] == [{"changed deps": {"params.yaml": {"examples": "modified"}}}]
    assert not {"download", "prepare"} & set(status)

    out = run(dvc, "repro", "examples").stdout
    assert "Stage 'download' didn't change, skipping" in out
    assert "Stage 'prepare' didn't change, skipping" in out
    assert "Running stage 'examples'" in out
    assert "Running stage 'prepare'" not in out and "Running stage 'download'" not in out
    assert json.loads((project / "metrics" / "examples.json").read_text())["max_len"] == 48


def test_dvc_yaml_passes_dvc_schema() -> None:
    from dvc.schema import COMPILED_MULTI_STAGE_SCHEMA  # what DVC validates dvc.yaml with

    COMPILED_MULTI_STAGE_SCHEMA(yaml.safe_load((REPO / "dvc.yaml").read_text()))
