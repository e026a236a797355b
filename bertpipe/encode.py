"""Text to BERT vectors and masked-word predictions, tokenized exactly as the pipeline reads its corpus.

Text becomes tokens by `bertpipe.vocab`'s rule, the one the corpus reader and the exported Hugging
Face tokenizer follow (lowercase, whitespace split, reserved tokens such as `<mask>` split off
wherever they stand); tokens outside the vocabulary become `<unk>`. An input is built as d2l's `get_tokens_and_segments`
does: `<cls> a <sep>` or `<cls> a <sep> b <sep>`, segments 0 then 1. Unlike d2l's
`get_bert_encoding`, which runs the network with dropout on, the model runs in eval mode under
`torch.no_grad()`, so the same text always gives the same vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bertpipe.errors import PipelineError
from bertpipe.model import BertForPreTraining
from bertpipe.vocab import CLS, MASK, SEP, UNK, split_words


class EncodeError(PipelineError):
    """Text the model cannot take: empty, too long for its position table, or lacking a <mask>."""


class Vocab:
    """The vocabulary in id order and its reverse index."""

    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens = list(tokens)
        self.index = {token: i for i, token in enumerate(self.tokens)}
        self.unk_id = self.index[UNK]

    def __len__(self) -> int:
        return len(self.tokens)

    def id(self, word: str) -> int:
        return self.index.get(word, self.unk_id)


@dataclass(frozen=True)
class Encoding:
    """One model input. `words` is what each position read (lowercased), `<cls>`/`<sep>` included."""

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
        vocab: the model's vocabulary.
        sentences: one or two sentences, each needing at least one word.
        max_len: the model's position table size (`max_position_embeddings`).
    """
    if not 1 <= len(sentences) <= 2:
        raise EncodeError(f"expected one sentence or a pair, got {len(sentences)}")
    words, segments = [CLS], [0]
    for segment, sentence in enumerate(sentences):
        split = split_words(sentence)
        if not split:
            raise EncodeError(f"empty input: sentence {segment + 1} has no words")
        words += [*split, SEP]
        segments += [segment] * (len(split) + 1)
    if len(words) > max_len:
        raise EncodeError(f"the input is {len(words)} tokens with <cls> and <sep>, "
                          f"more than the model's {max_len} positions")
    ids = tuple(vocab.id(w) for w in words)
    return Encoding(tuple(words), ids, tuple(segments), tuple(i == vocab.unk_id for i in ids))


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
    """The `top_k` most probable words at each `<mask>` of a single input, by the MLM head."""
    mask_id = vocab.index[MASK]
    positions = [i for i, token_id in enumerate(encoding.ids) if token_id == mask_id]
    if not positions:
        raise EncodeError(f"the input has no {MASK} to fill")
    model.eval()
    out = model(*_tensors(encoding), masked_positions=torch.tensor(positions))
    top = out.mlm_logits.softmax(dim=-1).topk(min(top_k, len(vocab)), dim=-1)  # [N, k]
    return [Prediction(p, [vocab.tokens[i] for i in ids], probs)
            for p, ids, probs in zip(positions, top.indices.tolist(), top.values.tolist(), strict=True)]
