"""Your own labelled task: a folder with `train.*` and `validation.*`, checked and read as GLUE's tasks are.

Each split is one file, `.csv`, `.tsv`, `.jsonl` or `.parquet`, UTF-8 (a byte-order mark is fine), with the
columns `text`, optionally `text_pair` (sentence-pair tasks), and `label`:
- class names (strings, or true/false) or class ids (integers): a classification, its classes the train
  split's labels in sorted order;
- floating-point numbers (`3.5`, `1.0`): a regression (one output, mean squared error), scored as STS-B is.
A TSV takes quotes literally (as GLUE's files do); a CSV follows the usual quoting. Anything else is one line
naming the file: a missing column, an empty split, an empty or null value, a validation label never seen in train.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bertpipe.errors import DataError, first_line

FORMATS = (".csv", ".tsv", ".jsonl", ".parquet")
SPLITS = ("train", "validation")
COLUMNS = ("text", "text_pair", "label")


@dataclass(frozen=True)
class OwnTask:
    """A checked task: its splits as (text, text_pair, label) columns, its classes (None: a regression)."""

    name: str
    splits: dict[str, pd.DataFrame]  # columns text, text_pair (pairs only), label (class id or score)
    labels: tuple[str, ...] | None


def read_own_task(name: str, folder: Path) -> OwnTask:
    """The task in `folder`; DataError (one line, naming the folder or file) when it is not one."""
    if not folder.is_dir():
        raise DataError(f"downstream.tasks: {name}'s folder {folder} does not exist (a folder with train.* and "
                        f"validation.*, each {', '.join(FORMATS)})")
    frames = {split: _read(_split_file(folder, split)) for split in SPLITS}
    pair = "text_pair" in frames["train"]
    for split, frame in frames.items():
        _check_columns(frame, _split_file(folder, split), pair)
    labels = _classes(frames["train"]["label"], _split_file(folder, "train"))
    splits = {split: _encode_labels(frame, labels, _split_file(folder, split)) for split, frame in frames.items()}
    return OwnTask(name, splits, labels)


def _split_file(folder: Path, split: str) -> Path:
    found = sorted(p for p in folder.glob(f"{split}.*") if p.suffix in FORMATS)
    if len(found) != 1:
        have = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
        what = "no" if not found else "more than one"
        raise DataError(f"{folder} has {what} {split} file: expected exactly one {split}.* of "
                        f"{', '.join(FORMATS)} (it holds {have})")
    return found[0]


def _read(path: Path) -> pd.DataFrame:
    """The file as a DataFrame of strings and numbers, empty cells kept as empty strings."""
    try:
        if path.suffix == ".parquet":
            frame = pq.read_table(path).to_pandas()
            return frame.astype({c: object for c in frame.columns if isinstance(frame[c].dtype, pd.CategoricalDtype)})
        if path.suffix == ".jsonl":
            return pd.read_json(path, lines=True, dtype=False, encoding="utf-8")
        return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", encoding="utf-8-sig",
                           keep_default_na=False, dtype={"text": str, "text_pair": str},
                           quoting=csv.QUOTE_NONE if path.suffix == ".tsv" else csv.QUOTE_MINIMAL)
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    except (ValueError, pa.ArrowException, OSError, pd.errors.ParserError) as err:
        raise DataError(f"{path} cannot be read as {path.suffix[1:]} ({first_line(err)})") from None


def _check_columns(frame: pd.DataFrame, path: Path, pair: bool) -> None:
    wanted = ("text", "text_pair", "label") if pair else ("text", "label")
    missing = [c for c in wanted if c not in frame]
    if missing:
        raise DataError(f"{path} has no column {', '.join(missing)} (columns: {', '.join(map(str, frame.columns))}); "
                        "a labelled task has text, label and, for sentence pairs in both splits, text_pair")
    if frame.empty:
        raise DataError(f"{path} holds no rows")
    for column in wanted:
        values = frame[column]
        bad = values.isna() | (values.astype(str).str.strip() == "") if column != "label" else values.isna()
        if column != "label":
            bad |= ~values.map(lambda v: isinstance(v, str))
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(f"{path}: row {row + 1} has no {column} ({values.iloc[row]!r}); every row needs one")


def _classes(labels: pd.Series, path: Path) -> tuple[str, ...] | None:
    """The train split's classes in sorted order, or None when its labels are floating-point scores."""
    if pd.api.types.is_float_dtype(labels):
        return None
    if labels.map(lambda v: isinstance(v, str) and not v.strip()).any():
        raise DataError(f"{path} has an empty label; every row needs one")
    return tuple(str(v) for v in sorted(labels.unique(), key=lambda v: (str(type(v)), v)))


def _encode_labels(frame: pd.DataFrame, labels: tuple[str, ...] | None, path: Path) -> pd.DataFrame:
    columns = [c for c in ("text", "text_pair") if c in frame]
    out = frame[columns].astype(str).reset_index(drop=True)
    if labels is None:
        try:
            out["label"] = frame["label"].astype("float32").to_numpy()
        except (TypeError, ValueError):
            raise DataError(f"{path}: labels must all be numbers in a regression task (the train split's are "
                            "floating-point numbers)") from None
        return out
    ids = {name: i for i, name in enumerate(labels)}
    text = frame["label"].map(str)
    unseen = sorted(set(text) - set(ids))
    if unseen:
        raise DataError(f"{path} has label {unseen[0]!r} ({(text == unseen[0]).sum()} rows), which the train "
                        f"split never has (its classes: {', '.join(labels[:10])})")
    out["label"] = text.map(ids).astype("int64").to_numpy()
    return out
