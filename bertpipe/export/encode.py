"""Text to BERT vectors and masked-word predictions, tokenized by the model's own `tokenizer.json`.

The tokenizer is the one the prepare stage built and the export stage hands to Hugging Face
(`bertpipe.data.tokenizer`): d2l's words (lowercase, whitespace split, reserved tokens such as `<mask>` split
off wherever they stand) or BERT's WordPiece (`[MASK]`, `##` pieces), so `bertpipe encode` and
`fill-mask` read text exactly as `AutoTokenizer.from_pretrained` does. An input is built as d2l's
`get_tokens_and_segments` does: `<cls> a <sep>` or `<cls> a <sep> b <sep>`, segments 0 then 1. Unlike
d2l's `get_bert_encoding`, which runs the network with dropout on, the model runs in eval mode under
`torch.no_grad()`, so the same text always gives the same vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import tokenizers
import torch
from tokenizers import Tokenizer

from bertpipe.data.tokenizer import tokens_in_order
from bertpipe.errors import PipelineError
from bertpipe.model.bert import BertForPreTraining
from bertpipe.vocab import CLS_ID, MASK_ID, SEP_ID, UNK_ID, specials_in


class EncodeError(PipelineError):
    """Text the model cannot take: empty, too long for its position table, or lacking a mask token."""


class Vocab:
    """A tokenizer with its vocabulary in id order, its reverse index and its reserved tokens: `specials` in role
    order (unknown, padding, mask, classifier, separator) and `special_ids` their ids, 0..4 in bertpipe's
    numbering, wherever they stand in a continued pretraining's export (its checkpoint's numbering)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens = tokens_in_order(tokenizer)
        self.index = {token: i for i, token in enumerate(self.tokens)}
        self.specials = specials_in(self.tokens)
        self.special_ids = [self.index[token] for token in self.specials]
        self.unk_id, self.mask_id = self.special_ids[UNK_ID], self.special_ids[MASK_ID]
        self.mask_token = self.specials[MASK_ID]

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class Encoding:
    """One model input. `words` is the normalized word each position read (a reserved token: itself);
    the pieces of a word all read that word."""

    words: tuple[str, ...]
    ids: tuple[int, ...]
    segments: tuple[int, ...]
    is_unk: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def unknown_words(self) -> list[str]:
        return [w for w, unk in zip(self.words, self.is_unk, strict=True) if unk]


def encode(vocab: Vocab, sentences: Sequence[str], max_len: int) -> Encoding:
    """`<cls> a <sep> [b <sep>]` for one sentence or a pair.

    Args:
        vocab: the model's tokenizer and vocabulary.
        sentences: one or two sentences, each needing at least one token.
        max_len: the model's position table size (`max_position_embeddings`).
    """
    if not 1 <= len(sentences) <= 2:
        raise EncodeError(f"expected one sentence or a pair, got {len(sentences)}")
    for n, sentence in enumerate(sentences, 1):
        if not vocab.tokenizer.encode(sentence, add_special_tokens=False).ids:
            raise EncodeError(f"empty input: sentence {n} has no words")
    encoding = vocab.tokenizer.encode(*sentences)
    if len(encoding.ids) > max_len:
        raise EncodeError(f"the input is {len(encoding.ids)} tokens with {vocab.specials[CLS_ID]} and "
                          f"{vocab.specials[SEP_ID]}, more than the model's {max_len} positions")
    words = _words(vocab, encoding, sentences)
    is_unk = tuple(i == vocab.unk_id for i in encoding.ids)
    return Encoding(words, tuple(encoding.ids), tuple(encoding.type_ids), is_unk)


def _words(vocab: Vocab, encoding: tokenizers.Encoding, sentences: Sequence[str]) -> tuple[str, ...]:
    """The normalized text of the word each token belongs to (reserved tokens stand for themselves)."""
    spans: dict[tuple[int, int], tuple[int, int]] = {}
    for sequence, word, (start, end) in zip(encoding.sequence_ids, encoding.word_ids, encoding.offsets, strict=True):
        if sequence is not None and word is not None:
            first, last = spans.get((sequence, word), (start, end))
            spans[(sequence, word)] = (min(first, start), max(last, end))
    normalize = vocab.tokenizer.normalizer.normalize_str
    reserved = set(vocab.special_ids) - {vocab.unk_id}
    words = []
    for token_id, sequence, word in zip(encoding.ids, encoding.sequence_ids, encoding.word_ids, strict=True):
        if token_id in reserved or sequence is None or word is None:
            words.append(vocab.tokens[token_id])
        else:
            start, end = spans[(sequence, word)]
            words.append(normalize(sentences[sequence][start:end]).strip())
    return tuple(words)


def _tensors(encoding: Encoding) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of one: ids [1, T], segments [1, T], valid_lens [1]."""
    return torch.tensor([encoding.ids]), torch.tensor([encoding.segments]), torch.tensor([len(encoding)])


@torch.no_grad()
def contextual(model: BertForPreTraining, encoding: Encoding) -> torch.Tensor:
    """The encoder output [1, T, H] for one input (d2l's `encoded_X`); its row 0 is the `<cls>` vector.

    Switches the model to eval mode: dropout off, so the vectors are deterministic.
    """
    model.eval()
    return model(*_tensors(encoding)).sequence_output


@dataclass(frozen=True)
class Prediction:
    position: int
    tokens: list[str]
    probabilities: list[float]


@torch.no_grad()
def fill_mask(model: BertForPreTraining, vocab: Vocab, encoding: Encoding, top_k: int) -> list[Prediction]:
    """The `top_k` most probable tokens at each mask of a single input, by the MLM head; a reserved token
    is never an answer (probabilities are the softmax over the whole vocabulary, as Hugging Face's
    fill-mask pipeline gives them)."""
    positions = [i for i, token_id in enumerate(encoding.ids) if token_id == vocab.mask_id]
    if not positions:
        raise EncodeError(f"the input has no {vocab.mask_token} to fill")
    model.eval()
    out = model(*_tensors(encoding), masked_positions=torch.tensor(positions))
    probabilities = out.mlm_logits.softmax(dim=-1)  # [N, V]
    probabilities[:, vocab.special_ids] = -1.0  # below every real probability: never in the top k
    top = probabilities.topk(min(top_k, len(vocab) - len(vocab.specials)), dim=-1)  # [N, k]
    return [Prediction(p, [vocab.tokens[i] for i in ids], probs)
            for p, ids, probs in zip(positions, top.indices.tolist(), top.values.tolist(), strict=True)]
