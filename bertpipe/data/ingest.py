"""A folder of the user's own text, checked and written as the pipeline reads it: {train,valid,test}.txt.

Each split is a file, a folder of files or shards (`bertpipe.data.layout`), each file in one of three
formats, text and JSON lines optionally compressed:

- `txt`: documents separated by a blank line, paragraphs one per line; a file ends a document;
- `jsonl`: one document per line, a JSON object whose field `text` holds it (paragraphs are its lines);
- `parquet`: one document per row, in a string column `text` (string, large_string, string_view or
  dictionary-encoded, as pandas writes a categorical).

Every split is written in the `txt` layout: each paragraph on a line of its own, exactly one empty line
between documents, `\\n` line ends. Document boundaries are kept (files never run into each other)
because next-sentence negatives and Google's segments are drawn from them. Byte-order marks are
dropped wherever they are (two Windows files joined with `cat` leave one mid-file) and counted; a line
longer than `bertpipe.data.lines.MAX_LINE_BYTES` is cut into paragraphs there (`bertpipe.data.lines`).
Text must be UTF-8, in any language; anything else stops the stage with one line naming the file,
where, and what is expected. Files are streamed (compressed ones decompressed as they are read), so
memory stays at a block, a line or a row group whatever the corpus's size. What was read is written
to `ingest.json` beside the splits; the prepare stage reports it in `metrics/prepare.json`.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import json
import logging
import lzma
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

try:
    from compression import zstd  # Python 3.14's
except ImportError:
    from backports import zstd

from bertpipe.data.layout import TextFile, split_layout
from bertpipe.data.lines import MAX_LINE_BYTES, cut_long_lines, cut_point
from bertpipe.data.raw_folder import documents_file, write_ingest_report
from bertpipe.errors import DataError, first_line
from bertpipe.progress import Progress

BLOCK = 1 << 20
BOM, BOM_CHAR = codecs.BOM_UTF8, "\ufeff"
log = logging.getLogger(__name__)


@dataclass
class SplitText:
    """One split as written: documents separated by one empty line, and the counts of what was changed."""

    out: BinaryIO
    files: int = 0
    documents: int = 0
    byte_order_marks: int = 0
    long_line_cuts: int = 0
    _in_document: bool = False

    def line(self, text: str, blank_ends_document: bool = True) -> None:
        """A line of text: a blank one ends the document (where it may), any other is a paragraph, its
        trailing whitespace dropped."""
        if BOM_CHAR in text:
            self.byte_order_marks += text.count(BOM_CHAR)
            text = text.replace(BOM_CHAR, "")
        if not text.strip():
            if blank_ends_document:
                self.end_document()
            return
        data = text.rstrip().encode("utf-8")
        if len(data) > MAX_LINE_BYTES:
            data, cuts = cut_long_lines(data + b"\n")
            self.long_line_cuts += cuts
            data = b"\n".join(p for p in data.split(b"\n") if p.decode("utf-8").strip()) + b"\n"
        else:
            data += b"\n"
        if not self._in_document:
            self.out.write(b"\n" if self.documents else b"")
            self.documents += 1
            self._in_document = True
        self.out.write(data)

    def end_document(self) -> None:
        self._in_document = False

    def report(self) -> dict[str, int]:
        return {key: getattr(self, key) for key in ("files", "documents", "byte_order_marks", "long_line_cuts")}


def ingest_folder(source: Path, out_dir: Path) -> dict[str, dict[str, int]]:
    """Check every split of `source` and write it to `out_dir/{split}.txt`; returns what was read per split
    (also written to `out_dir/ingest.json`).

    Raises:
        DataError: the layout (`bertpipe.data.layout.split_layout`) or a file's content is not what is read.
    """
    report = {}
    for split, files in split_layout(source).items():
        total = sum(file.path.stat().st_size for file in files)
        log.info("%s: %d file%s (%s%s), %.1f MB", split, len(files), "s" * (len(files) > 1), files[0].path.name,
                 f" ... {files[-1].path.name}" if len(files) > 1 else "", total / 1e6)
        with open(documents_file(out_dir, split), "wb") as out, Progress(total, f"reading {split}", "B",
                                                                    unit_scale=True) as bar:
            text = SplitText(out)
            for file in files:
                _copy(file, text, bar)
                text.end_document()
                text.files += 1
        if text.documents == 0:
            what = files[0].path.name if len(files) == 1 else f"the {split} split ({len(files)} files)"
            raise DataError(f"data.source {source}: {what} holds no text; expected at least one document")
        log.info("%s: %d documents", split, text.documents)
        report[split] = text.report()
    write_ingest_report(out_dir, report)
    return report


def _copy(file: TextFile, text: SplitText, bar: Progress) -> None:
    """The file's documents into `text`, the bar advanced by the (compressed) bytes read."""
    if file.format == "parquet":
        _copy_parquet(file.path, text, bar)
        return
    with open(file.path, "rb") as raw, _decompressed(file, raw) as stream:
        meter = _Meter(raw, bar)
        if file.format == "txt":
            _copy_txt(stream, file.path, text, meter)
        else:
            _copy_jsonl(stream, file.path, text, meter)
        meter.tick()


