"""What every stage entry point shares: logging to the console, and failures as one line.

Each stage in `stages/` has the same shape: read params.yaml (`bertpipe.config`), make one library
call that writes the stage's outputs atomically, and write its metrics file.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from bertpipe.errors import Interrupted, PipelineError, storage_error

F = TypeVar("F", bound=Callable[..., Any])


def entry_point(command: F) -> F:
    """Log INFO lines as plain messages; a PipelineError, or a write the file system refuses (full,
    read-only), becomes click's `Error: <message>` and exit status 1, with no traceback; an interrupted
    run says so and exits with 128 + the signal."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            return command(*args, **kwargs)
        except Interrupted as stop:
            click.echo(f"Stopped: {stop}", err=True)
            sys.exit(128 + stop.signum)
        except PipelineError as err:
            raise click.ClickException(str(err)) from None
        except OSError as err:
            refused = storage_error(err)
            if refused is None:
                raise
            raise click.ClickException(str(refused)) from None

    return wrapper  # type: ignore[return-value]
