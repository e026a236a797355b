"""The training loop in-process: the masked MLM loss, work splitting, golden losses, eval, resume.

`BERTPIPE_TEST_DEVICE=cuda` runs them on a GPU (bench/gpu_check.sh does); the CPU is the default.
"""

from __future__ import annotations

import itertools
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, build_run, params_with
from safetensors.torch import load_file

from bertpipe.config import Params, TrainConfig, build
from bertpipe.devices import resolve_precision
from bertpipe.errors import Interrupted
from bertpipe.tracking import NullTracker
from bertpipe.training.batches import Examples, _epoch_order, global_batch
from bertpipe.training.distributed import World, unwrap
from bertpipe.training.loop import Run, evaluate, loss_sums, plan_step, train, train_step
from bertpipe.training.optim import get_lr
from bertpipe.training.pretrain import final_metrics

DEVICE = torch.device(os.environ.get("BERTPIPE_TEST_DEVICE", "cpu"))
WORLD = World(0, 1, 0, DEVICE)
GOLDEN = REPO / "tests" / "assets"
# On the CPU every kernel is deterministic; on CUDA attention's backward and index additions sum in
# whatever order their threads finish, so "the same" means within rounding there.
EXACT = DEVICE.type == "cpu"
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
NATIVE_BF16 = pytest.mark.skipif(resolve_precision("auto", DEVICE) != "bf16",
                                 reason=f"needs native bf16 on {DEVICE.type} (AVX-512 BF16 or AMX on a CPU)")


def make_run(examples: Path, folder: Path, **overrides: object) -> Run:
    """An in-process Run of 5 steps at batch 64, in fp32 unless `train.precision` says otherwise."""
    settings = {"mlflow.enabled": False, "train.batch_size": 64, "train.steps": 5, "train.eval_every": 0,
                "train.eval_examples": 256, "train.precision": "fp32", "train.device": DEVICE.type, **overrides}
    return build_run(build(Params, params_with(settings)), examples, folder / "checkpoint", DEVICE.type)


def assert_same(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> None:
    """Equal on the CPU; on CUDA within 1e-4 relative (see EXACT)."""
    if EXACT:
        assert np.array_equal(np.asarray(a), np.asarray(b))
    else:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def losses_of(run: Run) -> np.ndarray:
    """The run's per-step [MLM, NSP] losses."""
    return np.array([[row["mlm_loss"], row["nsp_loss"]] for row in run.record.history.losses])


def test_mlm_loss_averages_real_predictions_only(sample_examples: Path, tmp_path: Path) -> None:
    run = make_run(sample_examples, tmp_path)
    run.model.eval()
    arrays = Examples.load(sample_examples / "train").arrays
    indices = np.arange(48)
    with torch.no_grad():
        batch = run.train_set.batch(indices).to(DEVICE)
        mlm_sum, _ = loss_sums(run.model(*batch.inputs), batch)
        dense = dense_slot_losses(run, arrays, indices)
    weights = torch.from_numpy(arrays["mlm_weights"][indices].astype(np.float32)).to(DEVICE)
    assert weights.sum() < weights.numel()  # the batch has padded slots
    real_mean = (dense * weights).sum() / weights.sum()
    torch.testing.assert_close(mlm_sum / weights.sum(), real_mean, rtol=1e-5, atol=1e-5)
    seed_formula = (dense.mean() * weights).sum() / weights.sum()  # d2l's mean-then-weight (d2l-en#2582)
    assert abs(float(seed_formula - real_mean)) > 1e-3


def dense_slot_losses(run: Run, arrays: dict[str, np.ndarray], indices: np.ndarray) -> torch.Tensor:
    """Cross-entropy at every prediction slot, padded ones included, from logits at all positions."""
    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(arrays[name][indices].astype(np.int64)).to(DEVICE)

    ids = tensor("token_ids")
    rows, width = ids.shape
    out = run.model(ids, tensor("segments"), tensor("valid_lens"), torch.arange(rows * width, device=DEVICE))
    logits = out.mlm_logits.view(rows, width, -1)
    positions, labels = tensor("pred_positions"), tensor("mlm_labels")
    slot_logits = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))
    return F.cross_entropy(slot_logits.flatten(0, 1), labels.flatten(), reduction="none").view(rows, -1)


