"""The one place that maps bertpipe's BERT to Hugging Face's files, and back.

Our `BertForPreTraining.state_dict()` already uses HF's key names (`bertpipe.model.bert`), so the mapping is a
template of HF's keys and shapes (torchtitan's `{}` layer slot) plus the few things that cannot
match by name: the tied `cls.predictions.decoder.{weight,bias}`, which `transformers`'
`save_pretrained` leaves out of model.safetensors (they alias the word embeddings and
`cls.predictions.bias`), the legacy `bert.embeddings.position_ids` buffer of older HF files, and the names
other BERT files use (`pretraining_key`: BertModel's keys without `bert.`, LayerNorm's old gamma and beta).
The tokenizer is the prepare stage's `tokenizer.json` (`bertpipe.data.tokenizer`), with the companions
`transformers` reads beside it: for WordPiece a standard BERT folder (vocab.txt, `BertTokenizer`), for d2l's words
the generic fast tokenizer; a continued checkpoint's export (`save_in_checkpoint_order`) takes the starting
checkpoint's tokenizer files as they are, its vocabulary's rows put back in their numbering. Nothing here imports
`transformers`: the files are written from their documented formats, and the tests load them with `transformers` to
prove it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, normalizers

from bertpipe.data.tokenizer import tokens_in_order
from bertpipe.errors import PipelineError, cause
from bertpipe.model.bert import BertConfig, BertForPreTraining
from bertpipe.vocab import WORDPIECE_SPECIAL_TOKENS, hf_roles, specials_in, specials_of

# Aliases that HF recreates on load by tying; the key maps to the tensor it shares.
TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias"}
LEGACY = ("bert.embeddings.position_ids",)  # a buffer older HF versions saved; nothing learned
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class HFFormatError(PipelineError):
    """A model folder that is missing or not an export of this pipeline."""


PRETRAINING, MASKED_LM = "BertForPreTraining", "BertForMaskedLM"  # with and without the NSP head


def config_to_hf(config: BertConfig, next_sentence: bool = True) -> dict[str, Any]:
    """config.json for `transformers.BertConfig` (our field names are HF's); `architectures` names the
    class whose keys the weights hold."""
    return {"architectures": [PRETRAINING if next_sentence else MASKED_LM], "model_type": "bert",
            "tie_word_embeddings": True, **asdict(config)}


def config_from_hf(raw: Mapping[str, Any]) -> BertConfig:
    """Our BertConfig from an HF config.json, ignoring the HF-only keys."""
    names = {f.name for f in fields(BertConfig)}
    return BertConfig(**{k: v for k, v in raw.items() if k in names})


def hf_shapes(config: BertConfig, next_sentence: bool = True) -> dict[str, tuple[int, ...]]:
    """Every key HF's `save_pretrained` writes for BertForPreTraining (16·L + 14 keys), or without
    `next_sentence` for BertForMaskedLM (no pooler, no NSP head: 16·L + 10), with its shape."""
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
    if not next_sentence:
        top = {key: shape for key, shape in top.items() if key not in NSP_KEYS}
    return top


NSP_KEYS = ("bert.pooler.dense.weight", "bert.pooler.dense.bias", "cls.seq_relationship.weight",
            "cls.seq_relationship.bias")


def to_hf(state_dict: Mapping[str, torch.Tensor], config: BertConfig,
          next_sentence: bool = True) -> dict[str, torch.Tensor]:
    """Our state_dict as HF's model.safetensors holds it: tied aliases dropped, contiguous CPU tensors."""
    for alias, source in TIED.items():
        assert state_dict[alias].data_ptr() == state_dict[source].data_ptr(), f"{alias} is not tied to {source}"
    hf = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k not in TIED}
    _check_shapes(hf, config, next_sentence)
    return hf


