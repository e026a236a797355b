"""The one typed, validated view of params.yaml: pydantic models, one per section.

Every model is frozen, refuses unknown keys and takes values in their own type (strict: `"5"` is
not 5, `true` is not 1; an integer is a float), with ranges and cross-field rules declared beside
the fields. `load_params` reads the file as DVC does and turns pydantic's first error into one
line naming the dotted key, the value and what is allowed, so a stage fails before any heavy
work. The "auto" values (device, nproc, threads, precision, micro-batch) are settled once, by
`bertpipe.resolve`. Library code takes these models and never opens params.yaml itself.
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bertpipe.errors import ConfigError, cause
from bertpipe.vocab import WORDPIECE_SPECIAL_TOKENS

PRESETS: dict[str, dict[str, Any]] = {
    # d2l's "Pretraining BERT": 2 layers, 128 hidden, 2 heads, FFN 256, dropout 0.2.
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=256, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
}
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Positive = Annotated[int, Field(ge=1)]
Number = Annotated[float, Field(allow_inf_nan=False)]
Strings = Annotated[tuple[str, ...], Field(strict=False)]  # YAML lists become tuples
Seed = Annotated[int, Field(ge=0, lt=2**32)]
# GLUE's tasks in its paper's order, WNLI left out as the field does (its dev set is adversarial to
# memorising models, and BERT and its successors report it at the majority class). The files behind
# each name are bertpipe/downstream/glue.py's.
GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
SMALL_GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "rte")  # the default: minutes on a 2-core CPU
NONE = type(None)
OWN_TASK_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


# How values are read and refused: `dvc_equal` reads a value that Python (and so DVC) deems equal to a
# valid one as that one; `config_error` turns pydantic's first error into one line naming the key.
def dvc_equal(value: Any, annotation: Any) -> Any:
    """`value`, or the value of the field's own type that Python deems equal to it: DVC decides a stage
    is up to date by Python's `==` on the values (`bertpipe.config.Section`). A true/false field that
    also takes null (`prepare.strip_accents`) reads 0 and 1 alike; no number equals null."""
    kinds = _kinds(annotation)
    if isinstance(value, float) and value.is_integer() and int in kinds and float not in kinds:
        return int(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and value in (0, 1) and kinds - {NONE} == {bool}:
        return bool(value)
    return value


def _kinds(hint: Any) -> set[Any]:
    """The plain types a field annotation admits (Literal values count as their types)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _kinds(args[0])
    if origin in (typing.Union, types.UnionType):
        return set().union(*map(_kinds, args))
    if origin is Literal:
        return {type(arg) for arg in args}
    return {origin or hint}


_BOUNDS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"), "less_than_equal": ("le", "<="),
           "less_than": ("lt", "<")}


def config_error(err: ValidationError, cls: type[BaseModel], raw: dict) -> ConfigError:
    """The first error as `params.yaml: key = value is not allowed; expected ...`."""
    first = err.errors()[0]
    if first["type"] == "value_error" and isinstance(first["ctx"]["error"], ConfigError):
        return first["ctx"]["error"]  # a cross-field rule: it names its own key
    path, model, value = _locate(first["loc"], cls, raw)
    key = ".".join(map(str, path))
    if path[-1] not in model.model_fields:
        return ConfigError(key, value, f"one of the keys {sorted(model.model_fields)}")
    field_errors = [e for e in err.errors() if tuple(e["loc"][:len(path)]) == tuple(path)]
    return ConfigError(key, value, _allowed(field_errors, model.model_fields[path[-1]].annotation))


def _locate(loc: tuple, cls: type[BaseModel], raw: Any) -> tuple[list, type[BaseModel], Any]:
    """The path of keys in `loc` that exist in `raw` (union member tags cut off), the model holding the
    last of them, and its raw value."""
    path, parent, value = [], cls, raw
    for part in loc:
        if not isinstance(value, dict) or part not in value:
            break
        if path:
            annotation = parent.model_fields[path[-1]].annotation
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                break
            parent = annotation
        path.append(part)
        value = value[part]
    return path, parent, value


