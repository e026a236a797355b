"""The optimizer: fused Adam/AdamW (the default on CUDA) makes the multi-tensor path's update."""

from __future__ import annotations

import pytest
import torch

from bertpipe.config import ModelConfig, TrainConfig
from bertpipe.model.bert import BertConfig, BertForPreTraining
from bertpipe.training.optim import build_optimizer


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_fused_update_equals_foreach(optimizer: str) -> None:
    """Three steps on the same gradients: the fused kernel and the foreach path give the same weights."""
    cfg = TrainConfig(optimizer=optimizer, lr=1e-3, weight_decay=0.01)
    config = BertConfig.from_params(ModelConfig(num_hidden_layers=1), vocab_size=50)
    weights = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = BertForPreTraining(config)
        initial = [p.detach().clone() for p in model.parameters()]
        opt = build_optimizer(model, cfg, fused=fused)
        assert all(group["fused" if fused else "foreach"] for group in opt.param_groups)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=generator)
            opt.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    assert max(float((a - b).abs().max()) for a, b in zip(weights[0], initial, strict=True)) > 1e-3  # they moved
    for a, b in zip(*weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_cpu_weights_take_foreach_by_default() -> None:
    model = BertForPreTraining(BertConfig.from_params(ModelConfig(num_hidden_layers=1), vocab_size=50))
    group = build_optimizer(model, TrainConfig()).param_groups[0]
    assert group["foreach"] and not group["fused"]
