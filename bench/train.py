"""Training throughput: the seed's recipe against bertpipe's training path, side by side, in one run.

For each precision it trains the seed (bench/seed.py: d2l's BERTModel and loss, every example padded
to max_len, all prediction slots decoded, bf16 through autocast) and ours (bertpipe.training.loop.train_step:
length-bucketed micro-batches in a few rounded shapes, MLM head on real predictions only, cheaper CPU
dropout, bf16 on a bf16 copy with fp32 master weights; on CUDA no key mask for micro-batches without
padding and fused Adam) on the same global batches, then reports sentence pairs/s (as the seed counts
them), real tokens/s, model-FLOPs utilisation against the matmul peak measured in the same run, the
share of computed tokens that are real, the held-out MLM loss after the same number of pairs, and on
CUDA the peak allocated memory beside the memory planner's estimate. Further variants switch one GPU
lever of ours off or on, and `vs ours` is their speed over ours. Needs only torch and numpy (plus the
project's model and training modules).

    python bench/train.py --examples data/examples                 # the pipeline's examples
    python bench/train.py --synthetic --preset large --max-len 128 --batch 256 --device cuda
    python bench/train.py --synthetic --preset base --max-len 128 --variants ours masked foreach compile
    torchrun --nproc-per-node 2 bench/train.py --examples data/examples --variants ours

Under torchrun only ours and its levers run (DDP, the global batch split over ranks); every rank's
throughput and the total are printed, so scaling efficiency = total / (ranks x one-process run).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_bench import bench_seed
from synthetic import synthetic_examples

from bertpipe.config import ModelConfig, TrainConfig
from bertpipe.data.examples_folder import read_meta as examples_meta
from bertpipe.devices import resolve_precision
from bertpipe.model import memory
from bertpipe.model.bert import BertConfig, BertForPreTraining
from bertpipe.model.flops import matmul_peak, training_flops
from bertpipe.training.batches import WIDTH_MULTIPLE, Examples
from bertpipe.training.distributed import World, close_world, init_world, unwrap
from bertpipe.training.loop import evaluate, plan_step, train_step
from bertpipe.training.optim import build_optimizer
from bertpipe.training.precision import Compute

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = {  # each lever variant is ours with one switch flipped
    "seed": "d2l's recipe (bench/seed.py)",
    "ours": "bertpipe.training.loop.train_step as the pipeline runs it",
    "masked": "ours with the key mask on every micro-batch (no flash kernel)",
    "foreach": "ours with the multi-tensor Adam instead of the fused kernel",
    "compile": "ours with torch.compile (inductor, static shapes) on the compute module",
}


@dataclasses.dataclass
class Result:
    seconds: float
    pairs: int
    tokens: int
    flops: float
    computed_tokens: int  # rows x width of the micro-batches, padding included
    warmup_seconds: float
    valid_mlm_loss: float | None = None
    peak_bytes: float | None = None  # torch.cuda.max_memory_allocated over the variant
    planned_bytes: float | None = None  # the planner's estimate for the same micro-batch, less its runtime allowance


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    world = init_world(torch.device(args.device))
    if world.device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    train_set, valid_set, vocab_size = load_data(args)
    bert_config = BertConfig.from_params(_model_params(args), vocab_size)
    rows, records = [], []
    for precision in args.precision:
        if not native(precision, world.device) and not args.force:
            note = "skipped: no native bf16 here (emulated, ~100x slower); --force runs it"
            rows += [[variant, precision, *["n/a"] * 8, note] for variant in args.variants]
            continue
        peak = matmul_peak(world.device, DTYPES[precision])
        results = {}
        for variant in args.variants:
            if world.distributed and variant == "seed":
                continue
            reset_peak_memory(world.device)
            run = bench_seed if variant == "seed" else bench_ours
            results[variant] = run(args, bert_config, train_set, valid_set, precision, world, variant, timed)
        table, recs = report(results, peak, precision, world)
        rows += table
        records += recs
    if world.is_main:
        print_table(rows, args, bert_config, world)
        print(best_against_best({(r["variant"], r["precision"]): r["pairs_per_sec"] for r in records}))
        if args.json:
            header = {"preset": args.preset, "max_len": train_set.arrays["token_ids"].shape[1], "batch": args.batch,
                      "steps": args.steps, "world_size": world.size, "device": str(world.device),
                      "device_name": torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else "cpu",
                      "torch": torch.__version__}
            args.json.write_text(json.dumps({**header, "rows": records}, indent=1))
    close_world(world)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--examples", type=Path, help="the examples stage's folder (train/ and valid/)")
    source.add_argument("--synthetic", action="store_true", help="random examples (see --fill)")
    p.add_argument("--preset", default="tiny", choices=("tiny", "base", "large"))
    p.add_argument("--layers", type=int, help="override the preset's number of layers")
    p.add_argument("--max-len", type=int, default=64, help="synthetic examples only")
    p.add_argument("--fill", type=float, default=1.0, help="synthetic: share of real tokens (1: no padding)")
    p.add_argument("--vocab", type=int, default=30522, help="synthetic examples only")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup untimed ones)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--buckets", type=int, default=4, help="ours: length buckets per rank's share")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=tuple(DTYPES))
    p.add_argument("--variants", nargs="+", default=["seed", "ours"], choices=tuple(VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--eval-examples", type=int, default=2048)
    p.add_argument("--force", action="store_true", help="run bf16 even where it is emulated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file (rank 0)")
    return p.parse_args()


def load_data(args: argparse.Namespace) -> tuple[Examples, Examples | None, int]:
    if args.examples:
        meta = examples_meta(args.examples)
        return Examples.load(args.examples / "train"), Examples.load(args.examples / "valid"), meta["vocab_size"]
    return synthetic_examples(args.batch * 4, args.max_len, args.vocab, fill=args.fill), None, args.vocab


def native(precision: str, device: torch.device) -> bool:
    """fp32 always; bf16 where the pipeline's `train.precision: auto` would pick it."""
    return precision == "fp32" or resolve_precision("auto", device) == "bf16"


