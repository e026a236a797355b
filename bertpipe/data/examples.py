"""The `examples` stage: MLM masking with d2l's semantics over NSP pairs, vectorised.

Which spans pair up is `bertpipe.data.pairs`' job (d2l's sentence pairs or Google's segments). An example
is `<cls> a <sep> b <sep>` with segments 0/1, padded to `max_len`; for MLM alone (`train.objective: mlm`)
it is one segment, `<cls> a <sep>`, of contiguous sentences (RoBERTa's DOC-SENTENCES). `max(1, round(mask_prob * len))`
positions among the non-special tokens are predicted: 80% become `<mask>`, 10% a random token, 10%
stay. Unlike d2l, the random token is drawn from the ordinary words only (never `<pad>`, `<cls>`,
...). NSP labels follow Hugging Face: 0 = b follows a, 1 = b is random.

The valid split is masked at a fixed rate whatever the training's (`HELD_OUT`: BERT's 15%, 80/10/10, token by
token, drawn from a fixed seed), so held-out MLM losses of runs that mask differently are measured on the
same examples and compare, as MosaicBERT evaluates its 30%-masking runs at 15%.

Examples are generated and written in chunks straight into memory-mapped `.npy` files, one per
field, with the smallest sufficient integer types; a given seed gives byte-identical files.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bertpipe.atomic import atomic_dir
from bertpipe.config import ExamplesConfig
from bertpipe.data.examples_folder import open_split, write_meta
from bertpipe.data.pairs import Pairs, negative_origins, segment_pairs, sentence_pairs, single_segments
from bertpipe.data.prepared_folder import Corpus, read_vocab
from bertpipe.data.prepared_folder import read_meta as read_prepared_meta
from bertpipe.errors import DataError
from bertpipe.progress import Progress
from bertpipe.vocab import CLS_ID, CONTINUATION, MASK_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS

HELD_OUT = {"mask_prob": 0.15, "mask_token_prob": 0.8, "random_token_prob": 0.1, "whole_word_mask": False}
HELD_OUT_SEED = 0
CHUNK_ROWS = 16384
THREADS = 2  # numpy releases the GIL in the masking's array work; two threads keep two cores busy
log = logging.getLogger(__name__)


class Masker:
    """Turns pairs into padded model inputs with d2l's MLM masking, chunk by chunk (from several threads)."""

    def __init__(self, tokens: np.ndarray, vocab_size: int, cfg: ExamplesConfig,
                 continuation: np.ndarray | None = None, single: bool = False) -> None:
        """`continuation[id]`: is the token a `##` piece continuing a word (whole-word masking only);
        `single`: the pairs have no B, and an example is `<cls> a <sep>`."""
        self.tokens = np.asarray(tokens)  # a plain view of the memory map: np.memmap's indexing is slower
        self.vocab_size, self.cfg, self.continuation = vocab_size, cfg, continuation
        self.specials = 2 if single else 3

    def __call__(self, pairs: Pairs, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], Counter]:
        """The chunk's arrays, and the counts behind metrics/examples.json."""
        ids, candidate = self._layout(pairs)
        length = pairs.a_len + pairs.b_len + self.specials
        if self.cfg.whole_word_mask:
            positions, n_pred = self._choose_whole_words(ids, candidate, length, rng)
        else:
            positions, n_pred = self._choose_positions(candidate, length, rng)
        slots = np.arange(positions.shape[1]) < n_pred[:, None]
        rows = np.broadcast_to(np.arange(len(ids))[:, None], positions.shape)
        labels = np.where(slots, ids[rows, positions], 0)
        draw = rng.random(labels.shape)
        ids[rows[slots], positions[slots]] = self._replacements(labels, draw, rng)[slots]
        arrays = {"token_ids": ids, "segments": self._segments(pairs), "valid_lens": length,
                  "pred_positions": np.where(slots, positions, 0), "mlm_weights": slots, "mlm_labels": labels,
                  "nsp_labels": ~pairs.is_next}
        return arrays, self._count(pairs, candidate, draw[slots])

    def _layout(self, pairs: Pairs) -> tuple[np.ndarray, np.ndarray]:
        """`<cls> a <sep> b <sep> <pad>...` (single: `<cls> a <sep> <pad>...`) as ids [rows, max_len], and
        where a and b's words are."""
        offset = np.int32 if len(self.tokens) < 2**31 else np.int64  # half the bytes of the [rows, max_len] grids
        j = np.arange(self.cfg.max_len, dtype=offset)
        a_len, b_len = pairs.a_len[:, None].astype(offset), pairs.b_len[:, None].astype(offset)
        in_a = (j >= 1) & (j <= a_len)
        in_b = (j >= a_len + 2) & (j < a_len + b_len + 2)
        source = np.where(in_a, pairs.a_start[:, None].astype(offset) + (j - 1),
                          pairs.b_start[:, None].astype(offset) + (j - 2) - a_len)
        words = in_a | in_b
        ids = np.take(self.tokens, np.where(words, source, 0)).astype(np.int64)
        ids[~words] = PAD_ID
        ids[:, 0] = CLS_ID
        ids[np.arange(len(ids)), pairs.a_len + 1] = SEP_ID
        if self.specials == 3:
            ids[np.arange(len(ids)), pairs.a_len + pairs.b_len + 2] = SEP_ID
        return ids, words

    def _predictions(self, candidate: np.ndarray, length: np.ndarray) -> np.ndarray:
        """Per row: `max(1, round(mask_prob * len))` (`ExamplesConfig.max_predictions` at full length), at most
        the row's candidates; np.round rounds half to even, as Python's round does in d2l."""
        wanted = np.maximum(1, np.round(length * self.cfg.mask_prob))
        return np.minimum(wanted, candidate.sum(1)).astype(np.int64)

    def _choose_positions(self, candidate: np.ndarray, length: np.ndarray,
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A uniform random subset of `_predictions` candidates, sorted."""
        k = self.cfg.max_predictions
        n_pred = self._predictions(candidate, length)
        keys = np.where(candidate, rng.random(candidate.shape), 2.0)
        smallest = np.argpartition(keys, k - 1, axis=1)[:, :k]
        by_key = np.take_along_axis(smallest, np.argsort(np.take_along_axis(keys, smallest, 1), axis=1), 1)
        positions = np.where(np.arange(k) < n_pred[:, None], by_key, self.cfg.max_len)
        positions.sort(axis=1)
        return np.minimum(positions, self.cfg.max_len - 1), n_pred

    def _choose_whole_words(self, ids: np.ndarray, candidate: np.ndarray, length: np.ndarray,
                            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Google's whole-word masking (create_pretraining_data.py, `do_whole_word_mask`): a word is a
        piece and the `##` pieces after it; words are taken in random order while their pieces still fit
        in `max(1, round(mask_prob * len))` (a word that would overflow is skipped, the next tried), and
        every piece of a taken word is predicted. Returns the sorted positions and how many there are."""
        rows, width = candidate.shape
        n_pred = self._predictions(candidate, length)
        after_candidate = np.zeros_like(candidate)
        after_candidate[:, 1:] = candidate[:, :-1]
        starts = candidate & ~(self.continuation[ids] & after_candidate)
        word = np.cumsum(starts, axis=1) - 1  # [rows, width]: the word a candidate position belongs to
        words = starts.sum(1)
        row = np.broadcast_to(np.arange(rows)[:, None], candidate.shape)
        sizes = np.bincount((row * width + word)[candidate], minlength=rows * width).reshape(rows, width)
        order = np.argsort(np.where(np.arange(width) < words[:, None], rng.random((rows, width)), 2.0), axis=1)
        taken, count = np.zeros((rows, width), dtype=bool), np.zeros(rows, dtype=np.int64)
        for j in range(int(words.max(initial=0))):
            size = sizes[np.arange(rows), order[:, j]]
            take = (j < words) & (count + size <= n_pred)
            taken[np.arange(rows), order[:, j]] = take
            count += np.where(take, size, 0)
        chosen = candidate & taken[row, np.maximum(word, 0)]
        positions = np.sort(np.where(chosen, np.arange(width), width), axis=1)[:, :self.cfg.max_predictions]
        return np.minimum(positions, width - 1), count

    def _replacements(self, labels: np.ndarray, draw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """80% `<mask>`, 10% a random ordinary word, 10% unchanged (with the configured odds)."""
        random_word = rng.integers(len(SPECIAL_TOKENS), self.vocab_size, labels.shape)
        mask_p, random_p = self.cfg.mask_token_prob, self.cfg.random_token_prob
        return np.where(draw < mask_p, MASK_ID, np.where(draw < mask_p + random_p, random_word, labels))

    def _segments(self, pairs: Pairs) -> np.ndarray:
        j = np.arange(self.cfg.max_len)
        return (j >= pairs.a_len[:, None] + 2) & (j < (pairs.a_len + pairs.b_len + self.specials)[:, None])

    def _count(self, pairs: Pairs, candidate: np.ndarray, draw: np.ndarray) -> Counter:
        mask_p, random_p = self.cfg.mask_token_prob, self.cfg.random_token_prob
        return Counter(examples=len(pairs), tokens=int((pairs.a_len + pairs.b_len + self.specials).sum()),
                       candidates=int(candidate.sum()), predictions=len(draw), masked=int((draw < mask_p).sum()),
                       random=int(((draw >= mask_p) & (draw < mask_p + random_p)).sum()),
                       kept=int((draw >= mask_p + random_p).sum()), is_next=int(pairs.is_next.sum()))


def write_examples(corpus: Corpus, folder: Path, cfg: ExamplesConfig, vocab_size: int, seed: int,
                   split_index: int, copies: int = 1, continuation: np.ndarray | None = None,
                   single: bool = False) -> dict:
    """Generate `copies` differently drawn copies of the split's examples into `folder`, one after the
    other; their row ranges are the metrics' `copies` (the pretrain stage may take each as an epoch).
    `single`: one segment per example (`bertpipe.data.pairs.single_segments`), for MLM alone.

    Copy c's pairs are drawn from `default_rng([seed, split_index, c])` and the masking of its chunk k
    from `default_rng([seed, split_index, c, k + 1])`, so chunks are masked on several threads and
    the files are the same whatever the order they finish in.
    """
    drawn = [_pairs(corpus, np.random.default_rng([seed, split_index, c]), cfg, single) for c in range(copies)]
    jobs, row = [], 0
    for c, pairs in enumerate(drawn):
        for k, start in enumerate(range(0, len(pairs), CHUNK_ROWS)):
            jobs.append((pairs.rows(start, start + CHUNK_ROWS), [seed, split_index, c, k + 1], row))
            row += len(jobs[-1][0])
    arrays = open_split(folder, row, cfg.max_len, cfg.max_predictions, vocab_size)
    masker, counts = Masker(corpus.tokens, vocab_size, cfg, continuation, single), Counter()

    def mask(job: tuple[Pairs, list[int], int]) -> Counter:
        chunk, chunk_counts = masker(job[0], np.random.default_rng(job[1]))
        for name, array in arrays.items():
            array.write(job[2], chunk[name])
        return chunk_counts

    with ThreadPoolExecutor(THREADS) as pool, Progress(row, f"examples {folder.name}", " pairs",
                                                      unit_scale=True) as bar:
        for chunk_counts in pool.map(mask, jobs):
            counts.update(chunk_counts)
            bar.update(chunk_counts["examples"])
    for array in arrays.values():
        array.close()
    ends = np.cumsum([len(pairs) for pairs in drawn]).tolist()
    ranges = [[start, stop] for start, stop in zip([0, *ends[:-1]], ends, strict=True)]
    where = {"documents": len(corpus.documents()) - 1, "copies": ranges}
    if single:  # no NSP labels: nothing to say about next sentences
        return {key: value for key, value in _summary(counts).items() if key != "is_next_fraction"} | where
    origins = [negative_origins(corpus, pairs) for pairs in drawn]
    negatives = {key: sum(o[key] for o in origins) for key in origins[0]}
    return _summary(counts) | negatives | where


def _pairs(corpus: Corpus, rng: np.random.Generator, cfg: ExamplesConfig, single: bool) -> Pairs:
    if single:
        return single_segments(corpus, rng, cfg.max_len, cfg.short_seq_prob)
    if cfg.strategy == "segments":
        return segment_pairs(corpus, rng, cfg.max_len, cfg.short_seq_prob)
    return sentence_pairs(corpus, rng, cfg.max_len)


def _summary(c: dict[str, int]) -> dict[str, float]:
    predictions = max(c["predictions"], 1)
    return {"examples": c["examples"], "mean_valid_len": c["tokens"] / max(c["examples"], 1),
            "predictions": c["predictions"], "masked_fraction": c["predictions"] / max(c["candidates"], 1),
            "mask_token_fraction": c["masked"] / predictions, "random_token_fraction": c["random"] / predictions,
            "unchanged_fraction": c["kept"] / predictions, "is_next_fraction": c["is_next"] / max(c["examples"], 1)}


MAX_SAME_DOCUMENT = 0.5  # NSP negatives from A's own document: beyond this, "random" is mostly "nearby"
MAX_ACTUALLY_NEXT = 0.01  # negatives whose B does follow A: labels this often wrong mislead the NSP head


def _check_documents(corpus: Corpus, cfg: ExamplesConfig, folder: Path) -> None:
    """Google's segments take each negative B from another document: that needs two documents at least."""
    if cfg.strategy == "segments" and len(corpus.documents()) - 1 < 2:
        raise DataError(f"{folder} is one document (no WikiText article heading ' = Title = '), but "
                        "examples.strategy = segments draws NSP negatives from another document; use "
                        "examples.strategy: sentence-pairs or a corpus with article headings")


def _check_pairs(corpus: Corpus, cfg: ExamplesConfig, folder: Path) -> None:
    """A true next sentence needs two sentences in one paragraph (sentence pairs) or one document (segments)."""
    offsets = np.asarray(corpus.paragraph_offsets)
    unit = "paragraph" if cfg.strategy == "sentence-pairs" else "document"
    sentences = np.diff(offsets if unit == "paragraph" else offsets[corpus.documents()])
    if not (sentences >= 2).any():
        raise DataError(f"{folder} has no {unit} of two sentences, so examples.strategy = {cfg.strategy} finds no "
                        "sentence pair; expected text whose sentences the prepare stage can tell apart "
                        "(prepare.sentences: sentencex or lines) or examples.strategy: segments")


def _check_negatives(stats: dict, split: str) -> None:
    """Warn in one line when the NSP negatives are not what the task assumes (unrelated sentences)."""
    negatives = max(stats["negatives"], 1)
    if stats["negatives_same_document"] > MAX_SAME_DOCUMENT * negatives:
        log.warning("%s: %.0f%% of NSP negatives come from their sentence A's own document (documents in the "
                    "split: %d); next-sentence prediction learns little from them", split,
                    100 * stats["negatives_same_document"] / negatives, stats["documents"])
    if stats["negatives_actually_next"] > MAX_ACTUALLY_NEXT * negatives:
        log.warning("%s: %.1f%% of NSP negatives are in fact the next sentence (labelled 1, truly 0): the corpus "
                    "has too few sentences to draw unrelated ones from", split,
                    100 * stats["negatives_actually_next"] / negatives)


def _continuation(prepared_dir: Path, prepared: dict) -> np.ndarray:
    """Per token id: is it a `##` piece that continues a word (what whole-word masking groups)?"""
    if prepared.get("tokenizer") not in ("wordpiece", "pretrained"):
        raise DataError(f"{prepared_dir} holds a {prepared.get('tokenizer', 'word')} vocabulary, which has no "
                        "word pieces to mask together; rerun the prepare stage with prepare.tokenizer: wordpiece")
    tokens = read_vocab(prepared_dir)[0]["token"]
    return tokens.str.startswith(CONTINUATION).to_numpy(dtype=bool)


def build_examples(prepared_dir: Path, out_dir: Path, cfg: ExamplesConfig, seed: int,
                   objective: str = "mlm+nsp") -> dict:
    """Examples for the train and valid splits of a prepared corpus into `out_dir` (whole or not at all),
    pairs for `train.objective` mlm+nsp, single segments for mlm; returns metrics/examples.json."""
    with atomic_dir(out_dir) as folder:
        return _examples_into(prepared_dir, folder, cfg, seed, objective == "mlm")


def _examples_into(prepared_dir: Path, out_dir: Path, cfg: ExamplesConfig, seed: int, single: bool) -> dict:
    prepared = read_prepared_meta(prepared_dir)
    if prepared["vocab_size"] <= len(SPECIAL_TOKENS):
        raise DataError(f"{prepared_dir}'s vocabulary holds only the reserved tokens (no word occurs "
                        "prepare.min_freq times); lower prepare.min_freq or use a larger corpus")
    continuation = _continuation(prepared_dir, prepared) if cfg.whole_word_mask else None
    metrics: dict = {"max_len": cfg.max_len, "max_predictions": cfg.max_predictions, "strategy": cfg.strategy}
    held_out = cfg.model_copy(update=HELD_OUT)
    for split_index, split in enumerate(("train", "valid")):
        corpus = Corpus.load(prepared_dir / split)
        if not single:
            _check_documents(corpus, cfg, prepared_dir / split)
            _check_pairs(corpus, cfg, prepared_dir / split)
        if split == "train":
            metrics[split] = write_examples(corpus, out_dir / split, cfg, prepared["vocab_size"], seed, split_index,
                                            cfg.dupe_factor, continuation, single)
        else:  # one held-out set, the same at every evaluation and for every masking
            metrics[split] = write_examples(corpus, out_dir / split, held_out, prepared["vocab_size"], HELD_OUT_SEED,
                                            split_index, single=single)
        metrics[split]["real_token_fraction"] = metrics[split]["mean_valid_len"] / cfg.max_len
        if metrics[split]["examples"] == 0:
            raise DataError(f"{prepared_dir / split} yields no example of at most examples.max_len = {cfg.max_len}"
                            " tokens; raise examples.max_len")
        if not single:
            _check_negatives(metrics[split], split)
    meta = {key: prepared[key] for key in ("vocab_size", "vocab_sha256")}
    meta.update(max_len=cfg.max_len, max_predictions=cfg.max_predictions, strategy=cfg.strategy, seed=seed,
                objective="mlm" if single else "mlm+nsp", held_out=HELD_OUT | {"seed": HELD_OUT_SEED},
                params=cfg.model_dump(), examples={split: metrics[split]["examples"] for split in ("train", "valid")},
                copies={split: metrics[split].pop("copies") for split in ("train", "valid")})
    write_meta(out_dir, meta)
    return metrics
