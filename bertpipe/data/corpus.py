"""Split files read into paragraphs of sentences of tokens, streamed in shards and vectorised with numpy.

What a file is made of depends on its layout and on `prepare.sentences`:

- Layout (`Reading.layout`): WikiText's `wiki.*.tokens` files, whose documents (articles) start at
  ` = Title = ` headings, or the `{train,valid,test}.txt` files `bertpipe.data.ingest` writes, whose
  documents are separated by blank lines. Either way a line is a paragraph.
- Sentences: `wikitext` is d2l's `_read_wiki`: a line is a paragraph when `len(line.split(' . ')) >= 2`,
  its sentences are `line.strip().lower().split(' . ')` and their words `sentence.split()`; the other
  rules (`sentencex`, `lines`) are `bertpipe.data.sentences`', which keep every non-blank line.
- Tokens (`Reading.tokens`): `word` applies `bertpipe.vocab`'s rule (lowercase, reserved tokens split
  off, Python's whitespace); `raw` keeps the words as cut by BERT's whitespace for WordPiece.

d2l's rule is reproduced exactly without ever holding the corpus as Python strings. It works on the
bytes of a shard: words are the runs of non-whitespace, and a sentence break is a `.` word that
`str.split(' . ')` would consume, i.e. one with a space on both sides, not first or last on its
stripped line, and not overlapping the previous match. Words are then dictionary-encoded by pyarrow,
so only a shard's *distinct* words reach Python.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bertpipe.data.sentences import split_sentences
from bertpipe.errors import DataError
from bertpipe.vocab import BERT_WHITESPACE, PY_WHITESPACE, lowercase, split_special

SHARD_BYTES = 4 << 20  # measured fastest: big arrays beyond ~32 MB page-fault on every shard
_SPACE, _DOT, _NEWLINE, _EQUALS = ord(" "), ord("."), ord("\n"), ord("=")


class Whitespace:
    """A set of whitespace characters as byte tests: ranges of ASCII codes (comparisons are 3x faster
    than a table lookup), and the UTF-8 sequences of the other characters."""

    def __init__(self, chars: str) -> None:
        self.ascii_ranges: list[tuple[int, int]] = []  # inclusive (low, high) runs of consecutive codes
        for code in sorted(ord(c) for c in chars if ord(c) < 128):
            if self.ascii_ranges and self.ascii_ranges[-1][1] == code - 1:
                self.ascii_ranges[-1] = (self.ascii_ranges[-1][0], code)
            else:
                self.ascii_ranges.append((code, code))
        self.multi_byte = tuple(c.encode() for c in chars if ord(c) >= 128)
        self.is_lead = np.zeros(256, dtype=bool)  # first bytes of the multi-byte characters
        self.is_lead[[char[0] for char in self.multi_byte]] = True
        self.first_lead = min(char[0] for char in self.multi_byte)


PYTHON, BERT = Whitespace(PY_WHITESPACE), Whitespace(BERT_WHITESPACE)


@dataclass(frozen=True)
class Reading:
    """How to read a split file (see the module docstring)."""

    layout: Literal["wikitext", "documents"] = "wikitext"
    sentences: Literal["wikitext", "sentencex", "lines"] = "wikitext"
    language: str = "en"
    tokens: Literal["word", "raw"] = "word"

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
    lines: int
    nbytes: int


def read_shards(path: Path, reading: Reading = Reading(), shard_bytes: int = SHARD_BYTES,
                threads: int = 2) -> Iterator[Shard]:
    """Tokenize the file at `path` shard by shard (cut at line ends), in file order.

    Shards are tokenized on `threads` threads (numpy and pyarrow release the GIL), with at most one
    more shard read ahead, so memory stays a few shards whatever the file's size. Shards of the
    `documents` layout are cut after a blank line where one is near, so a document stays whole.
    """
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future[Shard]] = deque()
        for data in _line_chunks(path, shard_bytes, b"\n\n" if reading.layout == "documents" else b"\n"):
            pending.append(pool.submit(tokenize, data, reading))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _line_chunks(path: Path, shard_bytes: int, cut_after: bytes) -> Iterator[bytes]:
    """About `shard_bytes` of the file at a time, cut after the last `cut_after` (else a line end),
    checked as UTF-8."""
    offset, carry = 0, b""
    with open(path, "rb") as f:
        while block := f.read(shard_bytes):
            data = carry + block
            cut = data.rfind(cut_after) + len(cut_after) if cut_after in data else data.rfind(b"\n") + 1
            carry = data[cut:]
            if cut:
                yield _checked(data[:cut], path, offset)
                offset += cut
    if carry:
        yield _checked(carry + b"\n", path, offset)


def tokenize(data: bytes, reading: Reading = Reading()) -> Shard:
    """The paragraphs, sentences and tokens of newline-terminated UTF-8 `data`."""
    if reading.sentences != "wikitext":
        return _tokenize_sentence_lines(data, reading)
    buf = np.frombuffer(data, dtype=np.uint8)
    is_ws = _whitespace(buf, reading.whitespace)
    line_ends = np.flatnonzero(buf == _NEWLINE)
    starts, ends, words_per_line = _words(is_ws, line_ends)
    is_paragraph = _has_sentence_break(buf, line_ends)
    kept = np.repeat(is_paragraph, words_per_line)
    line = np.repeat(np.arange(len(line_ends)), words_per_line)[kept]
    separator = _separators(buf, starts[kept], ends[kept], line)
    paragraph = (np.cumsum(is_paragraph) - 1)[line]
    sentence = paragraph + np.cumsum(separator) - separator
    n_paragraphs = int(is_paragraph.sum())
    n_sentences = n_paragraphs + int(separator.sum())
    words, ids, per_word = _encode_words(np.compress(~is_ws, buf), ends - starts, reading)
    kept_words = np.flatnonzero(kept)[~separator]
    documents = np.cumsum(_document_starts(buf, line_ends, reading.layout))
    return Shard(
        words=words,
        word_ids=ids[ragged(np.cumsum(per_word)[kept_words] - per_word[kept_words], per_word[kept_words])],
        sentence_lengths=_tokens_per(sentence[~separator], per_word[kept_words], n_sentences),
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
    is_ws = _whitespace(buf, reading.whitespace)
    starts, ends, words_per_line = _words(is_ws, np.flatnonzero(buf == _NEWLINE))
    words, ids, per_word = _encode_words(np.compress(~is_ws, buf), ends - starts, reading)
    sentence = np.repeat(np.arange(len(words_per_line)), words_per_line)
    return Shard(words=words, word_ids=ids, sentence_lengths=_tokens_per(sentence, per_word, len(words_per_line)),
                 paragraph_lengths=np.asarray(split.paragraph_lengths, dtype=np.int64),
                 paragraph_documents=np.asarray(split.paragraph_documents, dtype=np.int64),
                 documents=split.documents, lines=data.count(b"\n"), nbytes=len(data))


def _words(is_ws: np.ndarray, line_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each word (a run of non-whitespace bytes) starts and ends, and how many each line holds."""
    bounded = np.concatenate(([True], is_ws, [True]))
    edges = np.flatnonzero(bounded[1:] != bounded[:-1])  # word starts and ends, alternating
    starts, ends = edges[0::2], edges[1::2]
    return starts, ends, np.diff(np.searchsorted(starts, line_ends), prepend=0)


