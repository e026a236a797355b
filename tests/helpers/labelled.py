"""A real labelled task and exports to fine-tune on it (tests/downstream). No GLUE file is on this machine, so the
task is drawn from the WikiText-2 sample in ../shared (bench/labelled.py: is a line a section heading or text?).

The exports are tiny BERTs, untrained (their weights newly initialised), saved as the export stage saves them
(`bertpipe.export.hf_compat.save_pretrained`), with d2l's word tokenizer or a WordPiece one over the task's text.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from bertpipe.config import ModelConfig
from bertpipe.data.tokenizer import word_tokenizer, wordpiece_tokenizer
from bertpipe.export.hf_compat import save_pretrained
from bertpipe.model.bert import BertConfig, BertForPreTraining
from bertpipe.vocab import CONTINUATION, SPECIAL_TOKENS, WORDPIECE_SPECIAL_TOKENS, lowercase

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from labelled import heading_task

__all__ = ["export", "heading_task"]


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
