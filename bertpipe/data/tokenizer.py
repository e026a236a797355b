"""The two tokenizers as Hugging Face `tokenizers` pipelines: d2l's word vocabulary and BERT's WordPiece.

The prepare stage builds one (`word_tokenizer` over its vocabulary, or `wordpiece_tokenizer` over the
vocabulary `bertpipe.data.wordpiece` trains) and saves it as `tokenizer.json`; the export stage hands that
file on, and `bertpipe encode` / `fill-mask` run it, so text becomes the same ids everywhere.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from bertpipe.vocab import CLS_ID, CONTINUATION, SEP_ID, SPECIAL_TOKENS, WORDPIECE_SPECIAL_TOKENS

MAX_CHARS_PER_WORD = 100  # BERT's: a longer word is one [UNK]


def word_tokenizer(tokens: Sequence[str], lowercase: bool = True) -> Tokenizer:
    """A WordLevel tokenizer giving our ids: `<cls> a <sep>` or `<cls> a <sep> b <sep>` with segment ids.

    It follows `bertpipe.vocab`'s rule step by step: Lowercase maps character by character (left out
    with `lowercase=False`, `prepare.lowercase`, so `The` and `the` stay apart); Python's str.split()
    also splits on U+001C..U+001F, which WhitespaceSplit (Rust's whitespace) does not, so the normalizer
    turns those into spaces first; the reserved tokens are special tokens matched in the normalized
    text (`normalized=True`), so `<MASK>` (when lowercasing) and `a<mask>` find `<mask>` as the rule does.
    """
    index = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.WordLevel(index, unk_token=SPECIAL_TOKENS[0]))
    spaces = normalizers.Replace(Regex(r"[\x1c-\x1f]"), " ")
    tokenizer.normalizer = normalizers.Sequence([spaces, normalizers.Lowercase()] if lowercase else [spaces])
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    _finish(tokenizer, SPECIAL_TOKENS, index, normalized=True)
    return tokenizer


def wordpiece_tokenizer(vocab: dict[str, int], lowercase: bool = True, strip_accents: bool | None = None) -> Tokenizer:
    """BERT's pipeline around a WordPiece vocabulary, as `BertTokenizerFast` builds it from vocab.txt:
    BertNormalizer (clean text, CJK characters apart, then `prepare.lowercase` and `prepare.strip_accents`
    as BERT's `do_lower_case` and `strip_accents`: uncased by default, accents stripped when lowercasing),
    BertPreTokenizer (whitespace and punctuation), WordPiece with `##` pieces, `[CLS] a [SEP] b [SEP]`
    with segment ids. The two settings live in tokenizer.json, where the export reads them back."""
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=WORDPIECE_SPECIAL_TOKENS[0],
                                           max_input_chars_per_word=MAX_CHARS_PER_WORD))
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=strip_accents, lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION)
    _finish(tokenizer, WORDPIECE_SPECIAL_TOKENS, vocab, normalized=False)
    return tokenizer


def _finish(tokenizer: Tokenizer, specials: Sequence[str], index: dict[str, int], normalized: bool) -> None:
    """The reserved tokens as special tokens, and the `<cls> a <sep> [b <sep>]` template with segment ids."""
    cls, sep = specials[CLS_ID], specials[SEP_ID]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, index[cls]), (sep, index[sep])])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=normalized) for t in specials])


def tokens_in_order(tokenizer: Tokenizer) -> list[str]:
    """The vocabulary in id order; ValueError if its ids are not 0..n-1."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError(f"the tokenizer's ids are not 0..{len(tokens) - 1}")
    return tokens


def reserved_first(tokenizer: Tokenizer, specials: Sequence[str]) -> tuple[Tokenizer, list[int]]:
    """A WordPiece tokenizer re-indexed so that `specials` take ids 0..k-1 in that order (bertpipe's reserved
    ids, `bertpipe.vocab`) and every other token follows in its own order; and, per new id, the tokenizer's own
    id (`old[new]`). Everything else (normalizer, pre-tokenizer, pieces, added tokens) is unchanged, so text is
    read exactly as before, only numbered differently: the prepare stage's reading of a pretrained checkpoint's
    tokenizer (`prepare.tokenizer: pretrained`), whose model rows `bertpipe.init.weights` permutes alike."""
    tokens = tokens_in_order(tokenizer)
    index = {token: i for i, token in enumerate(tokens)}
    missing = [token for token in specials if token not in index]
    if missing:
        raise ValueError(f"the tokenizer lacks {' '.join(missing)}")
    firsts = [index[token] for token in specials]
    old = firsts + sorted(set(range(len(tokens))) - set(firsts))
    new_id = {was: now for now, was in enumerate(old)}
    spec = json.loads(tokenizer.to_str())
    if spec["model"]["type"] != "WordPiece":
        raise ValueError(f"a {spec['model']['type']} tokenizer, not BERT's WordPiece")
    spec["model"]["vocab"] = {token: new_id[i] for token, i in spec["model"]["vocab"].items()}
    for added in spec.get("added_tokens") or []:
        added["id"] = new_id[added["id"]]
    _renumber_processor(spec.get("post_processor"), new_id)
    return Tokenizer.from_str(json.dumps(spec)), old


def _renumber_processor(processor: dict | None, new_id: dict[int, int]) -> None:
    """The ids a post-processor inserts ([CLS], [SEP]), renumbered in place: TemplateProcessing's special
    tokens, BertProcessing's `cls`/`sep` pairs, and those inside a Sequence of processors."""
    if not processor:
        return
    for special in processor.get("special_tokens", {}).values():
        special["ids"] = [new_id[i] for i in special["ids"]]
    for role in ("cls", "sep"):
        if isinstance(processor.get(role), list):
            processor[role][1] = new_id[processor[role][1]]
    for inner in processor.get("processors") or []:
        _renumber_processor(inner, new_id)
