"""The one typed, validated view of params.yaml.

Each section is a frozen dataclass (torchtitan style). `load_params` turns the YAML into
`Params`, refusing unknown keys, wrong types and out-of-range values with one line that names
the dotted key, the value and what is allowed, so a stage fails before any heavy work.
Library code takes these dataclasses and never opens params.yaml itself.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bertpipe.errors import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    # d2l's "Pretraining BERT": 2 layers, 128 hidden, 2 heads, FFN 256, dropout 0.2.
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=256, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
}
_BOUNDS = {"ge": (">=", operator.ge), "gt": (">", operator.gt), "le": ("<=", operator.le), "lt": ("<", operator.lt)}


def _spec(default: Any = dataclasses.MISSING, **rules: Any) -> Any:
    """A dataclass field carrying its validation rules (ge, gt, le, lt, choices, pattern)."""
    return field(default=default, metadata=rules)


@dataclass(frozen=True)
class DataConfig:
    source: str = ""
    urls: tuple[str, ...] = ()
    checksum: str = _spec("", pattern=r"|sha1:[0-9a-f]{40}|sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class PrepareConfig:
    min_freq: int = _spec(5, ge=1)


@dataclass(frozen=True)
class ExamplesConfig:
    strategy: str = _spec("sentence-pairs", choices=("sentence-pairs", "segments"))
    max_len: int = _spec(64, ge=8, le=65535)
    mask_prob: float = _spec(0.15, gt=0.0, le=1.0)
    mask_token_prob: float = _spec(0.8, ge=0.0, le=1.0)
    random_token_prob: float = _spec(0.1, ge=0.0, le=1.0)
    dupe_factor: int = _spec(1, ge=1)
    short_seq_prob: float = _spec(0.1, ge=0.0, le=1.0)

    def __post_init__(self) -> None:
        if self.mask_token_prob + self.random_token_prob > 1.0:
            raise ConfigError("examples.random_token_prob", self.random_token_prob,
                              f"at most 1 - examples.mask_token_prob = {1 - self.mask_token_prob:g}")

    @property
    def max_predictions(self) -> int:
        """Prediction slots per example: round(mask_prob * max_len), as d2l and Google do."""
        return max(1, round(self.max_len * self.mask_prob))


@dataclass(frozen=True)
class ModelConfig:
    """`preset` gives every size; an explicit key overrides it (null: the preset's value)."""

    preset: str = _spec("tiny", choices=tuple(PRESETS))
    hidden_size: int | None = _spec(None, ge=1)
    num_hidden_layers: int | None = _spec(None, ge=1)
    num_attention_heads: int | None = _spec(None, ge=1)
    intermediate_size: int | None = _spec(None, ge=1)
    hidden_dropout_prob: float | None = _spec(None, ge=0.0, lt=1.0)
    attention_probs_dropout_prob: float | None = _spec(None, ge=0.0, lt=1.0)
    max_position_embeddings: int = _spec(512, ge=8)
    layer_norm_eps: float = _spec(1e-12, gt=0.0)
    initializer_range: float = _spec(0.02, gt=0.0)

    def __post_init__(self) -> None:
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("model.hidden_size", self.hidden_size,
                              f"a multiple of model.num_attention_heads ({self.num_attention_heads})")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = _spec(512, ge=1)
    micro_batch_size: int | Literal["auto"] | None = _spec(None, ge=1)
    length_buckets: int = _spec(4, ge=1)
    steps: int = _spec(50, ge=1)
    lr: float = _spec(0.01, gt=0.0)
    optimizer: str = _spec("adam", choices=("adam", "adamw"))
    weight_decay: float = _spec(0.0, ge=0.0)
    schedule: str = _spec("constant", choices=("constant", "linear", "cosine"))
    warmup_steps: int = _spec(0, ge=0)
    grad_clip: float = _spec(0.0, ge=0.0)
    device: str = _spec("auto", choices=("auto", "cpu", "cuda"))
    nproc: int | Literal["auto"] = _spec("auto", ge=1)
    precision: str = _spec("auto", choices=("auto", "fp32", "bf16"))
    activation_checkpointing: bool = False
    epoch_per_copy: bool = False
    eval_every: int = _spec(10, ge=0)
    eval_examples: int = _spec(0, ge=0)
    log_every: int = _spec(1, ge=1)
    checkpoint_every: int = _spec(10, ge=1)
    keep_checkpoints: int = _spec(2, ge=1)
    skip_nonfinite: bool = False


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: str = _spec("best", choices=("best", "last"))  # best: the lowest held-out MLM loss
    sentences: tuple[tuple[str, ...], ...] = (("a crane is flying",),
                                              ("a crane driver came", "he just left"))

    def __post_init__(self) -> None:
        for i, item in enumerate(self.sentences):
            if not 1 <= len(item) <= 2 or not all(s.strip() for s in item):
                raise ConfigError(f"export.sentences[{i}]", list(item),
                                  "one sentence or a pair of non-empty sentences")


@dataclass(frozen=True)
class MlflowConfig:
    enabled: bool = True
    experiment: str = _spec("bertpipe", pattern=r"\S.*")
    run_name: str = ""
    system_metrics: bool = True
    register_model: str = ""


@dataclass(frozen=True)
class Params:
    seed: int = _spec(0, ge=0, lt=2**32)
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    examples: ExamplesConfig = field(default_factory=ExamplesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def __post_init__(self) -> None:
        if self.examples.max_len > self.model.max_position_embeddings:
            raise ConfigError("examples.max_len", self.examples.max_len,
                              f"at most model.max_position_embeddings ({self.model.max_position_embeddings})")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raises ConfigError naming the first bad key.

    The file is read as DVC reads it (ruamel.yaml's safe loader, YAML 1.2), so every value that
    `dvc exp run -S`, `dvc params diff` and `dvc exp show` take for a number is one here too:
    `lr: 5e-05` is a float (YAML 1.1 loaders such as PyYAML read it as a string).
    """
    from ruamel.yaml import YAML, YAMLError  # here, so model and training code import without it

    path = Path(path)
    try:
        raw = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(str(path), None, "an existing params file") from None
    except YAMLError as err:
        raise ConfigError(str(path), "unparsable YAML", f"valid YAML ({err.__class__.__name__})") from None
    return build(Params, raw if raw is not None else {})


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """Turn a mapping into the dataclass `cls`, checking keys, types and ranges recursively."""
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip(".") or "params", raw, "a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [key for key in raw if key not in fields]
    if unknown:
        raise ConfigError(prefix + str(unknown[0]), raw[unknown[0]], f"one of the keys {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        key = prefix + name
        values[name] = _convert(hints[name], value, key)
        _check_rules(fields[name].metadata, values[name], key)
    return cls(**values)


def flatten(params: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a Params tree (MLflow's params, DVC's `-S` names)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def _convert(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key + ".")
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    for option in options:
        ok, converted = _try_convert(option, value)
        if ok:
            return converted
    raise ConfigError(key, value, _describe(hint))


def _try_convert(hint: Any, value: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if hint is type(None):
        return value is None, None
    if origin is Literal:
        return value in typing.get_args(hint), value
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        if not isinstance(value, list):
            return False, None
        items = [_try_convert(item_hint, v) for v in value]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else None
    if hint is str:
        return isinstance(value, str), value
    return False, None


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if _is_union(hint):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return {bool: "true/false", int: "an integer", float: "a finite number", str: "a string"}.get(hint, str(hint))


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _check_rules(rules: typing.Mapping[str, Any], value: Any, key: str) -> None:
    if "choices" in rules and value not in rules["choices"]:
        raise ConfigError(key, value, "one of " + ", ".join(map(str, rules["choices"])))
    if "pattern" in rules and not re.fullmatch(rules["pattern"], value):
        raise ConfigError(key, value, f"a string matching {rules['pattern']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for name, (symbol, test) in _BOUNDS.items():
            if name in rules and not test(value, rules[name]):
                raise ConfigError(key, value, f"a value {symbol} {rules[name]}")
