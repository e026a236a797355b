"""Where the repository a stage runs for is, whatever folder DVC runs the stage in.

`dvc exp run --temp` and queued experiments run inside `.dvc/tmp/exps/...`: a copy of the
repository (its own `.dvc/` included) inside the real one, deleted afterwards. What must outlive
such a run (the MLflow store, checkpoints of an interrupted run) belongs to the real repository.
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
