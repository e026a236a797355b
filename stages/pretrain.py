"""DVC stage `pretrain`: BERT pretraining (MLM + NSP) on every available GPU, or the CPU.

Reads params.seed, params.model, params.train and params.mlflow; the work is in bertpipe/training/pretrain.py
(with `train.nproc` > 1 it starts itself again under torchrun's launcher, one process per rank).
Usage: python stages/pretrain.py data/examples models/checkpoint metrics/pretrain.json \
           plots/loss.csv plots/loss.png plots/valid.csv --init models/init
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from bertpipe.atomic import write_json
from bertpipe.config import load_params
from bertpipe.data.examples_folder import check_examples
from bertpipe.init.folder import model_params, read_start
from bertpipe.stage import entry_point

PathArg = click.Path(path_type=Path)


@click.command()
@click.argument("examples_dir", type=PathArg)
@click.argument("checkpoint_dir", type=PathArg)
@click.argument("metrics_file", type=PathArg)
@click.argument("loss_csv", type=PathArg)
@click.argument("loss_png", type=PathArg)
@click.argument("valid_csv", type=PathArg)
@click.option("--init", "init_dir", type=PathArg, help="the init stage's folder (models/init): the checkpoint "
                                                       "model.init continues, whose config.json gives model.*")
@entry_point
def main(examples_dir: Path, checkpoint_dir: Path, metrics_file: Path, loss_csv: Path, loss_png: Path,
         valid_csv: Path, init_dir: Path | None) -> None:
    """Pretrain on EXAMPLES_DIR, checkpointing into CHECKPOINT_DIR (resumed when it matches)."""
    start = read_start(init_dir) if init_dir is not None else None
    params = model_params(load_params(), start)  # a bad value stops here, before torch and MLflow take seconds
    check_examples(examples_dir, params.model.max_position_embeddings, params.train.objective)  # stale, broken
    if params.train.threads == "auto":  # idle OpenMP threads sleep instead of spinning against other trainings'
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, as torch loads OpenMP: before the import
    from bertpipe.training.pretrain import Outputs, run_stage

    outputs = Outputs(checkpoint_dir, loss_csv, loss_png, valid_csv)
    metrics = run_stage(params, examples_dir, outputs, [__file__, *sys.argv[1:]], start)
    if metrics is not None:
        write_json(metrics_file, metrics)


if __name__ == "__main__":
    main()
