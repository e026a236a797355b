"""One rule for text -> tokens (bertpipe/vocab.py), followed by all four readers of text.

They are the corpus reader (bytes and numpy), the rule's Python form (`split_words`), the exported
`tokenizers` file (which `bertpipe encode` / `fill-mask` run), and `transformers.AutoTokenizer`
loading the exported folder. A fuzz
test feeds them random strings with the reserved tokens in every position: alone, glued to words and
punctuation on either side, in capitals, next to every whitespace character Python splits on; with the
rule's lowercasing and without it (`prepare.lowercase: false`).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers.exported import export_tiny
from tokenizers import Tokenizer

from bertpipe.cli import main
from bertpipe.config import PrepareConfig
from bertpipe.data.corpus import Reading, tokenize
from bertpipe.data.prepare import prepare
from bertpipe.data.tokenizer import word_tokenizer
from bertpipe.export import hf_compat
from bertpipe.vocab import PY_WHITESPACE, SPECIAL_TOKENS, UNK_ID, split_words

FRAGMENTS = [*SPECIAL_TOKENS, "<MASK>", "<Cls>", "<", ">", "<mask", "mask>", "a", "Crane", "İ", "ΑΣ", "Σ",
             "\u03c3", "é", "É", "ß", ",", "!", "'", "-", "(", ")", "x1", "\u212a", "\u0307", *PY_WHITESPACE]


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Concatenations of 0..12 fragments: every reserved token alone, glued, or split across fragments."""
    rng = random.Random(seed)
    return ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 12))) for _ in range(n)]


def corpus_tokens(text: str, cased: bool = False) -> list[str]:
    """What the corpus reader makes of `text` inside a paragraph's first sentence (no '.', no line breaks)."""
    shard = tokenize(f"begin {text} . end\n".encode(), Reading(tokens="cased" if cased else "word"))
    words = shard.words.to_pylist()
    return [words[i] for i in shard.word_ids][1:-1]


def test_the_rule_on_reserved_tokens_glued_to_text() -> None:
    assert split_words("a<mask> is flying") == ["a", "<mask>", "is", "flying"]
    assert split_words("<MASK>,<cls>x<sep>") == ["<mask>", ",", "<cls>", "x", "<sep>"]
    assert split_words("<<mask>> mask>") == ["<", "<mask>", ">", "mask>"]
    assert split_words("\u0391\u03a3") == ["\u03b1\u03c3"]  # one character at a time: no final sigma (bertpipe.vocab)


@pytest.mark.parametrize("cased", [False, True], ids=["lowercase", "cased"])
def test_four_readers_agree_on_random_strings(cased: bool, tmp_path: Path) -> None:
    texts = [t for t in random_texts(3000) if "\n" not in t and "\r" not in t]
    rule = [split_words(t, cased=cased) for t in texts]
    tokens = list(dict.fromkeys([*SPECIAL_TOKENS, *(token for tokens in rule for token in tokens)]))
    index = {token: i for i, token in enumerate(tokens)}  # every token the rule makes is in the vocabulary
    tokenizer = word_tokenizer(tokens, lowercase=not cased)
    hf_compat.save_tokenizer(tmp_path, tokenizer, model_max_length=512)
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text, expected in zip(texts, rule, strict=True):
        ids = [index.get(token, UNK_ID) for token in expected]
        assert corpus_tokens(text, cased) == expected, repr(text)
        assert tokenizer.encode(text, add_special_tokens=False).ids == ids, repr(text)
        assert auto(text, add_special_tokens=False)["input_ids"] == ids, repr(text)


def test_cased_words_keep_the_and_the_apart(tmp_path: Path) -> None:
    """`prepare.lowercase: false` with d2l's words: the corpus reader and the saved tokenizer keep the case,
    and only the reserved tokens as written (`<mask>`, not `<MASK>`) are split off."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "wiki.train.tokens").write_text(" The crane . the crane . THE Crane<mask> . <MASK> crane\n" * 3)
    (raw / "wiki.valid.tokens").write_text(" The crane . the Crane\n")
    prepare(raw, tmp_path / "prepared", PrepareConfig(lowercase=False, min_freq=1))
    tokenizer = Tokenizer.from_file(str(tmp_path / "prepared" / "tokenizer.json"))
    assert {"The", "the", "THE", "Crane", "crane", "<MASK>"} <= set(tokenizer.get_vocab())
    tokens = np.load(tmp_path / "prepared" / "train" / "tokens.npy").tolist()
    text = "The crane the crane THE Crane<mask> <MASK> crane"
    assert tokens[:len(tokens) // 3] == tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.encode(text, add_special_tokens=False).tokens == [
        "The", "crane", "the", "crane", "THE", "Crane", "<mask>", "<MASK>", "crane"]


def test_fill_mask_command_answers_what_the_exported_pipeline_answers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model_dir = export_tiny(tmp_path)
    fill = transformers.pipeline("fill-mask", model=str(model_dir))
    for text in ("a<mask> is flying", "A <MASK>, is flying", "a crane<mask>"):
        theirs = [p["token_str"] for p in fill(text, top_k=3)]
        result = CliRunner().invoke(main, ["fill-mask", text, "--top-k", "3", "--model", str(model_dir)])
        assert result.exit_code == 0, result.output
        ours = re.findall(r"^\s+\d+\. (\S+)", result.output, flags=re.MULTILINE)
        assert ours == theirs, text
