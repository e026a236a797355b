"""The `tasks` stage: every task of `downstream.tasks` fetched, verified and written in one format, data/tasks/.

Your own folders are read and checked first (`bertpipe.downstream.own`), so a bad one stops the stage before
anything is downloaded; then each GLUE task named (only those) comes from `downstream.source`, a folder in
either of GLUE's layouts, or else from the mirrors in order (`bertpipe.downstream.glue`), each original file
checked by size and sha256 before it is read, each parquet file by its rows (and sha256 where recorded).
The folder is built beside data/tasks and swapped in whole (`bertpipe.atomic.atomic_dir`): a failure keeps
the previous one. With no task at all, the stage writes an empty folder and downloads nothing.

data/tasks/, written and read here:
- `tasks.json`: per task its classes (null: a regression), metrics, whether it is a sentence-pair task,
  where it came from, and each split's rows and sha256;
- `<task>/<split>.parquet`: columns `text`, `text_pair` (pair tasks only), `label` (int64 class id, or float32
  score); splits `train` and `validation` (MNLI: `validation_matched`, `validation_mismatched`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bertpipe.atomic import atomic_dir, write_json
from bertpipe.config import DownstreamConfig
from bertpipe.data.archive import check_entry, verify_checksum
from bertpipe.downstream.glue import MIRRORS, TASKS, File, GlueTask, Mirror, Row, parquet_rows, read_original
from bertpipe.downstream.own import OwnTask, read_own_task
from bertpipe.errors import DataError, cause
from bertpipe.fetch import Retry, fetch
from bertpipe.repo import repo_path

log = logging.getLogger(__name__)
META = "tasks.json"
BATCH_ROWS = 50_000  # rows per parquet row group: MNLI's 393k training rows never held as one list


@dataclass(frozen=True)
class TaskData:
    """One task of data/tasks: where its splits are and what its labels mean."""

    name: str
    glue: bool
    labels: tuple[str, ...] | None  # class names in id order; None: a regression score
    metrics: tuple[str, ...]
    pair: bool
    rows: dict[str, int]  # per split
    sha256: dict[str, str]  # per split file
    folder: Path

    @property
    def scored(self) -> tuple[str, ...]:
        """The dev splits, scored after each epoch."""
        return tuple(split for split in self.rows if split != "train")

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    def read(self, split: str) -> pd.DataFrame:
        return pd.read_parquet(self.folder / f"{split}.parquet")


def read_tasks(tasks_dir: Path) -> list[TaskData]:
    """The tasks the `tasks` stage wrote, in `downstream.tasks` order; DataError if the folder is not its."""
    try:
        meta = json.loads((tasks_dir / META).read_text(encoding="utf-8"))
        return [TaskData(t["name"], t["glue"], tuple(t["labels"]) if t["labels"] is not None else None,
                         tuple(t["metrics"]), t["pair"], t["rows"], t["sha256"], tasks_dir / t["name"])
                for t in meta["tasks"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{tasks_dir} is not the tasks stage's output ({cause(err)}); run "
                        "`dvc repro tasks`") from None


def build_tasks(cfg: DownstreamConfig, out_dir: Path, mirrors: Sequence[Mirror] = MIRRORS,
                retry: Retry | None = None) -> list[dict[str, Any]]:
    """Write data/tasks for `cfg.tasks` and return tasks.json's entries.

    Args:
        cfg: params.downstream (tasks, source).
        out_dir: the stage's out, replaced only once every task is written and verified.
        mirrors: where GLUE's files are, tried in order (tests serve them locally).
        retry: tries, backoff and timeout for each download (default: `Retry()`).
    """
    retry = retry or Retry()
    specs = cfg.task_specs()
    own = {s.name: read_own_task(s.name, repo_path(s.folder)) for s in specs if s.folder is not None}
    source = _source(cfg.source) if any(s.folder is None for s in specs) and cfg.source else None
    entries = []
    with atomic_dir(out_dir) as staging:
        for spec in specs:
            (staging / spec.name).mkdir()
            if spec.name in own:
                entries.append(_write_own(own[spec.name], spec.folder, staging / spec.name))
            else:
                entries.append(_write_glue(TASKS[spec.name], source, mirrors, staging, retry))
            rows = ", ".join(f"{n:,} {split}" for split, n in entries[-1]["rows"].items())
            log.info("%s: %s rows from %s", spec.name, rows, entries[-1]["source"])
        write_json(staging / META, {"tasks": entries})
    if not specs:
        log.info("downstream.tasks is empty: no task fetched, nothing to fine-tune")
    return entries


def _source(path: str) -> Path:
    folder = repo_path(path)
    if not folder.is_dir():
        raise DataError(f"downstream.source {folder} is not a folder (GLUE's original files, or nyu-mll/glue's "
                        "parquet copy)")
    return folder


def _write_own(task: OwnTask, folder: str, out: Path) -> dict[str, Any]:
    sha256 = {}
    for split, frame in task.splits.items():
        path = out / f"{split}.parquet"
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
        sha256[split] = _sha256(path)
    return {"name": task.name, "glue": False, "labels": list(task.labels) if task.labels is not None else None,
            "metrics": list(own_metrics(task.labels)), "pair": "text_pair" in task.splits["train"],
            "source": folder, "rows": {split: len(frame) for split, frame in task.splits.items()}, "sha256": sha256}


def own_metrics(labels: tuple[str, ...] | None) -> tuple[str, ...]:
    """Your task's metrics: Pearson and Spearman for a score, accuracy and macro-F1 for classes."""
    return ("pearson", "spearmanr") if labels is None else ("accuracy", "macro_f1")


