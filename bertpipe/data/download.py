"""The `download` stage's library: a corpus's split files in one folder, verified.

Sources, in the order `download` tries them: `data.source` (a local archive, a folder holding the
WikiText split files, or a folder of the user's own text, which `bertpipe.data.ingest` checks and writes
as {train,valid,test}.txt), else each of `data.urls` (empty: the dataset's mirrors, `bertpipe.data.datasets`).
A `.zip` URL is the original archive (d2l's `DATA_HUB['wikitext-2']`), checked against `data.checksum`
(empty: the dataset's) before anything is extracted. A URL ending in `/` is Hugging Face's parquet
conversion (Salesforce/wikitext), turned back into the original bytes and checked against the
dataset's split records. Each attempt builds its folder in a temporary sibling
(`bertpipe.atomic.atomic_dir`), so a failure keeps an earlier good download.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from bertpipe.atomic import atomic_dir
from bertpipe.config import DataConfig
from bertpipe.data.archive import extract, verify_checksum
from bertpipe.data.datasets import DATASETS, Dataset, SplitRecord
from bertpipe.data.ingest import ingest_folder
from bertpipe.data.layout import describe_folder, is_text_folder
from bertpipe.data.raw_folder import WIKITEXT_FILES
from bertpipe.errors import ConfigError, DataError, one_line
from bertpipe.fetch import CHUNK, Retry, fetch
from bertpipe.repo import repo_path

log = logging.getLogger(__name__)


def download(data: DataConfig, out_dir: str | Path, *, retry: Retry | None = None) -> str:
    """Fill `out_dir` with the corpus's split files and return the source or URL used.

    Args:
        data: `params.data`; a relative `source` is taken from the repository (`bertpipe.repo.repo_path`).
        out_dir: the stage's out; replaced only once the new files are complete and verified.
        retry: tries, backoff and timeout for each URL (default `Retry()`; tests make the backoff tiny).
    """
    retry = retry or Retry()
    out_dir, dataset = Path(out_dir), DATASETS[data.dataset]
    checksum = data.checksum or dataset.checksum
    if data.source:
        with atomic_dir(out_dir) as staging:
            _from_local(repo_path(data.source), checksum, dataset, staging)
        used = data.source
    else:
        used = _from_mirrors(data.urls or dataset.urls, checksum, dataset, out_dir, retry)
    log.info("Wrote %s from %s", out_dir, used)
    return used


def _from_mirrors(urls: Sequence[str], checksum: str, dataset: Dataset, out_dir: Path, retry: Retry) -> str:
    """Try each URL in order, each in a fresh staging folder, so one mirror's leftovers never mix in."""
    for url in urls:  # refuse a malformed list before spending time on the network
        _url_kind(url)
    failures = []
    for url in urls:
        try:
            with atomic_dir(out_dir) as staging:
                _from_url(url, checksum, dataset, staging, retry)
            return url
        except DataError as err:
            log.warning("%s failed: %s", url, err)
            failures.append((url, err))
    raise _all_failed(failures, dataset)


def _all_failed(failures: Sequence[tuple[str, DataError]], dataset: Dataset) -> DataError:
    """One readable line: each source with the gist of its error (the whole of it was logged above),
    then the way out, which needs no network."""
    if len(failures) == 1:
        url, err = failures[0]
        what = f"download from {url} failed: {err}"
    else:
        hosts = [urllib.parse.urlsplit(url).netloc for url, _ in failures]
        names = hosts if len(set(hosts)) == len(hosts) else [_where(url) for url, _ in failures]
        what = f"all {len(failures)} download URLs failed (" + "; ".join(
            f"{name}: {_gist(err)}" for name, (_, err) in zip(names, failures, strict=True)) + ")"
    return DataError(f"{what}; {offline_hint(dataset)}")


def offline_hint(dataset: Dataset) -> str:
    """The way out that needs no network."""
    return (f"to work offline, set data.source to a local {dataset.name}-v1.zip or a folder of "
            "wiki.{train,valid,test}.tokens (README: Offline and air-gapped machines)")


def _where(url: str) -> str:
    """The host and the last part of the path: `s3.amazonaws.com/.../wikitext-2-v1.zip`."""
    parts = urllib.parse.urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    last = (segments[-1] + ("/" if parts.path.endswith("/") else "")) if segments else ""
    return f"{parts.netloc}/{'.../' if len(segments) > 1 else ''}{last}"


