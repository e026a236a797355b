"""The examples stage's folder (`data/examples`), written by `bertpipe.data.examples` and read by training.

    meta.json        vocab_size and vocab_sha256 (the prepare stage's), max_len, max_predictions, strategy,
                     objective (`train.objective` the examples are for), held_out (how valid was masked),
                     seed, the examples params, examples per split, and `copies`: the row ranges of
                     train's `examples.dupe_factor` copies (`train.epoch_per_copy` takes each as an epoch)
    train/, valid/   one `.npy` per field of `FIELDS`, one row per example, in the smallest unsigned
                     type that holds its values:
                     token_ids [N, max_len], segments [N, max_len] (0 = sentence A, 1 = B),
                     valid_lens [N] (tokens before the padding), pred_positions [N, max_predictions],
                     mlm_weights [N, max_predictions] (1 = a real prediction, 0 = padding),
                     mlm_labels [N, max_predictions] (the original token ids), nsp_labels [N]
                     (Hugging Face's: 0 = B follows A, 1 = B is random; 0 for single segments)
                     valid's max_predictions follows its fixed masking rate, not train's

numpy only, so training benchmarks read examples on machines without the data stages' dependencies,
and the pretrain stage refuses a broken folder before importing torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bertpipe.atomic import read_json, write_json
from bertpipe.data.arrays import NpyRows, load, smallest_uint
from bertpipe.errors import ConfigError, DataError

FIELDS = ("token_ids", "segments", "valid_lens", "pred_positions", "mlm_weights", "mlm_labels", "nsp_labels")
META = "meta.json"


def open_split(folder: Path, rows: int, max_len: int, max_predictions: int, vocab_size: int) -> dict[str, NpyRows]:
    """One split's arrays, sized for `rows` examples, to be filled by row ranges (`NpyRows.write`)."""
    folder.mkdir(parents=True, exist_ok=True)
    word, position = smallest_uint(vocab_size - 1), smallest_uint(max_len)
    k = max_predictions
    shapes = {"token_ids": ((rows, max_len), word), "segments": ((rows, max_len), np.uint8),
              "valid_lens": ((rows,), position), "pred_positions": ((rows, k), position),
              "mlm_weights": ((rows, k), np.uint8), "mlm_labels": ((rows, k), word), "nsp_labels": ((rows,), np.uint8)}
    return {name: NpyRows(folder / f"{name}.npy", shape, dtype) for name, (shape, dtype) in shapes.items()}


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    write_json(folder / META, meta)


def read_meta(folder: Path) -> dict[str, Any]:
    """meta.json; missing or unreadable means the examples stage did not finish."""
    return read_json(folder / META, "examples")


def load_split(folder: Path) -> dict[str, np.ndarray]:
    """One split's example arrays by field, memory-mapped; arrays of different lengths are a DataError."""
    arrays = {name: load(folder / f"{name}.npy") for name in FIELDS}
    sizes = {name: len(array) for name, array in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise DataError(f"{folder}: example arrays disagree in length {sizes}; rerun the examples stage")
    return arrays


def check_examples(folder: Path, max_position_embeddings: int, objective: str) -> None:
    """Both splits' arrays are whole and agree with meta.json (`check_meta`). Reads `.npy` headers only."""
    train = load_split(folder / "train")
    load_split(folder / "valid")
    check_meta(read_meta(folder), train, folder, max_position_embeddings, objective)


def check_meta(meta: dict, train: dict[str, np.ndarray], folder: Path, max_position_embeddings: int,
               objective: str) -> None:
    """The train arrays are the ones meta.json describes, made for `train.objective` (pairs for mlm+nsp,
    single segments for mlm), and its max_len fits the position table."""
    width, rows = train["token_ids"].shape[1], len(train["valid_lens"])
    if width != meta["max_len"] or rows != meta["examples"]["train"]:
        raise DataError(f"{folder} holds arrays of another run (max_len {width} vs {meta['max_len']}, "
                        f"{rows} vs {meta['examples']['train']} examples); rerun the examples stage")
    made_for = meta.get("objective", "mlm+nsp")
    if made_for != objective:
        raise DataError(f"{folder} holds examples for train.objective {made_for}, not {objective}; rerun the "
                        "examples stage (dvc repro)")
    if meta["max_len"] > max_position_embeddings:
        raise ConfigError("model.max_position_embeddings", max_position_embeddings,
                          f"at least the examples' max_len ({meta['max_len']})")
