"""The one place that maps bertpipe's BERT to Hugging Face's files, and back.

Our `BertForPreTraining.state_dict()` already uses HF's key names (STYLE 9), so the mapping is a
template of HF's keys and shapes (torchtitan's `{}` layer slot) plus the few things that cannot
match by name: the tied `cls.predictions.decoder.{weight,bias}`, which `transformers`'
`save_pretrained` leaves out of model.safetensors (they alias the word embeddings and
`cls.predictions.bias`), and the legacy `bert.embeddings.position_ids` buffer of older HF files.
The tokenizer is a `tokenizers` WordLevel model over our vocabulary that splits text by
`bertpipe.vocab`'s rule, as the corpus reader and `bertpipe encode` do.
Nothing here imports `transformers`: the files are written from their documented formats, and the
tests load them with `transformers` to prove it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

from bertpipe.errors import PipelineError
from bertpipe.model import BertConfig, BertForPreTraining
from bertpipe.vocab import CLS, HF_ROLES, SEP, SPECIAL_TOKENS, UNK

# Aliases that HF recreates on load by tying; the key maps to the tensor it shares.
TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias"}
LEGACY = ("bert.embeddings.position_ids",)  # a buffer older HF versions saved; nothing learned
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class HFFormatError(PipelineError):
    """A model folder that is missing or not an export of this pipeline."""


def config_to_hf(config: BertConfig) -> dict[str, Any]:
    """config.json for `transformers.BertConfig` (our field names are HF's)."""
    return {"architectures": ["BertForPreTraining"], "model_type": "bert", "tie_word_embeddings": True,
            **asdict(config)}


def config_from_hf(raw: Mapping[str, Any]) -> BertConfig:
    """Our BertConfig from an HF config.json, ignoring the HF-only keys."""
    names = {f.name for f in fields(BertConfig)}
    return BertConfig(**{k: v for k, v in raw.items() if k in names})


def hf_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """Every key HF's `save_pretrained` writes for BertForPreTraining, with its shape (16·L + 14 keys)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    top = {"bert.embeddings.word_embeddings.weight": (v, h),
           "bert.embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
           "bert.embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
           "bert.embeddings.LayerNorm.weight": (h,), "bert.embeddings.LayerNorm.bias": (h,),
           "bert.pooler.dense.weight": (h, h), "bert.pooler.dense.bias": (h,),
           "cls.predictions.bias": (v,),
           "cls.predictions.transform.dense.weight": (h, h), "cls.predictions.transform.dense.bias": (h,),
           "cls.predictions.transform.LayerNorm.weight": (h,), "cls.predictions.transform.LayerNorm.bias": (h,),
           "cls.seq_relationship.weight": (2, h), "cls.seq_relationship.bias": (2,)}
    layer = {"attention.self.query.weight": (h, h), "attention.self.query.bias": (h,),
             "attention.self.key.weight": (h, h), "attention.self.key.bias": (h,),
             "attention.self.value.weight": (h, h), "attention.self.value.bias": (h,),
             "attention.output.dense.weight": (h, h), "attention.output.dense.bias": (h,),
             "attention.output.LayerNorm.weight": (h,), "attention.output.LayerNorm.bias": (h,),
             "intermediate.dense.weight": (i, h), "intermediate.dense.bias": (i,),
             "output.dense.weight": (h, i), "output.dense.bias": (h,),
             "output.LayerNorm.weight": (h,), "output.LayerNorm.bias": (h,)}
    template = {f"bert.encoder.layer.{{}}.{name}": shape for name, shape in layer.items()}
    for n in range(config.num_hidden_layers):
        top.update({key.format(n): shape for key, shape in template.items()})
    assert len(top) == 16 * config.num_hidden_layers + 14
    return top


def to_hf(state_dict: Mapping[str, torch.Tensor], config: BertConfig) -> dict[str, torch.Tensor]:
    """Our state_dict as HF's model.safetensors holds it: tied aliases dropped, contiguous CPU tensors."""
    for alias, source in TIED.items():
        assert state_dict[alias].data_ptr() == state_dict[source].data_ptr(), f"{alias} is not tied to {source}"
    hf = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k not in TIED}
    _check_shapes(hf, config)
    return hf


