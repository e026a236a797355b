"""Data-stage benchmark: bertpipe's `prepare` + `build_examples` against the seed's `WikiTextDataset`.

For each k, the WikiText-2 validation split repeated k times stands in for wiki.train.tokens and
the test split for wiki.valid.tokens, in a temporary folder. Each run happens in a fresh child
process (this script with the hidden `--one` flag), which reports its wall seconds (imports
excluded) and its peak RSS (VmHWM, imports included), so runs never share memory. Ours builds
the train and valid examples with default params and seed 0, with d2l's word vocabulary (`ours`)
and with BERT's WordPiece (`wordpiece`: prepare.tokenizer wordpiece, vocab_size 30522, trained on
the train split; its target is <= 120 s and <= 1.5 GB at k = 100); the seed (bench/seed.py) reads,
shuffles and builds its train examples with max_len 64, and is skipped above k = 50, where it
runs out of memory. The issue's seed figures: 0.85 s / 398 MB at k=1, 7.7 s / 851 MB at k=10,
31 s / 2.9 GB at k=50; ours should reach k=50 in <= 3 s and <= 1 GB, linearly in k.

Usage: python bench/prep.py [--k 1 10 50] [--variants ours wordpiece seed] [--repeat 3] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEED_MAX_K = 50
DEFAULT_DATA = Path("/work/shared/data/wikitext-2")


def build_corpus(data: Path, folder: Path, k: int) -> float:
    """Write valid x k as wiki.train.tokens and test as wiki.valid.tokens; return the train MB."""
    text = (data / "wiki.valid.tokens").read_bytes()
    with open(folder / "wiki.train.tokens", "wb") as f:
        for _ in range(k):
            f.write(text)
    shutil.copyfile(data / "wiki.test.tokens", folder / "wiki.valid.tokens")
    return len(text) * k / 1e6


def run_ours(corpus: Path, out: Path, tokenizer: str = "word") -> dict:
    """prepare + build_examples with default params and `tokenizer`; returns the train split's statistics."""
    # Imported here, not at the top, so that each child's peak RSS holds only its own side's libraries.
    from bertpipe.config import ExamplesConfig, PrepareConfig
    from bertpipe.data.examples import build_examples
    from bertpipe.data.prepare import prepare

    start = time.perf_counter()
    stats = prepare(corpus, out / "prepared", PrepareConfig(tokenizer=tokenizer))
    metrics = build_examples(out / "prepared", out / "examples", ExamplesConfig(), seed=0)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "examples": metrics["train"]["examples"], "vocab_size": stats["vocab_size"],
            "mean_len": metrics["train"]["mean_valid_len"]}


def run_seed(corpus: Path) -> dict:
    """The seed's `_read_wiki` + `WikiTextDataset(paragraphs, max_len=64)`, seeded with 0."""
    import torch
    from seed import WikiTextDataset, _read_wiki, seed_everything

    seed_everything(0)
    start = time.perf_counter()
    dataset = WikiTextDataset(_read_wiki(corpus), max_len=64)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "examples": len(dataset), "vocab_size": len(dataset.vocab),
            "mean_len": torch.stack(dataset.valid_lens).mean().item()}


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure(which: str, corpus: Path) -> dict | None:
    """One run of `which` in a fresh interpreter; None if it failed (e.g. killed for memory)."""
    with tempfile.TemporaryDirectory(dir=corpus) as out:
        cmd = [sys.executable, __file__, "--one", which, "--corpus", str(corpus), "--out", out]
        child = subprocess.run(cmd, capture_output=True, text=True)
    if child.returncode != 0:
        print(f"{which} failed (exit {child.returncode}): {child.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(child.stdout.splitlines()[-1])


def median_run(which: str, corpus: Path, repeat: int) -> dict | None:
    """Median seconds and peak RSS over `repeat` runs (the data statistics are the same in each)."""
    runs = [measure(which, corpus) for _ in range(repeat)]
    if None in runs:
        return None
    result = dict(runs[0])
    for key in ("seconds", "rss_mb"):
        result[key] = statistics.median(run[key] for run in runs)
    return result


VARIANTS = ("ours", "wordpiece", "seed")


def benchmark(data: Path, ks: list[int], variants: list[str], repeat: int) -> list[dict]:
    rows = []
    for k in ks:
        with tempfile.TemporaryDirectory(prefix=f"bench-prep-k{k}-") as tmp:
            corpus = Path(tmp)
            row = {"k": k, "mb": build_corpus(data, corpus, k)}
            for which in VARIANTS:
                run = which in variants and (which != "seed" or k <= SEED_MAX_K)
                row[which] = median_run(which, corpus, repeat) if run else None
        rows.append(row)
        print(f"k={k} done", file=sys.stderr, flush=True)
    return rows


def _cell(run: dict | None, key: str, fmt: str, k: int) -> str:
    if run is None:
        return "skipped (OOM)" if k > SEED_MAX_K else "-"
    return format(run[key], fmt)


def print_tables(rows: list[dict]) -> None:
    """The data each side builds, then the timing table (last)."""
    print("| k | examples: ours / wordpiece / seed | vocab: ours / wordpiece / seed | mean len: ours / wordpiece "
          "/ seed |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        cells = [" / ".join(_cell(r[v], key, fmt, r["k"]) for v in VARIANTS)
                 for key, fmt in (("examples", "d"), ("vocab_size", "d"), ("mean_len", ".2f"))]
        print(f"| {r['k']} | " + " | ".join(cells) + " |")
    print()
    print("| k | corpus MB | ours s | ours peak RSS MB | wordpiece s | wordpiece peak RSS MB | seed s "
          "| seed peak RSS MB | ours vs seed | wordpiece vs ours | wordpiece s/k |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        k, ours, wordpiece, seed = r["k"], r["ours"], r["wordpiece"], r["seed"]
        speedup = f"{seed['seconds'] / ours['seconds']:.1f}x faster" if ours and seed else "-"
        cost = f"{wordpiece['seconds'] / ours['seconds']:.1f}x the time" if ours and wordpiece else "-"
        per_k = f"{wordpiece['seconds'] / k:.3f}" if wordpiece else "-"
        print(f"| {k} | {r['mb']:.1f} | " + " | ".join(
            f"{_cell(run, 'seconds', '.2f', k)} | {_cell(run, 'rss_mb', '.0f', k)}" for run in (ours, wordpiece, seed))
            + f" | {speedup} | {cost} | {per_k} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 10, 50], help="repetitions of the validation split")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with wiki.{valid,test}.tokens")
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = run_seed(args.corpus) if args.one == "seed" else run_ours(
            args.corpus, args.out, "wordpiece" if args.one == "wordpiece" else "word")
        print(json.dumps({**result, "rss_mb": peak_rss_mb()}))
        return
    print_tables(benchmark(args.data, args.k, args.variants, args.repeat))


if __name__ == "__main__":
    main()
