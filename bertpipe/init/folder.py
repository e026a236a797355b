"""The init stage's folder (`models/init`), written by `bertpipe.init.fetch` and read by the prepare, pretrain
and downstream stages: the BERT that continued pretraining starts from, as the Hub or your folder has it.

    init.json              what it is: `model` (model.init), the `revision` asked for, the `commit` the Hub
                           resolved it to (null for a folder), `weights_sha256`, and `run` (a bertpipe export's
                           bertpipe.json: its MLflow run and step) when it is one
    config.json            the checkpoint's (model_type bert): the model's sizes
    *.safetensors          its weights (model.safetensors, or shards beside model.safetensors.index.json)
    tokenizer.json         its tokenizer (built from vocab.txt and tokenizer_config.json where it had none)
    tokenizer_config.json, special_tokens_map.json, vocab.txt   as the checkpoint has them

With model.init empty the folder holds init.json alone, `{"model": ""}`: a run from scratch, which nothing
here changes. Nothing in this module imports torch or transformers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from bertpipe.config import Params
from bertpipe.errors import ConfigError, PipelineError, cause
from bertpipe.vocab import HF_ROLE_NAMES, WORDPIECE_SPECIAL_TOKENS

RECORD, CONFIG, TOKENIZER = "init.json", "config.json", "tokenizer.json"
# The pretrain run's MLflow tags naming its start (`Start.tags`), in this order: the model, its resolved
# commit, its weights' sha256 and, for a bertpipe export, the run and step that made it.
INIT_TAGS = ("bertpipe.init", "bertpipe.init_commit", "bertpipe.init_weights_sha256", "bertpipe.init_run_id",
             "bertpipe.init_step")
EXPORT_RECORD = "bertpipe.json"  # what a bertpipe export says of itself (bertpipe.export.export)
TOKENIZER_FILES = (TOKENIZER, "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
WEIGHT_INDEX = "model.safetensors.index.json"
# Weights that only unpickling reads: loading one runs whatever code its author put in it.
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "model.ckpt.index", "flax_model.msgpack")


class InitError(PipelineError):
    """A starting checkpoint that cannot be fetched or is not one bertpipe can continue."""


@dataclass(frozen=True)
class Start:
    """A fetched starting checkpoint: its folder, init.json and config.json."""

    folder: Path
    record: dict[str, Any]
    config: dict[str, Any]

    @property
    def weights(self) -> list[Path]:
        """The safetensors files of the weights (`weight_files`)."""
        return weight_files(self.folder)

    def identity(self) -> dict[str, Any]:
        """What a run started from it depends on (`bertpipe.training.checkpoint.trajectory_spec`'s `init`)."""
        return {key: self.record.get(key) for key in ("model", "commit", "weights_sha256")}

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.folder / TOKENIZER))

    def tags(self) -> dict[str, str]:
        """The pretrain run's MLflow tags: what it started from, the resolved commit, and, for a bertpipe export,
        the run that trained it (`bertpipe.init_run_id`), which links the two phases of a run in MLflow."""
        run = self.record.get("run") or {}
        values = (self.record["model"], self.record.get("commit"), self.record.get("weights_sha256"),
                  run.get("mlflow_run_id"), run.get("step"))
        return {key: str(value) for key, value in zip(INIT_TAGS, values, strict=True) if value is not None}

    def specials(self) -> tuple[str, ...]:
        """Its reserved tokens in bertpipe's id order (`bertpipe.vocab`), as its tokenizer_config names them."""
        return reserved_tokens(self.folder)


def read_start(folder: Path) -> Start | None:
    """The checkpoint models/init holds, or None where model.init is empty."""
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
        if not record.get("model"):
            return None
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, AttributeError) as err:
        raise InitError(f"{folder} cannot be read ({cause(err)}); rerun the init stage (dvc repro init)") from None
    return Start(folder, record, config)


