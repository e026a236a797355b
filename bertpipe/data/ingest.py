"""A folder of the user's own text, checked and written as the pipeline reads it: {train,valid,test}.txt.

The folder holds `train.*` and `valid.*` (and optionally `test.*`), each in one of three formats:

- `txt`: documents separated by a blank line, paragraphs one per line;
- `jsonl`: one document per line, a JSON object whose field `text` holds it (paragraphs are its lines);
- `parquet`: one document per row, in a string column `text`.

Every split is written in the `txt` layout: each paragraph on a line of its own, exactly one empty line
between documents, `\\n` line ends, no byte-order mark. Document boundaries are kept because next-
sentence negatives and Google's segments are drawn from them. Text must be UTF-8, in any language;
anything else stops the stage with one line naming the file, where, and what is expected. Files are
streamed, so memory stays at one block or row group whatever the corpus's size.
"""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from bertpipe.errors import DataError

FORMATS = ("txt", "jsonl", "parquet")
SPLITS = {"train": True, "valid": True, "test": False}  # split -> required
BLOCK = 1 << 20
log = logging.getLogger(__name__)


def is_text_folder(folder: Path) -> bool:
    """Does `folder` hold the user's own splits (`train.*`, `valid.*`) rather than WikiText's files?"""
    return any(path.name.split(".")[0] in SPLITS and "." in path.name for path in folder.iterdir())


def ingest_folder(source: Path, out_dir: Path) -> dict[str, int]:
    """Check every split file of `source` and write it to `out_dir/{split}.txt`; returns documents per split."""
    found = {split: _split_file(source, split, required) for split, required in SPLITS.items()}
    documents = {}
    for split, path in found.items():
        if path is None:
            continue
        with open(out_dir / f"{split}.txt", "wb") as out:
            documents[split] = _write_documents(_documents(path), out)
        if documents[split] == 0:
            raise DataError(f"data.source {source}: {path.name} holds no text; expected at least one document")
        log.info("%s: %d documents from %s", split, documents[split], path)
    return documents


def _split_file(source: Path, split: str, required: bool) -> Path | None:
    """The one `split.<format>` file of the folder; a missing required split or an unknown format stops."""
    candidates = sorted(p for p in source.iterdir() if p.name.split(".")[0] == split and "." in p.name)
    names = [f"{split}.{fmt}" for fmt in FORMATS]
    allowed = ", ".join(names[:-1]) + f" or {names[-1]}"
    if len(candidates) > 1:
        raise DataError(f"data.source {source} holds {len(candidates)} {split} files "
                        f"({', '.join(p.name for p in candidates)}); expected one: {allowed}")
    if not candidates:
        if required:
            raise DataError(f"data.source {source} has no {split} split; expected {allowed}")
        return None
    path = candidates[0]
    if path.name.partition(".")[2] not in FORMATS or not path.is_file():
        raise DataError(f"data.source {source}: {path.name} is not a format bertpipe reads; expected {allowed}")
    return path


def _documents(path: Path) -> Iterator[list[str]]:
    """Each document of the file as its non-blank lines (paragraphs)."""
    fmt = path.name.partition(".")[2]
    if fmt == "txt":
        return _txt_documents(path)
    rows = _jsonl_texts(path) if fmt == "jsonl" else _parquet_texts(path)
    return (paragraphs for paragraphs in (_paragraphs(text) for text in rows) if paragraphs)


def _paragraphs(text: str) -> list[str]:
    """A document's non-blank lines, trailing whitespace dropped."""
    return [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n") if line.strip()]


def _write_documents(documents: Iterator[list[str]], out: BinaryIO) -> int:
    count = 0
    for paragraphs in documents:
        out.write((("\n" if count else "") + "\n".join(paragraphs) + "\n").encode("utf-8"))
        count += 1
    return count


def _txt_documents(path: Path) -> Iterator[list[str]]:
    """Blank lines (whitespace only) end a document; any number of them count as one."""
    paragraphs: list[str] = []
    for line in _text_lines(path):
        if line.strip():
            paragraphs.append(line.rstrip())
        elif paragraphs:
            yield paragraphs
            paragraphs = []
    if paragraphs:
        yield paragraphs


def _text_lines(path: Path) -> Iterator[str]:
    """The file's lines, decoded as UTF-8 block by block (a leading byte-order mark dropped)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, offset = "", 0
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK)
            if offset == 0:
                _refuse_utf16(block, path)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                raise _not_utf8(path, offset + err.start) from None
            text = (carry + text).lstrip("\ufeff") if offset == 0 else carry + text
            offset += len(block)
            lines = text.split("\n")
            carry = lines.pop() if block else ""  # may end in the \r of a \r\n cut by the block boundary
            for line in lines:
                yield from line.removesuffix("\r").split("\r")  # \r\n, and a lone \r (old Macs), end lines
            if not block:
                return


def _refuse_utf16(head: bytes, path: Path) -> None:
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path} is UTF-16 text; expected UTF-8 (save it as UTF-8, e.g. iconv -f UTF-16 -t UTF-8)")


def _not_utf8(path: Path, offset: int) -> DataError:
    return DataError(f"{path} is not UTF-8 text (invalid byte at offset {offset}); expected UTF-8 "
                     "(convert it, e.g. iconv -f LATIN1 -t UTF-8)")


def _jsonl_texts(path: Path) -> Iterator[str]:
    """The field `text` of each line's JSON object (empty lines skipped)."""
    with open(path, "rb") as f:
        head = f.read(4)
        _refuse_utf16(head, path)
        f.seek(0)
        offset = 0
        for number, line in enumerate(f, 1):
            try:
                decoded = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, offset + err.start) from None
            offset += len(line)
            if decoded.strip():
                yield _jsonl_text(decoded.lstrip("\ufeff") if number == 1 else decoded, path, number)


def _jsonl_text(line: str, path: Path, number: int) -> str:
    expected = 'expected one JSON object per line with a string field "text"'
    try:
        document = json.loads(line)
    except ValueError as err:
        raise DataError(f"{path} line {number} is not JSON ({err.msg}); {expected}") from None
    text = document.get("text") if isinstance(document, dict) else None
    if not isinstance(text, str):
        raise DataError(f"{path} line {number} has no string field \"text\"; {expected}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{path} line {number} holds an unpaired surrogate escape (\\ud800-\\udfff), "
                        "which is not text; expected Unicode text") from None
    return text


def _parquet_texts(path: Path) -> Iterator[str]:
    """Column `text` of each row, one row group batch at a time."""
    try:
        with pq.ParquetFile(path) as pf:
            schema = pf.schema_arrow
            kind = schema.field("text").type if "text" in schema.names else None
            if kind not in (pa.string(), pa.large_string(), pa.string_view()):
                raise DataError(f"{path} has no string column \"text\" (columns: {', '.join(schema.names)}); "
                                "expected one document per row in a string column \"text\"")
            row = 0
            for batch in pf.iter_batches(columns=["text"]):
                column = batch.column("text")
                if column.null_count:
                    first = row + column.is_null().to_pylist().index(True)
                    raise DataError(f"{path} row {first} has no text (null); expected a string in every row")
                yield from column.to_pylist()
                row += len(column)
    except pa.ArrowException as err:
        raise DataError(f"{path} is not a readable parquet file ({' '.join(str(err).split())[:200]})") from None
