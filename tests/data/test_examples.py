"""Tests for bertpipe/data/examples.py: NSP pairs and MLM masking with the semantics of d2l's BERT chapter.

d2l's `_get_nsp_data_from_paragraph`, `_get_mlm_data_from_tokens` and `_pad_bert_inputs`, checked
as properties of the written arrays: the `<cls> a <sep> b <sep>` layout, skipped long pairs,
`max(1, round(0.15 * len))` predictions among the words, the 80/10/10 replacement split. Our
deliberate differences are checked too: random replacements are ordinary words (ids >= 5) and
NSP labels follow Hugging Face (0 = b follows a). Corpora are small: hand-written text through
`prepare`, or random word ids laid out directly as `Corpus` arrays.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from bertpipe.config import ExamplesConfig, PrepareConfig
from bertpipe.data import examples
from bertpipe.data.examples import build_examples, write_examples
from bertpipe.data.examples_folder import FIELDS, check_meta
from bertpipe.data.pairs import sentence_pairs
from bertpipe.data.prepare import prepare
from bertpipe.data.prepared_folder import Corpus
from bertpipe.errors import DataError
from bertpipe.vocab import CLS_ID, MASK_ID, PAD_ID, SEP_ID

VOCAB = 200
TEXT = """ = A title line , dropped =
 The cat sat on the mat . It purred . Then it slept for a long while .
 A dog came . The dog barked at the cat . The cat left .
 Rain fell all day . Nobody went out .
 One sentence only , so this line is dropped
 Birds sang early in the morning . The sun rose . The day began . People woke up . Coffee was made .
"""


def offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def corpus_of(paragraphs: list[list[list[int]]]) -> Corpus:
    """A Corpus from paragraphs of sentences of word ids."""
    sentences = [s for p in paragraphs for s in p]
    tokens = np.array([t for s in sentences for t in s], dtype=np.uint16)
    return Corpus(tokens, offsets(np.array(list(map(len, sentences)))), offsets(np.array(list(map(len, paragraphs)))))


def random_corpus(seed: int, paragraphs: int, max_words: int) -> Corpus:
    """Paragraphs of 2-5 sentences of 0..max_words ordinary word ids (5..VOCAB-1), empty sentences included."""
    rng = np.random.default_rng(seed)
    per_paragraph = rng.integers(2, 6, paragraphs)
    lengths = rng.integers(0, max_words + 1, per_paragraph.sum())
    return Corpus(rng.integers(5, VOCAB, lengths.sum()).astype(np.uint16), offsets(lengths), offsets(per_paragraph))


def sentences_of(corpus: Corpus) -> list[list[int]]:
    so = corpus.sentence_offsets
    return [corpus.tokens[so[i]:so[i + 1]].tolist() for i in range(len(so) - 1)]


def first_sentences(corpus: Corpus) -> list[int]:
    """Indices of the sentences that have a next one in their paragraph: d2l's `a`s, in order."""
    po = corpus.paragraph_offsets
    return [i for p in range(len(po) - 1) for i in range(po[p], po[p + 1] - 1)]


def generate(corpus: Corpus, folder: Path, seed: int = 0, vocab_size: int = VOCAB,
             **cfg: object) -> tuple[dict[str, np.ndarray], dict]:
    """write_examples into `folder`; the arrays read back, and the metrics."""
    config = ExamplesConfig(**cfg)
    metrics = write_examples(corpus, folder, config, vocab_size, seed, split_index=0, copies=config.dupe_factor)
    return {name: np.load(folder / f"{name}.npy") for name in FIELDS}, metrics


def original_ids(ex: dict[str, np.ndarray]) -> np.ndarray:
    """token_ids with the labels put back at the predicted positions: the input before masking."""
    ids = ex["token_ids"].astype(np.int64)
    rows, slots = np.nonzero(ex["mlm_weights"])
    ids[rows, ex["pred_positions"][rows, slots]] = ex["mlm_labels"][rows, slots]
    return ids


def predicted_mask(ex: dict[str, np.ndarray]) -> np.ndarray:
    """[rows, max_len]: True where a position is predicted."""
    mask = np.zeros(ex["token_ids"].shape, dtype=bool)
    rows, slots = np.nonzero(ex["mlm_weights"])
    mask[rows, ex["pred_positions"][rows, slots]] = True
    return mask