def check_model(folder: Path, name: str, offered: list[str]) -> dict[str, Any]:
    """Its config.json, once the folder is shown to hold a BERT (config.json of model_type bert) with weights in
    safetensors; `offered` lists the files where it came from, to say why a pickle-only one is refused. `name`
    says where it came from."""
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InitError(f"{name} has no readable config.json ({cause(err)}); expected a Hugging Face BERT "
                        "folder") from None
    if not isinstance(config, dict) or config.get("model_type") != "bert":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise InitError(f"{name} is a {kind!r} checkpoint (config.json model_type), not BERT; model.init takes a "
                        "BERT (model_type 'bert')")
    if not weight_files(folder):
        raise refuse_pickles(name, offered)
    return config


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files that hold the weights, as transformers reads them: the shards
    model.safetensors.index.json names, else model.safetensors; none if neither is there (other `*.safetensors`,
    such as a variant `model.fp16.safetensors`, are not the weights)."""
    try:
        index = json.loads((folder / WEIGHT_INDEX).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []
    except (OSError, ValueError) as err:
        raise InitError(f"{folder / WEIGHT_INDEX} cannot be read ({cause(err)})") from None
    shards = sorted(set(index.get("weight_map", {}).values())) if isinstance(index, dict) else []
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing or not shards:
        raise InitError(f"{folder / WEIGHT_INDEX} names shards that are not there ({', '.join(missing) or 'none'})")
    return [folder / name for name in shards]


def check_tokenizer(folder: Path, name: str, config: dict[str, Any]) -> None:
    """A WordPiece tokenizer.json holding BERT's reserved tokens, as many tokens as config.json's vocab_size."""
    if not (folder / TOKENIZER).is_file():
        raise InitError(f"{name} has no tokenizer (tokenizer.json, or vocab.txt with tokenizer_config.json)")
    try:
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER))
    except Exception as err:  # tokenizers reports a bad file as a bare Exception
        raise InitError(f"{name}'s tokenizer.json cannot be read ({cause(err)})") from None
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    specials = reserved_tokens(folder)
    missing = [f"{role} {token}" for role, token in zip(HF_ROLE_NAMES, specials, strict=True) if token not in vocab]
    if missing:
        raise InitError(f"{name}'s tokenizer lacks its special tokens ({', '.join(missing)}); bertpipe needs "
                        f"{' '.join(WORDPIECE_SPECIAL_TOKENS)} to mask, pad and build pairs")
    if specials != WORDPIECE_SPECIAL_TOKENS:
        raise InitError(f"{name}'s special tokens are {' '.join(specials)}; bertpipe continues BERTs whose "
                        f"tokenizer spells them {' '.join(WORDPIECE_SPECIAL_TOKENS)}")
    if json.loads(tokenizer.to_str())["model"]["type"] != "WordPiece" or len(vocab) != config.get("vocab_size"):
        raise InitError(f"{name}'s tokenizer is not BERT's WordPiece of config.json's vocab_size "
                        f"{config.get('vocab_size')} tokens (it holds {len(vocab)})")


def refuse_pickles(name: str, files: list[str]) -> InitError:
    """The one line for a checkpoint without safetensors weights: why a pickle is refused, how to convert it."""
    pickles = sorted(set(files) & set(PICKLES))
    if not pickles:
        return InitError(f"{name} has no model.safetensors; bertpipe reads BERT weights from safetensors only")
    return InitError(f"{name} offers its weights only as {', '.join(pickles)}, a pickle, which bertpipe does not load "
                     "(unpickling runs any code the file holds); pick a revision with model.safetensors "
                     "(model.init_revision), or convert it yourself, at your own risk: transformers' "
                     "AutoModelForPreTraining.from_pretrained(...).save_pretrained(folder, safe_serialization=True)")


def reserved_tokens(folder: Path) -> tuple[str, ...]:
    """unk, pad, mask, cls and sep tokens as the checkpoint's tokenizer_config.json (or special_tokens_map.json)
    names them, BERT's where neither does."""
    roles: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config's word wins
        try:
            roles |= json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            continue
    tokens = []
    for role, default in zip(HF_ROLE_NAMES, WORDPIECE_SPECIAL_TOKENS, strict=True):
        token = roles.get(role, default)
        tokens.append(token.get("content", default) if isinstance(token, dict) else str(token))
    return tuple(tokens)


def sha256_of(paths: list[Path]) -> str:
    """The sha256 of the files' bytes in order (the weights a run starts from): for one model.safetensors, the
    digest `sha256sum` and the Hub show."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_dropout_prob",
         "attention_probs_dropout_prob")  # model.* keys that are null unless set: set, they must agree
TAKEN = ("max_position_embeddings", "layer_norm_eps", "initializer_range")  # model.* keys the checkpoint replaces
# transformers' BertConfig defaults (BERT-base), for a config.json that leaves a key out
HF_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
               "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512,
               "layer_norm_eps": 1e-12, "initializer_range": 0.02}


def model_params(params: Params, start: Start | None) -> Params:
    """`params` with model.* the starting checkpoint's (its config.json gives the model's shape), checked against
    what params.yaml says; unchanged for a run from scratch. Each disagreement is one line: an explicit size
    that differs, examples.max_len beyond the checkpoint's positions, a models/init of another model.init."""
    fetched = start.record["model"] if start is not None else ""
    if fetched != params.model.init:
        raise ConfigError("model.init", params.model.init, f"the model the init stage fetched ({fetched!r} in "
                                                           "models/init/init.json): run `dvc repro init` first")
    if start is None:
        return params
    config, name = HF_DEFAULTS | start.config, f"model.init {params.model.init}"
    if config.get("hidden_act", "gelu") != "gelu" or config.get("type_vocab_size", 2) != 2:
        raise InitError(f"{name} has hidden_act {config.get('hidden_act')!r} and type_vocab_size "
                        f"{config.get('type_vocab_size')}; bertpipe's BERT has exact GELU and two segments")
    for key in SIZES:
        given = getattr(params.model, key)
        if given is not None and given != config[key]:
            raise ConfigError(f"model.{key}", given, f"null or {config[key]!r}, the value in {name}'s "
                                                     "config.json (the checkpoint gives the model's shape)")
    positions = config["max_position_embeddings"]
    if params.examples.max_len > positions:
        raise ConfigError("examples.max_len", params.examples.max_len, f"at most {positions}, the "
                                                                       f"max_position_embeddings of {name}")
    model = params.model.model_copy(update={key: config[key] for key in SIZES + TAKEN})
    return params.model_copy(update={"model": model})
