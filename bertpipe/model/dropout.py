"""Dropout with cheaper randomness on the CPU, where PyTorch's costs a fifth of a training step."""

from __future__ import annotations

import torch
from torch import nn


class Dropout(nn.Dropout):
    """`nn.Dropout` with cheaper randomness on the CPU, where it otherwise costs a fifth of a step.

    PyTorch's CPU dropout draws one random number per element (and inside scaled_dot_product_attention
    a Bernoulli tensor); this draws 64 random bits per eight elements and drops an element when its
    byte is below round(p * 256), so p is rounded to a multiple of 1/256 (0.2 -> 0.1992) and kept values
    are scaled by the exact inverse keep rate: the expectation is preserved. The mask is built with
    integer arithmetic in the input's dtype (values 0 or 1/keep rate), so the product and its gradient
    are same-dtype multiplications; mixed-dtype ones (x * bool) run ten times slower on the CPU.
    GPU kernels are already cheap and are used as they are.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        return x * self.mask(x.shape, x.dtype)

    def mask(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """0 where dropped, 256 / (256 - round(256 p)) where kept."""
        n, threshold = shape.numel(), min(255, round(self.p * 256))
        bits = torch.randint(-(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64).view(torch.int8)[:n]
        dropped = (bits.to(torch.int16) + (128 - threshold)) >> 15  # -1 when the byte (0..255) < threshold
        return dropped.add_(1).to(dtype).mul_(256 / (256 - threshold)).view(shape)
