"""What every stage entry point shares: params loading and one-line failures."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from bertpipe.errors import PipelineError

F = TypeVar("F", bound=Callable[..., Any])


def one_line_errors(command: F) -> F:
    """Turn a PipelineError into click's `Error: <message>` and exit status 1, with no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PipelineError as err:
            raise click.ClickException(str(err)) from None

    return wrapper  # type: ignore[return-value]