def check_layout(corpus: Corpus, ex: dict[str, np.ndarray]) -> None:
    """Every row is `<cls> a <sep> b <sep> <pad>...` for the corpus's next `a`, when no pair was skipped."""
    sentences, max_len = sentences_of(corpus), ex["token_ids"].shape[1]
    known = {tuple(s) for s in sentences}
    ids = original_ids(ex)
    assert len(ex["valid_lens"]) == len(first_sentences(corpus))
    for row, i in enumerate(first_sentences(corpus)):
        a, n = sentences[i], int(ex["valid_lens"][row])
        b = ids[row, len(a) + 2:n - 1].tolist()
        assert ids[row].tolist() == [CLS_ID, *a, SEP_ID, *b, SEP_ID] + [PAD_ID] * (max_len - n)
        assert ex["segments"][row].tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * (max_len - n)
        if ex["nsp_labels"][row] == 0:
            assert b == sentences[i + 1]
        else:
            assert tuple(b) in known


def check_predictions(ex: dict[str, np.ndarray]) -> None:
    """How many positions are predicted, which ones, in what order, and how the slots are padded."""
    max_len, lens = ex["token_ids"].shape[1], ex["valid_lens"].astype(np.int64)
    n_pred = ex["mlm_weights"].sum(axis=1)
    assert n_pred.tolist() == [min(max(1, round(n * 0.15)), n - 3) for n in lens.tolist()]
    slots = np.arange(ex["mlm_weights"].shape[1]) < n_pred[:, None]
    assert (ex["mlm_weights"] == slots).all()
    pos = ex["pred_positions"].astype(np.int64)
    assert (pos[~slots] == 0).all() and (ex["mlm_labels"][~slots] == 0).all()
    assert (np.diff(pos, axis=1)[slots[:, 1:]] > 0).all()
    a_len = (ex["segments"] == 0).sum(axis=1) - (max_len - lens) - 2
    rows = np.nonzero(slots)[0]
    real = pos[slots]
    assert (real >= 1).all() and (real < lens[rows] - 1).all() and (real != a_len[rows] + 1).all()
    assert not np.isin(original_ids(ex)[rows, real], [PAD_ID, CLS_ID, SEP_ID]).any()


def test_layout_segments_and_valid_lens(tmp_path: Path) -> None:
    corpus = random_corpus(seed=1, paragraphs=300, max_words=30)
    ex, _ = generate(corpus, tmp_path)
    check_layout(corpus, ex)
    assert ex["token_ids"].shape == (len(ex["valid_lens"]), 64)
    for name in ("pred_positions", "mlm_labels", "mlm_weights"):
        assert ex[name].shape == (len(ex["valid_lens"]), 10)


def test_text_through_prepare_and_build_examples(tmp_path: Path) -> None:
    for split in ("train", "valid"):
        (tmp_path / "raw").mkdir(exist_ok=True)
        (tmp_path / "raw" / f"wiki.{split}.tokens").write_text(TEXT)
    prepare(tmp_path / "raw", tmp_path / "prepared", PrepareConfig(min_freq=1))
    metrics = build_examples(tmp_path / "prepared", tmp_path / "examples", ExamplesConfig(), seed=0)
    for split in ("train", "valid"):
        corpus = Corpus.load(tmp_path / "prepared" / split)
        ex = {name: np.load(tmp_path / "examples" / split / f"{name}.npy") for name in FIELDS}
        assert metrics[split]["examples"] == len(first_sentences(corpus)) == 9
        check_layout(corpus, ex)
        check_predictions(ex)


def test_pairs_longer_than_max_len_are_skipped(tmp_path: Path) -> None:
    # As next-sentence pairs, the first paragraph is exactly 8 tokens long and the second 9.
    corpus = corpus_of([[[5, 6], [7, 8, 9]], [[5, 6, 7], [8, 9, 10]]] * 50)
    everything = sentence_pairs(corpus, np.random.default_rng(0), max_len=1000)
    lengths = everything.a_len + everything.b_len + 3
    assert {8, 9} <= set(lengths[everything.is_next].tolist())
    kept = sentence_pairs(corpus, np.random.default_rng(0), max_len=8)
    for name in ("a_start", "a_len", "b_start", "b_len", "is_next"):
        assert getattr(kept, name).tolist() == getattr(everything, name)[lengths <= 8].tolist()
    ex, _ = generate(corpus, tmp_path, max_len=8)
    assert ex["valid_lens"].max() == 8


