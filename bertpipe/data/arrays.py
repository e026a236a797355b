"""Memory-mappable `.npy` files written piece by piece, so no corpus is ever held in memory whole, and
read back memory-mapped. The folders made of them are `bertpipe.data.prepared_folder`'s and
`bertpipe.data.examples_folder`'s."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np

from bertpipe.errors import DataError


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
