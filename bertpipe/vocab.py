"""The vocabulary's reserved tokens, their ids and Hugging Face roles, and the text -> tokens rules.

Both tokenizers reserve ids 0..4 in the same order (unknown, padding, mask, classifier, separator),
spelt as each tradition spells them: d2l's `<unk> <pad> <mask> <cls> <sep>` for the word vocabulary,
BERT's `[UNK] [PAD] [MASK] [CLS] [SEP]` for WordPiece. Code that builds examples uses the ids only.

The word vocabulary's rule, shared by the corpus reader (`bertpipe.data.words`, on bytes with numpy) and
the exported Hugging Face tokenizer (`bertpipe.data.tokenizer`), which `bertpipe encode` / `fill-mask` run:

1. lowercase every character with its own full Unicode mapping (`str.lower` one character at a time),
   unless `prepare.lowercase: false` keeps the case (`The` and `the` are then two tokens);
2. split on whitespace, as Python's `str.split()` does (`PY_WHITESPACE`);
3. a reserved token is a token of its own wherever it stands: `a<mask>,` is `a <mask> ,`.

This is d2l's reading (`line.lower().split()`) with two differences that never occur in WikiText:
a capital sigma ending a word lowercases to U+03C3 rather than `str.lower`'s final U+03C2 (a context rule
that Hugging Face's Lowercase normalizer cannot express), and a reserved token glued to other
characters is split off (as Hugging Face does with special tokens) instead of making an unknown word.

WordPiece follows BERT's own rule (Hugging Face's BertNormalizer and BertPreTokenizer): control
characters are deleted, `BERT_WHITESPACE` separates words, then each word is lowercased and stripped of
accents (by default; `prepare.lowercase` and `prepare.strip_accents` are BERT's `do_lower_case` and
`strip_accents`) and cut at punctuation and CJK characters before WordPiece splits it into pieces.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

SPECIAL_TOKENS = ("<unk>", "<pad>", "<mask>", "<cls>", "<sep>")  # the word vocabulary's, ids 0..4
WORDPIECE_SPECIAL_TOKENS = ("[UNK]", "[PAD]", "[MASK]", "[CLS]", "[SEP]")  # BERT's, the same ids
UNK, PAD, MASK, CLS, SEP = SPECIAL_TOKENS
UNK_ID, PAD_ID, MASK_ID, CLS_ID, SEP_ID = range(len(SPECIAL_TOKENS))
# Hugging Face's special-token attribute names (tokenizer_config.json, special_tokens_map.json), in id order.
HF_ROLE_NAMES = ("unk_token", "pad_token", "mask_token", "cls_token", "sep_token")
HF_ROLES = dict(zip(HF_ROLE_NAMES, SPECIAL_TOKENS, strict=True))
CONTINUATION = "##"  # how WordPiece marks a piece that continues a word
# Exactly the characters for which Python's str.isspace() is true (what str.split() splits on).
PY_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
                 "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
# What separates words for BERT: Python's set less the control characters (\x0b \x0c \x1c-\x1f \x85),
# which BertNormalizer deletes before it looks for whitespace, so `a\x0bb` is one word, `ab`.
BERT_WHITESPACE = "".join(c for c in PY_WHITESPACE if c not in "\x0b\x0c\x1c\x1d\x1e\x1f\x85")
_SPECIAL = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")


def special_tokens(tokenizer: str) -> tuple[str, ...]:
    """The reserved tokens of `prepare.tokenizer` (`word`, `wordpiece` or a checkpoint's, `pretrained`), in id order."""
    return SPECIAL_TOKENS if tokenizer == "word" else WORDPIECE_SPECIAL_TOKENS


def hf_roles(specials: tuple[str, ...]) -> dict[str, str]:
    """`{"unk_token": ..., "pad_token": ..., ...}` for a tokenizer whose reserved tokens are `specials`."""
    return dict(zip(HF_ROLE_NAMES, specials, strict=True))


def specials_of(tokens: list[str]) -> tuple[str, ...]:
    """The reserved tokens a vocabulary (in id order) starts with; ValueError if it has neither set."""
    head = tuple(tokens[:len(SPECIAL_TOKENS)])
    if head not in (SPECIAL_TOKENS, WORDPIECE_SPECIAL_TOKENS):
        raise ValueError(f"the vocabulary starts with {list(head)}, not with reserved tokens in id order")
    return head


def specials_in(tokens: list[str]) -> tuple[str, ...]:
    """The reserved tokens of a vocabulary (in id order), in role order: those it starts with (bertpipe's numbering),
    else BERT's wherever they stand (a Hugging Face checkpoint's own numbering, which a continued pretraining's
    export keeps: `[PAD]` 0, `[UNK]` 100 for `bert-base-uncased`); ValueError naming what is missing."""
    try:
        return specials_of(tokens)
    except ValueError:
        missing = [token for token in WORDPIECE_SPECIAL_TOKENS if token not in set(tokens)]
        if missing:
            raise ValueError(f"the vocabulary has neither bertpipe's reserved tokens first nor BERT's "
                             f"{' '.join(WORDPIECE_SPECIAL_TOKENS)} (missing {' '.join(missing)})") from None
        return WORDPIECE_SPECIAL_TOKENS


def lowercase(text: str) -> str:
    """Each character's own lowercase mapping: `str.lower` without its final-sigma context rule."""
    return text.lower() if "\u03a3" not in text else "".join(c.lower() for c in text)


def split_special(word: str) -> list[str]:
    """A whitespace-free word (lowercased or not) cut around the reserved tokens it contains."""
    if "<" not in word:
        return [word]
    return [piece for piece in _SPECIAL.split(word) if piece]


def split_words(text: str, cased: bool = False) -> list[str]:
    """The tokens of `text` under the word vocabulary's rule above (`cased`: `prepare.lowercase: false`)."""
    return [piece for word in (text if cased else lowercase(text)).split() for piece in split_special(word)]


def vocab_digest(tokens: Iterable[str]) -> str:
    """sha256 of the vocabulary in id order: later stages check they were built against it."""
    return hashlib.sha256("\n".join(tokens).encode()).hexdigest()
