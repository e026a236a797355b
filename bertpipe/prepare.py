"""The `prepare` stage: d2l's reading of WikiText, a vocabulary, and the splits as word-id arrays.

The vocabulary holds the same tokens as `d2l.Vocab(train_sentences, min_freq=5,
reserved_tokens=['<pad>', '<mask>', '<cls>', '<sep>'])`, ordered `<unk> <pad> <mask> <cls> <sep>`
and then by descending count, ties broken by the token's text, so the order never depends on a
shuffle. The training split is read once: each shard's word ids are parked on disk against the
shard's own small dictionary and remapped to vocabulary ids once the counts are complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from bertpipe.arrays import NpyAppender, smallest_uint
from bertpipe.atomic import atomic_dir
from bertpipe.config import PrepareConfig
from bertpipe.corpus import Shard, read_shards
from bertpipe.errors import DataError
from bertpipe.vocab import SPECIAL_TOKENS

SPLIT_FILES = {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens"}
log = logging.getLogger(__name__)


@dataclass
class SplitStats:
    """What the reader found: the counts that show whether d2l's assumptions about the text held."""

    lines: int = 0
    paragraphs: int = 0  # lines of at least two sentences; the others are dropped, as d2l drops them
    sentences: int = 0
    tokens: int = 0
    unk_tokens: int = 0
    documents: int = 0  # WikiText articles (` = Title = ` headings); 1 when the text has none

    @property
    def unk_fraction(self) -> float:
        """How much of the text the vocabulary does not cover."""
        return self.unk_tokens / max(self.tokens, 1)


def build_vocab(counts: Mapping[str, int], min_freq: int) -> list[str]:
    """Reserved tokens first, then every other token seen `min_freq` times, by count then text."""
    frequent = [t for t, c in counts.items() if c >= min_freq and t not in SPECIAL_TOKENS]
    return list(SPECIAL_TOKENS) + sorted(frequent, key=lambda t: (-counts[t], t))


def vocab_digest(tokens: Iterable[str]) -> str:
    """sha256 of the vocabulary in id order: later stages check they were built against it."""
    return hashlib.sha256("\n".join(tokens).encode()).hexdigest()


def prepare(raw_dir: Path, out_dir: Path, cfg: PrepareConfig) -> dict:
    """Tokenize train and valid into `out_dir` (whole or not at all); return the corpus statistics
    (metrics/prepare.json)."""
    with atomic_dir(out_dir) as folder:
        return _prepare_into(raw_dir, folder, cfg)


def _prepare_into(raw_dir: Path, out_dir: Path, cfg: PrepareConfig) -> dict:
    files = {split: Path(raw_dir) / name for split, name in SPLIT_FILES.items()}
    for path in files.values():
        if not path.is_file():
            raise DataError(f"{path} is missing; the download stage should have written it")
    counts, shards, train = _count_train(files["train"], out_dir / "train")
    vocab = build_vocab(counts, cfg.min_freq)
    dtype = smallest_uint(len(vocab) - 1)
    value_set = pa.array(vocab, pa.string())
    id_counts = _remap_parked(shards, out_dir / "train", value_set, dtype)
    train.unk_tokens = int(id_counts[0])
    valid = _encode_split(files["valid"], out_dir / "valid", value_set, dtype)
    pd.DataFrame({"id": np.arange(len(vocab)), "token": vocab, "count": id_counts}).to_parquet(
        out_dir / "vocab.parquet", index=False)
    meta = {"vocab_size": len(vocab), "vocab_sha256": vocab_digest(vocab), "token_dtype": dtype.name}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    for split, stats in (("train", train), ("valid", valid)):
        _check_coverage(split, stats, cfg)
    return {"vocab_size": len(vocab), "min_freq": cfg.min_freq, "distinct_train_tokens": len(counts),
            **{split: asdict(stats) | {"unk_fraction": stats.unk_fraction}
               for split, stats in (("train", train), ("valid", valid))}}


MAX_UNK_FRACTION = 0.5  # beyond this, most MLM labels and inputs are <unk>: the examples teach little


def _check_coverage(split: str, stats: SplitStats, cfg: PrepareConfig) -> None:
    """Warn in one line when the vocabulary leaves most of a split unknown."""
    if stats.unk_fraction > MAX_UNK_FRACTION:
        log.warning("%s split: %.0f%% of its tokens are <unk> (prepare.min_freq = %d); the vocabulary does not "
                    "cover the text: lower prepare.min_freq or train on more text", split,
                    100 * stats.unk_fraction, cfg.min_freq)


