"""WordPiece for a corpus: a vocabulary trained with Hugging Face's `WordPieceTrainer`, and the pieces of
every distinct word of the corpus, each worked out once.

A word (as cut at whitespace) goes through BERT's normalizer and pre-tokenizer into pre-tokens (its
parts between punctuation and CJK characters, lowercased and accent-stripped unless `prepare.lowercase`
and `prepare.strip_accents` say otherwise: the saved tokenizer's own normalizer), and each pre-token through
the WordPiece model into pieces: what `tokenizer.encode` does, a distinct word at a time. One
difference on purpose: the corpus is text, so a literal `[MASK]` in it is the characters `[ mask ]`,
not the mask token; no reserved token but `[UNK]` ever comes out of the corpus.

The trainer (BPE merges on `##`-marked pieces, Hugging Face's WordPiece) is fed each distinct
pre-token as often as it occurs, `(p + " ") * count`, behind a plain whitespace split: the counts of
training on the text, without normalizing every occurrence again (most of the trainer's time).

Determinism: the trainer numbers a `##c` continuation piece when it first meets it while walking a
hash map, so equal pair counts break ties differently from run to run (huggingface/tokenizers#1794).
Here every character of the alphabet and its `##c` form are numbered up front (reserved during
training, ordinary tokens afterwards), so the same corpus always gives the same vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from bertpipe.data.tokenizer import wordpiece_tokenizer
from bertpipe.data.words import ragged
from bertpipe.vocab import CONTINUATION, UNK_ID, WORDPIECE_SPECIAL_TOKENS

FEED_CHARS = 1 << 22  # text per list handed to the trainer (it counts the lists' strings in parallel)
MAX_REPEATS = 1 << 16  # the commonest words of a large corpus occur ~10^8 times: no single string that long


class WordPieces:
    """The distinct words of a training split with their counts, their BERT pre-tokens and, once
    `train` has run (or from the start, given a finished `tokenizer`), their WordPiece ids.

    Args:
        words: the split's distinct words as cut at whitespace; `counts[i]` is how often `words[i]` occurs.
        unknown_marker: a word the corpus uses for "unknown" (WikiText's `<unk>`): it becomes `[UNK]`
            and is left out of training.
        lowercase, strip_accents: BERT's normalizer settings (`prepare.lowercase`, `prepare.strip_accents`),
            used for the pre-tokens and kept in the trained tokenizer, so that both read text alike.
        tokenizer: a finished WordPiece tokenizer (a pretrained checkpoint's, `prepare.tokenizer: pretrained`):
            its own normalizer, pre-tokenizer and pieces cut the words; nothing is trained.
    """

    def __init__(self, words: pa.Array, counts: np.ndarray, unknown_marker: str | None = None,
                 lowercase: bool = True, strip_accents: bool | None = None, tokenizer: Tokenizer | None = None) -> None:
        self.words, self._marker = words, unknown_marker
        self._normalization = {"lowercase": lowercase, "strip_accents": strip_accents}
        self._bert = tokenizer or wordpiece_tokenizer({t: i for i, t in enumerate(WORDPIECE_SPECIAL_TOKENS)},
                                                      **self._normalization)
        self._pretokens = self._split(words)
        owners = np.repeat(np.arange(len(words)), self._pretokens.sizes)
        self.pretoken_counts = np.bincount(self._pretokens.flat, weights=np.asarray(counts)[owners],
                                           minlength=len(self._pretokens.values)).astype(np.int64)
        marker = self._pretokens.values.index(WORDPIECE_SPECIAL_TOKENS[UNK_ID]).as_py()
        if marker >= 0:  # the unknown marker's stand-in is [UNK] itself, which the trainer must not count
            self.pretoken_counts[marker] = 0
        self.tokenizer: Tokenizer | None = tokenizer
        self._pieces = _Ragged(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        if tokenizer is not None:
            self._pieces = self._wordpieces(self._pretokens)

    def _split(self, words: pa.Array) -> _Ragged:
        """Each word's BERT pre-tokens, as indices into its `values` (the distinct pre-tokens)."""
        normalizer, pre_tokenizer = self._bert.normalizer, self._bert.pre_tokenizer  # a checkpoint's may lack either
        normalize = normalizer.normalize_str if normalizer else str
        split = pre_tokenizer.pre_tokenize_str if pre_tokenizer else lambda text: [(text, None)] if text else []
        unknown = WORDPIECE_SPECIAL_TOKENS[UNK_ID]
        parts = [[unknown] if word == self._marker else [piece for piece, _ in split(normalize(word))]
                 for word in words.to_pylist()]
        encoded = pc.dictionary_encode(pa.array([p for word in parts for p in word], pa.string()))
        sizes = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        flat = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        return _Ragged(flat, sizes, encoded.dictionary)

    def alphabet(self) -> list[str]:
        """The characters WordPiece starts from: those of the pre-tokens that occur, in code point order."""
        text = "".join(self._pretokens.values.filter(pa.array(self.pretoken_counts > 0)).to_pylist())
        return [chr(c) for c in np.unique(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)).tolist()]

    def train(self, vocab_size: int) -> Tokenizer:
        """BERT's tokenizer with a WordPiece vocabulary of at most `vocab_size` tokens learnt from the counted
        pre-tokens over `alphabet()` (module docstring); the same corpus gives the same vocabulary."""
        characters = self.alphabet()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=[*WORDPIECE_SPECIAL_TOKENS, *(CONTINUATION + c for c in characters)],
            initial_alphabet=characters, limit_alphabet=len(characters), continuing_subword_prefix=CONTINUATION,
            show_progress=False)
        counted = Tokenizer(models.WordPiece(unk_token=WORDPIECE_SPECIAL_TOKENS[UNK_ID]))
        counted.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        counted.train_from_iterator(self._repeated(), trainer=trainer, length=len(self.pretoken_counts))
        self.tokenizer = wordpiece_tokenizer(counted.get_vocab(with_added_tokens=True), **self._normalization)
        self._pieces = self._wordpieces(self._pretokens)
        return self.tokenizer

    def _repeated(self) -> Iterator[list[str]]:
        """Each pre-token as often as it occurs, about FEED_CHARS characters per list handed over."""
        texts, size = [], 0
        for token, count in zip(self._pretokens.values.to_pylist(), self.pretoken_counts.tolist(), strict=True):
            for done in range(0, count, MAX_REPEATS):
                texts.append((token + " ") * min(MAX_REPEATS, count - done))
                size += len(texts[-1])
                if size >= FEED_CHARS:
                    yield texts
                    texts, size = [], 0
        yield texts

    def _wordpieces(self, pretokens: _Ragged) -> _Ragged:
        """Words given by their pre-tokens as WordPiece ids (the model's greedy longest-match-first)."""
        model = self.tokenizer.model
        ids = [[token.id for token in model.tokenize(p)] for p in pretokens.values.to_pylist()]
        per_value = _Ragged(np.fromiter((i for row in ids for i in row), dtype=np.int64),
                            np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)))
        flat = per_value.gather(pretokens.flat)
        word_of = np.repeat(np.arange(len(pretokens.sizes)), pretokens.sizes)
        sizes = np.bincount(word_of, weights=per_value.sizes[pretokens.flat], minlength=len(pretokens.sizes))
        return _Ragged(flat, sizes.astype(np.int64))

    def encode(self, words: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """WordPiece ids of (distinct) words laid end to end, and how many each word has (0 for a word that
        is all control characters, which BERT's normalizer deletes); words unseen in training are cut here."""
        index = pc.index_in(words, value_set=self.words)
        if not index.null_count:
            known = index.to_numpy().astype(np.int64)
            return self._pieces.gather(known), self._pieces.sizes[known]
        missing = np.flatnonzero(index.is_null().to_numpy(zero_copy_only=False))
        new = self._wordpieces(self._split(words.take(pa.array(missing))))
        pool = _Ragged(np.concatenate([self._pieces.flat, new.flat]), np.concatenate([self._pieces.sizes, new.sizes]))
        where = index.fill_null(0).to_numpy().astype(np.int64)
        where[missing] = len(self._pieces.sizes) + np.arange(len(missing))
        return pool.gather(where), pool.sizes[where]


class _Ragged:
    """Rows of ids laid end to end: row i is flat[starts[i]:starts[i] + sizes[i]]; `values` names what
    the ids index, where they index something other than the vocabulary."""

    def __init__(self, flat: np.ndarray, sizes: np.ndarray, values: pa.Array | None = None) -> None:
        self.flat, self.sizes, self.values = flat, sizes, values
        self.starts = np.cumsum(sizes) - sizes

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The given rows' ids, end to end."""
        return self.flat[ragged(self.starts[rows], self.sizes[rows])]


def minimum_vocab_size(characters: list[str]) -> int:
    """The reserved tokens, the alphabet and each character's `##` continuation."""
    return len(WORDPIECE_SPECIAL_TOKENS) + 2 * len(characters)
