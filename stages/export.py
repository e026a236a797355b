"""DVC stage `export`: a checkpoint (the best, or the last) as a Hugging Face model folder, embeddings
and d2l's crane demonstration, and the model added to the MLflow run that trained it.

Reads params.export and params.mlflow (enabled, register_model); the work is in bertpipe/export/export.py.
Usage: python stages/export.py models/checkpoint data/prepared models/bert data/embeddings metrics/export.json
"""

from __future__ import annotations

from pathlib import Path

import click

from bertpipe.atomic import write_json
from bertpipe.config import load_params
from bertpipe.stage import entry_point

PathArg = click.Path(path_type=Path)


@click.command()
@click.argument("checkpoint_dir", type=PathArg)
@click.argument("prepared_dir", type=PathArg)
@click.argument("model_dir", type=PathArg)
@click.argument("embeddings_dir", type=PathArg)
@click.argument("metrics_file", type=PathArg)
@entry_point
def main(checkpoint_dir: Path, prepared_dir: Path, model_dir: Path, embeddings_dir: Path, metrics_file: Path) -> None:
    """Export a checkpoint of CHECKPOINT_DIR to MODEL_DIR, vectors to EMBEDDINGS_DIR."""
    params = load_params()  # a bad value stops here, before torch and MLflow take seconds to import
    from bertpipe.export.export import export

    write_json(metrics_file, export(checkpoint_dir, prepared_dir, model_dir, embeddings_dir, params.export,
                                    params.mlflow))


if __name__ == "__main__":
    main()
