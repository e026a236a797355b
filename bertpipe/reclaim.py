"""Disk that bertpipe's runs leave behind and nothing else removes: what `bertpipe gc` lists, and removes with `--yes`.

Three things grow with every experiment, and neither `dvc gc` nor `mlflow gc` touches them:

- a stopped pretrain run's work folder, `.bertpipe/checkpoints/<trajectory>/` (`bertpipe.training.workdir`): a
  completed run deletes its own, a stopped one keeps it so that the same command resumes. A checkpoint holds the fp32
  weights and Adam's two moments, 12 bytes a parameter: 1.1 GiB at BERT-base (WikiText-2's vocabulary), 3.4 GiB for
  the newest two and the best;
- the trajectory's lock file beside it, `<trajectory>.lock`: filelock leaves the file in place when released (waiters
  share its inode), so one stays for every trajectory ever trained;
- the LoggedModel of every export in the store's `mlruns/` (`bertpipe.tracking.model`, 388 MiB at BERT-base):
  deleting its run and then `mlflow gc` leave it, for a LoggedModel is not one of the run's artifacts.

What may go (`survey`), and nothing else:

- a work folder, when (1) no process holds its lock: no pretrain run trains it or waits for it; (2) no params
  describe its trajectory: neither the workspace's params.yaml nor that of an experiment in DVC's queue (queued,
  running, or failed and not yet removed, so that it may be rerun) or of a `--temp` run in progress. Params describe a
  trajectory when the fingerprint the code computes for them (`bertpipe.training.checkpoint.trajectory_spec`) is the
  folder's name, taking from the folder's record what params.yaml does not decide: the precision that `auto` settled
  on, and the data (vocabulary and example counts, known only once the data stages have run; the examples' params and
  seed must match). Params that cannot be read, or a queue that cannot, keep every folder. A folder with no complete
  checkpoint holds nothing to resume. (3) It lies in the repository, reached through no symbolic link;
- a lock file whose trajectory has no work folder, held by no process;
- a LoggedModel of the embedded SQLite store whose source run is deleted (MLflow's `deleted` stage) or no longer in
  the store, that no registered model version is made from, and whose folder lies in the store's artifact root
  (`mlruns/` beside mlflow.db).

Removing holds the trajectory's lock, the one `WorkFolder.lock` takes, while its folder and lock file go: a run that
took it first keeps its folder, and one starting meanwhile waits, then starts afresh. A LoggedModel is first marked
deleted through MLflow's API (`mlflow gc` later drops its row), then its folder goes. A path is removed only where it
resolves inside the repository (work folders, locks) or the store's artifact root (models), and links inside a folder
are removed, never followed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from bertpipe.config import Params, load_params, parse_params
from bertpipe.errors import PipelineError, cause, first_line
from bertpipe.model.bert import BertConfig
from bertpipe.training.checkpoint import CheckpointError, fingerprint, list_checkpoints, read_state, trajectory_spec
from bertpipe.training.workdir import WORK_ROOT

PARAMS = "params.yaml"
_KEY = re.compile(r"[0-9a-f]{16}")  # a trajectory's fingerprint (`bertpipe.training.checkpoint.fingerprint`)


@dataclass(frozen=True)
class Item:
    """A path and the verdict on it: why it can go, or why it stays."""

    path: Path
    why: str
    size: int = 0  # bytes its removal frees
    within: Path | None = None  # where it must resolve to be removed: the repository, or the store's artifact root
    lock: Path | None = None  # the trajectory lock held while it goes (a work folder's, a lock file itself)
    model_id: str | None = None  # the LoggedModel marked deleted in the store before its folder goes


@dataclass
class Survey:
    """What `survey` found in a repository and its MLflow store."""

    root: Path
    uri: str
    reclaimable: list[Item] = field(default_factory=list)
    kept: list[Item] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Claimant:
    """Settings a pretrain run may still train with; `params` None when they cannot be read, which claims every
    trajectory."""

    name: str
    params: Params | None


def survey(root: Path, uri: str) -> Survey:
    """What can go and what stays, by the rules above; reads and probes locks, removes nothing."""
    found = Survey(root, uri)
    _survey_work(found)
    _survey_models(found)
    return found


def _workspace_claimant(root: Path) -> Claimant:
    try:
        return Claimant("the workspace's params.yaml", load_params(root / PARAMS))
    except PipelineError as err:
        return Claimant(f"the workspace's params.yaml, which cannot be read ({err})", None)


def _experiment_claimants(root: Path) -> list[Claimant]:
    """The params of every experiment DVC may still run: queued, running (from the queue or `--temp`), and failed ones
    while the queue lists them. DVC has no public API for its queue, so this reads it as `dvc queue status` and
    `dvc exp show` do; when that fails, a claimant of everything keeps every work folder."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    from dvc.scm import NoSCMError

    try:
        with Repo(str(root)) as repo:
            queue = repo.experiments.celery_queue
            entries = [*queue.iter_queued(), *queue.iter_active(), *(done.entry for done in queue.iter_failed()),
                       *repo.experiments.tempdir_queue.iter_active()]
            params_file = os.path.relpath(root / PARAMS, repo.scm.root_dir)
            return [_claimant(f"DVC experiment {entry.name or entry.stash_rev[:7]}",
                              repo.scm.get_fs(entry.stash_rev).read_text(params_file)) for entry in entries]
    except (NotDvcRepoError, NoSCMError):
        return []  # outside DVC, or DVC without git: no experiments
    except Exception as err:  # DVC's internals raise many types; not knowing keeps everything
        return [Claimant(f"DVC's experiment queue, which cannot be read ({cause(err)})", None)]


