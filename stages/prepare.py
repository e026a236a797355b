"""DVC stage `prepare`: tokenize WikiText-2 as d2l does and build the vocabulary.

Reads params.prepare (min_freq); all the work is in bertpipe/prepare.py.
Usage: python stages/prepare.py data/raw/wikitext-2 data/prepared metrics/prepare.json
"""

from __future__ import annotations

from pathlib import Path

import click

from bertpipe.atomic import atomic_dir, write_json
from bertpipe.config import load_params
from bertpipe.prepare import prepare
from bertpipe.stage import one_line_errors


@click.command()
@click.argument("raw_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("metrics_file", type=click.Path(dir_okay=False, path_type=Path))
@one_line_errors
def main(raw_dir: Path, out_dir: Path, metrics_file: Path) -> None:
    """Tokenized train/valid splits and vocab.parquet into OUT_DIR, statistics into METRICS_FILE."""
    params = load_params()
    with atomic_dir(out_dir) as tmp:
        stats = prepare(raw_dir, tmp, params.prepare)
    write_json(metrics_file, stats)


if __name__ == "__main__":
    main()
