"""GLUE's tasks (Wang et al. 2019, "GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language
Understanding"): where their files are, how each is verified, and how each is read into (text, text_pair, label).

Two mirrors, tried in order (`MIRRORS`):
- `original`: GLUE's own files on dl.fbaipublicfiles.com, one zip per task, and for MRPC SentEval's
  `msr_paraphrase_train.txt` split by `mrpc_dev_ids.tsv`. Each file is checked against its recorded byte size
  and sha256 before a byte of it is read. URLs and parsing are those of Hugging Face's former `glue` loading
  script (`datasets/glue/glue.py` @02bb18c7), sizes, sha256 and row counts its `dataset_infos.json` @040102f1.
- `parquet`: Hugging Face's parquet copy `nyu-mll/glue` at a pinned revision
  (`<config>/<split>-00000-of-00001.parquet`), checked against the row counts and, where one is
  recorded, the sha256.

The quirks of the original files, kept as glue.py reads them: tab-separated with quotes taken literally
(QUOTE_NONE); CoLA's train and dev files have no header (label in column 1, sentence in column 3); MRPC's train
file starts with a UTF-8 byte-order mark; MNLI has a matched and a mismatched dev set; a row with a missing
field is dropped (QQP has some). Test labels are hidden, so test files are never read.
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bertpipe.config import GLUE_TASKS
from bertpipe.errors import DataError, one_line

Row = tuple[str, str | None, int | float]  # text, text_pair (None for single sentences), label id or score
ORIGINAL_URL = "https://dl.fbaipublicfiles.com/"
# nyu-mll/glue's "Add wnli data files" commit, the last of its conversion commits as they are recorded (after rte
# @26b4712, sst2, stsb), so it should hold every config; not reachable from this project's machines to confirm.
# A wrong pin fails loudly (HTTP 404, or the row counts), never silently.
PARQUET_URL = "https://huggingface.co/datasets/nyu-mll/glue/resolve/68d3d763fc36f89a8d047f4b8e51b98ea36b98d0/"


@dataclass(frozen=True)
class Mirror:
    """A base URL (or folder) holding GLUE in one of the two layouts, `original` or `parquet`."""

    url: str
    layout: str


MIRRORS = (Mirror(ORIGINAL_URL, "original"), Mirror(PARQUET_URL, "parquet"))


@dataclass(frozen=True)
class File:
    """One original file, by its path under the mirror, with its recorded size and sha256."""

    path: str
    size: int
    sha256: str

    @property
    def name(self) -> str:
        return self.path.rpartition("/")[2]


@dataclass(frozen=True)
class Split:
    """A split we score or train on: its TSV in the original files, its parquet file, its row count."""

    name: str  # train, validation (MNLI: validation_matched, validation_mismatched)
    rows: int
    member: str  # the TSV inside the task's zip; MRPC: "train" or "dev", its part of msr_paraphrase_train.txt
    parquet_sha256: str | None = None

    def parquet(self, config: str) -> str:
        return f"{config}/{self.name}-00000-of-00001.parquet"


@dataclass(frozen=True)
class GlueTask:
    """A GLUE task: files, splits, the columns of its text and label, its classes (None: a score) and metrics."""

    name: str
    files: tuple[File, ...]
    splits: tuple[Split, ...]
    text: tuple[str, ...]  # TSV columns of the sentence (or the pair)
    parquet_text: tuple[str, ...]  # the same columns as the parquet copy names them
    label: str  # the TSV column of the label (CoLA: column 1 of its headerless rows)
    labels: tuple[str, ...] | None  # class names in id order (Hugging Face's); None: a regression score
    metrics: tuple[str, ...]  # bertpipe.downstream.metrics names

    @property
    def scored(self) -> tuple[Split, ...]:
        return tuple(s for s in self.splits if s.name != "train")


def _zip(name: str, size: int, sha256: str) -> tuple[File, ...]:
    return (File(f"glue/data/{name}", size, sha256),)


NLI = ("entailment", "not_entailment")
TASKS: dict[str, GlueTask] = {task.name: task for task in (
    GlueTask("cola", _zip("CoLA.zip", 376_971, "f212fcd832b8f7b435fb991f101abf89f96b933ab400603bf198960dfc32cbff"),
             (Split("train", 8_551, "CoLA/train.tsv"), Split("validation", 1_043, "CoLA/dev.tsv")),
             ("sentence",), ("sentence",), "", ("unacceptable", "acceptable"), ("matthews_correlation",)),
    GlueTask("sst2", _zip("SST-2.zip", 7_439_277, "d67e16fb55739c1b32cdce9877596db1c127dc322d93c082281f64057c16deaa"),
             (Split("train", 67_349, "SST-2/train.tsv",
                    "66a253e67968acfabcbe49dbe9da964b42ac1c851c40ab760e8c8942efdb3229"),
              Split("validation", 872, "SST-2/dev.tsv")),
             ("sentence",), ("sentence",), "label", ("negative", "positive"), ("accuracy",)),
    GlueTask("mrpc", (File("senteval/senteval_data/msr_paraphrase_train.txt", 1_047_044,
                           "60a9b09084528f0673eedee2b69cb941920f0b8cd0eeccefc464a98768457f89"),
                      File("glue/data/mrpc_dev_ids.tsv", 6_222,
                           "971d7767d81b997fd9060ade0ec23c4fc31cbb226a55d1bd4a1bac474eb81dc7")),
             (Split("train", 3_668, "train"), Split("validation", 408, "dev")),
             ("#1 String", "#2 String"), ("sentence1", "sentence2"), "Quality", ("not_equivalent", "equivalent"),
             ("accuracy", "f1")),
    GlueTask("stsb", _zip("STS-B.zip", 802_872, "e60a6393de5a8b5b9bac5020a1554b54e3691f9d600b775bd131e613ac179c85"),
             (Split("train", 5_749, "STS-B/train.tsv"),
              Split("validation", 1_500, "STS-B/dev.tsv",
                    "152de7cf1fa34ee4df1c243bd209b02ade21a1d5c4fb3b7da5240f78e4000aa9")),
             ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", None, ("pearson", "spearmanr")),
    GlueTask("qqp", _zip("QQP-clean.zip", 41_696_084,
                         "40e7c862c04eb26ee04b67fd900e76c45c6ba8e6d8fab4f8f1f8072a1a3fbae0"),
             (Split("train", 363_846, "QQP/train.tsv"), Split("validation", 40_430, "QQP/dev.tsv")),
             ("question1", "question2"), ("question1", "question2"), "is_duplicate", ("not_duplicate", "duplicate"),
             ("accuracy", "f1")),
    GlueTask("mnli", _zip("MNLI.zip", 312_783_507, "e7c1d896d26ed6caf700110645df426cc2d8ebf02a5ab743d5a5c68ac1c83633"),
             (Split("train", 392_702, "MNLI/train.tsv"), Split("validation_matched", 9_815, "MNLI/dev_matched.tsv"),
              Split("validation_mismatched", 9_832, "MNLI/dev_mismatched.tsv")),
             ("sentence1", "sentence2"), ("premise", "hypothesis"), "gold_label",
             ("entailment", "neutral", "contradiction"), ("accuracy",)),
    GlueTask("qnli", _zip("QNLIv2.zip", 10_627_589, "e634e78627a29adaecd4f955359b22bf5e70f2cbd93b493f2d624138a0c0e5f5"),
             (Split("train", 104_743, "QNLI/train.tsv"), Split("validation", 5_463, "QNLI/dev.tsv")),
             ("question", "sentence"), ("question", "sentence"), "label", NLI, ("accuracy",)),
    GlueTask("rte", _zip("RTE.zip", 697_150, "6bf86de103ecd335f3441bd43574d23fef87ecc695977a63b82d5efb206556ee"),
             (Split("train", 2_490, "RTE/train.tsv"),
              Split("validation", 277, "RTE/dev.tsv",
                    "fb2aa2e04f551133ba663617a15ae133dc22b0f6a969bc0629b5ea6003ee9cf8")),
             ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", NLI, ("accuracy",)),
)}
assert tuple(TASKS) == GLUE_TASKS, "bertpipe.config.GLUE_TASKS names the tasks defined here"


def read_original(task: GlueTask, files: dict[str, Path]) -> dict[str, Iterator[Row]]:
    """Each split's rows from the task's verified original files (`files` by File.name)."""
    if task.name == "mrpc":
        return {split.name: _mrpc_rows(task, files, split.member) for split in task.splits}
    archive = files[task.files[0].name]
    return {split.name: _zip_rows(task, archive, split.member) for split in task.splits}


def _zip_rows(task: GlueTask, archive: Path, member: str) -> Iterator[Row]:
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as raw:
            yield from _tsv_rows(task, io.TextIOWrapper(raw, encoding="utf-8", newline=""), f"{archive.name}:{member}")
    except KeyError:
        raise DataError(f"{archive.name} has no {member}") from None
    except (zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{archive.name} is not a valid zip archive ({err})") from None


def _tsv_rows(task: GlueTask, lines: io.TextIOBase, label: str) -> Iterator[Row]:
    """glue.py's reading: CoLA's headerless rows by position, the others by their header's names."""
    if task.name == "cola":
        rows: Iterator[dict] = ({"sentence": row[3], "": row[1]} if len(row) > 3 else {}
                                for row in csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))
    else:
        rows = csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    for row in rows:
        values = [row.get(column) for column in (*task.text, task.label)]
        if any(value is None for value in values) or not values[-1]:
            continue  # a missing field: glue.py drops the row
        *text, raw_label = values
        yield text[0], text[1] if len(text) > 1 else None, _label(task, raw_label, label)


