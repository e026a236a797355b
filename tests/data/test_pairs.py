"""Google's segments strategy: truncation as truncate_seq_pair, spans inside documents, full batches."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from bertpipe.config import ExamplesConfig
from bertpipe.data import pairs as pairs_module
from bertpipe.data.examples import build_examples
from bertpipe.data.pairs import _truncate, google_chunks, segment_pairs, single_segments
from bertpipe.data.prepared_folder import Corpus


def google_truncate(a_len: int, b_len: int, max_tokens: int) -> tuple[int, int]:
    """create_pretraining_data.py's truncate_seq_pair, on lengths: trim the longer (B on a tie)."""
    while a_len + b_len > max_tokens:
        if a_len > b_len:
            a_len -= 1
        else:
            b_len -= 1
    return a_len, b_len


def test_truncation_matches_truncate_seq_pair() -> None:
    rng, draws = np.random.default_rng(0), random.Random(0)
    for _ in range(3000):
        a_len, b_len, max_tokens = draws.randint(1, 300), draws.randint(1, 300), draws.randint(2, 300)
        a_start, new_a, b_start, new_b = _truncate(1000, a_len, 5000, b_len, max_tokens, rng)
        assert (new_a, new_b) == google_truncate(a_len, b_len, max_tokens)
        assert a_start >= 1000 and a_start + new_a <= 1000 + a_len  # what is kept lies inside the original
        assert b_start >= 5000 and b_start + new_b <= 5000 + b_len


def test_truncation_takes_front_and_back_alike() -> None:
    rng = np.random.default_rng(1)
    fronts = _truncate(np.zeros(2000, dtype=np.int64), np.full(2000, 400), np.full(2000, 1000), np.full(2000, 10), 110,
                       rng)[0]
    assert np.mean(fronts) == pytest.approx(150, rel=0.05)  # 300 tokens cut, half of them from the front


def test_articles_are_the_documents(sample_prepared: Path, shared_wikitext: Path) -> None:
    corpus = Corpus.load(sample_prepared / "train")
    titles = [line for line in (shared_wikitext / "wiki.valid.tokens").read_text().splitlines()
              if line.startswith(" = ") and not line.startswith(" = = ")]
    assert len(corpus.documents()) - 1 == len(titles) == 60


def google_loop(so: np.ndarray, documents: np.ndarray, targets: np.ndarray, split: np.ndarray,
                coin: np.ndarray) -> list[tuple[int, int, int, bool]]:
    """create_pretraining_data.py's `create_instances_from_document` loop, sentence by sentence, its random draws
    read from `split` and `coin` at the chunk's first sentence: (first, a_end, last, B drawn elsewhere) per chunk."""
    rows = []
    for d in range(len(documents) - 1):
        first, end = int(documents[d]), int(documents[d + 1])
        chunk, i = first, first
        while i < end:
            if i == end - 1 or so[i + 1] - so[chunk] >= targets[d]:
                sentences = i + 1 - chunk
                a_end = chunk + (1 if sentences < 2 else 1 + int(split[chunk] * (sentences - 1)))
                random_b = sentences == 1 or coin[chunk] < 0.5
                rows.append((chunk, a_end, i, random_b))
                if random_b:
                    i = a_end - 1  # the chunk's sentences after A start the next one
                chunk = i + 1
            i += 1
    return rows


def test_google_chunks_are_the_loops_chunks() -> None:
    """The chunks found all at once are those of Google's loop, for the same draws, on random small corpora."""
    rng = np.random.default_rng(3)
    for _ in range(300):
        n = int(rng.integers(1, 300))
        so = np.concatenate([[0], np.cumsum(rng.integers(1, 60, n))])
        documents = np.unique(np.concatenate([[0], rng.integers(0, n, int(rng.integers(0, 6))), [n]]))
        targets, split, coin = rng.integers(2, 126, len(documents) - 1), rng.random(n), rng.random(n)
        chunks = google_chunks(so, documents, targets, split, coin)
        found = zip(chunks.first.tolist(), chunks.a_end.tolist(), chunks.last.tolist(), chunks.random_b.tolist(),
                    strict=True)
        assert list(found) == google_loop(so, documents, targets, split, coin)


@pytest.mark.parametrize("block", [pairs_module.BLOCK_SENTENCES, 7])
def test_segments_stay_inside_their_documents(sample_prepared: Path, block: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pairs_module, "BLOCK_SENTENCES", block)  # documents a few at a time, as in a large corpus
    corpus = Corpus.load(sample_prepared / "train")
    pairs = segment_pairs(corpus, np.random.default_rng(0), max_len=128, short_seq_prob=0.1)
    token_of_document = np.asarray(corpus.sentence_offsets)[np.asarray(corpus.paragraph_offsets)[corpus.documents()]]
    doc_a = np.searchsorted(token_of_document, pairs.a_start, side="right") - 1
    doc_b = np.searchsorted(token_of_document, pairs.b_start, side="right") - 1
    assert (pairs.a_len >= 1).all() and (pairs.b_len >= 1).all()
    assert (pairs.a_len + pairs.b_len <= 125).all()
    assert (pairs.a_start + pairs.a_len <= token_of_document[doc_a + 1]).all()
    assert (pairs.b_start + pairs.b_len <= token_of_document[doc_b + 1]).all()
    assert (doc_a[pairs.is_next] == doc_b[pairs.is_next]).all()
    assert (doc_a[~pairs.is_next] != doc_b[~pairs.is_next]).all()
    follows = pairs.is_next & (pairs.a_len + pairs.b_len < 125)  # not truncated: B starts where A ends
    assert follows.any() and (pairs.b_start[follows] == (pairs.a_start + pairs.a_len)[follows]).all()
    assert 0.4 < pairs.is_next.mean() < 0.6