def _allowed(errors: list[dict], annotation: Any) -> str:
    """What the field takes: the violated range or pattern when the type was right, else its type."""
    for error in errors:
        if error["type"] in _BOUNDS:
            name, symbol = _BOUNDS[error["type"]]
            return f"a value {symbol} {error['ctx'][name]}"
        if error["type"] == "string_pattern_mismatch":
            return f"a string matching {error['ctx']['pattern']}"
        if error["type"] == "finite_number":
            return "a finite number"
    return _describe(annotation)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _describe(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in args)
    if hint is NONE:
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(args) if len(args) > 1 else repr(args[0])
    if origin is tuple:
        return f"a list of {_describe(args[0])}"
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a finite number", str: "a string"}.get(hint, str(hint))


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _read_as_dvc_compares(cls, raw: Any) -> Any:
        """DVC decides a stage is up to date by Python's `==` on the values, so `batch_size: 512.0` after a
        run with 512, or `skip_nonfinite: 1` after `true`, reruns nothing. A value equal to a valid one must
        therefore *be* that one here too (else it would pass unchecked): an integral float in an integer
        field is that integer, 0 and 1 in a true/false field are false and true."""
        if not isinstance(raw, dict):
            return raw
        return {key: dvc_equal(value, cls.model_fields[key].annotation) if key in cls.model_fields else value
                for key, value in raw.items()}


class DataConfig(Section):
    dataset: Literal["wikitext-2", "wikitext-103"] = Field(
        "wikitext-2", description="the corpus to download (bertpipe.data.datasets); unused when `source` is set")
    source: str = Field("", description="instead of downloading: a local archive of `dataset`, a folder of WikiText "
                                        "split files, or a folder of your own text (train.*, valid.*)")
    urls: Strings = Field((), description="mirrors, tried in order (.zip or parquet folders ending in /); "
                                          "empty: the dataset's own")
    checksum: str = Field("", pattern=r"^(|sha1:[0-9a-f]{40}|sha256:[0-9a-f]{64})$",
                          description="of the zip, checked before extraction; empty: the dataset's recorded one")


class PrepareConfig(Section):
    tokenizer: Literal["word", "wordpiece", "pretrained"] = Field(
        "word", description="d2l's word vocabulary, BERT's WordPiece trained on the train split, or (with "
                            "model.init) the starting checkpoint's own tokenizer, as it is")
    sentences: Literal["wikitext", "sentencex", "lines"] = Field(
        "wikitext", description="d2l's split on ' . ', the sentencex segmenter (any language), or one per line")
    language: str = Field("en", pattern=r"^[a-z]{2,3}([_-][A-Za-z0-9]{2,8})*$",
                          description="the text's language (ISO 639 code) for sentences: sentencex")
    min_freq: Positive = Field(5, description="tokenizer word: vocabulary threshold (d2l's)")
    vocab_size: int = Field(30522, ge=len(WORDPIECE_SPECIAL_TOKENS) + 1,
                            description="tokenizer wordpiece: vocabulary size, reserved tokens included")
    lowercase: bool = Field(True, description="BERT's do_lower_case: lowercase the text (Unicode's mapping, "
                                              "not a language's); false: cased, as Google's cased BERTs")
    strip_accents: bool | None = Field(
        None, description="BERT's strip_accents, WordPiece only: decompose (NFD) and drop the combining marks; "
                          "null: when lowercasing (BERT's rule); d2l's words never strip them")

    @model_validator(mode="after")
    def _accents_are_wordpieces(self) -> PrepareConfig:
        if self.strip_accents and self.tokenizer == "word":
            raise ConfigError("prepare.strip_accents", True, "false or null with prepare.tokenizer: word (d2l's "
                              "words keep their accents; stripping them is WordPiece's, prepare.tokenizer: wordpiece)")
        return self


