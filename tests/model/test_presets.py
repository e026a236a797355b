"""BERT-base and BERT-large from params.yaml train a finite step through the pipeline's own run, on the CPU.

One layer each, at a tiny max_len: a preset's width (hidden size, heads, FFN) is what the step exercises, and
each further layer is the same code again. Their full depth and parameter counts are asserted on the meta
device without allocating anything (tests/model/test_model.py, tests/model/test_memory.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_run, params_with

from bertpipe.config import ExamplesConfig, Params, build
from bertpipe.data.examples import build_examples
from bertpipe.model.memory import parameter_count
from bertpipe.training.loop import plan_step, train_step


@pytest.fixture(scope="module")
def short_examples(sample_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Google-style segments of at most 16 tokens: every row full, so every shape is exercised."""
    folder = tmp_path_factory.mktemp("presets") / "examples"
    build_examples(sample_prepared, folder, ExamplesConfig(strategy="segments", max_len=16), seed=0)
    return folder


@pytest.mark.parametrize("preset, hidden, heads, ffn", [("base", 768, 12, 3072), ("large", 1024, 16, 4096)])
def test_preset_trains_a_step(preset: str, hidden: int, heads: int, ffn: int, short_examples: Path,
                              tmp_path: Path) -> None:
    settings = {"model.preset": preset, "model.num_hidden_layers": 1, "mlflow.enabled": False,
                "train.batch_size": 4, "train.steps": 1, "train.eval_every": 0, "train.eval_examples": 8,
                "train.checkpoint_every": 100}
    run = build_run(build(Params, params_with(settings)), short_examples, tmp_path / "checkpoint")
    config = run.bert_config
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (hidden, heads, ffn)
    assert sum(p.numel() for p in run.model.parameters()) == parameter_count(config)
    before = run.model.bert.encoder.layer[0].output.dense.weight.detach().clone()
    plan = plan_step(0, run.train_set, run.params.train, 0, run.world, run.memory.rows)  # the loop's first step,
    losses, skipped = train_step(run.compute, run.optimizer, run.train_set, plan, run.params.train, run.world)
    assert torch.isfinite(losses).all() and not skipped  # without writing a checkpoint
    after = run.model.bert.encoder.layer[0].output.dense.weight
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    with torch.no_grad():
        batch = run.valid_set.batch(np.arange(3))
        out = run.model.eval()(*batch.inputs)
    assert out.sequence_output.shape == (3, batch.input_ids.shape[1], hidden)
    assert out.mlm_logits.shape == (len(batch.mlm_labels), config.vocab_size)
    assert out.nsp_logits.shape == (3, 2)