def _claimant(name: str, text: str) -> Claimant:
    """params.yaml's text read as `load_params` reads the file."""
    try:
        return Claimant(f"{name}'s params.yaml", parse_params(text, f"{name}'s params.yaml"))
    except PipelineError as err:
        return Claimant(f"{name}'s params.yaml, which cannot be read ({first_line(err)})", None)


def describes(params: Params, key: str, spec: dict[str, Any]) -> bool:
    """Whether a pretrain run with `params` resumes trajectory `key`, whose checkpoints record `spec`: the
    fingerprint of `params` is `key`, with the precision `auto` settled on and the data taken from `spec`; for a
    continued run (`model.init`) also the model's shape and the starting weights, which its checkpoint decides,
    when `spec` started from the same `model.init`."""
    meta, stored, init = spec.get("examples", {}), spec.get("train", {}), spec.get("init")
    if meta.get("params") != params.examples.model_dump() or meta.get("seed") != params.seed:
        return False
    if not isinstance(meta.get("vocab_size"), int):
        return False
    train = params.train
    if train.precision == "auto":
        train = train.model_copy(update={"precision": stored.get("precision")})
    if not params.model.init:
        config = BertConfig.from_params(params.model, meta["vocab_size"])
    elif isinstance(init, dict) and init.get("model") == params.model.init and isinstance(spec.get("model"), dict):
        config = BertConfig(**spec["model"])
    else:
        return False
    return fingerprint(trajectory_spec(config, train, params.seed, meta, init if params.model.init else None)) == key


def _survey_work(found: Survey) -> None:
    work_root = found.root / WORK_ROOT
    if not work_root.is_dir():
        return
    claimants = [_workspace_claimant(found.root), *_experiment_claimants(found.root)]
    for path in sorted(work_root.iterdir()):
        key = path.name.removesuffix(".lock")
        if not _KEY.fullmatch(key):
            continue  # not bertpipe's
        lock = work_root / f"{key}.lock"
        if path == lock and not (work_root / key).exists():
            _sort_into(found, _lock_verdict(path, found.root))
        elif path.name == key and path.is_dir():
            _sort_into(found, _work_verdict(path, lock, found.root, claimants))


def _sort_into(found: Survey, verdict: tuple[bool, Item]) -> None:
    goes, item = verdict
    (found.reclaimable if goes else found.kept).append(item)


def _lock_verdict(lock: Path, root: Path) -> tuple[bool, Item]:
    if not _inside(lock, root) or not lock.is_file():
        return False, Item(lock, "not a file inside the repository (a symbolic link?)")
    if _held(lock):
        return False, Item(lock, "a pretrain run holds it (one before its first checkpoint)")
    return True, Item(lock, "lock file of a trajectory with no work folder, held by no process", within=root, lock=lock)