class ExamplesConfig(Section):
    strategy: Literal["sentence-pairs", "segments"] = Field(
        "sentence-pairs", description="d2l's sentence pairs, or Google's segments filling max_len")
    max_len: int = Field(64, ge=8, le=65535, description="tokens per example, <cls> and <sep> included")
    mask_prob: Probability = Field(0.15, gt=0.0, description="share of tokens predicted")
    mask_token_prob: Probability = Field(0.8, description="of those, share replaced by <mask>")
    random_token_prob: Probability = Field(0.1, description="share replaced by a random word")
    dupe_factor: Positive = Field(1, description="differently drawn copies of the training examples")
    short_seq_prob: Probability = Field(0.1, description="segments only: share of shorter targets")
    whole_word_mask: bool = Field(False, description="mask every piece of a word together (WordPiece only)")

    @model_validator(mode="after")
    def _replacements_fit(self) -> ExamplesConfig:
        if self.mask_token_prob + self.random_token_prob > 1.0:
            raise ConfigError("examples.random_token_prob", self.random_token_prob,
                              f"at most 1 - examples.mask_token_prob = {1 - self.mask_token_prob:g}")
        return self

    @property
    def max_predictions(self) -> int:
        """Prediction slots per example: round(mask_prob * max_len), as d2l and Google do."""
        return max(1, round(self.max_len * self.mask_prob))


class ModelConfig(Section):
    """`preset` gives every size; an explicit key overrides it (null: the preset's value). Names are
    Hugging Face's BertConfig's, so `bertpipe.model.bert.BertConfig(vocab_size=v, **fields)` takes them.
    With `init` (continued pretraining) the checkpoint's config.json gives every size instead: the preset
    is not read, and the keys stay null until `bertpipe.init.folder.model_params` fills them from it."""

    init: str = Field("", description="empty: from scratch; a Hugging Face model id or a folder of a BERT "
                                      "(safetensors weights) to continue pretraining from (bertpipe.init)")
    init_revision: str = Field("", description="model.init's Hub branch, tag or commit; empty: main")
    preset: Literal["tiny", "base", "large"] = Field("tiny", description="d2l's tiny, BERT-base or BERT-large")
    hidden_size: Positive | None = Field(None, description="width of every layer; a multiple of the heads")
    num_hidden_layers: Positive | None = Field(None, description="encoder layers")
    num_attention_heads: Positive | None = Field(None, description="attention heads per layer")
    intermediate_size: Positive | None = Field(None, description="feed-forward width")
    hidden_dropout_prob: Annotated[float, Field(ge=0.0, lt=1.0)] | None = Field(
        None, description="dropout after embeddings and each sub-layer")
    attention_probs_dropout_prob: Annotated[float, Field(ge=0.0, lt=1.0)] | None = Field(
        None, description="dropout on the attention probabilities")
    max_position_embeddings: int = Field(512, ge=8, description="the position table; at least examples.max_len")
    layer_norm_eps: Number = Field(1e-12, gt=0.0, description="LayerNorm's epsilon")
    initializer_range: Number = Field(0.02, gt=0.0, description="std of the normal initial weights")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or raw.get("preset", "tiny") not in PRESETS or raw.get("init"):
            return raw
        sizes = PRESETS[raw.get("preset", "tiny")]
        return {**raw, **{key: value for key, value in sizes.items() if raw.get(key) is None}}

    @model_validator(mode="after")
    def _revision_needs_a_model(self) -> ModelConfig:
        if self.init_revision and not self.init:
            raise ConfigError("model.init_revision", self.init_revision, "empty without model.init (a revision of "
                                                                         "the Hub model model.init names)")
        return self

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelConfig:
        if self.hidden_size and self.num_attention_heads and self.hidden_size % self.num_attention_heads:
            raise ConfigError("model.hidden_size", self.hidden_size,
                              f"a multiple of model.num_attention_heads ({self.num_attention_heads})")
        return self

    def architecture(self) -> dict[str, Any]:
        """The fields `bertpipe.model.bert.BertConfig` takes (all but the preset and the starting checkpoint)."""
        return self.model_dump(exclude={"preset", "init", "init_revision"})