class _Meter:
    """Advances a progress bar by how far the underlying (compressed) file has been read."""

    def __init__(self, raw: BinaryIO, bar: Progress) -> None:
        self.raw, self.bar, self.done = raw, bar, 0

    def tick(self) -> None:
        position = self.raw.tell()
        self.bar.update(position - self.done)
        self.done = position


DECOMPRESSION_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, zstd.ZstdError)
DECOMPRESSORS = {"gz": lambda raw: gzip.GzipFile(fileobj=raw), "bz2": bz2.BZ2File, "xz": lzma.LZMAFile,
                 "zst": zstd.ZstdFile}  # each reads a file object as a stream, frames/members one after another


@contextmanager
def _decompressed(file: TextFile, raw: BinaryIO) -> Iterator[BinaryIO]:
    """The file's bytes, decompressed as a stream; a corrupt or truncated archive is one line naming the file."""
    if file.compression is None:
        yield raw
        return
    stream = DECOMPRESSORS[file.compression](raw)
    try:
        with stream:
            yield stream
    except DECOMPRESSION_ERRORS as err:
        raise DataError(f"{file.path} is not a readable .{file.compression} file ({first_line(err)}); expected a "
                        "complete archive (is the download or copy cut short?)") from None


def _copy_txt(stream: BinaryIO, path: Path, text: SplitText, meter: _Meter) -> None:
    """Lines block by block, checked as UTF-8; a line past the maximum is cut as it streams in."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, offset = b"", 0
    while True:
        block = stream.read(BLOCK)
        if offset == 0:
            _refuse_utf16(block, path)
        try:
            decoder.decode(block, final=not block)
        except UnicodeDecodeError as err:
            raise _not_utf8(path, offset + err.start) from None
        offset += len(block)
        data = _unix_newlines(carry + block, final=not block)
        end = data.rfind(b"\n") + 1
        carry = data[end:]
        for line in data[:end].decode("utf-8").split("\n")[:-1]:
            text.line(line)
        while len(carry) > MAX_LINE_BYTES:
            cut = cut_point(carry, 0)
            text.line(carry[:cut].decode("utf-8"), blank_ends_document=False)
            text.long_line_cuts += 1
            carry = carry[cut:]
        meter.tick()
        if not block:
            break
    if carry:
        text.line(carry.decode("utf-8"))


def _unix_newlines(data: bytes, final: bool) -> bytes:
    """`\\r\\n` and a lone `\\r` (old Macs) as `\\n`; a `\\r` ending unfinished data waits for what follows."""
    hold = not final and data.endswith(b"\r")
    body = data[:-1] if hold else data
    if b"\r" in body:
        body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return body + b"\r" if hold else body


def _refuse_utf16(head: bytes, path: Path) -> None:
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataError(f"{path} is UTF-16 text; expected UTF-8 (save it as UTF-8, e.g. iconv -f UTF-16 -t UTF-8)")


def _not_utf8(path: Path, offset: int) -> DataError:
    return DataError(f"{path} is not UTF-8 text (invalid byte at offset {offset}); expected UTF-8 "
                     "(convert it, e.g. iconv -f LATIN1 -t UTF-8)")


def _copy_document(document: str, text: SplitText) -> None:
    """A row's text (jsonl, parquet) as one document: its non-blank lines are its paragraphs."""
    for line in document.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        text.line(line, blank_ends_document=False)
    text.end_document()


def _copy_jsonl(stream: BinaryIO, path: Path, text: SplitText, meter: _Meter) -> None:
    """The field `text` of each line's JSON object (blank lines skipped)."""
    offset = 0
    for number, line in enumerate(stream, 1):
        if number == 1:
            _refuse_utf16(line, path)
        if line.startswith(BOM):
            text.byte_order_marks += 1
            line = line[len(BOM):]
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _not_utf8(path, offset + err.start) from None
        offset += len(line)
        if decoded.strip():
            _copy_document(_jsonl_text(decoded, path, number), text)
        if number % 1024 == 0:
            meter.tick()


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


def _is_text_type(kind: pa.DataType) -> bool:
    """Any Arrow string-like type, dictionary-encoded or not (pandas' categoricals are dictionaries)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _copy_parquet(path: Path, text: SplitText, bar: Progress) -> None:
    """Column `text` of each row, a batch at a time; every refusal of pyarrow's is one line naming the file."""
    size = path.stat().st_size
    try:
        with pq.ParquetFile(path) as pf:
            schema, rows = pf.schema_arrow, max(pf.metadata.num_rows, 1)
            if "text" not in schema.names or not _is_text_type(schema.field("text").type):
                columns = ", ".join(f"{field.name} ({field.type})" for field in schema)
                raise DataError(f"{path} has no string column \"text\" (columns: {columns}); "
                                "expected one document per row in a string column \"text\"")
            row = 0
            for batch in pf.iter_batches(columns=["text"]):
                column = batch.column("text")
                if column.null_count:
                    first = row + column.is_null().to_pylist().index(True)
                    raise DataError(f"{path} row {first} has no text (null); expected a string in every row")
                for document in column.to_pylist():  # a dictionary array gives its values
                    _copy_document(document, text)
                bar.update(size * len(column) // rows)
                row += len(column)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path} is not a readable parquet file ({first_line(err)})") from None