def _work_verdict(folder: Path, lock: Path, root: Path, claimants: list[Claimant]) -> tuple[bool, Item]:
    if not _inside(folder, root) or lock.is_symlink():
        return False, Item(folder, "it or its lock file lies outside the repository (a symbolic link leads there)")
    freed, total = tree_bytes(folder)
    shared = f"; {human(total - freed)} more are hard links that stay (models/checkpoint)" if total > freed else ""
    if _held(lock):
        return False, Item(folder, "a pretrain run holds its lock (training, or waiting to)", freed)
    checkpoints = list_checkpoints(folder)
    if not checkpoints:
        return True, Item(folder, f"work folder with no complete checkpoint, nothing to resume{shared}", freed,
                          root, lock)
    state = _newest_state(checkpoints)
    if state is None:
        return False, Item(folder, "no checkpoint's state.json can be read: look at it, then delete it by hand", freed)
    spec = state.get("spec", {})
    where = f"step {state['state']['step']} of {spec.get('train', {}).get('steps', '?')}"
    for claimant in claimants:
        if claimant.params is None:
            return False, Item(folder, f"{claimant.name}: every work folder is kept ({where})", freed)
        if describes(claimant.params, folder.name, spec):
            return False, Item(folder, f"{claimant.name} resumes it ({where})", freed)
    why = (f"work folder of a stopped pretrain run ({where}) that no params describe: not the workspace's, nor a "
           f"queued, running or failed DVC experiment's; with its lock file{shared}")
    return True, Item(folder, why, freed, root, lock)


def _newest_state(checkpoints: list[Path]) -> dict[str, Any] | None:
    """The newest readable checkpoint record; every checkpoint of a folder has the same spec."""
    for path in reversed(checkpoints):
        with contextlib.suppress(CheckpointError):
            return read_state(path)
    return None


def _survey_models(found: Survey) -> None:
    """LoggedModels of deleted or vanished runs, in the embedded store only (a server collects its own)."""
    from bertpipe.tracking.store import TrackingError, artifact_root, client, local_path, sqlite_path, store_lock

    database = sqlite_path(found.uri)
    if database is None:
        found.notes.append(f"MLflow store {found.uri} is a server: its LoggedModels are its own to collect")
        return
    if not database.exists():
        return
    try:
        mlflow_client = client(found.uri)
    except TrackingError as err:
        found.notes.append(f"{err}: its LoggedModels were not looked at")
        return
    from mlflow.entities import ViewType

    artifacts = local_path(artifact_root(found.uri))
    with store_lock(found.uri):
        experiments = [e.experiment_id for e in _every(lambda token: mlflow_client.search_experiments(
            view_type=ViewType.ALL, page_token=token))]
        models = list(_every(lambda token: mlflow_client.search_logged_models(experiments, page_token=token)))
        registered = {_registered_model(version) for version in _every(
            lambda token: mlflow_client.search_model_versions(page_token=token))}
        deleted_runs = sum(1 for _ in _every(lambda token: mlflow_client.search_runs(
            experiments, run_view_type=ViewType.DELETED_ONLY, page_token=token)))
        for model in models:
            source = _source_state(mlflow_client, model.source_run_id)
            if source is not None:
                _sort_into(found, _model_verdict(model, source, model.model_id in registered, artifacts))
    if deleted_runs:
        found.notes.append(f"deleted MLflow runs: {deleted_runs}; `mlflow gc --backend-store-uri {found.uri} "
                           f"--tracking-uri {found.uri}` removes them for good, with their artifacts")


def _every(search: Callable[[str | None], Any]) -> Iterator[Any]:
    """Every item of one of MLflow's paged searches."""
    token = None
    while True:
        page = search(token)
        yield from page
        token = page.token
        if not token:
            return


def _registered_model(version: Any) -> str | None:
    """The LoggedModel a registered version is made from: its `model_id`, or the id in a `models:/m-...` source."""
    source = version.source or ""
    from_uri = source.removeprefix("models:/").split("/")[0] if source.startswith("models:/") else None
    return version.model_id or from_uri


def _source_state(mlflow_client: Any, run_id: str | None) -> str | None:
    """How a model's source run is gone, None for a live one (or for a model made outside any run)."""
    from mlflow.exceptions import MlflowException

    if run_id is None:
        return None
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return "no longer in the store"
        raise
    return "deleted" if run.info.lifecycle_stage == "deleted" else None


