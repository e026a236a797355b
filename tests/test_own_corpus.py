"""Pretraining on your own text, as the README tells a user to: a corpus as corpora ship (a folder of one
file per document, gzipped JSON-lines shards), WordPiece,
`dvc repro`, then the export handed to ordinary Hugging Face code with no bertpipe code.

The documents are real text: WikiText-2's validation articles with WikiText's tokenization undone
(`a @-@ b` -> `a-b`, ` , ` -> `, `, ...), one article per document, so sentences end in `. ` and
sentencex has to find them. Also: switching WikiText itself to WordPiece through `dvc exp run -S`
reruns exactly the stages that read the tokenizer.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import BIN, data_stages, make_project, runner

pytestmark = pytest.mark.slow
OWN_TEXT = {"data.source": "corpus", "prepare.tokenizer": "wordpiece", "prepare.sentences": "sentencex",
            "prepare.vocab_size": 3000, "train.batch_size": 64, "train.steps": 4, "train.eval_every": 2,
            "train.eval_examples": 256, "mlflow.enabled": False, "downstream.tasks": []}


def detokenized(text: str) -> list[str]:
    """WikiText's articles as plain documents (blank-line separated paragraphs), headings dropped."""
    documents, current = [], []
    for line in text.splitlines():
        if re.fullmatch(r" = [^=].* = ", line):
            documents.append(current)
            current = []
        elif line.strip() and not line.startswith(" = "):
            plain = re.sub(r" @(.)@ ", r"\1", line.strip())
            plain = re.sub(r" ([.,;:!?)\]'])", r"\1", plain)
            current.append(re.sub(r"([(\[]) ", r"\1", plain).replace("<unk>", "something"))
    return ["\n".join(paragraphs) for paragraphs in [*documents, current] if paragraphs]


