"""DVC stage `export`: the newest checkpoint as a Hugging Face model folder, plus embeddings and d2l's demo.

Reads params.export (the sentences to encode); all the work is in bertpipe/export.py.
Usage: python stages/export.py models/checkpoint data/prepared models/bert data/embeddings metrics/export.json
"""

from __future__ import annotations

from pathlib import Path

import click

from bertpipe.atomic import atomic_dir, write_json
from bertpipe.config import load_params
from bertpipe.export import DEMO_WORD, export
from bertpipe.stage import one_line_errors

PathArg = click.Path(path_type=Path)


@click.command()
@click.argument("checkpoint_dir", type=PathArg)
@click.argument("prepared_dir", type=PathArg)
@click.argument("model_dir", type=PathArg)
@click.argument("embeddings_dir", type=PathArg)
@click.argument("metrics_file", type=PathArg)
@one_line_errors
def main(checkpoint_dir: Path, prepared_dir: Path, model_dir: Path, embeddings_dir: Path, metrics_file: Path) -> None:
    """Export the newest checkpoint in CHECKPOINT_DIR to MODEL_DIR, vectors to EMBEDDINGS_DIR."""
    params = load_params()
    with atomic_dir(model_dir) as model_tmp, atomic_dir(embeddings_dir) as embeddings_tmp:
        metrics = export(checkpoint_dir, prepared_dir, model_tmp, embeddings_tmp, params.export)
    write_json(metrics_file, metrics)
    click.echo(f"Exported step {metrics['step']} to {model_dir} ({metrics['parameters']:,} parameters)")
    similarity = metrics.get(f"{DEMO_WORD}_cosine_similarity")
    if similarity is not None:
        click.echo(f"cosine similarity of '{DEMO_WORD}' across contexts: {similarity:.4f}")


if __name__ == "__main__":
    main()
