"""Parts 3 and 5 of bench/gpu_check.sh: throughput, MFU and the GPU levers, and the memory planner's estimates.

Every row comes from bench/train.py runs (`bench` in gpu_calls.py): ours at each size against the seed
and against each lever switched off (or, for torch.compile, on), half-padded rows with and without
length buckets, and each size's peak CUDA memory against the planner's estimate.
"""

from __future__ import annotations

from gpu_calls import LEVERS, LIMITS, SIZES, Check, bench, status_of

GOAL_MFU = 0.5


def part_bench(c: Check) -> None:
    runs = {}
    for i, (preset, max_len, batch) in enumerate(SIZES[c.device]):
        variants = ["seed", "ours", *LEVERS] if i == 0 else ["ours", *LEVERS]
        limit = LIMITS[c.device]["first" if i == 0 else "bench"]
        name = f"{preset}-{max_len}"
        data, seconds, code = bench(c, name, preset, max_len, batch, variants, limit)
        runs[name] = data
        if data is None:
            c.add("3 throughput", name, "no result (see bench.log)", seconds, status_of(code))
            continue
        rows = {r["variant"]: r for r in data["rows"]}
        ours = rows["ours"]
        seed = f"; {rows['ours']['vs_seed']:.2f}x the seed" if "seed" in rows else ""
        c.add("3 throughput", f"{name} ours {ours['precision']}, batch {batch}",
              f"{ours['pairs_per_sec']:,.0f} pairs/s, {ours['tokens_per_sec']:,.0f} tokens/s, MFU {ours['mfu']:.1%} of "
              f"{rate(ours['peak_flops'])} measured{seed}", seconds, "ok")
    lever_rows(c, runs)
    padding_lever(c)
    goal_row(c, runs)
    memory_rows(c, runs)


def rate(flops: float) -> str:
    return f"{flops / 1e12:,.0f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:,.0f} GFLOP/s"


def lever_rows(c: Check, runs: dict) -> None:
    done = {name: {r["variant"]: r for r in data["rows"]} for name, data in runs.items() if data}
    for variant, lever in LEVERS.items():
        ratios = {name: 1 / rows[variant]["vs_ours"] for name, rows in done.items() if variant in rows}
        text = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items()) or "no result"
        helps = ratios and min(ratios.values()) >= 0.98
        status = ("kept: default on CUDA" if helps else "CHECK: slower somewhere") if c.device == "cuda" else \
            "CUDA only (cpu: the same path)"
        c.add("3 lever", f"{lever}: ours / without it", text, None, status if ratios else "n/a")


def part_compile(c: Check) -> None:
    """torch.compile at the first size, in a run of its own (run last: compiling may take minutes, and a
    timeout here loses no other row), against the eager ours of part 3 at the same size."""
    preset, max_len, batch = SIZES[c.device][0]
    name = f"{preset}-{max_len}"
    check = f"torch.compile (static shapes): compiled / ours, {name}"
    data, seconds, code = bench(c, f"{name}-compile", preset, max_len, batch, ["compile"], LIMITS[c.device]["compile"])
    eager = c.results.get("bench", {}).get(name)
    if data is None or eager is None:
        c.add("3 lever", check, "no result (see bench.log)" if data is None else "no eager run", seconds,
              status_of(code) if data is None else "n/a")
        return
    compiled, ours = data["rows"][0], {r["variant"]: r for r in eager["rows"]}["ours"]
    ratio = compiled["pairs_per_sec"] / ours["pairs_per_sec"]
    c.add("3 lever", check, f"{ratio:.2f}x, MFU {compiled['mfu']:.1%}, warm-up {compiled['warmup_seconds']:.0f} s "
          f"(eager {ours['warmup_seconds']:.0f} s)", seconds,
          "helps: --variants compile; not a default" if ratio > 1.02 else "no gain: not kept")


def padding_lever(c: Check) -> None:
    """Half-padded rows at the last size: length buckets (each micro-batch trimmed to its longest row) vs none."""
    preset, max_len, batch = SIZES[c.device][-1]
    speeds = {}
    for buckets in (1, 4):
        data, seconds, code = bench(c, f"{preset}-{max_len}-fill50-buckets{buckets}", preset, max_len, batch, ["ours"],
                                    LIMITS[c.device]["bench"], ["--fill", "0.5", "--buckets", str(buckets)])
        if data is None:
            c.add("3 lever", f"length buckets, {preset}-{max_len} half padding", f"buckets {buckets}: no result",
                  seconds, status_of(code))
            return
        speeds[buckets] = data["rows"][0]
    one, four = speeds[1], speeds[4]
    gain = four["tokens_per_sec"] / one["tokens_per_sec"]
    c.add("3 lever", f"length buckets (unpadding), {preset}-{max_len}, rows half padding",
          f"4 buckets {four['real_token_share']:.0%} real tokens, {gain:.2f}x the real tokens/s of 1 bucket "
          f"({one['real_token_share']:.0%} real); MFU {one['mfu']:.1%} -> {four['mfu']:.1%}",
          None, "kept (train.length_buckets: 4)" if gain >= 1 else "CHECK")


def goal_row(c: Check, runs: dict) -> None:
    mfu = {name: {r["variant"]: r for r in data["rows"]}["ours"]["mfu"] for name, data in runs.items()
           if data and name.endswith("-128")}
    if c.device == "cuda" and mfu:
        met = min(mfu.values()) >= GOAL_MFU
        c.add("3 goal", f"seq 128 MFU >= {GOAL_MFU:.0%} (one GPU)", ", ".join(f"{k} {v:.1%}" for k, v in mfu.items()),
              None, "met" if met else "not met")


def memory_rows(c: Check, runs: dict) -> None:
    for name, data in runs.items():
        ours = {r["variant"]: r for r in data["rows"]}["ours"] if data else None
        if ours is None or ours["peak_gib"] is None:
            c.add("5 memory", name, "n/a on the CPU (tests/model/test_memory.py measures it)" if c.device == "cpu" else
                  "no result", None, "n/a")
            continue
        ratio = ours["planned_gib"] / ours["peak_gib"]
        c.add("5 memory", f"{name}: planner vs torch.cuda.max_memory_allocated",
              f"planner {ours['planned_gib']:.2f} GiB, measured {ours['peak_gib']:.2f} GiB ({ratio:.2f}x)", None,
              "ok (not under)" if ratio >= 0.9 else "UNDER: auto could run out of memory")


