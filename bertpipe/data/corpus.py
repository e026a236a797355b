"""Split files read into paragraphs of sentences of tokens, streamed in shards and vectorised with numpy.

What a file is made of depends on its layout and on `prepare.sentences`:

- Layout (`Reading.layout`): WikiText's `wiki.*.tokens` files, whose documents (articles) start at
  ` = Title = ` headings, or the `{train,valid,test}.txt` files `bertpipe.data.ingest` writes, whose
  documents are separated by blank lines. Either way a line is a paragraph.
- Long lines: a line longer than `MAX_LINE_BYTES` (32 KiB) is cut into lines of at most that length,
  at a sentence end where the window holds one (`bertpipe.data.lines`), so that reading stays linear in
  time and a shard's size whatever the lines' lengths; `Shard.long_line_cuts` counts the cuts.
- Sentences: `wikitext` is d2l's `_read_wiki`: a line is a paragraph when `len(line.split(' . ')) >= 2`,
  its sentences are `line.strip().lower().split(' . ')` and their words `sentence.split()`; the other
  rules (`sentencex`, `lines`) are `bertpipe.data.sentences`', which keep every non-blank line.
- Tokens (`Reading.tokens`): `word` applies `bertpipe.vocab`'s rule (lowercase, reserved tokens split
  off, Python's whitespace), `cased` the same rule without lowercasing (`prepare.lowercase: false`);
  `raw` keeps the words as cut by BERT's whitespace for WordPiece.

d2l's rule is reproduced exactly without ever holding the corpus as Python strings. It works on the
bytes of a shard: words are the runs of non-whitespace, and a sentence break is a `.` word that
`str.split(' . ')` would consume, i.e. one with a space on both sides, not first or last on its
stripped line, and not overlapping the previous match. Words are then dictionary-encoded by pyarrow,
so only a shard's *distinct* words reach Python.
"""

from __future__ import annotations

import codecs
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from bertpipe.data.lines import MAX_LINE_BYTES, cut_long_lines, cut_point
from bertpipe.data.sentences import split_sentences
from bertpipe.data.words import BERT, PYTHON, Whitespace, encode_words, ragged, tokens_per, whitespace_mask, word_spans
from bertpipe.errors import DataError

SHARD_BYTES = 4 << 20  # measured fastest: big arrays beyond ~32 MB page-fault on every shard
_SPACE, _DOT, _NEWLINE, _EQUALS = ord(" "), ord("."), ord("\n"), ord("=")
_BLANKS = b" \t\x0b\x0c"  # whitespace within a line
BOM = codecs.BOM_UTF8


@dataclass(frozen=True)
class Reading:
    """How to read a split file (see the module docstring)."""

    layout: Literal["wikitext", "documents"] = "wikitext"
    sentences: Literal["wikitext", "sentencex", "lines"] = "wikitext"
    language: str = "en"
    tokens: Literal["word", "cased", "raw"] = "word"

    @property
    def whitespace(self) -> Whitespace:
        return BERT if self.tokens == "raw" else PYTHON


@dataclass
class Shard:
    """One shard's paragraphs. `word_ids` index `words`, the shard's distinct words (after the token rule)."""

    words: pa.StringArray
    word_ids: np.ndarray
    sentence_lengths: np.ndarray
    paragraph_lengths: np.ndarray
    paragraph_documents: np.ndarray  # per paragraph: document starts (headings, blank lines) before it in the shard
    documents: int  # document starts in the whole shard
    lines: int  # of the file: a line cut in pieces counts once
    nbytes: int  # of the file
    long_line_cuts: int = 0  # line ends added inside lines longer than `MAX_LINE_BYTES`
    byte_order_marks: int = 0  # dropped wherever they were (two files joined with `cat` leave one mid-file)


def read_shards(path: Path, reading: Reading = Reading(), shard_bytes: int = SHARD_BYTES,
                threads: int = 2) -> Iterator[Shard]:
    """Tokenize the file at `path` shard by shard (cut at line ends), in file order.

    Shards are tokenized on `threads` threads (numpy and pyarrow release the GIL), with at most one
    more shard read ahead, so memory stays a few shards whatever the file's size. Shards of the
    `documents` layout are cut after a blank line where one is near, so a document stays whole. A line
    longer than `MAX_LINE_BYTES` is cut into pieces (`bertpipe.data.lines`), also where it runs past
    a shard, so a shard stays about `shard_bytes` whatever the lines' lengths.
    """
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future[Shard]] = deque()
        for chunk in _line_chunks(path, shard_bytes, b"\n\n" if reading.layout == "documents" else b"\n"):
            pending.append(pool.submit(_tokenize_chunk, chunk, reading))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclass(frozen=True)
