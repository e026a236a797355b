"""What a stage that stops must show: exit status 1, no traceback, one `Error:` line naming the cause."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from conftest import params_with


def write_params_file(folder: Path, overrides: Mapping[str, Any]) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump(params_with(overrides), sort_keys=False), encoding="utf-8")


def one_error_line(done: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit status 1, no traceback, and stderr ending in a single `Error: ...` line holding `words`."""
    assert done.returncode == 1, f"exit {done.returncode}:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), done.stderr[-3000:]
    assert sum(line.startswith("Error:") for line in lines) == 1, done.stderr[-3000:]
    for word in words:
        assert word in lines[-1], f"{word!r} not in {lines[-1]!r}"
    return lines[-1]