def _label(task: GlueTask, raw: str, where: str) -> int | float:
    """A class name's id, a class id as the file writes it (`0`, `1`), or a regression score."""
    if task.labels is None:
        try:
            return float(raw)
        except ValueError:
            raise DataError(f"{where}: score {raw!r} is not a number") from None
    if raw in task.labels:
        return task.labels.index(raw)
    if raw.isdigit() and int(raw) < len(task.labels):
        return int(raw)
    raise DataError(f"{where}: label {raw!r} is none of {task.name}'s ({', '.join(task.labels)})")


def _mrpc_rows(task: GlueTask, files: dict[str, Path], part: str) -> Iterator[Row]:
    """MRPC as GLUE builds it: the pairs of SentEval's train file whose ids mrpc_dev_ids.tsv lists are dev."""
    with open(files["mrpc_dev_ids.tsv"], encoding="utf-8", newline="") as f:
        dev_ids = {tuple(row[:2]) for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)}
    with open(files["msr_paraphrase_train.txt"], encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if ((row["#1 ID"], row["#2 ID"]) in dev_ids) == (part == "dev"):
                yield row["#1 String"], row["#2 String"], _label(task, row["Quality"], "msr_paraphrase_train.txt")


def parquet_rows(task: GlueTask, path: Path) -> Iterator[Row]:
    """The rows of one parquet file of the copy; its labels are already Hugging Face's class ids."""
    try:
        table = pq.read_table(path, columns=[*task.parquet_text, "label"])
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path.name} is not a readable parquet file of {task.name} ({one_line(err)})") from None
    texts = [table.column(name).to_pylist() for name in task.parquet_text]
    pairs = texts[1] if len(texts) > 1 else [None] * table.num_rows
    for text, pair, label in zip(texts[0], pairs, table.column("label").to_pylist(), strict=True):
        if task.labels is not None and not 0 <= label < len(task.labels):
            raise DataError(f"{path.name}: label {label!r} is none of {task.name}'s (hidden test labels are -1)")
        yield text, pair, label
