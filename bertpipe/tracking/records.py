"""The records a run sends (`bertpipe.tracking.delivery.Record`), each with its answer to a refusal.

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
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bertpipe.tracking.delivery import Record, Repair

# Param value limits of MLflow stores: today's (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH), older servers'.
PARAM_LIMITS = (6000, 500)
SHORTENED = " ... [shortened from {n} characters for MLflow]"


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
