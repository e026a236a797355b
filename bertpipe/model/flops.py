"""Counting useful work: model FLOPs per step, and the machine's measured matmul peak.

FLOPs count only real tokens and real prediction slots (padding is not useful work), with the
usual convention of 2 FLOPs per multiply-add and backward = 2 x forward (PaLM's MFU, appendix B):
per layer and token the Q, K, V, output and FFN projections, plus attention's QK^T and AV over
the row's own length; the MLM transform and vocabulary decoder per predicted token; the pooler
and NSP classifier per pair. Model-FLOPs utilisation is that count over time and measured peak.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bertpipe.model.bert import BertConfig


def training_flops(config: BertConfig, lengths: np.ndarray, predictions: int) -> float:
    """FLOPs of one forward + backward over rows of real `lengths` with `predictions` MLM slots."""
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    lengths = np.asarray(lengths, dtype=np.float64)
    per_token = 2 * (4 * h * h + 2 * h * f)
    attention = 2 * 2 * h * float((lengths ** 2).sum())
    encoder = config.num_hidden_layers * (per_token * float(lengths.sum()) + attention)
    mlm = predictions * 2 * (h * h + h * v)
    nsp = len(lengths) * 2 * (h * h + 2 * h)
    return 3.0 * (encoder + mlm + nsp)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, seconds: float = 0.5) -> float:
    """Best observed FLOP/s of a square matmul on `device` in `dtype` (the MFU denominator).

    The default size is 2048 on the CPU and 8192 on CUDA, where a 2048 product is too short to fill
    a large GPU (an H200 reaches about 790 TFLOP/s in bf16 only on products of that order).
    """
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up: kernel selection, caches
    best, deadline, products = 0.0, time.perf_counter() + seconds, 2
    while time.perf_counter() < deadline or best == 0.0:
        _sync(device)
        start = time.perf_counter()
        for _ in range(products):
            torch.matmul(a, b)
        _sync(device)
        best = max(best, products * 2 * size ** 3 / (time.perf_counter() - start))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
