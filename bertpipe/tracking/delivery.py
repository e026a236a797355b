"""Records delivered to MLflow in order, so that no failure ends a run and none loses more than its own record.

Each call to MLflow is a `Record`. A transient failure leaves the record at the head of the queue: one
warning line, a wait (RETRY_SECONDS, growing while MLflow keeps failing), then the queue is tried again
in order. A permanent refusal concerns that record alone: its `repair` says what to send instead or
nothing (it is dropped); one warning line names it, `changes` keeps what happened for the run's tag, and
the records behind it go on. `lost` keeps every record MLflow lacks, refused or (at `close`) undeliverable,
so that what a stage reports lost is the true count.

Transient or permanent: MLflow reports both through `MlflowException`, so the HTTP status it carries
decides. A SQLite store maps "database is locked" to TEMPORARILY_UNAVAILABLE (503) and an invalid value
to INVALID_PARAMETER_VALUE (400); a server's answer arrives as a `RestException` with the server's
code; a connection that could not be made is wrapped as INTERNAL_ERROR (500); an artifact upload to a
server fails with requests' `HTTPError`, whose response has the status. Anything else raised outside
MLflow's own types is transient when it is an OS or database-driver error, else permanent (retrying a
TypeError cannot help).

A 401 or 403 refuses the credentials (missing, expired, a permission revoked), not the record: the record
is dropped unrepaired (a shorter or split form is refused the same), one warning line says which
environment variables mend it, and each later record is still tried once, in case the permission returns.

The records a run sends, each with its answer to a refusal:
- Params are text as params.yaml spells them: lists and mappings as JSON (YAML's flow style),
  booleans `true`/`false`, null `null`. A refused batch is split into single params; a refused
  single param that is longer than an MLflow limit is sent again shortened to it, with a visible
  marker (MLflow's own truncation, MLFLOW_TRUNCATE_LONG_VALUES, cuts silently); otherwise it is skipped.
- Metrics: a refused batch is split into single metrics; a refused single metric is dropped, and the
  run ends FAILED (metrics are what the run is for).
- Artifacts and tags: a refused one is dropped and noted.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bertpipe.errors import first_line
from bertpipe.tracking.store import credentials_refused, fail_fast_http, http_status, is_connection_failure, store_lock

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_SECONDS = (5.0, 30.0, 120.0, 300.0)  # waits between delivery attempts while MLflow keeps failing
FINAL_ATTEMPTS = 3  # deliveries tried at the end of a run, RETRY_SECONDS[0] apart
# 4xx statuses that mean "not now" rather than "never": timeout, conflict, too early, too many requests,
# client closed the request.
RETRYABLE_CLIENT_STATUS = frozenset({408, 409, 425, 429, 499})
# Param value limits of MLflow stores: today's (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH), older servers'.
PARAM_LIMITS = (6000, 500)
SHORTENED = " ... [shortened from {n} characters for MLflow]"


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
        self.lost: list[Record] = []  # records MLflow lacks: dropped after a refusal, or undeliverable at `close`
        self._pending: deque[Record] = deque()
        self._failures, self._next_try = 0, 0.0
        self._warned: set[tuple[str, str] | int] = set()  # (name, outcome) told, and refused credentials' statuses

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

    @property
    def lost_essential(self) -> bool:
        return any(record.essential for record in self.lost)

    def close(self) -> list[Record]:
        """The final attempts (FINAL_ATTEMPTS, RETRY_SECONDS[0] apart); what is still queued then is lost.
        Returns every record lost so far, refused or undeliverable."""
        retried(lambda: self.flush(now=True) or None)
        self.lost.extend(self._pending)
        self._pending.clear()
        return list(self.lost)

    def _send(self, record: Record) -> Exception | None:
        try:
            with store_lock(self.uri), fail_fast_http():
                record.send()
        except Exception as err:  # MLflow raises many types; a tracking failure must not end a long run
            return err
        return None

    def _refused(self, record: Record, err: Exception) -> list[Record]:
        """A permanent refusal: the repair's records, after one warning line (once per name and outcome; once
        per status for refused credentials, which every record meets)."""
        mend = credentials_refused(err)
        if mend is not None:
            status = http_status(err)
            repair = Repair(note=f"dropped: MLflow refused the credentials ({status})")
            if status not in self._warned:
                self._warned.add(status)
                log.warning("MLflow refused %s (%s): %s. Later records are each tried once, none retried; DVC's "
                            "metrics files are unaffected", record.name, first_line(err), mend)
        else:
            repair = record.repair(err)
            if repair.note is not None and (record.name, repair.note) not in self._warned:
                self._warned.add((record.name, repair.note))
                log.warning("MLflow refused %s (%s): %s; the other records are delivered", record.name,
                            first_line(err), repair.note)
        if repair.note is not None:
            self.changes[record.name] = repair.note
        if not repair.records:
            self.lost.append(record)
        return repair.records


def retried(attempt: Callable[[], T | None]) -> T | None:
    """`attempt()` until it returns something, at most FINAL_ATTEMPTS times, RETRY_SECONDS[0] apart."""
    for n in range(FINAL_ATTEMPTS):
        if (result := attempt()) is not None:
            return result
        if n < FINAL_ATTEMPTS - 1:
            time.sleep(RETRY_SECONDS[0])
    return None


def is_transient(err: BaseException) -> bool:
    """Whether retrying the same call later may succeed (connection lost, timeout, 5xx, a locked database)."""
    status = http_status(err)
    if status is not None:
        return status >= 500 or status in RETRYABLE_CLIENT_STATUS or is_connection_failure(err)
    if isinstance(err, OSError):  # ConnectionError, TimeoutError and requests' exceptions without an answer
        return True
    return type(err).__name__ == "OperationalError"  # sqlite3's and SQLAlchemy's: database is locked


# The records: params, metrics, artifacts, tags, each with its repair.


def param_text(value: Any) -> str:
    """A param as params.yaml writes it: `["https://...", "..."]`, not Python's `('https://...', ...)`."""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple | dict | bool) or value is None:
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def shorten(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, the marker included."""
    marker = SHORTENED.format(n=len(text))
    return text[:limit - len(marker)] + marker


def params_record(mlflow_client: Any, run_id: str, params: Mapping[str, str]) -> Record:
    """All params in one call; refused, one call per param (`param_record`)."""
    from mlflow.entities import Param

    params = dict(params)
    return Record("params", lambda: mlflow_client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()]),
                  essential=False, repair=lambda err: Repair(
                      [param_record(mlflow_client, run_id, k, v) for k, v in params.items()], note=None))


def param_record(mlflow_client: Any, run_id: str, key: str, value: str) -> Record:
    """One param; refused, it is sent again shortened to the next MLflow limit below its length, else skipped."""

    def repair(err: Exception) -> Repair:
        limit = next((n for n in PARAM_LIMITS if n < len(value)), None)
        if limit is None:
            return Repair(note="skipped")
        return Repair([param_record(mlflow_client, run_id, key, shorten(value, limit))],
                      note=f"sent shortened to {limit} characters, with a marker")

    return Record(f"param {key}", lambda: mlflow_client.log_param(run_id, key, value), essential=False,
                  repair=repair)


def metrics_record(mlflow_client: Any, run_id: str, metrics: Mapping[str, float], step: int | None) -> Record:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]

    def repair(err: Exception) -> Repair:
        if len(values) == 1:
            return Repair()
        return Repair([metrics_record(mlflow_client, run_id, {m.key: m.value}, step) for m in values], note=None)

    name = f"metric {values[0].key}" if len(values) == 1 else "metrics"
    return Record(name, lambda: mlflow_client.log_batch(run_id, metrics=values), repair=repair)


def artifact_record(mlflow_client: Any, run_id: str, path: Path, artifact_path: str | None = None) -> Record:
    return Record(f"artifact {path.name}", lambda: mlflow_client.log_artifact(run_id, str(path), artifact_path),
                  essential=False)


def dict_record(mlflow_client: Any, run_id: str, obj: Mapping[str, Any], name: str) -> Record:
    document = dict(obj)
    return Record(f"artifact {name}", lambda: mlflow_client.log_dict(run_id, document, name), essential=False)


def tag_record(mlflow_client: Any, run_id: str, key: str, value: str) -> Record:
    return Record(f"tag {key}", lambda: mlflow_client.set_tag(run_id, key, value), essential=False)