def test_padded_prediction_slots_do_not_change_the_batch(sample_examples: Path) -> None:
    examples = Examples.load(sample_examples / "train")
    scrambled = {name: np.array(array) for name, array in examples.arrays.items()}
    padding = scrambled["mlm_weights"] == 0
    rng = np.random.default_rng(0)
    scrambled["pred_positions"][padding] = rng.integers(1, 40, padding.sum())
    scrambled["mlm_labels"][padding] = rng.integers(5, 1000, padding.sum())
    indices = np.arange(100)
    for a, b in zip(examples.batch(indices), Examples(scrambled).batch(indices), strict=True):
        assert torch.equal(a, b)


def test_splitting_the_batch_does_not_change_the_step(sample_examples: Path, tmp_path: Path) -> None:
    results = []
    for micro in (64, 16):
        run = make_run(sample_examples, tmp_path / str(micro), **{"model.hidden_dropout_prob": 0.0,
                                                                    "model.attention_probs_dropout_prob": 0.0,
                                                                    "train.lr": 1e-3})
        plan = plan_step(0, run.train_set, run.params.train, run.params.seed, WORLD, micro)
        assert len(plan.micro_batches) == 64 // micro
        losses, _ = train_step(run.compute, run.optimizer, run.train_set, plan, run.params.train, WORLD)
        results.append((losses, [p.detach().clone() for p in run.model.parameters()]))
    (losses_a, params_a), (losses_b, params_b) = results
    torch.testing.assert_close(losses_a, losses_b, rtol=1e-6, atol=1e-6)
    for a, b in zip(params_a, params_b, strict=True):  # lr 1e-3: Adam scales summation noise in ~0 gradients by lr
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_rounded_shapes_change_nothing_but_rounding(sample_examples: Path, tmp_path: Path) -> None:
    """Micro-batches padded to a width multiple of 16 and a prediction multiple of 64 (few distinct shapes,
    so oneDNN reuses its kernels) give the exact shapes' losses and gradients, to fp32 rounding."""
    run = make_run(sample_examples, tmp_path)
    run.model.eval()  # dropout off: the same function of the weights either way
    indices = np.flatnonzero(np.asarray(run.train_set.lengths) < 43)[:37]  # 42 tokens at most: room to pad
    results = []
    for multiples in ((1, 1), (16, 64)):
        run.model.zero_grad()
        batch = run.train_set.batch(indices, width_multiple=multiples[0], prediction_multiple=multiples[1]).to(DEVICE)
        mlm, nsp = loss_sums(run.model(*batch.inputs), batch)
        (mlm + nsp).backward()
        results.append((batch, torch.stack([mlm, nsp]).detach(), [p.grad.clone() for p in run.model.parameters()]))
    (exact, losses_a, grads_a), (rounded, losses_b, grads_b) = results
    assert rounded.input_ids.shape[1] % 16 == 0 and len(rounded.mlm_labels) % 64 == 0
    assert rounded.input_ids.shape[1] > exact.input_ids.shape[1] and len(rounded.mlm_labels) > len(exact.mlm_labels)
    torch.testing.assert_close(losses_a, losses_b, rtol=1e-6, atol=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):  # embedding rows sum ~10^4 terms in another order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@NATIVE_BF16
def test_bf16_computes_on_a_copy_and_keeps_fp32_master_weights(sample_examples: Path, tmp_path: Path) -> None:
    run = make_run(sample_examples, tmp_path, **{"train.precision": "bf16", "train.steps": 2})
    train(run, NullTracker())
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    for master, low in zip(run.model.parameters(), unwrap(run.compute.module).parameters(), strict=True):
        assert low.dtype == torch.bfloat16 and torch.equal(low, master.detach().to(torch.bfloat16))
    saved = load_file(tmp_path / "checkpoint" / "step-0000002" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}


