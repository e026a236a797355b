"""The loss curves as DVC plots data (CSV) and as the seed's animator figure (PNG)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from bertpipe.atomic import atomic_path


def loss_table(history: Sequence[Mapping[str, float]]) -> pd.DataFrame:
    """One row per step: step (1-based), then the history's columns (mlm_loss, nsp_loss, lr)."""
    table = pd.DataFrame(list(history), columns=list(history[0]) if history else ["mlm_loss", "nsp_loss"])
    table.insert(0, "step", range(1, len(table) + 1))
    return table


def write_loss_csv(table: pd.DataFrame, path: Path) -> None:
    """plots/loss.csv: step, mlm_loss, nsp_loss. Without the NSP head (`train.objective: mlm`) nsp_loss is
    left empty rather than left out: DVC drops a revision whose rows lack a column of the plot's `y`, and
    `dvc plots diff` must draw the MLM curves of both kinds of run."""
    write_csv(table.reindex(columns=["step", "mlm_loss", "nsp_loss"]), path)


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """A table for `dvc plots`, 6 significant digits, written atomically."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")


def write_loss_png(table: pd.DataFrame, path: Path) -> None:
    """Both losses (MLM alone with `train.objective: mlm`) against the step, as d2l's Animator draws them
    during `train_bert`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    ax.plot(table["step"], table["mlm_loss"], label="mlm")
    if "nsp_loss" in table:
        ax.plot(table["step"], table["nsp_loss"], linestyle="--", label="nsp")
    ax.set(xlabel="step", ylabel="loss", xlim=(1, max(len(table), 2)))
    ax.grid(True)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
