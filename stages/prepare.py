"""DVC stage `prepare`: the corpus read into sentences, a tokenizer (d2l's words, BERT's WordPiece trained here, or
the starting checkpoint's in models/init), token ids.

Reads params.prepare (and model.init); the work is in bertpipe/data/prepare.py.
Usage: python stages/prepare.py data/raw data/prepared metrics/prepare.json --init models/init
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
@click.option("--init", "init_dir", type=click.Path(file_okay=False, path_type=Path),
              help="the init stage's folder (models/init), whose tokenizer prepare.tokenizer: pretrained reads")
@entry_point
def main(raw_dir: Path, out_dir: Path, metrics_file: Path, init_dir: Path | None) -> None:
    """Tokenized train/valid splits, tokenizer.json and vocab.parquet into OUT_DIR, statistics into METRICS_FILE."""
    write_json(metrics_file, prepare(raw_dir, out_dir, load_params().prepare, init_dir))


if __name__ == "__main__":
    main()
