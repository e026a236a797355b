"""Held-out evaluation: MLM and NSP loss and accuracy over the valid split, in eval mode."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bertpipe.config import TrainConfig
from bertpipe.training.batches import IGNORE_INDEX, Examples, micro_batches
from bertpipe.training.distributed import World

EVAL_BATCH = 512


def evaluation_due(step: int, cfg: TrainConfig) -> bool:
    """Every `train.eval_every` steps (0: never) and always at the last step, for the final metrics."""
    return bool(cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps


@torch.no_grad()
def evaluate(model: nn.Module, examples: Examples, limit: int, world: World) -> dict[str, float]:
    """Held-out MLM and NSP loss and accuracy of `model` (a Compute's module), in eval mode, over the
    first `limit` examples (0 = all)."""
    was_training = model.training
    model.eval()
    n = len(examples) if limit == 0 else min(limit, len(examples))
    mine = np.arange(world.rank, n)[::world.size]
    mine = mine[np.argsort(examples.lengths[mine], kind="stable")]
    totals = torch.zeros(6, dtype=torch.float64, device=world.device)
    for indices in micro_batches(mine, EVAL_BATCH):
        batch = examples.batch(indices).to(world.device)
        out = model(batch.input_ids, batch.token_type_ids, batch.valid_lens, batch.masked_positions)
        mlm_logits, nsp_logits = out.mlm_logits.float(), out.nsp_logits.float()
        totals += torch.stack([
            F.cross_entropy(mlm_logits, batch.mlm_labels, ignore_index=IGNORE_INDEX, reduction="sum"),
            (mlm_logits.argmax(-1) == batch.mlm_labels).sum(), (batch.mlm_labels != IGNORE_INDEX).sum(),
            F.cross_entropy(nsp_logits, batch.nsp_labels, reduction="sum"),
            (nsp_logits.argmax(-1) == batch.nsp_labels).sum(), torch.tensor(len(batch.nsp_labels)),
        ]).double()
    if world.distributed:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    mlm_loss, mlm_correct, preds, nsp_loss, nsp_correct, pairs = totals.tolist()
    return {"valid_mlm_loss": mlm_loss / max(preds, 1), "valid_mlm_acc": mlm_correct / max(preds, 1),
            "valid_nsp_loss": nsp_loss / max(pairs, 1), "valid_nsp_acc": nsp_correct / max(pairs, 1)}