# Measured on one Xeon (AMX-BF16) under every oneDNN ISA cap (AVX2, AVX512_CORE, AVX512_CORE_BF16,
# AVX512_CORE_AMX) and 1 or 2 threads, against the recorded curves: fp32 differs by at most 1.0e-6
# (summation order), bf16 by at most 4.3e-3 (the NSP loss of step 5; bf16 rounds every product and
# each kernel rounds differently). The tolerances are ~10x and ~2.5x that; bf16 differs from fp32 by 1.4e-2.
GOLDEN_RTOL = {"fp32": 1e-5, "bf16": 1e-2}
# On CUDA dropout draws other masks than our CPU dropout. Eight other dropout streams on the CPU (fp32,
# the same data and initial weights) moved the curve by at most 2.3% (MLM) and 21% (NSP, a noisy loss
# at lr 0.01 and batch 64): CUDA's curve must stay within about twice that of the CPU's golden one.
CUDA_GOLDEN_RTOL = np.array([0.05, 0.4])


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=NATIVE_BF16)])
def test_golden_losses(precision: str, sample_examples: Path, tmp_path: Path) -> None:
    """Same params, same losses (exactly); and the curve of tests/assets/losses_tiny_<precision>.txt."""
    curves = []
    for attempt in range(2):
        run = make_run(sample_examples, tmp_path / str(attempt), **{"train.precision": precision})
        train(run, NullTracker())
        curves.append(losses_of(run))
    assert_same(curves[0], curves[1])
    golden = GOLDEN / f"losses_tiny_{precision}.txt"
    if os.environ.get("BERTPIPE_WRITE_GOLDEN") and EXACT:
        np.savetxt(golden, curves[0], fmt="%.6f", header=f"mlm_loss nsp_loss; 5 steps, batch 64, seed 0, {precision}")
    if EXACT:
        np.testing.assert_allclose(curves[0], np.loadtxt(golden), rtol=GOLDEN_RTOL[precision])
    else:
        assert (np.abs(curves[0] / np.loadtxt(golden) - 1) <= CUDA_GOLDEN_RTOL).all(), (curves[0], np.loadtxt(golden))


def test_evaluation_is_deterministic_and_leaves_train_mode(sample_examples: Path, tmp_path: Path) -> None:
    run = make_run(sample_examples, tmp_path)
    first = evaluate(run.model, run.valid_set, 300, WORLD)
    second = evaluate(run.model, run.valid_set, 300, WORLD)
    assert first == second
    assert run.model.training
    assert 0.0 <= first["valid_mlm_acc"] <= 1.0 and first["valid_mlm_loss"] > 0


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_schedules(schedule: str) -> None:
    cfg = TrainConfig(lr=1.0, steps=10, warmup_steps=2, schedule=schedule)
    lrs = [get_lr(step, cfg) for step in range(10)]
    assert lrs[:2] == [0.5, 1.0]
    if schedule == "constant":
        assert lrs[2:] == [1.0] * 8
    else:
        assert all(a > b for a, b in itertools.pairwise(lrs[2:])) and lrs[-1] < 0.25


class _StopAfter(NullTracker):
    """Sends this process SIGTERM once the loop has logged `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_checkpoints_and_resume_is_bit_identical(sample_examples: Path, tmp_path: Path) -> None:
    settings = {"train.steps": 6, "train.checkpoint_every": 5}
    straight = make_run(sample_examples, tmp_path / "straight", **settings)
    train(straight, NullTracker())
    stopped = make_run(sample_examples, tmp_path / "resumed", **settings)
    with pytest.raises(Interrupted, match="after step 4"):  # the signal lands during step 3's logging
        train(stopped, _StopAfter(3))
    resumed = make_run(sample_examples, tmp_path / "resumed", **settings)
    assert resumed.record.state.step == 4
    train(resumed, NullTracker())
    assert_same(losses_of(resumed), losses_of(straight))
    if EXACT:  # on CUDA rounding differences in near-zero gradients move Adam's weights by up to lr / 2
        for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(),
                                strict=True):
            assert torch.equal(a, b), name


def test_checkpoint_of_other_settings_is_not_resumed(sample_examples: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    train(make_run(sample_examples, tmp_path, **{"train.steps": 4, "train.checkpoint_every": 2}), NullTracker())
    fresh = make_run(sample_examples, tmp_path, **{"train.steps": 3, "model.hidden_size": 64})
    assert fresh.record.state.step == 0
    assert "model.hidden_size: 128 -> 64" in caplog.text
    folder = tmp_path / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000002", "step-0000004"]  # kept until replaced
    train(fresh, NullTracker())
    assert sorted(p.name for p in folder.iterdir()) == ["step-0000003"]


def test_micro_batches_cover_the_global_batch(sample_examples: Path, tmp_path: Path) -> None:
    run = make_run(sample_examples, tmp_path)  # batch 64
    plan = plan_step(3, run.train_set, run.params.train, 0, WORLD, 10)
    sizes = [len(micro) for micro in plan.micro_batches]
    assert sizes == [10] * 6 + [4]
    assert len(np.unique(np.concatenate(plan.micro_batches))) == 64


def test_an_epoch_uses_every_example_once(sample_examples: Path, tmp_path: Path) -> None:
    """Length buckets and rank shares regroup a global batch, never change which examples it holds."""
    run = make_run(sample_examples, tmp_path)
    per_epoch = len(run.train_set) // 64
    seen = []
    for step in range(per_epoch):
        for rank in range(3):
            world = World(rank, 3, rank, torch.device("cpu"))
            seen += [np.concatenate(plan_step(step, run.train_set, run.params.train, 0, world, 7).micro_batches)]
    seen = np.concatenate(seen)
    assert len(seen) == len(np.unique(seen)) == per_epoch * 64


@NATIVE_BF16
def test_bf16_tracks_fp32(sample_examples: Path, tmp_path: Path) -> None:
    """20 steps of a small model: bf16 autocast losses stay within 0.05 of fp32's at every step."""
    curves = {}
    for precision in ("fp32", "bf16"):
        run = make_run(sample_examples, tmp_path / precision, **{
            "train.precision": precision, "train.steps": 20, "train.batch_size": 16, "train.checkpoint_every": 100,
            "model.hidden_size": 64, "model.num_hidden_layers": 1, "model.intermediate_size": 128})
        train(run, NullTracker())
        curves[precision] = losses_of(run)
    assert np.abs(curves["fp32"] - curves["bf16"]).max() <= 0.05


