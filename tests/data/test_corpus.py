"""Tests for bertpipe/data/corpus.py: the vectorised reader must split text exactly as d2l's `_read_wiki` does.

The reference (tests/helpers/d2l.py) is d2l's code in plain Python (its paragraph shuffle left out): a paragraph
is a line with `len(line.split(' . ')) >= 2`, its sentences `line.strip().lower().split(' . ')`,
their words `sentence.split()`; lines come from a file opened in text mode (universal newlines).
With bertpipe.vocab's two documented differences: characters lowercase one at a time (no final
sigma), and reserved tokens glued to other characters are split off.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from helpers.d2l import Paragraphs, d2l_paragraphs

from bertpipe.data.corpus import Reading, Shard, read_shards, tokenize
from bertpipe.data.lines import MAX_LINE_BYTES
from bertpipe.data.words import BERT, whitespace_mask
from bertpipe.errors import DataError
from bertpipe.vocab import PY_WHITESPACE


def decode(shards: Iterable[Shard]) -> Paragraphs:
    """Our shards turned back into d2l's nested lists, shards concatenated."""
    paragraphs: Paragraphs = []
    for shard in shards:
        words = shard.words.to_pylist()
        tokens = [words[i] for i in shard.word_ids]
        sentences, start = [], 0
        for n in shard.sentence_lengths:
            sentences.append(tokens[start:start + n])
            start += n
        start = 0
        for n in shard.paragraph_lengths:
            paragraphs.append(sentences[start:start + n])
            start += n
    return paragraphs


def read_file(path: Path, shard_bytes: int | None = None) -> Paragraphs:
    return decode(read_shards(path) if shard_bytes is None else read_shards(path, shard_bytes=shard_bytes))


def test_reference_on_a_plain_line() -> None:
    assert d2l_paragraphs("A b . c d . e\n") == [[["a", "b"], ["c", "d"], ["e"]]]


CORPORA: dict[str, str] = {
    "sentence-split": "a b . c d . e\n x y . z\n",
    "one-sentence-lines-dropped": "only one sentence here\nx . y\n",
    "wikitext-blank-and-title-lines": " \n = Title = \n \n The cat sat . It left . \n",
    "lowercase": "Ab . CD ÉTÉ\nİstanbul . ΑΣ Σ\n",
    "reserved-tokens": "<unk> a<unk>b . <MASK>, <cls><sep> . <<mask>>\nx<pad> . y\n",
    "python-whitespace": "a\tb . c\xa0d . e\u3000f\x0bg\x0ch\x1ci\x85j\u2028k\n",
    "tab-around-dot-is-no-break": "a\t.\tb\na\t. b . c\n",
    "overlapping-dot-runs": "a . . . b . . c\n. . . .\na . . . . b\n",
    "leading-and-trailing-breaks": " . a . b . \n . x\ny . \n",
    "empty-sentences": "a .  . b\na .   . \t . c\n",
    "crlf-and-cr": "a . b\r\nc d . e\rf . g\r\n",
    "no-final-newline": "a . b\nc . d",
}


@pytest.mark.parametrize("case", list(CORPORA))
def test_read_matches_d2l(case: str, tmp_path: Path) -> None:
    path = tmp_path / "wiki.tokens"
    path.write_bytes(CORPORA[case].encode("utf-8"))
    expected = d2l_paragraphs(CORPORA[case])
    assert read_file(path) == expected
    assert read_file(path, shard_bytes=3) == expected


def test_lowercase_follows_python_even_when_it_changes_length() -> None:
    assert "İ".lower() == "i\u0307"
    assert decode([tokenize("İstanbul . x\n".encode())]) == [[["i\u0307stanbul"], ["x"]]]


def test_whitespace_table_is_pythons() -> None:
    assert "".join(chr(c) for c in range(0x110000) if chr(c).isspace()) == PY_WHITESPACE


def test_random_short_strings_match_d2l() -> None:
    rng = random.Random(0)
    alphabet = [" ", ".", " . ", "a", "B", "\t", "\xa0", "İ", "Σ", "\n", "x", "\u2028", "<unk>", "<MASK>", "<"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) + "\n"
        assert decode([tokenize(text.encode())]) == d2l_paragraphs(text), repr(text)


def test_real_valid_split_matches_d2l(shared_wikitext: Path) -> None:
    path = shared_wikitext / "wiki.valid.tokens"
    expected = d2l_paragraphs(path.read_text(encoding="utf-8"))
    assert len(expected) > 1000
    assert read_file(path) == expected


def test_small_shards_give_the_same_result(shared_wikitext: Path) -> None:
    path = shared_wikitext / "wiki.valid.tokens"
    shards = list(read_shards(path, shard_bytes=4096))
    assert len(shards) > 100
    assert sum(shard.nbytes for shard in shards) == path.stat().st_size
    assert sum(shard.lines for shard in shards) == 3760
    assert decode(shards) == read_file(path)


@pytest.mark.parametrize(("data", "offset"), [(b"a . b\n" * 1000 + b"c \xff d\n", 6002),
                                              (b"a . b\n" * 1000 + b"x\xc3( . y\n", 6001),
                                              (b"\x80a . b\n", 0)])
def test_non_utf8_names_file_and_offset(data: bytes, offset: int, tmp_path: Path) -> None:
    path = tmp_path / "wiki.train.tokens"
    path.write_bytes(data)
    with pytest.raises(DataError) as info:
        read_file(path, shard_bytes=4096)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    assert f"offset {offset})" in message


