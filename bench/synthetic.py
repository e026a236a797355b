"""Random examples in the pipeline's layout, for throughput and memory measurements that need no data."""

from __future__ import annotations

import numpy as np

from bertpipe.training.batches import Examples


def synthetic_examples(rows: int, max_len: int, vocab: int, mask_prob: float = 0.15, fill: float = 1.0,
                       seed: int = 0) -> Examples:
    """`<cls> a <sep> b <sep>` rows of random words, round(mask_prob * max_len) prediction slots each.

    `fill` 1 makes every row max_len long (no padding); below 1 the lengths are uniform on
    [8, 2 * fill * max_len - 8] (clipped to max_len), so about that share of each row is real and
    the rest padding, as sentence pairs leave it at max_len 512. Prediction slots scale with the
    length. Throughput only: the words carry no signal.
    """
    rng = np.random.default_rng(seed)
    k = max(1, round(max_len * mask_prob))
    if fill >= 1.0:
        lengths = np.full(rows, max_len)
    else:
        lengths = np.clip(rng.integers(8, max(9, round(2 * fill * max_len) - 8), rows), 8, max_len)
    ids = rng.integers(5, vocab, (rows, max_len))
    a_len = (rng.random(rows) * (lengths - 4)).astype(np.int64) + 1  # sentence A: 1 .. length - 4 tokens
    ids[:, 0], ids[np.arange(rows), a_len + 1], ids[np.arange(rows), lengths - 1] = 3, 4, 4
    positions_in = np.arange(max_len)
    ids[positions_in >= lengths[:, None]] = 1  # <pad>
    segments = ((positions_in >= a_len[:, None] + 2) & (positions_in < lengths[:, None])).astype(np.uint8)
    real_slots = np.minimum(k, np.maximum(1, np.round(lengths * mask_prob).astype(np.int64)))
    keys = rng.random((rows, max_len))
    keys[(positions_in == 0) | (positions_in >= lengths[:, None] - 1)] = 2.0  # never <cls>, the last <sep>, padding
    positions = np.argsort(keys, axis=1)[:, :k]  # k distinct positions, random order
    weights = (np.arange(k) < real_slots[:, None]).astype(np.uint8)  # real slots first, as the examples stage
    positions[weights == 0] = 0
    arrays = {"token_ids": ids, "segments": segments, "valid_lens": lengths,
              "pred_positions": positions, "mlm_weights": weights,
              "mlm_labels": np.take_along_axis(ids, positions, 1), "nsp_labels": rng.integers(0, 2, rows)}
    return Examples(arrays)
