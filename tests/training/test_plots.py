"""bertpipe/training/plots.py: the loss table DVC plots read, written atomically, and the seed's figure."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bertpipe.training.plots import loss_table, write_csv, write_loss_csv, write_loss_png


def test_loss_table_is_one_row_per_step_from_1(tmp_path: Path) -> None:
    rows = [(6.0, 0.7), (5.5, 0.69), (float("nan"), float("nan"))]
    table = loss_table([{"mlm_loss": mlm, "nsp_loss": nsp, "lr": 0.01} for mlm, nsp in rows])
    assert table["step"].tolist() == [1, 2, 3] and list(table.columns) == ["step", "mlm_loss", "nsp_loss", "lr"]
    write_loss_csv(table, tmp_path / "plots" / "loss.csv")
    read = pd.read_csv(tmp_path / "plots" / "loss.csv")
    assert list(read.columns) == ["step", "mlm_loss", "nsp_loss"] and read["mlm_loss"].tolist()[:2] == [6.0, 5.5]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["loss.csv"]  # no temporary left


def test_csv_keeps_six_significant_digits(tmp_path: Path) -> None:
    write_csv(pd.DataFrame({"step": [10], "valid_mlm_loss": [5.123456789]}), tmp_path / "valid.csv")
    assert (tmp_path / "valid.csv").read_text() == "step,valid_mlm_loss\n10,5.12346\n"


def test_the_figure_is_a_png(tmp_path: Path) -> None:
    rows = [{"mlm_loss": 6.0, "nsp_loss": 0.7, "lr": 0.01}, {"mlm_loss": 5.5, "nsp_loss": 0.69, "lr": 0.01}]
    write_loss_png(loss_table(rows), tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
