"""Which token spans make an example's sentence A and B: d2l's sentence pairs or Google's segments; or,
for MLM alone, RoBERTa's single segments (`single_segments`).

`sentence_pairs` is the seed's reading (d2l's `_get_nsp_data_from_paragraph`): each sentence and
the next one of its paragraph, or with probability 0.5 a sentence drawn as
`random.choice(random.choice(paragraphs))`; pairs longer than `max_len` are skipped. Its examples
average 46 tokens, so at `max_len` 512 nearly 90% of every batch would be padding.

`segment_pairs` is Google's `create_pretraining_data.py`: consecutive sentences of a document (a
WikiText article) fill a segment up to a target length (`max_len` - 3, or with probability
`short_seq_prob` a shorter random one), split at a random sentence into A and B; with probability
0.5 (always when the chunk is one sentence) B is instead read from a random place in another
document and the unused sentences go back; the longer side is truncated, a token at a time from
the front or back at random, until the pair fits. Sentences of a split are contiguous in its token
array, so every A and B is one span of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from bertpipe.data.prepared_folder import Corpus


@dataclass(frozen=True)
class Pairs:
    """Candidate examples as token spans: a = tokens[a_start:a_start+a_len], likewise b; `a_sentence` and
    `b_sentence` are the sentences each side starts from (before any truncation)."""

    a_start: np.ndarray
    a_len: np.ndarray
    b_start: np.ndarray
    b_len: np.ndarray
    is_next: np.ndarray
    a_sentence: np.ndarray
    b_sentence: np.ndarray

    def __len__(self) -> int:
        return len(self.a_start)

    def rows(self, start: int, stop: int) -> Pairs:
        return Pairs(*(getattr(self, f.name)[start:stop] for f in fields(self)))


def negative_origins(corpus: Corpus, pairs: Pairs) -> dict[str, int]:
    """Where each NSP negative's B comes from, seen from its A: the same document, the same paragraph,
    or right after A (then the pair is mislabelled: B does follow A). Also how many documents there are.

    d2l draws B from a random paragraph of the whole split, Google's code from another document; both
    assume many documents and paragraphs, which a small or heading-less corpus does not have.
    """
    negative = ~pairs.is_next
    po = np.asarray(corpus.paragraph_offsets)
    paragraph_of = np.repeat(np.arange(len(po) - 1, dtype=np.int32), np.diff(po))  # per sentence
    documents = corpus.documents()
    document_of = np.repeat(np.arange(len(documents) - 1, dtype=np.int32), np.diff(documents))  # per paragraph
    a_paragraph, b_paragraph = paragraph_of[pairs.a_sentence[negative]], paragraph_of[pairs.b_sentence[negative]]
    a_document, b_document = document_of[a_paragraph], document_of[b_paragraph]
    follows = pairs.b_start[negative] == pairs.a_start[negative] + pairs.a_len[negative]
    return {"documents": len(documents) - 1, "negatives": int(negative.sum()),
            "negatives_same_document": int((a_document == b_document).sum()),
            "negatives_same_paragraph": int((a_paragraph == b_paragraph).sum()),
            "negatives_actually_next": int(follows.sum())}


def sentence_pairs(corpus: Corpus, rng: np.random.Generator, max_len: int) -> Pairs:
    """d2l's `_get_nsp_data_from_paragraph` over every paragraph, in corpus order."""
    so, po = np.asarray(corpus.sentence_offsets), np.asarray(corpus.paragraph_offsets)
    has_next = np.ones(len(so) - 1, dtype=bool)
    has_next[po[1:] - 1] = False
    a = np.flatnonzero(has_next)
    is_next = rng.random(len(a)) < 0.5
    paragraph = rng.integers(0, len(po) - 1, len(a))
    random_sentence = po[paragraph] + (rng.random(len(a)) * np.diff(po)[paragraph]).astype(np.int64)
    b = np.where(is_next, a + 1, random_sentence)
    a_len, b_len = so[a + 1] - so[a], so[b + 1] - so[b]
    keep = a_len + b_len + 3 <= max_len
    return Pairs(so[a][keep], a_len[keep], so[b][keep], b_len[keep], is_next[keep], a[keep], b[keep])


def segment_pairs(corpus: Corpus, rng: np.random.Generator, max_len: int, short_seq_prob: float) -> Pairs:
    """Google's instances over every document, in corpus order."""
    sentence_of_document = np.asarray(corpus.paragraph_offsets)[corpus.documents()]
    so = np.asarray(corpus.sentence_offsets)
    rows: list[tuple[int, int, int, int, bool, int, int]] = []
    for d in range(len(sentence_of_document) - 1):
        _document_instances(so, sentence_of_document, d, rng, max_len - 3, short_seq_prob, rows)
    a_start, a_len, b_start, b_len, is_next, a_sentence, b_sentence = (
        np.array(column, dtype=np.int64) for column in zip(*rows, strict=True))
    return Pairs(a_start, a_len, b_start, b_len, is_next.astype(bool), a_sentence, b_sentence)


