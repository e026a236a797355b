"""Part 2 of bench/gpu_check.sh: the whole pipeline on the stand-in corpus, against a CPU fp32 golden run.

    python bench/gpu_pipeline.py run --sample DIR --work DIR --json FILE [KEY=VALUE ...]
    python bench/gpu_pipeline.py golden --sample DIR --work DIR [--streams 4]

The stand-in corpus is the WikiText-2 sample (../shared/data/wikitext-2): its validation split as the training
split and its test split as both held-out splits, as the tests use it. `run` lays out a project folder whose
params.yaml is the repository's with `data.source` pointing at that corpus, `downstream.tasks` at a labelled
task drawn from the sample (bench/labelled.py), MLflow off and the KEY=VALUE overrides, runs every stage's
`cmd` from dvc.yaml in order (DVC itself is not needed), and compares the pretrain stage's loss curve and
metrics with bench/assets/pipeline_cpu_fp32.json. `golden` rewrites that file: the default pipeline trained
in-process on the CPU in fp32, and the tolerance, twice the largest difference that other dropout streams
(same data, same initial weights) make; a GPU draws other dropout masks and rounds in bf16, so it can match no
closer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from labelled import heading_task
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "bench" / "assets" / "pipeline_cpu_fp32.json"
COMPARED = ("train_mlm_loss", "train_nsp_loss", "valid_mlm_loss")
GOLDEN_PARAMS = {"train.device": "cpu", "train.precision": "fp32", "train.nproc": 1}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("run", "golden"))
    p.add_argument("--sample", type=Path, required=True, help="folder with wiki.valid.tokens, wiki.test.tokens")
    p.add_argument("--work", type=Path, required=True, help="scratch folder (emptied)")
    p.add_argument("--json", type=Path, help="run: write the comparison here")
    p.add_argument("--streams", type=int, default=4, help="golden: dropout streams besides the first")
    p.add_argument("overrides", nargs="*", help="run: params.yaml keys, e.g. train.device=cpu")
    args = p.parse_intermixed_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    corpus = stand_in_corpus(args.sample, args.work / "corpus")
    if args.command == "golden":
        write_golden(corpus, args.work, args.streams)
        return
    task = heading_task(args.sample, args.work / "labelled")  # GLUE's files are not on a GPU machine
    overrides = {"downstream.tasks": [str(task)], **dict(o.split("=", 1) for o in args.overrides)}
    result = run_pipeline(corpus, args.work / "project", overrides)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    sys.exit(0 if result["ok"] else 1)


def stand_in_corpus(sample: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, split in (("train", "valid"), ("valid", "test"), ("test", "test")):
        shutil.copyfile(sample / f"wiki.{split}.tokens", folder / f"wiki.{name}.tokens")
    return folder


def params_with(overrides: dict[str, object]) -> dict:
    """The repository's params.yaml (read as DVC reads it) with dotted keys set; strings are parsed as YAML."""
    yaml = YAML(typ="safe")
    params = yaml.load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        node = params
        for section in sections:
            node = node[section]
        node[key] = yaml.load(value) if isinstance(value, str) else value
    return params


def run_pipeline(corpus: Path, project: Path, overrides: dict[str, object]) -> dict:
    """Every stage of dvc.yaml, as its `cmd`, in a folder laid out as the project root."""
    project.mkdir(parents=True)
    params = params_with({"data.source": str(corpus), "mlflow.enabled": False, **overrides})
    with open(project / "params.yaml", "w", encoding="utf-8") as out:
        YAML(typ="safe").dump(params, out)
    stages = YAML(typ="safe").load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    seconds = {}
    for name, stage in stages.items():
        command = stage["cmd"].split()
        assert command[0] == "python" and command[1].startswith("stages/"), stage["cmd"]
        start = time.perf_counter()
        print(f"== stage {name}: {stage['cmd']}", flush=True)
        done = subprocess.run([sys.executable, str(REPO / command[1]), *command[2:]], cwd=project)
        seconds[name] = round(time.perf_counter() - start, 1)
        if done.returncode:
            return {"ok": False, "failed_stage": name, "returncode": done.returncode, "seconds": seconds}
    metrics = json.loads((project / "metrics" / "pretrain.json").read_text())
    export = json.loads((project / "metrics" / "export.json").read_text())
    downstream = json.loads((project / "metrics" / "downstream.json").read_text())
    curve = np.loadtxt(project / "plots" / "loss.csv", delimiter=",", skiprows=1)[:, 1:3]
    return {"seconds": seconds, "export": {k: v for k, v in export.items() if isinstance(v, int | float)},
            "downstream": downstream, **compare(curve, metrics)}


