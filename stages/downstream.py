"""DVC stage `downstream`: the export fine-tuned on every task of data/tasks (and, as the floor, a random start of the
same shape; for a continued run also the checkpoint it started from), dev scores into METRICS_FILE and onto the
MLflow run that trained the checkpoint.

Reads params.downstream and params.mlflow.enabled; the work is in bertpipe/downstream/downstream.py.
Usage: python stages/downstream.py models/bert data/tasks metrics/export.json metrics/downstream.json \
           --init models/init
"""

from __future__ import annotations

from pathlib import Path

import click

from bertpipe.atomic import write_json
from bertpipe.config import load_params
from bertpipe.stage import entry_point

PathArg = click.Path(path_type=Path)


@click.command()
@click.argument("model_dir", type=PathArg)
@click.argument("tasks_dir", type=PathArg)
@click.argument("export_metrics", type=PathArg)
@click.argument("metrics_file", type=PathArg)
@click.option("--init", "init_dir", type=PathArg, help="the init stage's folder (models/init): a checkpoint there "
                                                       "is fine-tuned too, beside the export")
@entry_point
def main(model_dir: Path, tasks_dir: Path, export_metrics: Path, metrics_file: Path, init_dir: Path | None) -> None:
    """Fine-tune MODEL_DIR on each task of TASKS_DIR; scores into METRICS_FILE."""
    params = load_params()  # a bad value stops here, before torch and transformers take seconds to import
    from bertpipe.downstream.downstream import run_downstream

    write_json(metrics_file, run_downstream(model_dir, tasks_dir, export_metrics, params.downstream, params.mlflow,
                                            init_dir))


if __name__ == "__main__":
    main()