def test_ascii_whitespace_is_pythons() -> None:
    """The byte comparisons in words.whitespace_mask name the ASCII characters str.isspace() accepts."""
    every_byte = np.arange(128, dtype=np.uint8)
    assert whitespace_mask(every_byte).tolist() == [chr(b).isspace() for b in range(128)]


def test_berts_whitespace_leaves_out_the_control_characters_it_deletes() -> None:
    """WordPiece's words are cut where BertNormalizer sees whitespace: \\x0b, \\x1c..\\x1f and \\x85 it deletes."""
    every_byte = np.arange(128, dtype=np.uint8)
    expected = [chr(b).isspace() and b not in (0x0B, 0x0C, 0x1C, 0x1D, 0x1E, 0x1F) for b in range(128)]
    assert whitespace_mask(every_byte, BERT).tolist() == expected
    nel = np.frombuffer("a\x85b\xa0c".encode(), dtype=np.uint8)  # U+0085 is deleted, U+00A0 is whitespace
    assert whitespace_mask(nel, BERT).tolist() == [False, False, False, False, True, True, False]


def english(sentences: int, seed: int = 0) -> list[str]:
    """Sentences of a few lowercase words, each starting with a capital and ending in `.`, `!` or `?`."""
    rng = random.Random(seed)
    vocabulary = ["the", "lobster", "grows", "slowly", "in", "cold", "water", "and", "is", "caught", "near", "rocks"]
    return [" ".join([rng.choice(vocabulary).capitalize(), *rng.choices(vocabulary, k=rng.randint(4, 14))])
            + rng.choice(".!?") for _ in range(sentences)]


SENTENCEX = Reading("documents", "sentencex", tokens="raw")


def document_ids(shards: list[Shard]) -> list[int]:
    """Per paragraph, the document starts before it in the whole file."""
    ids, before = [], 0
    for shard in shards:
        ids += (before + shard.paragraph_documents).tolist()
        before += shard.documents
    return ids


def test_a_line_longer_than_a_shard_is_read_shard_by_shard(tmp_path: Path) -> None:
    """1 MB without a line break: progress moves per shard, and no paragraph is longer than MAX_LINE_BYTES."""
    path = tmp_path / "train.txt"
    path.write_text(" ".join(english(20000)) + "\n", encoding="utf-8")
    size = path.stat().st_size
    assert size > 1_000_000
    shards = list(read_shards(path, SENTENCEX, shard_bytes=256 << 10))
    assert len(shards) >= 4 and all(shard.nbytes <= 2 * (256 << 10) for shard in shards)
    assert sum(shard.nbytes for shard in shards) == size
    assert sum(shard.lines for shard in shards) == 1
    assert sum(shard.long_line_cuts for shard in shards) >= size // MAX_LINE_BYTES
    for paragraph in decode(shards):
        words = [word for sentence in paragraph for word in sentence]
        assert sum(len(word.encode()) + 1 for word in words) - 1 <= MAX_LINE_BYTES  # a space at least between words


def test_one_long_line_reads_as_its_paragraphs(tmp_path: Path) -> None:
    """The same text as one line and as paragraphs: the same sentences, as cuts fall on sentence ends."""
    sentences = english(6000, seed=1)
    (tmp_path / "line.txt").write_text(" ".join(sentences) + "\n", encoding="utf-8")
    (tmp_path / "paragraphs.txt").write_text("".join(" ".join(sentences[i:i + 5]) + "\n"
                                                     for i in range(0, len(sentences), 5)), encoding="utf-8")
    line = list(read_shards(tmp_path / "line.txt", SENTENCEX, shard_bytes=64 << 10))
    paragraphs = list(read_shards(tmp_path / "paragraphs.txt", SENTENCEX, shard_bytes=64 << 10))
    assert sum(shard.long_line_cuts for shard in line) > 5 and not any(shard.long_line_cuts for shard in paragraphs)
    as_line = [sentence for paragraph in decode(line) for sentence in paragraph]
    assert as_line == [sentence for paragraph in decode(paragraphs) for sentence in paragraph]
    assert len(as_line) == len(sentences)


def test_a_cut_line_stays_in_its_document(tmp_path: Path) -> None:
    """Cuts (inside shards and where the line runs past one) never start a document (a blank line)."""
    path = tmp_path / "train.txt"
    path.write_text(" ".join(english(1500)) + "   \nA short paragraph here.\n\nThe next document.\n", encoding="utf-8")
    shards = list(read_shards(path, SENTENCEX, shard_bytes=40 << 10))
    cuts = sum(shard.long_line_cuts for shard in shards)
    assert len(shards) > 1 and cuts > 1
    assert document_ids(shards) == [0] * (cuts + 2) + [1]
    assert sum(shard.lines for shard in shards) == 4


def test_a_long_line_leaves_wikitext_headings_alone(tmp_path: Path) -> None:
    """WikiText's layout: a cut piece never starts with a space, so never reads as a ` = Title = ` heading."""
    long_line = " " + " . ".join(" ".join(sentence.rstrip(".!?").split()) for sentence in english(1200)) + " = X = "
    path = tmp_path / "wiki.train.tokens"
    path.write_text(f" = First = \n \n{long_line}\n \n = Second = \n \n a b . c d \n", encoding="utf-8")
    shards = list(read_shards(path, shard_bytes=40 << 10))
    cuts = sum(shard.long_line_cuts for shard in shards)
    assert cuts > 1 and sum(shard.documents for shard in shards) == 2
    assert document_ids(shards) == [1] * (cuts + 1) + [2]