class _Chunk:
    """Complete lines, checked: `nbytes` of the file (CRLFs made LFs, whitespace at a cut dropped),
    and whether a line end was added, cutting a line that runs past the shard (`cuts`, 0 or 1)."""

    data: bytes
    nbytes: int
    cuts: int


def _tokenize_chunk(chunk: _Chunk, reading: Reading) -> Shard:
    """`tokenize` with the chunk's long lines cut (and in WikiText's files its byte-order marks dropped:
    `bertpipe.data.ingest` has dropped those of your own text, where a line left empty would end a document);
    its line count is the file's."""
    marks = chunk.data.count(BOM) if reading.layout == "wikitext" and BOM in chunk.data else 0
    data, cuts = cut_long_lines(chunk.data.replace(BOM, b"") if marks else chunk.data)
    cuts += chunk.cuts
    shard = tokenize(data, reading)
    return replace(shard, lines=shard.lines - cuts, nbytes=chunk.nbytes, long_line_cuts=cuts,
                   byte_order_marks=marks)


def _line_chunks(path: Path, shard_bytes: int, cut_after: bytes) -> Iterator[_Chunk]:
    """About `shard_bytes` of the file at a time: cut after the last `cut_after`, else a line end, else
    inside the last line when that line alone runs longer than a shard and than `MAX_LINE_BYTES`."""
    offset, carry = 0, b""
    with open(path, "rb") as f:
        while block := f.read(shard_bytes):
            data = carry + block
            end, resume, inside = _chunk_end(data, max(shard_bytes, MAX_LINE_BYTES + 1), cut_after)
            carry = data[resume:]
            if end:
                yield _Chunk(_checked(data[:end] + b"\n" * inside, path, offset), resume, int(inside))
                offset += resume
    if carry:  # the last line, unless the file ends after a blank line (then the carry is the lines after it)
        yield _Chunk(_checked(carry if carry.endswith(b"\n") else carry + b"\n", path, offset), len(carry), 0)


def _chunk_end(data: bytes, longest_carry: int, cut_after: bytes) -> tuple[int, int, bool]:
    """Where to end a chunk of `data` so that less than `longest_carry` bytes remain, where the next
    chunk starts, and whether that cuts a line. Stray CRs end lines too (`_checked`), except a last one,
    which may be half of a CRLF."""
    line_start = max(data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - 1)) + 1
    if len(data) - line_start < longest_carry:
        if (at := data.rfind(cut_after)) >= 0 and len(data) - at - len(cut_after) < longest_carry:
            return at + len(cut_after), at + len(cut_after), False
        return line_start, line_start, False
    # The last line alone is that long: cut it in its last MAX_LINE_BYTES, before its last non-blank
    # byte, so that its rest is never empty (a blank line ends a document) and starts with no blank.
    last = len(data.rstrip(_BLANKS + b"\r")) - 1
    if last <= line_start:  # blanks: cut before the last one that is not a CR
        end = len(data) - (2 if data.endswith(b"\r") else 1)
        return end, end, True
    start = max(line_start, last - MAX_LINE_BYTES)
    cut = cut_point(data, start, last - start)
    return cut, len(data) - len(data[cut:].lstrip(_BLANKS)), True


def tokenize(data: bytes, reading: Reading = Reading()) -> Shard:
    """The paragraphs, sentences and tokens of newline-terminated UTF-8 `data`."""
    if reading.sentences != "wikitext":
        return _tokenize_sentence_lines(data, reading)
    buf = np.frombuffer(data, dtype=np.uint8)
    is_ws = whitespace_mask(buf, reading.whitespace)
    line_ends = np.flatnonzero(buf == _NEWLINE)
    starts, ends, words_per_line = word_spans(is_ws, line_ends)
    is_paragraph = _has_sentence_break(buf, line_ends)
    kept = np.repeat(is_paragraph, words_per_line)
    line = np.repeat(np.arange(len(line_ends)), words_per_line)[kept]
    separator = _separators(buf, starts[kept], ends[kept], line)
    paragraph = (np.cumsum(is_paragraph) - 1)[line]
    sentence = paragraph + np.cumsum(separator) - separator
    n_paragraphs = int(is_paragraph.sum())
    n_sentences = n_paragraphs + int(separator.sum())
    words, ids, per_word = encode_words(np.compress(~is_ws, buf), ends - starts, reading.tokens)
    kept_words = np.flatnonzero(kept)[~separator]
    documents = np.cumsum(_document_starts(buf, line_ends, reading.layout))
    return Shard(
        words=words,
        word_ids=ids[ragged(np.cumsum(per_word)[kept_words] - per_word[kept_words], per_word[kept_words])],
        sentence_lengths=tokens_per(sentence[~separator], per_word[kept_words], n_sentences),
        paragraph_lengths=1 + np.bincount(paragraph[separator], minlength=n_paragraphs),
        paragraph_documents=documents[is_paragraph],
        documents=int(documents[-1]) if len(documents) else 0,
        lines=len(line_ends),
        nbytes=len(data),
    )


