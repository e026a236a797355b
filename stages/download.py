"""DVC stage `download`: WikiText-2 v1 into OUT_DIR as wiki.{train,valid,test}.tokens.

Reads params.data (source, urls, checksum); the work is in bertpipe/download.py.
Usage: python stages/download.py data/raw/wikitext-2
"""

from __future__ import annotations

from pathlib import Path

import click

from bertpipe.config import load_params
from bertpipe.download import download
from bertpipe.stage import entry_point


@click.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@entry_point
def main(out_dir: Path) -> None:
    """Download (or copy from data.source) and verify WikiText-2 v1 into OUT_DIR."""
    download(load_params().data, out_dir)


if __name__ == "__main__":
    main()