def _gist(err: DataError, limit: int = 50) -> str:
    """An error without errno numbers and retry counts, cut to `limit` characters."""
    text = re.sub(r"\[Errno -?\d+\] | \(after \d+ tries\)", "", str(err))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _url_kind(url: str) -> str:
    """'zip' for the original archive, 'parquet' for a Hugging Face folder ending in '/'."""
    path = urllib.parse.urlsplit(url).path
    if path.endswith(".zip"):
        return "zip"
    if url.endswith("/"):
        return "parquet"
    raise ConfigError("data.urls", url, "a URL of a .zip file or of a parquet folder ending in /")


def _from_url(url: str, checksum: str, dataset: Dataset, staging: Path, retry: Retry) -> None:
    """The archive is streamed into the staging folder and removed once its members are out."""
    if _url_kind(url) == "zip":
        archive = staging / ".archive.zip.part"
        label = Path(urllib.parse.urlsplit(url).path).name
        fetch(url, archive, retry)
        verify_checksum(archive, checksum, label)
        extract(archive, staging, label)
        archive.unlink()
    else:
        _from_parquet(url, dataset, staging, retry)


def _from_local(source: Path, checksum: str, dataset: Dataset, staging: Path) -> None:
    """A folder of split files is copied as is, one of the user's text is checked and rewritten
    (`bertpipe.data.ingest`); a file is taken as the archive and verified like a download."""
    if source.is_dir() and is_text_folder(source):
        ingest_folder(source, staging)
    elif source.is_dir():
        missing = [name for name in WIKITEXT_FILES if not (source / name).is_file()]
        if missing and len(missing) < len(WIKITEXT_FILES):
            raise DataError(f"data.source {source} has no {missing[0]} (WikiText's split files are "
                            f"{', '.join(WIKITEXT_FILES)}){describe_folder(source)}")
        if missing:
            raise DataError(f"data.source {source} holds neither your own text (train and valid splits, each a "
                            "file train.txt, .jsonl or .parquet, a folder train/ or shards train-*) nor WikiText's "
                            f"{', '.join(WIKITEXT_FILES)}{describe_folder(source)}")
        for name in WIKITEXT_FILES:
            shutil.copyfile(source / name, staging / name)
    elif source.is_file():
        verify_checksum(source, checksum, str(source))
        extract(source, staging, str(source))
    else:
        raise DataError(f"data.source {source} does not exist (a relative path starts at the repository)")


def _from_parquet(url: str, dataset: Dataset, staging: Path, retry: Retry) -> None:
    """Fetch each split's parquet shards, rebuild the original text, and check it against the records."""
    for name, shards in dataset.parquet_files.items():
        with open(staging / name, "wb") as out:
            for parquet_name in shards:
                part = staging / f".{parquet_name}.part"
                try:
                    fetch(url + parquet_name, part, retry)
                except DataError as err:
                    raise DataError(f"{parquet_name}: {err}") from None
                _parquet_to_tokens(part, out, parquet_name)
                part.unlink()
        _verify_split(staging / name, dataset.records[name])


def _parquet_to_tokens(parquet: Path, out: BinaryIO, label: str) -> None:
    """Rows are the original lines with their '\\n', except blank lines (' \\n'), stored as ''."""
    try:
        with pq.ParquetFile(parquet) as pf:
            names = pf.schema_arrow.names
            kind = pf.schema_arrow.field("text").type if "text" in names else None
            if kind not in (pa.string(), pa.large_string()):
                raise DataError(f"{label} has no string column 'text' (columns: {', '.join(names)})")
            for batch in pf.iter_batches(columns=["text"]):
                column = batch.column("text")
                if column.null_count:
                    raise DataError(f"{label} has null rows in column 'text'")
                out.writelines((row or " \n").encode("utf-8") for row in column.to_pylist())
    except pa.ArrowException as err:
        raise DataError(f"{label} is not a readable parquet file: {one_line(err)}") from None


def _verify_split(path: Path, record: SplitRecord) -> None:
    """Line count always; size and sha256 where the original file's are recorded."""
    size, lines, digest = 0, 0, hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            size += len(chunk)
            lines += chunk.count(b"\n")
            digest.update(chunk)
    found = {"size": size, "lines": lines, "sha256": digest.hexdigest()}
    for key, actual in found.items():
        expected = getattr(record, key)
        if expected is not None and actual != expected:
            raise DataError(f"{path.name} rebuilt from parquet differs from the original: "
                            f"{key} expected {expected}, got {actual}")
    log.info("Verified %s (%d bytes, %d lines, sha256 %s)", path.name, size, lines, found["sha256"])