def test_no_pair_short_enough_is_a_data_error(tmp_path: Path) -> None:
    for split in ("train", "valid"):
        (tmp_path / "raw").mkdir(exist_ok=True)
        (tmp_path / "raw" / f"wiki.{split}.tokens").write_text("a b c d . e f g h\n")
    prepare(tmp_path / "raw", tmp_path / "prepared", PrepareConfig(min_freq=1))
    with pytest.raises(DataError, match=r"examples\.max_len = 8") as info:
        build_examples(tmp_path / "prepared", tmp_path / "examples", ExamplesConfig(max_len=8), seed=0)
    assert "\n" not in str(info.value)


def test_vocabulary_of_reserved_tokens_only_is_a_data_error(tmp_path: Path) -> None:
    for split in ("train", "valid"):
        (tmp_path / "raw").mkdir(exist_ok=True)
        (tmp_path / "raw" / f"wiki.{split}.tokens").write_text("a b . c d\n")
    prepare(tmp_path / "raw", tmp_path / "prepared", PrepareConfig(min_freq=5))  # every word is <unk>
    with pytest.raises(DataError):
        build_examples(tmp_path / "prepared", tmp_path / "examples", ExamplesConfig(), seed=0)


def test_predicted_positions_and_slots(tmp_path: Path) -> None:
    ex, _ = generate(random_corpus(seed=2, paragraphs=3000, max_words=30), tmp_path)
    lens = ex["valid_lens"].astype(np.int64)
    assert {10, 30, 50} <= set(lens.tolist())  # 1.5, 4.5 and 7.5 predictions: round half to even
    assert (lens == 3).any()  # both sentences empty: no candidate, so no prediction
    check_predictions(ex)


def test_only_predicted_positions_change(tmp_path: Path) -> None:
    ex, _ = generate(random_corpus(seed=3, paragraphs=3000, max_words=30), tmp_path)
    changed = ex["token_ids"] != original_ids(ex)
    assert changed.any()
    assert not (changed & ~predicted_mask(ex)).any()


def test_replacement_split_and_nsp_balance(tmp_path: Path) -> None:
    ex, metrics = generate(random_corpus(seed=4, paragraphs=17000, max_words=29), tmp_path)
    rows, slots = np.nonzero(ex["mlm_weights"])
    tokens = ex["token_ids"][rows, ex["pred_positions"][rows, slots]].astype(np.int64)
    labels = ex["mlm_labels"][rows, slots].astype(np.int64)
    assert len(tokens) >= 200_000
    masked, unchanged = tokens == MASK_ID, tokens == labels
    random_word = ~masked & ~unchanged
    assert masked.mean() == pytest.approx(0.8, abs=0.01)
    assert random_word.mean() == pytest.approx(0.1, abs=0.01)
    assert unchanged.mean() == pytest.approx(0.1, abs=0.01)
    assert tokens[random_word].min() >= 5 and tokens[random_word].max() < VOCAB
    assert len(np.unique(tokens[random_word])) == VOCAB - 5  # drawn from all the ordinary words
    assert (ex["nsp_labels"] == 0).mean() == pytest.approx(0.5, abs=0.01)
    assert metrics["mask_token_fraction"] == masked.mean()
    assert metrics["random_token_fraction"] == pytest.approx(random_word.mean(), abs=0.001)
    assert metrics["is_next_fraction"] == (ex["nsp_labels"] == 0).mean()


@pytest.mark.parametrize(("vocab_size", "max_len", "word", "position"), [
    (256, 64, np.uint8, np.uint8), (257, 64, np.uint16, np.uint8), (30522, 64, np.uint16, np.uint8),
    (65536, 255, np.uint16, np.uint8), (65537, 256, np.uint32, np.uint16)])
def test_dtypes_are_the_smallest_sufficient(vocab_size: int, max_len: int, word: type, position: type,
                                            tmp_path: Path) -> None:
    ex, _ = generate(random_corpus(seed=5, paragraphs=20, max_words=10), tmp_path, vocab_size=vocab_size,
                     max_len=max_len)
    dtypes = {name: array.dtype for name, array in ex.items()}
    assert dtypes == {"token_ids": word, "mlm_labels": word, "valid_lens": position, "pred_positions": position,
                      "segments": np.uint8, "mlm_weights": np.uint8, "nsp_labels": np.uint8}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_other_seed_other_examples(tmp_path: Path) -> None:
    corpus = random_corpus(seed=6, paragraphs=500, max_words=30)
    for name, seed in (("first", 0), ("again", 0), ("other", 1)):
        generate(corpus, tmp_path / name, seed=seed)
    assert folder_bytes(tmp_path / "first") == folder_bytes(tmp_path / "again")
    first, other = folder_bytes(tmp_path / "first"), folder_bytes(tmp_path / "other")
    assert first["token_ids.npy"] != other["token_ids.npy"]
    assert first["nsp_labels.npy"] != other["nsp_labels.npy"]


