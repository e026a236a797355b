"""DVC stage `examples`: masked-LM and next-sentence examples as memory-mappable arrays.

Reads params.seed and params.examples; all the work is in bertpipe/examples.py.
Usage: python stages/examples.py data/prepared data/examples metrics/examples.json
"""

from __future__ import annotations

from pathlib import Path

import click

from bertpipe.atomic import atomic_dir, write_json
from bertpipe.config import load_params
from bertpipe.examples import build_examples
from bertpipe.stage import one_line_errors


@click.command()
@click.argument("prepared_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("metrics_file", type=click.Path(dir_okay=False, path_type=Path))
@one_line_errors
def main(prepared_dir: Path, out_dir: Path, metrics_file: Path) -> None:
    """Train and valid examples from PREPARED_DIR into OUT_DIR, their statistics into METRICS_FILE."""
    params = load_params()
    with atomic_dir(out_dir) as tmp:
        metrics = build_examples(prepared_dir, tmp, params.examples, params.seed)
    write_json(metrics_file, metrics)


if __name__ == "__main__":
    main()
