"""Tests for bertpipe/data/prepare.py: the vocabulary and the word-id arrays of the `prepare` stage.

The reference is d2l's: `d2l.Vocab(sentences, min_freq, reserved_tokens=['<pad>', '<mask>', '<cls>',
'<sep>'])` over the training sentences of `_read_wiki` (see test_corpus.py), with our tie rule
(equal counts ordered by the token's text) applied on top.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers.d2l import Paragraphs, d2l_paragraphs

from bertpipe.config import PrepareConfig
from bertpipe.data import prepare as prep
from bertpipe.data.corpus import read_shards
from bertpipe.data.lines import MAX_LINE_BYTES
from bertpipe.errors import DataError
from bertpipe.vocab import SPECIAL_TOKENS, vocab_digest


def d2l_vocab(sentences: list[list[str]], min_freq: int) -> tuple[list[str], collections.Counter]:
    """d2l.Vocab's idx_to_token (reserved tokens first, then by descending count) and its counter."""
    counter = collections.Counter(token for sentence in sentences for token in sentence)
    idx_to_token = list(SPECIAL_TOKENS)
    for token, freq in sorted(counter.items(), key=lambda x: x[1], reverse=True):
        if freq < min_freq:
            break
        if token not in idx_to_token:
            idx_to_token.append(token)
    return idx_to_token, counter


def write_raw(folder: Path, train: str, valid: str = "a . b\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wiki.train.tokens").write_text(train, encoding="utf-8")
    (folder / "wiki.valid.tokens").write_text(valid, encoding="utf-8")
    return folder


def run_prepare(tmp_path: Path, train: str, valid: str = "a . b\n", min_freq: int = 1) -> tuple[Path, dict]:
    out = tmp_path / "prepared"
    stats = prep.prepare(write_raw(tmp_path / "raw", train, valid), out, PrepareConfig(min_freq=min_freq))
    return out, stats


def vocab_of(out: Path) -> list[str]:
    return pd.read_parquet(out / "vocab.parquet")["token"].tolist()


def decode_split(folder: Path, vocab: list[str]) -> Paragraphs:
    """A prepared split's arrays turned back into paragraphs of sentences of tokens."""
    tokens = np.load(folder / "tokens.npy")
    so, po = np.load(folder / "sentence_offsets.npy"), np.load(folder / "paragraph_offsets.npy")
    sentences = [[vocab[i] for i in tokens[so[s]:so[s + 1]]] for s in range(len(so) - 1)]
    return [sentences[po[p]:po[p + 1]] for p in range(len(po) - 1)]


def with_unk(paragraphs: Paragraphs, vocab: list[str]) -> Paragraphs:
    known = set(vocab)
    return [[[t if t in known else "<unk>" for t in s] for s in p] for p in paragraphs]


def test_vocab_order_is_reserved_then_count_then_text() -> None:
    counts = {"b": 3, "a": 3, "c": 5, "d": 1, "e": 3, "<unk>": 9}
    assert prep.build_vocab(counts, min_freq=2) == [*SPECIAL_TOKENS, "c", "a", "b", "e"]


@pytest.mark.parametrize(("min_freq", "ordinary"), [(1, ["c", "a", "b", "e", "d"]), (3, ["c", "a", "b", "e"]),
                                                    (4, ["c"]), (6, [])])
def test_min_freq_is_inclusive(min_freq: int, ordinary: list[str]) -> None:
    counts = {"b": 3, "a": 3, "c": 5, "d": 1, "e": 3}
    assert prep.build_vocab(counts, min_freq) == [*SPECIAL_TOKENS, *ordinary]


def test_reserved_tokens_in_the_text_are_not_duplicated(tmp_path: Path) -> None:
    out, _ = run_prepare(tmp_path, "<unk> x <pad> . <unk> y . <unk>\n", valid="<unk> . x <unk>\n")
    vocab = vocab_of(out)
    assert vocab == [*SPECIAL_TOKENS, "x", "y"]
    assert np.load(out / "train" / "tokens.npy").tolist() == [0, 5, 1, 0, 6, 0]
    assert np.load(out / "valid" / "tokens.npy").tolist() == [0, 5, 0]