def test_each_copy_is_an_epoch_in_turn() -> None:
    """With train.epoch_per_copy, epoch e is copy e % copies: each copy's rows once per epoch, copies in turn."""
    epochs = ((0, 100), (100, 220))  # 2 and 2 steps of 50
    steps = [global_batch(step, epochs, 50, seed=0) for step in range(8)]
    for step, (start, stop) in zip(range(0, 8, 2), (*epochs, *epochs), strict=True):
        rows = np.concatenate(steps[step:step + 2])
        assert len(np.unique(rows)) == 100 and rows.min() >= start and rows.max() < stop
    assert not np.array_equal(np.sort(steps[0]), np.sort(steps[4]))  # round 2 of copy 0: another order
    assert not np.array_equal(global_batch(5, epochs, 50, seed=1), steps[5])  # the seed draws the order


def test_a_global_batch_is_a_function_of_seed_and_step() -> None:
    """What a resumed run relies on: step 13's batch drawn from scratch (no permutation cached, no step
    before it taken) is the one a run that took every step before it got."""
    epochs = ((0, 500),)  # 10 steps per epoch: step 13 is the 4th of the second epoch
    taken = [global_batch(step, epochs, 50, seed=0) for step in range(14)]
    _epoch_order.cache_clear()
    np.testing.assert_array_equal(global_batch(13, epochs, 50, seed=0), taken[13])
    first_epoch = np.concatenate(taken[:10])
    assert np.array_equal(np.sort(first_epoch), np.arange(500))  # an epoch: every row once
    assert not np.array_equal(taken[13], taken[3])  # the second epoch is another permutation


def test_the_best_checkpoint_is_kept_and_reported(sample_examples: Path, tmp_path: Path) -> None:
    """Held-out MLM loss at every evaluation; the lowest one's checkpoint survives keep_checkpoints = 1."""
    run = make_run(sample_examples, tmp_path, **{"train.steps": 6, "train.eval_every": 2, "train.lr": 0.01,
                                                 "train.checkpoint_every": 100, "train.keep_checkpoints": 1})
    train(run, NullTracker())
    evaluations = np.array([[row["step"], row["valid_mlm_loss"]] for row in run.record.history.evaluations])
    assert evaluations[:, 0].tolist() == [2, 4, 6]
    best = int(evaluations[np.argmin(evaluations[:, 1]), 0])
    assert best < 6, evaluations  # the seed's lr overshoots here: the best is early, so pruning is tested
    assert (run.record.state.best_step, run.record.state.best_valid_mlm_loss) == (best, evaluations[:, 1].min())
    kept = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert kept == sorted({f"step-{best:07d}", "step-0000006"})
    metrics = final_metrics(run)
    assert (metrics["best_step"], metrics["valid_mlm_loss"]) == (best, evaluations[-1, 1])
