"""The `prepare` stage: the corpus read into sentences, a tokenizer, and the splits as token-id arrays.

`prepare.tokenizer: word` is d2l's vocabulary: the same tokens as `d2l.Vocab(train_sentences, min_freq=5,
reserved_tokens=['<pad>', '<mask>', '<cls>', '<sep>'])`, ordered `<unk> <pad> <mask> <cls> <sep>` and
then by descending count, ties broken by the token's text, so the order never depends on a shuffle.
The training split is read once: each shard's word ids are parked on disk against the shard's own
small dictionary and remapped to vocabulary ids once the counts are complete.

`prepare.tokenizer: wordpiece` is BERT's: a WordPiece vocabulary of `prepare.vocab_size` tokens
trained on the training split (`bertpipe.data.wordpiece`), then both splits read again and each shard's
distinct words cut into pieces.

`prepare.tokenizer: pretrained` (continued pretraining, `model.init`) is the starting checkpoint's own
WordPiece tokenizer (models/init, `bertpipe.init.folder`), as it is: its normalizer decides case and accents,
its pieces cut every word. Only its numbering changes: bertpipe's reserved tokens take ids 0..4
(`bertpipe.data.tokenizer.reserved_first`), and the checkpoint's id of every token is kept beside the arrays
(`bertpipe.data.prepared_folder.write_pretrained`), with its original tokenizer files for the export.

Otherwise `prepare.lowercase` (and for WordPiece `prepare.strip_accents`) decides what is kept of each
word, in the corpus and in the tokenizer alike. The tokenizer is saved as `tokenizer.json` (Hugging
Face's format, the normalizer's settings included), which the export stage hands on, and
`vocab.parquet` lists the tokens with their counts in the training split.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tokenizers import Tokenizer

from bertpipe.atomic import atomic_dir
from bertpipe.config import PrepareConfig
from bertpipe.data.arrays import NpyAppender, smallest_uint
from bertpipe.data.corpus import Reading, Shard, read_shards
from bertpipe.data.prepared_folder import TOKENS, SplitStats, SplitWriter, write_pretrained, write_vocabulary
from bertpipe.data.raw_folder import read_ingest_report, split_files
from bertpipe.data.tokenizer import reserved_first, word_tokenizer
from bertpipe.data.wordpiece import WordPieces, minimum_vocab_size
from bertpipe.data.words import ragged
from bertpipe.errors import ConfigError, DataError
from bertpipe.init.folder import TOKENIZER_FILES, read_start
from bertpipe.progress import Progress
from bertpipe.vocab import SPECIAL_TOKENS, UNK, special_tokens

Encoder = Callable[[pa.Array], tuple[np.ndarray, np.ndarray]]  # distinct words -> (ids end to end, ids per word)
log = logging.getLogger(__name__)


def build_vocab(counts: Mapping[str, int], min_freq: int) -> list[str]:
    """Reserved tokens first, then every other token seen `min_freq` times, by count then text."""
    frequent = [t for t, c in counts.items() if c >= min_freq and t not in SPECIAL_TOKENS]
    return list(SPECIAL_TOKENS) + sorted(frequent, key=lambda t: (-counts[t], t))


def prepare(raw_dir: Path, out_dir: Path, cfg: PrepareConfig, init_dir: Path | None = None) -> dict:
    """Tokenize train and valid into `out_dir` (whole or not at all); return the corpus statistics
    (metrics/prepare.json). `init_dir`: the init stage's folder (models/init), whose tokenizer
    `prepare.tokenizer: pretrained` reads."""
    with atomic_dir(out_dir) as folder:
        return _prepare_into(raw_dir, folder, cfg, init_dir)


def _prepare_into(raw_dir: Path, out_dir: Path, cfg: PrepareConfig, init_dir: Path | None = None) -> dict:
    layout, files = split_files(Path(raw_dir))
    tokens = "word" if cfg.lowercase else "cased"
    reading = Reading(layout, cfg.sentences, cfg.language, "raw" if cfg.tokenizer != "word" else tokens)
    build = {"word": _word_vocabulary, "wordpiece": _wordpiece,
             "pretrained": partial(_pretrained, init_dir=init_dir)}[cfg.tokenizer]
    tokenizer, id_counts, splits, extra = build(files, out_dir, reading, cfg)
    vocab_size = write_vocabulary(out_dir, tokenizer, id_counts, cfg.tokenizer)["vocab_size"]
    ingested = read_ingest_report(Path(raw_dir))
    for split, stats in splits.items():
        _add_ingested(stats, ingested.get(split))
        _check_coverage(split, stats, cfg)
    settings = {"tokenizer": cfg.tokenizer, "sentences": cfg.sentences, "layout": layout, "vocab_size": vocab_size}
    return settings | extra | {split: stats.report() for split, stats in splits.items()}


def _word_vocabulary(files: dict[str, Path], out_dir: Path, reading: Reading,
                     cfg: PrepareConfig) -> tuple[Tokenizer, np.ndarray, dict[str, SplitStats], dict]:
    counts, shards, train = _count_train(files["train"], out_dir / "train", reading)
    vocab = build_vocab(counts, cfg.min_freq)
    dtype = smallest_uint(len(vocab) - 1)
    value_set = pa.array(vocab, pa.string())
    id_counts = _remap_parked(shards, out_dir / "train", value_set, dtype)
    train.unk_tokens = int(id_counts[0])
    valid, _ = _encode_split(files["valid"], out_dir / "valid", _in_vocab(value_set), len(vocab), reading)
    extra = {"min_freq": cfg.min_freq, "distinct_train_tokens": len(counts)}
    return word_tokenizer(vocab, cfg.lowercase), id_counts, {"train": train, "valid": valid}, extra


def _wordpiece(files: dict[str, Path], out_dir: Path, reading: Reading,
               cfg: PrepareConfig) -> tuple[Tokenizer, np.ndarray, dict[str, SplitStats], dict]:
    words, counts, paragraphs = [], [], 0
    for shard in _progress(read_shards(files["train"], reading), files["train"]):
        words.append(shard.words)
        counts.append(np.bincount(shard.word_ids, minlength=len(shard.words)))
        paragraphs += len(shard.paragraph_lengths)
    if not paragraphs:
        raise _no_paragraph(files["train"], reading)
    totals = _summed(words, counts)
    wordpieces = WordPieces(totals["word"].combine_chunks(), totals["count"].to_numpy(),
                            unknown_marker=UNK if reading.layout == "wikitext" else None,
                            lowercase=cfg.lowercase, strip_accents=cfg.strip_accents)
    characters = wordpieces.alphabet()
    if cfg.vocab_size < minimum_vocab_size(characters):
        raise ConfigError("prepare.vocab_size", cfg.vocab_size,
                          f"at least {minimum_vocab_size(characters)}: the 5 reserved tokens, the {len(characters)} "
                          f"characters of the train split and their {len(characters)} ## continuations")
    log.info("training WordPiece (prepare.vocab_size = %d) on %d distinct words, %d characters", cfg.vocab_size,
             len(totals), len(characters))
    tokenizer = wordpieces.train(cfg.vocab_size)
    size = tokenizer.get_vocab_size()
    train, id_counts = _encode_split(files["train"], out_dir / "train", wordpieces.encode, size, reading)
    valid, _ = _encode_split(files["valid"], out_dir / "valid", wordpieces.encode, size, reading)
    extra = {"requested_vocab_size": cfg.vocab_size, "alphabet_size": len(characters),
             "distinct_train_words": len(totals)}
    return tokenizer, id_counts, {"train": train, "valid": valid}, extra


def _pretrained(files: dict[str, Path], out_dir: Path, reading: Reading, cfg: PrepareConfig,
                init_dir: Path | None) -> tuple[Tokenizer, np.ndarray, dict[str, SplitStats], dict]:
    """The starting checkpoint's tokenizer with bertpipe's reserved ids first, both splits cut by it; its own
    ids and tokenizer files kept for the export."""
    start = read_start(init_dir) if init_dir is not None else None
    if start is None:
        raise ConfigError("prepare.tokenizer", "pretrained", "word or wordpiece: models/init holds no checkpoint "
                                                             "(set model.init and run the init stage first)")
    tokenizer, checkpoint_ids = reserved_first(start.tokenizer(), start.specials())
    wordpieces = WordPieces(pa.array([], pa.string()), np.zeros(0, dtype=np.int64),
                            unknown_marker=UNK if reading.layout == "wikitext" else None, tokenizer=tokenizer)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    log.info("reading the corpus with %s's tokenizer (%d tokens)", start.record["model"], size)
    train, id_counts = _encode_split(files["train"], out_dir / "train", wordpieces.encode, size, reading)
    valid, _ = _encode_split(files["valid"], out_dir / "valid", wordpieces.encode, size, reading)
    write_pretrained(out_dir, checkpoint_ids, [start.folder / name for name in TOKENIZER_FILES
                                               if (start.folder / name).is_file()])
    return tokenizer, id_counts, {"train": train, "valid": valid}, {"init": start.record["model"]}


def _add_ingested(stats: SplitStats, ingested: dict[str, int] | None) -> None:
    """What the download stage already changed in your own text (`bertpipe.data.ingest`'s report; None
    for WikiText's files) counts with what the reader changes: byte-order marks dropped, long lines cut."""
    if ingested:
        stats.byte_order_marks += ingested["byte_order_marks"]
        stats.long_line_cuts += ingested["long_line_cuts"]


MAX_UNK_FRACTION = 0.5  # beyond this, most MLM labels and inputs are unknown: the examples teach little


def _check_coverage(split: str, stats: SplitStats, cfg: PrepareConfig) -> None:
    """Warn in one line when the vocabulary leaves most of a split unknown."""
    if stats.unk_fraction > MAX_UNK_FRACTION:
        key, value, fix = {"word": ("prepare.min_freq", cfg.min_freq, "lower"),
                           "wordpiece": ("prepare.vocab_size", cfg.vocab_size, "raise"),
                           "pretrained": ("model.init", "its checkpoint", "change")}[cfg.tokenizer]
        log.warning("%s split: %.0f%% of its tokens are %s (%s = %s); the vocabulary does not cover the text: "
                    "%s %s or train on more text", split, 100 * stats.unk_fraction, special_tokens(cfg.tokenizer)[0],
                    key, value, fix, key)


def _no_paragraph(path: Path, reading: Reading) -> DataError:
    if reading.sentences == "wikitext":
        return DataError(f"{path} has no paragraph of two sentences (no line containing ' . '): prepare.sentences = "
                         "'wikitext' splits only WikiText's pre-tokenized text; expected such text, or "
                         "prepare.sentences: sentencex (or lines) for other text")
    return DataError(f"{path} has no paragraph (every line is blank)")


def _count_train(path: Path, folder: Path,
                 reading: Reading) -> tuple[dict[str, int], list[tuple[pa.Array, int]], SplitStats]:
    """Pass over train: word counts, the structure arrays, and each shard's ids parked on disk."""
    shard_counts: list[np.ndarray] = []
    shards: list[tuple[pa.Array, int]] = []
    writer = SplitWriter(folder, None)
    with open(folder / "parked_ids.raw", "wb") as parked:
        for shard in _progress(read_shards(path, reading), path):
            shard_counts.append(np.bincount(shard.word_ids, minlength=len(shard.words)))
            parked.write(shard.word_ids.astype(np.int32).tobytes())
            shards.append((shard.words, len(shard.word_ids)))
            writer.add_structure(shard)
    return _sum_counts([words for words, _ in shards], shard_counts), shards, writer.close(_no_paragraph(path, reading))


def _sum_counts(words: list[pa.Array], counts: list[np.ndarray]) -> dict[str, int]:
    """Every word's count over all shards, as a dict."""
    totals = _summed(words, counts)
    return dict(zip(totals["word"].to_pylist(), totals["count"].to_pylist(), strict=True))


def _summed(words: list[pa.Array], counts: list[np.ndarray]) -> pa.Table:
    """Columns `word` and `count`: every word that occurs, with its count over all shards (pyarrow's
    group-by, not a Python loop per distinct word)."""
    if not words:
        return pa.table({"word": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
    table = pa.table({"word": pa.concat_arrays(words), "count": np.concatenate(counts)})
    totals = table.group_by("word").aggregate([("count", "sum")]).rename_columns(["word", "count"])
    return totals.filter(pc.greater(totals["count"], 0))  # a shard's dictionary holds dropped lines' words


def _remap_parked(shards: list[tuple[pa.Array, int]], folder: Path, value_set: pa.Array,
                  dtype: np.dtype) -> np.ndarray:
    """Rewrite the parked shard-local ids as vocabulary ids (unknown words become `<unk>` = 0).

    Returns how often each vocabulary id occurs in the split.
    """
    parked_path = folder / "parked_ids.raw"
    parked = np.memmap(parked_path, dtype=np.int32, mode="r") if parked_path.stat().st_size else np.zeros(0, np.int32)
    tokens = NpyAppender(folder / TOKENS, dtype)
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


def _encode_split(path: Path, folder: Path, encode: Encoder, vocab_size: int,
                  reading: Reading) -> tuple[SplitStats, np.ndarray]:
    """Read a split, turning each shard's distinct words into ids with `encode`; the stats, and how often
    each id occurs."""
    writer = SplitWriter(folder, smallest_uint(vocab_size - 1))
    id_counts = np.zeros(vocab_size, dtype=np.int64)
    for shard in _progress(read_shards(path, reading), path):
        shard = _as_ids(shard, *encode(shard.words))
        writer.tokens.append(shard.word_ids)
        id_counts += np.bincount(shard.word_ids, minlength=vocab_size)
        writer.add_structure(shard)
    writer.stats.unk_tokens = int(id_counts[0])
    return writer.close(_no_paragraph(path, reading)), id_counts


def _as_ids(shard: Shard, flat: np.ndarray, sizes: np.ndarray) -> Shard:
    """The shard with its words replaced by their ids, `sizes[w]` of them for distinct word `w`."""
    per_word = sizes[shard.word_ids]
    ids = flat[ragged((np.cumsum(sizes) - sizes)[shard.word_ids], per_word)]
    ends = np.cumsum(shard.sentence_lengths)
    by_token = np.concatenate(([0], np.cumsum(per_word)))
    return replace(shard, word_ids=ids, sentence_lengths=np.diff(by_token[np.concatenate(([0], ends))]))


def _in_vocab(value_set: pa.Array) -> Encoder:
    """Each word as its vocabulary id (`<unk>` = 0 when it has none)."""
    return lambda words: (_vocab_ids(words, value_set), np.ones(len(words), dtype=np.int64))


def _progress(shards: Iterator[Shard], path: Path) -> Iterator[Shard]:
    """Pass the shards through, showing how much of the file has been read."""
    with Progress(path.stat().st_size, f"reading {path.name}", "B", unit_scale=True) as bar:
        for shard in shards:
            yield shard
            bar.update(shard.nbytes)


def _vocab_ids(words: pa.Array, value_set: pa.Array) -> np.ndarray:
    """Vocabulary id of each distinct word of a shard; `<unk>` (0) for words outside it."""
    return pc.index_in(words, value_set=value_set).fill_null(0).to_numpy().astype(np.int64)