def compare(curve: np.ndarray, metrics: dict) -> dict:
    """The run's per-step [MLM, NSP] losses and COMPARED metrics against the golden, each within its tolerance."""
    if not GOLDEN.is_file():
        return {"ok": False, "failed_stage": f"none; {GOLDEN.name} is missing (gpu_pipeline.py golden writes it)"}
    golden = json.loads(GOLDEN.read_text())
    tolerance = golden["tolerance"]
    reference = np.array(golden["losses"])
    differences = {"curve_mlm": float(np.abs(curve[:, 0] - reference[:, 0]).max()),
                   "curve_nsp": float(np.abs(curve[:, 1] - reference[:, 1]).max())} if len(curve) == len(
        reference) else {"curve_mlm": float("inf"), "curve_nsp": float("inf")}
    differences |= {key: abs(metrics[key] - golden[key]) for key in COMPARED}
    within = {key: differences[key] <= tolerance[key] for key in differences}
    return {"ok": all(within.values()), "differences": differences, "tolerance": tolerance, "within": within,
            "metrics": {key: metrics[key] for key in (*COMPARED, "pairs_per_sec", "mfu", "steps")},
            "golden": {key: golden[key] for key in COMPARED}}


def write_golden(corpus: Path, work: Path, streams: int) -> None:
    """The default pipeline on the CPU in fp32 (stream 0, what the stage computes) and `streams` runs that
    differ only in their dropout masks; the tolerances are twice their largest differences from stream 0."""
    from bertpipe.config import Params, build
    from bertpipe.data.examples import build_examples
    from bertpipe.data.examples_folder import read_meta as examples_meta
    from bertpipe.data.prepare import prepare
    from bertpipe.resolve import resolve
    from bertpipe.tracking import NullTracker
    from bertpipe.training.distributed import World
    from bertpipe.training.loop import train
    from bertpipe.training.pretrain import final_metrics, resume, setup, trajectory

    params = build(Params, params_with({**GOLDEN_PARAMS, "mlflow.enabled": False}))
    prepare(corpus, work / "prepared", params.prepare)
    build_examples(work / "prepared", work / "examples", params.examples, seed=params.seed)
    runs = []
    for stream in range(streams + 1):
        meta = examples_meta(work / "examples")
        resolved, plan = resolve(params, meta)
        cpu = World(0, 1, 0, torch.device("cpu"))
        bert_config, folder = trajectory(resolved, meta, work / f"checkpoint-{stream}")
        run = setup(resolved, plan, work / "examples", meta, bert_config, folder, cpu)
        resume(run)
        if stream:
            torch.manual_seed(1000 + stream)  # after the initial weights: only the dropout masks change
        train(run, NullTracker())
        metrics = final_metrics(run)
        runs.append((np.array([[row["mlm_loss"], row["nsp_loss"]] for row in run.record.history.losses]), metrics))
        print(f"stream {stream}: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in COMPARED), flush=True)
    (losses, metrics), others = runs[0], runs[1:]
    spread = {"curve_mlm": max(float(np.abs(o[:, 0] - losses[:, 0]).max()) for o, _ in others),
              "curve_nsp": max(float(np.abs(o[:, 1] - losses[:, 1]).max()) for o, _ in others)}
    spread |= {key: max(abs(m[key] - metrics[key]) for _, m in others) for key in COMPARED}
    settings = " ".join(f"{k}={v}" for k, v in GOLDEN_PARAMS.items())
    golden = {"note": f"bench/gpu_pipeline.py golden: default params, {settings}, torch {torch.__version__}; "
                      f"tolerance = 2 x the largest difference of {streams} other dropout streams from this run",
              "losses": np.round(losses, 6).tolist(), **{key: round(metrics[key], 6) for key in COMPARED},
              "spread": {k: round(v, 6) for k, v in spread.items()},
              "tolerance": {k: round(2 * v, 4) for k, v in spread.items()}}
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    print(json.dumps({k: golden[k] for k in ("spread", "tolerance")}, indent=1))


if __name__ == "__main__":
    main()