def bench_ours(args, bert_config, train_set, valid_set, precision, world, variant: str, timed) -> Result:
    cfg = TrainConfig(batch_size=args.batch, precision=precision, lr=0.01)
    model = BertForPreTraining(bert_config).to(world.device)
    optimizer = build_optimizer(model, cfg, fused=False if variant == "foreach" else None)
    compute = Compute.build(model, precision, world)
    if variant == "compile":
        unwrap(compute.module).compile(dynamic=False)  # in place: Compute's weight copies still see the same module
    unmask_full = False if variant == "masked" else None
    share = -(-args.batch // world.size)
    micro = -(-share // args.buckets)

    def step(i: int) -> tuple[int, int, float, int]:
        plan = plan_step(i, train_set, cfg, args.seed, world, micro)
        train_step(compute, optimizer, train_set, plan, cfg, world, unmask_full=unmask_full)
        mine = np.concatenate(plan.micro_batches)  # this rank's part: the ranks' counts add up to the global batch
        lengths = train_set.lengths[mine].astype(np.int64)
        flops = training_flops(bert_config, lengths, train_set.predictions(mine))
        return len(mine), int(lengths.sum()), flops, sum(computed_tokens(train_set, s) for s in plan.micro_batches)

    result = timed(step, args, world.device)
    if valid_set is not None:
        result.valid_mlm_loss = evaluate(compute.module, valid_set, args.eval_examples, world)["valid_mlm_loss"]
    planned = memory.plan(bert_config, cfg, micro, train_set.arrays["token_ids"].shape[1],
                          train_set.arrays["pred_positions"].shape[1], world.device, available=0.0)
    result.planned_bytes = planned.total - planned.runtime
    result.peak_bytes = peak_memory(world.device)
    return result


def computed_tokens(examples: Examples, indices: np.ndarray) -> int:
    """Rows x width of the micro-batch `Examples.batch` builds for `indices` (its rounded longest row)."""
    longest = int(examples.lengths[indices].max())
    width = min(examples.arrays["token_ids"].shape[1], -(-longest // WIDTH_MULTIPLE) * WIDTH_MULTIPLE)
    return len(indices) * width


def timed(step, args: argparse.Namespace, device: torch.device) -> Result:
    start = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    sync(device)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    pairs = tokens = flops = computed = 0
    for i in range(args.warmup, args.warmup + args.steps):
        p, t, f, c = step(i)
        pairs, tokens, flops, computed = pairs + p, tokens + t, flops + f, computed + c
    sync(device)
    return Result(time.perf_counter() - start, pairs, tokens, flops, computed, warmup)


def report(results: dict[str, Result], peak: float, precision: str, world: World) -> tuple[list[list], list[dict]]:
    """Table rows and JSON records; under DDP pairs, tokens and FLOPs add up over ranks, wall time is shared."""
    rows, records = [], []
    speeds = {}
    for variant, r in results.items():
        totals = torch.tensor([r.pairs, r.tokens, r.flops, r.computed_tokens, r.seconds], dtype=torch.float64)
        per_rank = totals.clone()
        if world.distributed:
            torch.distributed.all_reduce(totals)
            totals[4] = per_rank[4]
            print(f"rank {world.rank}: {per_rank[0] / per_rank[4]:,.0f} pairs/s, "
                  f"{per_rank[1] / per_rank[4]:,.0f} tokens/s\n", end="", flush=True)
        pairs, tokens, flops, computed, seconds = totals.tolist()
        speeds[variant] = pairs / seconds
        records.append({"variant": variant, "precision": precision, "pairs_per_sec": pairs / seconds,
                        "tokens_per_sec": tokens / seconds, "mfu": flops / seconds / (peak * world.size),
                        "peak_flops": peak, "real_token_share": tokens / computed, "seconds": seconds,
                        "warmup_seconds": r.warmup_seconds, "valid_mlm_loss": r.valid_mlm_loss,
                        "peak_gib": _gib(r.peak_bytes), "planned_gib": _gib(r.planned_bytes)})
    for rec in records:
        rec["vs_seed"] = rec["pairs_per_sec"] / speeds["seed"] if "seed" in speeds else None
        rec["vs_ours"] = rec["pairs_per_sec"] / speeds["ours"] if "ours" in speeds else None
        rows.append([rec["variant"], precision, f"{rec['pairs_per_sec']:,.0f}", f"{rec['tokens_per_sec']:,.0f}",
                     f"{rec['mfu']:.1%}", f"{rec['real_token_share']:.0%}", _fmt(rec["valid_mlm_loss"], "{:.3f}"),
                     _fmt(rec["vs_seed"], "{:.2f}x"), _fmt(rec["vs_ours"], "{:.2f}x"),
                     _fmt(rec["peak_gib"], "{:.2f}"), _fmt(rec["planned_gib"], "{:.2f}"), ""])
    peak_row = ["matmul peak", precision, f"{peak / 1e9:,.1f} GFLOP/s", *[""] * 9]
    return [peak_row, *rows], records


def best_against_best(speeds: dict[tuple[str, str], float]) -> str:
    """The last line: seed and ours each at its fastest precision, and the ratio."""
    best = {}
    for (variant, precision), speed in speeds.items():
        if speed > best.get(variant, ("", 0.0))[1]:
            best[variant] = (precision, speed)
    if not {"seed", "ours"} <= set(best):
        return "best against best: n/a (needs both variants)"
    (ours_precision, ours), (seed_precision, seed_speed) = best["ours"], best["seed"]
    return (f"best against best: ours {ours_precision} {ours:,.0f} pairs/s / seed {seed_precision} "
            f"{seed_speed:,.0f} pairs/s = {ours / seed_speed:.2f}x")


def print_table(rows: list[list], args: argparse.Namespace, config: BertConfig, world: World) -> None:
    data = f"examples {args.examples}" if args.examples else f"synthetic, max_len {args.max_len}, fill {args.fill}"
    print(f"\n{args.preset} ({config.num_hidden_layers} layers, hidden {config.hidden_size}), vocab "
          f"{config.vocab_size}, batch {args.batch}, {args.buckets} buckets, {args.steps} timed steps, {data}, "
          f"{world.size} x {world.device.type}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    header = ["variant", "precision", "pairs/s", "tokens/s", "MFU", "real tokens", "held-out MLM loss", "vs seed",
              "vs ours", "peak GiB", "planner GiB", "note"]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")


def _model_params(args: argparse.Namespace) -> ModelConfig:
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    return ModelConfig(preset=args.preset, max_position_embeddings=max(512, args.max_len), **overrides)


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def _gib(value: float | None) -> float | None:
    return None if value is None else value / memory.GiB


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> float | None:
    return float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
