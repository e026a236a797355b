"""DVC stage `init`: the BERT that continued pretraining starts from (`model.init`), fetched once into OUT_DIR.

Reads params.model.init and params.model.init_revision; the work is in bertpipe/init/fetch.py.
Usage: python stages/init.py models/init metrics/init.json
"""

from __future__ import annotations

from pathlib import Path

import click

from bertpipe.atomic import write_json
from bertpipe.config import load_params
from bertpipe.init.fetch import fetch_init
from bertpipe.stage import entry_point

PathArg = click.Path(path_type=Path)


@click.command()
@click.argument("out_dir", type=PathArg)
@click.argument("metrics_file", type=PathArg)
@entry_point
def main(out_dir: Path, metrics_file: Path) -> None:
    """The checkpoint of model.init into OUT_DIR (a marker when it is empty), what was fetched into METRICS_FILE."""
    write_json(metrics_file, fetch_init(load_params().model, out_dir))


if __name__ == "__main__":
    main()
