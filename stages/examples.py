"""DVC stage `examples`: masked-LM and next-sentence examples as memory-mappable arrays.

Reads params.seed, params.examples and params.train.objective (single segments for MLM alone); the work
is in bertpipe/data/examples.py.
Usage: python stages/examples.py data/prepared data/examples metrics/examples.json
"""

from __future__ import annotations

from pathlib import Path

import click

from bertpipe.atomic import write_json
from bertpipe.config import load_params
from bertpipe.data.examples import build_examples
from bertpipe.stage import entry_point


@click.command()
@click.argument("prepared_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("metrics_file", type=click.Path(dir_okay=False, path_type=Path))
@entry_point
def main(prepared_dir: Path, out_dir: Path, metrics_file: Path) -> None:
    """Train and valid examples from PREPARED_DIR into OUT_DIR, their statistics into METRICS_FILE."""
    params = load_params()
    metrics = build_examples(prepared_dir, out_dir, params.examples, params.seed, params.train.objective)
    write_json(metrics_file, metrics)


if __name__ == "__main__":
    main()
