"""One fine-tuning run: a task's train split, one seed, from the export's weights or from a random start.

The model is transformers' `AutoModelForSequenceClassification` loaded from the Hugging Face folder the export
stage wrote (no bertpipe model code: the folder serves downstream as Google's checkpoints do), with a new
classifier on the pooled `[CLS]` vector; `random` builds the same shape from its config.json, newly
initialised, as the floor that shows what pretraining bought. The recipe is one for every task, in the
spirit of Cramming's single global recipe (Geiping & Goldstein 2023): AdamW (no decay on biases and LayerNorm
weights), a linear warm-up over `warmup_ratio` of the steps then a linear decay to 0 (transformers'
`get_linear_schedule_with_warmup`), gradients clipped to norm 1 (transformers' Trainer's default),
`epochs` passes in a seeded random order grouped by length (transformers' `group_by_length`: batches of
similar lengths drawn from shuffled groups of 50 batches, so little of a batch is padding). After each epoch every
dev split is scored; the last epoch's scores are the run's (choosing the best epoch on dev would flatter it).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bertpipe.config import DownstreamConfig
from bertpipe.downstream.metrics import score
from bertpipe.downstream.tasks import TaskData
from bertpipe.errors import PipelineError

MAX_GRAD_NORM = 1.0
EVAL_BATCH = 128
INITS = ("pretrained", "random")


class DownstreamError(PipelineError):
    """An export or a task that cannot be fine-tuned, said in one line."""


@dataclass(frozen=True)
class Encoded:
    """A task tokenized once for all its runs: token ids per split, and labels."""

    ids: dict[str, list[np.ndarray]]  # split -> one int64 array of token ids per example ([CLS] ... [SEP])
    segments: dict[str, list[np.ndarray]]  # split -> token type ids, the same shapes
    labels: dict[str, np.ndarray]  # split -> [N] class ids (int64) or scores (float32)
    unk_fraction: float  # of the train split's tokens, [CLS] and [SEP] left out
    truncated: float  # share of train examples cut to max_len


def encode(tokenizer: Any, task: TaskData, max_len: int) -> Encoded:
    """Every split of `task` through the export's tokenizer, pairs cut longest first to `max_len` tokens."""
    ids, segments, labels = {}, {}, {}
    truncated = 0.0
    for split in task.rows:
        frame = task.read(split)
        pairs = frame["text_pair"].tolist() if task.pair else None
        full = tokenizer(frame["text"].tolist(), pairs, truncation=True, max_length=max_len,
                         return_overflowing_tokens=False, return_length=True)
        ids[split] = [np.asarray(x, dtype=np.int64) for x in full["input_ids"]]
        segments[split] = [np.asarray(x, dtype=np.int64) for x in full["token_type_ids"]]
        labels[split] = frame["label"].to_numpy()
        if split == "train":
            truncated = float(np.mean([n >= max_len for n in full["length"]]))
    train = np.concatenate(ids["train"])
    text = train[~np.isin(train, sorted(set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}))]
    unk = float(np.mean(text == tokenizer.unk_token_id)) if len(text) else 0.0
    return Encoded(ids, segments, labels, unk, truncated)


