"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from bertpipe.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """Adam (the seed's) or AdamW; weight decay skips biases and LayerNorm weights, as BERT does.

    `fused` (default: when the weights are on CUDA) runs the update as one fused kernel per dtype and
    device instead of the multi-tensor (foreach) path: the same update to rounding (tests/training/test_optim.py),
    with a few launches per step instead of several per parameter group. The CPU keeps foreach, the
    path its golden losses were recorded on.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    fused = params[0].is_cuda if fused is None else fused
    return optimizer_class(groups, lr=cfg.lr, **({"fused": True} if fused else {"foreach": True}))


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then constant, linear or cosine decay to 0 at `steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
