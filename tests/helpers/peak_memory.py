"""Peak resident memory of two training steps against the planner's estimate; prints one JSON line.

Run in a fresh process (the kernel's high-water mark is per process): it resets the mark with
/proc/self/clear_refs after the imports and the data, so the peak counts the model, its gradients,
Adam's state and the step's activations, which is what the planner estimates beyond its runtime
allowance. Usage: peak_memory.py PRESET LAYERS ROWS SEQ_LEN CHECKPOINTING(0|1) [PRECISION]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from synthetic import synthetic_examples  # bench/synthetic.py: full-length random examples

from bertpipe.config import ExamplesConfig, ModelConfig, TrainConfig
from bertpipe.model import memory
from bertpipe.model.bert import BertConfig, BertForPreTraining
from bertpipe.training.distributed import World
from bertpipe.training.loop import StepPlan, train_step
from bertpipe.training.optim import build_optimizer
from bertpipe.training.precision import Compute

VOCAB = 8192


def status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def main() -> None:
    preset, layers, rows, seq_len, checkpointing = sys.argv[1], *map(int, sys.argv[2:6])
    precision = sys.argv[6] if len(sys.argv) > 6 else "fp32"
    examples = synthetic_examples(rows, seq_len, VOCAB)
    cfg = TrainConfig(batch_size=rows, precision=precision, activation_checkpointing=bool(checkpointing))
    config = BertConfig.from_params(ModelConfig(preset=preset, num_hidden_layers=layers), VOCAB)
    Path("/proc/self/clear_refs").write_text("5")
    baseline = status("VmRSS")
    model = BertForPreTraining(config)
    model.bert.encoder.gradient_checkpointing = cfg.activation_checkpointing
    optimizer = build_optimizer(model, cfg)
    indices = np.arange(rows)
    plan = StepPlan([indices], examples.predictions(indices), np.full(rows, seq_len))
    world = World(0, 1, 0, torch.device("cpu"))
    compute = Compute.build(model, precision, world)
    for _ in range(2):
        train_step(compute, optimizer, examples, plan, cfg, world)
    slots = ExamplesConfig(max_len=seq_len).max_predictions
    estimate = memory.plan(config, cfg, rows, seq_len, slots, torch.device("cpu"), available=0.0)
    print(json.dumps({"measured": status("VmHWM") - baseline, "estimated": estimate.total - estimate.runtime}))


if __name__ == "__main__":
    main()
