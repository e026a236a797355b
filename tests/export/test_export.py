"""The export stage, bertpipe/export/hf_compat.py and bertpipe/export/encode.py on a tiny model (CPU, seconds).

A tiny BERT (the d2l size, perturbed so no weight keeps its init value) and a small vocabulary are
checkpointed in tmp_path with `bertpipe.training.checkpoint.save`, then exported through the stage's click
command. The folder is loaded back with `transformers` (skipped when it is absent): same encoder
outputs, MLM and NSP logits, same token and segment ids, a working fill-mask pipeline.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import params_with
from helpers.exported import (
    MAX_POSITIONS,
    STEP,
    TOKENS,
    VOCAB,
    export_tiny,
    make_project,
    one_line_error,
    pad_batch,
    run_stage,
    tiny_config,
    tiny_model,
)
from safetensors.torch import load_file
from tokenizers import Tokenizer

from bertpipe.config import PrepareConfig
from bertpipe.data.prepare import prepare
from bertpipe.data.tokenizer import word_tokenizer
from bertpipe.export import hf_compat
from bertpipe.export.encode import EncodeError, Vocab, contextual, encode, fill_mask
from bertpipe.export.export import load_checkpoint
from bertpipe.export.hf_compat import NEVER
from bertpipe.model.bert import BertForPreTraining
from bertpipe.training.checkpoint import RunRecord, RunState, capture_rng, save
from bertpipe.vocab import HF_ROLES, PY_WHITESPACE, SPECIAL_TOKENS, UNK_ID, vocab_digest


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    export_tiny(root)
    return root


def test_model_folder_is_hf_shaped(project: Path) -> None:
    folder = project / "models" / "bert"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertForPreTraining"] and config["model_type"] == "bert"
    assert config | dataclasses.asdict(tiny_config()) == config
    weights = load_file(str(folder / "model.safetensors"))
    # As HF's save_pretrained: the tied decoder weight and bias are left out, they alias other keys.
    assert set(weights) == set(hf_compat.hf_shapes(tiny_config()))
    assert len(weights) == 16 * 2 + 14 and not set(hf_compat.TIED) & set(weights)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (folder / name).is_file()


def test_transformers_model_matches_ours(project: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ours, _ = load_checkpoint(project / "models" / "checkpoint" / f"step-{STEP:07d}", vocab_digest(TOKENS), project)
    theirs = transformers.BertForPreTraining.from_pretrained(project / "models" / "bert").eval()
    vocab = VOCAB
    pairs = [["a crane is flying"], ["a crane driver came", "he just left"], ["the bird", "over the river ."]]
    encodings = [encode(vocab, pair, MAX_POSITIONS) for pair in pairs]
    ids, segments, valid_lens = pad_batch(encodings)  # rows 0 and 2 are padded
    real = torch.arange(ids.shape[1])[None, :] < valid_lens[:, None]  # [B, T]
    masked = torch.tensor([2, ids.shape[1] + 3, 2 * ids.shape[1] + 1])  # flat positions, real tokens
    with torch.no_grad():
        mine = ours(ids, segments, valid_lens, masked)
        hf = theirs(input_ids=ids, token_type_ids=segments, attention_mask=real.long(), output_hidden_states=True)
    assert torch.allclose(hf.hidden_states[-1][real], mine.sequence_output[real], rtol=0, atol=1e-5)
    reserved = len(SPECIAL_TOKENS)  # the export's head never answers a reserved token (export.never_answer_reserved)
    hf_logits = hf.prediction_logits.flatten(0, 1)[masked]
    assert torch.allclose(hf_logits[:, reserved:], mine.mlm_logits[:, reserved:], rtol=0, atol=1e-5)
    assert torch.allclose(hf_logits[:, :reserved] - mine.mlm_logits[:, :reserved],
                          torch.tensor(NEVER) - ours.cls.predictions.bias[:reserved], rtol=0, atol=1e-3)
    assert torch.allclose(hf.seq_relationship_logits, mine.nsp_logits, rtol=0, atol=1e-5)


def test_transformers_tokenizer_gives_our_ids(project: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(project / "models" / "bert")
    assert tokenizer.is_fast and tokenizer.model_max_length == MAX_POSITIONS
    roles = {role: getattr(tokenizer, role) for role in HF_ROLES}
    assert roles == {"unk_token": "<unk>", "pad_token": "<pad>", "cls_token": "<cls>", "sep_token": "<sep>",
                     "mask_token": "<mask>"}
    pair = ["A Crane\tZEBRA is  flying", "He just\x1cLEFT"]
    ours = encode(VOCAB, pair, MAX_POSITIONS)
    theirs = tokenizer(*pair)
    assert ours.unknown_words == ["zebra"]
    assert theirs["input_ids"] == list(ours.ids)
    assert theirs["token_type_ids"] == list(ours.segments)


def test_transformers_fill_mask_pipeline_agrees(project: Path) -> None:
    transformers = pytest.importorskip("transformers")
    fill = transformers.pipeline("fill-mask", model=str(project / "models" / "bert"))
    predictions = fill("a <mask> is flying")
    assert len(predictions) == 5 and all(0 < p["score"] <= 1 for p in predictions)
    model, tokenizer = hf_compat.load_pretrained(project / "models" / "bert")
    vocab = Vocab(tokenizer)
    [ours] = fill_mask(model, vocab, encode(vocab, ["a <mask> is flying"], MAX_POSITIONS), top_k=5)
    assert [p["token"] for p in predictions] == [vocab.index[t] for t in ours.tokens]
    assert [p["score"] for p in predictions] == pytest.approx(ours.probabilities, abs=1e-6)


def test_tables_round_trip_through_pandas(project: Path) -> None:
    hidden = tiny_config().hidden_size
    tokens = pd.read_parquet(project / "data" / "embeddings" / "tokens.parquet")
    assert list(tokens.columns) == ["id", "token", "count", "vector"] and len(tokens) == len(TOKENS)
    assert tokens["token"].tolist() == list(TOKENS)
    model, _ = hf_compat.load_pretrained(project / "models" / "bert")
    table = torch.from_numpy(np.stack(tokens["vector"]))
    assert torch.equal(table, model.bert.embeddings.word_embeddings.weight.detach())

    path = project / "data" / "embeddings" / "contextual.parquet"
    assert pq.read_schema(path).field("vector").type == pa.list_(pa.float32())
    rows = pd.read_parquet(path)
    assert list(rows.columns) == ["input", "position", "segment", "word", "token", "id", "is_unk", "vector"]
    assert len(rows) == 6 + 10  # <cls> a crane is flying <sep>; <cls> a crane driver came <sep> he just left <sep>
    assert rows["vector"].map(len).eq(hidden).all()
    second = rows[rows["input"] == 1]
    assert second["segment"].tolist() == [0] * 6 + [1] * 4 and second["word"].iloc[2] == "crane"


def test_metrics_carry_the_crane_demonstration(project: Path) -> None:
    metrics = json.loads((project / "metrics" / "export.json").read_text())
    hidden = tiny_config().hidden_size
    assert -1.0 <= metrics["crane_cosine_similarity"] <= 1.0
    assert metrics["input_0"]["shape"] == [1, 6, hidden] and metrics["input_1"]["shape"] == [1, 10, hidden]
    assert metrics["input_1"]["crane_position"] == 2 and len(metrics["input_1"]["crane_head"]) == 3
    assert (metrics["step"], metrics["vocab_size"], metrics["num_hidden_layers"]) == (STEP, len(TOKENS), 2)
    rows = pd.read_parquet(project / "data" / "embeddings" / "contextual.parquet")
    cls = rows[(rows["input"] == 0) & (rows["position"] == 0)]["vector"].iloc[0]
    assert metrics["input_0"]["cls_head"] == pytest.approx(cls[:3].tolist(), abs=1e-6)


def test_export_is_deterministic(project: Path) -> None:
    again = ("models/bert2", "data/embeddings2", "metrics/export2.json")
    assert run_stage(project, again).exit_code == 0
    for first, second in (("data/embeddings", "data/embeddings2"), ("models/bert", "models/bert2")):
        for path in sorted((project / first).iterdir()):
            assert path.read_bytes() == (project / second / path.name).read_bytes(), path.name
    assert (project / "metrics/export.json").read_text() == (project / "metrics/export2.json").read_text()


def test_refuses_checkpoint_of_another_vocabulary(tmp_path: Path) -> None:
    root = make_project(tmp_path, trained_vocab_sha="0" * 64)
    line = one_line_error(run_stage(root))
    assert "trained on vocabulary 000000000000" in line and "meta.json" in line
    assert sorted(p.name for p in (root / "models").iterdir()) == ["checkpoint"]  # nothing half-written


def test_refuses_without_checkpoint(tmp_path: Path) -> None:
    line = one_line_error(run_stage(make_project(tmp_path, checkpoint=False)))
    assert "no checkpoint in models/checkpoint" in line


def test_from_hf_inverts_to_hf_and_takes_legacy_keys() -> None:
    model = tiny_model()
    config = model.config
    hf = hf_compat.to_hf(model.state_dict(), config)
    legacy = hf | {"bert.embeddings.position_ids": torch.arange(MAX_POSITIONS)[None],
                   "cls.predictions.decoder.weight": hf["bert.embeddings.word_embeddings.weight"]}
    for weights in (hf, legacy):
        copy = BertForPreTraining(config)
        copy.load_state_dict(hf_compat.from_hf(weights, config))
        assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), model.state_dict().values(),
                                                     strict=True))
    with pytest.raises(hf_compat.HFFormatError, match="shape"):
        hf_compat.from_hf(hf | {"cls.seq_relationship.bias": torch.zeros(3)}, config)
    with pytest.raises(hf_compat.HFFormatError, match="missing"):
        hf_compat.from_hf({k: v for k, v in hf.items() if k != "bert.pooler.dense.bias"}, config)


def test_tokenizer_splits_like_python_on_every_whitespace() -> None:
    tokenizer = word_tokenizer(TOKENS)
    vocab = VOCAB
    for char in PY_WHITESPACE:
        text = f"A{char}Crane{char}{char}zebra"
        assert tokenizer.encode(text).ids == list(encode(vocab, [text], MAX_POSITIONS).ids), repr(char)


def test_encode_refuses_empty_and_too_long_input() -> None:
    vocab = VOCAB
    with pytest.raises(EncodeError, match="empty input: sentence 2"):
        encode(vocab, ["a crane", " \t "], MAX_POSITIONS)
    longest = ["a " * 6, "b " * 7]  # 1 + 7 + 8 = 16 tokens: fits exactly
    assert len(encode(vocab, longest, MAX_POSITIONS)) == MAX_POSITIONS
    with pytest.raises(EncodeError, match="17 tokens"):
        encode(vocab, [longest[0], longest[1] + "c"], MAX_POSITIONS)


def test_encoding_runs_in_eval_mode() -> None:
    model = tiny_model().train()
    encoding = encode(VOCAB, ["a crane is flying"], MAX_POSITIONS)
    assert torch.equal(contextual(model, encoding), contextual(model, encoding))
    assert not model.training


def with_best_checkpoint(root: Path, best_step: int, collapse: bool = False) -> Path:
    """A project whose checkpoints are step `best_step` (marked best) and step 7; `collapse`: a model whose
    last LayerNorm gives every token the same vector."""
    make_project(root, checkpoint=False)
    spec = {"model": dataclasses.asdict(tiny_config()), "examples": {"vocab_sha256": vocab_digest(TOKENS)}}
    for step, seed in ((best_step, 1), (STEP, 0)):
        model = tiny_model(seed)
        if collapse:
            with torch.no_grad():
                model.bert.encoder.layer[-1].output.LayerNorm.weight.zero_()
                model.bert.encoder.layer[-1].output.LayerNorm.bias.fill_(1.0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        save(root / "models" / "checkpoint", model, optimizer, RunRecord(RunState(step=step, best_step=best_step)),
             spec, [capture_rng()], keep=1)
    return root


@pytest.mark.parametrize(("which", "step"), [("best", 3), ("last", STEP)])
def test_export_takes_the_best_or_the_last_checkpoint(which: str, step: int, tmp_path: Path) -> None:
    root = with_best_checkpoint(tmp_path, best_step=3)
    assert sorted(p.name for p in (root / "models" / "checkpoint").iterdir()) == ["step-0000003", "step-0000007"]
    (root / "params.yaml").write_text(yaml.safe_dump(params_with({"export.checkpoint": which}), sort_keys=False))
    result = run_stage(root)
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / "metrics" / "export.json").read_text())
    assert (metrics["step"], metrics["checkpoint"]) == (step, which)
    exported = load_file(root / "models" / "bert" / "model.safetensors")
    saved = load_file(root / "models" / "checkpoint" / f"step-{step:07d}" / "model.safetensors")
    assert torch.equal(exported["bert.pooler.dense.weight"], saved["bert.pooler.dense.weight"])


def test_the_crane_cosine_comes_with_a_reference_and_collapse_is_named(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    healthy = json.loads((export_tiny(tmp_path / "healthy").parents[1] / "metrics" / "export.json").read_text())
    assert -1 < healthy["token_cosine_mean"] < 0.99 and not healthy["collapsed"]
    root = with_best_checkpoint(tmp_path / "collapsed", best_step=3, collapse=True)
    with caplog.at_level("WARNING"):
        result = run_stage(root)
    assert result.exit_code == 0, result.output
    metrics = json.loads((root / "metrics" / "export.json").read_text())
    assert metrics["token_cosine_mean"] == pytest.approx(1.0) and metrics["collapsed"]
    assert metrics["crane_cosine_similarity"] == pytest.approx(1.0)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "collapsed" in warning and "shows nothing" in warning and "\n" not in warning


def test_every_tokenizer_class_reads_the_word_export_alike_or_refuses_it(project: Path) -> None:
    """transformers 5's BertTokenizer(Fast) rebuilds BERT's pipeline from the word list (25 tokens
    instead of 18 for a WikiText sentence): it must fail at load, not tokenize differently."""
    transformers = pytest.importorskip("transformers")
    folder = project / "models" / "bert"
    text = "The crane, a bird , is flying over the river ."
    expected = transformers.AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
    assert transformers.PreTrainedTokenizerFast.from_pretrained(folder)(text)["input_ids"] == expected
    assert expected == list(encode(VOCAB, [text], MAX_POSITIONS).ids)
    for bert_class in (transformers.BertTokenizerFast, transformers.BertTokenizer):
        with pytest.raises(TypeError):
            bert_class.from_pretrained(folder)
    assert "not a BERT tokenizer" in json.loads((folder / "tokenizer_config.json").read_text())[
        "tokenize_chinese_chars"]


@pytest.mark.parametrize("settings", [{"lowercase": False}, {"strip_accents": False}], ids=["cased", "keep-accents"])
def test_a_wordpiece_export_reads_text_as_prepare_did(settings: dict, tmp_path: Path) -> None:
    """`BertTokenizer` rebuilds BERT's normalizer from tokenizer_config.json, not from tokenizer.json: the
    export must carry `prepare.lowercase` and `prepare.strip_accents` there, or a cased model reads
    lowercased text. Fast and slow (pure-Python) classes alike give data/prepared's ids."""
    transformers = pytest.importorskip("transformers")
    text = "が IŞIK ışık hacía The the"
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "train.txt").write_text(f"{text}\n" * 20, encoding="utf-8")
    (raw / "valid.txt").write_text(f"{text}\n", encoding="utf-8")
    prepared = tmp_path / "data" / "prepared"
    prepare(raw, prepared, PrepareConfig(tokenizer="wordpiece", sentences="lines", vocab_size=200, **settings))
    meta = json.loads((prepared / "meta.json").read_text())
    config = dataclasses.replace(tiny_config(), vocab_size=meta["vocab_size"])
    model = BertForPreTraining(config)
    spec = {"model": dataclasses.asdict(config), "examples": {"vocab_sha256": meta["vocab_sha256"]}}
    save(tmp_path / "models" / "checkpoint", model, torch.optim.SGD(model.parameters(), lr=0.1),
         RunRecord(RunState(step=STEP)), spec, [capture_rng()], keep=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_with({}), sort_keys=False))
    result = run_stage(tmp_path)
    assert result.exit_code == 0, result.output

    folder = tmp_path / "models" / "bert"
    written = json.loads((folder / "tokenizer_config.json").read_text())
    assert (written["do_lower_case"], written["strip_accents"]) == (settings.get("lowercase", True),
                                                                    settings.get("strip_accents"))
    ours = Tokenizer.from_file(str(prepared / "tokenizer.json"))
    slow = getattr(transformers, "BertTokenizerLegacy", transformers.BertTokenizer)  # transformers 5, or 4
    readers = [transformers.AutoTokenizer.from_pretrained(folder),
               transformers.AutoTokenizer.from_pretrained(folder, use_fast=False), slow.from_pretrained(folder)]
    assert UNK_ID not in ours.encode(text).ids
    for pair in ([text, "hacía が"], ["IŞIK Hacía THE", "ışık"]):
        expected = ours.encode(*pair).ids
        for reader in readers:
            assert reader(*pair)["input_ids"] == expected, (type(reader).__name__, pair)