def test_dupe_factor_writes_differently_masked_copies(tmp_path: Path) -> None:
    corpus = random_corpus(seed=7, paragraphs=500, max_words=30)
    once, _ = generate(corpus, tmp_path / "once")
    twice, metrics = generate(corpus, tmp_path / "twice", dupe_factor=2)
    n = len(once["valid_lens"])
    assert len(twice["valid_lens"]) == metrics["examples"] == 2 * n and metrics["copies"] == [[0, n], [n, 2 * n]]
    halves = [{name: array[part * n:(part + 1) * n] for name, array in twice.items()} for part in (0, 1)]
    for half in halves:
        check_layout(corpus, half)
        check_predictions(half)
    assert (halves[0]["pred_positions"] != halves[1]["pred_positions"]).any(axis=1).mean() > 0.5


def test_metrics_and_meta(tmp_path: Path) -> None:
    for split in ("train", "valid"):
        (tmp_path / "raw").mkdir(exist_ok=True)
        (tmp_path / "raw" / f"wiki.{split}.tokens").write_text(TEXT)
    prepare(tmp_path / "raw", tmp_path / "prepared", PrepareConfig(min_freq=1))
    metrics = build_examples(tmp_path / "prepared", tmp_path / "examples", ExamplesConfig(max_len=32), seed=0)
    assert set(metrics) == {"max_len", "max_predictions", "strategy", "train", "valid"}
    assert (metrics["max_len"], metrics["max_predictions"], metrics["strategy"]) == (32, 5, "sentence-pairs")
    ex = {name: np.load(tmp_path / "examples" / "train" / f"{name}.npy") for name in FIELDS}
    train = metrics["train"]
    assert set(train) == {"examples", "mean_valid_len", "predictions", "masked_fraction", "mask_token_fraction",
                          "random_token_fraction", "unchanged_fraction", "is_next_fraction", "real_token_fraction",
                          "documents", "negatives", "negatives_same_document", "negatives_same_paragraph",
                          "negatives_actually_next"}
    assert train["examples"] == len(ex["valid_lens"])
    assert train["predictions"] == ex["mlm_weights"].sum()
    assert train["mean_valid_len"] == pytest.approx(ex["valid_lens"].mean())
    assert train["real_token_fraction"] == pytest.approx(ex["valid_lens"].mean() / 32)
    assert train["is_next_fraction"] == pytest.approx((ex["nsp_labels"] == 0).mean())
    assert train["mask_token_fraction"] + train["random_token_fraction"] + train["unchanged_fraction"] == (
        pytest.approx(1.0))
    meta = json.loads((tmp_path / "examples" / "meta.json").read_text())
    prepared = json.loads((tmp_path / "prepared" / "meta.json").read_text())
    expected = {"vocab_size": prepared["vocab_size"], "vocab_sha256": prepared["vocab_sha256"], "max_len": 32,
                "max_predictions": 5, "strategy": "sentence-pairs",
                "examples": {"train": train["examples"], "valid": metrics["valid"]["examples"]}}
    assert {key: meta.get(key) for key in expected} == expected
    json.dumps(metrics)  # metrics/examples.json must be plain JSON


def test_nsp_negatives_are_counted_by_where_they_come_from(sample_prepared: Path, tmp_path: Path) -> None:
    """metrics/examples.json shows whether d2l's "random sentence" negatives were unrelated sentences."""
    metrics = build_examples(sample_prepared, tmp_path / "examples", ExamplesConfig(), seed=0)
    train = metrics["train"]
    assert train["documents"] == 60 and train["negatives"] == round(train["examples"] * (1 - train["is_next_fraction"]))
    assert 0 < train["negatives_same_document"] < 0.1 * train["negatives"]  # ~1/60 of them, by chance
    assert train["negatives_actually_next"] == 0


