"""bertpipe/model/flops.py: the useful-FLOPs count behind MFU, and the measured matmul peak."""

from __future__ import annotations

import numpy as np
import torch

from bertpipe.config import ModelConfig
from bertpipe.model.bert import BertConfig
from bertpipe.model.flops import matmul_peak, training_flops


def test_training_flops_follow_the_formula_and_count_real_tokens_only() -> None:
    """3 x forward (backward = 2 x forward); per layer and token 2(4h^2 + 2hf), attention 4h T^2 per row."""
    config = BertConfig.from_params(ModelConfig(), vocab_size=1000)
    h, f, v, layers = 128, 256, 1000, 2
    lengths = np.array([10, 30])
    encoder = layers * (2 * (4 * h * h + 2 * h * f) * 40 + 4 * h * (10**2 + 30**2))
    heads = 7 * 2 * (h * h + h * v) + 2 * 2 * (h * h + 2 * h)
    assert training_flops(config, lengths, predictions=7) == 3.0 * (encoder + heads)
    assert training_flops(config, np.array([10, 30, 0]), 7) > training_flops(config, lengths, 7)  # one more pair


def test_matmul_peak_is_a_positive_rate() -> None:
    peak = matmul_peak(torch.device("cpu"), torch.float32, size=256, seconds=0.05)
    assert 1e8 < peak < 1e15  # FLOP/s
