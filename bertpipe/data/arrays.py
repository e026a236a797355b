"""Memory-mappable `.npy` files written piece by piece, so no corpus is ever held in memory whole.

Also the example layout shared by the stages that write and read it, and the check that an examples
folder is whole (numpy only, so training benchmarks can read examples on machines without the data-stage
dependencies, and the pretrain stage can refuse a broken folder before importing torch).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np

from bertpipe.errors import ConfigError, DataError

# One array per field, one row per example (see bertpipe/data/examples.py).
FIELDS = ("token_ids", "segments", "valid_lens", "pred_positions", "mlm_weights", "mlm_labels", "nsp_labels")


def smallest_uint(max_value: int) -> np.dtype:
    """The narrowest unsigned type holding 0..max_value (uint8, uint16, uint32 or uint64)."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"{max_value} does not fit in 64 bits")


class NpyAppender:
    """Append 1-D chunks to a `.npy` whose length is known only at the end.

    Chunks stream to a raw sibling file; `close` writes the `.npy` header and copies the raw
    bytes after it, so memory stays at one chunk however long the array grows.
    """

    def __init__(self, path: Path, dtype: np.dtype | type) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.length = 0
        self._raw_path = self.path.with_suffix(".raw")
        self._raw = open(self._raw_path, "wb")  # noqa: SIM115 - closed in close()

    def append(self, chunk: np.ndarray) -> None:
        self._raw.write(np.ascontiguousarray(chunk, dtype=self.dtype).tobytes())
        self.length += len(chunk)

    def close(self) -> None:
        self._raw.close()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.length,)}
        with open(self.path, "wb") as out, open(self._raw_path, "rb") as raw:
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(raw, out, 16 << 20)
        os.remove(self._raw_path)


class NpyRows:
    """A `.npy` file of known shape, filled by row ranges with `os.pwrite`.

    Unlike a writable memory map, the written pages stay in the page cache instead of this process's
    resident memory, and threads may write disjoint row ranges at once.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype | type) -> None:
        self.path, self.dtype, self.shape = Path(path), np.dtype(dtype), shape
        self.row_bytes = self.dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            self.offset = f.tell()
            f.truncate(self.offset + self.row_bytes * shape[0])
        self._fd = os.open(path, os.O_WRONLY)

    def write(self, start: int, rows: np.ndarray) -> None:
        """Rows `start`.. of the array (cast to its dtype)."""
        data = np.ascontiguousarray(rows, dtype=self.dtype).tobytes()
        try:
            written = os.pwrite(self._fd, data, self.offset + start * self.row_bytes)
        except OSError as err:  # pwrite names no file; the one-line error must
            raise OSError(err.errno, err.strerror, str(self.path)) from None
        if written != len(data):  # a full disk may take part of a write before it refuses the rest
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    def close(self) -> None:
        os.close(self._fd)


def load(path: Path) -> np.ndarray:
    """Memory-map one `.npy` read-only; a missing or truncated file is a DataError naming it."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path} is missing; run the stage that writes it (dvc repro)") from None
    except ValueError as err:
        raise DataError(f"{path} is not a valid .npy array ({err})") from None


def read_meta(path: Path) -> dict:
    """A stage's meta.json; missing or unreadable means the earlier stage did not finish."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} cannot be read ({err.__class__.__name__}); rerun the stage that writes it") from None


def load_split(folder: Path) -> dict[str, np.ndarray]:
    """One split's example arrays by field, memory-mapped; arrays of different lengths are a DataError."""
    arrays = {name: load(folder / f"{name}.npy") for name in FIELDS}
    sizes = {name: len(array) for name, array in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise DataError(f"{folder}: example arrays disagree in length {sizes}; rerun the examples stage")
    return arrays


def check_examples(folder: Path, max_position_embeddings: int) -> None:
    """Both splits' arrays are whole and agree with meta.json (`check_meta`). Reads `.npy` headers only, with
    numpy alone, so the pretrain stage stops on a stale or broken examples folder before importing torch."""
    train = load_split(folder / "train")
    load_split(folder / "valid")
    check_meta(read_meta(folder / "meta.json"), train, folder, max_position_embeddings)


def check_meta(meta: dict, train: dict[str, np.ndarray], folder: Path, max_position_embeddings: int) -> None:
    """The train arrays are the ones meta.json describes, and its max_len fits the position table."""
    width, rows = train["token_ids"].shape[1], len(train["valid_lens"])
    if width != meta["max_len"] or rows != meta["examples"]["train"]:
        raise DataError(f"{folder} holds arrays of another run (max_len {width} vs {meta['max_len']}, "
                        f"{rows} vs {meta['examples']['train']} examples); rerun the examples stage")
    if meta["max_len"] > max_position_embeddings:
        raise ConfigError("model.max_position_embeddings", max_position_embeddings,
                          f"at least the examples' max_len ({meta['max_len']})")