def test_segments_need_two_documents(tmp_path: Path) -> None:
    """Google's strategy takes every negative from another document: one document is an error, before any work."""
    corpus = random_corpus(0, paragraphs=50, max_words=8)  # no document offsets: the split is one document
    prepared = tmp_path / "prepared"
    for split in ("train", "valid"):
        (prepared / split).mkdir(parents=True)
        for name in ("tokens", "sentence_offsets", "paragraph_offsets"):
            np.save(prepared / split / f"{name}.npy", getattr(corpus, name))
        np.save(prepared / split / "document_offsets.npy", np.array([0, 50]))
    (prepared / "meta.json").write_text(json.dumps({"vocab_size": VOCAB, "vocab_sha256": "0" * 64}))
    with pytest.raises(DataError, match=r"is one document .* examples\.strategy = segments .* sentence-pairs"):
        build_examples(prepared, tmp_path / "examples", ExamplesConfig(strategy="segments"), seed=0)
    assert not (tmp_path / "examples" / "train").exists()


def test_a_corpus_too_small_for_unrelated_negatives_is_a_one_line_warning(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """One paragraph of three sentences: d2l's random sentence is often the true next one."""
    corpus = corpus_of([[[5, 6], [7, 8], [9, 10]]])
    with caplog.at_level(logging.WARNING):
        metrics = {}
        for seed in range(40):  # 2 pairs per draw; enough draws that a negative lands on the next sentence
            _, m = generate(corpus, tmp_path / str(seed), seed=seed)
            metrics = {k: metrics.get(k, 0) + m[k] for k in ("negatives", "negatives_actually_next")}
            examples._check_negatives(m, "train")
    assert metrics["negatives_actually_next"] > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("of NSP negatives are in fact the next sentence" in w for w in warnings)
    assert any("come from their sentence A's own document (documents in the split: 1)" in w for w in warnings)


def wordpiece_corpus(seed: int, paragraphs: int) -> tuple[Corpus, np.ndarray]:
    """Random ids where ids >= 100 are `##` pieces (continuation[id]), and that flag per id."""
    continuation = np.arange(VOCAB) >= 100
    return random_corpus(seed, paragraphs, max_words=30), continuation


def test_whole_word_masking_predicts_every_piece_of_a_chosen_word(tmp_path: Path) -> None:
    corpus, continuation = wordpiece_corpus(seed=5, paragraphs=400)
    cfg = ExamplesConfig(whole_word_mask=True, max_len=64)
    write_examples(corpus, tmp_path, cfg, VOCAB, seed=0, split_index=0, continuation=continuation)
    ex = {name: np.load(tmp_path / f"{name}.npy") for name in FIELDS}
    before = original_ids(ex)
    whole, split_words = 0, 0
    for row in range(len(before)):
        n = int(ex["mlm_weights"][row].sum())
        chosen = set(ex["pred_positions"][row][:n].tolist())
        assert n <= max(1, round(0.15 * int(ex["valid_lens"][row])))
        real = [j for j in range(1, int(ex["valid_lens"][row]) - 1) if before[row, j] not in (CLS_ID, SEP_ID)]
        for j in real:  # a piece is chosen exactly when the piece before it in the same word is
            if continuation[before[row, j]] and j - 1 in real:
                split_words += (j in chosen) != (j - 1 in chosen)
                whole += j in chosen
    assert split_words == 0 and whole > 100


def test_whole_word_masking_fills_the_budget_with_words_that_fit(tmp_path: Path) -> None:
    """Google's rule: a word whose pieces would overflow is skipped and the next one tried, so rows of
    one-piece words get their full `round(0.15 * len)` predictions."""
    words = random_corpus(seed=6, paragraphs=200, max_words=20)
    corpus = Corpus((words.tokens % 95 + 5).astype(np.uint16), words.sentence_offsets, words.paragraph_offsets)
    assert corpus.tokens.max() < 100  # every word is one piece
    continuation = np.arange(VOCAB) >= 100
    for wwm in (False, True):
        write_examples(corpus, tmp_path / str(wwm), ExamplesConfig(whole_word_mask=wwm), VOCAB, seed=0,
                       split_index=0, continuation=continuation)
    plain, whole = (np.load(tmp_path / str(w) / "mlm_weights.npy").sum(1) for w in (False, True))
    assert np.array_equal(plain, whole)


def test_whole_word_mask_needs_a_wordpiece_vocabulary(tmp_path: Path) -> None:
    from bertpipe.config import Params, build

    with pytest.raises(Exception, match=r"examples.whole_word_mask = True is not allowed; expected false with "
                                        r"prepare.tokenizer: word"):
        build(Params, {"examples": {"whole_word_mask": True}})
    out = tmp_path / "prepared"
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "wiki.train.tokens").write_text(TEXT)
    (tmp_path / "raw" / "wiki.valid.tokens").write_text(TEXT)
    prepare(tmp_path / "raw", out, PrepareConfig(min_freq=1))
    with pytest.raises(DataError, match="holds a word vocabulary, which has no word pieces"):
        build_examples(out, tmp_path / "examples", ExamplesConfig(whole_word_mask=True), seed=0)


