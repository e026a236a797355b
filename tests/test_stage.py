"""bertpipe/stage.py: what every entry point shares; one line for a failure, 128 + signal for a stop."""

from __future__ import annotations

import signal

import click
import pytest
from click.testing import CliRunner

from bertpipe.errors import ConfigError, DataError, Interrupted
from bertpipe.stage import entry_point


def command(error: Exception | None) -> click.Command:
    @click.command()
    @entry_point
    def main() -> None:
        if error:
            raise error
        click.echo("done")

    return main


@pytest.mark.parametrize("error", [DataError("data/raw is missing"), ConfigError("train.lr", 0, "a value > 0")])
def test_a_pipeline_error_is_one_error_line_and_exit_1(error: Exception) -> None:
    result = CliRunner().invoke(command(error))
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"Error: {error}"]


def test_a_stop_exits_with_128_plus_the_signal() -> None:
    result = CliRunner().invoke(command(Interrupted(signal.SIGTERM, 40, "models/checkpoint/step-0000040")))
    assert result.exit_code == 128 + signal.SIGTERM
    assert "Stopped: stopped by SIGTERM after step 40" in result.output


def test_other_errors_keep_their_traceback() -> None:
    result = CliRunner().invoke(command(RuntimeError("a bug")))
    assert isinstance(result.exception, RuntimeError)  # not swallowed into a friendly line