def _tokenize_sentence_lines(data: bytes, reading: Reading) -> Shard:
    """Sentences found by `bertpipe.data.sentences`, one per line of a new buffer, then cut into words."""
    split = split_sentences(data.decode("utf-8"), reading.layout, reading.sentences, reading.language)
    buf = np.frombuffer(split.text.encode("utf-8"), dtype=np.uint8)
    is_ws = whitespace_mask(buf, reading.whitespace)
    starts, ends, words_per_line = word_spans(is_ws, np.flatnonzero(buf == _NEWLINE))
    words, ids, per_word = encode_words(np.compress(~is_ws, buf), ends - starts, reading.tokens)
    sentence = np.repeat(np.arange(len(words_per_line)), words_per_line)
    return Shard(words=words, word_ids=ids, sentence_lengths=tokens_per(sentence, per_word, len(words_per_line)),
                 paragraph_lengths=np.asarray(split.paragraph_lengths, dtype=np.int64),
                 paragraph_documents=np.asarray(split.paragraph_documents, dtype=np.int64),
                 documents=split.documents, lines=data.count(b"\n"), nbytes=len(data))


def _document_starts(buf: np.ndarray, line_ends: np.ndarray, layout: str) -> np.ndarray:
    """Per line: does a new document start after it (WikiText: an article title; else a blank line)?"""
    if layout == "wikitext":
        return _is_article_heading(buf, line_ends)
    starts = np.concatenate(([0], line_ends[:-1] + 1))
    return line_ends == starts  # `bertpipe.data.ingest` leaves exactly one empty line between documents


def _is_article_heading(buf: np.ndarray, line_ends: np.ndarray) -> np.ndarray:
    """Per line: is it a WikiText article title, ` = Title = ` (sections are ` = = Section = = `)?

    Articles are the documents of Google's `segments` examples (NSP negatives come from another one).
    """
    starts = np.concatenate(([0], line_ends[:-1] + 1))
    candidates = np.flatnonzero(line_ends - starts >= 7)
    s, e = starts[candidates], line_ends[candidates]
    title = ((buf[s] == _SPACE) & (buf[s + 1] == _EQUALS) & (buf[s + 2] == _SPACE) & (buf[s + 3] != _EQUALS)
             & (buf[e - 3] == _SPACE) & (buf[e - 2] == _EQUALS) & (buf[e - 1] == _SPACE))
    is_title = np.zeros(len(line_ends), dtype=bool)
    is_title[candidates[title]] = True
    return is_title


def _has_sentence_break(buf: np.ndarray, line_ends: np.ndarray) -> np.ndarray:
    """Per line: does the raw line contain ' . ' (d2l's `len(line.split(' . ')) >= 2`)?"""
    dots = np.flatnonzero(buf == _DOT)
    dots = dots[(dots > 0) & (dots < len(buf) - 1)]
    dots = dots[(buf[dots - 1] == _SPACE) & (buf[dots + 1] == _SPACE)]
    has_break = np.zeros(len(line_ends), dtype=bool)
    has_break[np.searchsorted(line_ends, dots)] = True
    return has_break


def _separators(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, line: np.ndarray) -> np.ndarray:
    """Which words are `.`s consumed by `stripped_line.split(' . ')`.

    A match needs a space on both sides inside the stripped line, so the `.` is neither first nor
    last on its line; in a run `. . .` the matches overlap and `split` takes every other one.
    """
    n = len(starts)
    where = np.flatnonzero((ends - starts == 1) & (buf[starts] == _DOT))
    where = where[(where > 0) & (where < n - 1)]
    where = where[(line[where - 1] == line[where]) & (line[where + 1] == line[where])
                  & (buf[starts[where] - 1] == _SPACE) & (buf[ends[where]] == _SPACE)]
    overlaps_previous = np.zeros(len(where), dtype=bool)
    overlaps_previous[1:] = starts[where[1:]] - starts[where[:-1]] == 2
    run_start = np.maximum.accumulate(np.where(overlaps_previous, 0, np.arange(len(where))))
    separator = np.zeros(n, dtype=bool)
    separator[where[(np.arange(len(where)) - run_start) % 2 == 0]] = True
    return separator


def _checked(data: bytes, path: Path, offset: int) -> bytes:
    """Refuse bytes that are not UTF-8; apply Python's universal newlines to stray CRs."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {offset + err.start})") from None
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return data
