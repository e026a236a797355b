"""The starting checkpoint's weights in bertpipe's BERT (continued pretraining, `model.init`).

The checkpoint's keys are Hugging Face's, as ours are (`bertpipe.export.hf_compat`), from whichever class saved
it: BertForPreTraining (both heads), BertForMaskedLM (no pooler, no NSP head) or BertModel (the encoder alone,
keys without `bert.`); older files name LayerNorm's parameters gamma and beta. Each tensor is loaded as it is,
except the vocabulary's rows (`VOCAB_ROWS`), taken in the prepared tokenizer's numbering (bertpipe's reserved
tokens first: `bertpipe.data.tokenizer.reserved_first`). A head the run trains and the checkpoint lacks (the NSP
head and pooler of a BertForMaskedLM, the MLM head of a BertModel) keeps its fresh initialisation, and tensors
the run does not use are left out, each said in one line; a missing encoder tensor is an error.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from bertpipe.data.tokenizer import reserved_first, tokens_in_order
from bertpipe.errors import DataError, cause
from bertpipe.export.hf_compat import LEGACY, NEVER, TIED, VOCAB_ROWS, pretraining_key
from bertpipe.init.folder import InitError, Start
from bertpipe.model.bert import BertForPreTraining
from bertpipe.vocab import vocab_digest

log = logging.getLogger(__name__)
MLM_BIAS = "cls.predictions.bias"
HEADS = ("cls.", "bert.pooler.")  # what a run may start afresh when the checkpoint lacks it


def checkpoint_state(start: Start) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors files under bertpipe's (BertForPreTraining's) key names."""
    state: dict[str, torch.Tensor] = {}
    for path in start.weights:
        try:
            state |= load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise InitError(f"{path} cannot be read ({cause(err)}); rerun the init stage "
                            "(dvc repro -s -f init)") from None
    return {pretraining_key(key): tensor for key, tensor in state.items() if key not in LEGACY}


def load_start(model: BertForPreTraining, start: Start, checkpoint_ids: np.ndarray) -> None:
    """Copy the checkpoint's weights into `model` (built with its config), the vocabulary's rows as
    `checkpoint_ids[i]` (the checkpoint's id of our token i) says."""
    state = {key: tensor for key, tensor in checkpoint_state(start).items() if key not in TIED}
    ours = {key: tensor for key, tensor in model.state_dict().items() if key not in TIED}
    fresh = sorted(set(ours) - set(state))
    lacking = [key for key in fresh if not key.startswith(HEADS)]
    if lacking:
        raise InitError(f"model.init {start.record['model']} lacks {len(lacking)} of the encoder's tensors "
                        f"({', '.join(lacking[:3])}); it is not a BERT checkpoint bertpipe can continue")
    rows = torch.from_numpy(np.asarray(checkpoint_ids, dtype=np.int64))
    loaded = {key: state[key][rows] if key in VOCAB_ROWS else state[key] for key in ours if key in state}
    if MLM_BIAS in loaded and loaded[MLM_BIAS].shape == ours[MLM_BIAS].shape:
        loaded[MLM_BIAS] = unmasked_bias(loaded[MLM_BIAS], ours[MLM_BIAS])
    for key, tensor in loaded.items():
        if tensor.shape != ours[key].shape:
            raise InitError(f"model.init {start.record['model']}: {key} has shape {tuple(tensor.shape)}, its "
                            f"config.json says {tuple(ours[key].shape)}")
    model.load_state_dict(loaded, strict=False)  # in place: the tied MLM decoder follows the word embeddings
    if fresh:
        log.info("model.init %s has no %s: initialised afresh, as a run from scratch would be", start.record["model"],
                 ", ".join(fresh))
    unused = sorted(set(state) - set(ours))
    if unused:
        log.info("model.init %s: %d tensors this run does not use are left out (%s)", start.record["model"],
                 len(unused), ", ".join(unused[:4]))


def unmasked_bias(checkpoint_bias: torch.Tensor, initial_bias: torch.Tensor) -> torch.Tensor:
    """The checkpoint's MLM bias [V], except where a bertpipe export masked a token out of fill-mask (NEVER,
    `bertpipe.export.hf_compat`): a serving choice, not a learned weight, which training would pay for with a
    loss of 10^4 at every masked `[UNK]`; those tokens take the run's own initial bias (`initial_bias`)."""
    return torch.where(checkpoint_bias <= NEVER / 2, initial_bias, checkpoint_bias)


def start_ids(start: Start, vocab_sha: str) -> np.ndarray:
    """Per token id of the prepared data, the checkpoint's id (the prepare stage's `reserved_first` numbering,
    worked out again from models/init); refuses examples made with another tokenizer."""
    tokenizer, checkpoint_ids = reserved_first(start.tokenizer(), start.specials())
    if vocab_digest(tokens_in_order(tokenizer)) != vocab_sha:
        raise DataError(f"the examples were not made with model.init {start.record['model']}'s tokenizer "
                        f"(vocabulary {vocab_sha[:12]}); rerun the prepare and examples stages (dvc repro)")
    return np.asarray(checkpoint_ids, dtype=np.int64)