def from_hf(hf_state: Mapping[str, torch.Tensor], config: BertConfig) -> dict[str, torch.Tensor]:
    """Inverse of `to_hf`: a state_dict our BertForPreTraining loads with strict=True.

    Also takes files that still hold the tied aliases (they must equal their source) or the legacy
    position_ids buffer.
    """
    state = {k: v for k, v in hf_state.items() if k not in LEGACY and k not in TIED}
    for alias, source in TIED.items():
        if alias in hf_state and not torch.equal(hf_state[alias], hf_state[source]):
            raise HFFormatError(f"{alias} differs from {source}; this model ties them")
    _check_shapes(state, config)
    state.update({alias: state[source] for alias, source in TIED.items()})
    assert len(state) == 16 * config.num_hidden_layers + 16
    return state


def _check_shapes(state: Mapping[str, torch.Tensor], config: BertConfig) -> None:
    expected = hf_shapes(config)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise HFFormatError(f"weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise HFFormatError(f"{key} has shape {tuple(state[key].shape)}, the config says {shape}")


def build_tokenizer(tokens: Sequence[str]) -> Tokenizer:
    """A WordLevel tokenizer giving our ids: `<cls> a <sep>` or `<cls> a <sep> b <sep>` with segment ids.

    It follows `bertpipe.vocab`'s rule step by step: Lowercase maps character by character; Python's
    str.split() also splits on U+001C..U+001F, which WhitespaceSplit (Rust's whitespace) does not, so
    the normalizer turns those into spaces first; the reserved tokens are special tokens matched in
    the normalized text (`normalized=True`), so `<MASK>` and `a<mask>` find `<mask>` as the rule does.
    """
    index = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.WordLevel(index, unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"[\x1c-\x1f]"), " "),
                                                 normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0", pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, index[CLS]), (SEP, index[SEP])])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=True) for t in SPECIAL_TOKENS])
    return tokenizer


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: the class must be the generic fast tokenizer, since a BERT class would
    rebuild a WordPiece pipeline; segment ids are a model input."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
            "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
            "clean_up_tokenization_spaces": False, **HF_ROLES}


def save_pretrained(folder: Path, model: BertForPreTraining, tokens: Sequence[str]) -> None:
    """Write an HF model folder: config, weights, and the tokenizer (`save_tokenizer`)."""
    config = model.config
    _write_json(folder / "config.json", config_to_hf(config))
    save_file(to_hf(model.state_dict(), config), str(folder / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(folder, tokens, config.max_position_embeddings)


def save_tokenizer(folder: Path, tokens: Sequence[str], model_max_length: int) -> None:
    """tokenizer.json and its two small JSON companions, as `AutoTokenizer.from_pretrained` reads them."""
    build_tokenizer(tokens).save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", tokenizer_config(model_max_length))
    _write_json(folder / "special_tokens_map.json", HF_ROLES)


def load_pretrained(folder: Path) -> tuple[BertForPreTraining, list[str]]:
    """Our model (eval mode) and the vocabulary in id order, from a folder `save_pretrained` wrote."""
    if not folder.is_dir():
        raise HFFormatError(f"model folder {folder} does not exist (the export stage writes it)")
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise HFFormatError(f"{folder} is not an exported model folder (missing {', '.join(missing)})")
    try:
        config = config_from_hf(json.loads((folder / "config.json").read_text()))
        weights = load_file(str(folder / "model.safetensors"))
        vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab()
    except Exception as err:  # tokenizers reports a bad file as a bare Exception
        raise HFFormatError(f"{folder} cannot be read ({err.__class__.__name__}: {str(err)[:200]})") from None
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(config.vocab_size)):
        raise HFFormatError(f"{folder}/tokenizer.json ids are not 0..{config.vocab_size - 1}")
    model = BertForPreTraining(config)
    model.load_state_dict(from_hf(weights, config))
    return model.eval(), tokens


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
