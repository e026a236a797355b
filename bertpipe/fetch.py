"""Files over HTTP(S), streamed to disk with retries: what both download stages (`download`, `tasks`) fetch with.

A transient failure (a network error, HTTP 5xx or 429, a body shorter than its Content-Length) is retried
with exponential backoff; anything else (404, 403) fails at once. Progress is shown per file
(`bertpipe.progress`). Checking what arrived (checksums, sizes) is the caller's.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO

from bertpipe.errors import DataError, one_line
from bertpipe.progress import Progress

CHUNK = 1 << 20  # bytes per read and write when copying downloads and archives
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retry:
    """How hard to try one URL: `tries` attempts, waiting backoff_s, 2*backoff_s, ... between them."""

    tries: int = 3
    backoff_s: float = 1.0
    timeout_s: float = 60.0  # per socket read, so a stalled server fails instead of hanging


class RetryableError(DataError):
    """A failure that may pass on its own: network errors, HTTP 5xx and 429, a truncated body."""


def fetch(url: str, dest: Path, retry: Retry) -> None:
    """Stream `url` into `dest`, retrying transient failures with exponential backoff."""
    for attempt in range(1, retry.tries + 1):
        try:
            _stream(url, dest, retry.timeout_s)
            return
        except RetryableError as err:
            if attempt == retry.tries:
                raise DataError(f"{err} (after {retry.tries} tries)") from None
            delay = retry.backoff_s * 2 ** (attempt - 1)
            log.warning("%s: %s; retrying in %g s", url, err, delay)
            time.sleep(delay)


def _stream(url: str, dest: Path, timeout_s: float) -> None:
    """One GET into `dest`; a body shorter than its Content-Length counts as a failure."""
    log.info("Downloading %s", url)
    request = urllib.request.Request(url, headers={"User-Agent": "bertpipe"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response, open(dest, "wb") as out:
            length = response.headers.get("Content-Length", "")
            expected = int(length) if length.isdigit() else None
            received = _copy(response, out, expected, Path(urllib.parse.urlsplit(url).path).name)
    except urllib.error.HTTPError as err:
        err.close()
        message = f"HTTP {err.code} {one_line(err.reason)}"
        if err.code >= 500 or err.code == 429:
            raise RetryableError(message) from None
        raise DataError(message) from None
    except (OSError, HTTPException) as err:  # URLError, timeouts, resets, IncompleteRead
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        raise RetryableError(f"network error: {one_line(reason)}") from None
    if expected is not None and received != expected:
        raise RetryableError(f"truncated body: received {received} of {expected} bytes (Content-Length)")


def _copy(response: BinaryIO, out: BinaryIO, total: int | None, name: str) -> int:
    """Copy in chunks, showing progress (`bertpipe.progress`)."""
    received = 0
    with Progress(total, name, "B", unit_scale=True, unit_divisor=1024, leave=False) as bar:
        while chunk := response.read(CHUNK):
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received
