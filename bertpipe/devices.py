"""Where and in what precision a stage computes: "auto" settled from the machine (CUDA, native bf16).

`train.device`/`train.precision` (by way of `bertpipe.resolve`) and `downstream.device`/`downstream.precision`
are settled here, and nowhere else.
"""

from __future__ import annotations

import torch

from bertpipe.errors import ConfigError


def resolve_device(preference: str, key: str = "train.device") -> torch.device:
    """`train.device` (or the params key `key`): auto = CUDA when present, else the CPU."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError(key, preference, "auto or cpu: no CUDA device is visible here")
    use_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`train.precision` or `downstream.precision`: auto = bf16 where the hardware computes it natively, else fp32.

    CPUs without AVX-512 BF16 or AMX emulate bf16 matrix products about 100x slower than fp32.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