def test_segments_fill_max_len_512(sample_prepared: Path, tmp_path: Path) -> None:
    cfg = ExamplesConfig(strategy="segments", max_len=512)
    metrics = build_examples(sample_prepared, tmp_path / "examples", cfg, seed=0)
    assert metrics["max_predictions"] == 77
    assert metrics["train"]["real_token_fraction"] >= 0.8
    pairs_cfg = ExamplesConfig(max_len=512)
    pairs = build_examples(sample_prepared, tmp_path / "pairs", pairs_cfg, seed=0)
    assert pairs["train"]["real_token_fraction"] < 0.15  # the seed's pairs: nearly 90% padding


@pytest.mark.parametrize("short_seq_prob", [0.0, 0.3])
def test_single_segments_are_whole_sentences_of_one_document_in_order(sample_prepared: Path,
                                                                      short_seq_prob: float) -> None:
    """RoBERTa's DOC-SENTENCES: each segment starts at a sentence, ends at a sentence end (or is cut to max_len
    when a sentence alone exceeds it), never crosses a document's end, and the next one starts where it stopped."""
    corpus = Corpus.load(sample_prepared / "train")
    pairs = single_segments(corpus, np.random.default_rng(0), max_len=128, short_seq_prob=short_seq_prob)
    so = np.asarray(corpus.sentence_offsets)
    token_of_document = so[np.asarray(corpus.paragraph_offsets)[corpus.documents()]]
    doc = np.searchsorted(token_of_document, pairs.a_start, side="right") - 1
    ends = pairs.a_start + pairs.a_len
    assert (pairs.b_len == 0).all() and (pairs.a_len >= 1).all() and (pairs.a_len <= 126).all()
    assert np.isin(pairs.a_start, so).all()
    cut = ~np.isin(ends, so)
    assert (pairs.a_len[cut] == 126).all()  # only a sentence longer than a segment is cut
    assert (ends <= token_of_document[doc + 1]).all()
    nxt = np.searchsorted(so, ends[:-1] - 1, side="right")  # the sentence after the last one taken (even if cut)
    assert np.array_equal(pairs.a_start[1:], so[nxt])  # no sentence skipped or repeated
    if short_seq_prob == 0.0:
        fits = ~cut[:-1] & (doc[1:] == doc[:-1])  # a segment followed by another of its document
        assert (pairs.a_len[:-1][fits] + (so[nxt + 1] - so[nxt])[fits] > 126).all()  # the next sentence would not fit


@pytest.mark.parametrize(("documents", "expected"), [(None, [(0, 6), (6, 3), (9, 6), (19, 1)]),
                                                    ([0, 1, 3], [(0, 3), (3, 6), (9, 6), (19, 1)])])
def test_single_segments_cut_a_small_corpus_as_by_hand(documents: list[int] | None,
                                                       expected: list[tuple[int, int]]) -> None:
    """Sentences of 3, 3, 3, 10 and 1 tokens at max_len 8 (6 tokens a segment). As one document: 3+3 fill one, the
    third stands alone as the 10 would not fit beside it, the 10 is cut to 6, the 1 ends the text. With the first
    sentence a document of its own, it is a segment alone and the next two fill one; paragraphs end nothing."""
    lengths = [3, 3, 3, 10, 1]
    so = np.concatenate([[0], np.cumsum(lengths)])
    corpus = Corpus(np.zeros(so[-1], dtype=np.int32), so, np.array([0, 1, 3, 5]),
                    None if documents is None else np.array(documents))
    pairs = single_segments(corpus, np.random.default_rng(0), max_len=8, short_seq_prob=0.0)
    assert list(zip(pairs.a_start.tolist(), pairs.a_len.tolist(), strict=True)) == expected


def test_single_segments_do_not_depend_on_the_block_size(sample_prepared: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = Corpus.load(sample_prepared / "train")
    whole = single_segments(corpus, np.random.default_rng(0), max_len=128, short_seq_prob=0.1)
    monkeypatch.setattr(pairs_module, "BLOCK_SENTENCES", 7)
    blocks = single_segments(corpus, np.random.default_rng(0), max_len=128, short_seq_prob=0.1)
    assert all(np.array_equal(getattr(whole, name), getattr(blocks, name)) for name in ("a_start", "a_len"))
