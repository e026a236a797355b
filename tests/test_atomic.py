"""Atomic writes: all or nothing, nothing left behind, and the usual file modes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from bertpipe.atomic import DIR_MODE, FILE_MODE, atomic_dir, write_json


def test_a_failed_folder_write_keeps_the_old_folder_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_outputs_get_the_usual_modes_not_private_ones(tmp_path: Path) -> None:
    write_json(tmp_path / "metrics.json", {"a": 1})
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "x").write_text("1")
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == FILE_MODE
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == DIR_MODE
    assert (tmp_path / "metrics.json").read_text() == '{\n  "a": 1\n}\n'
