"""The memory planner: its estimate against measured peak memory, and the verdicts it gives."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import NATIVE_BF16, REPO

from bertpipe.config import ModelConfig, TrainConfig
from bertpipe.errors import PipelineError
from bertpipe.model import memory
from bertpipe.model.bert import BertConfig

CPU = torch.device("cpu")
GiB = memory.GiB
PROBE = REPO / "tests" / "helpers" / "peak_memory.py"


def bert(preset: str = "tiny", layers: int | None = None, vocab: int = 30522) -> BertConfig:
    overrides = {"num_hidden_layers": layers} if layers else {}
    return BertConfig.from_params(ModelConfig(preset=preset, **overrides), vocab)


@pytest.mark.parametrize("preset, layers, rows, seq_len, checkpointing, precision", [
    ("tiny", 2, 128, 64, False, "fp32"),
    ("base", 1, 16, 128, False, "fp32"),
    ("base", 2, 8, 128, True, "fp32"),
    pytest.param("base", 1, 16, 128, False, "bf16", marks=NATIVE_BF16),
    pytest.param("base", 2, 8, 128, True, "bf16", marks=NATIVE_BF16),
])
def test_estimate_is_within_a_quarter_of_measured_peak(preset: str, layers: int, rows: int, seq_len: int,
                                                        checkpointing: bool, precision: str) -> None:
    """Peak resident memory of two real training steps, in a fresh process, against the plan."""
    args = [preset, str(layers), str(rows), str(seq_len), str(int(checkpointing)), precision]
    done = subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.75 <= result["estimated"] / result["measured"] <= 1.25, result


def test_auto_picks_the_largest_micro_batch_that_fits() -> None:
    config, cfg = bert("base"), TrainConfig(micro_batch_size="auto")
    one = memory.plan(config, cfg, 1, 128, 19, CPU, available=0.0)
    budget = 8 * GiB
    chosen = memory.fit_rows(config, cfg, 512, 128, 19, CPU, available=budget)
    assert 1 < chosen.rows < 512
    assert chosen.total <= memory.USABLE * budget
    bigger = memory.plan(config, cfg, chosen.rows + 1, 128, 19, CPU, available=budget)
    assert bigger.total > memory.USABLE * budget
    assert one.activations * chosen.rows == pytest.approx(chosen.activations)


def test_a_micro_batch_that_does_not_fit_names_one_that_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: 8 * GiB)
    with pytest.raises(PipelineError, match=r"train\.micro_batch_size: \d+ \(or auto\) would fit") as info:
        memory.check(bert("base"), TrainConfig(micro_batch_size=512), 512, 128, 19, CPU)
    assert "GiB free on cpu" in str(info.value) and "\n" not in str(info.value)


def test_a_model_too_big_for_the_device_stops_with_the_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: 4 * GiB)
    with pytest.raises(PipelineError, match="does not fit even one example") as info:
        memory.check(bert("large"), TrainConfig(micro_batch_size="auto"), 512, 512, 77, CPU)
    assert "optimizer" in str(info.value) and "smaller model" in str(info.value)


def test_checkpointing_is_offered_when_it_would_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    config = bert("large")
    lean = memory.plan(config, TrainConfig(activation_checkpointing=True), 1, 512, 77, CPU, available=0.0)
    full = memory.plan(config, TrainConfig(), 1, 512, 77, CPU, available=0.0)
    between = (lean.total + full.total) / 2 / memory.USABLE
    monkeypatch.setattr(memory, "available_bytes", lambda device: between)
    with pytest.raises(PipelineError, match="activation_checkpointing: true would fit"):
        memory.check(config, TrainConfig(micro_batch_size="auto"), 512, 512, 77, CPU)


def test_parameter_count_matches_the_model() -> None:
    from bertpipe.model.bert import BertForPreTraining

    for preset in ("tiny", "base", "large"):
        config = bert(preset)
        with torch.device("meta"):
            model = BertForPreTraining(config)
        assert memory.parameter_count(config) == sum(p.numel() for p in model.parameters())

