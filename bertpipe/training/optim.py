"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from bertpipe.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """Adam (the seed's), AdamW or LAMB; weight decay skips biases and LayerNorm weights, as BERT does.

    `fused` (Adam and AdamW; default: when the weights are on CUDA) runs the update as one fused kernel
    per dtype and device instead of the multi-tensor (foreach) path: the same update to rounding
    (tests/training/test_optim.py), with a few launches per step instead of several per parameter group.
    The CPU keeps foreach, the path its golden losses were recorded on.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "lamb":
        return _lamb(groups, cfg.lr)
    optimizer_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    fused = params[0].is_cuda if fused is None else fused
    return optimizer_class(groups, lr=cfg.lr, **({"fused": True} if fused else {"foreach": True}))


def _lamb(groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """pytorch-optimizer's LAMB (You et al. 2020, arXiv:1904.00962): each tensor's Adam-style update scaled
    by the trust ratio ||w|| / ||update||, so large batches can take large learning rates.

    Its betas (0.9, 0.999) and eps 1e-6 are NVIDIA's and Google's BERT recipes'. Weight decay goes into the
    update that the trust ratio scales (`weight_decouple=False`), as in the paper's Algorithm 2 and NVIDIA's
    FusedLAMB, not AdamW-style beside it (the library's default). The rest is the library's, which follows
    cybertronai's pytorch-lamb: ||w|| clamped at 10 in the ratio, and the first moment's bias corrected in
    the step size after the ratio (lr / (1 - beta1^t)), where NVIDIA's FusedLAMB corrects both moments
    before it and clamps nothing. Imported here: pytorch_optimizer imports transformers and
    torch.distributed.tensor (about a second), which Adam runs need not wait for.
    """
    from pytorch_optimizer import Lamb

    return Lamb(groups, lr=lr, weight_decouple=False)


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `cfg.warmup` steps, then constant, linear or cosine decay to 0 at `steps` (over
    the steps after the warm-up), or BERT's polynomial decay `lr * (1 - step / steps) ** poly_power`, which
    counts from step 0 with the warm-up overriding its start, as Google's `optimization.py`
    (`tf.train.polynomial_decay`, power 1) and NVIDIA's `PolyWarmUpScheduler` (degree 0.5) do.
    """
    warmup = cfg.warmup
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "poly":
        return cfg.lr * (1.0 - step / cfg.steps) ** cfg.poly_power
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
