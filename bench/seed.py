"""The seed: d2l's "Pretraining BERT" recipe (PyTorch, sections 15.8-15.10), re-implemented for comparisons only.

This file reproduces the behaviour of Dive into Deep Learning's BERT code (`d2l.BERTModel`,
`_WikiTextDataset`, `load_data_wiki`, `train_bert`), written from the book's description, so that
benchmarks and golden numbers can compare bertpipe against the recipe it started from; the model
is in bench/seed_model.py. Nothing in bertpipe imports either. It keeps the recipe's flaws on
purpose, because they are what is compared:

- the MLM loss is `nn.CrossEntropyLoss()` with its default mean over *every* prediction slot,
  padding included (label 0 = `<unk>`), then broadcast-multiplied by the weights and divided by
  their sum, which gives back that mean (d2l-en#2582): padded slots are trained to predict `<unk>`;
- the feed-forward blocks and the MLM head use ReLU, not GELU;
- `MaskLM` decodes all `max_num_mlm_preds` slots, padding included (gathered at position 0);
- the 10% "random token" replacement draws from the whole vocabulary, special tokens included;
- `get_bert_encoding` runs the model in whatever mode it is in, so dropout is on after training;
- there is no evaluation: `train_bert` reports only mean training losses.

The data lives as Python lists of strings and one small tensor per field per example, as in d2l.
Usage: python bench/seed.py --data FOLDER_WITH_wiki.train.tokens --steps 50 --seed 0
"""

from __future__ import annotations

import argparse
import collections
import random
import time
from pathlib import Path

import numpy as np
import torch
from seed_model import BERTModel
from torch import nn

RESERVED_TOKENS = ["<pad>", "<mask>", "<cls>", "<sep>"]


# ----------------------------------------------------------------------------- data (d2l 15.9)

def _read_wiki(data_dir: str | Path) -> list[list[str]]:
    """Lines with at least one ' . ' as lowercased lists of sentence strings, shuffled in place."""
    with open(Path(data_dir) / "wiki.train.tokens", encoding="utf-8") as f:
        lines = f.readlines()
    paragraphs = [line.strip().lower().split(" . ") for line in lines if len(line.split(" . ")) >= 2]
    random.shuffle(paragraphs)
    return paragraphs


def tokenize(lines: list[str]) -> list[list[str]]:
    """d2l.tokenize(lines, token='word')."""
    return [line.split() for line in lines]


class Vocab:
    """d2l.Vocab: `<unk>` and the reserved tokens, then tokens by descending count (ties: first seen)."""

    def __init__(self, tokens: list[list[str]], min_freq: int = 0, reserved_tokens: list[str] | None = None) -> None:
        counter = collections.Counter(token for line in tokens for token in line)
        self.token_freqs = sorted(counter.items(), key=lambda x: x[1], reverse=True)
        self.idx_to_token = ["<unk>", *(reserved_tokens or [])]
        self.token_to_idx = {token: idx for idx, token in enumerate(self.idx_to_token)}
        for token, freq in self.token_freqs:
            if freq < min_freq:
                break
            if token not in self.token_to_idx:
                self.idx_to_token.append(token)
                self.token_to_idx[token] = len(self.idx_to_token) - 1

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def __getitem__(self, tokens: str | list[str]) -> int | list[int]:
        if not isinstance(tokens, (list, tuple)):
            return self.token_to_idx.get(tokens, 0)
        return [self.__getitem__(token) for token in tokens]


def get_tokens_and_segments(tokens_a: list[str], tokens_b: list[str] | None = None) -> tuple[list[str], list[int]]:
    """`<cls> a <sep> [b <sep>]` and its segment ids."""
    tokens = ["<cls>", *tokens_a, "<sep>"]
    segments = [0] * (len(tokens_a) + 2)
    if tokens_b is not None:
        tokens += [*tokens_b, "<sep>"]
        segments += [1] * (len(tokens_b) + 1)
    return tokens, segments


def _get_next_sentence(sentence: list[str], next_sentence: list[str], paragraphs: list) -> tuple:
    if random.random() < 0.5:
        is_next = True
    else:
        next_sentence = random.choice(random.choice(paragraphs))
        is_next = False
    return sentence, next_sentence, is_next


