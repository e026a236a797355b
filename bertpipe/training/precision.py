"""Mixed precision: the module a step computes on, and how its gradients reach the fp32 weights."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from bertpipe.model.bert import BertForPreTraining
from bertpipe.training.distributed import World, unwrap, wrap


@dataclass
class Compute:
    """The fp32 `model` and the `module` a step's forward and backward run on.

    In fp32 the module is the model itself. In bf16 it is a bf16 copy of the model, as FSDP's
    MixedPrecision(param_dtype=bfloat16) runs: the weights are cast once per step (not once per
    matrix product and micro-batch, as autocast does), activations and gradients are bf16, and the
    fp32 model keeps the master weights that the optimizer updates and checkpoints save. Under DDP
    the module is wrapped (`bertpipe.training.distributed.wrap`), so gradients are all-reduced in its dtype.
    """

    model: BertForPreTraining  # fp32: the optimizer's and the checkpoints' weights
    module: nn.Module  # what forward runs on: `model` or its bf16 copy, DDP-wrapped when distributed

    @classmethod
    def build(cls, model: BertForPreTraining, precision: str, world: World) -> Compute:
        copied = copy.deepcopy(model).to(torch.bfloat16) if precision == "bf16" else model
        return cls(model, wrap(copied, world))

    def pull_gradients(self) -> None:
        """The bf16 gradients, as fp32, into the master weights' .grad (nothing to do in fp32)."""
        copied = unwrap(self.module)
        if copied is self.model:
            return
        for master, low in zip(self.model.parameters(), copied.parameters(), strict=True):
            master.grad = None if low.grad is None else low.grad.float()
            low.grad = None

    def push_weights(self) -> None:
        """The updated master weights, cast, into the bf16 copy."""
        copied = unwrap(self.module)
        if copied is self.model:
            return
        with torch.no_grad():
            for master, low in zip(self.model.parameters(), copied.parameters(), strict=True):
                low.copy_(master)
