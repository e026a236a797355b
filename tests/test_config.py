"""Tests for bertpipe/config.py: params.yaml's defaults, its refusals, and how a stage reports them.

Every refusal is a ConfigError whose message is one line naming the dotted key and the bad value,
and a stage that meets one exits with status 1 and a single `Error:` line before writing anything.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import EXPONENT_FORMS, REPO, params_with
from pydantic import BaseModel
from ruamel.yaml import YAML

from bertpipe.config import ALIAS_VALUES, PRESETS, Params, build, flatten, load_params, registered_model_name_ok
from bertpipe.errors import LINE_CHARS, QUOTED_CHARS, ConfigError, DataError, quote


def test_repo_params_reproduce_the_d2l_seed_run() -> None:
    params = load_params(REPO / "params.yaml")
    assert (params.train.batch_size, params.train.steps, params.train.lr) == (512, 50, 0.01)
    assert (params.examples.max_len, params.examples.mask_prob, params.examples.max_predictions) == (64, 0.15, 10)
    assert params.prepare.min_freq == 5
    m = params.model
    assert m.preset == "tiny"
    assert (m.num_hidden_layers, m.hidden_size, m.num_attention_heads, m.intermediate_size) == (2, 128, 2, 256)
    assert m.hidden_dropout_prob == m.attention_probs_dropout_prob == 0.2


# id: (overrides of the repo's params.yaml, the dotted key the message names, the value as it shows)
BAD_VALUES: dict[str, tuple[dict[str, Any], str, str]] = {
    "lr-string": ({"train.lr": "fast"}, "train.lr", "'fast'"),
    "steps-float": ({"train.steps": 1.5}, "train.steps", "1.5"),
    "steps-bool": ({"train.steps": True}, "train.steps", "True"),
    "lr-zero": ({"train.lr": 0}, "train.lr", "0"),
    "max-len-small": ({"examples.max_len": 4}, "examples.max_len", "4"),
    "mask-prob-above-1": ({"examples.mask_prob": 1.5}, "examples.mask_prob", "1.5"),
    "min-freq-zero": ({"prepare.min_freq": 0}, "prepare.min_freq", "0"),
    "unknown-top-level": ({"bogus": 7}, "bogus", "7"),
    "unknown-in-section": ({"train.bogus": 7}, "train.bogus", "7"),
    "unknown-preset": ({"model.preset": "huge"}, "model.preset", "'huge'"),
    "unknown-device": ({"train.device": "tpu"}, "train.device", "'tpu'"),
    "heads-do-not-divide": ({"model.hidden_size": 129}, "model.hidden_size", "129"),
    "max-len-over-positions": ({"examples.max_len": 128, "model.max_position_embeddings": 64},
                               "examples.max_len", "128"),
    "checksum-malformed": ({"data.checksum": "sha1:1234"}, "data.checksum", "'sha1:1234'"),
    "three-sentences": ({"export.sentences": [["a b"], ["c", "d", "e"]]}, "export.sentences[1]", "['c', 'd', 'e']"),
    "mlm-with-sentence-pairs": ({"train.objective": "mlm"}, "train.objective", "'mlm'"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_value_is_one_line_naming_key_and_value(case: str, tmp_path: Path,
                                                    write_params: Callable[..., Path]) -> None:
    overrides, key, shown = BAD_VALUES[case]
    with pytest.raises(ConfigError) as info:
        load_params(write_params(tmp_path, overrides))
    message = str(info.value)
    assert "\n" not in message
    assert info.value.key == key
    assert f"{key} = {shown}" in message


def test_unparsable_yaml_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"params\.yaml.*valid YAML") as info:
        load_params(tmp_path / "params.yaml")
    assert "\n" not in str(info.value)


def test_unknown_keys_of_mixed_types_are_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("1: x\nbogus: 2\n")
    with pytest.raises(ConfigError):
        load_params(tmp_path / "params.yaml")


def test_explicit_model_keys_override_the_preset(tmp_path: Path, write_params: Callable[..., Path]) -> None:
    tiny = load_params(write_params(tmp_path, {"model.hidden_size": 256})).model
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.intermediate_size) == (256, 2, 256)
    base = load_params(write_params(tmp_path, {"model.preset": "base", "model.num_hidden_layers": 4})).model
    assert base.num_hidden_layers == 4
    assert base.hidden_size == PRESETS["base"]["hidden_size"] == 768


def test_flatten_gives_dotted_keys() -> None:
    params = load_params(REPO / "params.yaml")
    flat = flatten(params)
    assert flat["seed"] == 0
    assert flat["train.lr"] == 0.01
    assert flat["model.hidden_size"] == 128
    assert flat["examples.max_len"] == 64
    assert flat["export.sentences"] == (("a crane is flying",), ("a crane driver came", "he just left"))
    assert all(isinstance(value, (int, float, str, bool, tuple, type(None))) for value in flat.values())
    sections = {key.split(".")[0] for key in flat if "." in key}
    assert sections == {"data", "prepare", "examples", "model", "train", "export", "downstream", "mlflow"}


def run_prepare_stage(folder: Path) -> subprocess.CompletedProcess[str]:
    """stages/prepare.py run the way DVC runs it, from `folder`, on folder/raw."""
    args = [sys.executable, str(REPO / "stages" / "prepare.py"), "raw", "prepared", "metrics/prepare.json"]
    return subprocess.run(args, cwd=folder, capture_output=True, text=True, timeout=60)


def test_stage_refuses_bad_params_before_writing(tmp_path: Path, write_params: Callable[..., Path]) -> None:
    (tmp_path / "raw").mkdir()
    for split in ("train", "valid"):
        (tmp_path / "raw" / f"wiki.{split}.tokens").write_text("a b . c d\n")
    write_params(tmp_path, {"examples.max_len": 4})
    before = sorted(tmp_path.rglob("*"))

    proc = run_prepare_stage(tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == ["Error: params.yaml: examples.max_len = 4 is not allowed; "
                                        "expected a value >= 8"]
    assert proc.stdout == ""
    assert sorted(tmp_path.rglob("*")) == before

    write_params(tmp_path)  # the same run with good params does write, so the refusal came first
    proc = run_prepare_stage(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "prepared" / "vocab.parquet").is_file()
    assert (tmp_path / "metrics" / "prepare.json").is_file()


def test_params_yaml_lists_every_key() -> None:
    """`dvc exp run -S key=value` can only set keys that params.yaml already has."""
    raw = YAML(typ="safe").load((REPO / "params.yaml").read_text())
    params = load_params(REPO / "params.yaml")
    for name in type(params).model_fields:
        value = getattr(params, name)
        if isinstance(value, BaseModel):
            assert list(type(value).model_fields) == list(raw[name]), name


def float_keys() -> list[str]:
    """The dotted keys whose type admits a float, from the config classes themselves."""
    from bertpipe.config import Params

    keys = []
    for section, info in Params.model_fields.items():
        fields = info.annotation.model_fields if isinstance(info.annotation, type(BaseModel)) else {}
        keys += [f"{section}.{name}" for name, field in fields.items() if "float" in str(field.annotation)]
    return keys


def test_every_float_key_has_an_exponent_form() -> None:
    assert sorted(float_keys()) == sorted(EXPONENT_FORMS)


def with_literal(key: str, literal: str, text: str | None = None) -> str:
    """params.yaml's text (or `text`) with `key` set to `literal`, written verbatim (not through a YAML dumper)."""
    section, name = key.split(".")
    lines = (text or (REPO / "params.yaml").read_text()).splitlines()
    start = lines.index(f"{section}:")
    at = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(f"  {name}:"))
    lines[at] = f"  {name}: {literal}"
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("key", sorted(EXPONENT_FORMS))
def test_float_keys_in_exponent_form_are_numbers(key: str, tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(with_literal(key, EXPONENT_FORMS[key]))
    section, name = key.split(".")
    assert getattr(getattr(load_params(tmp_path / "params.yaml"), section), name) == float(EXPONENT_FORMS[key])


@pytest.mark.parametrize("literal", ["5e-5", "5E-5", "5e-05", "+5e-5", "5.e-5", ".5e-4", "0.00005"])
def test_lr_as_people_write_it(literal: str, tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(with_literal("train.lr", literal))
    assert load_params(tmp_path / "params.yaml").train.lr == pytest.approx(5e-5)


@pytest.mark.parametrize(("key", "literal", "read"), [("prepare.lowercase", "False", False),
                                                      ("prepare.lowercase", "TRUE", True),
                                                      ("prepare.strip_accents", "~", None),
                                                      ("prepare.strip_accents", "Null", None),
                                                      ("prepare.strip_accents", "false", False)])
def test_case_and_accents_as_people_write_them(key: str, literal: str, read: bool | None, tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(with_literal(key, literal))
    assert getattr(load_params(tmp_path / "params.yaml").prepare, key.split(".")[1]) is read


@pytest.mark.parametrize(("overrides", "message"), [
    ({"prepare.strip_accents": "maybe"}, "prepare.strip_accents = 'maybe' is not allowed; expected true/false or null"),
    ({"prepare.strip_accents": 2}, "prepare.strip_accents = 2 is not allowed; expected true/false or null"),
    ({"prepare.lowercase": "no"}, "prepare.lowercase = 'no' is not allowed; expected true/false"),
    ({"prepare.strip_accents": True}, "prepare.strip_accents = True is not allowed; expected false or null with "
                                      "prepare.tokenizer: word (d2l's words keep their accents; stripping them is "
                                      "WordPiece's, prepare.tokenizer: wordpiece)"),
], ids=["maybe", "two", "lowercase-no", "words-stripped"])
def test_a_bad_case_or_accent_setting_is_one_line(overrides: dict[str, Any], message: str, tmp_path: Path,
                                                  write_params: Callable[..., Path]) -> None:
    with pytest.raises(ConfigError) as info:
        load_params(write_params(tmp_path, overrides))
    assert str(info.value) == f"params.yaml: {message}"


def test_wordpiece_takes_any_case_and_accent_setting(tmp_path: Path, write_params: Callable[..., Path]) -> None:
    prepare = load_params(write_params(tmp_path, {"prepare.tokenizer": "wordpiece", "prepare.lowercase": False,
                                                  "prepare.strip_accents": True})).prepare
    assert (prepare.lowercase, prepare.strip_accents) == (False, True)


@pytest.mark.parametrize("literal", [".inf", ".nan", "-.inf"])
def test_non_finite_numbers_are_refused(literal: str, tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(with_literal("train.lr", literal))
    with pytest.raises(ConfigError, match=r"train\.lr = .* expected a finite number"):
        load_params(tmp_path / "params.yaml")


def test_every_key_is_documented_where_it_is_declared() -> None:
    from bertpipe.config import Params

    for section, info in Params.model_fields.items():
        fields = info.annotation.model_fields if isinstance(info.annotation, type(BaseModel)) else {section: info}
        for name, field in fields.items():
            assert field.description, f"{section}.{name}"


def test_the_model_section_is_the_model_config() -> None:
    """params.yaml's model keys (less the preset) are BertConfig's own names: one model config, no copying."""
    import dataclasses

    from bertpipe.config import ModelConfig
    from bertpipe.model.bert import BertConfig

    architecture = ModelConfig(preset="base").architecture()
    assert set(architecture) <= {f.name for f in dataclasses.fields(BertConfig)}
    assert dataclasses.asdict(BertConfig.from_params(ModelConfig(preset="base"), 100)) | architecture == \
        dataclasses.asdict(BertConfig.from_params(ModelConfig(preset="base"), 100))


@pytest.mark.parametrize(("key", "written", "read"), [("train.batch_size", 512.0, 512), ("seed", 3.0, 3),
                                                     ("train.micro_batch_size", 16.0, 16),
                                                     ("train.skip_nonfinite", 1, True), ("mlflow.enabled", 0, False),
                                                     ("prepare.strip_accents", 0, False)])
def test_a_value_dvc_deems_equal_to_a_valid_one_is_that_value(key: str, written: object, read: object) -> None:
    """DVC skips a stage when params compare equal (`512.0 == 512`): bertpipe must read them alike."""
    params = build(Params, params_with({key: written}))
    section, _, name = key.rpartition(".")
    value = getattr(getattr(params, section) if section else params, name)
    assert value == read and type(value) is type(read)


@pytest.mark.parametrize(("key", "written"), [("train.batch_size", 512.5), ("train.skip_nonfinite", 2),
                                              ("train.steps", True), ("train.lr", "1e-3x")])
def test_values_equal_to_no_valid_one_are_still_refused(key: str, written: object) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{key} = {written!r} is not allowed")):
        build(Params, params_with({key: written}))


def billion_laughs(levels: int) -> str:
    """A params.yaml of nested aliases: `laughs` stands for 10**levels strings, written in a few hundred bytes."""
    lines = ["l1: &l1 [" + ", ".join(["lol"] * 10) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(2, levels + 1)]
    return "\n".join(lines) + f"\nlaughs: *l{levels}\n"


def test_an_alias_bomb_is_refused_before_it_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted on the node graph, where an alias is one shared node: no value is built (the constructor
    would fail the test), so time and memory stay those of the file, not of the 10^6 values."""
    from ruamel.yaml.constructor import SafeConstructor

    def construct_document(*args: object) -> None:
        raise AssertionError("the document was constructed")

    monkeypatch.setattr(SafeConstructor, "construct_document", construct_document)
    (tmp_path / "params.yaml").write_text(billion_laughs(6))
    with pytest.raises(ConfigError) as info:
        load_params(tmp_path / "params.yaml")
    assert re.fullmatch(rf"params\.yaml: {re.escape(str(tmp_path / 'params.yaml'))} = 'YAML aliases expanding to "
                        rf"[\d,]{{9}} more values' is not allowed; expected at most {ALIAS_VALUES:,} values added "
                        r"by aliases \(counted before they are expanded\)", str(info.value)), str(info.value)


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(with_literal("data.urls", "&urls [a, *urls]"))
    with pytest.raises(ConfigError, match=r"params\.yaml = 'a YAML alias inside its own anchor, expanding without "
                                          r"end' is not allowed"):
        load_params(tmp_path / "params.yaml")


def test_a_few_aliases_read_as_written(tmp_path: Path) -> None:
    text = with_literal("downstream.lr", "*lr", with_literal("train.lr", "&lr 0.001"))
    (tmp_path / "params.yaml").write_text(text)
    params = load_params(tmp_path / "params.yaml")
    assert params.train.lr == params.downstream.lr == 0.001
    assert params == build(Params, YAML(typ="safe").load(text))


def test_a_huge_bad_value_is_quoted_in_a_bounded_line() -> None:
    with pytest.raises(ConfigError) as info:
        build(Params, params_with({"mlflow.run_name": ["x"] * 10**5}))
    message = str(info.value)
    assert message == "params.yaml: mlflow.run_name = ['x', 'x', 'x', 'x', 'x', 'x', ...] is not allowed; " \
                      "expected a string"
    assert len(quote("y" * 10**6)) <= QUOTED_CHARS + 3


@pytest.mark.parametrize("value", ["fast", "it's", 'say "hi"', 1.5, True, None, (), ("a",), ("a", "b"),
                                   ["c", ["d", "e"]], {"a": [1, {"b": None}], 2: {}}, "é\n" * 20])
def test_a_short_value_is_quoted_as_its_repr(value: object) -> None:
    assert quote(value) == repr(value)


def test_any_error_line_is_bounded_and_keeps_both_ends() -> None:
    """Messages built by callers (a DataError quoting a data file's cell) are cut where they are printed."""
    line = str(DataError(f"train.txt: label {'x' * 10**6!r} is none of the task's; relabel it"))
    assert len(line) <= LINE_CHARS
    assert line.startswith("train.txt: label 'xxx") and line.endswith("xxx' is none of the task's; relabel it")
    assert "[... 998," in line


MODEL_NAMES = ["bert", "my-model_v1.2", "My Model", " padded ", "modèle", "模型", "émoji 🤖", "a.b", ".hidden", "x..y",
               "a..", "a\\b", "line\nbreak", "", "  ", "\t", "\u3000", "\u00a0", "\x1c", "my model/v1", "a/", "/abs",
               "a:b", "50%", ".", "..", "...", "../x", "..x"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_registered_model_names_follow_mlflows_rule(name: str) -> None:
    """The copy in bertpipe/config.py against MLflow's own checks: every store's and the file store's."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.model_registry.file_store import _validate_model_name as file_store_rule
    from mlflow.utils.validation import _validate_model_name as every_store_rule

    def takes(rule: Callable[[str], None]) -> bool:
        try:
            rule(name)
        except MlflowException:
            return False
        return True

    assert registered_model_name_ok(name) == (takes(every_store_rule) and takes(file_store_rule))


@pytest.mark.parametrize("name", ["my model/v1", "  ", "..", "run:1"])
def test_a_model_name_mlflow_refuses_stops_the_stage_first(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(Params, params_with({"mlflow.register_model": name}))
    assert str(info.value).startswith(f"params.yaml: mlflow.register_model = {name!r} is not allowed; expected empty "
                                      "(no registration) or a name MLflow's model registry takes")


@pytest.mark.parametrize("name", ["", "bert-wikitext-2", "BERT tiny (d2l)", "模型"])
def test_no_name_or_one_mlflow_takes_is_read(name: str) -> None:
    assert build(Params, params_with({"mlflow.register_model": name})).mlflow.register_model == name


def test_a_warmup_in_steps_and_as_a_share_is_one_line() -> None:
    """Hugging Face lets warmup_steps silently win over warmup_ratio; here setting both is refused."""
    with pytest.raises(ConfigError) as info:
        build(Params, params_with({"train.warmup_steps": 10, "train.warmup_ratio": 0.1}))
    assert str(info.value) == ("params.yaml: train.warmup_ratio = 0.1 is not allowed; expected 0 with "
                               "train.warmup_steps: 10 (the warm-up is in steps or a share of train.steps, not both)")


def test_nvidias_lamb_recipe_is_read() -> None:
    train = build(Params, params_with({"train.optimizer": "lamb", "train.schedule": "poly", "train.lr": 6e-3,
                                       "train.warmup_ratio": 0.2843, "train.steps": 7038})).train
    assert (train.optimizer, train.schedule, train.poly_power, train.warmup) == ("lamb", "poly", 0.5, 2001)


def test_mlm_alone_names_the_strategy_it_needs(tmp_path: Path, write_params: Callable[..., Path]) -> None:
    """d2l's sentence pairs exist for NSP: MLM alone is refused with them, in a line naming segments."""
    with pytest.raises(ConfigError, match=r"examples\.strategy: segments"):
        load_params(write_params(tmp_path, {"train.objective": "mlm"}))
    params = load_params(write_params(tmp_path, {"train.objective": "mlm", "examples.strategy": "segments"}))
    assert params.train.objective == "mlm"


@pytest.mark.parametrize("text", ["seed: 2024-13-45\n", "seed: " + "9" * 5000 + "\n",
                                  "seed: " + "[" * 3000 + "]" * 3000])
def test_yaml_values_python_cannot_hold_are_one_line(tmp_path: Path, text: str) -> None:
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match="a YAML value Python cannot hold") as info:
        load_params(tmp_path / "params.yaml")
    assert "\n" not in str(info.value) and len(str(info.value)) < 400
