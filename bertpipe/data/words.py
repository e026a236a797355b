"""The words of a byte buffer, vectorised: whitespace tests, word spans, dictionary encoding, the token rule.

A word is a run of bytes outside a whitespace set (Python's, or BERT's for WordPiece). Words are
dictionary-encoded by pyarrow, so only a shard's *distinct* words reach Python, where
`bertpipe.vocab`'s rule lowercases them (unless `prepare.lowercase: false`) and splits reserved tokens
off (`a<unk>` is two tokens).
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bertpipe.vocab import BERT_WHITESPACE, PY_WHITESPACE, split_special
from bertpipe.vocab import lowercase as lower


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


def word_spans(is_ws: np.ndarray, line_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each word (a run of non-whitespace bytes) starts and ends, and how many each line holds."""
    bounded = np.concatenate(([True], is_ws, [True]))
    edges = np.flatnonzero(bounded[1:] != bounded[:-1])  # word starts and ends, alternating
    starts, ends = edges[0::2], edges[1::2]
    return starts, ends, np.diff(np.searchsorted(starts, line_ends), prepend=0)


def whitespace_mask(buf: np.ndarray, whitespace: Whitespace = PYTHON) -> np.ndarray:
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


def encode_words(packed: np.ndarray, lengths: np.ndarray,
                 tokens: str) -> tuple[pa.StringArray, np.ndarray, np.ndarray]:
    """Dictionary-encode the words laid end to end in `packed` and apply the token rule to the distinct
    ones (`word`: `bertpipe.vocab`'s, lowercase and reserved tokens split off; `cased`: the same rule
    without lowercasing; `raw`: none).

    Returns the distinct tokens, every token's id in them, and how many tokens each word became
    (1, except for words such as `a<unk>`).
    """
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    strings = pa.LargeStringArray.from_buffers(len(lengths), pa.py_buffer(offsets), pa.py_buffer(packed))
    cased = pc.dictionary_encode(strings)
    word = cased.indices.to_numpy()
    if tokens == "raw":
        return cased.dictionary.cast(pa.string()), word, np.ones(len(word), dtype=np.int64)
    tokens, sizes = _apply_rule(cased.dictionary, lowercase=tokens == "word")
    encoded = pc.dictionary_encode(tokens)
    flat = encoded.indices.to_numpy()
    per_word = sizes[word]
    return encoded.dictionary.cast(pa.string()), flat[ragged((np.cumsum(sizes) - sizes)[word], per_word)], per_word


def _apply_rule(words: pa.Array, lowercase: bool) -> tuple[pa.Array, np.ndarray]:
    """`bertpipe.vocab`'s rule on each distinct word: its tokens laid end to end, and how many each made.

    ASCII words without '<' (nearly all) are lowercased by pyarrow, without the GIL, or kept as they are
    (`lowercase=False`); the others go through Python's rule one by one.
    """
    simple = pc.and_(pc.string_is_ascii(words), pc.invert(pc.match_substring(words, "<"))).to_numpy(
        zero_copy_only=False)
    if simple.all():
        return pc.ascii_lower(words) if lowercase else words, np.ones(len(words), dtype=np.int64)
    others = np.flatnonzero(~simple)
    pieces = [split_special(lower(w) if lowercase else w) for w in words.take(pa.array(others)).to_pylist()]
    sizes = np.ones(len(words), dtype=np.int64)
    sizes[others] = [len(p) for p in pieces]
    starts = np.cumsum(sizes) - sizes
    tokens = np.empty(int(sizes.sum()), dtype=object)
    kept = words.filter(pa.array(simple))
    tokens[starts[simple]] = (pc.ascii_lower(kept) if lowercase else kept).to_numpy(zero_copy_only=False)
    tokens[ragged(starts[others], sizes[others])] = list(itertools.chain.from_iterable(pieces))
    return pa.array(tokens, pa.large_string()), sizes


def tokens_per(sentence: np.ndarray, tokens: np.ndarray, n_sentences: int) -> np.ndarray:
    """How many tokens each sentence holds, given each word's sentence and token count."""
    if (tokens == 1).all():
        return np.bincount(sentence, minlength=n_sentences)
    return np.bincount(sentence, weights=tokens, minlength=n_sentences).astype(np.int64)


def ragged(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The ranges [starts[i], starts[i] + counts[i]) laid end to end (an arange when every count is 1)."""
    if len(counts) and (counts == 1).all():
        return starts
    return np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
