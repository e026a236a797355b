"""On a GPU: the training step, its CUDA levers and the memory planner; skipped on machines without CUDA."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from torch.nn.attention import SDPBackend, sdpa_kernel

from bertpipe.config import ExamplesConfig, ModelConfig, TrainConfig
from bertpipe.devices import resolve_precision
from bertpipe.model import memory
from bertpipe.model.bert import BertConfig, BertForPreTraining
from bertpipe.training.distributed import World
from bertpipe.training.loop import StepPlan, loss_sums, train_step
from bertpipe.training.optim import build_optimizer
from bertpipe.training.precision import Compute

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
sys.path.insert(0, str(REPO / "bench"))
from synthetic import synthetic_examples  # noqa: E402  (bench/synthetic.py: random examples)

CUDA = World(0, 1, 0, torch.device("cuda"))
NO_DROPOUT = ModelConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def step_losses(device: str, precision: str) -> torch.Tensor:
    examples = synthetic_examples(32, 64, 1000)
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig.from_params(NO_DROPOUT, 1000)).to(device)
    cfg = TrainConfig(batch_size=32, precision=precision)
    indices = np.arange(32)
    plan = StepPlan([indices[:16], indices[16:]], examples.predictions(indices), np.full(32, 64))
    world = World(0, 1, 0, torch.device(device))
    losses, skipped = train_step(Compute.build(model, precision, world), build_optimizer(model, cfg), examples,
                                 plan, cfg, world)
    assert not skipped
    return losses.float().cpu()


def test_auto_precision_is_bf16_on_gpus_that_have_it() -> None:
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == expected


def test_gpu_step_matches_cpu() -> None:
    torch.testing.assert_close(step_losses("cuda", "fp32"), step_losses("cpu", "fp32"), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step_losses("cuda", "bf16"), step_losses("cpu", "fp32"), rtol=0.02, atol=0.02)


def bf16_model(layers: int = 2) -> BertForPreTraining:
    torch.manual_seed(0)
    config = BertConfig.from_params(ModelConfig(preset="base", num_hidden_layers=layers), 1000)
    return BertForPreTraining(config).to("cuda", torch.bfloat16)


def test_batches_without_padding_take_the_flash_kernel() -> None:
    """Full rows arrive without a key mask (Batch.to on CUDA), and the model's forward and backward then run
    with SDPA restricted to its flash kernel, which refuses a mask: the lever is real, not a fallback."""
    batch = synthetic_examples(8, 128, 1000).batch(np.arange(8)).to(torch.device("cuda"))
    assert batch.valid_lens is None
    model = bf16_model()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        mlm, nsp = loss_sums(model(*batch.inputs), batch)
        (mlm + nsp).backward()
        masked = torch.full((8,), 128, device="cuda")
        with pytest.raises(RuntimeError):
            model(batch.input_ids, batch.token_type_ids, masked, batch.masked_positions)


def test_no_mask_equals_the_full_mask_on_cuda() -> None:
    examples = synthetic_examples(8, 128, 1000)
    model = bf16_model().eval()
    host = examples.batch(np.arange(8))
    with torch.no_grad():
        unmasked, masked = (loss_sums(model(*batch.inputs), batch) for batch in
                            (host.to(torch.device("cuda")), host.to(torch.device("cuda"), unmask_full=False)))
    torch.testing.assert_close(torch.stack(unmasked), torch.stack(masked), rtol=1e-2, atol=1e-2)


def test_fused_adam_is_the_cuda_default() -> None:
    model = BertForPreTraining(BertConfig.from_params(NO_DROPOUT, 100)).cuda()
    assert all(group["fused"] for group in build_optimizer(model, TrainConfig()).param_groups)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_planner_does_not_underestimate_cuda_memory(precision: str) -> None:
    """The planner's estimate (less its runtime allowance) against torch.cuda.max_memory_allocated over two
    steps of BERT-base (2 layers, 32 x 128): it may overestimate (it counts what the math kernel would keep),
    but an estimate below the peak would let `auto` pick a micro-batch that runs out of memory."""
    rows, seq_len, vocab = 32, 128, 8192
    config = BertConfig.from_params(ModelConfig(preset="base", num_hidden_layers=2), vocab)
    cfg = TrainConfig(batch_size=rows, precision=precision)
    examples = synthetic_examples(rows, seq_len, vocab)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model = BertForPreTraining(config).cuda()
    compute, optimizer = Compute.build(model, precision, CUDA), build_optimizer(model, cfg)
    indices = np.arange(rows)
    plan = StepPlan([indices], examples.predictions(indices), np.full(rows, seq_len))
    for _ in range(2):
        train_step(compute, optimizer, examples, plan, cfg, CUDA)
    measured = torch.cuda.max_memory_allocated() - start
    slots = ExamplesConfig(max_len=seq_len).max_predictions
    estimate = memory.plan(config, cfg, rows, seq_len, slots, torch.device("cuda"), available=0.0)
    ratio = (estimate.total - estimate.runtime) / measured
    print(f"{precision}: measured {measured / memory.GiB:.3f} GiB, estimate ratio {ratio:.2f}")
    assert 0.9 <= ratio <= 3.0

