"""The MLflow UI as a new user meets it: `bertpipe ui` on the project's store from any folder of the repository,
and the link it prints opened in a fresh headless Chromium profile (Debian's `chromium`): the runs table, not
the GenAI overview that MLflow >= 3.10 opens experiments on by default."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import BIN, free_port

from bertpipe.cli import main
from bertpipe.tracking import MlflowTracker, client, open_experiment

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,900", "--virtual-time-budget=8000")


def page(url: str, profile: Path) -> str:
    """The DOM of `url` once its scripts have run, in a browser profile that has never seen MLflow."""
    done = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def printed_link(process: subprocess.Popen, out: Path, seconds: float = 180) -> str:
    """The link of the line `bertpipe ui` prints once the UI answers (mlflow ui's own lines go to `out` too)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if found := re.search(r"^MLflow UI on \S+: (http://\S+)", out.read_text(), re.MULTILINE):
            return found[1]
        assert process.poll() is None, out.read_text()
        time.sleep(0.5)
    pytest.fail(f"no link printed within {seconds} s")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_bertpipe_ui_prints_a_link_that_opens_the_runs_table_in_a_fresh_browser(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_params: Callable[..., Path]) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    (repo / "stages").mkdir()
    write_params(repo)
    monkeypatch.chdir(repo)  # as a stage runs: the store is repo/mlflow.db
    tracker = MlflowTracker("bertpipe", "ui-run", {"train.lr": 0.01}, {}, system_metrics=False)
    tracker.log_metrics({"mlm_loss": 1.0}, step=1)
    tracker.finish()
    port, out = free_port(), tmp_path / "ui.out"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(out, "w") as stdout, open(tmp_path / "ui.log", "w") as stderr:
        ui = subprocess.Popen([str(BIN / "bertpipe"), "ui", "--port", str(port)], cwd=repo / "stages", env=env,
                              stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        link = printed_link(ui, out)
        assert link == f"http://127.0.0.1:{port}/#/experiments/{tracker.experiment_id}?workflowType=machine_learning"
        dom = page(link, tmp_path / "profile")
    finally:
        os.killpg(ui.pid, signal.SIGTERM)  # bertpipe, the mlflow ui it started and its worker
        ui.wait(timeout=30)
    assert "Run Name" in dom and ">ui-run<" in dom and "<strong>1</strong> matching run" in dom  # the runs table
    assert "Detect Issues" not in dom and "Traces" not in re.findall(r"<h2[^>]*>([^<]*)", dom)


def test_bertpipe_ui_links_a_tracking_servers_own_ui(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    experiment_id = open_experiment(client(mlflow_server), mlflow_server, "ui-link")
    result = CliRunner().invoke(main, ["ui", "--experiment", "ui-link"])
    assert result.exit_code == 0, result.output
    assert result.output == (f"MLflow UI of the tracking server: {mlflow_server}/#/experiments/{experiment_id}"
                             "?workflowType=machine_learning\n")


def test_bertpipe_ui_refuses_a_port_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["ui", "--port", str(port), "--experiment", "bertpipe"])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: port {port} on 127.0.0.1 is in use; pick another with --port"