def single_segments(corpus: Corpus, rng: np.random.Generator, max_len: int, short_seq_prob: float) -> Pairs:
    """Examples of one segment each, for MLM alone (`train.objective: mlm`): RoBERTa's DOC-SENTENCES (Liu et
    al. 2019, section 4.2), consecutive whole sentences of one document filling `<cls> a <sep>` up to
    `max_len`, a document's end ending a segment. The target is drawn once per document as Google's
    `create_instances_from_document` does (`max_len` - 2, or with probability `short_seq_prob` a shorter
    random one); a sentence that alone exceeds `max_len` - 2 is cut to it. Returned as pairs with an
    empty B."""
    documents = np.asarray(corpus.paragraph_offsets)[corpus.documents()]  # each document's first sentence, and the end
    so = np.asarray(corpus.sentence_offsets)
    max_tokens = max_len - 2
    short = rng.random(len(documents) - 1) < short_seq_prob
    target = np.where(short, rng.integers(2, max_tokens + 1, len(documents) - 1), max_tokens)
    first_sentence, end_sentence = _greedy_segments(so, documents, target)
    a_start = so[first_sentence]
    a_len = np.minimum(so[end_sentence] - a_start, max_tokens)
    keep = a_len > 0
    a_start, a_len, first_sentence = a_start[keep], a_len[keep], first_sentence[keep]
    empty = np.zeros(len(a_start), dtype=np.int64)
    return Pairs(a_start, a_len, a_start, empty, np.ones(len(a_start), dtype=bool), first_sentence, first_sentence)


def _greedy_segments(so: np.ndarray, documents: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each document's sentences cut greedily into segments of at most target[d] tokens (a sentence longer than
    that alone is one segment): (first sentence, end sentence) of every segment, in corpus order.

    Where a segment starting at a sentence ends is known for every sentence at once (`searchsorted` on the sentence
    offsets); the segments are the sentences reached from a document's first by those jumps. They are found by
    pointer doubling: each round marks what the marked sentences reach by 2**k jumps, then doubles the jump, so the
    rounds are log2 of the most segments in a document, whether a corpus is one document or millions.
    """
    sentences = len(so) - 1
    per_sentence = np.diff(documents)
    end = np.minimum(np.maximum(np.searchsorted(so, so[:-1] + np.repeat(target, per_sentence), side="right") - 1,
                                np.arange(1, sentences + 1)), np.repeat(documents[1:], per_sentence))
    jump = np.append(end, sentences)  # past the last sentence every path stops
    start = np.zeros(sentences + 1, dtype=bool)
    start[documents] = True
    while True:
        reached = start.copy()
        reached[jump[start]] = True
        if np.array_equal(reached, start):
            break
        start, jump = reached, jump[jump]
    first_sentence = np.flatnonzero(start[:-1])
    return first_sentence, end[first_sentence]


def _document_instances(so: np.ndarray, documents: np.ndarray, d: int, rng: np.random.Generator, max_tokens: int,
                        short_seq_prob: float, rows: list) -> None:
    """Google's `create_instances_from_document` for document `d`, appending (a, b) spans to `rows`."""
    first, end = int(documents[d]), int(documents[d + 1])
    target = max_tokens if rng.random() >= short_seq_prob else int(rng.integers(2, max_tokens + 1))
    chunk, i = first, first
    while i < end:
        if i == end - 1 or so[i + 1] - so[chunk] >= target:
            sentences = i + 1 - chunk
            a_end = chunk + (1 if sentences < 2 else int(rng.integers(1, sentences)))
            a = (int(so[chunk]), int(so[a_end] - so[chunk]))
            if sentences == 1 or rng.random() < 0.5:
                b, b_sentence = _random_span(so, documents, d, rng, target - a[1])
                i = a_end - 1  # the unused sentences of the chunk start the next one
                is_next = False
            else:
                b, b_sentence, is_next = (int(so[a_end]), int(so[i + 1] - so[a_end])), a_end, True
            rows.append((*_truncate(a, b, max_tokens, rng), is_next, chunk, b_sentence))
            chunk = i + 1
        i += 1


def _random_span(so: np.ndarray, documents: np.ndarray, d: int, rng: np.random.Generator,
                 target: int) -> tuple[tuple[int, int], int]:
    """Sentences of another document from a random one on, until they hold `target` tokens: the span
    (token start, length) and its first sentence."""
    n = len(documents) - 1
    other = d if n == 1 else int(rng.integers(0, n - 1))
    other += other >= d and n > 1
    first, end = int(documents[other]), int(documents[other + 1])
    start = int(rng.integers(first, end))
    stop = min(max(start + 1, int(np.searchsorted(so, so[start] + target))), end)
    return (int(so[start]), int(so[stop] - so[start])), start


def _truncate(a: tuple[int, int], b: tuple[int, int], max_tokens: int,
              rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Google's `truncate_seq_pair`: trim the longer side (B on a tie) until the pair fits, each token
    from the front or the back with equal odds; returns a_start, a_len, b_start, b_len."""
    (a_start, a_len), (b_start, b_len) = a, b
    excess = a_len + b_len - max_tokens
    if excess <= 0:
        return a_start, a_len, b_start, b_len
    gap = a_len - b_len
    first = min(excess, abs(gap))  # from the longer side until both are as long
    rest = excess - first  # then one each, B first
    cut_a = (first if gap > 0 else 0) + rest // 2
    cut_b = (first if gap < 0 else 0) + rest - rest // 2
    front_a, front_b = int(rng.binomial(cut_a, 0.5)), int(rng.binomial(cut_b, 0.5))
    return a_start + front_a, a_len - cut_a, b_start + front_b, b_len - cut_b
