"""Continued pretraining through `dvc repro` (README: Continued pretraining): a BERT folder as `model.init`,
read with its own tokenizer, trained a few steps, exported under its own names and numbering, so that
transformers loads the export with the starting checkpoint's tokenizer unchanged; the MLflow run says what it
started from."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from conftest import BIN, REPO, make_project, runner
from helpers.checkpoints import bert_folder, sample_lines

from bertpipe.cli import main

pytestmark = pytest.mark.slow
STAGES = ("init", "download", "prepare", "examples", "pretrain", "export")
SENTENCES = ["The crane flew over Zürich.", "a CRANE driver came", "naïve café déjà-vu, 東京 and Ελλάδα!"]


def test_a_checkpoint_continued_through_dvc_loads_where_it_did(tmp_path: Path, sample_raw: Path,
                                                                write_params: Callable[..., Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    checkpoint = bert_folder(tmp_path / "uncased", sample_lines(sample_raw), head="BertForMaskedLM")
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    project = make_project(tmp_path / "project", {name: stages[name] for name in STAGES})
    run = runner(project, tmp_path, timeout=300)
    dvc = str(BIN / "dvc")
    run("git", "init", "-q")
    run(dvc, "init", "-q")
    write_params(project, {"data.source": str(sample_raw), "model.init": str(checkpoint),
                           "prepare.tokenizer": "pretrained", "train.batch_size": 32, "train.steps": 2,
                           "train.lr": 2e-5, "train.eval_every": 0, "train.eval_examples": 64, "train.device": "cpu",
                           "train.precision": "fp32", "mlflow.system_metrics": False})
    done = run(dvc, "repro")
    assert all(f"Running stage '{stage}'" in done.stdout for stage in STAGES)
    assert "has no bert.pooler.dense.bias, bert.pooler.dense.weight, cls.seq_relationship.bias" in done.stderr
    init = json.loads((project / "metrics" / "init.json").read_text())
    assert init["init"] == str(checkpoint) and len(init["weights_sha256"]) == 64
    assert "metrics/init.json" in (project / "dvc.lock").read_text()

    export = project / "models" / "bert"
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        assert (export / name).read_bytes() == (checkpoint / name).read_bytes(), name
    ours, theirs = AutoTokenizer.from_pretrained(export), AutoTokenizer.from_pretrained(checkpoint)
    assert ours(SENTENCES, SENTENCES[::-1])["input_ids"] == theirs(SENTENCES, SENTENCES[::-1])["input_ids"]
    model = AutoModelForMaskedLM.from_pretrained(export)
    assert model.config.pad_token_id == theirs.pad_token_id == 0
    assert model.get_input_embeddings().weight.shape == (len(theirs), 32)
    tables = project / "data" / "embeddings"  # in the export's numbering, as transformers reads models/bert
    tokens = pd.read_parquet(tables / "tokens.parquet")
    assert tokens["id"].tolist() == theirs.convert_tokens_to_ids(tokens["token"].tolist()) == list(range(len(theirs)))
    assert np.allclose(np.stack(tokens["vector"]), model.get_input_embeddings().weight.detach().numpy(), atol=1e-6)
    contextual = pd.read_parquet(tables / "contextual.parquet")
    assert contextual["id"].tolist() == theirs.convert_tokens_to_ids(contextual["token"].tolist())
    filled = CliRunner().invoke(main, ["fill-mask", "the [MASK] flew", "--top-k", "5", "--model", str(export)])
    assert filled.exit_code == 0, filled.output
    assert filled.output.startswith("[MASK] at position 2:") and "[UNK]" not in filled.output  # as transformers reads

    pretrain = json.loads((project / "metrics" / "pretrain.json").read_text())
    assert json.loads((export / "bertpipe.json").read_text()) == {"mlflow_run_id": pretrain["mlflow_run_id"], "step": 2}
    mlflow_run = MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(pretrain["mlflow_run_id"])
    assert mlflow_run.data.params["model.init"] == str(checkpoint)
    assert mlflow_run.data.params["model.hidden_size"] == "32"  # the checkpoint's shape, not the preset's
    assert mlflow_run.data.tags["bertpipe.init_weights_sha256"] == init["weights_sha256"]