def _get_nsp_data_from_paragraph(paragraph: list, paragraphs: list, vocab: Vocab, max_len: int) -> list[tuple]:
    nsp_data_from_paragraph = []
    for i in range(len(paragraph) - 1):
        tokens_a, tokens_b, is_next = _get_next_sentence(paragraph[i], paragraph[i + 1], paragraphs)
        if len(tokens_a) + len(tokens_b) + 3 > max_len:  # one <cls> and two <sep>
            continue
        tokens, segments = get_tokens_and_segments(tokens_a, tokens_b)
        nsp_data_from_paragraph.append((tokens, segments, is_next))
    return nsp_data_from_paragraph


def _replace_mlm_tokens(tokens: list[str], candidate_pred_positions: list[int], num_mlm_preds: int,
                        vocab: Vocab) -> tuple[list[str], list[tuple[int, str]]]:
    """80% `<mask>`, 10% unchanged, 10% a random token of the WHOLE vocabulary (flaw kept)."""
    mlm_input_tokens = list(tokens)
    pred_positions_and_labels = []
    random.shuffle(candidate_pred_positions)
    for mlm_pred_position in candidate_pred_positions:
        if len(pred_positions_and_labels) >= num_mlm_preds:
            break
        if random.random() < 0.8:
            masked_token = "<mask>"
        elif random.random() < 0.5:
            masked_token = tokens[mlm_pred_position]
        else:
            masked_token = random.choice(vocab.idx_to_token)
        mlm_input_tokens[mlm_pred_position] = masked_token
        pred_positions_and_labels.append((mlm_pred_position, tokens[mlm_pred_position]))
    return mlm_input_tokens, pred_positions_and_labels


def _get_mlm_data_from_tokens(tokens: list[str], vocab: Vocab) -> tuple[list[int], list[int], list[int]]:
    candidate_pred_positions = [i for i, token in enumerate(tokens) if token not in ("<cls>", "<sep>")]
    num_mlm_preds = max(1, round(len(tokens) * 0.15))
    mlm_input_tokens, pred_positions_and_labels = _replace_mlm_tokens(
        tokens, candidate_pred_positions, num_mlm_preds, vocab)
    pred_positions_and_labels = sorted(pred_positions_and_labels, key=lambda x: x[0])
    pred_positions = [v[0] for v in pred_positions_and_labels]
    mlm_pred_labels = [v[1] for v in pred_positions_and_labels]
    return vocab[mlm_input_tokens], pred_positions, vocab[mlm_pred_labels]


def _pad_bert_inputs(examples: list[tuple], max_len: int, vocab: Vocab) -> tuple[list[torch.Tensor], ...]:
    """Seven lists holding one tensor per example; valid_lens and weights are float32."""
    max_num_mlm_preds = round(max_len * 0.15)
    fields: tuple[list[torch.Tensor], ...] = ([], [], [], [], [], [], [])
    token_ids_, segments_, valid_lens, positions_, weights_, labels_, nsp_labels = fields
    for token_ids, pred_positions, mlm_pred_label_ids, segments, is_next in examples:
        n_pad, n_pred_pad = max_len - len(token_ids), max_num_mlm_preds - len(pred_positions)
        token_ids_.append(torch.tensor(token_ids + [vocab["<pad>"]] * n_pad, dtype=torch.long))
        segments_.append(torch.tensor(segments + [0] * (max_len - len(segments)), dtype=torch.long))
        valid_lens.append(torch.tensor(len(token_ids), dtype=torch.float32))
        positions_.append(torch.tensor(pred_positions + [0] * n_pred_pad, dtype=torch.long))
        weights_.append(torch.tensor([1.0] * len(mlm_pred_label_ids) + [0.0] * n_pred_pad, dtype=torch.float32))
        labels_.append(torch.tensor(mlm_pred_label_ids + [0] * n_pred_pad, dtype=torch.long))
        nsp_labels.append(torch.tensor(is_next, dtype=torch.long))
    return fields


class WikiTextDataset(torch.utils.data.Dataset):
    """d2l's `_WikiTextDataset`: vocabulary, NSP pairs, MLM masking and padding, all up front."""

    def __init__(self, paragraphs: list[list[str]], max_len: int) -> None:
        paragraphs = [tokenize(paragraph) for paragraph in paragraphs]
        sentences = [sentence for paragraph in paragraphs for sentence in paragraph]
        self.vocab = Vocab(sentences, min_freq=5, reserved_tokens=RESERVED_TOKENS)
        examples = []
        for paragraph in paragraphs:
            examples.extend(_get_nsp_data_from_paragraph(paragraph, paragraphs, self.vocab, max_len))
        examples = [(*_get_mlm_data_from_tokens(tokens, self.vocab), segments, is_next)
                    for tokens, segments, is_next in examples]
        (self.all_token_ids, self.all_segments, self.valid_lens, self.all_pred_positions,
         self.all_mlm_weights, self.all_mlm_labels, self.nsp_labels) = _pad_bert_inputs(examples, max_len, self.vocab)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, ...]:
        return (self.all_token_ids[idx], self.all_segments[idx], self.valid_lens[idx], self.all_pred_positions[idx],
                self.all_mlm_weights[idx], self.all_mlm_labels[idx], self.nsp_labels[idx])

    def __len__(self) -> int:
        return len(self.all_token_ids)


