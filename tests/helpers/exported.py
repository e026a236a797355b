"""A tiny BERT checkpointed and exported through the export stage's click command (test_export, test_cli,
test_tokenization, test_mlflow_model)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
from pathlib import Path

import pandas as pd
import torch
import yaml
from click.testing import CliRunner, Result
from conftest import REPO, params_with

from bertpipe.config import ModelConfig
from bertpipe.data.tokenizer import word_tokenizer
from bertpipe.export.encode import Vocab
from bertpipe.model.bert import BertConfig, BertForPreTraining
from bertpipe.training.checkpoint import RunRecord, RunState, capture_rng, save
from bertpipe.vocab import SPECIAL_TOKENS, vocab_digest

WORDS = ("a", "the", "crane", "is", "flying", "driver", "came", "he", "just", "left", "bird", "over", "river", ".")
TOKENS = (*SPECIAL_TOKENS, *WORDS)
MAX_POSITIONS = 16
VOCAB = Vocab(word_tokenizer(TOKENS))
STEP = 7
OUTS = ("models/bert", "data/embeddings", "metrics/export.json")


def tiny_config() -> BertConfig:
    base = BertConfig.from_params(ModelConfig(preset="tiny"), vocab_size=len(TOKENS))
    return dataclasses.replace(base, max_position_embeddings=MAX_POSITIONS)


def tiny_model(seed: int = 0) -> BertForPreTraining:
    """A model whose every weight (LayerNorms, biases, the MLM bias) differs from its init value."""
    torch.manual_seed(seed)
    model = BertForPreTraining(tiny_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def make_project(root: Path, trained_vocab_sha: str | None = None, checkpoint: bool = True,
                 mlflow_run_id: str | None = None) -> Path:
    """params.yaml, data/prepared (vocab.parquet, meta.json) and models/checkpoint/step-0000007 under `root`
    (trained in MLflow run `mlflow_run_id`, when given)."""
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True)
    counts = [0] + [100 - i for i in range(1, len(TOKENS))]
    pd.DataFrame({"id": range(len(TOKENS)), "token": TOKENS, "count": counts}).to_parquet(
        prepared / "vocab.parquet", index=False)
    sha = vocab_digest(TOKENS)
    (prepared / "meta.json").write_text(json.dumps({"vocab_size": len(TOKENS), "vocab_sha256": sha}))
    word_tokenizer(TOKENS).save(str(prepared / "tokenizer.json"))
    if checkpoint:
        model = tiny_model()
        spec = {"model": dataclasses.asdict(model.config), "examples": {"vocab_sha256": trained_vocab_sha or sha}}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        progress = RunRecord(RunState(step=STEP), mlflow_run_id=mlflow_run_id)
        save(root / "models" / "checkpoint", model, optimizer, progress, spec, [capture_rng()], keep=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params_with({}), sort_keys=False))
    return root


def run_stage(root: Path, outs: tuple[str, ...] = OUTS) -> Result:
    """`python stages/export.py models/checkpoint data/prepared <outs>` in `root`, through CliRunner."""
    spec = importlib.util.spec_from_file_location("stage_export", REPO / "stages" / "export.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    with contextlib.chdir(root):
        return CliRunner().invoke(stage.main, ["models/checkpoint", "data/prepared", *outs])


def export_tiny(root: Path) -> Path:
    """A project in `root` with the tiny model exported; returns the HF folder (test_cli uses it too)."""
    result = run_stage(make_project(root))
    assert result.exit_code == 0, result.output
    return root / "models" / "bert"


def pad_batch(encodings: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids, segments [B, T] padded with <pad>/0, and valid_lens [B]."""
    longest = max(len(e) for e in encodings)
    ids = torch.tensor([[*e.ids] + [TOKENS.index("<pad>")] * (longest - len(e)) for e in encodings])
    segments = torch.tensor([[*e.segments] + [0] * (longest - len(e)) for e in encodings])
    return ids, segments, torch.tensor([len(e) for e in encodings])


def one_line_error(result: Result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]
