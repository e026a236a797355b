"""The `bertpipe` command (encode, fill-mask) through click's CliRunner on an exported tiny model, and on a
Hugging Face BERT folder in its own numbering (what a continued pretraining exports)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from helpers.checkpoints import bert_folder
from helpers.exported import MAX_POSITIONS, export_tiny, one_line_error, tiny_config

from bertpipe.cli import main

TOO_LONG = f"19 tokens with <cls> and <sep>, more than the model's {MAX_POSITIONS} positions"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny(tmp_path_factory.mktemp("cli"))


def bertpipe(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def test_encode_prints_tokens_shape_and_heads(model_dir: Path) -> None:
    result = bertpipe("encode", "A crane is flying", "--model", str(model_dir))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "tokens: <cls> a crane is flying <sep>"
    assert f"shape: [1, 6, {tiny_config().hidden_size}]" in lines
    assert any(line.startswith("<cls> head: [") for line in lines)
    assert sum("seg 0" in line for line in lines) == 6 and "unknown" not in result.output


def test_encode_json_with_pair_flags_unknown_words(model_dir: Path) -> None:
    result = bertpipe("encode", "a crane driver came", "--pair", "he just left Zebra", "--model", str(model_dir),
                      "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["shape"] == [1, 11, tiny_config().hidden_size]
    assert out["unknown_words"] == ["zebra"]
    assert [t["segment"] for t in out["tokens"]] == [0] * 6 + [1] * 5
    zebra = out["tokens"][9]
    assert (zebra["word"], zebra["token"], zebra["id"], zebra["is_unk"]) == ("zebra", "<unk>", 0, True)
    assert out["cls_head"] == out["tokens"][0]["head"] and len(out["cls_head"]) == 3


def test_encode_text_output_says_which_words_are_unknown(model_dir: Path) -> None:
    result = bertpipe("encode", "a zebra is flying", "--model", str(model_dir))
    assert result.exit_code == 0, result.output
    assert "unknown words mapped to <unk>: zebra" in result.output and "(zebra -> <unk>)" in result.output


def test_fill_mask_prints_top_k_with_probabilities(model_dir: Path) -> None:
    result = bertpipe("fill-mask", "a <mask> is flying", "--top-k", "3", "--model", str(model_dir))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "<mask> at position 2:" and len(lines) == 4
    probabilities = [float(line.split()[-1]) for line in lines[1:]]
    assert probabilities == sorted(probabilities, reverse=True) and all(0 < p <= 1 for p in probabilities)



@pytest.mark.parametrize(("args", "message"), [
    (("encode", "   "), "empty input: sentence 1 has no words"),
    (("encode", "a crane", "--pair", ""), "empty input: sentence 2 has no words"),
    (("encode", "a " * 8, "--pair", "b " * 8), TOO_LONG),
    (("fill-mask", "a crane is flying"), "no <mask>"),
])
def test_bad_input_is_one_line_error(model_dir: Path, args: tuple[str, ...], message: str) -> None:
    assert message in one_line_error(bertpipe(*args, "--model", str(model_dir)))


def test_missing_model_folder_is_one_line_error(tmp_path: Path) -> None:
    line = one_line_error(bertpipe("encode", "a crane", "--model", str(tmp_path / "nowhere")))
    assert "does not exist" in line


def test_plan_memory_counts_the_prediction_slots_of_the_masking_rate() -> None:
    """The MLM head's rows are the prediction slots, round(mask_prob * max_len): MosaicBERT's 30% needs more."""
    peaks = {}
    for rate in ("0.15", "0.3"):
        result = CliRunner().invoke(main, ["plan-memory", "--preset", "base", "--max-len", "512", "--mask-prob", rate,
                                           "--memory-gib", "1000"])
        assert result.exit_code == 0, result.output
        peaks[rate] = float(result.output.split("estimated peak ")[1].split(" GiB")[0])
    assert peaks["0.3"] > peaks["0.15"]


def as_bert_base_uncased_is(folder: Path) -> None:
    """The Hub's bert-base-uncased: config.json says BertForMaskedLM while model.safetensors holds the pooler and the
    NSP head too, and its LayerNorms are still named gamma and beta."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    renamed = {key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): tensor
               for key, tensor in weights.items()}
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"architectures": ["BertForMaskedLM"]}))


@pytest.mark.parametrize("hub_quirks", [False, True])
def test_a_checkpoint_in_its_own_numbering_reads_as_transformers_reads_it(shared_wikitext: Path, tmp_path: Path,
                                                                         hub_quirks: bool) -> None:
    """A continued pretraining's export keeps its checkpoint's ids ([PAD] 0, not bertpipe's reserved tokens first),
    and models/init is a Hub checkpoint as it comes: encode gives transformers' ids and vectors, fill-mask
    transformers' answers, reserved tokens never among them."""
    import torch
    import transformers

    lines = [x for x in (shared_wikitext / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines() if x.strip()]
    folder = bert_folder(tmp_path / "bert", lines[:400])
    if hub_quirks:
        as_bert_base_uncased_is(folder)
    text = "The crane is flying over the river"
    out = json.loads(bertpipe("encode", text, "--model", str(folder), "--json").output)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(text, return_tensors="pt")
    assert [t["id"] for t in out["tokens"]] == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        hidden = transformers.BertModel.from_pretrained(folder).eval()(**inputs).last_hidden_state
    assert out["cls_head"] == pytest.approx(hidden[0, 0, :3].tolist(), abs=1e-5)

    result = bertpipe("fill-mask", "The crane is [MASK] over the river", "--top-k", "3", "--model", str(folder))
    assert result.exit_code == 0, result.output
    ours = [line.split()[1] for line in result.output.splitlines()[1:]]
    pipeline = transformers.pipeline("fill-mask", model=str(folder), top_k=len(tokenizer) - 5)
    theirs = [answer["token_str"].replace(" ", "") for answer in pipeline("The crane is [MASK] over the river")
              if answer["token_str"] not in tokenizer.all_special_tokens]
    assert ours == theirs[:3]
