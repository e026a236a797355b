"""Progress on long work: a tqdm bar in a terminal, a bounded number of plain lines anywhere else.

A bar redraws itself on every update, which in a terminal costs nothing, but in a log file (CI,
`dvc exp run --queue`, `2>&1 | tee`) every redraw is one more line: a 3,000-step run would write
3,000 of them. Outside a terminal progress is therefore one log line at most every
`BERTPIPE_PROGRESS_SECONDS` seconds (an environment variable, default 30, read when a Progress starts),
and a last one at the end.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from tqdm import tqdm

from bertpipe.errors import PipelineError

log = logging.getLogger(__name__)


class Progress:
    """`update(n, **postfix)` as on a tqdm bar; `enabled=False` shows nothing (ranks other than 0)."""

    def __init__(self, total: float | None, desc: str, unit: str, initial: float = 0, enabled: bool = True,
                 **bar_options: Any) -> None:
        self.total, self.desc, self.unit, self.done = total, desc, unit, initial
        self.enabled, self.postfix = enabled, ""
        terminal = sys.stderr.isatty()
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                         **bar_options) if enabled and terminal else None
        self._started = self._last = time.monotonic()
        self._start_count = initial
        self._every_s = _log_every_s()

    def update(self, n: float = 1, **postfix: str) -> None:
        self.done += n
        if postfix:
            self.postfix = ", ".join(f"{key} {value}" for key, value in postfix.items())
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= self._every_s:
            self._log()

    def _log(self) -> None:
        self._last = time.monotonic()
        rate = (self.done - self._start_count) / max(self._last - self._started, 1e-9)
        of = f"/{self.total:,.0f}" if self.total else ""
        tail = f", {self.postfix}" if self.postfix else ""
        log.info("%s: %s%s %s, %.3g %s/s%s", self.desc, f"{self.done:,.0f}", of, self.unit.strip(), rate,
                 self.unit.strip(), tail)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self.done > self._start_count:
            self._log()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _log_every_s() -> float:
    raw = os.environ.get("BERTPIPE_PROGRESS_SECONDS", "30")
    try:
        return float(raw)
    except ValueError:
        raise PipelineError(f"BERTPIPE_PROGRESS_SECONDS = {raw!r} is not a number of seconds") from None
