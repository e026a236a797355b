"""WikiText read the way d2l's `_read_wiki` reads it, streamed in shards and vectorised with numpy.

d2l keeps a line as a paragraph when `len(line.split(' . ')) >= 2`, takes
`line.strip().lower().split(' . ')` as its sentences and `sentence.split()` as their words.
This module reproduces exactly that without ever holding the corpus as Python strings. It works
on the bytes of a shard: words are the runs of non-whitespace (Python's whitespace set), and a
sentence break is a `.` word that `str.split(' . ')` would consume, i.e. one with a space on both
sides, not first or last on its stripped line, and not overlapping the previous match. Words are
then dictionary-encoded by pyarrow, so only a shard's *distinct* words reach Python, where
`bertpipe.vocab`'s rule lowercases them and splits reserved tokens off (`a<unk>` is two tokens).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bertpipe.errors import DataError
from bertpipe.vocab import PY_WHITESPACE, lowercase, split_special

SHARD_BYTES = 4 << 20  # measured fastest: big arrays beyond ~32 MB page-fault on every shard
_MULTI_BYTE_WS_CHARS = tuple(c.encode() for c in PY_WHITESPACE if ord(c) >= 128)
_IS_LEAD = np.zeros(256, dtype=bool)  # first bytes of the multi-byte whitespace characters
_IS_LEAD[[char[0] for char in _MULTI_BYTE_WS_CHARS]] = True
_FIRST_LEAD = min(char[0] for char in _MULTI_BYTE_WS_CHARS)
_SPACE, _DOT, _NEWLINE, _EQUALS = ord(" "), ord("."), ord("\n"), ord("=")


@dataclass
class Shard:
    """One shard's paragraphs. `word_ids` index `words`, the shard's distinct lowercased words."""

    words: pa.StringArray
    word_ids: np.ndarray
    sentence_lengths: np.ndarray
    paragraph_lengths: np.ndarray
    paragraph_headings: np.ndarray  # per paragraph: article headings (` = Title = `) before it in the shard
    headings: int
    lines: int
    nbytes: int


def read_shards(path: Path, shard_bytes: int = SHARD_BYTES, threads: int = 2) -> Iterator[Shard]:
    """Tokenize the file at `path` as d2l would, shard by shard (cut at line ends), in file order.

    Shards are tokenized on `threads` threads (numpy and pyarrow release the GIL), with at most one
    more shard read ahead, so memory stays a few shards whatever the file's size.
    """
    with ThreadPoolExecutor(threads) as pool:
        pending: deque[Future[Shard]] = deque()
        for data in _line_chunks(path, shard_bytes):
            pending.append(pool.submit(tokenize, data))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _line_chunks(path: Path, shard_bytes: int) -> Iterator[bytes]:
    """About `shard_bytes` of the file at a time, cut after a line end, checked as UTF-8."""
    offset, carry = 0, b""
    with open(path, "rb") as f:
        while block := f.read(shard_bytes):
            data = carry + block
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            if cut:
                yield _checked(data[:cut], path, offset)
                offset += cut
    if carry:
        yield _checked(carry + b"\n", path, offset)


def tokenize(data: bytes) -> Shard:
    """d2l's paragraphs, sentences and lowercased words of newline-terminated UTF-8 `data`."""
    buf = np.frombuffer(data, dtype=np.uint8)
    is_ws = _whitespace(buf)
    line_ends = np.flatnonzero(buf == _NEWLINE)
    bounded = np.concatenate(([True], is_ws, [True]))
    edges = np.flatnonzero(bounded[1:] != bounded[:-1])  # word starts and ends, alternating
    starts, ends = edges[0::2], edges[1::2]
    words_per_line = np.diff(np.searchsorted(starts, line_ends), prepend=0)
    is_paragraph = _has_sentence_break(buf, line_ends)
    kept = np.repeat(is_paragraph, words_per_line)
    line = np.repeat(np.arange(len(line_ends)), words_per_line)[kept]
    separator = _separators(buf, starts[kept], ends[kept], line)
    paragraph = (np.cumsum(is_paragraph) - 1)[line]
    sentence = paragraph + np.cumsum(separator) - separator
    n_paragraphs = int(is_paragraph.sum())
    n_sentences = n_paragraphs + int(separator.sum())
    words, ids, per_word = _encode_words(np.compress(~is_ws, buf), ends - starts)
    kept_words = np.flatnonzero(kept)[~separator]
    headings = np.cumsum(_is_article_heading(buf, line_ends))
    return Shard(
        words=words,
        word_ids=ids[_ragged(np.cumsum(per_word)[kept_words] - per_word[kept_words], per_word[kept_words])],
        sentence_lengths=_tokens_per(sentence[~separator], per_word[kept_words], n_sentences),
        paragraph_lengths=1 + np.bincount(paragraph[separator], minlength=n_paragraphs),
        paragraph_headings=headings[is_paragraph],
        headings=int(headings[-1]) if len(headings) else 0,
        lines=len(line_ends),
        nbytes=len(data),
    )


def _whitespace(buf: np.ndarray) -> np.ndarray:
    """Per byte: is it part of a character that Python's str.split() splits on?"""
    is_ws = (buf == _SPACE) | ((buf >= 9) & (buf <= 13)) | ((buf >= 28) & (buf <= 31))  # 3x a table lookup
    high = np.flatnonzero(buf >= _FIRST_LEAD)  # sparse in mostly-ASCII text
    leads = high[_IS_LEAD[buf[high]]]
    for char in _MULTI_BYTE_WS_CHARS:
        hits = leads[leads <= len(buf) - len(char)]
        for k, byte in enumerate(char):
            hits = hits[buf[hits + k] == byte]
        for k in range(len(char)):
            is_ws[hits + k] = True
    return is_ws


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


def _encode_words(packed: np.ndarray, lengths: np.ndarray) -> tuple[pa.StringArray, np.ndarray, np.ndarray]:
    """Dictionary-encode the words laid end to end in `packed` and apply `bertpipe.vocab`'s rule to the
    distinct ones (lowercase; reserved tokens split off).

    Returns the distinct tokens, every token's id in them, and how many tokens each word became
    (1, except for words such as `a<unk>`).
    """
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    strings = pa.LargeStringArray.from_buffers(len(lengths), pa.py_buffer(offsets), pa.py_buffer(packed))
    cased = pc.dictionary_encode(strings)
    word = cased.indices.to_numpy()
    tokens, sizes = _apply_rule(cased.dictionary)
    encoded = pc.dictionary_encode(tokens)
    flat = encoded.indices.to_numpy()
    per_word = sizes[word]
    return encoded.dictionary.cast(pa.string()), flat[_ragged((np.cumsum(sizes) - sizes)[word], per_word)], per_word


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
    tokens[_ragged(starts[others], sizes[others])] = list(itertools.chain.from_iterable(pieces))
    return pa.array(tokens, pa.large_string()), sizes


def _tokens_per(sentence: np.ndarray, tokens: np.ndarray, n_sentences: int) -> np.ndarray:
    """How many tokens each sentence holds, given each word's sentence and token count."""
    if (tokens == 1).all():
        return np.bincount(sentence, minlength=n_sentences)
    return np.bincount(sentence, weights=tokens, minlength=n_sentences).astype(np.int64)


def _ragged(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
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