class TrainConfig(Section):
    batch_size: Positive = Field(512, description="global, whatever the number of processes")
    micro_batch_size: Positive | Literal["auto"] | None = Field(
        None, description="rows per forward/backward; null: as length_buckets cuts it; auto: the largest that fits")
    length_buckets: Positive = Field(4, description="each rank's share cut into length-sorted micro-batches")
    steps: Positive = Field(50, description="optimizer steps")
    lr: Number = Field(0.01, gt=0.0, description="peak learning rate")
    objective: Literal["mlm+nsp", "mlm"] = Field(
        "mlm+nsp", description="MLM + NSP (BERT's, the seed's) or MLM alone (RoBERTa's: single segments of "
                               "contiguous sentences, examples.strategy: segments)")
    optimizer: Literal["adam", "adamw", "lamb"] = Field(
        "adam", description="Adam (the seed's), AdamW, or LAMB (pytorch-optimizer's) for large batches")
    weight_decay: Number = Field(0.0, ge=0.0, description="not on biases and LayerNorm weights")
    schedule: Literal["constant", "linear", "cosine", "poly"] = Field(
        "constant", description="decay to 0 at `steps`; poly: BERT's lr * (1 - step/steps) ** poly_power")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up")
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.0, description="linear warm-up over this share of `steps`, rounded up (NVIDIA's warmup_proportion); "
                         "instead of warmup_steps")
    poly_power: Number = Field(0.5, gt=0.0, description="schedule poly's power: 0.5 is NVIDIA's BERT LAMB recipe "
                                                        "(PolyWarmUpScheduler's degree), 1.0 Google's BERT (linear)")
    grad_clip: Number = Field(0.0, ge=0.0, description="global gradient norm; 0: off")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if present")
    nproc: Positive | Literal["auto"] = Field("auto", description="processes; auto: one per visible GPU, 1 on a CPU")
    threads: Positive | Literal["auto"] = Field(
        "auto", description="CPU threads per process; auto: the CPUs it may use shared among the host's trainings")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 where the hardware has it")
    activation_checkpointing: bool = Field(False, description="recompute each layer in the backward pass")
    epoch_per_copy: bool = Field(False, description="epoch e reads copy e % examples.dupe_factor")
    eval_every: int = Field(10, ge=0, description="held-out evaluation cadence (and always at the last step)")
    eval_examples: int = Field(0, ge=0, description="held-out examples per evaluation; 0: all")
    log_every: Positive = Field(1, description="host syncs: losses read back, signals checked")
    checkpoint_every: Positive = Field(10, description="checkpoint cadence (and at the end, the best, a signal)")
    keep_checkpoints: Positive = Field(2, description="newest checkpoints kept, besides the best")
    skip_nonfinite: bool = Field(False, description="skip a step with non-finite gradients instead of stopping")

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainConfig:
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError("train.warmup_ratio", self.warmup_ratio, f"0 with train.warmup_steps: "
                              f"{self.warmup_steps} (the warm-up is in steps or a share of train.steps, not both)")
        return self

    @property
    def warmup(self) -> int:
        """Warm-up steps: `warmup_steps`, or `warmup_ratio` of `steps` rounded up, as Hugging Face's
        `TrainingArguments.get_warmup_steps` (first rounded to 9 places: 0.1 * 30 is 3.0000000000000004)."""
        return self.warmup_steps or math.ceil(round(self.warmup_ratio * self.steps, 9))


class ExportConfig(Section):
    checkpoint: Literal["best", "last"] = Field("best", description="best: the lowest held-out MLM loss")
    sentences: Annotated[tuple[Strings, ...], Field(strict=False)] = Field(
        (("a crane is flying",), ("a crane driver came", "he just left")),
        description="inputs of the crane demonstration: one sentence or a pair each")

    @model_validator(mode="after")
    def _one_or_two_sentences(self) -> ExportConfig:
        for i, item in enumerate(self.sentences):
            if not 1 <= len(item) <= 2 or not all(s.strip() for s in item):
                raise ConfigError(f"export.sentences[{i}]", list(item), "one sentence or a pair of non-empty sentences")
        return self


@dataclass(frozen=True)
class TaskSpec:
    """One entry of `downstream.tasks`: a GLUE task (`folder` None) or your own labelled folder."""

    name: str
    folder: str | None = None


