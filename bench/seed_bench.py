"""The seed's side of bench/train.py: d2l's model, batches and loss (bench/seed*.py), timed the same way.

bf16 runs through PyTorch's autocast, the standard way to run an fp32 model in bf16; every example is
padded to max_len and every prediction slot decoded, as the seed does.
"""

from __future__ import annotations

import contextlib

import numpy as np
import seed
import seed_model
import torch
import torch.nn.functional as F

from bertpipe.model.flops import training_flops
from bertpipe.training.batches import Examples, global_batch, micro_batches


def bench_seed(args, bert_config, train_set, valid_set, precision, world, variant, timed):
    """The seed trained for `args.warmup` + `args.steps` steps of the same global batches as ours; `timed`
    is bench/train.py's, so both sides are measured alike."""
    c = bert_config
    net = seed_model.BERTModel(c.vocab_size, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                         c.num_hidden_layers, c.hidden_dropout_prob).to(world.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    loss = torch.nn.CrossEntropyLoss()

    def step(i: int) -> tuple[int, int, float, int]:
        indices = np.sort(global_batch(i, train_set.epoch_ranges(), args.batch, args.seed))
        batch = padded(train_set, indices, world.device)
        with seed_autocast(world.device, precision):
            _, _, total = seed._get_batch_loss_bert(net, loss, c.vocab_size, *batch)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        lengths = train_set.lengths[indices].astype(np.int64)
        flops = training_flops(c, lengths, train_set.predictions(indices))
        return len(indices), int(lengths.sum()), flops, len(indices) * train_set.arrays["token_ids"].shape[1]

    result = timed(step, args, world.device)
    if valid_set is not None:
        result.valid_mlm_loss = seed_valid_loss(net, valid_set, args.eval_examples, precision, world.device)
    return result


def seed_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The seed in bf16: PyTorch's autocast, the standard way to run an fp32 model in bf16."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def padded(examples: Examples, indices: np.ndarray, device: torch.device) -> list[torch.Tensor]:
    """The seed's batch: every field at full width, float valid_lens and weights (d2l's _pad_bert_inputs)."""
    a = {name: torch.from_numpy(np.asarray(array[indices]).astype(np.int64)) for name, array in
         examples.arrays.items()}
    return [t.to(device) for t in (a["token_ids"], a["segments"], a["valid_lens"].float(), a["pred_positions"],
                                   a["mlm_weights"].float(), a["mlm_labels"], a["nsp_labels"])]


@torch.no_grad()
def seed_valid_loss(net, examples: Examples, limit: int, precision: str, device: torch.device) -> float:
    """Held-out MLM loss of the seed's model, averaged over real prediction slots, in eval mode."""
    net.eval()
    total, count = 0.0, 0
    for indices in micro_batches(np.arange(min(limit, len(examples))), 512):
        tokens, segments, valid_lens, positions, weights, labels, _ = padded(examples, indices, device)
        with seed_autocast(device, precision):
            _, mlm, _ = net(tokens, segments, valid_lens, positions)
        real = weights.bool()
        total += F.cross_entropy(mlm[real].float(), labels[real], reduction="sum").item()
        count += int(real.sum())
    return total / count
