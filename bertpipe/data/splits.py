"""A prepared split on disk: its token ids and the sentence, paragraph and document offsets into them,
written shard by shard, and the counts that show whether the assumptions about the text held."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bertpipe.data.arrays import NpyAppender
from bertpipe.data.corpus import Shard


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
        self.tokens = NpyAppender(folder / "tokens.npy", token_dtype) if token_dtype else None
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