class _SplitWriter:
    """The arrays of one split, appended shard by shard: tokens and the sentence, paragraph and
    document (article) offsets; a document starts at the first paragraph after an article title."""

    def __init__(self, folder: Path, token_dtype: np.dtype | None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.stats = folder, SplitStats()
        self.tokens = NpyAppender(folder / "tokens.npy", token_dtype) if token_dtype else None
        self.sentence_offsets = NpyAppender(folder / "sentence_offsets.npy", np.int64)
        self.paragraph_offsets = NpyAppender(folder / "paragraph_offsets.npy", np.int64)
        self.document_offsets = NpyAppender(folder / "document_offsets.npy", np.int64)
        self.sentence_offsets.append(np.zeros(1))
        self.paragraph_offsets.append(np.zeros(1))
        self._headings = 0  # article titles read so far
        self._last_paragraph_headings = -1  # titles before the last paragraph; -1 starts document 0

    def add_structure(self, shard: Shard) -> None:
        s = self.stats
        self.sentence_offsets.append(s.tokens + np.cumsum(shard.sentence_lengths))
        self.paragraph_offsets.append(s.sentences + np.cumsum(shard.paragraph_lengths))
        headings = self._headings + shard.paragraph_headings
        previous = np.concatenate(([self._last_paragraph_headings], headings[:-1]))
        self.document_offsets.append(s.paragraphs + np.flatnonzero(headings != previous))
        if len(headings):
            self._last_paragraph_headings = int(headings[-1])
        self._headings += shard.headings
        s.lines += shard.lines
        s.paragraphs += len(shard.paragraph_lengths)
        s.sentences += len(shard.sentence_lengths)
        s.tokens += len(shard.word_ids)

    def close(self, path: Path) -> SplitStats:
        if self.stats.paragraphs == 0:
            raise DataError(f"{path} has no paragraph of two sentences (no line containing ' . ')")
        self.document_offsets.append(np.array([self.stats.paragraphs]))
        self.stats.documents = self.document_offsets.length - 1
        for array in (self.tokens, self.sentence_offsets, self.paragraph_offsets, self.document_offsets):
            if array is not None:
                array.close()
        return self.stats


def _count_train(path: Path, folder: Path) -> tuple[dict[str, int], list[tuple[pa.Array, int]], SplitStats]:
    """Pass over train: word counts, the structure arrays, and each shard's ids parked on disk."""
    shard_counts: list[np.ndarray] = []
    shards: list[tuple[pa.Array, int]] = []
    writer = _SplitWriter(folder, None)
    with open(folder / "parked_ids.raw", "wb") as parked:
        for shard in _progress(read_shards(path), path):
            shard_counts.append(np.bincount(shard.word_ids, minlength=len(shard.words)))
            parked.write(shard.word_ids.astype(np.int32).tobytes())
            shards.append((shard.words, len(shard.word_ids)))
            writer.add_structure(shard)
    return _sum_counts([words for words, _ in shards], shard_counts), shards, writer.close(path)


def _sum_counts(words: list[pa.Array], counts: list[np.ndarray]) -> dict[str, int]:
    """Every word's count over all shards (pyarrow's group-by, not a Python loop per distinct word)."""
    if not words:
        return {}
    table = pa.table({"word": pa.concat_arrays(words), "count": np.concatenate(counts)})
    totals = table.group_by("word").aggregate([("count", "sum")])
    totals = totals.filter(pc.greater(totals["count_sum"], 0))  # a shard's dictionary holds dropped lines' words
    return dict(zip(totals["word"].to_pylist(), totals["count_sum"].to_pylist(), strict=True))


def _remap_parked(shards: list[tuple[pa.Array, int]], folder: Path, value_set: pa.Array,
                  dtype: np.dtype) -> np.ndarray:
    """Rewrite the parked shard-local ids as vocabulary ids (unknown words become `<unk>` = 0).

    Returns how often each vocabulary id occurs in the split.
    """
    parked_path = folder / "parked_ids.raw"
    parked = np.memmap(parked_path, dtype=np.int32, mode="r") if parked_path.stat().st_size else np.zeros(0, np.int32)
    tokens = NpyAppender(folder / "tokens.npy", dtype)
    id_counts = np.zeros(len(value_set), dtype=np.int64)
    start = 0
    for words, n in shards:
        ids = _vocab_ids(words, value_set)[parked[start:start + n]]
        tokens.append(ids)
        id_counts += np.bincount(ids, minlength=len(value_set))
        start += n
    tokens.close()
    del parked
    parked_path.unlink()
    return id_counts


def _encode_split(path: Path, folder: Path, value_set: pa.Array, dtype: np.dtype) -> SplitStats:
    writer = _SplitWriter(folder, dtype)
    for shard in _progress(read_shards(path), path):
        ids = _vocab_ids(shard.words, value_set)[shard.word_ids]
        writer.tokens.append(ids)
        writer.stats.unk_tokens += int(np.count_nonzero(ids == 0))
        writer.add_structure(shard)
    return writer.close(path)


def _progress(shards: Iterator[Shard], path: Path) -> Iterator[Shard]:
    """Pass the shards through, showing how much of the file has been read."""
    with tqdm(total=path.stat().st_size, desc=f"reading {path.name}", unit="B", unit_scale=True) as bar:
        for shard in shards:
            yield shard
            bar.update(shard.nbytes)


def _vocab_ids(words: pa.Array, value_set: pa.Array) -> np.ndarray:
    """Vocabulary id of each distinct word of a shard; `<unk>` (0) for words outside it."""
    return pc.index_in(words, value_set=value_set).fill_null(0).to_numpy().astype(np.int64)
