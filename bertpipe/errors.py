"""Errors a user can act on: each prints as one line and ends a stage with a non-zero exit."""

from __future__ import annotations

from typing import Any


class PipelineError(Exception):
    """A failure with a cause the user can fix; stages print it as one line, no traceback."""


class ConfigError(PipelineError, ValueError):
    """A params.yaml value outside what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key = key
        super().__init__(f"params.yaml: {key} = {value!r} is not allowed; expected {allowed}")


class DataError(PipelineError):
    """Input data that is missing, corrupt or inconsistent with the params."""