def _model_verdict(model: Any, source: str, registered: bool, artifacts: Path) -> tuple[bool, Item]:
    """The model's folder is its artifact location's parent, `.../models/<model id>/` (MLflow's layout)."""
    from bertpipe.tracking.store import local_path

    run = f"LoggedModel {model.model_id} of MLflow run {model.source_run_id}, which is {source}"
    location = local_path(model.artifact_location)
    if location is None or location.parent.name != model.model_id or not _inside(location.parent, artifacts):
        return False, Item(Path(model.artifact_location), f"{run}: its folder is not in {artifacts}")
    folder = location.parent
    if registered:
        return False, Item(folder, f"{run}: a registered model version is made from it", tree_bytes(folder)[0])
    return True, Item(folder, run, tree_bytes(folder)[0], artifacts, model_id=model.model_id)


def remove(found: Survey, echo: Callable[[str], None]) -> int:
    """Remove what `found` lists as reclaimable, each item under its lock; a line per item; the bytes freed."""
    freed = 0
    mlflow_client = None
    for item in found.reclaimable:
        if item.model_id is not None and mlflow_client is None:
            from bertpipe.tracking.store import client

            mlflow_client = client(found.uri)
        shown = _show(item.path, found.root)
        kept = _remove(item, found.uri, mlflow_client)
        if kept:
            echo(f"kept     {shown}: {kept}")
            continue
        freed += item.size
        echo(f"removed  {human(item.size):>10}  {shown}")
    echo(f"freed: {human(freed)}")
    return freed


def _remove(item: Item, uri: str, mlflow_client: Any) -> str:
    """Remove one item; why it stays when it does (a lock taken meanwhile, a path that now leads elsewhere)."""
    if item.within is None or not _inside(item.path, item.within):
        return f"it no longer lies inside {item.within}"
    if item.model_id is not None:
        from bertpipe.tracking.store import store_lock

        with store_lock(uri):
            mlflow_client.delete_logged_model(item.model_id)
        _delete(item.path)
        return ""
    with _unless_held(item.lock) as free:
        if not free:
            return "a pretrain run took its lock meanwhile"
        _delete(item.path)
        item.lock.unlink(missing_ok=True)  # while held: a waiter that opened it sees it gone and opens the path anew
    return ""


def _delete(path: Path) -> None:
    """A folder with everything in it (symbolic links inside removed, never followed), or a file."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _inside(path: Path, within: Path) -> bool:
    """`path` is not a symbolic link and resolves inside `within` (through no link out of it)."""
    return not path.is_symlink() and path.resolve().is_relative_to(within.resolve())


def _held(lock: Path) -> bool:
    """Whether a process holds the lock file: a holder keeps its file, so a missing one is free."""
    if not lock.exists():
        return False
    with _unless_held(lock) as free:
        return not free


@contextlib.contextmanager
def _unless_held(lock: Path) -> Iterator[bool]:
    """Hold `lock` for the block with `WorkFolder.lock`'s mechanism, if no process holds it; yields whether it did."""
    held = FileLock(lock)
    try:
        held.acquire(timeout=0)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        held.release()


def tree_bytes(path: Path) -> tuple[int, int]:
    """(Bytes that removing `path` frees, bytes of all its files). A file is freed once every hard link to it is inside
    `path`: a checkpoint that models/checkpoint still links to stays on disk."""
    links: Counter[tuple[int, int]] = Counter()
    stats: dict[tuple[int, int], os.stat_result] = {}
    for folder, _, files in os.walk(path):  # symbolic links to folders are not entered
        for name in files:
            stat = os.lstat(os.path.join(folder, name))
            links[stat.st_dev, stat.st_ino] += 1
            stats[stat.st_dev, stat.st_ino] = stat
    total = sum(stat.st_size for stat in stats.values())
    return sum(stat.st_size for key, stat in stats.items() if links[key] >= stat.st_nlink), total


def report(found: Survey, echo: Callable[[str], None]) -> None:
    """The dry run's listing: what would go, with sizes and why, the total; what stays and why; what else can."""
    echo("a dry run: nothing was removed; `bertpipe gc --yes` removes what is reclaimable")
    echo("reclaimable:" if found.reclaimable else "reclaimable: nothing")
    for item in found.reclaimable:
        echo(f"  {human(item.size):>10}  {_show(item.path, found.root)}  {item.why}")
    echo(f"total: {human(sum(item.size for item in found.reclaimable))}")
    if found.kept:
        echo("kept:")
    for item in found.kept:
        echo(f"  {human(item.size):>10}  {_show(item.path, found.root)}  {item.why}")
    for note in found.notes:
        echo(note)


def _show(path: Path, root: Path) -> str:
    shown = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    return shown + "/" if path.is_dir() else shown


def human(size: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
