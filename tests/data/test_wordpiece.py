"""`prepare.tokenizer: wordpiece` (bertpipe/data/wordpiece.py, bertpipe/data/tokenizer.py, bertpipe/data/prepare.py).

The corpus's ids must be what the saved tokenizer gives each word (one rule), whatever the text:
accents, CJK characters, control characters BERT deletes, whitespace Python splits on but BERT does
not, and whatever `prepare.lowercase` and `prepare.strip_accents` ask of BERT's normalizer. The
vocabulary must be the same from run to run (Hugging Face's trainer alone is not:
huggingface/tokenizers#1794), and a vocabulary too small for the alphabet is one line naming the key.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tokenizers import Tokenizer

from bertpipe.config import PrepareConfig
from bertpipe.data.prepare import prepare
from bertpipe.errors import ConfigError
from bertpipe.vocab import PY_WHITESPACE, UNK_ID, WORDPIECE_SPECIAL_TOKENS

WORDPIECE = PrepareConfig(tokenizer="wordpiece", sentences="lines", vocab_size=400)
FRAGMENTS = ["crane", "Crane", "CRANES", "flying", "café", "Éclair", "naïve", "straße", "東京", "日本語", "x1",
             "don't", "e-mail", "(a)", "<unk>", "\x0b", "\x1c", "\x85", "\u200b", "\u00ad",
             "\ufeff", ".", ",", "!", "?", "—", "…", *PY_WHITESPACE.replace("\n", "").replace("\r", "")]


def random_documents(n: int, seed: int) -> str:
    """Documents of lines made of random fragments (one sentence per line: prepare.sentences = lines)."""
    rng = random.Random(seed)
    documents = []
    for _ in range(n):
        lines = ["".join(rng.choice(FRAGMENTS) + rng.choice([" ", "", "  "]) for _ in range(rng.randint(1, 9)))
                 for _ in range(rng.randint(2, 5))]
        documents.append("\n".join(line for line in lines if line.strip()))
    return "\n\n".join(d for d in documents if d) + "\n"


def prepared_documents(root: Path, train: str, valid: str, cfg: PrepareConfig = WORDPIECE) -> tuple[Path, dict]:
    raw = root / "raw"
    raw.mkdir(parents=True)
    (raw / "train.txt").write_text(train, encoding="utf-8")
    (raw / "valid.txt").write_text(valid, encoding="utf-8")
    return root / "prepared", prepare(raw, root / "prepared", cfg)


def sentences_of(prepared: Path, split: str) -> list[list[int]]:
    tokens = np.load(prepared / split / "tokens.npy")
    offsets = np.load(prepared / split / "sentence_offsets.npy")
    return [tokens[a:b].tolist() for a, b in itertools.pairwise(offsets)]


@pytest.mark.parametrize("cfg", [WORDPIECE, PrepareConfig(tokenizer="wordpiece", sentences="lines", vocab_size=400,
                                                           lowercase=False),
                                 PrepareConfig(tokenizer="wordpiece", sentences="lines", vocab_size=400,
                                               strip_accents=False)],
                         ids=["uncased", "cased", "keep-accents"])
def test_corpus_ids_are_what_the_tokenizer_gives_each_sentence(cfg: PrepareConfig, tmp_path: Path) -> None:
    train, valid = random_documents(300, seed=1), random_documents(100, seed=2)
    prepared, metrics = prepared_documents(tmp_path, train, valid, cfg)
    tokenizer = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    for split, text in (("train", train), ("valid", valid)):
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        assert sentences_of(prepared, split) == [tokenizer.encode(line, add_special_tokens=False).ids
                                                 for line in lines], split
    assert metrics["train"]["unk_tokens"] == 0  # every character of train is in the alphabet


def test_reserved_tokens_typed_in_the_corpus_are_text(tmp_path: Path) -> None:
    prepared, _ = prepared_documents(tmp_path, "a [MASK] b [CLS] c [SEP]\nmask cls sep\n", "a b\nc\n")
    tokens = pd.read_parquet(prepared / "vocab.parquet")["token"].tolist()
    ids = sentences_of(prepared, "train")[0]
    assert [tokens[i] for i in ids] == ["a", "[", "mask", "]", "b", "[", "cls", "]", "c", "[", "sep", "]"]
    assert not set(ids) & set(range(len(WORDPIECE_SPECIAL_TOKENS)))


def test_wikitexts_own_unk_is_unk(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "wiki.train.tokens").write_text(" = T = \n the <unk> sat . it ran <unk> .\n", encoding="utf-8")
    (raw / "wiki.valid.tokens").write_text(" <unk> sat . ran .\n", encoding="utf-8")
    prepare(raw, tmp_path / "prepared", PrepareConfig(tokenizer="wordpiece", vocab_size=100))
    tokens = pd.read_parquet(tmp_path / "prepared" / "vocab.parquet")["token"].tolist()
    assert [[tokens[i] for i in s] for s in sentences_of(tmp_path / "prepared", "train")] == [
        ["the", "[UNK]", "sat"], ["it", "ran", "[UNK]", "."]]  # d2l's split: the final '.' stays
    assert "<" not in tokens and "unk" not in tokens  # the marker taught nothing
    assert sentences_of(tmp_path / "prepared", "valid")[0][0] == UNK_ID


def test_the_vocabulary_is_the_same_in_every_process(tmp_path: Path) -> None:
    """Hugging Face's trainer numbers `##` pieces in hash-map order, which changes from process to process."""
    text = random_documents(400, seed=3)
    script = ("import sys; from pathlib import Path; from bertpipe.config import PrepareConfig; "
              "from bertpipe.data.prepare import prepare; root = Path(sys.argv[1]); "
              "prepare(root / 'raw', root / 'prepared', PrepareConfig(tokenizer='wordpiece', sentences='lines', "
              "vocab_size=300))")
    digests = set()
    for run in range(4):
        root = tmp_path / str(run)
        (root / "raw").mkdir(parents=True)
        (root / "raw" / "train.txt").write_text(text, encoding="utf-8")
        (root / "raw" / "valid.txt").write_text("a b\nc\n", encoding="utf-8")
        subprocess.run([sys.executable, "-c", script, str(root)], check=True, capture_output=True, timeout=120)
        digests.add(hashlib.sha256((root / "prepared" / "tokenizer.json").read_bytes()
                                   + (root / "prepared" / "train" / "tokens.npy").read_bytes()).hexdigest())
    assert len(digests) == 1


