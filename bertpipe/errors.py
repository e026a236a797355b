"""Errors a user can act on: each prints as one line and ends a stage with a non-zero exit."""

from __future__ import annotations

import signal
from typing import Any


class PipelineError(Exception):
    """A failure with a cause the user can fix; stages print it as one line, no traceback."""


class ConfigError(PipelineError, ValueError):
    """A params.yaml value outside what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key = key
        super().__init__(f"params.yaml: {key} = {value!r} is not allowed; expected {allowed}")


class Interrupted(PipelineError):
    """SIGTERM or SIGINT arrived; a checkpoint was written and the run can be resumed."""

    def __init__(self, signum: int, step: int | None = None, path: object = None) -> None:
        self.signum = signum
        where = f" after step {step}; checkpoint {path} written," if step is not None else ";"
        super().__init__(f"stopped by {signal.Signals(signum).name}{where} run `dvc repro` to resume")


class DataError(PipelineError):
    """Input data that is missing, corrupt or inconsistent with the params."""
