"""`prepare.sentences` on text that is not WikiText's (bertpipe/data/sentences.py, through bertpipe.data.corpus).

`sentencex` must cut ordinary punctuation in several languages and keep abbreviations whole; `lines`
must read Google's input format (one sentence per line, a blank line between documents); WikiText's
headings start documents and are never text; and a corpus whose sentences cannot be told apart stops
the examples stage with one line naming what to change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bertpipe.config import ExamplesConfig, PrepareConfig
from bertpipe.data.corpus import Reading, tokenize
from bertpipe.data.examples import build_examples
from bertpipe.data.prepare import prepare
from bertpipe.data.sentences import split_sentences
from bertpipe.errors import DataError


def sentences(text: str, layout: str = "documents", rule: str = "sentencex", language: str = "en") -> list[str]:
    return split_sentences(text, layout, rule, language).text.splitlines()


@pytest.mark.parametrize(("language", "text", "expected"), [
    ("en", "Mr. Smith went to Washington. He arrived at 3 p.m. on Monday! Really?",
     ["Mr. Smith went to Washington.", "He arrived at 3 p.m. on Monday!", "Really?"]),
    ("de", "Dr. Müller kam um 3 Uhr. Er ging z. B. nach Hause.",
     ["Dr. Müller kam um 3 Uhr.", "Er ging z. B. nach Hause."]),
    ("ja", "今日は晴れです。明日は雨でしょう！本当？", ["今日は晴れです。", "明日は雨でしょう！", "本当？"]),
    ("el", "Αυτό είναι ένα. Και δεύτερο;", ["Αυτό είναι ένα.", "Και δεύτερο;"]),
])
def test_sentencex_cuts_sentences_in_any_language(language: str, text: str, expected: list[str]) -> None:
    assert sentences(text + "\n", language=language) == expected


def test_documents_paragraphs_and_sentences_are_counted() -> None:
    split = split_sentences("One. Two.\nThree.\n\nFour. Five. Six.\n", "documents", "sentencex", "en")
    assert (split.paragraph_lengths, split.paragraph_documents, split.documents) == ([2, 1, 3], [0, 0, 1], 1)


def test_lines_make_one_paragraph_per_document() -> None:
    split = split_sentences("a b c\nd e. f g\n\nh i\nj\n", "documents", "lines", "en")
    assert split.text == "a b c\nd e. f g\nh i\nj\n"
    assert (split.paragraph_lengths, split.paragraph_documents) == ([2, 2], [0, 1])


def test_wikitext_headings_start_documents_and_are_not_text() -> None:
    text = (" = Crane = \n \n The crane flies . It lands .\n \n = = Habitat = = \n It lives here .\n = Bird = \n"
            " A bird .\n")
    split = split_sentences(text, "wikitext", "sentencex", "en")
    assert split.text.splitlines() == ["The crane flies .", "It lands .", "= = Habitat = =", "It lives here .",
                                       "A bird ."]
    assert (split.paragraph_documents, split.documents) == ([1, 1, 1, 2], 2)


def test_the_corpus_reader_gives_words_of_the_found_sentences() -> None:
    shard = tokenize(b"Hello world. Second one here!\n\nNext doc.\n", Reading("documents", "sentencex"))
    words = shard.words.to_pylist()
    assert [words[i] for i in shard.word_ids] == ["hello", "world.", "second", "one", "here!", "next", "doc."]
    assert shard.sentence_lengths.tolist() == [2, 3, 2] and shard.paragraph_lengths.tolist() == [2, 1]
    assert shard.paragraph_documents.tolist() == [0, 1]


def write_documents(raw: Path, train: str, valid: str) -> Path:
    raw.mkdir(parents=True)
    (raw / "train.txt").write_text(train, encoding="utf-8")
    (raw / "valid.txt").write_text(valid, encoding="utf-8")
    return raw


def test_prepare_reports_sentences_per_paragraph(tmp_path: Path) -> None:
    raw = write_documents(tmp_path / "raw", "The cat sat. The dog ran. It rained.\nBirds sing.\n\nRain falls. Wind "
                                            "blows.\n", "The cat sat. The dog ran.\n")
    metrics = prepare(raw, tmp_path / "prepared", PrepareConfig(sentences="sentencex", min_freq=1))
    assert (metrics["train"]["paragraphs"], metrics["train"]["sentences"], metrics["train"]["documents"]) == (3, 6, 2)
    assert metrics["train"]["sentences_per_paragraph"] == 2.0 and metrics["sentences"] == "sentencex"
    offsets = np.load(tmp_path / "prepared" / "train" / "document_offsets.npy")
    assert offsets.tolist() == [0, 2, 3]


def test_ordinary_text_under_the_wikitext_rule_is_one_line_naming_the_key(tmp_path: Path) -> None:
    raw = write_documents(tmp_path / "raw", "A crane. It flies.\n", "A crane. It flies.\n")
    with pytest.raises(DataError) as caught:
        prepare(raw, tmp_path / "prepared", PrepareConfig())
    assert "prepare.sentences = 'wikitext' splits only WikiText's" in str(caught.value)
    assert "prepare.sentences: sentencex" in str(caught.value) and "\n" not in str(caught.value)


def test_a_corpus_without_a_sentence_pair_stops_the_examples_stage(tmp_path: Path) -> None:
    """One sentence per paragraph (a list of headlines): no true next sentence to pair."""
    raw = write_documents(tmp_path / "raw", "A crane flies.\nA bird sings.\n\nRain falls.\n", "A crane flies.\n")
    prepare(raw, tmp_path / "prepared", PrepareConfig(sentences="sentencex", min_freq=1))
    with pytest.raises(DataError) as caught:
        build_examples(tmp_path / "prepared", tmp_path / "examples", ExamplesConfig(), seed=0)
    message = str(caught.value)
    assert "has no paragraph of two sentences, so examples.strategy = sentence-pairs finds no sentence pair" in message
    assert "prepare.sentences: sentencex or lines" in message and not (tmp_path / "examples").exists()
