"""The downstream scores in MLflow, on the pretrain run that trained the exported checkpoint.

- On that run: the report's numbers as run-level metrics, `downstream/<task>/<metric>` (the median over
  seeds), `.../<metric>_spread`, `downstream/<task>/random_init/<metric>`, `downstream/<task>/majority/<metric>`
  and `downstream/glue_score`, beside the pretraining metrics in the runs table and the compare view; the
  whole report as `downstream.json`.
- A child run per fine-tuning run (MLflow's nested runs, under that run in the runs table), named
  `<task> <init> seed <seed>`: the recipe as params, every epoch's train loss, learning rate and dev scores as
  a series over epochs, the cost as run-level metrics.

Records go through `bertpipe.tracking.delivery`, so no MLflow failure stops the stage; DVC's
metrics/downstream.json holds everything either way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from bertpipe.repo import repo_root
from bertpipe.tracking.delivery import Delivery, Record, dict_record, metrics_record, param_text
from bertpipe.tracking.model import pretrain_run
from bertpipe.tracking.run import dvc_tags, git_commit
from bertpipe.tracking.store import tracking_uri
from bertpipe.tracking.ui import announce_run

log = logging.getLogger(__name__)
PARENT_TAG = "mlflow.parentRunId"  # what makes a run a child of another in MLflow's UI


class DownstreamLog:
    """Completes a pretrain run with its downstream results (`open` it by the run's id)."""

    def __init__(self, mlflow_client: Any, run: Any, uri: str) -> None:
        self._client, self._run, self.uri = mlflow_client, run, uri
        self._delivery = Delivery(uri)
        self._tags = dvc_tags(git_commit(repo_root()))

    @classmethod
    def open(cls, run_id: str, kept: str) -> DownstreamLog | None:
        """The log of pretrain run `run_id`, or None (one warning line) when MLflow cannot give that run."""
        uri = tracking_uri()
        found = pretrain_run(uri, run_id, kept)
        if found is None or found[1] is None:
            return None
        return cls(found[0], found[1], uri)

    def log_run(self, name: str, params: Mapping[str, Any], epochs: list[Mapping[str, float]],
                summary: Mapping[str, float]) -> None:
        """A child run holding one fine-tuning run: params, a series per epoch, run-level `summary`."""
        from mlflow.entities import Metric, Param

        created: list[str] = []
        experiment_id, parent = self._run.info.experiment_id, self._run.info.run_id
        now = int(time.time() * 1000)
        history = [Metric(key, float(value), now, int(row["epoch"])) for row in epochs
                   for key, value in row.items() if key != "epoch"]
        totals = [Metric(key, float(value), now, 0) for key, value in summary.items()]

        def send() -> None:
            if not created:  # a retry after a transient failure reuses the run it made
                run = self._client.create_run(experiment_id, run_name=name, tags={PARENT_TAG: parent, **self._tags})
                created.append(run.info.run_id)
            self._client.log_batch(created[0], params=[Param(k, param_text(v)) for k, v in params.items()])
            for start in range(0, len(history), 900):  # MLflow takes at most 1,000 metrics per batch
                self._client.log_batch(created[0], metrics=history[start:start + 900])
            self._client.log_batch(created[0], metrics=totals)
            self._client.set_terminated(created[0], "FINISHED")

        self._delivery.submit(Record(f"child run {name}", send, essential=False))

    def finish(self, report: Mapping[str, Any]) -> None:
        """The report's numbers on the pretrain run, and the report itself as `downstream.json`."""
        run_id = self._run.info.run_id
        self._delivery.submit(metrics_record(self._client, run_id, dict(flat_metrics(report)), None))
        self._delivery.submit(dict_record(self._client, run_id, report, "downstream.json"))
        undelivered = self._delivery.close()
        if undelivered:
            log.warning("MLflow run %s lacks %d downstream records (%s); metrics/downstream.json holds everything",
                        run_id, len(undelivered), ", ".join(sorted(r.name for r in undelivered)[:5]))
        announce_run(self.uri, self._run.info.experiment_id, run_id)


def flat_metrics(report: Mapping[str, Any], prefix: str = "downstream/") -> dict[str, float]:
    """The report's numbers under MLflow names: `downstream/cola/matthews_correlation`, ..."""
    out: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, Mapping):
            out |= flat_metrics(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[prefix + key] = float(value)
    return out
