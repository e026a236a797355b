"""The `export` stage: the checkpoint `export.checkpoint` names (best or last) as a Hugging Face model
folder, embedding tables, and d2l's demo.

d2l's "Pretraining BERT" ends by encoding "a crane is flying" and the pair "a crane driver came" /
"he just left", and prints the first values of the `<cls>` and "crane" vectors to show that BERT's
representations depend on context. Here that demonstration becomes measurable: the cosine
similarity of the two "crane" vectors goes to metrics/export.json, and every per-token vector to
a parquet table. The weights leave the pipeline as an HF folder (`bertpipe.export.hf_compat`) that
`transformers` and our own CLI both load; nothing here imports `transformers`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors
import torch
import torch.nn.functional as F
from safetensors.torch import load_model

from bertpipe.atomic import atomic_dir, write_json
from bertpipe.config import ExportConfig, MlflowConfig
from bertpipe.data.prepared_folder import read_pretrained, read_tokenizer, read_vocab
from bertpipe.errors import PipelineError, cause
from bertpipe.export import hf_compat
from bertpipe.export.encode import Encoding, Vocab, contextual, encode
from bertpipe.export.hf_compat import NEVER
from bertpipe.init.folder import EXPORT_RECORD
from bertpipe.model.bert import BertConfig, BertForPreTraining
from bertpipe.tracking import log_export
from bertpipe.training.checkpoint import MLFLOW_RUN_FILE, list_checkpoints, read_state
from bertpipe.vocab import SPECIAL_TOKENS, UNK_ID

log = logging.getLogger(__name__)
DEMO_WORD = "crane"  # the word d2l follows across its two contexts
HEAD = 3  # how many leading values of a vector d2l prints


class ExportError(PipelineError):
    """Nothing to export, or a checkpoint that does not belong to the prepared data."""


def export(checkpoint_dir: Path, prepared_dir: Path, model_dir: Path, embeddings_dir: Path,
           cfg: ExportConfig, tracking: MlflowConfig) -> dict[str, Any]:
    """Write the HF folder into `model_dir` and the two tables into `embeddings_dir` (each whole or not at
    all), add the model to the MLflow run that trained it; return the metrics (metrics/export.json).

    Args:
        checkpoint_dir: the pretrain stage's folder of `step-XXXXXXX/` checkpoints.
        prepared_dir: the prepare stage's folder (vocab.parquet and meta.json).
        model_dir, embeddings_dir: the folders to write.
        cfg: params.export, which checkpoint and the sentences to encode.
        tracking: params.mlflow (enabled, register_model).
    """
    with atomic_dir(model_dir) as model_tmp, atomic_dir(embeddings_dir) as embeddings_tmp:
        metrics = _export_into(checkpoint_dir, prepared_dir, model_tmp, embeddings_tmp, cfg)
    if tracking.enabled and metrics.get("mlflow_run_id"):
        log_export(metrics["mlflow_run_id"], model_dir, metrics, tracking.register_model)
    _report(metrics, model_dir)
    return metrics


def _report(metrics: dict[str, Any], model_dir: Path) -> None:
    """d2l's closing printout, and a warning when it cannot show anything."""
    log.info("Exported step %d (%s) to %s (%s parameters)", metrics["step"], metrics["checkpoint"], model_dir,
             f"{metrics['parameters']:,}")
    similarity = metrics.get(f"{DEMO_WORD}_cosine_similarity")
    if similarity is not None:
        log.info("cosine similarity of '%s' across contexts: %.4f (different words of a sentence: %.4f)",
                 DEMO_WORD, similarity, metrics["token_cosine_mean"])
    if metrics["collapsed"]:
        log.warning("the encoder's outputs have collapsed: different words of a sentence have mean cosine %.4f, "
                    "so the '%s' comparison shows nothing; train longer (README: Training longer on a CPU)",
                    metrics["token_cosine_mean"], DEMO_WORD)


