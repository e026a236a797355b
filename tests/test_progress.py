"""bertpipe/progress.py: outside a terminal, progress is a bounded number of plain lines.

The README's 3,000-step CPU recipe once wrote a bar redraw per step into a log file; a stage run as
DVC's queue runs it (output in a file) must write a few lines, each whole, none redrawn with `\\r`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import pretrain_folder, run_pretrain

from bertpipe import progress
from bertpipe.errors import PipelineError
from bertpipe.progress import Progress


def test_a_long_run_outside_a_terminal_logs_a_line_every_interval(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    clock = iter(range(0, 10_000_000, 200))  # 0.2 s per step, in milliseconds
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock) / 1000)
    with caplog.at_level(logging.INFO, logger="bertpipe.progress"), Progress(3000, "pretrain", "step") as bar:
        for _ in range(3000):
            bar.update(1, mlm="5.123")
    lines = [r.getMessage() for r in caplog.records]
    assert 18 <= len(lines) <= 22  # 600 s at one line per 30 s, and the last one
    assert lines[-1].startswith("pretrain: 3,000/3,000 step, ") and lines[-1].endswith(" step/s, mlm 5.123")


def test_an_interval_that_is_not_a_number_is_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BERTPIPE_PROGRESS_SECONDS", "30s")
    with pytest.raises(PipelineError, match="BERTPIPE_PROGRESS_SECONDS = '30s' is not a number of seconds"):
        Progress(10, "pretrain", "step")


def test_a_disabled_bar_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO), Progress(10, "pretrain", "step", enabled=False) as bar:
        bar.update(10)
    assert not caplog.records


def test_the_pretrain_stage_writes_whole_lines_into_a_file(sample_examples: Path, tmp_path: Path) -> None:
    done = run_pretrain(pretrain_folder(tmp_path / "run", sample_examples))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("pretrain: ")] == [
        next(line for line in done.stderr.splitlines() if line.startswith("pretrain: 8/8 step"))]
