"""The README's tables of command output are what those commands print today; its tree is the code's."""

from __future__ import annotations

import re
import shlex

import pytest
from click.testing import CliRunner
from conftest import REPO

from bertpipe.cli import main

PLAN_MEMORY = ["plan-memory", "--preset", "large", "--max-len", "512"]


def table_after(marker: str) -> list[list[str]]:
    """The cells of the first Markdown table after the line containing `marker`, header excluded."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line)
    rows = []
    for line in lines[start + 1:]:
        if not line.startswith("|") and rows:
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[2:]


def plan(options: list[str], precision: str) -> str:
    result = CliRunner().invoke(main, [*PLAN_MEMORY, *options, "--precision", precision])
    return result.output


@pytest.mark.parametrize("row", table_after("bertpipe plan-memory --preset large --max-len 512 --precision P"),
                         ids=lambda row: row[0])
def test_plan_memory_table_is_what_the_command_prints(row: list[str]) -> None:
    options, _, fp32, bf16, peaks = row
    printed = {p: plan(shlex.split(options.strip("`")), p) for p in ("fp32", "bf16")}
    for precision, cell in (("fp32", fp32), ("bf16", bf16)):
        fits = re.search(r"micro-batches of (\d+), (\d+) accumulated", printed[precision])
        assert (f"{fits[1]}, {fits[2]}" if fits else "stops") == cell, printed[precision]
    peak = [re.search(r"estimated peak ([\d.]+) GiB", printed[p])[1] for p in ("fp32", "bf16")]
    assert peaks.startswith(f"{peak[0]} / {peak[1]} GiB"), printed
    usable = re.search(r"([\d.]+) GiB usable", printed["fp32"])[1]
    assert "usable" not in peaks or f"{usable} GiB usable" in peaks


def tree_listing() -> dict[str, set[str]]:
    """The modules the README's tree names, by folder: `data/` under `bertpipe/` is `bertpipe/data`."""
    block = (REPO / "README.md").read_text().split("## The pipeline", 1)[1].split("```")[1]
    listed: dict[str, set[str]] = {}
    folder = package = ""
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        names = re.split(r"\s{2,}", line.strip())[0]
        if names.endswith("/"):
            folder, package = (names[:-1], names[:-1]) if indent == 0 else (folder, f"{folder}/{names[:-1]}")
        elif indent:
            where = package if indent >= 4 else folder
            listed.setdefault(where, set()).update(n.strip() for n in names.split(",") if n.strip().endswith(".py"))
    return listed


def test_the_readme_tree_names_every_module_where_it_lives() -> None:
    listed = tree_listing()
    for folder in ("stages", "bertpipe", "bertpipe/data", "bertpipe/model", "bertpipe/training",
                   "bertpipe/tracking", "bertpipe/export"):
        on_disk = {p.name for p in (REPO / folder).glob("*.py") if p.name != "__init__.py"}
        assert listed.get(folder, set()) == on_disk, folder
