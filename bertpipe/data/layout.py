"""Where each split of a folder of your own text is, as corpora ship: one file, a folder of files, or shards.

For each split (`valid` may also be spelled `validation`, as the Hugging Face Hub names it) the folder
holds exactly one of:

- a file `train.txt` (or `.jsonl`, `.parquet`);
- a folder `train/` of such files, read recursively (one file per document is how most corpora ship);
- shards next to each other: `train-00000-of-00004.parquet` (the Hub's names), `train.00000-of-01024.json.gz`
  or, behind a prefix, `c4-train.00000-of-01024.json.gz` (C4's).

`.json` and `.ndjson` are JSON lines too (C4 and OSCAR name them so). A text or JSON-lines file may be
compressed: `.gz`, `.zst`, `.bz2` or `.xz` after its format, read as a stream (parquet compresses itself
and is refused compressed). Files are read in the order of their sorted paths, so the same folder always
gives the same corpus. Anything else found where a split is looked for (a second layout of the same
split, an unknown format) stops with one line naming what was found and what is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bertpipe.errors import DataError

SPLITS = {"train": ("train",), "valid": ("valid", "validation"), "test": ("test",)}
REQUIRED = ("train", "valid")
FORMATS = {"txt": "txt", "jsonl": "jsonl", "json": "jsonl", "ndjson": "jsonl", "parquet": "parquet"}
COMPRESSIONS = ("gz", "zst", "bz2", "xz")
EXPECTED = ("{s}.txt, {s}.jsonl or {s}.parquet (text and JSON lines optionally compressed: .gz, .zst, .bz2, .xz), "
            "a folder {s}/ of such files, or shards {s}-*")


@dataclass(frozen=True)
class TextFile:
    """One file of a split: its format (`txt`, `jsonl` or `parquet`) and compression (None or a suffix)."""

    path: Path
    format: str
    compression: str | None


def text_file(path: Path) -> TextFile | None:
    """The file's format and compression from its last one or two suffixes; None when not readable text."""
    suffixes = path.name.split(".")[1:]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    fmt = FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None or (fmt == "parquet" and compression):
        return None
    return TextFile(path, fmt, compression)


def _stem(name: str) -> str:
    """The name without its format and compression suffixes: `c4-train.00000-of-01024.json.gz` gives
    `c4-train.00000-of-01024`."""
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in COMPRESSIONS:
        parts.pop()
    if len(parts) > 1 and parts[-1] in FORMATS:
        parts.pop()
    return ".".join(parts)


def _is_shard(name: str, split: str) -> bool:
    stem = _stem(name)
    return stem.startswith(f"{split}-") or re.fullmatch(rf"(?:.+[-_])?{split}\.\d+-of-\d+", stem) is not None


def is_text_folder(folder: Path) -> bool:
    """Does `folder` hold any split of your own text (a file, folder or shards), rather than WikiText's files?"""
    return any(_candidates(folder, split) for split in SPLITS)


def split_layout(source: Path) -> dict[str, list[TextFile]]:
    """The files of each split found in `source` (test only if present), each split's in sorted order.

    Raises:
        DataError: a required split is missing, a split is found twice (`train.txt` and `train/`), a
            file has a format bertpipe does not read, or a split's folder holds no file.
    """
    found = {}
    for split in SPLITS:
        candidates = _candidates(source, split)
        if not candidates:
            if split in REQUIRED:
                raise DataError(f"data.source {source} has no {split} split; expected {_expected(split)}"
                                f"{describe_folder(source)}")
            continue
        files = [path for path in candidates if path.is_file()]
        folders = [path for path in candidates if path.is_dir()]
        singles = [path for path in files if path.name.split(".")[0] in SPLITS[split]
                   and not any(_is_shard(path.name, name) for name in SPLITS[split])]
        if len(folders) + len(singles) + (len(files) > len(singles)) > 1:
            raise DataError(f"data.source {source} holds {_describe(candidates)} for the {split} split; expected "
                            f"one of: {_expected(split)}")
        found[split] = _folder_files(folders[0]) if folders else [_readable(path, split) for path in files]
    return found


def _candidates(source: Path, split: str) -> list[Path]:
    """Everything in `source` named as the split: files `split.*`, the folder `split/`, shards."""
    def named(path: Path, name: str) -> bool:
        if path.is_dir():
            return path.name == name
        return (path.name.split(".")[0] == name and "." in path.name) or _is_shard(path.name, name)

    return sorted(path for path in source.iterdir()
                  if not path.name.startswith(".") and any(named(path, name) for name in SPLITS[split]))


def _readable(path: Path, split: str) -> TextFile:
    found = text_file(path)
    if found is None:
        raise DataError(f"data.source {path.parent}: {path.name} is not a format bertpipe reads; expected "
                        f"{_expected(split)}")
    return found


def _folder_files(folder: Path) -> list[TextFile]:
    """Every file under `folder` (hidden ones aside), sorted by path; all must be readable text."""
    paths = sorted(path for path in folder.rglob("*") if path.is_file()
                   and not any(part.startswith(".") for part in path.relative_to(folder).parts))
    if not paths:
        raise DataError(f"data.source {folder} is an empty folder; expected .txt, .jsonl or .parquet files")
    files = {path: text_file(path) for path in paths}
    unreadable = [path for path, file in files.items() if file is None]
    if unreadable:
        names = ", ".join(str(path.relative_to(folder)) for path in unreadable[:3])
        more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        raise DataError(f"data.source {folder} holds {names}{more}, not a format bertpipe reads; expected only "
                        ".txt, .jsonl or .parquet files (text and JSON lines optionally .gz, .zst, .bz2 or .xz)")
    return list(files.values())


def _expected(split: str) -> str:
    also = " (validation also names it)" if split == "valid" else ""
    return EXPECTED.format(s=split) + also


def _describe(paths: list[Path]) -> str:
    """`train.txt, train/ (12 files) and 3 shards train-*`: what a reader needs to see the clash."""
    parts = []
    for path in paths[:4]:
        parts.append(f"{path.name}/ ({sum(1 for p in path.rglob('*') if p.is_file())} files)" if path.is_dir()
                     else path.name)
    more = f" and {len(paths) - 4} more" if len(paths) > 4 else ""
    return ", ".join(parts) + more


def describe_folder(source: Path) -> str:
    """`; found: a, b/ (3 files), c` — what the folder holds instead (hidden names aside)."""
    shown = sorted(path for path in source.iterdir() if not path.name.startswith("."))
    return f"; found: {_describe(shown)}" if shown else "; the folder is empty"
