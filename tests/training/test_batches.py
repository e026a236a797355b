"""bertpipe/training/batches.py: which examples a step takes, on which rank, in which micro-batch shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bertpipe.errors import DataError
from bertpipe.training.batches import IGNORE_INDEX, Examples, global_batch, micro_batches, rank_share


def examples(rows: int = 20, max_len: int = 40, k: int = 6) -> Examples:
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 30, rows)
    weights = (np.arange(k) < rng.integers(1, k + 1, rows)[:, None]).astype(np.uint8)
    arrays = {"token_ids": rng.integers(5, 100, (rows, max_len)), "segments": np.zeros((rows, max_len), np.uint8),
              "valid_lens": lengths, "pred_positions": rng.integers(1, 5, (rows, k)), "mlm_weights": weights,
              "mlm_labels": rng.integers(5, 100, (rows, k)), "nsp_labels": rng.integers(0, 2, rows)}
    return Examples(arrays)


def test_batch_shapes_are_rounded_and_padding_predictions_are_ignored() -> None:
    data = examples()
    indices = np.arange(7)
    batch = data.batch(indices)
    longest = int(data.lengths[indices].max())
    assert batch.input_ids.shape == (7, min(40, -(-longest // 16) * 16))
    real = int(data.arrays["mlm_weights"][indices].sum())
    assert len(batch.mlm_labels) == 64 and (batch.mlm_labels[real:] == IGNORE_INDEX).all()
    assert (batch.mlm_labels[:real] != IGNORE_INDEX).all()


def test_an_epoch_covers_every_example_once_and_ranks_split_it() -> None:
    order = np.concatenate([global_batch(step, ((0, 100),), 25, seed=3) for step in range(4)])
    assert sorted(order) == list(range(100))
    lengths = np.arange(25)[::-1]
    shares = [rank_share(np.arange(25), lengths, rank, 3) for rank in range(3)]
    assert sorted(np.concatenate(shares)) == list(range(25)) and [len(s) for s in shares] == [9, 8, 8]
    assert [len(m) for m in micro_batches(shares[0], 4)] == [4, 4, 1]


def test_too_few_examples_for_a_batch_is_a_data_error() -> None:
    with pytest.raises(DataError, match="only 10 training examples per epoch"):
        global_batch(0, ((0, 10),), 25, seed=0)


def test_a_batch_without_padding_drops_its_key_mask_where_asked() -> None:
    """`Batch.to(device, unmask_full=True)` (the default on CUDA) sends valid_lens None only when every row
    fills the batch's width; the CPU keeps the mask by default."""
    cpu = torch.device("cpu")
    full = examples()
    full.arrays["valid_lens"][:] = 40
    padded = examples()
    assert full.batch(np.arange(4)).to(cpu, unmask_full=True).valid_lens is None
    assert full.batch(np.arange(4)).to(cpu).valid_lens is not None
    kept = padded.batch(np.arange(4)).to(cpu, unmask_full=True)
    assert torch.equal(kept.valid_lens, torch.from_numpy(padded.lengths[:4].astype(np.int64)))
