"""Errors a user can act on: each prints as one line and ends a stage with a non-zero exit."""

from __future__ import annotations

import errno
import reprlib
import shutil
import signal
from pathlib import Path
from typing import Any

QUOTED_CHARS = 200  # of a value an error line quotes
LINE_CHARS = 2000  # of any error line: what is past it is cut from the middle


class PipelineError(Exception):
    """A failure with a cause the user can fix; stages print it as one line, no traceback.

    The line is at most LINE_CHARS long whoever wrote the message: values quoted into it come from
    params.yaml and data files, and a value of 10^5 items (or a zip entry's 64 KB name) would otherwise
    make the one line megabytes long. The middle goes, so what failed and what to do both stay."""

    def __str__(self) -> str:
        text = super().__str__()
        if len(text) <= LINE_CHARS:
            return text
        keep = (LINE_CHARS - 60) // 2  # of each end, leaving room for the note between them
        return f"{text[:keep]} [... {len(text) - 2 * keep:,} characters left out ...] {text[-keep:]}"


class ConfigError(PipelineError, ValueError):
    """A params.yaml value outside what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key = key
        super().__init__(f"params.yaml: {key} = {quote(value)} is not allowed; expected {allowed}")


class Interrupted(PipelineError):
    """SIGTERM or SIGINT arrived; a checkpoint was written and the run can be resumed."""

    def __init__(self, signum: int, step: int | None = None, path: object = None, kept: object = None) -> None:
        self.signum = signum
        where = f" after step {step}; checkpoint {path} written" if step is not None else ""
        survives = f", and kept in {kept}, which DVC does not delete (nor for --temp or queued runs)" if kept else ""
        super().__init__(f"stopped by {signal.Signals(signum).name}{where}{survives}; run the same command again "
                         "(`dvc repro`, or the same `dvc exp run`) to resume")


class DataError(PipelineError):
    """Input data that is missing, corrupt or inconsistent with the params."""


def quote(value: object) -> str:
    """`repr(value)`, shortened as the standard library's `reprlib` does (`[1, 2, 3, 4, 5, 6, ...]`, long
    strings cut in the middle) and never longer than QUOTED_CHARS (and "..." where cut): an error names the value
    the user wrote, which may be huge; reprlib reads only what it shows."""
    text = _QUOTE.repr(value)
    return text if len(text) <= QUOTED_CHARS else text[:QUOTED_CHARS] + "..."


_QUOTE = reprlib.Repr()
_QUOTE.maxstring = _QUOTE.maxother = _QUOTE.maxlong = QUOTED_CHARS


def one_line(value: object) -> str:
    """Messages from the standard library may span lines; ours must not."""
    return " ".join(str(value).split())


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an error's text (at most `limit` characters), or its type name when it has none:
    a library's error quoted inside one of ours, which must stay one line."""
    text = str(err).strip().splitlines()
    return text[0][:limit] if text else err.__class__.__name__


def cause(err: BaseException) -> str:
    """`TypeName: first line`, for a library's error whose type says as much as its text."""
    return f"{err.__class__.__name__}: {first_line(err)}"


# Where the file system itself refuses a write: one line naming the path and the cause, no traceback.
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted", errno.EFBIG: "file too large"}


def storage_error(err: OSError, what: str = "writing") -> PipelineError | None:
    """A PipelineError for a write the file system refused (full, read-only, not ours); None for
    other OSErrors, which are bugs or transient and keep their traceback. Earlier outputs are intact:
    every output is written to a temporary sibling and renamed only when complete (`bertpipe.atomic`)."""
    if err.errno not in STORAGE_ERRNOS:
        return None
    where = f"{what} {err.filename}" if err.filename else what
    return PipelineError(f"{where} failed: {STORAGE_ERRNOS[err.errno]}{free_space(err.filename)}; nothing was "
                         "half-written, earlier outputs are intact")


def free_space(path: object) -> str:
    """` (N MB free on the device of path)`, or nothing when it cannot be told."""
    folder = Path(str(path)) if path else None
    while folder is not None and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder is None:
        return ""
    try:
        return f" ({shutil.disk_usage(folder).free / 1e6:,.1f} MB free on {folder}'s device)"
    except OSError:
        return ""
