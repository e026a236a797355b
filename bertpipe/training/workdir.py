"""Where a pretrain run's checkpoints live while it trains: a folder of the repository that DVC never touches.

DVC owns the stage's output `models/checkpoint`, and does not keep it across interruptions the way
people rerun experiments: `dvc exp run` first restores the committed outputs (an interrupted run's
checkpoints are deleted), and `--temp` or queued runs work in `.dvc/tmp/exps/...`, which DVC deletes.
So checkpoints are written to `.bertpipe/checkpoints/<fingerprint>/` at the repository's root, one
folder per trajectory (`bertpipe.training.checkpoint.trajectory_spec`: the settings and data the result
depends on), and rerunning the same command (`dvc repro`, the same `dvc exp run`, a requeued
experiment) finds them and resumes. `models/checkpoint` mirrors the folder by hard links after
every save (copies across file systems), so DVC caches, versions and hands the checkpoints to the
export stage as before; the work folder is deleted once the run has completed. Two runs of the same
trajectory at once (`--run-all -j N` of equal settings) take turns: the second waits for the first's
lock and then trains again, since the first deletes the work folder when it completes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from bertpipe.atomic import atomic_dir
from bertpipe.repo import repo_root
from bertpipe.training.checkpoint import CheckpointError, fingerprint, list_checkpoints, read_state

WORK_ROOT = Path(".bertpipe") / "checkpoints"  # under the repository's root; git- and DVC-ignored
log = logging.getLogger(__name__)


class WorkFolder:
    """The checkpoints of one trajectory, and their mirror in the stage's output folder."""

    def __init__(self, out: Path, spec: dict) -> None:
        self.out = Path(out)
        self.spec = spec  # what the run's result depends on (`trajectory_spec`); state.json keeps it
        self.key = fingerprint(spec)
        self.folder = _root_for(self.out.resolve()) / WORK_ROOT / self.key

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Held for the whole run: another run of the same trajectory waits for it (then trains anew: a
        completed run discards the work folder)."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.folder.parent / f"{self.key}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("another run of the same settings is training in %s; waiting for it to finish", self.folder)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def adopt(self) -> None:
        """Take the output folder's checkpoints of this trajectory (restored by DVC, or written before
        checkpoints moved here) when the work folder has none; a broken one stops the run (CheckpointError)."""
        if list_checkpoints(self.folder):
            return
        mine = [path for path in list_checkpoints(self.out) if read_state(path)["fingerprint"] == self.key]
        for path in mine:
            _link_tree(path, self.folder / path.name)

    def publish(self) -> None:
        """Make the output folder hold exactly the work folder's checkpoints (hard links, atomically per
        checkpoint); others there, of other settings, are deleted now that this run has its own."""
        wanted = {path.name: path for path in list_checkpoints(self.folder)}
        self.out.mkdir(parents=True, exist_ok=True)
        for path in list_checkpoints(self.out):
            if path.name not in wanted or _fingerprint(path) != self.key:  # (trajectory, step) names a checkpoint
                shutil.rmtree(path)
        for name, path in wanted.items():
            if not (self.out / name).exists():
                _link_tree(path, self.out / name)

    def discard(self) -> None:
        """The run is complete and published: its work folder is no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _root_for(out: Path) -> Path:
    """The repository the stage runs for when `out` is in it (also from `.dvc/tmp/exps/...`), else
    the folder holding `out` (a library call on a folder of its own)."""
    root = repo_root()
    return root if out.is_relative_to(root) else out.parent


def _fingerprint(path: Path) -> str | None:
    try:
        return read_state(path)["fingerprint"]
    except CheckpointError:
        return None


def _link_tree(source: Path, target: Path) -> None:
    """`target` as a folder of hard links to `source`'s files (copies where links cannot be made)."""
    with atomic_dir(target) as tmp:
        for path in source.iterdir():
            try:
                os.link(path, tmp / path.name)
            except OSError:  # another file system, or one without hard links
                shutil.copy2(path, tmp / path.name)