def _whitespace(buf: np.ndarray, whitespace: Whitespace = PYTHON) -> np.ndarray:
    """Per byte: is it part of a character of `whitespace`?"""
    is_ws = np.zeros(len(buf), dtype=bool)
    for low, high in whitespace.ascii_ranges:
        is_ws |= (buf == low) if low == high else ((buf >= low) & (buf <= high))
    non_ascii = np.flatnonzero(buf >= whitespace.first_lead)  # sparse in mostly-ASCII text
    leads = non_ascii[whitespace.is_lead[buf[non_ascii]]]
    for char in whitespace.multi_byte:
        hits = leads[leads <= len(buf) - len(char)]
        for k, byte in enumerate(char):
            hits = hits[buf[hits + k] == byte]
        for k in range(len(char)):
            is_ws[hits + k] = True
    return is_ws


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


def _encode_words(packed: np.ndarray, lengths: np.ndarray,
                  reading: Reading) -> tuple[pa.StringArray, np.ndarray, np.ndarray]:
    """Dictionary-encode the words laid end to end in `packed` and apply the token rule to the distinct
    ones (`word`: `bertpipe.vocab`'s, lowercase and reserved tokens split off; `raw`: none).

    Returns the distinct tokens, every token's id in them, and how many tokens each word became
    (1, except for words such as `a<unk>`).
    """
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    strings = pa.LargeStringArray.from_buffers(len(lengths), pa.py_buffer(offsets), pa.py_buffer(packed))
    cased = pc.dictionary_encode(strings)
    word = cased.indices.to_numpy()
    if reading.tokens == "raw":
        return cased.dictionary.cast(pa.string()), word, np.ones(len(word), dtype=np.int64)
    tokens, sizes = _apply_rule(cased.dictionary)
    encoded = pc.dictionary_encode(tokens)
    flat = encoded.indices.to_numpy()
    per_word = sizes[word]
    return encoded.dictionary.cast(pa.string()), flat[ragged((np.cumsum(sizes) - sizes)[word], per_word)], per_word


def _apply_rule(words: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """`bertpipe.vocab`'s rule on each distinct word: its tokens laid end to end, and how many each made.

    ASCII words without '<' (nearly all) are lowercased by pyarrow, without the GIL; the others go
    through Python's rule one by one.
    """
    simple = pc.and_(pc.string_is_ascii(words), pc.invert(pc.match_substring(words, "<"))).to_numpy(
        zero_copy_only=False)
    if simple.all():
        return pc.ascii_lower(words), np.ones(len(words), dtype=np.int64)
    others = np.flatnonzero(~simple)
    pieces = [split_special(lowercase(w)) for w in words.take(pa.array(others)).to_pylist()]
    sizes = np.ones(len(words), dtype=np.int64)
    sizes[others] = [len(p) for p in pieces]
    starts = np.cumsum(sizes) - sizes
    tokens = np.empty(int(sizes.sum()), dtype=object)
    tokens[starts[simple]] = pc.ascii_lower(words.filter(pa.array(simple))).to_numpy(zero_copy_only=False)
    tokens[ragged(starts[others], sizes[others])] = list(itertools.chain.from_iterable(pieces))
    return pa.array(tokens, pa.large_string()), sizes


def _tokens_per(sentence: np.ndarray, tokens: np.ndarray, n_sentences: int) -> np.ndarray:
    """How many tokens each sentence holds, given each word's sentence and token count."""
    if (tokens == 1).all():
        return np.bincount(sentence, minlength=n_sentences)
    return np.bincount(sentence, weights=tokens, minlength=n_sentences).astype(np.int64)


def ragged(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The ranges [starts[i], starts[i] + counts[i]) laid end to end (an arange when every count is 1)."""
    if len(counts) and (counts == 1).all():
        return starts
    return np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))


def _checked(data: bytes, path: Path, offset: int) -> bytes:
    """Refuse bytes that are not UTF-8; apply Python's universal newlines to stray CRs."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (invalid byte at offset {offset + err.start})") from None
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return data