def own_corpus(folder: Path, shared_wikitext: Path) -> Path:
    """As corpora ship: train a folder of one file per article, valid two gzipped JSON-lines shards (Hub names)."""
    (folder / "train").mkdir(parents=True)
    for i, document in enumerate(detokenized((shared_wikitext / "wiki.valid.tokens").read_text(encoding="utf-8"))):
        (folder / "train" / f"{i:04d}.txt").write_text(document + "\n", encoding="utf-8")
    documents = detokenized((shared_wikitext / "wiki.test.tokens").read_text(encoding="utf-8"))
    for shard, part in enumerate((documents[:len(documents) // 2], documents[len(documents) // 2:])):
        lines = "".join(json.dumps({"id": f"{shard}-{i}", "text": text}) + "\n" for i, text in enumerate(part))
        (folder / f"validation-{shard:05d}-of-00002.jsonl.gz").write_bytes(gzip.compress(lines.encode("utf-8")))
    return folder


def dvc_project(tmp_path: Path, stages: dict | None = None) -> tuple[Path, Callable]:
    project = make_project(tmp_path / "project", stages)
    run = runner(project, tmp_path, timeout=400)
    run("git", "init", "-q")
    run(str(BIN / "dvc"), "init", "-q")
    return project, run


@pytest.fixture(scope="module")
def repro(tmp_path_factory: pytest.TempPathFactory, shared_wikitext: Path) -> Path:
    """`dvc repro` of the whole pipeline on a folder of the user's own .txt documents."""
    from conftest import params_with

    tmp_path = tmp_path_factory.mktemp("own_corpus")
    project, run = dvc_project(tmp_path)
    own_corpus(project / "corpus", shared_wikitext)
    (project / "params.yaml").write_text(json.dumps(params_with(OWN_TEXT)))
    done = run(str(BIN / "dvc"), "repro")
    assert "Running stage 'export'" in done.stdout
    return project


def test_the_export_is_a_standard_bert_folder(repro: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = repro / "models" / "bert"
    assert {"vocab.txt", "tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= {
        p.name for p in folder.iterdir()}
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert isinstance(tokenizer, transformers.BertTokenizerFast)
    assert (tokenizer.cls_token, tokenizer.mask_token, tokenizer.unk_token) == ("[CLS]", "[MASK]", "[UNK]")
    texts = ["The crane's nest, in Zürich, is huge.", "東京のクレーン\x0bCAFÉ\u200b naïve", "[MASK] a[SEP]b  \t c"]
    for cls in (transformers.BertTokenizerFast, transformers.BertTokenizer, transformers.PreTrainedTokenizerFast):
        other = cls.from_pretrained(folder)
        for text in texts:
            assert other(text, "b")["input_ids"] == tokenizer(text, "b")["input_ids"], (cls, text)
    from_vocab = transformers.BertTokenizerFast(str(folder / "vocab.txt"))  # Google's files: vocab.txt alone
    assert [from_vocab.tokenize(t) for t in texts] == [tokenizer.tokenize(t) for t in texts]
    assert any(token.startswith("##") for token in tokenizer.tokenize("unbelievably photosynthesising cranes"))


def test_few_held_out_subwords_are_unknown(repro: Path) -> None:
    metrics = json.loads((repro / "metrics" / "prepare.json").read_text())
    assert metrics["tokenizer"] == "wordpiece" and metrics["layout"] == "documents"
    assert metrics["valid"]["unk_fraction"] < 0.01
    assert metrics["train"]["sentences_per_paragraph"] > 2  # sentencex found the sentences


def test_fill_mask_answers_a_word(repro: Path) -> None:
    transformers = pytest.importorskip("transformers")
    fill = transformers.pipeline("fill-mask", model=str(repro / "models" / "bert"))
    answers = fill("The game was released in [MASK] .", top_k=10)
    assert answers[0]["token_str"].isalpha(), answers[0]
    assert not {a["token_str"] for a in answers} & {"[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"}


def test_a_classifier_built_from_the_export_trains(repro: Path) -> None:
    transformers = pytest.importorskip("transformers")
    folder = repro / "models" / "bert"
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    batch = tokenizer(["A crane is flying.", "The river is wide and slow."], padding=True, return_tensors="pt")
    out = model(**batch, labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    for weight in (model.classifier.weight, model.bert.embeddings.word_embeddings.weight):
        assert weight.grad.abs().sum() > 0
    masked_lm = transformers.AutoModelForMaskedLM.from_pretrained(folder)
    assert masked_lm(**batch).logits.shape[-1] == tokenizer.vocab_size


def test_bertpipe_fill_mask_reads_text_as_the_exported_tokenizer_does(repro: Path) -> None:
    from click.testing import CliRunner

    from bertpipe.cli import main

    transformers = pytest.importorskip("transformers")
    folder = repro / "models" / "bert"
    fill = transformers.pipeline("fill-mask", model=str(folder))
    for text in ("The game was released in [MASK].", "Über den Fluß flog ein [MASK], naïvely."):
        result = CliRunner().invoke(main, ["fill-mask", text, "--top-k", "3", "--model", str(folder)])
        assert result.exit_code == 0, result.output
        assert any(line.startswith("[MASK] at position ") for line in result.output.splitlines())
        assert re.findall(r"^\s+\d+\. (\S+)", result.output, flags=re.MULTILINE) == [
            a["token_str"].replace(" ", "") for a in fill(text, top_k=3)]


def test_switching_wikitext_to_wordpiece_reruns_what_reads_the_tokenizer(tmp_path: Path, sample_raw: Path,
                                                                        write_params: Callable[..., Path]) -> None:
    project, run = dvc_project(tmp_path, data_stages())
    write_params(project, {"data.source": str(sample_raw)})
    run(str(BIN / "dvc"), "repro", "examples")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline")
    out = run(str(BIN / "dvc"), "exp", "run", "-S", "prepare.tokenizer=wordpiece", "-S",
              "prepare.vocab_size=8000").stdout
    assert "Stage 'download' didn't change, skipping" in out
    assert "Running stage 'prepare'" in out and "Running stage 'examples'" in out
    shown = json.loads(run(str(BIN / "dvc"), "exp", "show", "--json").stdout)
    experiments = [e for entry in shown for e in (entry.get("experiments") or [])]
    (metrics,) = [e["revs"][0]["data"]["metrics"]["metrics/prepare.json"]["data"] for e in experiments]
    assert metrics["tokenizer"] == "wordpiece" and metrics["vocab_size"] == 8000


def test_the_readme_vocabulary_sweep_runs_queued_on_a_corpus_inside_the_repository(
        tmp_path: Path, shared_wikitext: Path) -> None:
    """README's sweep, `--queue` then `--run-all -j 3`, with `data.source` a git-ignored folder of the repository:
    queued runs work in a copy under .dvc/tmp/exps that lacks it, so the relative path must mean the repository's."""
    project, run = dvc_project(tmp_path, data_stages())
    own_corpus(project / "corpus", shared_wikitext)
    (project / ".git" / "info" / "exclude").write_text("/corpus/\n")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "pipeline")
    dvc = str(BIN / "dvc")
    sizes = (1000, 2000, 3000)
    for v in sizes:
        run(dvc, "exp", "run", "--queue", "-n", f"vocab-{v}", "-S", "data.source=corpus", "-S",
            "prepare.sentences=sentencex", "-S", "prepare.tokenizer=wordpiece", "-S", f"prepare.vocab_size={v}")
    run(dvc, "exp", "run", "--run-all", "-j", "3")
    shown = json.loads(run(dvc, "exp", "show", "--json").stdout)
    experiments = {e["name"]: e["revs"][0]["data"] for entry in shown for e in (entry.get("experiments") or [])}
    assert set(experiments) == {f"vocab-{v}" for v in sizes}
    for v in sizes:
        prepared = experiments[f"vocab-{v}"]["metrics"]["metrics/prepare.json"]["data"]
        assert prepared["vocab_size"] == v and prepared["layout"] == "documents"
        assert prepared["train"]["documents"] == len(list((project / "corpus" / "train").iterdir()))
