"""A tracking server that refuses bertpipe's credentials: expired (401) or a permission revoked (403) mid-run, and a
read-only user's export. A real `mlflow server` (conftest's `mlflow_server`) behind a proxy that starts refusing
writes when told (tests/helpers/refusing_proxy.py).

A refusal of the credentials is permanent: one line naming the variables that mend it, each record tried once
(none retried, none split into parts), a true count of what MLflow lacks, the status the run has on the server
(or that none could be set), and advice naming a command that reruns the one stage.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.exported import STEP, make_project, run_stage
from helpers.refusing_proxy import RefusingProxy

from bertpipe.tracking import MlflowTracker, TrackingError

pytestmark = pytest.mark.slow
API = "/api/2.0/mlflow"


@pytest.fixture
def proxy(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[RefusingProxy]:
    """The stages' store is the proxy in front of the session's server."""
    with RefusingProxy(mlflow_server) as refusing:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", refusing.url)
        yield refusing


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _names_the_credentials(line: str, status: int) -> bool:
    what = {401: "not authenticated", 403: "permission denied"}[status]
    return all(word in line for word in (f"{status}", what, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_TOKEN"))


@pytest.mark.parametrize(("status", "restored", "lost", "verdict", "on_server"), [
    (403, False, 21, "its status FAILED could not be set, so MLflow shows it RUNNING", "RUNNING"),
    (401, True, 20, "it is marked FAILED", "FAILED"),
], ids=["permission-revoked", "credentials-expired-then-renewed"])
def test_writes_refused_mid_run_are_one_line_a_true_count_and_the_status_the_server_holds(
        proxy: RefusingProxy, mlflow_server: str, caplog: pytest.LogCaptureFixture, status: int, restored: bool,
        lost: int, verdict: str, on_server: str) -> None:
    """3 steps arrive, then the server refuses the next 20 steps' metrics; the tag saying so (and, while it still
    refuses, the run's end) go the same way. Restored before the end, the run ends FAILED there, as reported."""
    from mlflow.tracking import MlflowClient

    tracker = MlflowTracker("credentials", f"refused {status}", {"train.steps": 23}, {}, system_metrics=False)
    for step in range(1, 4):
        tracker.log_metrics({"mlm_loss": 1 / step, "lr": 0.01}, step=step)
    proxy.refuse(status)
    with caplog.at_level(logging.WARNING):
        for step in range(4, 24):
            tracker.log_metrics({"mlm_loss": 1 / step, "lr": 0.01}, step=step)
        if restored:
            proxy.refuse(None)
        tracker.finish()
    refusal, closing = _warnings(caplog)  # nothing per record, nothing "will retry"
    assert _names_the_credentials(refusal, status) and "\n" not in refusal
    assert proxy.refused[f"{API}/runs/log-batch"] == 20  # each step's record once: not retried, not split
    assert f"it lacks {lost} records (" in closing and closing.split(")", 1)[1].startswith(f"; {verdict}")
    server = MlflowClient(mlflow_server)
    run = server.get_run(tracker.run_id)
    assert run.info.status == on_server
    assert [m.step for m in server.get_metric_history(tracker.run_id, "mlm_loss")] == [1, 2, 3]
    if restored:
        assert run.data.tags["bertpipe.refused"] == "metrics: dropped: MLflow refused the credentials (401)"
    else:
        assert proxy.refused == {f"{API}/runs/log-batch": 20, f"{API}/runs/set-tag": 1, f"{API}/runs/update": 1}


def test_credentials_refused_at_the_start_stop_pretrain_in_one_line_naming_them(proxy: RefusingProxy) -> None:
    proxy.refuse(401)
    with pytest.raises(TrackingError) as caught:
        MlflowTracker("credentials", "never starts", {}, {}, system_metrics=False)
    message = str(caught.value)
    assert _names_the_credentials(message, 401) and "\n" not in message and "unreachable" not in message


def test_an_export_by_a_read_only_user_is_one_line_not_retried_and_names_the_stage_alone(
        proxy: RefusingProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The user may read the pretrain run, not write to it: each of the export's writes is tried once, and the
    advice reruns export alone (`dvc repro -f export` would rerun all five stages, and cures no permission)."""
    pytest.importorskip("transformers")
    tracker = MlflowTracker("credentials", "pretrain", {"train.steps": STEP}, {}, system_metrics=False)
    tracker.log_metrics({"mlm_loss": 2.5}, step=STEP)
    tracker.finish()
    project = make_project(tmp_path / "project", mlflow_run_id=tracker.run_id)
    proxy.refuse(403)
    with caplog.at_level(logging.WARNING):
        result = run_stage(project)
    assert result.exit_code == 0, result.output
    assert (project / "models" / "bert" / "model.safetensors").is_file()
    refusal, lacks = _warnings(caplog)
    assert _names_the_credentials(refusal, 403)
    assert lacks.startswith(f"MLflow run {tracker.run_id} lacks the exported model")
    assert "`dvc repro -s -f export`" in lacks
    assert "will retry" not in caplog.text and "dvc repro -f" not in caplog.text
    assert proxy.refused and set(proxy.refused.values()) == {1}  # metrics, export.json, the model: once each