class DownstreamConfig(Section):
    """Fine-tuning every export on labelled tasks and scoring their dev splits (bertpipe/downstream)."""

    tasks: Strings = Field(SMALL_GLUE_TASKS, description="GLUE tasks by name, all (the eight), or your own labelled "
                                                         "folder (a path, or name=path); [] for none")
    source: str = Field("", description="instead of downloading: a folder of GLUE's original files or of its "
                                        "parquet copy (nyu-mll/glue's layout)")
    epochs: Positive = Field(3, description="passes over each task's train split")
    batch_size: Positive = Field(32, description="examples per optimizer step")
    lr: Number = Field(1e-4, gt=0.0, description="AdamW's peak learning rate")
    warmup_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(0.1, description="share of steps warming up "
                                                                                   "linearly, then a linear decay to 0")
    weight_decay: Number = Field(0.01, ge=0.0, description="AdamW's, not on biases and LayerNorm weights")
    max_len: int = Field(128, ge=8, le=65535, description="tokens per example, pairs cut longest first")
    seeds: Annotated[tuple[Seed, ...], Field(strict=False, min_length=1)] = Field(
        (0, 1, 2), description="fine-tuning seeds (classifier head, order, dropout); median and spread reported")
    single_seed_above: int = Field(20000, ge=0, description="tasks with more training examples take seeds[0] "
                                                            "only; 0: every task takes every seed")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if present")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 where the hardware has it")
    processes: Positive | Literal["auto"] = Field("auto", description="runs at once, one thread each; auto: one per "
                                                                     "CPU core for a small model on a CPU, else 1")

    @model_validator(mode="before")
    @classmethod
    def _one_task_is_a_list(cls, raw: Any) -> Any:
        """`-S downstream.tasks=all` (or `=rte`) is a string, not a list: a list of that one entry."""
        if isinstance(raw, dict) and isinstance(raw.get("tasks"), str):
            return {**raw, "tasks": [raw["tasks"]]}
        return raw

    @model_validator(mode="after")
    def _tasks_and_seeds_are_known_and_distinct(self) -> DownstreamConfig:
        names: set[str] = set()
        for spec in self.task_specs():
            if spec.name in names:
                raise ConfigError("downstream.tasks", list(self.tasks), f"each task once ({spec.name} repeats)")
            names.add(spec.name)
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("downstream.seeds", list(self.seeds), "distinct seeds")
        return self

    def task_specs(self) -> list[TaskSpec]:
        """The entries of `tasks`, `all` expanded; raises ConfigError naming an entry that is none of the forms."""
        specs: list[TaskSpec] = []
        for i, entry in enumerate(self.tasks):
            if entry == "all":
                specs += [TaskSpec(name) for name in GLUE_TASKS]
            elif entry in GLUE_TASKS:
                specs.append(TaskSpec(entry))
            else:
                specs.append(_own_task(f"downstream.tasks[{i}]", entry))
        return specs


def _own_task(key: str, entry: str) -> TaskSpec:
    """`name=folder`, or a folder (a path: it holds a `/` or starts with `.` or `~`) named after its last part."""
    if entry == "wnli":
        raise ConfigError(key, entry, "a task other than WNLI, which GLUE's users leave out (its dev set punishes "
                                      "learning the train set); your own copy of it can go in as a folder")
    name, equals, folder = entry.partition("=")
    if not equals:
        if not ("/" in entry or entry.startswith((".", "~"))):
            raise ConfigError(key, entry, f"a GLUE task ({', '.join(GLUE_TASKS)}), all, or your own labelled "
                                          "folder: a path (./my-task, /data/my-task) or name=path")
        name, folder = Path(entry.rstrip("/")).name, entry
    if not re.match(OWN_TASK_NAME, name) or name in (*GLUE_TASKS, "all", "wnli") or not folder.strip():
        raise ConfigError(key, entry, f"name=path with a name matching {OWN_TASK_NAME} that is not a GLUE task's, "
                                      "and a path")
    return TaskSpec(name, folder)


