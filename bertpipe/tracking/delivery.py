"""Records delivered to MLflow in order, so that no failure ends a run and none loses more than its own record.

Each call to MLflow is a `Record`. A transient failure (`bertpipe.tracking.failures`) leaves the
record at the head of the queue: one warning line, a wait (RETRY_SECONDS, growing while MLflow keeps
failing), then the queue is tried again in order. A permanent refusal concerns that record alone: its
`repair` says what to send instead (a batch split into single values, an over-long value shortened)
or nothing (it is dropped); one warning line names it, `changes` keeps what happened for the run's tag,
and the records behind it go on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from bertpipe.tracking.failures import first_line, is_transient
from bertpipe.tracking.store import fail_fast_http, store_lock

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_SECONDS = (5.0, 30.0, 120.0, 300.0)  # waits between delivery attempts while MLflow keeps failing
FINAL_ATTEMPTS = 3  # deliveries tried at the end of a run, RETRY_SECONDS[0] apart


@dataclass
class Repair:
    """What to do with a refused record: `records` to send in its place (none: it is dropped), and `note`,
    what was done, for the warning line and the run's tag (None for a silent split into parts)."""

    records: list[Record] = field(default_factory=list)
    note: str | None = "dropped"


@dataclass
class Record:
    """One call to MLflow. `name` is what warning lines call it ("param export.sentences", "metrics");
    losing an `essential` record (a metric) makes the run FAILED, losing another is noted on it."""

    name: str
    send: Callable[[], object]
    essential: bool = True
    repair: Callable[[Exception], Repair] = lambda err: Repair()


class Delivery:
    """The queue of one run's records for the store at `uri`."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.changes: dict[str, str] = {}  # record name -> what was done with it after a refusal
        self.lost_essential = False
        self._pending: deque[Record] = deque()
        self._failures, self._next_try = 0, 0.0
        self._warned: set[tuple[str, str]] = set()

    def submit(self, record: Record) -> None:
        """Queue `record` and deliver what can be delivered now (nothing while waiting to retry)."""
        self._pending.append(record)
        self.flush()

    def flush(self, now: bool = False) -> bool:
        """Deliver queued records in order (`now`: even while waiting to retry); stop at the first transient
        failure. Returns whether all went."""
        if not now and time.monotonic() < self._next_try:
            return False
        while self._pending:
            record = self._pending[0]
            err = self._send(record)
            if err is None:
                self._pending.popleft()
                self._failures = 0
            elif is_transient(err):
                log.warning("MLflow %s failed (%s); will retry, DVC's metrics files are unaffected", record.name,
                            first_line(err))
                self._next_try = time.monotonic() + RETRY_SECONDS[min(self._failures, len(RETRY_SECONDS) - 1)]
                self._failures += 1
                return False
            else:
                self._pending.popleft()
                self._pending.extendleft(reversed(self._refused(record, err)))
        return True

    def close(self) -> list[Record]:
        """The final attempts (FINAL_ATTEMPTS, RETRY_SECONDS[0] apart); returns the records that could not be
        delivered, which leave the queue."""
        retried(lambda: self.flush(now=True) or None)
        undelivered = list(self._pending)
        self._pending.clear()
        return undelivered

    def _send(self, record: Record) -> Exception | None:
        try:
            with store_lock(self.uri), fail_fast_http():
                record.send()
        except Exception as err:  # MLflow raises many types; a tracking failure must not end a long run
            return err
        return None

    def _refused(self, record: Record, err: Exception) -> list[Record]:
        """A permanent refusal: the repair's records, after one warning line (once per name and outcome)."""
        repair = record.repair(err)
        if repair.note is not None:
            self.changes[record.name] = repair.note
            if (record.name, repair.note) not in self._warned:
                self._warned.add((record.name, repair.note))
                log.warning("MLflow refused %s (%s): %s; the other records are delivered", record.name,
                            first_line(err), repair.note)
        if not repair.records and record.essential:
            self.lost_essential = True
        return repair.records


def retried(attempt: Callable[[], T | None]) -> T | None:
    """`attempt()` until it returns something, at most FINAL_ATTEMPTS times, RETRY_SECONDS[0] apart."""
    for n in range(FINAL_ATTEMPTS):
        if (result := attempt()) is not None:
            return result
        if n < FINAL_ATTEMPTS - 1:
            time.sleep(RETRY_SECONDS[0])
    return None