def test_mlm_examples_are_single_segments_of_whole_sentences_within_documents(sample_prepared: Path,
                                                                              tmp_path: Path) -> None:
    """`train.objective: mlm`: `<cls> a <sep>`, segment 0 throughout, a the text of consecutive sentences of one
    document (RoBERTa's DOC-SENTENCES), every sentence of the split in one segment, no NSP statistics."""
    cfg = ExamplesConfig(strategy="segments", max_len=64, short_seq_prob=0.0)
    metrics = build_examples(sample_prepared, tmp_path / "examples", cfg, seed=0, objective="mlm")
    ex = {name: np.load(tmp_path / "examples" / "train" / f"{name}.npy") for name in FIELDS}
    ids, lens = original_ids(ex), ex["valid_lens"].astype(np.int64)
    rows = np.arange(len(ids))
    assert (ids[:, 0] == CLS_ID).all() and (ids[rows, lens - 1] == SEP_ID).all()
    assert (ex["segments"] == 0).all() and (lens <= 64).all()
    assert not ((ids[:, 1:][np.arange(63) < (lens - 2)[:, None]]) == SEP_ID).any()  # one <sep>, at the end
    assert (ids[np.arange(64) >= lens[:, None]] == PAD_ID).all()
    text = np.asarray(Corpus.load(sample_prepared / "train").tokens)
    segments = [ids[i, 1:lens[i] - 1] for i in rows]
    assert np.array_equal(np.concatenate(segments[:3]), text[:sum(map(len, segments[:3]))])  # in corpus order
    assert sum(map(len, segments)) >= 0.95 * len(text)  # only sentences longer than a segment lose tokens
    assert metrics["train"]["real_token_fraction"] > 0.75  # whole sentences up to max_len (pairs: 0.7)
    assert "is_next_fraction" not in metrics["train"] and "negatives" not in metrics["train"]
    meta = json.loads((tmp_path / "examples" / "meta.json").read_text())
    assert meta["objective"] == "mlm"
    check_meta(meta, ex, tmp_path / "examples", 512, "mlm")
    with pytest.raises(DataError, match=r"holds examples for train\.objective mlm, not mlm\+nsp"):
        check_meta(meta, ex, tmp_path / "examples", 512, "mlm+nsp")  # a pretrain with NSP on them stops first


def test_held_out_examples_are_masked_at_a_fixed_rate_whatever_the_training_masks(sample_prepared: Path,
                                                                                  tmp_path: Path) -> None:
    """Runs that differ only in examples.mask_prob (or the seed, or whole-word masking's odds) are scored on
    the same held-out examples, masked at 15%, so their held-out MLM losses compare (MosaicBERT's practice)."""
    folders = {}
    for name, cfg, seed in (("p15", ExamplesConfig(), 0), ("p30", ExamplesConfig(mask_prob=0.3), 0),
                            ("seed1", ExamplesConfig(mask_prob=0.3, mask_token_prob=1.0, random_token_prob=0.0), 1)):
        build_examples(sample_prepared, tmp_path / name, cfg, seed=seed)
        folders[name] = tmp_path / name
    valid = {name: folder_bytes(folder / "valid") for name, folder in folders.items()}
    assert valid["p15"] == valid["p30"] == valid["seed1"]
    assert folder_bytes(folders["p15"] / "train") != folder_bytes(folders["p30"] / "train")
    p30 = {name: np.load(folders["p30"] / "train" / f"{name}.npy") for name in FIELDS}
    assert p30["mlm_weights"].sum() / p30["valid_lens"].sum() > 0.25  # training did mask at 30%
    meta = json.loads((folders["p30"] / "meta.json").read_text())
    assert meta["held_out"] == {"mask_prob": 0.15, "mask_token_prob": 0.8, "random_token_prob": 0.1,
                                "whole_word_mask": False, "seed": 0}
