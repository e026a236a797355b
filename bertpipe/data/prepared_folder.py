"""The prepare stage's folder (`data/prepared`), written here and read by the examples and export stages.

    meta.json        vocab_size, vocab_sha256 (`bertpipe.vocab.vocab_digest`), tokenizer (word, wordpiece or
                     pretrained), token_dtype
    tokenizer.json   Hugging Face's tokenizers format, normalizer included; the export hands it on
    vocab.parquet    id, token, count (in the train split), in id order
    train/, valid/   one split each: tokens.npy (token ids end to end), sentence_offsets.npy (into
                     tokens), paragraph_offsets.npy (into sentences), document_offsets.npy (into
                     paragraphs), each a 1-D `.npy` written shard by shard and memory-mapped by readers

`prepare.tokenizer: pretrained` adds what the export needs to hand the model back in the starting checkpoint's
own numbering (`bertpipe.init`):

    pretrained_ids.npy   per token id of this folder, the checkpoint's id of the same token: tokenizer.json is the
                         checkpoint's tokenizer re-indexed with bertpipe's reserved tokens first
                         (`bertpipe.data.tokenizer.reserved_first`), and the model's rows follow these ids
    pretrained/          the checkpoint's tokenizer files, byte for byte, which the export writes unchanged
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from tokenizers import Tokenizer

from bertpipe.atomic import read_json, write_json
from bertpipe.data.arrays import NpyAppender, load, smallest_uint
from bertpipe.data.tokenizer import tokens_in_order
from bertpipe.errors import DataError
from bertpipe.vocab import vocab_digest

if TYPE_CHECKING:
    from bertpipe.data.corpus import Shard

META, TOKENIZER, VOCAB = "meta.json", "tokenizer.json", "vocab.parquet"
TOKENS = "tokens.npy"
PRETRAINED_IDS, PRETRAINED_TOKENIZER = "pretrained_ids.npy", "pretrained"


@dataclass
class SplitStats:
    """What the reader found: the counts that show whether the assumptions about the text held."""

    lines: int = 0
    paragraphs: int = 0  # the wikitext rule keeps lines of at least two sentences (d2l); the others every line
    sentences: int = 0
    tokens: int = 0
    unk_tokens: int = 0
    documents: int = 0  # WikiText articles (` = Title = ` headings) or the user's documents; at least 1
    long_line_cuts: int = 0  # cuts in lines longer than `bertpipe.data.lines.MAX_LINE_BYTES`, each piece a line
    byte_order_marks: int = 0  # dropped from the text, wherever they were

    @property
    def unk_fraction(self) -> float:
        """How much of the text the vocabulary does not cover."""
        return self.unk_tokens / max(self.tokens, 1)

    def report(self) -> dict[str, float]:
        return asdict(self) | {"unk_fraction": self.unk_fraction,
                               "sentences_per_paragraph": self.sentences / max(self.paragraphs, 1)}


class SplitWriter:
    """The arrays of one split, appended shard by shard: tokens and the sentence, paragraph and
    document offsets; a document starts at the first paragraph after a document start (a WikiText
    article title, a blank line of the user's text)."""

    def __init__(self, folder: Path, token_dtype: np.dtype | None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.stats = folder, SplitStats()
        self.tokens = NpyAppender(folder / TOKENS, token_dtype) if token_dtype else None
        self.sentence_offsets = NpyAppender(folder / "sentence_offsets.npy", np.int64)
        self.paragraph_offsets = NpyAppender(folder / "paragraph_offsets.npy", np.int64)
        self.document_offsets = NpyAppender(folder / "document_offsets.npy", np.int64)
        self.sentence_offsets.append(np.zeros(1))
        self.paragraph_offsets.append(np.zeros(1))
        self._starts = 0  # document starts read so far
        self._last_paragraph_starts = -1  # document starts before the last paragraph; -1 starts document 0

    def add_structure(self, shard: Shard) -> None:
        s = self.stats
        self.sentence_offsets.append(s.tokens + np.cumsum(shard.sentence_lengths))
        self.paragraph_offsets.append(s.sentences + np.cumsum(shard.paragraph_lengths))
        starts = self._starts + shard.paragraph_documents
        previous = np.concatenate(([self._last_paragraph_starts], starts[:-1]))
        self.document_offsets.append(s.paragraphs + np.flatnonzero(starts != previous))
        if len(starts):
            self._last_paragraph_starts = int(starts[-1])
        self._starts += shard.documents
        s.lines += shard.lines
        s.long_line_cuts += shard.long_line_cuts
        s.byte_order_marks += shard.byte_order_marks
        s.paragraphs += len(shard.paragraph_lengths)
        s.sentences += len(shard.sentence_lengths)
        s.tokens += len(shard.word_ids)

    def close(self, empty: Exception) -> SplitStats:
        """Finish the files; `empty` is raised when the split holds no paragraph."""
        if self.stats.paragraphs == 0:
            raise empty
        self.document_offsets.append(np.array([self.stats.paragraphs]))
        self.stats.documents = self.document_offsets.length - 1
        for array in (self.tokens, self.sentence_offsets, self.paragraph_offsets, self.document_offsets):
            if array is not None:
                array.close()
        return self.stats


@dataclass(frozen=True)
class Corpus:
    """A prepared split: word ids, sentence offsets into them, paragraph offsets into sentences and
    document (article) offsets into paragraphs (absent: the split is one document)."""

    tokens: np.ndarray
    sentence_offsets: np.ndarray
    paragraph_offsets: np.ndarray
    document_offsets: np.ndarray | None = None

    @classmethod
    def load(cls, folder: Path) -> Corpus:
        """The split's arrays, memory-mapped; a missing or truncated one is a DataError naming it."""
        names = ("tokens", "sentence_offsets", "paragraph_offsets", "document_offsets")
        return cls(*(load(folder / f"{name}.npy") for name in names))

    def documents(self) -> np.ndarray:
        if self.document_offsets is None:
            return np.array([0, len(self.paragraph_offsets) - 1])
        return np.asarray(self.document_offsets)


def write_vocabulary(folder: Path, tokenizer: Tokenizer, id_counts: np.ndarray, kind: str) -> dict:
    """tokenizer.json, vocab.parquet and meta.json; returns the meta. `id_counts[i]`: how often token i
    occurs in the train split; `kind`: `prepare.tokenizer`."""
    vocab = tokens_in_order(tokenizer)
    tokenizer.save(str(folder / TOKENIZER))
    pd.DataFrame({"id": np.arange(len(vocab)), "token": vocab, "count": id_counts}).to_parquet(
        folder / VOCAB, index=False)
    meta = {"vocab_size": len(vocab), "vocab_sha256": vocab_digest(vocab), "tokenizer": kind,
            "token_dtype": smallest_uint(len(vocab) - 1).name}
    write_json(folder / META, meta)
    return meta


def read_meta(folder: Path) -> dict:
    """meta.json; missing or unreadable means the prepare stage did not finish."""
    return read_json(folder / META, "prepare")


def read_vocab(folder: Path) -> tuple[pd.DataFrame, dict]:
    """vocab.parquet (id, token, count) and meta.json, checked against each other (its vocab_sha256)."""
    meta = read_meta(folder)
    try:
        table = pd.read_parquet(folder / VOCAB, columns=["id", "token", "count"])
    except (OSError, ValueError) as err:
        raise DataError(f"{folder / VOCAB} cannot be read ({err.__class__.__name__}); rerun the prepare "
                        "stage") from None
    in_order = np.array_equal(table["id"], np.arange(len(table)))
    if not in_order or vocab_digest(table["token"]) != meta.get("vocab_sha256"):
        raise DataError(f"{folder / VOCAB} does not match its meta.json; rerun the prepare stage")
    return table, meta


def read_tokenizer(folder: Path, vocab_table: pd.DataFrame) -> Tokenizer:
    """tokenizer.json, checked against vocab.parquet (`read_vocab`)."""
    try:
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER))
    except Exception as err:  # tokenizers reports a missing or bad file as a bare Exception
        raise DataError(f"{folder / TOKENIZER} cannot be read ({err.__class__.__name__}); rerun the "
                        "prepare stage") from None
    if tokens_in_order(tokenizer) != vocab_table["token"].tolist():
        raise DataError(f"{folder / TOKENIZER} does not match its vocab.parquet; rerun the prepare stage")
    return tokenizer


def write_pretrained(folder: Path, checkpoint_ids: Sequence[int], tokenizer_files: Sequence[Path]) -> None:
    """pretrained_ids.npy (`checkpoint_ids[i]`: the checkpoint's id of token i) and the checkpoint's tokenizer
    files copied into pretrained/."""
    np.save(folder / PRETRAINED_IDS, np.asarray(checkpoint_ids, dtype=np.int64))
    (folder / PRETRAINED_TOKENIZER).mkdir()
    for path in tokenizer_files:
        shutil.copyfile(path, folder / PRETRAINED_TOKENIZER / path.name)


def read_pretrained(folder: Path, vocab_size: int) -> tuple[np.ndarray, Path]:
    """pretrained_ids.npy, checked to be a permutation of the vocabulary, and the folder of the checkpoint's
    tokenizer files."""
    ids = np.asarray(load(folder / PRETRAINED_IDS))
    if ids.shape != (vocab_size,) or not np.array_equal(np.sort(ids), np.arange(vocab_size)):
        raise DataError(f"{folder / PRETRAINED_IDS} is not a permutation of the {vocab_size} token ids; rerun the "
                        "prepare stage")
    return ids, folder / PRETRAINED_TOKENIZER
