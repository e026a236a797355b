"""Trainings side by side on the CPU: torch's default threads against `train.threads: auto`, in one run.

A sweep (`dvc exp run --run-all -j N`) runs N pretrain stages at once on one machine. Each was given torch's
default, a thread per CPU with idle threads spinning while they wait, so two of them on 2 cores collapsed
(192 pairs/s each against 1,091 alone). This runs 1, 2 and 3 pretrain stages at once (stages/pretrain.py,
each in a folder of its own: the same examples, `--steps` steps, MLflow off, held-out evaluation only at
the last step) twice: "before", `train.threads` set to torch's default thread count with OpenMP's default
wait policy, and "after", `train.threads: auto` (the CPUs shared among the machine's trainings, idle threads
sleeping). pairs/s is each stage's own (metrics/pretrain.json: training steps only, start-up left out);
`threads` is what each stage resolved (its log). Needs the package's dependencies, not DVC.

    python bench/concurrent_trainings.py --examples data/examples --steps 40
    python bench/concurrent_trainings.py --examples data/examples --steps 4 --batch 64 --counts 1 2   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
OUTS = ["models/checkpoint", "metrics/pretrain.json", "plots/loss.csv", "plots/loss.png", "plots/valid.csv"]
# What would decide the threads besides params.yaml: the stages get neither (nor a DVC root above their folders).
UNSET = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "DVC_ROOT")


def main() -> None:
    args = parse_args()
    env = {key: value for key, value in os.environ.items() if key not in UNSET}
    default = torch_default_threads(env)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-concurrent-") as scratch:
        for count in args.counts:
            totals = {}
            for variant, threads in (("before", default), ("after", "auto")):
                folders = [stage_folder(Path(scratch, f"{count}-{variant}-{i}"), args, threads) for i in range(count)]
                results = run_together(folders, env)
                totals[variant] = sum(pairs for pairs, _ in results)
                wait = "active" if variant == "before" else "passive"
                rows.append([str(count), variant, " / ".join(str(t) for _, t in results) + f", {wait} wait",
                             " / ".join(f"{pairs:,.0f}" for pairs, _ in results), f"{totals[variant]:,.0f}",
                             f"{totals[variant] / totals['before']:.2f}x"])
                print(f"{count} at once, {variant}: {rows[-1][3]} pairs/s", flush=True)
    print_table(rows, args, default)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=Path, required=True, help="the examples stage's folder (train/ and valid/)")
    p.add_argument("--steps", type=int, default=40, help="training steps of each stage")
    p.add_argument("--batch", type=int, default=512, help="train.batch_size")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"), help="train.precision")
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2, 3], help="stages at once")
    return p.parse_args()


def torch_default_threads(env: dict[str, str]) -> int:
    """The thread count torch takes in a fresh process of this environment (OMP_NUM_THREADS unset)."""
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def stage_folder(folder: Path, args: argparse.Namespace, threads: int | str) -> Path:
    """A pipeline root for the pretrain stage: the repository's params.yaml with this bench's settings."""
    folder.mkdir()
    (folder / "examples").symlink_to(args.examples.resolve())
    yaml = YAML(typ="safe")
    params = yaml.load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["train"].update({"steps": args.steps, "batch_size": args.batch, "precision": args.precision,
                            "device": "cpu", "nproc": 1, "threads": threads, "eval_every": 0,
                            "checkpoint_every": args.steps})
    params["mlflow"]["enabled"] = False
    with open(folder / "params.yaml", "w", encoding="utf-8") as out:
        yaml.dump(params, out)
    return folder


def run_together(folders: list[Path], env: dict[str, str]) -> list[tuple[float, str]]:
    """Start a pretrain stage in each folder at once; each one's pairs/s and resolved thread count."""
    command = [sys.executable, str(REPO / "stages" / "pretrain.py"), "examples", *OUTS]
    stages = [subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True) for folder in folders]
    logs = [stage.communicate()[1] for stage in stages]
    results = []
    for folder, stage, log in zip(folders, stages, logs, strict=True):
        if stage.returncode != 0:
            sys.exit(f"the stage in {folder} failed with exit code {stage.returncode}:\n{log[-3000:]}")
        metrics = json.loads((folder / "metrics" / "pretrain.json").read_text())
        results.append((metrics["pairs_per_sec"], re.search(r"train\.threads=(\d+)", log).group(1)))
    return results


def print_table(rows: list[list[str]], args: argparse.Namespace, default: int) -> None:
    print(f"\npretrain stages at once on {len(os.sched_getaffinity(0))} CPUs, {args.steps} steps each, batch "
          f"{args.batch}, precision {args.precision}, examples {args.examples}; before: train.threads "
          f"{default} (torch's default), after: auto")
    header = ["at once", "variant", "threads", "pairs/s per training", "total pairs/s", "total vs before"]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")


if __name__ == "__main__":
    main()
