"""DVC stage `pretrain`: BERT pretraining (MLM + NSP) on every available GPU, or the CPU.

Reads params.seed, params.model, params.train and params.mlflow; the work is in bertpipe/pretrain.py.
With `train.nproc` > 1 and not already under torchrun, it starts itself under torchrun's launcher.
Usage: python stages/pretrain.py data/examples models/checkpoint metrics/pretrain.json \
           plots/loss.csv plots/loss.png plots/valid.csv
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from bertpipe.config import load_params
from bertpipe.distributed import (
    close_world,
    describe_devices,
    init_world,
    launch,
    resolve_device,
    resolve_nproc,
    under_torchrun,
)
from bertpipe.pretrain import Interrupted, Outputs, check_batch, run_stage
from bertpipe.stage import one_line_errors

PathArg = click.Path(path_type=Path)


@click.command()
@click.argument("examples_dir", type=PathArg)
@click.argument("checkpoint_dir", type=PathArg)
@click.argument("metrics_file", type=PathArg)
@click.argument("loss_csv", type=PathArg)
@click.argument("loss_png", type=PathArg)
@click.argument("valid_csv", type=PathArg)
@one_line_errors
def main(examples_dir: Path, checkpoint_dir: Path, metrics_file: Path, loss_csv: Path, loss_png: Path,
         valid_csv: Path) -> None:
    """Pretrain on EXAMPLES_DIR, checkpointing into CHECKPOINT_DIR (resumed when it matches)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = load_params()
    device = resolve_device(params.train.device)
    nproc = resolve_nproc(params.train.nproc, device)
    check_batch(params.train, nproc)
    if nproc > 1 and not under_torchrun():
        launch(nproc, [__file__, *sys.argv[1:]])
        return
    world = init_world(device)
    try:
        outputs = Outputs(checkpoint_dir, metrics_file, loss_csv, loss_png, valid_csv)
        metrics = run_stage(params, examples_dir, outputs, world)
    except Interrupted as stop:
        click.echo(f"Stopped: {stop}", err=True)
        sys.exit(128 + stop.signum)
    finally:
        close_world(world)
    if metrics is not None:
        click.echo(f"MLM loss {metrics['train_mlm_loss']:.3f}, NSP loss {metrics['train_nsp_loss']:.3f}")
        click.echo(f"{metrics['pairs_per_sec']:.1f} sentence pairs/sec on {describe_devices(world)}")


if __name__ == "__main__":
    main()
