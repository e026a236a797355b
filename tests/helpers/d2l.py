"""d2l's reading of WikiText in plain Python (its paragraph shuffle left out): the reference the corpus
reader and the prepare stage are held to (test_corpus, test_prepare)."""

from __future__ import annotations

import io
import re

from bertpipe.vocab import SPECIAL_TOKENS

Paragraphs = list[list[list[str]]]


def d2l_paragraphs(text: str) -> Paragraphs:
    """d2l's paragraphs of sentences of words, from the text of a file as `open(path, 'r')` reads it."""
    lines = io.StringIO(text, newline=None).readlines()
    lower = "".join(c.lower() for c in text)  # lower-casing maps characters one to one or one to many
    lower_lines = io.StringIO(lower, newline=None).readlines()
    paragraphs = [low.strip().split(" . ") for line, low in zip(lines, lower_lines, strict=True)
                  if len(line.split(" . ")) >= 2]
    return [[reserved_split(sentence.split()) for sentence in paragraph] for paragraph in paragraphs]


def reserved_split(words: list[str]) -> list[str]:
    pattern = "(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")"
    return [piece for word in words for piece in re.split(pattern, word) if piece]