def _write_glue(task: GlueTask, source: Path | None, mirrors: Sequence[Mirror], staging: Path,
                retry: Retry) -> dict[str, Any]:
    """The task from the local folder, else from the first mirror that serves it whole."""
    if source is not None:
        return _write_splits(task, _local_rows(task, source), staging / task.name, str(source))
    failures = []
    for mirror in mirrors:
        work = staging / ".download"
        work.mkdir(exist_ok=True)
        try:
            rows = _mirror_rows(task, mirror, work, retry)
            return _write_splits(task, rows, staging / task.name, mirror.url)
        except DataError as err:
            log.warning("%s from %s failed: %s", task.name, mirror.url, err)
            failures.append(f"{mirror.url}: {err}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    raise DataError(f"{task.name}: every mirror failed ({'; '.join(failures)}); to work offline, download GLUE's "
                    "files into a folder and set downstream.source (README: Downstream evaluation)")


def _mirror_rows(task: GlueTask, mirror: Mirror, work: Path, retry: Retry) -> dict[str, Iterator[Row]]:
    if mirror.layout == "original":
        files = {}
        for file in task.files:
            files[file.name] = work / file.name
            fetch(mirror.url + file.path, files[file.name], retry)
            _verify(files[file.name], file)
        return _original_rows(task, files)
    rows = {}
    for split in task.splits:
        path = work / f"{task.name}-{split.name}.parquet"
        fetch(mirror.url + split.parquet(task.name), path, retry)
        _verify_parquet(path, split.parquet_sha256)
        rows[split.name] = parquet_rows(task, path)
    return rows


def _local_rows(task: GlueTask, source: Path) -> dict[str, Iterator[Row]]:
    """The original files (at their mirror paths or directly in the folder), else the parquet copy's."""
    originals = {file.name: next((p for p in (source / file.path, source / file.name) if p.is_file()), None)
                 for file in task.files}
    if all(originals.values()):
        for file in task.files:
            _verify(originals[file.name], file)
        return _original_rows(task, originals)
    parquets = {split.name: source / split.parquet(task.name) for split in task.splits}
    if all(p.is_file() for p in parquets.values()):
        for split in task.splits:
            _verify_parquet(parquets[split.name], split.parquet_sha256)
        return {name: parquet_rows(task, path) for name, path in parquets.items()}
    missing = ", ".join(f.name for f in task.files if originals[f.name] is None)
    raise DataError(f"downstream.source {source} has neither {task.name}'s original files (missing {missing}) nor "
                    f"its parquet copy ({', '.join(s.parquet(task.name) for s in task.splits)})")


def _original_rows(task: GlueTask, files: dict[str, Path]) -> dict[str, Iterator[Row]]:
    """`read_original`, after refusing archives whose entries could point outside a folder."""
    for path in files.values():
        if path.suffix == ".zip":
            try:
                with zipfile.ZipFile(path) as zf:
                    for info in zf.infolist():
                        check_entry(info, path.parent, path.name)
            except zipfile.BadZipFile as err:
                raise DataError(f"{path.name} is not a valid zip archive ({err})") from None
    return read_original(task, files)


def _verify(path: Path, file: File) -> None:
    """The recorded size first (a truncated download says so), then the sha256."""
    size = path.stat().st_size
    if size != file.size:
        raise DataError(f"{file.name} has {size:,} bytes, GLUE's has {file.size:,}: truncated or another file")
    verify_checksum(path, f"sha256:{file.sha256}", file.name)


def _verify_parquet(path: Path, sha256: str | None) -> None:
    if sha256 is not None:
        verify_checksum(path, f"sha256:{sha256}", path.name)


def _write_splits(task: GlueTask, rows: dict[str, Iterator[Row]], out: Path, source: str) -> dict[str, Any]:
    """Each split's rows into `<split>.parquet`, checked against GLUE's row count."""
    out.mkdir(exist_ok=True)
    counts, sha256 = {}, {}
    for split in task.splits:
        path = out / f"{split.name}.parquet"
        counts[split.name] = _write_rows(rows[split.name], path, pair=len(task.text) > 1,
                                         regression=task.labels is None)
        if counts[split.name] != split.rows:
            raise DataError(f"{task.name} {split.name} has {counts[split.name]:,} rows, GLUE's has {split.rows:,}")
        sha256[split.name] = _sha256(path)
    return {"name": task.name, "glue": True, "labels": list(task.labels) if task.labels else None,
            "metrics": list(task.metrics), "pair": len(task.text) > 1, "source": source, "rows": counts,
            "sha256": sha256}


def _write_rows(rows: Iterator[Row], path: Path, pair: bool, regression: bool) -> int:
    fields = [pa.field("text", pa.string())] + ([pa.field("text_pair", pa.string())] if pair else [])
    schema = pa.schema([*fields, pa.field("label", pa.float32() if regression else pa.int64())])
    count = 0
    with pq.ParquetWriter(path, schema) as writer:
        while batch := list(itertools.islice(rows, BATCH_ROWS)):
            columns = list(zip(*batch, strict=True))
            arrays = [columns[0], *([columns[1]] if pair else []), columns[2]]
            writer.write_table(pa.Table.from_arrays([pa.array(a, f.type) for a, f in zip(arrays, schema, strict=True)],
                                                    schema=schema))
            count += len(batch)
    return count


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
