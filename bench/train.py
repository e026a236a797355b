"""Training throughput: the seed's recipe against bertpipe's training path, side by side, in one run.

For each precision it trains the seed (bench/seed.py: d2l's BERTModel and loss, every example padded
to max_len, all prediction slots decoded, bf16 through autocast) and ours (bertpipe.step.train_step:
length-bucketed micro-batches in a few rounded shapes, MLM head on real predictions only, cheaper CPU
dropout, bf16 on a bf16 copy with fp32 master weights) on the same global batches,
then reports sentence pairs/s (as the seed counts them), real tokens/s, model-FLOPs utilisation
against the matmul peak measured in the same run, and the held-out MLM loss after the same number
of pairs. The last line compares each side at its fastest precision. Needs only torch and numpy (plus
the project's model and training modules).

    python bench/train.py --examples data/examples                 # the pipeline's examples
    python bench/train.py --synthetic --preset large --max-len 128 --batch 256 --device cuda
    torchrun --nproc-per-node 2 bench/train.py --examples data/examples --variants ours

Under torchrun only `ours` runs (DDP, the global batch split over ranks); every rank's throughput
and the total are printed, so scaling efficiency = total / (ranks x one-process run).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import seed

from bertpipe.batches import Examples, examples_meta, global_batch, micro_batches
from bertpipe.config import ModelConfig, TrainConfig
from bertpipe.distributed import World, close_world, init_world
from bertpipe.evaluate import evaluate
from bertpipe.flops import matmul_peak, training_flops
from bertpipe.model import BertConfig, BertForPreTraining
from bertpipe.optim import build_optimizer
from bertpipe.precision import Compute
from bertpipe.resolve import resolve_precision
from bertpipe.step import plan_step, train_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    world = init_world(device)
    if world.device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    train_set, valid_set, vocab_size = load_data(args)
    bert_config = BertConfig.from_params(_model_params(args), vocab_size)
    rows, speeds = [], {}
    for precision in args.precision:
        if not native(precision, world.device) and not args.force:
            note = "skipped: no native bf16 here (emulated, ~100x slower); --force runs it"
            rows += [[variant, precision, "n/a", "n/a", "n/a", "n/a", note] for variant in args.variants]
            continue
        peak = matmul_peak(world.device, DTYPES[precision])
        results = {}
        for variant in args.variants if not world.distributed else ["ours"]:
            run = bench_seed if variant == "seed" else bench_ours
            results[variant] = run(args, bert_config, train_set, valid_set, precision, world)
        rows += report_rows(results, peak, precision, world)
        speeds.update({(variant, precision): r.pairs / r.seconds for variant, r in results.items()})
    if world.is_main:
        print_table(rows, args, bert_config, world)
        print(best_against_best(speeds))
    close_world(world)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--examples", type=Path, help="the examples stage's folder (train/ and valid/)")
    source.add_argument("--synthetic", action="store_true", help="random full-length examples")
    p.add_argument("--preset", default="tiny", choices=("tiny", "base", "large"))
    p.add_argument("--layers", type=int, help="override the preset's number of layers")
    p.add_argument("--max-len", type=int, default=64, help="synthetic examples only")
    p.add_argument("--vocab", type=int, default=30522, help="synthetic examples only")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--buckets", type=int, default=4, help="ours: length buckets per rank's share")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=tuple(DTYPES))
    p.add_argument("--variants", nargs="+", default=["seed", "ours"], choices=("seed", "ours"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--eval-examples", type=int, default=2048)
    p.add_argument("--force", action="store_true", help="run bf16 even where it is emulated")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def load_data(args: argparse.Namespace) -> tuple[Examples, Examples | None, int]:
    if args.examples:
        meta = examples_meta(args.examples)
        return Examples.load(args.examples / "train"), Examples.load(args.examples / "valid"), meta["vocab_size"]
    return synthetic_examples(args.batch * 4, args.max_len, args.vocab), None, args.vocab


def synthetic_examples(rows: int, max_len: int, vocab: int, mask_prob: float = 0.15) -> Examples:
    """Full-length `<cls> a <sep> b <sep>` rows of random words, 15% of them predicted (throughput only)."""
    rng = np.random.default_rng(0)
    k = round(max_len * mask_prob)
    ids = rng.integers(5, vocab, (rows, max_len))
    a_len = rng.integers(1, max_len - 3, rows)
    ids[:, 0], ids[np.arange(rows), a_len + 1], ids[:, -1] = 3, 4, 4
    segments = (np.arange(max_len) >= a_len[:, None] + 2).astype(np.uint8)
    positions = np.sort(rng.permuted(np.tile(np.arange(1, max_len - 1), (rows, 1)), axis=1)[:, :k], axis=1)
    arrays = {"token_ids": ids, "segments": segments, "valid_lens": np.full(rows, max_len),
              "pred_positions": positions, "mlm_weights": np.ones((rows, k), np.uint8),
              "mlm_labels": np.take_along_axis(ids, positions, 1), "nsp_labels": rng.integers(0, 2, rows)}
    return Examples(arrays)


def native(precision: str, device: torch.device) -> bool:
    """fp32 always; bf16 where the pipeline's `train.precision: auto` would pick it."""
    return precision == "fp32" or resolve_precision("auto", device) == "bf16"