def registered_model_name_ok(name: str) -> bool:
    """Whether MLflow's model registry takes `name` for a registered model, copied from MLflow 3.17, whose
    import takes seconds: `mlflow.utils.validation._validate_model_name` (every store: not blank, no `/` or
    `:`, and unchanged by `posixpath.normpath`, which without a `/` leaves only `.` and `..*` out) and the
    file store's additions (`mlflow.store.model_registry.file_store._validate_model_name`: no `%`).
    tests/test_config.py compares it with MLflow's own, so an upgrade that changes the rule fails there."""
    return bool(name.strip()) and not any(c in name for c in "/:%") and name != "." and not name.startswith("..")


class MlflowConfig(Section):
    enabled: bool = Field(True, description="false: DVC's metrics and plots only")
    experiment: str = Field("bertpipe", pattern=r"\S", description="MLflow experiment")
    run_name: str = Field("", description="empty: the DVC experiment's name, else MLflow's")
    system_metrics: bool = Field(True, description="CPU, memory and GPU use beside the run")
    register_model: str = Field("", description="a name: the export registers the model as a new version")

    @model_validator(mode="after")
    def _registry_takes_the_name(self) -> MlflowConfig:
        """MLflow refuses a bad name only at registration, after training and export, and the export stage
        treats registration as optional: it warns, exits 0, and DVC deems the stage done, so it is never
        tried again. The name is therefore checked here, before any stage does any work."""
        if self.register_model and not registered_model_name_ok(self.register_model):
            raise ConfigError("mlflow.register_model", self.register_model,
                              "empty (no registration) or a name MLflow's model registry takes: not blank, "
                              "without '/', ':' or '%', not '.' and not starting with '..'")
        return self


class Params(Section):
    seed: int = Field(0, ge=0, lt=2**32, description="examples, initial weights, data order, dropout")
    data: DataConfig = DataConfig()
    prepare: PrepareConfig = PrepareConfig()
    examples: ExamplesConfig = ExamplesConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    downstream: DownstreamConfig = DownstreamConfig()
    mlflow: MlflowConfig = MlflowConfig()

    @model_validator(mode="after")
    def _examples_fit_the_model_and_the_tokenizer(self) -> Params:
        # With model.init the checkpoint's position table decides (bertpipe.init.folder.model_params).
        if self.examples.max_len > self.model.max_position_embeddings and not self.model.init:
            raise ConfigError("examples.max_len", self.examples.max_len,
                              f"at most model.max_position_embeddings ({self.model.max_position_embeddings})")
        if self.downstream.max_len > self.model.max_position_embeddings and not self.model.init:
            raise ConfigError("downstream.max_len", self.downstream.max_len,
                              f"at most model.max_position_embeddings ({self.model.max_position_embeddings})")
        if self.train.objective == "mlm" and self.examples.strategy != "segments":
            raise ConfigError("train.objective", "mlm", "mlm+nsp with examples.strategy: sentence-pairs (d2l's "
                              "pairs exist for NSP); for MLM alone set examples.strategy: segments")
        if self.examples.whole_word_mask and self.prepare.tokenizer == "word":
            raise ConfigError("examples.whole_word_mask", True, "false with prepare.tokenizer: word (words have "
                              "pieces only under prepare.tokenizer: wordpiece or pretrained)")
        return self

    @model_validator(mode="after")
    def _a_checkpoint_brings_its_tokenizer(self) -> Params:
        """The starting checkpoint's embeddings are rows of its own vocabulary: with model.init the corpus is
        read by that tokenizer (`pretrained`), and `pretrained` has nothing to read without one."""
        if self.model.init and self.prepare.tokenizer != "pretrained":
            raise ConfigError("prepare.tokenizer", self.prepare.tokenizer, "pretrained with model.init (the "
                              "checkpoint's weights belong to its own tokenizer)")
        if not self.model.init and self.prepare.tokenizer == "pretrained":
            raise ConfigError("prepare.tokenizer", "pretrained", "word or wordpiece without model.init (pretrained "
                              "is the tokenizer of the checkpoint model.init names)")
        return self


