"""Small Hugging Face BERT folders written with transformers, as the Hub holds them, for the continued-pretraining
tests (tests/init): a WordPiece vocabulary trained on a few hundred lines with its reserved tokens at Hugging
Face's usual ids ([PAD] first, not bertpipe's order, so the re-numbering is exercised), a cased or an uncased
tokenizer (BertTokenizerFast), and a BertForPreTraining or BertForMaskedLM of 2 layers of 32 units in
model.safetensors."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

HF_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4 as BertWordPieceTokenizer gives them


def bert_folder(folder: Path, lines: Iterable[str], cased: bool = False, head: str = "BertForPreTraining",
                positions: int = 64, vocab_size: int = 600) -> Path:
    """A BERT folder: vocab.txt, tokenizer.json, tokenizer_config.json, config.json and model.safetensors."""
    import torch
    import transformers
    from tokenizers import BertWordPieceTokenizer

    folder.mkdir(parents=True)
    trainer = BertWordPieceTokenizer(lowercase=not cased, strip_accents=None if not cased else False)
    trainer.train_from_iterator(list(lines), vocab_size=vocab_size, special_tokens=HF_SPECIALS, show_progress=False)
    vocab = trainer.get_vocab()
    (folder / "vocab.txt").write_text("".join(f"{t}\n" for t in sorted(vocab, key=vocab.__getitem__)), encoding="utf-8")
    tokenizer = transformers.BertTokenizerFast(str(folder / "vocab.txt"), do_lower_case=not cased)
    tokenizer.save_pretrained(folder)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=positions)
    torch.manual_seed(1)
    getattr(transformers, head)(config).save_pretrained(folder)
    return folder


def sample_lines(raw: Path, count: int = 400) -> list[str]:
    """The first `count` non-blank lines of a raw WikiText folder's train split."""
    text = (raw / "wiki.train.tokens").read_text(encoding="utf-8").splitlines()
    return [line for line in text if line.strip()][:count]