@dataclasses.dataclass
class Result:
    seconds: float
    pairs: int
    tokens: int
    flops: float
    valid_mlm_loss: float | None


def bench_ours(args, bert_config, train_set, valid_set, precision, world) -> Result:
    cfg = TrainConfig(batch_size=args.batch, precision=precision, lr=0.01)
    model = BertForPreTraining(bert_config).to(world.device)
    optimizer = build_optimizer(model, cfg)
    compute = Compute.build(model, precision, world)
    share = -(-args.batch // world.size)
    micro = -(-share // args.buckets)

    def step(i: int) -> tuple[int, int, float]:
        plan = plan_step(i, train_set, cfg, args.seed, world, micro)
        train_step(compute, optimizer, train_set, plan, cfg, world)
        mine = np.concatenate(plan.shares)  # this rank's part: the ranks' counts add up to the global batch
        lengths = train_set.lengths[mine].astype(np.int64)
        return len(mine), int(lengths.sum()), training_flops(bert_config, lengths, train_set.predictions(mine))

    result = timed(step, args, world.device)
    if valid_set is not None:
        result.valid_mlm_loss = evaluate(compute.module, valid_set, args.eval_examples, world)["valid_mlm_loss"]
    return result


def bench_seed(args, bert_config, train_set, valid_set, precision, world) -> Result:
    c = bert_config
    net = seed.BERTModel(c.vocab_size, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                         c.num_hidden_layers, c.hidden_dropout_prob).to(world.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
    loss = torch.nn.CrossEntropyLoss()

    def step(i: int) -> tuple[int, int, float]:
        indices = np.sort(global_batch(i, train_set.epoch_ranges(), args.batch, args.seed))
        batch = padded(train_set, indices, world.device)
        with seed_autocast(world.device, precision):
            _, _, total = seed._get_batch_loss_bert(net, loss, c.vocab_size, *batch)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        lengths = train_set.lengths[indices].astype(np.int64)
        return len(indices), int(lengths.sum()), training_flops(c, lengths, train_set.predictions(indices))

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


def timed(step, args: argparse.Namespace, device: torch.device) -> Result:
    for i in range(args.warmup):
        step(i)
    sync(device)
    start = time.perf_counter()
    pairs = tokens = flops = 0
    for i in range(args.warmup, args.warmup + args.steps):
        p, t, f = step(i)
        pairs, tokens, flops = pairs + p, tokens + t, flops + f
    sync(device)
    return Result(time.perf_counter() - start, pairs, tokens, flops, None)


def report_rows(results: dict[str, Result], peak: float, precision: str, world: World) -> list[list]:
    rows = []
    for variant, r in results.items():
        totals = torch.tensor([r.pairs, r.tokens, r.flops, r.seconds], dtype=torch.float64)
        per_rank = totals.clone()
        if world.distributed:
            torch.distributed.all_reduce(totals)
            totals[3] = per_rank[3]  # wall time is shared; pairs, tokens and FLOPs add up
        pairs, tokens, flops, seconds = totals.tolist()
        baseline = results.get("seed")
        speedup = f"{(pairs / seconds) / (baseline.pairs / baseline.seconds):.2f}x" if baseline else "-"
        loss = f"{r.valid_mlm_loss:.3f}" if r.valid_mlm_loss is not None else "n/a"
        rows.append([variant, precision, f"{pairs / seconds:,.0f}", f"{tokens / seconds:,.0f}",
                     f"{flops / seconds / (peak * world.size):.1%}", loss, speedup])
        if world.distributed:
            print(f"rank {world.rank}: {per_rank[0] / per_rank[3]:,.0f} pairs/s, "
                  f"{per_rank[1] / per_rank[3]:,.0f} tokens/s\n", end="", flush=True)
    peak_row = ["matmul peak", precision, f"{peak / 1e9:,.1f} GFLOP/s", "", "", "", ""]
    return [peak_row, *rows]


def best_against_best(speeds: dict[tuple[str, str], float]) -> str:
    """The last line: each side at its fastest precision, and the ratio."""
    best = {}
    for (variant, precision), speed in speeds.items():
        if speed > best.get(variant, ("", 0.0))[1]:
            best[variant] = (precision, speed)
    if set(best) != {"seed", "ours"}:
        return "best against best: n/a (needs both variants)"
    (ours_precision, ours), (seed_precision, seed_speed) = best["ours"], best["seed"]
    return (f"best against best: ours {ours_precision} {ours:,.0f} pairs/s / seed {seed_precision} "
            f"{seed_speed:,.0f} pairs/s = {ours / seed_speed:.2f}x")


def print_table(rows: list[list], args: argparse.Namespace, config: BertConfig, world: World) -> None:
    data = f"examples {args.examples}" if args.examples else f"synthetic, max_len {args.max_len}"
    print(f"\n{args.preset} ({config.num_hidden_layers} layers, hidden {config.hidden_size}), vocab "
          f"{config.vocab_size}, batch {args.batch}, {args.steps} timed steps, {data}, {world.size} x "
          f"{world.device.type}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    header = ["variant", "precision", "pairs/s", "tokens/s", "MFU", "held-out MLM loss", "vs seed"]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")


def _model_params(args: argparse.Namespace) -> ModelConfig:
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    return ModelConfig(preset=args.preset, max_position_embeddings=max(512, args.max_len), **overrides)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