def test_valid_words_outside_the_vocab_are_unk(tmp_path: Path) -> None:
    out, stats = run_prepare(tmp_path, "a b . a b . c\n", valid="a zebra . b c\n", min_freq=2)
    assert vocab_of(out) == [*SPECIAL_TOKENS, "a", "b"]
    assert decode_split(out / "valid", vocab_of(out)) == [[["a", "<unk>"], ["b", "<unk>"]]]
    assert stats["valid"]["unk_tokens"] == 2
    assert stats["train"]["unk_tokens"] == 1


def test_distinct_train_tokens_counts_only_paragraph_words(tmp_path: Path) -> None:
    _, stats = run_prepare(tmp_path, " = Title = \nA . b\n")
    assert stats["distinct_train_tokens"] == 2


def test_vocab_parquet_round_trips(tmp_path: Path) -> None:
    out, stats = run_prepare(tmp_path, "b a . b c . b\nzz . a\n")
    table = pd.read_parquet(out / "vocab.parquet")
    assert table.columns.tolist() == ["id", "token", "count"]
    assert table["id"].tolist() == list(range(len(table))) == list(range(stats["vocab_size"]))
    assert table["token"].tolist() == [*SPECIAL_TOKENS, "b", "a", "c", "zz"]
    assert table["count"].tolist() == [0, 0, 0, 0, 0, 3, 2, 1, 1]
    meta = json.loads((out / "meta.json").read_text())
    assert meta == {"vocab_size": 9, "vocab_sha256": vocab_digest(table["token"]), "token_dtype": "uint8",
                    "tokenizer": "word"}


