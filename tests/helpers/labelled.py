"""A real labelled task and exports to fine-tune on it (tests/downstream): no GLUE file is on this machine, so the
task is drawn from the WikiText-2 sample in ../shared: is a line a section heading (` = Title = `) or text?

The exports are tiny BERTs, untrained (their weights newly initialised), saved as the export stage saves them
(`bertpipe.export.hf_compat.save_pretrained`), with d2l's word tokenizer or a WordPiece one over the task's text.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pandas as pd
import torch

from bertpipe.config import ModelConfig
from bertpipe.data.tokenizer import word_tokenizer, wordpiece_tokenizer
from bertpipe.export.hf_compat import save_pretrained
from bertpipe.model.bert import BertConfig, BertForPreTraining
from bertpipe.vocab import CONTINUATION, SPECIAL_TOKENS, WORDPIECE_SPECIAL_TOKENS, lowercase


def heading_task(wikitext: Path, folder: Path, train: int = 240, validation: int = 80) -> Path:
    """`folder/{train,validation}.csv`: half headings, half the first 12 words of a paragraph, shuffled."""
    lines = (wikitext / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines()
    headings = [line.strip() for line in lines if line.startswith(" = ")]
    text = [" ".join(line.split()[:12]) for line in lines if line.strip() and not line.startswith(" = ")]
    half = (train + validation) // 2
    rows = [(t, "heading") for t in headings[:half]] + [(t, "text") for t in text[:half]]
    random.Random(0).shuffle(rows)
    folder.mkdir(parents=True)
    frame = pd.DataFrame(rows, columns=["text", "label"])
    frame[:train].to_csv(folder / "train.csv", index=False)
    frame[train:].to_csv(folder / "validation.csv", index=False)
    return folder


def export(folder: Path, texts: list[str], tokenizer: str = "word", max_positions: int = 512) -> Path:
    """A tiny untrained BERT whose vocabulary is every lowercased word of `texts` (and, for WordPiece, their
    characters), in the export stage's folder format."""
    words = sorted({word for text in texts for word in lowercase(text).split()})
    if tokenizer == "word":
        tokens = list(dict.fromkeys([*SPECIAL_TOKENS, *words]))  # WikiText's own <unk> is a reserved token
        tok = word_tokenizer(tokens)
    else:
        chars = sorted({c for word in words for c in word})
        tokens = list(dict.fromkeys([*WORDPIECE_SPECIAL_TOKENS, *chars, *(CONTINUATION + c for c in chars), *words]))
        tok = wordpiece_tokenizer({token: i for i, token in enumerate(tokens)})
    config = dataclasses.replace(BertConfig.from_params(ModelConfig(preset="tiny"), vocab_size=len(tokens)),
                                 max_position_embeddings=max_positions)
    torch.manual_seed(0)
    folder.mkdir(parents=True)
    save_pretrained(folder, BertForPreTraining(config), tok)
    return folder