def _export_into(checkpoint_dir: Path, prepared_dir: Path, model_dir: Path, embeddings_dir: Path,
                 cfg: ExportConfig) -> dict[str, Any]:
    vocab_table, meta = read_vocab(prepared_dir)
    vocab = Vocab(read_tokenizer(prepared_dir, vocab_table))
    path = chosen_checkpoint(checkpoint_dir, cfg.checkpoint)
    model, state = load_checkpoint(path, meta["vocab_sha256"], prepared_dir)
    never_answer_reserved(model, len(vocab.specials))
    if meta.get("tokenizer") == "pretrained":  # continued pretraining: in the checkpoint's numbering
        checkpoint_ids, tokenizer_files = read_pretrained(prepared_dir, len(vocab))
        hf_compat.save_in_checkpoint_order(model_dir, model, checkpoint_ids, tokenizer_files)
        model, tokenizer = hf_compat.load_pretrained(model_dir)  # the tables below describe models/bert's ids
        vocab = Vocab(tokenizer)
        vocab_table = vocab_table.assign(id=checkpoint_ids).sort_values("id", ignore_index=True)
    else:
        hf_compat.save_pretrained(model_dir, model, vocab.tokenizer)
    pq.write_table(token_table(model, vocab_table), embeddings_dir / "tokens.parquet")
    encodings = [encode(vocab, pair, model.config.max_position_embeddings) for pair in cfg.sentences]
    vectors = [contextual(model, e)[0] for e in encodings]  # [T, H] each
    pq.write_table(contextual_table(vocab, encodings, vectors), embeddings_dir / "contextual.parquet")
    sizes = {"step": state["state"]["step"], "checkpoint": cfg.checkpoint, "vocab_size": len(vocab),
             "hidden_size": model.config.hidden_size, "num_hidden_layers": model.config.num_hidden_layers,
             "parameters": sum(p.numel() for p in model.parameters())}
    run_id = _mlflow_run(checkpoint_dir, state)
    run = {"mlflow_run_id": run_id} if run_id else {}
    if run_id:  # the folder names its run wherever it is copied: a later model.init links to it (bertpipe.init)
        write_json(model_dir / EXPORT_RECORD, {"mlflow_run_id": run_id, "step": sizes["step"]})
    return sizes | demo_metrics(cfg.sentences, encodings, vectors) | run


