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

Two more cases run your own text through the download stage's ingest of a folder and `prepare`
(`prepare.sentences: sentencex`, word tokenizer), the same text in two shapes, and report the ratio:

- `long-line`: WikiText-2's validation and test articles as ordinary English (detokenized: quotes and
  punctuation attached, `<unk>` a plain word), repeated to `--mb` MB, as `train.txt` holding one line
  against the same text as paragraphs (one per line, a blank line between articles); goal <= 2x
  (`bertpipe.data.lines` cuts a line longer than 32 KiB; before, 2 MB on one line took 30-40 s).
- `shards`: `--shards-mb` MB of those articles as JSON lines, in `train/` as 8 gzipped shards
  `train-0000N-of-00008.jsonl.gz` against one uncompressed `train.jsonl`.

Usage: python bench/prep.py [--cases wikitext long-line shards] [--k 1 10 50] [--variants ours wordpiece seed]
       [--mb 10 100] [--shards-mb 110] [--repeat 3] [--data DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
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


def measure(which: str, corpus: Path, workdir: Path | None = None) -> dict | None:
    """One run of `which` in a fresh interpreter, writing in `workdir` (default: `corpus`); None if it
    failed (e.g. killed for memory)."""
    with tempfile.TemporaryDirectory(dir=workdir or corpus) as out:
        cmd = [sys.executable, __file__, "--one", which, "--corpus", str(corpus), "--out", out]
        child = subprocess.run(cmd, capture_output=True, text=True)
    if child.returncode != 0:
        print(f"{which} failed (exit {child.returncode}): {child.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(child.stdout.splitlines()[-1])


def median_run(which: str, corpus: Path, repeat: int, workdir: Path | None = None) -> dict | None:
    """Median seconds and peak RSS over `repeat` runs (the data statistics are the same in each)."""
    runs = [measure(which, corpus, workdir) for _ in range(repeat)]
    if None in runs:
        return None
    result = dict(runs[0])
    for key in ("seconds", "rss_mb", "ingest_seconds", "prepare_seconds"):
        if key in result:
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


def run_ingest_prepare(source: Path, out: Path) -> dict:
    """The download stage's ingest of the folder `source`, then `prepare` with sentencex and the word
    tokenizer; seconds of each and the train split's statistics."""
    from bertpipe.config import DataConfig, PrepareConfig
    from bertpipe.data.download import download
    from bertpipe.data.prepare import prepare

    start = time.perf_counter()
    download(DataConfig(source=str(source)), out / "raw")
    ingested = time.perf_counter()
    stats = prepare(out / "raw", out / "prepared", PrepareConfig(sentences="sentencex", tokenizer="word"))
    end = time.perf_counter()
    train, report = stats["train"], out / "raw" / "ingest.json"  # what ingest read, where it writes that
    ingest_cuts = json.loads(report.read_text()).get("train", {}).get("long_line_cuts", 0) if report.exists() else 0
    return {"seconds": end - start, "ingest_seconds": ingested - start, "prepare_seconds": end - ingested,
            "paragraphs": train["paragraphs"], "sentences": train["sentences"], "tokens": train["tokens"],
            "long_line_cuts": ingest_cuts + train.get("long_line_cuts", 0)}


def detokenize(line: str) -> str:
    """A WikiText line as ordinary text: `@-@` joins, punctuation and quotes attached, `<unk>` a word
    (sentencex reads `<unk>'s` as an opening quote)."""
    line = line.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".").replace("<unk>", "unk")
    line = re.sub(r'" (.*?) "', r'"\1"', line)
    line = re.sub(r" ([.,;:!?)\]]|'s\b|n't\b|'\s)", r"\1", line)
    return re.sub(r"([(\[]) ", r"\1", line).strip()


def english_articles(data: Path) -> list[list[str]]:
    """WikiText-2's validation and test articles, each as its paragraphs of ordinary text (headings dropped)."""
    articles: list[list[str]] = []
    for split in ("valid", "test"):
        for line in (data / f"wiki.{split}.tokens").read_text(encoding="utf-8").splitlines():
            if line.startswith(" = ") and not line.startswith(" = = "):
                articles.append([])
            elif line.strip() and not line.startswith(" = ") and articles:
                articles[-1].append(detokenize(line))
    return [article for article in articles if article]


def repeated(articles: list[list[str]], mb: float) -> list[list[str]]:
    """The articles over and over until they hold `mb` MB of text."""
    out, size, n = [], 0, 0
    while size < mb * 1e6:
        article = articles[n % len(articles)]
        out.append(article)
        size, n = size + sum(len(p.encode()) + 1 for p in article), n + 1
    return out


def build_long_line(data: Path, folder: Path, mb: float) -> float:
    """`folder/line` and `folder/paragraphs`: the same text as one line or as paragraphs; the train MB."""
    articles = repeated(english_articles(data), mb)
    valid = "\n".join(articles[0][:20]) + "\n"
    for shape in ("line", "paragraphs"):
        (folder / shape).mkdir()
        (folder / shape / "valid.txt").write_text(valid, encoding="utf-8")
    with open(folder / "line" / "train.txt", "w", encoding="utf-8") as f:
        f.write(" ".join(p for article in articles for p in article) + "\n")
    with open(folder / "paragraphs" / "train.txt", "w", encoding="utf-8") as f:
        f.write("\n".join("\n".join(article) + "\n" for article in articles))
    return (folder / "line" / "train.txt").stat().st_size / 1e6


def build_shards(data: Path, folder: Path, mb: float, shards: int = 8) -> float:
    """`folder/shards` (train/ as gzipped JSON-lines shards) and `folder/one` (train.jsonl); the train MB."""
    articles = repeated(english_articles(data), mb)
    lines = [json.dumps({"text": "\n".join(article)}, ensure_ascii=False) + "\n" for article in articles]
    valid = "".join(lines[:5])
    for shape in ("shards", "one"):
        (folder / shape).mkdir()
        (folder / shape / "valid.jsonl").write_text(valid, encoding="utf-8")
    with open(folder / "one" / "train.jsonl", "w", encoding="utf-8") as f:
        f.writelines(lines)
    (folder / "shards" / "train").mkdir()
    per = -(-len(lines) // shards)
    for n in range(shards):
        with gzip.open(folder / "shards" / "train" / f"train-{n:05d}-of-{shards:05d}.jsonl.gz", "wt",
                       encoding="utf-8") as f:
            f.writelines(lines[n * per:(n + 1) * per])
    return (folder / "one" / "train.jsonl").stat().st_size / 1e6


# case -> (builder, its two shapes: the one measured and the baseline)
SHAPED_CASES = {"long-line": (build_long_line, ("line", "paragraphs")), "shards": (build_shards, ("shards", "one"))}


def benchmark_shapes(case: str, data: Path, sizes: list[float], repeat: int) -> list[dict]:
    """Each size of `case` built once, then each shape through ingest + prepare in fresh processes."""
    build, shapes = SHAPED_CASES[case]
    rows = []
    for mb in sizes:
        with tempfile.TemporaryDirectory(prefix=f"bench-prep-{case}-") as tmp:
            row = {"case": case, "mb": build(data, Path(tmp), mb), "shapes": shapes}
            for shape in shapes:
                row[shape] = median_run("ingest", Path(tmp) / shape, repeat, workdir=Path(tmp))
                print(f"{case} {mb:g} MB {shape}: {row[shape]}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def print_shapes_tables(rows: list[dict]) -> None:
    """What each shape read, then seconds and peak RSS with the ratio of the first shape to the second (last)."""
    print("| case | train MB | shape | paragraphs | sentences | tokens | long-line cuts | ingest s | prepare s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        for shape in r["shapes"]:
            run = r[shape]
            cells = ([format(run[k], "d") for k in ("paragraphs", "sentences", "tokens", "long_line_cuts")]
                     + [f"{run['ingest_seconds']:.2f}", f"{run['prepare_seconds']:.2f}"] if run else ["failed"] * 6)
            print(f"| {r['case']} | {r['mb']:.1f} | {shape} | " + " | ".join(cells) + " |")
    print()
    print("| case | train MB | shape | s | peak RSS MB | baseline | s | peak RSS MB | time vs baseline |")
    print("|---|---:|---|---:|---:|---|---:|---:|---:|")
    for r in rows:
        (shape, baseline), runs = r["shapes"], [r[s] for s in r["shapes"]]
        cells = [f"{run['seconds']:.2f} | {run['rss_mb']:.0f}" if run else "failed | -" for run in runs]
        ratio = f"{runs[0]['seconds'] / runs[1]['seconds']:.2f}x" if all(runs) else "-"
        print(f"| {r['case']} | {r['mb']:.1f} | {shape} | {cells[0]} | {baseline} | {cells[1]} | {ratio} |")


CASES = ("wikitext", *SHAPED_CASES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=["wikitext"],
                        help="wikitext: ours vs the seed over k; long-line, shards: your own text in two shapes")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 10, 50], help="repetitions of the validation split")
    parser.add_argument("--mb", type=float, nargs="+", default=[10, 100], help="long-line: MB of text")
    parser.add_argument("--shards-mb", type=float, nargs="+", default=[110], help="shards: MB of text")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with wiki.{valid,test}.tokens")
    parser.add_argument("--one", choices=(*VARIANTS, "ingest"), help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        if args.one == "ingest":
            result = run_ingest_prepare(args.corpus, args.out)
        else:
            result = run_seed(args.corpus) if args.one == "seed" else run_ours(
                args.corpus, args.out, "wordpiece" if args.one == "wordpiece" else "word")
        print(json.dumps({**result, "rss_mb": peak_rss_mb()}))
        return
    if "wikitext" in args.cases:
        print_tables(benchmark(args.data, args.k, args.variants, args.repeat))
    shaped = [row for case, sizes in (("long-line", args.mb), ("shards", args.shards_mb)) if case in args.cases
              for row in benchmark_shapes(case, args.data, sizes, args.repeat)]
    if shaped:
        print_shapes_tables(shaped)


if __name__ == "__main__":
    main()
