"""The vocabulary's reserved tokens, their ids and Hugging Face roles, and the one rule that turns text
into tokens.

The rule, shared by the corpus reader (`bertpipe.corpus`, on bytes with numpy), `bertpipe encode` /
`fill-mask` (`split_words`) and the exported Hugging Face tokenizer (`bertpipe.hf_compat`):

1. lowercase every character with its own full Unicode mapping (`str.lower` one character at a time);
2. split on whitespace, as Python's `str.split()` does (`PY_WHITESPACE`);
3. a reserved token is a token of its own wherever it stands: `a<mask>,` is `a <mask> ,`.

This is d2l's reading (`line.lower().split()`) with two differences that never occur in WikiText:
a capital sigma ending a word lowercases to U+03C3 rather than `str.lower`'s final U+03C2 (a context rule
that Hugging Face's Lowercase normalizer cannot express), and a reserved token glued to other
characters is split off (as Hugging Face does with special tokens) instead of making an unknown word.
"""

from __future__ import annotations

import re

SPECIAL_TOKENS = ("<unk>", "<pad>", "<mask>", "<cls>", "<sep>")  # ids 0..4, in this order
UNK, PAD, MASK, CLS, SEP = SPECIAL_TOKENS
UNK_ID, PAD_ID, MASK_ID, CLS_ID, SEP_ID = range(len(SPECIAL_TOKENS))
# Hugging Face's special-token attribute names (tokenizer_config.json, special_tokens_map.json).
HF_ROLES = {"unk_token": UNK, "pad_token": PAD, "cls_token": CLS, "sep_token": SEP, "mask_token": MASK}
# Exactly the characters for which Python's str.isspace() is true (what str.split() splits on).
PY_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
                 "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_SPECIAL = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")


def lowercase(text: str) -> str:
    """Each character's own lowercase mapping: `str.lower` without its final-sigma context rule."""
    return text.lower() if "\u03a3" not in text else "".join(c.lower() for c in text)


def split_special(word: str) -> list[str]:
    """A lowercased, whitespace-free word cut around the reserved tokens it contains."""
    if "<" not in word:
        return [word]
    return [piece for piece in _SPECIAL.split(word) if piece]


def split_words(text: str) -> list[str]:
    """The tokens of `text` under the rule above."""
    return [piece for word in lowercase(text).split() for piece in split_special(word)]
