"""Will a training step fit? An estimate of its peak memory, made before anything is allocated.

Peak = fp32 parameters + their gradients + Adam's two moments (+ in bf16 the compute copy of the
weights and its gradients, `bertpipe.training.precision.Compute`) + the activations autograd keeps for one
micro-batch at full width (max_len) + a fixed allowance (the runtime, the CUDA context).
Activations per token and layer count what this model saves for its backward pass: the layer
input, Q/K/V, attention context, the two LayerNorm inputs and outputs, the FFN's GELU input and
output, the softmax output and dropped probabilities (heads x max_len per token), each in the
compute dtype, and the dropout masks (in the compute dtype on the CPU, one byte on GPUs). With activation
checkpointing only each layer's input stays, plus one layer recomputed at a time; the backward pass
adds one layer's worth of gradients. The MLM head keeps its transform, and the fp32 logits and
log-probabilities over the vocabulary (and, in the backward pass, their gradients) per prediction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from bertpipe.config import TrainConfig
from bertpipe.errors import PipelineError
from bertpipe.model.bert import BertConfig

GiB = 1024**3
USABLE = 0.9  # leave a tenth of the free memory for the allocator's slack and everything else
RUNTIME = {"cpu": 0.6 * GiB, "cuda": 1.0 * GiB}  # Python + torch's CPU runtime; CUDA context + workspaces


@dataclass(frozen=True)
class MemoryPlan:
    """A step's estimated peak memory (bytes) for micro-batches of `rows` x `seq_len` tokens."""

    device: str
    rows: int
    seq_len: int
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    runtime: float
    available: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.runtime

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GiB:.2f}" for name in
                          ("parameters", "gradients", "optimizer", "activations", "runtime"))
        return (f"estimated peak {self.total / GiB:.2f} GiB for micro-batches of {self.rows} x {self.seq_len} tokens "
                f"({parts} GiB); {self.available / GiB:.1f} GiB free on {self.device}, "
                f"{USABLE * self.available / GiB:.1f} GiB usable")


def parameter_count(config: BertConfig) -> int:
    """Trainable parameters of BertForPreTraining (the tied decoder counted once)."""
    h, f, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    embeddings = (v + config.max_position_embeddings + config.type_vocab_size) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * f + f) + (f * h + h) + 2 * h
    heads = (h * h + h) + (h * h + h) + 2 * h + v + (2 * h + 2)  # pooler, transform, LayerNorm, bias, NSP
    return embeddings + layers * layer + heads


def activation_bytes(config: BertConfig, rows: int, seq_len: int, predictions: int, precision: str,
                     checkpointing: bool) -> float:
    """Bytes autograd keeps for one micro-batch of `rows` examples at full width."""
    h, f, a, v = config.hidden_size, config.intermediate_size, config.num_attention_heads, config.vocab_size
    low = 2 if precision == "bf16" else 4  # bytes per element of activations and CPU dropout masks
    per_layer = low * (6 * h + 2 * f + 2 * a * seq_len + 4 * h) + low * (2 * h + a * seq_len)
    embeddings = low * 2 * h + low * h
    tokens = rows * seq_len
    kept_layers = 1 if checkpointing else config.num_hidden_layers
    layer_inputs = 4 * h * config.num_hidden_layers if checkpointing else 0
    backward_workspace = per_layer  # gradients of one layer's activations, alive while it is differentiated
    encoder = tokens * (layer_inputs + per_layer * kept_layers + backward_workspace)
    head = rows * predictions * (low * 4 * h + 4 * 4 * v)  # logits, log-probabilities and both their gradients
    return tokens * embeddings + encoder + head


def available_bytes(device: torch.device) -> float:
    """Free memory for this process: the GPU's free memory, or the host's MemAvailable shared by
    the processes of this node (LOCAL_WORLD_SIZE under torchrun)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    available = int(fields["MemAvailable"].split()[0]) * 1024
    return available / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def plan(config: BertConfig, cfg: TrainConfig, rows: int, seq_len: int, predictions: int,
         device: torch.device, available: float | None = None) -> MemoryPlan:
    """The estimate for micro-batches of `rows` examples.

    Adam keeps two fp32 moments per parameter, and its multi-tensor step a third temporary one. In bf16
    the weights and gradients also exist as a bf16 copy (2 bytes each per parameter).
    """
    n = parameter_count(config)
    copy = 2.0 * n if cfg.precision == "bf16" else 0.0
    return MemoryPlan(device=str(device), rows=rows, seq_len=seq_len, parameters=4.0 * n + copy,
                      gradients=4.0 * n + copy,
                      optimizer=12.0 * n, runtime=RUNTIME[device.type],
                      activations=activation_bytes(config, rows, seq_len, predictions, cfg.precision,
                                                   cfg.activation_checkpointing),
                      available=available_bytes(device) if available is None else available)


def fit_rows(config: BertConfig, cfg: TrainConfig, rows: int, seq_len: int, predictions: int,
             device: torch.device, available: float | None = None) -> MemoryPlan:
    """The largest micro-batch (at most `rows`) whose step fits; PipelineError with the numbers if none does."""
    full = plan(config, cfg, rows, seq_len, predictions, device, available)
    budget = USABLE * full.available - (full.total - full.activations)
    per_row = full.activations / rows
    fitting = min(rows, int(budget // per_row)) if budget > 0 else 0
    if fitting < 1:
        one = plan(config, cfg, 1, seq_len, predictions, device, full.available)
        raise PipelineError(f"a training step does not fit even one example: {one.describe()}; "
                            f"{_advice(config, cfg, seq_len, predictions, device, full.available)}")
    return plan(config, cfg, fitting, seq_len, predictions, device, full.available)


def check(config: BertConfig, cfg: TrainConfig, rows: int, seq_len: int, predictions: int,
          device: torch.device) -> MemoryPlan:
    """Plan the run's micro-batch: `auto` picks the largest that fits; a given size must fit."""
    if cfg.micro_batch_size == "auto":
        return fit_rows(config, cfg, rows, seq_len, predictions, device)
    wanted = plan(config, cfg, rows, seq_len, predictions, device)
    if wanted.total <= USABLE * wanted.available:
        return wanted
    fits = fit_rows(config, cfg, rows, seq_len, predictions, device, wanted.available)
    raise PipelineError(f"a training step does not fit: {wanted.describe()}; train.micro_batch_size: "
                        f"{fits.rows} (or auto) would fit, accumulating gradients to train.batch_size")


def _advice(config: BertConfig, cfg: TrainConfig, seq_len: int, predictions: int, device: torch.device,
            available: float) -> str:
    """What would make one example fit, if anything does."""
    if not cfg.activation_checkpointing:
        lean = cfg.model_copy(update={"activation_checkpointing": True})
        if plan(config, lean, 1, seq_len, predictions, device, available).total <= USABLE * available:
            return "train.activation_checkpointing: true would fit"
    return "use a smaller model or examples.max_len, or a device with more memory"