ALIAS_VALUES = 10**5  # values that YAML aliases may add to params.yaml once expanded


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml (`parse_params`); raises ConfigError naming the first bad key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), None, "an existing params file") from None
    return parse_params(text, str(path))


def parse_params(text: str, source: str) -> Params:
    """Validate the text of a params file (`source` names it in errors); raises ConfigError naming the first bad key.

    The text is read as DVC reads it (ruamel.yaml's safe loader, YAML 1.2), so every value that
    `dvc exp run -S`, `dvc params diff` and `dvc exp show` take for a number is one here too:
    `lr: 5e-05` is a float (YAML 1.1 loaders such as PyYAML read it as a string).

    It is composed into YAML's node graph before the values are built, and refused when its aliases
    would add more than ALIAS_VALUES values: a few lines of nested aliases ("billion laughs") stand for
    10^9 values, which validation and the error quoting them would walk for minutes and gigabytes.
    """
    from ruamel.yaml import YAML, YAMLError  # here, so model and training code import without it

    yaml = YAML(typ="safe")
    try:
        node = yaml.compose(text)
        if node is None:  # an empty file
            return build(Params, {})
        _refuse_alias_bombs(source, node)
        raw = yaml.constructor.construct_document(node)  # the rest of what YAML.load does
    except YAMLError as err:
        raise ConfigError(source, "unparsable YAML", f"valid YAML ({err.__class__.__name__})") from None
    except ConfigError:
        raise
    except (ValueError, RecursionError) as err:  # a date such as 2024-13-45, an integer of 5,000 digits, deep nesting
        raise ConfigError(source, "a YAML value Python cannot hold", f"valid values ({cause(err)})") from None
    return build(Params, raw if raw is not None else {})


def _refuse_alias_bombs(source: str, root: Any) -> None:
    """A ConfigError when the aliases of the document composed from `source` would add more than
    ALIAS_VALUES values, or when one sits inside its own anchor."""
    added = _alias_values(root)
    if added is None or added > ALIAS_VALUES:
        found = ("a YAML alias inside its own anchor, expanding without end" if added is None
                 else f"YAML aliases expanding to {added:,} more values")
        raise ConfigError(source, found, f"at most {ALIAS_VALUES:,} values added by aliases (counted before "
                                       "they are expanded)")


def _alias_values(root: Any) -> int | None:
    """How many values a composed YAML document's aliases add once expanded (an alias stands for a copy
    of its anchor's whole value), or None when an alias sits inside its own anchor. An alias is the very
    node of its anchor, so each distinct node is counted once and its count reused: linear in the file."""
    sizes: dict[int, int] = {}  # id of a node -> values in it, itself included, aliases expanded
    entered: set[int] = set()  # nodes whose children are still being counted
    pending: list[tuple[Any, bool]] = [(root, False)]
    while pending:
        node, children_counted = pending.pop()
        if children_counted:
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
            entered.discard(id(node))
        elif id(node) in entered:
            return None
        elif id(node) not in sizes:
            entered.add(id(node))
            pending += [(node, True)] + [(child, False) for child in _children(node)]
    return sizes[id(root)] - len(sizes)


def _children(node: Any) -> list[Any]:
    """The nodes under a YAML node: a sequence's items, a mapping's keys and values."""
    if node.id == "mapping":
        return [part for pair in node.value for part in pair]
    return node.value if node.id == "sequence" else []


def build(cls: type[BaseModel], raw: Any) -> Any:
    """`cls` validated from a mapping; pydantic's first error becomes a one-line ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError("params", raw, "a mapping")
    try:
        return cls.model_validate(raw)
    except ValidationError as err:
        raise config_error(err, cls, raw) from None


def flatten(params: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a Params tree (MLflow's params, DVC's `-S` names)."""
    out: dict[str, Any] = {}
    for name in type(params).model_fields:
        value = getattr(params, name)
        if isinstance(value, BaseModel):
            out.update(flatten(value, f"{prefix}{name}."))
        else:
            out[prefix + name] = value
    return out
