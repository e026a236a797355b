"""The `bertpipe` command: try an exported model from the shell, as d2l's `get_bert_encoding` demo does,
plan a step's memory, open MLflow's UI, and reclaim the disk that stopped and deleted runs hold.

`bertpipe encode "a crane is flying" --pair "he just left"` prints the tokens, the output shape and
the first values of the `<cls>` and per-token vectors; `bertpipe fill-mask "a <mask> is flying"`
prints the MLM head's top words; `bertpipe plan-memory --preset large --max-len 512` says whether a
training step fits. `encode` and `fill-mask` load the folder the export stage wrote with our own model
code (`bertpipe.export.hf_compat.load_pretrained`), so `transformers` is never needed. `bertpipe ui` serves
MLflow's UI on the project's store and prints the link that opens on the training runs. `bertpipe gc` lists
what stopped pretrain runs and deleted MLflow runs left on disk (`bertpipe.reclaim`), and `--yes` removes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import torch

from bertpipe.export.encode import Encoding, Vocab, contextual, encode, fill_mask
from bertpipe.export.hf_compat import load_pretrained
from bertpipe.model.bert import BertConfig, BertForPreTraining
from bertpipe.stage import entry_point
from bertpipe.vocab import UNK_ID

HEAD = 3  # leading values shown per vector, as d2l prints them
model_option = click.option("--model", "model_dir", type=click.Path(path_type=Path), default=Path("models/bert"),
                            show_default=True, help="Folder written by the export stage.")


def _load(model_dir: Path, sentences: list[str]) -> tuple[BertForPreTraining, Vocab, Encoding]:
    model, tokenizer = load_pretrained(model_dir)
    vocab = Vocab(tokenizer)
    return model, vocab, encode(vocab, sentences, model.config.max_position_embeddings)


def _unknown_note(vocab: Vocab, encoding: Encoding) -> str | None:
    if not encoding.unknown_words:
        return None
    return f"unknown words mapped to {vocab.specials[UNK_ID]}: " + ", ".join(encoding.unknown_words)


@click.group()
def main() -> None:
    """Use a BERT exported by the bertpipe pipeline, browse its MLflow runs, reclaim disk."""


@main.command("encode")
@click.argument("text")
@click.option("--pair", help="A second sentence (segment 1), as for next-sentence prediction.")
@model_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@entry_point
def encode_command(text: str, pair: str | None, model_dir: Path, as_json: bool) -> None:
    """Encode TEXT (and --pair) and show the contextual vectors' first values."""
    model, vocab, encoding = _load(model_dir, [text] if pair is None else [text, pair])
    vectors = contextual(model, encoding)  # [1, T, H]
    rows = [{"position": i, "word": w, "token": vocab.tokens[t], "id": t, "segment": s, "is_unk": u,
             "head": [round(x, 6) for x in vectors[0, i, :HEAD].tolist()]}
            for i, (w, t, s, u) in enumerate(zip(encoding.words, encoding.ids, encoding.segments, encoding.is_unk,
                                                 strict=True))]
    if as_json:
        click.echo(json.dumps({"shape": list(vectors.shape), "cls_head": rows[0]["head"],
                               "unknown_words": encoding.unknown_words, "tokens": rows}))
        return
    _print_encoding(rows, list(vectors.shape), _unknown_note(vocab, encoding))


def _print_encoding(rows: list[dict[str, Any]], shape: list[int], note: str | None) -> None:
    click.echo("tokens: " + " ".join(r["token"] for r in rows))
    if note:
        click.echo(note)
    click.echo(f"shape: {shape}")
    click.echo(f"<cls> head: {rows[0]['head']}")
    for r in rows:
        flag = f"  ({r['word']} -> {r['token']})" if r["is_unk"] else ""
        click.echo(f"{r['position']:>4}  seg {r['segment']}  {r['token']:<12} {r['head']}{flag}")


@main.command("fill-mask")
@click.argument("text")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@model_option
@entry_point
def fill_mask_command(text: str, top_k: int, model_dir: Path) -> None:
    """Predict the words at each mask token in TEXT (<mask>, or [MASK] for a WordPiece model)."""
    model, vocab, encoding = _load(model_dir, [text])
    note = _unknown_note(vocab, encoding)
    if note:
        click.echo(note)
    for prediction in fill_mask(model, vocab, encoding, top_k):
        click.echo(f"{vocab.mask_token} at position {prediction.position}:")
        for rank, (token, p) in enumerate(zip(prediction.tokens, prediction.probabilities, strict=True), 1):
            click.echo(f"{rank:>4}. {token:<15} {p:.4f}")


@main.command("plan-memory")
@click.option("--preset", type=click.Choice(["tiny", "base", "large"]), default="base", show_default=True)
@click.option("--max-len", type=int, default=512, show_default=True)
@click.option("--batch-size", type=int, default=512, show_default=True, help="Rows per process and step.")
@click.option("--vocab-size", type=int, default=20256, show_default=True, help="WikiText-2's, with min_freq 5.")
@click.option("--mask-prob", type=click.FloatRange(0, 1, min_open=True), default=0.15, show_default=True,
              help="examples.mask_prob: sets the prediction slots per row.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--activation-checkpointing", is_flag=True)
@click.option("--memory-gib", type=float, help="Free memory to plan for (default: this machine's).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@entry_point
def plan_memory_command(preset: str, max_len: int, batch_size: int, vocab_size: int, mask_prob: float,
                        precision: str, activation_checkpointing: bool, memory_gib: float | None,
                        device: str) -> None:
    """Would a training step fit, and with which micro-batch? (The pretrain stage's own planner.)"""
    from bertpipe.config import ExamplesConfig, ModelConfig, TrainConfig
    from bertpipe.model import memory

    config = BertConfig.from_params(ModelConfig(preset=preset), vocab_size)
    cfg = TrainConfig(batch_size=batch_size, micro_batch_size="auto", precision=precision,
                      activation_checkpointing=activation_checkpointing)
    available = None if memory_gib is None else memory_gib * memory.GiB
    slots = ExamplesConfig(max_len=max_len, mask_prob=mask_prob).max_predictions
    plan = memory.fit_rows(config, cfg, batch_size, max_len, slots, torch.device(device), available)
    accumulation = -(-batch_size // plan.rows)
    click.echo(f"fits: micro-batches of {plan.rows}, {accumulation} accumulated per step; {plan.describe()}")


@main.command("ui")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True, help="On 127.0.0.1.")
@click.option("--experiment", help="The experiment to link (default: params.yaml's mlflow.experiment).")
@entry_point
def ui_command(port: int, experiment: str | None) -> None:
    """Serve MLflow's UI on the project's store (mlflow.db at the repository root, or MLFLOW_TRACKING_URI)."""
    from bertpipe.tracking import ui

    raise SystemExit(ui.serve(port, experiment, click.echo))


@main.command("gc")
@click.option("--yes", "-y", "remove", is_flag=True, help="Remove what is listed as reclaimable (default: only list).")
@entry_point
def gc_command(remove: bool) -> None:
    """List the disk that stopped pretrain runs and deleted MLflow runs hold, with sizes and why; --yes removes it.

    Stopped runs' work folders that no params can resume, their lock files, and the LoggedModels of deleted runs
    (the rules: bertpipe/reclaim.py, and the README's "Reclaiming disk")."""
    from bertpipe import reclaim
    from bertpipe.repo import repo_root
    from bertpipe.tracking.store import tracking_uri

    found = reclaim.survey(repo_root(), tracking_uri())
    if remove:
        reclaim.remove(found, click.echo)
    else:
        reclaim.report(found, click.echo)
