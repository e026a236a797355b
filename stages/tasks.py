"""DVC stage `tasks`: the labelled tasks of downstream.tasks (GLUE's, or your own) fetched, verified and written
to OUT_DIR in one format, so that changing a fine-tuning key never downloads again.

Reads params.downstream (tasks, source); the work is in bertpipe/downstream/tasks.py.
Usage: python stages/tasks.py data/tasks
"""

from __future__ import annotations

from pathlib import Path

import click

from bertpipe.config import load_params
from bertpipe.downstream.tasks import build_tasks
from bertpipe.stage import entry_point


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@entry_point
def main(out_dir: Path) -> None:
    """Fetch and verify every task of downstream.tasks into OUT_DIR."""
    build_tasks(load_params().downstream, out_dir)


if __name__ == "__main__":
    main()