def pretraining_key(key: str) -> str:
    """A key of any BERT class's file under BertForPreTraining's name: BertModel's `embeddings.x` is
    `bert.embeddings.x`; LayerNorm's old `gamma` and `beta` (bert-base-uncased still has them) are its weight and
    bias."""
    if not key.startswith(("bert.", "cls.")):
        key = f"bert.{key}"
    for old, new in ((".LayerNorm.gamma", ".LayerNorm.weight"), (".LayerNorm.beta", ".LayerNorm.bias")):
        if key.endswith(old):
            key = key.removesuffix(old) + new
    return key


def from_hf(hf_state: Mapping[str, torch.Tensor], config: BertConfig,
            next_sentence: bool = True) -> dict[str, torch.Tensor]:
    """Inverse of `to_hf`: a state_dict our BertForPreTraining(config, next_sentence) loads with strict=True.

    Also takes files that still hold the tied aliases (they must equal their source) or the legacy
    position_ids buffer.
    """
    state = {k: v for k, v in hf_state.items() if k not in LEGACY and k not in TIED}
    for alias, source in TIED.items():
        if alias in hf_state and not torch.equal(hf_state[alias], hf_state[source]):
            raise HFFormatError(f"{alias} differs from {source}; this model ties them")
    _check_shapes(state, config, next_sentence)
    state.update({alias: state[source] for alias, source in TIED.items()})
    return state