@pytest.mark.parametrize(("train", "valid", "words"), [
    ("", "a . b\n", ("wiki.train.tokens", "no paragraph")),
    ("one sentence\n\nanother one\n", "a . b\n", ("wiki.train.tokens", "' . '")),
    ("a . b\n", "", ("wiki.valid.tokens", "no paragraph")),
    ("a . b\n", "a.b\n", ("wiki.valid.tokens", "' . '")),
], ids=["empty-train", "no-break-train", "empty-valid", "no-break-valid"])
def test_corpus_without_paragraphs_is_one_line_data_error(train: str, valid: str, words: tuple[str, ...],
                                                          tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        run_prepare(tmp_path, train, valid)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_missing_split_file_is_a_data_error(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "raw", "a . b\n")
    (raw / "wiki.valid.tokens").unlink()
    with pytest.raises(DataError, match=r"wiki\.valid\.tokens is missing"):
        prep.prepare(raw, tmp_path / "out", PrepareConfig())


@pytest.fixture(scope="module")
def prepared_sample(tmp_path_factory: pytest.TempPathFactory, shared_wikitext: Path) -> tuple[Path, dict]:
    """`prepare` (min_freq 5) on the shared sample: valid stands in for train, test for valid."""
    root = tmp_path_factory.mktemp("sample")
    raw = write_raw(root / "raw", (shared_wikitext / "wiki.valid.tokens").read_text(encoding="utf-8"),
                    (shared_wikitext / "wiki.test.tokens").read_text(encoding="utf-8"))
    return root / "prepared", prep.prepare(raw, root / "prepared", PrepareConfig(min_freq=5))


def test_sample_vocab_equals_d2l(prepared_sample: tuple[Path, dict], shared_wikitext: Path) -> None:
    out, stats = prepared_sample
    sentences = [s for p in d2l_paragraphs((shared_wikitext / "wiki.valid.tokens").read_text()) for s in p]
    expected, counter = d2l_vocab(sentences, min_freq=5)
    table = pd.read_parquet(out / "vocab.parquet")
    vocab = table["token"].tolist()
    assert set(vocab) == set(expected)
    assert vocab[:5] == expected[:5] == list(SPECIAL_TOKENS)
    assert vocab[5:] == sorted(expected[5:], key=lambda t: (-counter[t], t))
    assert table["count"].tolist()[5:] == [counter[t] for t in vocab[5:]]
    assert "<unk>" in counter  # WikiText writes its own <unk>, which must map to id 0, not a new entry
    assert stats["vocab_size"] == len(vocab)


@pytest.mark.parametrize(("split", "source"), [("train", "valid"), ("valid", "test")])
def test_sample_arrays_decode_to_d2l(split: str, source: str, prepared_sample: tuple[Path, dict],
                                     shared_wikitext: Path) -> None:
    out, stats = prepared_sample
    vocab = vocab_of(out)
    expected = with_unk(d2l_paragraphs((shared_wikitext / f"wiki.{source}.tokens").read_text()), vocab)
    assert decode_split(out / split, vocab) == expected
    assert np.load(out / split / "tokens.npy").dtype == np.uint16
    tokens = [t for p in expected for s in p for t in s]
    titles = articles_with_paragraphs((shared_wikitext / f"wiki.{source}.tokens").read_text())
    assert stats[split] == {"lines": len((shared_wikitext / f"wiki.{source}.tokens").read_bytes().splitlines()),
                            "paragraphs": len(expected), "sentences": sum(map(len, expected)),
                            "tokens": len(tokens), "unk_tokens": tokens.count("<unk>"), "documents": titles,
                            "long_line_cuts": 0,
                            "byte_order_marks": 0, "unk_fraction": tokens.count("<unk>") / len(tokens),
                            "sentences_per_paragraph": sum(map(len, expected)) / len(expected)}


def articles_with_paragraphs(text: str) -> int:
    """Documents as the reader counts them: article titles (` = T = `) followed by a paragraph d2l keeps."""
    articles, open_article = 0, False
    for line in text.splitlines():
        if line.startswith(" = ") and not line.startswith(" = = "):
            open_article = True
        elif open_article and len(line.split(" . ")) >= 2:
            articles, open_article = articles + 1, False
    return articles


def test_metrics_keys(prepared_sample: tuple[Path, dict]) -> None:
    _, stats = prepared_sample
    assert set(stats) == {"tokenizer", "sentences", "layout", "vocab_size", "min_freq", "distinct_train_tokens",
                          "train", "valid"}
    assert (stats["tokenizer"], stats["sentences"], stats["layout"], stats["min_freq"]) == ("word", "wikitext",
                                                                                          "wikitext", 5)
    json.dumps(stats)  # metrics/prepare.json must be plain JSON


def test_small_shards_write_the_same_files(prepared_sample: tuple[Path, dict], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The training split is parked per shard and remapped later; many shards must not change a byte."""
    out, _ = prepared_sample
    monkeypatch.setattr(prep, "read_shards", functools.partial(read_shards, shard_bytes=64 << 10))
    prep.prepare(out.parent / "raw", tmp_path / "prepared", PrepareConfig(min_freq=5))
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "prepared") for p in (tmp_path / "prepared").rglob("*")
                           if p.is_file())
    for name in files:
        assert (tmp_path / "prepared" / name).read_bytes() == (out / name).read_bytes(), name


def test_a_vocabulary_that_leaves_most_text_unknown_is_a_one_line_warning(tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        _, stats = run_prepare(tmp_path, "a b . a b\n" * 5, valid="x y . z w . a\n", min_freq=5)
    assert stats["valid"]["unk_fraction"] == pytest.approx(4 / 5)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("valid split: 80% of its tokens are <unk> (prepare.min_freq = 5)") and "\n" not in warning


@pytest.mark.parametrize("tokenizer", ["word", "wordpiece"])
def test_metrics_count_the_cuts_in_long_lines(tokenizer: str, tmp_path: Path) -> None:
    """A document without line breaks is cut into lines of at most MAX_LINE_BYTES (whose pieces stay in
    its document); `long_line_cuts` says how often, and `lines` still counts the file's lines."""
    sentence = "The lobster grows slowly in cold water and is caught near rocks. "
    document = (sentence * (2 * MAX_LINE_BYTES // len(sentence) + 10)).strip()  # 2 to 3 times the limit
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train.txt").write_text(f"{document}\nA second paragraph.\n\nThe next document. It is short.\n")
    (raw / "valid.txt").write_text("One paragraph. Two sentences.\n")
    stats = prep.prepare(raw, tmp_path / "prepared", PrepareConfig(sentences="sentencex", tokenizer=tokenizer,
                                                                  min_freq=1, vocab_size=200))
    assert stats["train"]["long_line_cuts"] == 2 and stats["valid"]["long_line_cuts"] == 0
    assert (stats["train"]["lines"], stats["train"]["paragraphs"], stats["train"]["documents"]) == (4, 5, 2)
