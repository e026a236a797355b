"""On a GPU: the training step in bf16 matches the CPU's fp32 step; skipped on machines without CUDA."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from bertpipe.config import ModelConfig, TrainConfig
from bertpipe.distributed import World
from bertpipe.model import BertConfig, BertForPreTraining
from bertpipe.optim import build_optimizer
from bertpipe.precision import Compute
from bertpipe.resolve import resolve_precision
from bertpipe.step import StepPlan, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def step_losses(device: str, precision: str) -> torch.Tensor:
    sys.path.insert(0, str(REPO / "bench"))
    from synthetic import synthetic_examples  # bench/synthetic.py: random full-length examples

    examples = synthetic_examples(32, 64, 1000)
    torch.manual_seed(0)
    config = BertConfig.from_params(ModelConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), 1000)
    model = BertForPreTraining(config).to(device)
    cfg = TrainConfig(batch_size=32, precision=precision)
    indices = np.arange(32)
    plan = StepPlan([indices[:16], indices[16:]], examples.predictions(indices), np.full(32, 64))
    world = World(0, 1, 0, torch.device(device))
    losses, skipped = train_step(Compute.build(model, precision, world), build_optimizer(model, cfg), examples,
                                 plan, cfg, world)
    assert not skipped
    return losses.float().cpu()


def test_auto_precision_is_bf16_on_gpus_that_have_it() -> None:
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == expected


def test_gpu_step_matches_cpu() -> None:
    torch.testing.assert_close(step_losses("cuda", "fp32"), step_losses("cpu", "fp32"), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step_losses("cuda", "bf16"), step_losses("cpu", "fp32"), rtol=0.02, atol=0.02)