def _check_shapes(state: Mapping[str, torch.Tensor], config: BertConfig, next_sentence: bool) -> None:
    expected = hf_shapes(config, next_sentence)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise HFFormatError(f"weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise HFFormatError(f"{key} has shape {tuple(state[key].shape)}, the config says {shape}")


def tokenizer_config(specials: tuple[str, ...], model_max_length: int,
                     normalizer: normalizers.Normalizer) -> dict[str, Any]:
    """tokenizer_config.json. WordPiece: BERT's own class and settings, so code written for Google's
    checkpoints takes the folder; `do_lower_case` and `strip_accents` are read off tokenizer.json's
    BertNormalizer (`prepare.lowercase`, `prepare.strip_accents`; `bertpipe.data.tokenizer`), because
    `BertTokenizer` rebuilds its normalizer from them, not from that file, and would otherwise read
    cased text lowercased. Words: the generic fast tokenizer. `BertTokenizer`/`BertTokenizerFast.
    from_pretrained` would rebuild a WordPiece pipeline from the word list, ignoring tokenizer.json
    (transformers 5), and silently read text differently (`crane,` as `crane ,`); the config gives those
    classes a value they cannot take (`tokenize_chinese_chars` must be a bool; the generic class ignores
    it), so they fail at load, the reason written in the file. Segment ids are a model input either way."""
    common = {"model_max_length": model_max_length, "model_input_names": ["input_ids", "token_type_ids",
                                                                         "attention_mask"], **hf_roles(specials)}
    if specials == WORDPIECE_SPECIAL_TOKENS:
        return common | {"tokenizer_class": "BertTokenizer", "do_lower_case": normalizer.lowercase,
                         "tokenize_chinese_chars": True, "strip_accents": normalizer.strip_accents,
                         "clean_up_tokenization_spaces": True}
    return common | {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                     "tokenize_chinese_chars": NOT_BERT}


NOT_BERT = ("not a BERT tokenizer: d2l's word vocabulary (bertpipe), which BertTokenizer would read differently; "
            "load it with AutoTokenizer or PreTrainedTokenizerFast")


def save_pretrained(folder: Path, model: BertForPreTraining, tokenizer: Tokenizer) -> None:
    """Write an HF model folder: config, weights, and the tokenizer (`save_tokenizer`)."""
    config = model.config
    _write_json(folder / "config.json", config_to_hf(config, model.next_sentence))
    save_file(to_hf(model.state_dict(), config, model.next_sentence), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    save_tokenizer(folder, tokenizer, config.max_position_embeddings)


def save_tokenizer(folder: Path, tokenizer: Tokenizer, model_max_length: int) -> None:
    """tokenizer.json and its companions, as `AutoTokenizer.from_pretrained` reads them; for WordPiece
    also vocab.txt, one token per line in id order (what BERT code written for Google's files reads)."""
    tokens = tokens_in_order(tokenizer)
    specials = specials_of(tokens)
    tokenizer.save(str(folder / "tokenizer.json"))
    _write_json(folder / "tokenizer_config.json", tokenizer_config(specials, model_max_length, tokenizer.normalizer))
    _write_json(folder / "special_tokens_map.json", hf_roles(specials))
    if specials == WORDPIECE_SPECIAL_TOKENS:
        (folder / "vocab.txt").write_text("".join(f"{token}\n" for token in tokens), encoding="utf-8")


# The tensors whose rows are the vocabulary's: a continued checkpoint's are in bertpipe's numbering while it trains
# (its reserved tokens first, `bertpipe.data.tokenizer.reserved_first`) and go back to its own in the export.
# An exported MLM bias of NEVER keeps a token out of fill-mask's answers (`bertpipe.export.export.
# never_answer_reserved`): no trained logit overcomes it, exp(-10^4) underflows to 0 in fp32 and bf16.
NEVER = -1e4
VOCAB_ROWS = ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias")


def save_in_checkpoint_order(folder: Path, model: BertForPreTraining, checkpoint_ids: np.ndarray,
                             tokenizer_files: Path) -> None:
    """An HF model folder for a continued checkpoint (`model.init`): the vocabulary's rows back in the starting
    checkpoint's numbering (`checkpoint_ids[i]`: its id of our token i), pad_token_id its own, and its tokenizer
    files (`tokenizer_files`, a folder) unchanged, so the folder loads wherever the starting checkpoint did and
    reads text into the same ids."""
    config = model.config
    _write_json(folder / "config.json", config_to_hf(config, model.next_sentence)
                | {"pad_token_id": int(checkpoint_ids[config.pad_token_id])})
    weights = to_hf(model.state_dict(), config, model.next_sentence)
    ours = torch.from_numpy(np.argsort(checkpoint_ids))  # row j of the checkpoint's numbering is our row ours[j]
    weights |= {key: weights[key][ours].contiguous() for key in VOCAB_ROWS}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for path in sorted(tokenizer_files.iterdir()):
        shutil.copyfile(path, folder / path.name)


def load_pretrained(folder: Path) -> tuple[BertForPreTraining, Tokenizer]:
    """Our model (eval mode) and its tokenizer, from a folder `save_pretrained` wrote: the export of a run from
    scratch (reserved tokens first) or of a continued one, or any BERT checkpoint with BERT's reserved tokens, in
    its own numbering."""
    if not folder.is_dir():
        raise HFFormatError(f"model folder {folder} does not exist (the export stage writes it)")
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise HFFormatError(f"{folder} is not an exported model folder (missing {', '.join(missing)})")
    try:
        raw_config = json.loads((folder / "config.json").read_text())
        config = config_from_hf(raw_config)
        weights = load_file(str(folder / "model.safetensors"))
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokens = tokens_in_order(tokenizer)
        specials_in(tokens)
    except Exception as err:  # tokenizers reports a bad file as a bare Exception
        raise HFFormatError(f"{folder} cannot be read ({cause(err)})") from None
    if len(tokens) != config.vocab_size:
        raise HFFormatError(f"{folder}/tokenizer.json holds {len(tokens)} tokens, config.json says {config.vocab_size}")
    weights = {pretraining_key(key): tensor for key, tensor in weights.items()}
    next_sentence = "cls.seq_relationship.weight" in weights  # what the file holds, whatever `architectures` says
    if not next_sentence:  # a pooler without the NSP head serves nothing here
        weights = {key: tensor for key, tensor in weights.items() if not key.startswith("bert.pooler.")}
    model = BertForPreTraining(config, next_sentence)
    model.load_state_dict(from_hf(weights, config, next_sentence))
    return model.eval(), tokenizer


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
