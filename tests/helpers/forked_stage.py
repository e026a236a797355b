"""A stage run as `python stages/pretrain.py ARGS` (or another stage's script) would run it, in a process
forked from one that has already imported the stage's libraries (multiprocessing's forkserver, test_bad_inputs.py).

Each case of the bad-input catalogue is a fresh process with its own folder, environment, exit status
and output, as a subprocess is; what it saves is importing torch, pandas and MLflow again: a failing
pretrain case took 3-7 s on one core as a subprocess, 0.1-2.7 s forked. The forkserver has run nothing
but those imports, so no torch thread pool exists when it forks (as when a DataLoader forks its workers).
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

PRELOAD = ["torch", "pandas", "mlflow", "mlflow.tracking", "bertpipe.training.pretrain", "bertpipe.data.prepare"]
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(PRELOAD)


def _main(script: str, args: list[str], cwd: str, env: dict[str, str], out: str, err: str, status: str) -> None:
    """The forked child: the stage's folder, environment and output files, then the script as __main__; its
    exit status also goes to the file `status`: under load the forkserver has been seen to lose it (the
    parent's read of it fails and multiprocessing reports 255)."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    if "OMP_NUM_THREADS" in env:  # torch read it when the forkserver imported it
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")  # click's main ends with sys.exit(status)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        Path(status).write_text(str(code))
        raise


def run_stage(script: Path, args: list[str], cwd: Path, env: Mapping[str, str],
              timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run `script ARGS` in `cwd` with exactly `env`; its exit status and output, as subprocess.run gives them."""
    out, err, status = (cwd.with_name(f"{cwd.name}.{kind}") for kind in ("stdout", "stderr", "status"))  # beside it
    status.unlink(missing_ok=True)
    child = _CONTEXT.Process(target=_main, args=(str(script), args, str(cwd), dict(env), str(out), str(err),
                                                 str(status)))
    child.start()
    child.join(timeout)
    if child.exitcode is None:
        child.kill()
        child.join()
        raise subprocess.TimeoutExpired([str(script), *args], timeout)
    code = int(status.read_text()) if child.exitcode == 255 and status.is_file() else child.exitcode
    done = subprocess.CompletedProcess([str(script), *args], code, out.read_text(), err.read_text())
    for path in (out, err, status):
        path.unlink(missing_ok=True)
    return done