def load_classifier(model_dir: Path, task: TaskData, init: str) -> torch.nn.Module:
    """The export with a new `num_labels` head (pretrained), or the same shape newly initialised (random). A
    masked-LM export has no pooler either, and starts it from its init, as RoBERTa-style checkpoints do."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    labels = task.labels or ("score",)
    config = AutoConfig.from_pretrained(model_dir, num_labels=task.num_labels,
                                        problem_type="regression" if task.labels is None
                                        else "single_label_classification",
                                        id2label=dict(enumerate(labels)),
                                        label2id={name: i for i, name in enumerate(labels)})
    if init == "random":
        return AutoModelForSequenceClassification.from_config(config)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it lists the unused pretraining heads and the new classifier
    hf_logging.disable_progress_bar()  # a bar per load, for weights that load in milliseconds
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(model_dir, config=config,
                                                                         output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    # the classifier is new; so is the pooler of a checkpoint without one (a BertForMaskedLM: train.objective mlm)
    new = {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    missing = sorted(set(info["missing_keys"]) - new)
    if missing:
        raise DownstreamError(f"{model_dir} lacks weights a BERT classifier takes from it ({', '.join(missing[:3])}); "
                              "rerun the stage that writes it (export for models/bert, init for models/init)")
    return model


@dataclass
class Outcome:
    """What one run gives: the last epoch's dev scores, every epoch's, and its cost."""

    scores: dict[str, float]
    epochs: list[dict[str, float]]  # epoch, train_loss, lr, and the dev scores after it
    seconds: float
    examples_per_sec: float  # training examples per second, evaluation left out


def finetune(model_dir: Path, task: TaskData, data: Encoded, cfg: DownstreamConfig, seed: int, init: str,
             device: torch.device, precision: str, pad_id: int,
             on_step: Callable[[float], None] = lambda loss: None) -> Outcome:
    """Fine-tune one classifier on `task`'s train split and score its dev splits after each epoch.

    Args:
        model_dir: the export's Hugging Face folder.
        task, data: the task and its token ids (`encode`).
        cfg: params.downstream, the recipe.
        seed: seeds the classifier's (or, random, every) initial weights, the example order and dropout.
        init: `pretrained` (the export's weights) or `random` (the same shape, newly initialised).
        device, precision: where and how (`fp32`, or `bf16` autocast) to compute.
        pad_id: the tokenizer's padding id.
        on_step: called with each step's training loss (progress).
    """
    _seed_everything(seed)
    model = load_classifier(model_dir, task, init).to(device)
    optimizer = _adamw(model, cfg, device)
    steps_per_epoch = math.ceil(len(data.ids["train"]) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    from transformers import get_linear_schedule_with_warmup
    from transformers.trainer_pt_utils import get_length_grouped_indices

    schedule = get_linear_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total), total)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    generator = torch.Generator().manual_seed(seed)
    lengths = [len(x) for x in data.ids["train"]]
    epochs, train_seconds, started = [], 0.0, time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        losses, tic = [], time.perf_counter()
        order = get_length_grouped_indices(lengths, cfg.batch_size, generator=generator)
        for start in range(0, len(order), cfg.batch_size):
            batch = _batch(data, "train", order[start:start + cfg.batch_size], pad_id, device)
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            on_step(losses[-1])
        train_seconds += time.perf_counter() - tic
        scores = evaluate(model, task, data, device, autocast, pad_id)
        epochs.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": schedule.get_last_lr()[0], **scores})
    return Outcome(scores, epochs, time.perf_counter() - started,
                   len(data.ids["train"]) * cfg.epochs / max(train_seconds, 1e-9))


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: TaskData, data: Encoded, device: torch.device, autocast: Any,
             pad_id: int) -> dict[str, float]:
    """Every dev split scored with the task's metrics (x100); batches of similar length, in eval mode."""
    model.eval()
    out: dict[str, float] = {}
    for split in task.scored:
        by_length = np.argsort([len(x) for x in data.ids[split]], kind="stable")
        predictions = np.empty(len(by_length), dtype=np.float32 if task.labels is None else np.int64)
        for start in range(0, len(by_length), EVAL_BATCH):
            rows = by_length[start:start + EVAL_BATCH].tolist()
            with autocast:
                logits = model(**_batch(data, split, rows, pad_id, device, labels=False)).logits.float()
            predictions[rows] = (logits[:, 0] if task.labels is None else logits.argmax(-1)).cpu().numpy()
        out |= score(task.metrics, split, data.labels[split], predictions)
    return out


def _batch(data: Encoded, split: str, rows: Sequence[int], pad_id: int, device: torch.device,
           labels: bool = True) -> dict[str, torch.Tensor]:
    """Rows padded to the longest of them: input_ids, token_type_ids, attention_mask [B, T], labels [B]."""
    width = max(len(data.ids[split][r]) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    segments = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        n = len(data.ids[split][r])
        ids[i, :n], segments[i, :n], mask[i, :n] = data.ids[split][r], data.segments[split][r], 1
    batch = {"input_ids": ids, "token_type_ids": segments, "attention_mask": mask}
    if labels:
        batch["labels"] = data.labels[split][list(rows)]
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}


def _adamw(model: torch.nn.Module, cfg: DownstreamConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW without decay on biases and LayerNorm weights; fused (one kernel for all tensors: 15x faster
    than the default on a 2-core CPU for BERT-tiny's word embeddings)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices: biases and LayerNorm weights are vectors
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, fused=device.type in ("cpu", "cuda"))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batches_per_run(examples: int, cfg: DownstreamConfig) -> int:
    """Optimizer steps of one run, for progress bars."""
    return math.ceil(examples / cfg.batch_size) * cfg.epochs


def runs_of(task: TaskData, cfg: DownstreamConfig) -> Iterator[tuple[str, int]]:
    """(init, seed) of every run of `task`: each seed from both starts, or seeds[0] alone on a large task."""
    large = cfg.single_seed_above and task.rows["train"] > cfg.single_seed_above
    for init in INITS:
        for seed in cfg.seeds[:1] if large else cfg.seeds:
            yield init, seed
