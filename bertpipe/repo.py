"""Where the repository a stage runs for is, whatever folder DVC runs the stage in.

`dvc exp run --temp` and queued experiments run inside `.dvc/tmp/exps/...`: a copy of the
repository (its own `.dvc/` included) inside the real one, deleted afterwards. What must outlive
such a run (the MLflow store, checkpoints of an interrupted run) belongs to the real repository, and
a relative path in params.yaml means the same folder in every run, as DVC's own `dvc.yaml` paths do:
a corpus kept inside the repository (git-ignored, so absent from the copy) is found from all of them.
"""

from __future__ import annotations

import os
from pathlib import Path


def repo_root(start: Path | None = None) -> Path:
    """The repository that holds `start` (default: the working directory), also from inside
    `.dvc/tmp/exps/...` and from its subfolders; outside any DVC repository `$DVC_ROOT`, else `start`."""
    start = (start or Path.cwd()).resolve()
    folders = (start, *start.parents)
    for folder in folders:
        if folder.name == ".dvc":
            return folder.parent
    for folder in folders:
        if (folder / ".dvc").is_dir():
            return folder
    return Path(os.environ.get("DVC_ROOT", start)).resolve()


def repo_path(value: str | Path) -> Path:
    """A path from params.yaml: `~` expanded, a relative one taken from the repository (`repo_root`),
    so it names the same file in the workspace, `--temp` and queued experiments alike."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else repo_root() / path
