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

import itertools
from dataclasses import dataclass, fields

import numpy as np

from bertpipe.data.prepared_folder import Corpus

# Sentences handled at once, so the per-sentence arrays stay tens of MB. Google's segments draw their random
# numbers a block at a time, so the examples of a seed depend on it: a constant, not a setting.
BLOCK_SENTENCES = 1 << 20


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
    or right after A (then the pair is mislabelled: B does follow A).

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
    return {"negatives": int(negative.sum()),
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
    """Google's instances over every document, in corpus order (`create_instances_from_document`, vectorised: see
    `google_chunks`), a block of whole documents at a time."""
    documents = np.asarray(corpus.paragraph_offsets)[corpus.documents()]  # each document's first sentence, and the end
    so = np.asarray(corpus.sentence_offsets)
    max_tokens = max_len - 3
    targets = _targets(rng, len(documents) - 1, max_tokens, short_seq_prob)
    blocks = []
    for lo, hi in _blocks(documents):
        sentences = int(documents[hi] - documents[lo])
        chunks = google_chunks(so, documents[lo:hi + 1], targets[lo:hi], rng.random(sentences), rng.random(sentences))
        blocks.append(_instances(so, documents, chunks, rng, max_tokens))
    return Pairs(*(np.concatenate([getattr(block, f.name) for block in blocks]) for f in fields(Pairs)))


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
    targets = _targets(rng, len(documents) - 1, max_tokens, short_seq_prob)
    cuts = [_greedy_segments(so, documents[lo:hi + 1], targets[lo:hi]) for lo, hi in _blocks(documents)]
    first_sentence, end_sentence = (np.concatenate(column) for column in zip(*cuts, strict=True))
    a_start = so[first_sentence]
    a_len = np.minimum(so[end_sentence] - a_start, max_tokens)
    keep = a_len > 0
    a_start, a_len, first_sentence = a_start[keep], a_len[keep], first_sentence[keep]
    empty = np.zeros(len(a_start), dtype=np.int64)
    return Pairs(a_start, a_len, a_start, empty, np.ones(len(a_start), dtype=bool), first_sentence, first_sentence)


def _greedy_segments(so: np.ndarray, documents: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sentences documents[0]:documents[-1] of each document cut greedily into segments of at most targets[d]
    tokens (a sentence longer than that alone is one segment): (first sentence, end sentence) of every segment, in
    corpus order. Where a segment starting at a sentence ends is known for every sentence at once
    (`searchsorted` on the sentence offsets); the segments start at the sentences those ends reach (`_reached`)."""
    start = int(documents[0])
    c = np.arange(start, int(documents[-1]))
    per_sentence = np.diff(documents)
    fits = np.searchsorted(so, so[c] + np.repeat(targets, per_sentence), side="right") - 1  # c:fits hold <= target
    end = np.minimum(np.maximum(fits, c + 1), np.repeat(documents[1:], per_sentence))
    first = _reached(documents - start, end - start) + start
    return first, end[first - start]


@dataclass(frozen=True)
class Chunks:
    """Google's chunks of one block of documents: per chunk its first sentence, where A ends (the first sentence
    after it), its last sentence, whether B is drawn from another document, and the target of its document."""

    first: np.ndarray
    a_end: np.ndarray
    last: np.ndarray
    random_b: np.ndarray
    target: np.ndarray


def google_chunks(so: np.ndarray, documents: np.ndarray, targets: np.ndarray, split: np.ndarray,
                  coin: np.ndarray) -> Chunks:
    """The chunks of `create_instances_from_document` over documents[0]:documents[-1] (sentence indices).

    Google's loop adds sentences to a chunk until it holds `target` tokens or the document ends, splits it into A
    and B at a random sentence, and (always for a one-sentence chunk, else with probability 0.5) draws B from
    another document and gives the chunk's sentences after A back, so the next chunk starts where A ended. Which
    sentence a chunk starting at sentence c ends with, where it splits and whether it gives sentences back depend
    on c alone, given one uniform draw each (`split[c]`, `coin[c]`, per sentence of the block): so the next chunk's
    start is known for every sentence at once, and the chunks are the sentences reached from each document's first
    (`_reached`).
    """
    start = int(documents[0])
    c = np.arange(start, int(documents[-1]))
    per_sentence = np.diff(documents)
    target, doc_end = np.repeat(targets, per_sentence), np.repeat(documents[1:], per_sentence)
    last = np.minimum(np.searchsorted(so, so[c] + target, side="left") - 1, doc_end - 1)  # holds >= target tokens
    sentences = last + 1 - c
    a_end = c + 1 + (split * (sentences - 1)).astype(np.int64)  # 1 sentence, or uniform in [1, sentences - 1]
    random_b = (sentences == 1) | (coin < 0.5)
    first = _reached(documents - start, np.where(random_b, a_end, last + 1) - start) + start
    return Chunks(first, a_end[first - start], last[first - start], random_b[first - start],
                  target[first - start])


def _instances(so: np.ndarray, documents: np.ndarray, chunks: Chunks, rng: np.random.Generator,
               max_tokens: int) -> Pairs:
    """The pairs of `chunks`: A its sentences up to `a_end`; B the rest, or sentences of another document from a
    random one on holding what the target leaves (Google's `random_document`); then truncated to `max_tokens`."""
    a_start, a_len = so[chunks.first], so[chunks.a_end] - so[chunks.first]
    b_sentence, b_stop = chunks.a_end.copy(), chunks.last + 1
    drawn = np.flatnonzero(chunks.random_b)
    if len(drawn):
        own = np.searchsorted(documents, chunks.first[drawn], side="right") - 1
        n = len(documents) - 1
        other = own if n == 1 else rng.integers(0, n - 1, len(drawn))
        other += (other >= own) & (n > 1)
        b_sentence[drawn] = rng.integers(documents[other], documents[other + 1])
        wanted = chunks.target[drawn] - a_len[drawn]
        fills = np.searchsorted(so, so[b_sentence[drawn]] + wanted)
        b_stop[drawn] = np.minimum(np.maximum(b_sentence[drawn] + 1, fills), documents[other + 1])
    b_start, b_len = so[b_sentence], so[b_stop] - so[b_sentence]
    return Pairs(*_truncate(a_start, a_len, b_start, b_len, max_tokens, rng), ~chunks.random_b, chunks.first,
                 b_sentence)


def _targets(rng: np.random.Generator, documents: int, max_tokens: int, short_seq_prob: float) -> np.ndarray:
    """Each document's target length, as Google draws it: `max_tokens`, or with probability `short_seq_prob` a
    random one in [2, max_tokens]."""
    short = rng.random(documents) < short_seq_prob
    return np.where(short, rng.integers(2, max_tokens + 1, documents), max_tokens)


def _blocks(documents: np.ndarray) -> list[tuple[int, int]]:
    """Runs lo:hi of whole documents holding about BLOCK_SENTENCES sentences each (one longer document, alone)."""
    cuts = np.searchsorted(documents, np.arange(BLOCK_SENTENCES, int(documents[-1]), BLOCK_SENTENCES))
    bounds = np.unique(np.concatenate([[0], cuts, [len(documents) - 1]])).tolist()
    return list(itertools.pairwise(bounds))


def _reached(documents: np.ndarray, jump: np.ndarray) -> np.ndarray:
    """The sentences reached from each document's first sentence by `jump` (sentence i to jump[i] > i, at most the
    number of sentences, where every path stops), in order.

    Found by pointer doubling: each round marks what the marked sentences reach by 2**k jumps, then doubles the
    jump, so the rounds are log2 of the longest path (the most segments in a document), however many documents.
    """
    sentences = len(jump)
    jump = np.append(jump, sentences)
    marked = np.zeros(sentences + 1, dtype=bool)
    marked[documents] = True
    while True:
        reached = marked.copy()
        reached[jump[marked]] = True
        if np.array_equal(reached, marked):
            return np.flatnonzero(marked[:-1])
        marked, jump = reached, jump[jump]


def _truncate(a_start: np.ndarray, a_len: np.ndarray, b_start: np.ndarray, b_len: np.ndarray, max_tokens: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Google's `truncate_seq_pair` on each pair: trim the longer side (B on a tie) until the pair fits, each token
    from the front or the back with equal odds; returns a_start, a_len, b_start, b_len."""
    excess = np.maximum(a_len + b_len - max_tokens, 0)
    gap = a_len - b_len
    first = np.minimum(excess, np.abs(gap))  # from the longer side until both are as long
    rest = excess - first  # then one each, B first
    cut_a = np.where(gap > 0, first, 0) + rest // 2
    cut_b = np.where(gap < 0, first, 0) + rest - rest // 2
    front_a, front_b = rng.binomial(cut_a, 0.5), rng.binomial(cut_b, 0.5)
    return a_start + front_a, a_len - cut_a, b_start + front_b, b_len - cut_b
