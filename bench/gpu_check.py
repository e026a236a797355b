"""The parts of bench/gpu_check.sh, each in its own process group under a time limit, and one table last.

    python bench/gpu_check.py [--device cuda|cpu] [--out DIR] [--budget SECONDS] [--parts PART ...]

(1) pytest tests/test_cuda.py, test_train.py, test_optim.py with BERTPIPE_TEST_DEVICE=DEVICE; (2) every stage
of dvc.yaml on the stand-in corpus with default params (bench/gpu_pipeline.py), against the CPU fp32 golden;
(3) bench/train.py --synthetic at each size, ours against the seed and against each lever switched (no key
mask, fused Adam, length buckets at half-padded rows; torch.compile last); (4) DDP over every GPU (torchrun)
against one process, the scaling ratio; (5) the planner's estimate against torch.cuda.max_memory_allocated,
from (3); (6) the downstream stage at BERT-base size on (2)'s tasks, and its fine-tuning loop against
transformers' run_glue recipe (bench/downstream.py). A part that fails or runs out of time marks its rows and
the rest still run; the whole stays within --budget (510 s on CUDA). On the CPU the same parts run at the tiny
preset, in fp32, with few steps. Writes table.md, results.json and one log per part to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from gpu_calls import LIMITS, SIZES, Check, bench, status_of
from gpu_throughput import part_bench, part_compile


def environment(c: Check) -> None:
    probe = ("import json, sys, torch; c = torch.cuda.is_available(); print(json.dumps({"
             "'python': sys.version.split()[0], 'torch': torch.__version__, 'cuda': torch.version.cuda, "
             "'gpus': torch.cuda.device_count() if c else 0, 'name': torch.cuda.get_device_name(0) if c else 'cpu', "
             "'threads': torch.get_num_threads()}))")
    code, _ = c.call([sys.executable, "-c", probe], "setup.log", 60)
    lines = (c.out / "setup.log").read_text().strip().splitlines()
    c.results["environment"] = json.loads(lines[-1]) if code == 0 else {"error": status_of(code)}
    if c.device == "cuda":
        c.call(["nvidia-smi", "--query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit",
                "--format=csv"], "setup.log", 20)


def part_tests(c: Check) -> None:
    files = ["tests/test_cuda.py", "tests/training/test_train.py", "tests/training/test_optim.py"]
    env = {"BERTPIPE_TEST_DEVICE": c.device, **({"BERTPIPE_WIKITEXT": str(c.sample)} if c.sample else {})}
    code, seconds = c.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], "tests.log",
                           LIMITS[c.device]["tests"], env)
    lines = (c.out / "tests.log").read_text().splitlines()
    summary = [line.strip("= ") for line in lines if re.search(r"\d+ (passed|failed)", line)] or ["no summary"]
    c.results["tests"] = summary[-1]
    c.add("1 tests", f"pytest test_cuda, test_train, test_optim on {c.device}", summary[-1], seconds, status_of(code))


def part_pipeline(c: Check) -> None:
    if c.sample is None:
        c.add("2 pipeline", "all stages", "no WikiText sample (run bench/gpu_prepare.sh)", None, "skipped")
        return
    overrides = ["train.device=cpu", "train.precision=fp32", "train.nproc=1"] if c.device == "cpu" else []
    result_file = c.work / "pipeline.json"
    code, seconds = c.call([sys.executable, "bench/gpu_pipeline.py", "run", "--sample", str(c.sample), "--work",
                            str(c.work / "pipeline"), "--json", str(result_file), *overrides], "pipeline.log",
                           LIMITS[c.device]["pipeline"])
    resolved = re.findall(r"resolved: (.*)", (c.out / "pipeline.log").read_text())
    settings = " ".join(part.removeprefix("train.") for part in resolved[-1].split()[:3]) if resolved else "?"
    check = f"dvc.yaml's stages, defaults ({settings}) vs CPU fp32 golden"
    if not result_file.is_file():
        c.add("2 pipeline", check, "no result (see pipeline.log)", seconds, status_of(code))
        return
    r = json.loads(result_file.read_text())
    c.results["pipeline"] = r
    if "differences" not in r:
        c.add("2 pipeline", check, f"stage {r.get('failed_stage')} failed", seconds, "FAIL")
        return
    d, t, m = r["differences"], r["tolerance"], r["metrics"]
    text = (f"train MLM {m['train_mlm_loss']:.3f} (golden {r['golden']['train_mlm_loss']:.3f}, diff "
            f"{d['train_mlm_loss']:.3f} <= {t['train_mlm_loss']}), held-out MLM {m['valid_mlm_loss']:.3f} (diff "
            f"{d['valid_mlm_loss']:.3f} <= {t['valid_mlm_loss']}), curve diff MLM {d['curve_mlm']:.3f} <= "
            f"{t['curve_mlm']}, NSP {d['curve_nsp']:.3f} <= {t['curve_nsp']}; {m['pairs_per_sec']:,.0f} pairs/s")
    outside = [key for key, within in r["within"].items() if not within]
    c.add("2 pipeline", check, text, seconds, "ok" if r["ok"] else "FAIL: " + ", ".join(outside))


def part_ddp(c: Check) -> None:
    gpus = c.results.get("environment", {}).get("gpus", 0)
    nproc = 2 if c.device == "cpu" else gpus
    preset, max_len, batch = SIZES[c.device][0]
    if nproc < 2:
        c.add("4 DDP", "train.nproc: auto over every GPU", f"{gpus} GPU: nothing to scale", None, "skipped")
        return
    threads = ["--threads", "1"] if c.device == "cpu" else []
    single, s1, code1 = bench(c, "ddp-1", preset, max_len, batch, ["ours"], LIMITS[c.device]["ddp"], threads)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    many, s2, code2 = bench(c, f"ddp-{nproc}", preset, max_len, batch * nproc, ["ours"], LIMITS[c.device]["ddp"],
                            threads, launcher)
    if single is None or many is None:
        c.add("4 DDP", f"torchrun {nproc} processes", "no result (see bench.log)", s1 + s2, status_of(code1 or code2))
        return
    one, total = single["rows"][0]["pairs_per_sec"], many["rows"][0]["pairs_per_sec"]
    backend = "gloo" if c.device == "cpu" else "NCCL"
    c.add("4 DDP", f"{preset}-{max_len}, {nproc} x {c.device} ({backend}), batch {batch} per rank",
          f"{total:,.0f} pairs/s vs {one:,.0f} on one: scaling {total / (nproc * one):.2f}", s1 + s2, "ok")


def part_downstream(c: Check) -> None:
    """The downstream stage on part 2's tasks at BERT-base's size (the export's on the CPU), and its loop against
    transformers' run_glue recipe (bench/downstream.py)."""
    project = c.work / "pipeline" / "project"
    if not (project / "models" / "bert").is_dir() or not (project / "data" / "tasks").is_dir():
        c.add("6 downstream", "fine-tuning at BERT-base size", "no export and tasks (part 2 did not run)", None,
              "skipped")
        return
    size, rows = ("base", "2048") if c.device == "cuda" else ("export", "256")
    result = c.work / "downstream.json"
    code, seconds = c.call([sys.executable, "bench/downstream.py", "--model", str(project / "models" / "bert"),
                            "--tasks", str(project / "data" / "tasks"), "--preset", size, "--device", c.device,
                            "--examples", rows, "--stage", str(c.work / "downstream-stage"), "--json", str(result)],
                           "downstream.log", LIMITS[c.device]["downstream"])
    if not result.is_file():
        c.add("6 downstream", f"fine-tuning, {size} size", "no result (see downstream.log)", seconds, status_of(code))
        return
    r = json.loads(result.read_text())
    c.results["downstream"] = r
    ours, peer = r["rows"][0], r["rows"][1]
    stage = r["stage"]
    text = (f"ours {ours['examples_per_sec']:,.0f} examples/s ({ours['precision']}, MFU {100 * ours['mfu']:.1f}%) vs "
            f"run_glue {peer['examples_per_sec']:,.0f}: {ours['examples_per_sec'] / peer['examples_per_sec']:.2f}x; "
            f"stage {stage['seconds']:.0f} s, exit {stage['returncode']}")
    c.add("6 downstream", f"fine-tuning at {size} size, labelled sample task", text, seconds,
          status_of(code if stage["returncode"] == 0 else stage["returncode"]))


def print_table(c: Check) -> str:
    env = c.results.get("environment", {})
    lines = [f"gpu_check --device {c.device}: {env.get('gpus', 0)} x {env.get('name')}, torch {env.get('torch')} "
             f"(CUDA {env.get('cuda')}), python {env.get('python')}, {time.monotonic() - c.started:.0f} s "
             f"of {c.results['budget_s']} s", ""]
    header = ["part", "check", "result", "s", "status"]
    cells = [header, *[[r.part, r.check, r.result, "-" if r.seconds is None else f"{r.seconds:g}", r.status]
                       for r in c.rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for i, row in enumerate(cells):
        lines.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


PARTS = {"tests": part_tests, "bench": part_bench, "pipeline": part_pipeline, "downstream": part_downstream,
         "ddp": part_ddp, "compile": part_compile}  # in running order


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    p.add_argument("--budget", type=float, help="seconds for everything (default 510 on CUDA, 1500 on the CPU)")
    p.add_argument("--parts", nargs="+", choices=tuple(PARTS), default=list(PARTS), help="a rerun of some only")
    args = p.parse_args()
    args.budget = args.budget or (510 if args.device == "cuda" else 1500)
    args.out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check-out-"))
    args.out.mkdir(parents=True, exist_ok=True)
    c = Check(args)
    environment(c)
    if args.device == "cuda" and not c.results["environment"].get("gpus"):
        print("gpu_check: no CUDA GPU visible here; `--device cpu` runs the same parts on the CPU", file=sys.stderr)
        sys.exit(2)
    for name in args.parts:
        PARTS[name](c)
    c.rows.sort(key=lambda r: r.part.split()[0])  # parts in the order, whatever order they ran in
    table = print_table(c)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps({**c.results, "rows": [asdict(r) for r in c.rows]}, indent=1))
    print(f"\nlogs and results in {args.out}\n\n{table}")


if __name__ == "__main__":
    main()