def test_a_vocabulary_smaller_than_the_alphabet_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        prepared_documents(tmp_path, "abc def\nghi\n", "abc\ndef\n",
                           PrepareConfig(tokenizer="wordpiece", sentences="lines", vocab_size=20))
    assert str(caught.value) == ("params.yaml: prepare.vocab_size = 20 is not allowed; expected at least 23: the 5 "
                                 "reserved tokens, the 9 characters of the train split and their 9 ## continuations")
    assert not (tmp_path / "prepared").exists()


def test_metrics_report_the_vocabulary_and_unknown_share(tmp_path: Path) -> None:
    _, metrics = prepared_documents(tmp_path, random_documents(200, seed=4), "crane 東京 ☃\n\nflying\n")
    assert (metrics["tokenizer"], metrics["layout"], metrics["requested_vocab_size"]) == ("wordpiece", "documents", 400)
    assert metrics["vocab_size"] <= 400 and metrics["alphabet_size"] > 20
    assert metrics["valid"]["unk_tokens"] == 1  # the snowman is outside the train split's alphabet
    assert json.loads(json.dumps(metrics)) == metrics


SCRIPTS = "が IŞIK ışık hacía The the"  # Japanese (a dakuten), Turkish (dotted and dotless i), Spanish, English


@pytest.mark.parametrize(("settings", "pieces"), [
    ({}, ["か", "isik", "ısık", "hacia", "the", "the"]),  # BERT's uncased default: lowercased, marks dropped
    ({"lowercase": False}, ["が", "IŞIK", "ışık", "hacía", "The", "the"]),  # cased: the text as written
    ({"strip_accents": False}, ["が", "işik", "ışık", "hacía", "the", "the"]),  # lowercased (Unicode's I -> i)
    ({"lowercase": False, "strip_accents": True}, ["か", "ISIK", "ısık", "hacia", "The", "the"]),
], ids=["uncased", "cased", "keep-accents", "cased-no-accents"])
def test_lowercase_and_strip_accents_shape_the_vocabulary_and_the_corpus(settings: dict, pieces: list[str],
                                                                         tmp_path: Path) -> None:
    """Each word is frequent enough to be one piece: what is left of it is what the normaliser kept, in
    the trained vocabulary, in the encoded splits and in the saved tokenizer alike."""
    cfg = PrepareConfig(tokenizer="wordpiece", sentences="lines", vocab_size=200, **settings)
    prepared, _ = prepared_documents(tmp_path, f"{SCRIPTS}\n" * 20, f"{SCRIPTS}\n", cfg)
    tokens = pd.read_parquet(prepared / "vocab.parquet")["token"].tolist()
    tokenizer = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    for split in ("train", "valid"):
        assert [tokens[i] for i in sentences_of(prepared, split)[0]] == pieces, split
    assert tokenizer.encode(SCRIPTS, add_special_tokens=False).tokens == pieces
    assert set(pieces) <= set(tokens)
