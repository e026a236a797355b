"""Sentences of text that is not WikiText's: `prepare.sentences: sentencex` or `lines`.

d2l splits WikiText's pre-tokenized lines on ` . ` (`bertpipe.data.corpus` does that on bytes); ordinary
text has no such spaces. Two other rules, both keeping every non-blank line:

- `sentencex`: each line (a paragraph) is cut into sentences by Wikimedia's sentencex segmenter
  (https://github.com/wikimedia/sentencex), which knows the sentence-final punctuation and the common
  abbreviations of about 300 languages (`prepare.language`, an ISO 639 code; unknown codes fall back
  through its language chain to English) and needs no model download.
- `lines`: each line is one sentence, and a document's lines make one paragraph: the input format of
  Google's `create_pretraining_data.py` (one sentence per line, a blank line between documents).

WikiText's article headings (` = Title = `) start documents and are not text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sentencex


@dataclass
class SentenceLines:
    """A shard's sentences, one per line of `text`, grouped into paragraphs and documents."""

    text: str = ""
    paragraph_lengths: list[int] = field(default_factory=list)  # sentences per paragraph
    paragraph_documents: list[int] = field(default_factory=list)  # per paragraph: document starts before it
    documents: int = 0  # document starts in the whole shard


def split_sentences(text: str, layout: str, rule: str, language: str) -> SentenceLines:
    """The sentences of newline-terminated `text` (a shard of a split file of `layout`) under `rule`."""
    out, sentences = SentenceLines(), []
    in_paragraph = False  # `lines`: the document's paragraph is open
    for line in text.split("\n")[:-1]:
        if _starts_document(line, layout):
            out.documents += 1
            in_paragraph = False
            continue
        found = [line.strip()] if rule == "lines" else [s.strip() for s in sentencex.segment(language, line)]
        found = [s for s in found if s]
        if not found:
            continue
        if rule == "lines" and in_paragraph:
            out.paragraph_lengths[-1] += len(found)
        else:
            out.paragraph_lengths.append(len(found))
            out.paragraph_documents.append(out.documents)
            in_paragraph = True
        sentences += found
    out.text = "".join(s + "\n" for s in sentences)
    return out


def _starts_document(line: str, layout: str) -> bool:
    """WikiText: an article title ` = Title = ` (sections are ` = = Section = = `); else a blank line."""
    if layout != "wikitext":
        return line == ""
    return len(line) >= 7 and line.startswith(" = ") and line[3] != "=" and line.endswith(" = ")
