"""Mixed precision: the module a step computes on, and how its gradients reach the fp32 weights."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bertpipe.model.bert import BertForPreTraining
from bertpipe.training.distributed import World


@dataclass
class Compute:
    """The module a step's forward and backward run on, and the way its gradients reach the weights.

    In fp32 it is the model itself. In bf16 it is a bf16 copy of the model, as FSDP's
    MixedPrecision(param_dtype=bfloat16) runs: the weights are cast once per step (not once per
    matrix product and micro-batch, as autocast does), activations and gradients are bf16, and the
    fp32 model keeps the master weights that the optimizer updates and checkpoints save. Under DDP
    the module is wrapped, so gradients are all-reduced in its dtype.
    """

    model: BertForPreTraining  # fp32: the optimizer's and the checkpoints' weights
    module: nn.Module  # what forward runs on: `model` or its bf16 copy, DDP-wrapped when distributed

    @classmethod
    def build(cls, model: BertForPreTraining, precision: str, world: World) -> Compute:
        replica = copy.deepcopy(model).to(torch.bfloat16) if precision == "bf16" else model
        if not world.distributed:
            return cls(model, replica)
        device_ids = [world.device.index] if world.device.type == "cuda" else None
        return cls(model, DistributedDataParallel(replica, device_ids=device_ids))

    @property
    def replica(self) -> nn.Module:
        return self.module.module if isinstance(self.module, DistributedDataParallel) else self.module

    def pull_gradients(self) -> None:
        """The bf16 gradients, as fp32, into the master weights' .grad (nothing to do in fp32)."""
        if self.replica is self.model:
            return
        for master, low in zip(self.model.parameters(), self.replica.parameters(), strict=True):
            master.grad = None if low.grad is None else low.grad.float()
            low.grad = None

    def push_weights(self) -> None:
        """The updated master weights, cast, into the bf16 copy."""
        if self.replica is self.model:
            return
        with torch.no_grad():
            for master, low in zip(self.model.parameters(), self.replica.parameters(), strict=True):
                low.copy_(master)
