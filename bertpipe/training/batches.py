"""From memory-mapped examples to model inputs: which examples a step uses, and on which rank.

The order is a pure function of (seed, step): epoch e is `default_rng([seed, e]).permutation(n)`
of its rows, cut into global batches of `batch_size` (the incomplete tail is dropped, so every step
has the same global batch). An epoch is the whole split, or with `train.epoch_per_copy` one of the
`examples.dupe_factor` copies the examples stage drew, in turn: every epoch then sees other masks
and other NSP negatives (RoBERTa's dynamic masking, with the masks still written by the examples stage).
A global batch is sorted by length and dealt round-robin to the ranks, and
each rank cuts its share into micro-batches of similar length, each trimmed to its longest row.
Nothing about the split changes the loss: it is normalised by the global batch's counts.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from bertpipe.data.examples_folder import load_split
from bertpipe.errors import DataError

IGNORE_INDEX = -100  # Hugging Face's label for a position that is not predicted (cross_entropy skips it)
# Micro-batch shapes are rounded up to these multiples: oneDNN compiles a kernel for every new matrix
# shape (~17 ms each for bf16 on the CPU, more than the product itself), so a few shapes that recur
# beat exact ones. Padding tokens are masked out and padding predictions carry IGNORE_INDEX, so the
# losses and gradients are those of the exact shapes (to rounding).
WIDTH_MULTIPLE, PREDICTION_MULTIPLE = 16, 64


class Batch(NamedTuple):
    """One micro-batch as tensors; masked_positions are flat indices into the [B, T] positions."""

    input_ids: torch.Tensor  # [B, T] int64
    token_type_ids: torch.Tensor  # [B, T] int64
    valid_lens: torch.Tensor | None  # [B] int64; None when no row is padded (the model then takes no key mask)
    masked_positions: torch.Tensor  # [N] int64: the real prediction slots, then padding slots at position 0
    mlm_labels: torch.Tensor  # [N] int64, IGNORE_INDEX at the padding slots
    nsp_labels: torch.Tensor  # [B] int64, 0 = is next

    @property
    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The model's arguments: `model(*batch.inputs)`."""
        return self.input_ids, self.token_type_ids, self.valid_lens, self.masked_positions

    def to(self, device: torch.device, unmask_full: bool | None = None) -> Batch:
        """The batch on `device`. With `unmask_full` (default: on CUDA) a batch whose rows all fill its
        width arrives with valid_lens None, so attention runs without a key mask and SDPA can take its
        flash kernel, which takes none; the result is the same function (tests/model/test_model.py). The check
        reads the host's copy, so it costs no device sync. The CPU keeps the mask: its golden losses
        were recorded with it, and its SDPA kernels gain nothing from dropping it."""
        unmask_full = device.type == "cuda" if unmask_full is None else unmask_full
        batch = self
        if unmask_full and self.valid_lens is not None and int(self.valid_lens.min()) == self.input_ids.shape[1]:
            batch = self._replace(valid_lens=None)
        non_blocking = device.type == "cuda"
        return Batch(*(None if t is None else t.to(device, non_blocking=non_blocking) for t in batch))


@dataclass(frozen=True)
class Examples:
    """One split's example arrays, memory-mapped; nothing is read until a batch asks for it."""

    arrays: dict[str, np.ndarray]
    epochs: tuple[tuple[int, int], ...] = ()  # row ranges taken as epochs in turn; () = all rows are one

    @classmethod
    def load(cls, folder: Path, epochs: Sequence[Sequence[int]] = ()) -> Examples:
        arrays = load_split(folder)
        ranges = tuple((int(start), int(stop)) for start, stop in epochs)
        if ranges and (ranges[0][0] != 0 or ranges[-1][1] != len(arrays["valid_lens"])):
            raise DataError(f"{folder}: the copies in meta.json do not cover its rows; rerun the examples stage")
        return cls(arrays, ranges)

    def __len__(self) -> int:
        return len(self.arrays["valid_lens"])

    @property
    def lengths(self) -> np.ndarray:
        return self.arrays["valid_lens"]

    def epoch_ranges(self) -> tuple[tuple[int, int], ...]:
        return self.epochs or ((0, len(self)),)

    def predictions(self, indices: np.ndarray) -> int:
        """Real prediction slots among `indices`: the MLM loss's normaliser."""
        return int(self.arrays["mlm_weights"][np.sort(indices)].sum())

    def batch(self, indices: np.ndarray, pin: bool = False, width_multiple: int = WIDTH_MULTIPLE,
              prediction_multiple: int = PREDICTION_MULTIPLE) -> Batch:
        """The examples at `indices`, trimmed to their longest row rounded up to `width_multiple` (at
        most max_len), with the predictions padded to a multiple of `prediction_multiple`."""
        indices = np.sort(indices)
        a = {name: array[indices] for name, array in self.arrays.items()}
        max_len = a["token_ids"].shape[1]
        width = min(max_len, -(-int(a["valid_lens"].max()) // width_multiple) * width_multiple)
        real = a["mlm_weights"].astype(bool)
        rows = np.broadcast_to(np.arange(len(indices))[:, None], real.shape)
        padding = -int(real.sum()) % prediction_multiple
        positions = np.concatenate([rows[real] * width + a["pred_positions"][real], np.zeros(padding, np.int64)])
        labels = np.concatenate([a["mlm_labels"][real].astype(np.int64), np.full(padding, IGNORE_INDEX)])
        tensors = (a["token_ids"][:, :width], a["segments"][:, :width], a["valid_lens"], positions, labels,
                   a["nsp_labels"])
        batch = Batch(*(torch.from_numpy(np.ascontiguousarray(t, dtype=np.int64)) for t in tensors))
        return Batch(*(t.pin_memory() for t in batch)) if pin else batch


def global_batch(step: int, epochs: Sequence[tuple[int, int]], batch_size: int, seed: int) -> np.ndarray:
    """Indices of the examples in global batch `step` (0-based); `epochs` are the row ranges taken in turn."""
    steps = np.array([(stop - start) // batch_size for start, stop in epochs])
    if steps.min() == 0:
        fewest = min(stop - start for start, stop in epochs)
        raise DataError(f"only {fewest} training examples per epoch, fewer than train.batch_size = {batch_size}")
    rounds, rest = divmod(step, int(steps.sum()))
    which = int(np.searchsorted(np.cumsum(steps), rest, side="right"))
    within = rest - int(steps[:which].sum())
    start, stop = epochs[which]
    order = _epoch_order(seed, rounds * len(epochs) + which, stop - start)
    return start + order[within * batch_size:(within + 1) * batch_size]


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n_examples: int) -> np.ndarray:
    """The epoch's permutation, drawn once per epoch rather than once per step."""
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    order.flags.writeable = False
    return order


def rank_share(indices: np.ndarray, lengths: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's part of a global batch: every world-th example in length order (`lengths[i]` is
    the length of `indices[i]`)."""
    by_length = indices[np.argsort(lengths, kind="stable")]
    return by_length[rank::world]


def micro_batches(share: np.ndarray, size: int) -> list[np.ndarray]:
    """Consecutive runs of at most `size` examples of a length-sorted share."""
    return [share[i:i + size] for i in range(0, len(share), size)]
