"""The optimizer: fused Adam/AdamW (the default on CUDA) makes the multi-tensor path's update; LAMB's trust ratio
and decay; the learning-rate schedules of BERT's large-batch recipes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from bertpipe.config import ModelConfig, TrainConfig
from bertpipe.model.bert import BertConfig, BertForPreTraining
from bertpipe.training.optim import build_optimizer, get_lr


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_fused_update_equals_foreach(optimizer: str) -> None:
    """Three steps on the same gradients: the fused kernel and the foreach path give the same weights."""
    cfg = TrainConfig(optimizer=optimizer, lr=1e-3, weight_decay=0.01)
    config = BertConfig.from_params(ModelConfig(num_hidden_layers=1), vocab_size=50)
    weights = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = BertForPreTraining(config)
        initial = [p.detach().clone() for p in model.parameters()]
        opt = build_optimizer(model, cfg, fused=fused)
        assert all(group["fused" if fused else "foreach"] for group in opt.param_groups)
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=generator)
            opt.step()
        weights.append([p.detach().clone() for p in model.parameters()])
    assert max(float((a - b).abs().max()) for a, b in zip(weights[0], initial, strict=True)) > 1e-3  # they moved
    for a, b in zip(*weights, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_cpu_weights_take_foreach_by_default() -> None:
    model = BertForPreTraining(BertConfig.from_params(ModelConfig(num_hidden_layers=1), vocab_size=50))
    group = build_optimizer(model, TrainConfig()).param_groups[0]
    assert group["foreach"] and not group["fused"]


def one_step(cfg: TrainConfig, gradient: Callable[[torch.Tensor], torch.Tensor],
             matrix_scales: tuple[float, ...] = (1.0,)) -> tuple[list, list]:
    """The parameters of a 1-layer BERT before and after one step of `cfg`'s optimizer on `gradient(p)`; the
    i-th weight matrix first scaled by matrix_scales[i % len(matrix_scales)]."""
    torch.manual_seed(0)
    model = BertForPreTraining(BertConfig.from_params(ModelConfig(num_hidden_layers=1), vocab_size=50))
    with torch.no_grad():
        for i, p in enumerate(p for p in model.parameters() if p.ndim == 2):
            p.mul_(matrix_scales[i % len(matrix_scales)])
    before = [p.detach().clone() for p in model.parameters()]
    opt = build_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = gradient(p)
    opt.step()
    return before, [p.detach() for p in model.parameters()]


def test_lamb_moves_each_matrix_by_the_same_share_of_its_norm() -> None:
    """LAMB's trust ratio ||w|| / ||update|| (You et al. 2020, Algorithm 2) makes each weight matrix's step the
    same share of its norm; Adam moves every element by about lr whatever the matrix's scale, so on every
    other matrix scaled down tenfold its share is ten times larger. Same weights, same random gradients."""
    generator = torch.Generator()
    shares = {}
    for optimizer in ("adam", "lamb"):
        generator.manual_seed(1)
        before, after = one_step(TrainConfig(optimizer=optimizer, lr=1e-3),
                                 lambda p: torch.randn(p.shape, generator=generator), matrix_scales=(1.0, 0.1))
        shares[optimizer] = [float((a - b).norm() / b.norm()) for b, a in zip(before, after, strict=True)
                             if b.ndim == 2]
    assert max(shares["lamb"]) / min(shares["lamb"]) < 1.001
    assert max(shares["adam"]) / min(shares["adam"]) > 5


def test_lamb_decays_matrices_inside_the_trust_ratio_and_spares_biases_and_layernorm() -> None:
    """With zero gradients LAMB's update is the weight decay alone. Inside the trust ratio (the paper's
    Algorithm 2, NVIDIA's FusedLAMB) the ratio rescales it to the same share of each matrix whatever
    `weight_decay` is; AdamW-style decay beside the ratio (the library's default) would shrink each matrix by
    lr * weight_decay, ten times more at 0.1 than at 0.01. Biases and LayerNorm weights are not decayed."""
    shrink = {}
    for weight_decay in (0.1, 0.01):
        before, after = one_step(TrainConfig(optimizer="lamb", lr=1e-3, weight_decay=weight_decay), torch.zeros_like)
        shrink[weight_decay] = [1 - float(a.norm() / b.norm()) for b, a in zip(before, after, strict=True)
                                if b.ndim == 2]
        for b, a in zip(before, after, strict=True):
            assert b.ndim == 2 or torch.equal(a, b)
    assert min(shrink[0.1]) > 0
    assert shrink[0.1] == pytest.approx(shrink[0.01], rel=1e-3)


def test_nvidias_phase1_schedule() -> None:
    """NVIDIA's BERT LAMB recipe, phase 1 (DeepLearningExamples, PyTorch/LanguageModeling/BERT: run_pretraining.sh
    lr 6e-3, 7038 steps, warmup_proportion 0.2843; schedulers.py PolyWarmUpScheduler, degree 0.5): a linear
    warm-up over ceil(0.2843 * 7038) = 2001 steps, then lr * (1 - step / steps) ** 0.5, counted from step 0
    (NVIDIA counts steps from 1 and warms up over the unrounded 2000.9: the same to within a step)."""
    cfg = TrainConfig(lr=6e-3, steps=7038, warmup_ratio=0.2843, schedule="poly")
    assert cfg.warmup == 2001
    assert get_lr(0, cfg) == pytest.approx(6e-3 / 2001, rel=1e-12)
    assert get_lr(1000, cfg) == pytest.approx(6e-3 * 1001 / 2001, rel=1e-12)
    assert get_lr(2000, cfg) == 6e-3  # the warm-up's last step is at the peak ...
    assert get_lr(2001, cfg) == pytest.approx(6e-3 * (1 - 2001 / 7038) ** 0.5, rel=1e-12)  # ... then 0.846 of it
    assert get_lr(7037, cfg) == pytest.approx(6e-3 * (1 / 7038) ** 0.5, rel=1e-12)


def test_googles_linear_decay_is_poly_power_1() -> None:
    """Google's BERT `optimization.py`: tf.train.polynomial_decay(init_lr, global_step, num_train_steps,
    end_learning_rate=0, power=1.0), the warm-up overriding its first steps."""
    cfg = TrainConfig(lr=1e-4, steps=1000, warmup_steps=10, schedule="poly", poly_power=1.0)
    assert [get_lr(step, cfg) for step in (9, 10, 500, 999)] == pytest.approx([1e-4, 0.99e-4, 0.5e-4, 1e-7],
                                                                               rel=1e-12)


@pytest.mark.parametrize(("steps", "ratio", "warmup"),
                         [(10, 0.25, 3), (30, 0.1, 3), (50, 0.0, 0), (7038, 0.2843, 2001)])
def test_warmup_ratio_is_a_share_of_steps_rounded_up(steps: int, ratio: float, warmup: int) -> None:
    """Hugging Face's rule (ceil); 0.1 * 30 is 3.0000000000000004 in floating point and must still be 3."""
    assert TrainConfig(steps=steps, warmup_ratio=ratio).warmup == warmup
