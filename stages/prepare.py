"""DVC stage `prepare`: the corpus read into sentences, a tokenizer (d2l's words or BERT's WordPiece), token ids.

Reads params.prepare; the work is in bertpipe/data/prepare.py.
Usage: python stages/prepare.py data/raw data/prepared metrics/prepare.json
"""

from __future__ import annotations

from pathlib import Path

import click

from bertpipe.atomic import write_json
from bertpipe.config import load_params
from bertpipe.data.prepare import prepare
from bertpipe.stage import entry_point


@click.command()
@click.argument("raw_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("metrics_file", type=click.Path(dir_okay=False, path_type=Path))
@entry_point
def main(raw_dir: Path, out_dir: Path, metrics_file: Path) -> None:
    """Tokenized train/valid splits, tokenizer.json and vocab.parquet into OUT_DIR, statistics into METRICS_FILE."""
    write_json(metrics_file, prepare(raw_dir, out_dir, load_params().prepare))


if __name__ == "__main__":
    main()
