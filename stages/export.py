"""DVC stage `export`: the newest checkpoint as a Hugging Face model folder, plus embeddings and d2l's demo.

Reads params.export (the sentences to encode) and params.mlflow (enabled, register_model); the work is
in bertpipe/export.py, and the model joins the pretrain run's MLflow run (bertpipe/tracking.py).
Usage: python stages/export.py models/checkpoint data/prepared models/bert data/embeddings metrics/export.json
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from bertpipe.atomic import atomic_dir, write_json
from bertpipe.config import load_params
from bertpipe.export import DEMO_WORD, export
from bertpipe.stage import one_line_errors
from bertpipe.tracking import log_export

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
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params()
    with atomic_dir(model_dir) as model_tmp, atomic_dir(embeddings_dir) as embeddings_tmp:
        metrics = export(checkpoint_dir, prepared_dir, model_tmp, embeddings_tmp, params.export)
    write_json(metrics_file, metrics)
    if params.mlflow.enabled and metrics.get("mlflow_run_id"):
        log_export(metrics["mlflow_run_id"], model_dir, metrics, params.mlflow.register_model)
    click.echo(f"Exported step {metrics['step']} ({metrics['checkpoint']}) to {model_dir} "
               f"({metrics['parameters']:,} parameters)")
    similarity = metrics.get(f"{DEMO_WORD}_cosine_similarity")
    if similarity is not None:
        click.echo(f"cosine similarity of '{DEMO_WORD}' across contexts: {similarity:.4f} (different words of a "
                   f"sentence: {metrics['token_cosine_mean']:.4f})")
    if metrics["collapsed"]:
        logging.warning("the encoder's outputs have collapsed: different words of a sentence have mean cosine "
                        "%.4f, so the '%s' comparison shows nothing; train longer (README: Training longer on a "
                        "CPU)", metrics["token_cosine_mean"], DEMO_WORD)


if __name__ == "__main__":
    main()