def test_an_mlm_only_model_exports_as_a_standard_masked_lm_bert(tmp_path: Path) -> None:
    """`train.objective: mlm`: no pooler, no NSP head; transformers' BertForMaskedLM loads every weight (none
    missing, none unused) and computes our logits, and our loader reads the folder back the same."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = BertForPreTraining(tiny_config(), next_sentence=False).eval()
    hf_compat.save_pretrained(tmp_path, ours, word_tokenizer(TOKENS))
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    assert len(load_file(str(tmp_path / "model.safetensors"))) == 16 * 2 + 10
    theirs, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(theirs).__name__ == "BertForMaskedLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    encoding = encode(VOCAB, ["a crane is flying"], MAX_POSITIONS)
    ids, segments = torch.tensor([encoding.ids]), torch.tensor([encoding.segments])
    masked = torch.arange(ids.shape[1])
    with torch.no_grad():
        mine = ours(ids, segments, None, masked)
        hf = theirs.eval()(input_ids=ids, token_type_ids=segments)
    assert mine.nsp_logits is None and mine.pooled_output is None
    assert torch.allclose(hf.logits[0], mine.mlm_logits, rtol=0, atol=1e-5)
    loaded, _ = hf_compat.load_pretrained(tmp_path)
    assert not loaded.next_sentence and loaded.state_dict().keys() == ours.state_dict().keys()