def load_data_wiki(data_dir: str | Path, batch_size: int, max_len: int) -> tuple[torch.utils.data.DataLoader, Vocab]:
    """The shuffled training loader and the vocabulary (d2l uses 4 workers; here the main process)."""
    train_set = WikiTextDataset(_read_wiki(data_dir), max_len)
    return torch.utils.data.DataLoader(train_set, batch_size, shuffle=True), train_set.vocab


# ----------------------------------------------------------------------------- training (d2l 15.10)

def _get_batch_loss_bert(net: nn.Module, loss: nn.Module, vocab_size: int, tokens_X: torch.Tensor,
                         segments_X: torch.Tensor, valid_lens_x: torch.Tensor, pred_positions_X: torch.Tensor,
                         mlm_weights_X: torch.Tensor, mlm_Y: torch.Tensor, nsp_y: torch.Tensor) -> tuple:
    _, mlm_Y_hat, nsp_Y_hat = net(tokens_X, segments_X, valid_lens_x.reshape(-1), pred_positions_X)
    # With a mean-reducing `loss` this is the mean over all slots, padding included (d2l-en#2582).
    mlm_l = loss(mlm_Y_hat.reshape(-1, vocab_size), mlm_Y.reshape(-1)) * mlm_weights_X.reshape(-1, 1)
    mlm_l = mlm_l.sum() / (mlm_weights_X.sum() + 1e-8)
    nsp_l = loss(nsp_Y_hat, nsp_y)
    return mlm_l, nsp_l, mlm_l + nsp_l


def train_bert(train_iter: torch.utils.data.DataLoader, net: nn.Module, loss: nn.Module, vocab_size: int,
               devices: list[torch.device], num_steps: int) -> list[tuple[float, float]]:
    """Adam at lr 0.01 for `num_steps` batches on devices[0]; returns each step's (mlm, nsp) loss."""
    net = net.to(devices[0])
    trainer = torch.optim.Adam(net.parameters(), lr=0.01)
    losses: list[tuple[float, float]] = []
    pairs, seconds = 0, 0.0
    while len(losses) < num_steps:
        for batch in train_iter:
            batch = [x.to(devices[0]) for x in batch]
            trainer.zero_grad()
            start = time.perf_counter()
            mlm_l, nsp_l, total_l = _get_batch_loss_bert(net, loss, vocab_size, *batch)
            total_l.backward()
            trainer.step()
            losses.append((mlm_l.item(), nsp_l.item()))
            pairs += batch[0].shape[0]
            seconds += time.perf_counter() - start
            if len(losses) == num_steps:
                break
    print(f"MLM loss {np.mean([m for m, _ in losses]):.3f}, NSP loss {np.mean([n for _, n in losses]):.3f}")
    print(f"{pairs / seconds:.1f} sentence pairs/sec on {devices}")
    return losses


def get_bert_encoding(net: nn.Module, tokens_a: list[str], tokens_b: list[str] | None = None, *, vocab: Vocab,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """The chapter's encoder output for one sentence (pair); `vocab`/`device` were globals there.

    The model's mode is left as it is: after `train_bert` dropout is still on (flaw kept).
    """
    tokens, segments = get_tokens_and_segments(tokens_a, tokens_b)
    token_ids = torch.tensor(vocab[tokens], device=device).unsqueeze(0)
    segments_t = torch.tensor(segments, device=device).unsqueeze(0)
    valid_len = torch.tensor(len(tokens), device=device).unsqueeze(0)
    encoded_X, _, _ = net(token_ids, segments_t, valid_len)
    return encoded_X


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding wiki.train.tokens")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    seed_everything(args.seed)
    train_iter, vocab = load_data_wiki(args.data, args.batch_size, args.max_len)
    net = BERTModel(len(vocab), num_hiddens=128, ffn_num_hiddens=256, num_heads=2, num_blks=2, dropout=0.2)
    train_bert(train_iter, net, nn.CrossEntropyLoss(), len(vocab), [torch.device(args.device)], args.steps)


if __name__ == "__main__":
    main()
