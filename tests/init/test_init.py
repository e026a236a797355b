"""Continued pretraining's starting checkpoint (`model.init`, bertpipe/init): fetched from a folder or a (fake,
local) Hugging Face Hub, refused in one line when it cannot be continued, its weights in bertpipe's model at
step 0 exactly as the checkpoint holds them, and back out in its own numbering."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_PRETRAIN, params_with
from helpers.checkpoints import bert_folder, sample_lines
from safetensors.torch import load_file

from bertpipe.config import ModelConfig, Params, PrepareConfig, build
from bertpipe.errors import ConfigError
from bertpipe.init.fetch import fetch_init
from bertpipe.init.folder import InitError, model_params, read_start

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, shared_wikitext: Path) -> Path:
    """An uncased BertForPreTraining folder (reserved tokens at Hugging Face's ids), built once."""
    lines = (shared_wikitext / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines()
    return bert_folder(tmp_path_factory.mktemp("checkpoint") / "bert", [x for x in lines if x.strip()][:400])


def init(value: str, revision: str = "") -> ModelConfig:
    return build(ModelConfig, {"init": value, "init_revision": revision})


def variant(checkpoint: Path, folder: Path) -> Path:
    shutil.copytree(checkpoint, folder)
    return folder


def test_empty_is_a_marker_and_a_folder_is_copied_checked_and_recorded(checkpoint: Path, tmp_path: Path) -> None:
    assert fetch_init(init(""), tmp_path / "none") == {"init": ""}
    assert read_start(tmp_path / "none") is None
    export = variant(checkpoint, tmp_path / "export")
    (export / "bertpipe.json").write_text('{"mlflow_run_id": "abc123", "step": 7}')
    metrics = fetch_init(init(str(export)), tmp_path / "init")
    start = read_start(tmp_path / "init")
    weights = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()  # as sha256sum says
    assert metrics["weights_sha256"] == start.record["weights_sha256"] == weights and metrics["commit"] is None
    assert metrics["init_run_id"] == "abc123" and metrics["hidden_size"] == 32
    assert start.tags() == {"bertpipe.init": str(export), "bertpipe.init_weights_sha256": weights,
                            "bertpipe.init_run_id": "abc123", "bertpipe.init_step": "7"}
    assert (tmp_path / "init" / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()


def test_a_vocab_txt_alone_becomes_transformers_fast_tokenizer(checkpoint: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    folder = variant(checkpoint, tmp_path / "vocab-only")
    (folder / "tokenizer.json").unlink()
    fetch_init(init(str(folder)), tmp_path / "init")
    text = ["The crane, Zürich's tallest, flew."]
    assert (read_start(tmp_path / "init").tokenizer().encode(text[0]).ids
            == AutoTokenizer.from_pretrained(checkpoint)(text)["input_ids"][0])


def test_a_sharded_half_precision_checkpoint_is_read_whole(checkpoint: Path, tmp_path: Path) -> None:
    """As larger Hub checkpoints come: fp16 weights in several model-0000k-of-0000n.safetensors shards beside
    model.safetensors.index.json, and another file the index does not name. Every tensor the index names is read,
    at its own values, into the run's fp32 model, and nothing else."""
    import transformers
    from safetensors.torch import save_file

    from bertpipe.export.hf_compat import config_from_hf
    from bertpipe.init.weights import checkpoint_state, load_start
    from bertpipe.model.bert import BertForPreTraining

    folder = tmp_path / "sharded"
    original = transformers.BertForPreTraining.from_pretrained(checkpoint).half()
    original.save_pretrained(folder, max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copyfile(checkpoint / name, folder / name)
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 2 and (folder / "model.safetensors.index.json").exists()
    save_file({"bert.embeddings.word_embeddings.weight": torch.zeros(2, 2)}, folder / "model.fp16.safetensors")
    fetch_init(init(str(folder)), tmp_path / "init")
    start = read_start(tmp_path / "init")
    state, theirs = checkpoint_state(start), original.state_dict()
    assert all(torch.equal(tensor, theirs[key]) for key, tensor in state.items()) and len(state) >= 16 * 2 + 10
    model = BertForPreTraining(config_from_hf(start.config))
    load_start(model, start, np.arange(model.config.vocab_size))  # the ids as they are
    ours = model.state_dict()
    assert all(torch.equal(ours[key], tensor.float()) for key, tensor in state.items())


def bad_checkpoints(checkpoint: Path, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    gpt2 = variant(checkpoint, tmp_path / "gpt2")
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257}))
    yield gpt2, "is a 'gpt2' checkpoint (config.json model_type), not BERT"
    pickled = variant(checkpoint, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    yield pickled, "offers its weights only as pytorch_model.bin, a pickle, which bertpipe does not load (unpickling"
    specials = variant(checkpoint, tmp_path / "specials")
    (specials / "tokenizer_config.json").write_text(json.dumps({"mask_token": "[MSK]"}))
    yield specials, "tokenizer lacks its special tokens (mask_token [MSK])"


def test_what_cannot_be_continued_is_one_line_and_nothing_is_lost(checkpoint: Path, tmp_path: Path) -> None:
    fetch_init(init(""), tmp_path / "init")
    before = (tmp_path / "init" / "init.json").read_bytes()
    for folder, says in bad_checkpoints(checkpoint, tmp_path):
        with pytest.raises(InitError) as err:
            fetch_init(init(str(folder)), tmp_path / "init")
        assert says in str(err.value) and "\n" not in str(err.value), str(err.value)
        assert (tmp_path / "init" / "init.json").read_bytes() == before
    with pytest.raises(ConfigError, match=r"model.init = './missing' is not allowed; expected an existing folder"):
        fetch_init(init("./missing"), tmp_path / "init")


def test_the_checkpoint_gives_the_shape_and_conflicts_are_one_line(checkpoint: Path, tmp_path: Path) -> None:
    fetch_init(init(str(checkpoint)), tmp_path / "init")
    start = read_start(tmp_path / "init")
    params = build(Params, params_with({"model.init": str(checkpoint), "prepare.tokenizer": "pretrained"}))
    assert params.model.hidden_size is None  # the preset is not read
    model = model_params(params, start).model
    assert (model.hidden_size, model.num_hidden_layers, model.intermediate_size, model.max_position_embeddings) == (
        32, 2, 64, 64)
    refused = {"model.hidden_size": (128, "model.hidden_size = 128 is not allowed; expected null or 32"),
               "examples.max_len": (128, "examples.max_len = 128 is not allowed; expected at most 64, the "
                                         "max_position_embeddings of model.init")}
    continued = {"model.init": str(checkpoint), "prepare.tokenizer": "pretrained"}
    for key, (value, says) in refused.items():
        wrong = build(Params, params_with({**continued, key: value}))
        with pytest.raises(ConfigError) as err:
            model_params(wrong, start)
        assert says in str(err.value)
    with pytest.raises(ConfigError, match="run `dvc repro init` first"):
        model_params(build(Params, params_with({"model.init": "other", "prepare.tokenizer": "pretrained"})), start)


@pytest.mark.parametrize(("settings", "says"), [
    ({"prepare.tokenizer": "pretrained"}, "prepare.tokenizer = 'pretrained' is not allowed; expected word or wordpiece "
                                          "without model.init"),
    ({"model.init": "bert-base-uncased", "prepare.tokenizer": "wordpiece"},
     "prepare.tokenizer = 'wordpiece' is not allowed; expected pretrained with model.init"),
    ({"model.init_revision": "main"}, "model.init_revision = 'main' is not allowed; expected empty without model.init"),
])
def test_params_that_do_not_go_together(settings: dict, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        build(Params, params_with(settings))
    assert says in str(err.value)


def test_step_0_is_the_checkpoint_and_the_export_maps_back(checkpoint: Path, sample_raw: Path, tmp_path: Path,
                                                           one_thread: None) -> None:
    """A cased BertForMaskedLM: the model at step 0 holds every tensor of the checkpoint (the vocabulary's rows
    re-numbered), the NSP head it lacks is fresh, and the export's weights are the checkpoint's, byte for byte."""
    from bertpipe.data.examples import build_examples
    from bertpipe.data.examples_folder import read_meta
    from bertpipe.export.hf_compat import TIED, save_in_checkpoint_order, to_hf
    from bertpipe.init.weights import checkpoint_state, start_ids
    from bertpipe.resolve import resolve
    from bertpipe.training.distributed import World
    from bertpipe.training.pretrain import setup, trajectory

    cased = bert_folder(tmp_path / "cased", sample_lines(sample_raw), cased=True, head="BertForMaskedLM")
    fetch_init(init(str(cased)), tmp_path / "init")
    start = read_start(tmp_path / "init")
    from bertpipe.data.prepare import prepare

    prepare(sample_raw, tmp_path / "prepared", build(PrepareConfig, {"tokenizer": "pretrained"}), tmp_path / "init")
    ids = np.load(tmp_path / "prepared" / "pretrained_ids.npy")
    assert ids[:5].tolist() == [1, 0, 4, 2, 3]  # [UNK] [PAD] [MASK] [CLS] [SEP] at Hugging Face's ids
    params = build(Params, params_with({**SMALL_PRETRAIN, "model.init": str(cased), "prepare.tokenizer": "pretrained"}))
    params = model_params(params, start)
    build_examples(tmp_path / "prepared", tmp_path / "examples", params.examples, seed=0)
    meta = read_meta(tmp_path / "examples")
    resolved, memory = resolve(params, meta)
    bert_config, work = trajectory(resolved, meta, tmp_path / "checkpoints", start)
    assert work.spec["init"] == start.identity()
    run = setup(resolved, memory, tmp_path / "examples", meta, bert_config, work,
                World(0, 1, 0, torch.device("cpu")), start)
    ours = to_hf(run.model.state_dict(), bert_config, run.model.next_sentence)
    original = checkpoint_state(start)
    rows = torch.from_numpy(np.argsort(start_ids(start, meta["vocab_sha256"])))
    for key in ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias"):
        ours[key] = ours[key][rows]
    assert set(original) < set(ours) and all(torch.equal(ours[key], original[key]) for key in original)
    assert sorted(set(ours) - set(original)) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight",
                                                 "cls.seq_relationship.bias", "cls.seq_relationship.weight"]
    out = tmp_path / "out"
    out.mkdir()
    save_in_checkpoint_order(out, run.model, ids, tmp_path / "prepared" / "pretrained")
    exported, saved = load_file(out / "model.safetensors"), load_file(cased / "model.safetensors")
    assert set(saved) - set(TIED) <= set(exported)  # nothing of the checkpoint left out but the tied aliases
    assert all(torch.equal(exported[key], tensor) for key, tensor in saved.items() if key not in TIED)
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 0


class FakeHub(BaseHTTPRequestHandler):
    """The Hub's few routes snapshot_download takes (huggingface_hub 2.x): the revision's info, its file tree,
    each file's resolve URL (HEAD and GET); one model (`org/tiny-bert`), commit COMMIT, on branch main."""

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, body: bool) -> None:
        folder: Path = self.server.folder  # type: ignore[attr-defined]
        files = sorted(p.name for p in folder.iterdir())
        path = self.path.split("?")[0]
        headers = {"X-Repo-Commit": COMMIT}
        if path in ("/api/models/org/tiny-bert/revision/main", f"/api/models/org/tiny-bert/revision/{COMMIT}"):
            data = json.dumps({"id": "org/tiny-bert", "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]})
        elif path == f"/api/models/org/tiny-bert/tree/{COMMIT}":
            data = json.dumps([{"type": "file", "path": f, "size": (folder / f).stat().st_size,
                                "oid": hashlib.sha1((folder / f).read_bytes()).hexdigest()} for f in files])
        elif path.startswith(f"/org/tiny-bert/resolve/{COMMIT}/") and path.rsplit("/", 1)[1] in files:
            content = (folder / path.rsplit("/", 1)[1]).read_bytes()
            headers["ETag"] = f'"{hashlib.sha1(content).hexdigest()}"'
            return self._send(200, content, headers, body)
        else:
            return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body)
        self._send(200, data.encode(), headers, body)

    def _send(self, status: int, content: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(content))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(content)

    def log_message(self, format: str, *args: object) -> None:
        """Keep pytest's output clean."""


@pytest.fixture
def hub(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fake Hub on 127.0.0.1 serving `checkpoint` as org/tiny-bert (HF_ENDPOINT), with an empty cache."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.folder = checkpoint  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    endpoint = f"http://127.0.0.1:{server.server_port}"  # HF_ENDPOINT, as huggingface_hub read it at its import
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", endpoint)
    monkeypatch.setattr("huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    yield endpoint
    server.shutdown()
    server.server_close()


def test_the_hub_pins_the_commit_and_then_works_offline(hub: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = fetch_init(init("org/tiny-bert"), tmp_path / "init")
    assert metrics["commit"] == COMMIT and metrics["vocab_size"] == 600
    assert read_start(tmp_path / "init").identity()["commit"] == COMMIT
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert fetch_init(init("org/tiny-bert"), tmp_path / "again")["commit"] == COMMIT  # from the cache


def test_unknown_ids_and_no_network_are_one_line(hub: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"model.init = 'org/no-such-bert' is not allowed; expected a model id on "
                                          r"the Hugging Face Hub \(HTTP 404"):
        fetch_init(init("org/no-such-bert"), tmp_path / "init")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(InitError, match=r"the Hugging Face Hub is not reachable .* and the cache holds no copy") as err:
        fetch_init(init("org/tiny-bert"), tmp_path / "init")
    assert "\n" not in str(err.value)


def test_an_exports_fill_mask_mask_is_not_carried_into_training() -> None:
    """A bertpipe export sets the reserved tokens' MLM bias to NEVER so fill-mask never answers them; continued
    from it, a masked [UNK] would cost a loss of 10^4 (seen: a mean MLM loss of 64 instead of 4). Those
    entries start from the run's own initial bias; every learned entry is the checkpoint's."""
    from bertpipe.export.hf_compat import NEVER
    from bertpipe.init.weights import unmasked_bias

    exported = torch.tensor([NEVER, NEVER, -3.0, 0.5, -12.0])
    initial = torch.tensor([-7.0, -8.0, -9.0, -9.5, -10.0])
    assert unmasked_bias(exported, initial).tolist() == [-7.0, -8.0, -3.0, 0.5, -12.0]
