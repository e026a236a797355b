"""DVC stage `download`: the corpus into OUT_DIR, WikiText's wiki.{train,valid,test}.tokens or your own
text as {train,valid,test}.txt.

Reads params.data (dataset, source, urls, checksum); the work is in bertpipe/data/download.py.
Usage: python stages/download.py data/raw
"""

from __future__ import annotations

from pathlib import Path

import click

from bertpipe.config import load_params
from bertpipe.data.download import download
from bertpipe.stage import entry_point


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@entry_point
def main(out_dir: Path) -> None:
    """Download (or take from data.source) and verify the corpus into OUT_DIR."""
    download(load_params().data, out_dir)


if __name__ == "__main__":
    main()
