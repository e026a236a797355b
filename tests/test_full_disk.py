"""A full disk, for real: stages writing onto a tiny tmpfs end in one line naming the path and the cause.

torch's zip writer reports a full disk as `[enforce fail at inline_container.cc:...] unexpected pos`
(a RuntimeError, not an OSError) and safetensors as `I/O error`; `os.pwrite` names no file. None of
that may reach the user as a traceback, and nothing half-written may stay. Mounting needs root (as on
these machines and in CI); elsewhere the tests skip, and test_bad_inputs.py injects ENOSPC instead.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, STAGE_ENV, pretrain_folder
from helpers.one_line import one_error_line, write_params_file


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """`tiny_disk("4m")`: a tmpfs of that size, unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk-{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def run_examples(folder: Path, out: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(REPO / "stages" / "examples.py"), "prepared", str(out), "examples.json"]
    return subprocess.run(command, cwd=folder, env=STAGE_ENV, capture_output=True, text=True, timeout=180)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_examples_on_a_full_disk_keep_the_earlier_examples(tiny_disk: Callable[[str], Path], sample_prepared: Path,
                                                           tmp_path: Path) -> None:
    disk = tiny_disk("4m")
    folder = tmp_path / "stage"
    folder.mkdir()
    (folder / "prepared").symlink_to(sample_prepared)
    write_params_file(folder, {})
    assert run_examples(folder, disk / "examples").returncode == 0
    before = digest(disk / "examples")
    write_params_file(folder, {"examples.dupe_factor": 3})  # three times the training examples: no room
    line = one_error_line(run_examples(folder, disk / "examples"), "no space left on device", "MB free on",
                          "earlier outputs are intact")
    assert str(disk) in line and "Traceback" not in line
    assert digest(disk / "examples") == before
    assert sorted(p.name for p in disk.iterdir()) == ["examples"]  # no temporary sibling left


def test_a_checkpoint_on_a_full_disk_is_one_line(tiny_disk: Callable[[str], Path], sample_examples: Path,
                                                  tmp_path: Path) -> None:
    disk = tiny_disk("1m")  # less than the tiny model's weights and Adam's state
    folder = pretrain_folder(tmp_path / "run", sample_examples)
    done = subprocess.run([sys.executable, str(REPO / "stages" / "pretrain.py"), "examples", str(disk / "checkpoint"),
                           "metrics/pretrain.json", "plots/loss.csv", "plots/loss.png", "plots/valid.csv"],
                          cwd=folder, env=STAGE_ENV, capture_output=True, text=True, timeout=180)
    work = disk / ".bertpipe" / "checkpoints"  # where checkpoints are written (bertpipe.training.workdir)
    (trajectory,) = [p for p in work.iterdir() if p.is_dir()]  # beside it: the trajectory's lock file
    one_error_line(done, f"writing checkpoint {trajectory / 'step-0000002'} failed (no space left on device",
                   "no earlier checkpoint exists")
    assert list(trajectory.iterdir()) == []