def _mlflow_run(checkpoint_dir: Path, state: dict[str, Any]) -> str | None:
    """The MLflow run the latest pretrain logged to, which may be newer than the checkpoint's (another
    store, or a resumed run that had nothing left to train), else the checkpoint's."""
    try:
        return json.loads((checkpoint_dir / MLFLOW_RUN_FILE).read_text())["mlflow_run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return state.get("mlflow_run_id")




def never_answer_reserved(model: BertForPreTraining, reserved: int) -> None:
    """Set the MLM head's bias of the reserved tokens (ids 0..reserved-1) to NEVER, so that fill-mask,
    ours and Hugging Face's pipeline alike, never answers `[UNK]`, `[PAD]`, ...: with a word vocabulary
    `<unk>` is a frequent label and would otherwise often be the favourite answer. The checkpoint keeps
    the trained values; only the exported head changes."""
    with torch.no_grad():
        model.cls.predictions.bias[:reserved] = NEVER


def chosen_checkpoint(checkpoint_dir: Path, which: str) -> Path:
    """The newest checkpoint, or (`best`) the one with the lowest held-out MLM loss that it names."""
    checkpoints = list_checkpoints(checkpoint_dir)
    if not checkpoints:
        raise ExportError(f"no checkpoint in {checkpoint_dir}; run the pretrain stage first")
    best_step = read_state(checkpoints[-1])["state"].get("best_step")
    if which == "last" or best_step is None:
        return checkpoints[-1]
    best = checkpoint_dir / f"step-{best_step:07d}"
    if best not in checkpoints:
        raise ExportError(f"{checkpoints[-1]} names step {best_step} as the best, but {best} is gone; rerun "
                          "pretrain, or set export.checkpoint: last")
    return best


def load_checkpoint(path: Path, vocab_sha: str, prepared_dir: Path) -> tuple[BertForPreTraining, dict[str, Any]]:
    """The checkpoint's model in eval mode and its state.json (step, MLflow run id, ...); refuses one
    trained on another vocabulary."""
    state = read_state(path)
    trained_on = state.get("spec", {}).get("examples", {}).get("vocab_sha256")
    if trained_on != vocab_sha:
        raise ExportError(f"{path} was trained on vocabulary {str(trained_on)[:12]}, but {prepared_dir}/meta.json "
                          f"has {vocab_sha[:12]}; rerun pretrain on this data")
    # a checkpoint written before train.objective existed was trained with NSP
    next_sentence = state["spec"].get("train", {}).get("objective", "mlm+nsp") == "mlm+nsp"
    model = BertForPreTraining(BertConfig(**state["spec"]["model"]), next_sentence)
    try:
        load_model(model, str(path / "model.safetensors"), strict=True)
    except (safetensors.SafetensorError, RuntimeError) as err:
        raise ExportError(f"{path}/model.safetensors does not fit its state.json "
                          f"({cause(err)})") from None
    return model.eval(), state


def _vectors(matrix: torch.Tensor) -> pa.ListArray:
    """Rows of a [N, H] tensor as a list<float32> column."""
    flat = pa.array(matrix.detach().float().cpu().numpy().reshape(-1))  # [N*H]
    offsets = pa.array(np.arange(0, len(flat) + 1, matrix.shape[1], dtype=np.int32))  # [N+1]
    return pa.ListArray.from_arrays(offsets, flat)


def token_table(model: BertForPreTraining, vocab_table: pd.DataFrame) -> pa.Table:
    """The input-embedding table: one row per vocabulary entry."""
    weights = model.bert.embeddings.word_embeddings.weight  # [V, H]
    return pa.table({"id": pa.array(vocab_table["id"], pa.int64()),
                     "token": pa.array(vocab_table["token"], pa.string()),
                     "count": pa.array(vocab_table["count"], pa.int64()),
                     "vector": _vectors(weights)})


_CONTEXTUAL_COLUMNS = {"input": pa.int64(), "position": pa.int64(), "segment": pa.int64(), "word": pa.string(),
                       "token": pa.string(), "id": pa.int64(), "is_unk": pa.bool_()}


def contextual_table(vocab: Vocab, encodings: Sequence[Encoding], vectors: Sequence[torch.Tensor]) -> pa.Table:
    """One row per token of every input: where it is, the word it read, its token, and its encoder output.

    The `<cls>` vector of an input is its row at position 0.
    """
    rows = [(n, i, e.segments[i], e.words[i], vocab.tokens[e.ids[i]], e.ids[i], e.is_unk[i])
            for n, e in enumerate(encodings) for i in range(len(e))]
    columns = {name: pa.array(values, kind)
               for (name, kind), values in zip(_CONTEXTUAL_COLUMNS.items(), zip(*rows, strict=True), strict=True)}
    return pa.table({**columns, "vector": _vectors(torch.cat(list(vectors)))})


def demo_metrics(sentences: Sequence[Sequence[str]], encodings: Sequence[Encoding],
                 vectors: Sequence[torch.Tensor]) -> dict[str, Any]:
    """d2l's printout per input (shape, heads of `<cls>` and of the demo word) and the word's context sensitivity."""
    metrics: dict[str, Any] = {}
    demo_vectors = []
    for n, (pair, e, v) in enumerate(zip(sentences, encodings, vectors, strict=True)):
        item = {"text": " | ".join(pair), "shape": [1, *v.shape], "unk_tokens": sum(e.is_unk), "cls_head": _head(v[0])}
        if DEMO_WORD in e.words:
            at = e.words.index(DEMO_WORD)
            item |= {f"{DEMO_WORD}_position": at, f"{DEMO_WORD}_head": _head(v[at])}
            demo_vectors.append(v[at])
        metrics[f"input_{n}"] = item
    if len(demo_vectors) >= 2:  # the first two contexts, as in d2l
        similarity = F.cosine_similarity(demo_vectors[0], demo_vectors[1], dim=0).item()
        metrics[f"{DEMO_WORD}_cosine_similarity"] = round(similarity, 6)
    reference = token_cosine(encodings, vectors)
    metrics |= {"token_cosine_mean": round(reference, 6), "collapsed": reference > COLLAPSED}
    return metrics


COLLAPSED = 0.99  # different words of a sentence this alike: the encoder gives every token the same vector


def token_cosine(encodings: Sequence[Encoding], vectors: Sequence[torch.Tensor]) -> float:
    """The reference for the demo word's cosine: the mean cosine between the vectors of different words
    of the same input (`<cls>` and `<sep>` left out). A context effect shows as the demo word's cosine
    across contexts standing well above this; a collapsed encoder puts both near 1."""
    means = []
    for e, v in zip(encodings, vectors, strict=True):
        words = v[[i for i, token_id in enumerate(e.ids) if token_id >= len(SPECIAL_TOKENS) or token_id == UNK_ID]]
        if len(words) >= 2:
            cosine = F.cosine_similarity(words[:, None], words[None], dim=-1)  # [W, W]
            means.append(cosine[~torch.eye(len(words), dtype=torch.bool)].mean().item())
    return sum(means) / len(means) if means else float("nan")


def _head(vector: torch.Tensor) -> list[float]:
    return [round(x, 6) for x in vector[:HEAD].tolist()]
