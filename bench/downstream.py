"""Fine-tuning throughput: the downstream stage's loop against transformers' run_glue recipe, on the same examples.

    python bench/downstream.py --model models/bert --tasks data/tasks [--task rte] [--examples 2048]
    python bench/downstream.py --model models/bert --tasks data/tasks --preset base --device cuda

`ours` is bertpipe.downstream.finetune.finetune (batches grouped by length and padded to their longest row,
fused AdamW, bf16 autocast where `downstream.precision: auto` picks it); `run_glue` is what a user of
transformers' examples/pytorch/text-classification/run_glue.py gets by default: every row padded to max_len
(`pad_to_max_length`), rows in random order, torch's default AdamW, fp32 (`--bf16` autocast as a variant).
Both train on the first --examples rows of the task's train split, one epoch, from the same start.
`--preset base` swaps the export's size for BERT-base's (randomly initialised, the export's tokenizer): the
throughput of a base-sized fine-tuning, for the GPU check. Reported: examples/s, real tokens/s (padding not
counted) and model-FLOPs utilisation against the matmul peak measured in the same run (bertpipe.model.flops;
FLOPs count real tokens only); one table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ruamel.yaml import YAML

from bertpipe.config import PRESETS, DownstreamConfig
from bertpipe.devices import resolve_precision
from bertpipe.downstream.downstream import fine_tuning_precision
from bertpipe.downstream.finetune import Encoded, encode, finetune, load_classifier
from bertpipe.downstream.tasks import TaskData, read_tasks
from bertpipe.export.hf_compat import config_from_hf
from bertpipe.model.flops import matmul_peak, training_flops

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="an export (models/bert)")
    p.add_argument("--tasks", type=Path, required=True, help="the tasks stage's folder (data/tasks)")
    p.add_argument("--task", help="which task (default: the first)")
    p.add_argument("--examples", type=int, default=2048, help="training rows per measurement")
    p.add_argument("--preset", choices=("export", "base"), default="export", help="the export's size, or BERT-base's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stage", type=Path, help="also run stages/downstream.py on the (sized) model in this folder")
    p.add_argument("--json", type=Path, help="write the rows here too")
    args = p.parse_args()
    device = torch.device(args.device)
    model_dir = sized(args.model, args.preset)
    task = next(t for t in read_tasks(args.tasks) if args.task in (None, t.name))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = DownstreamConfig(epochs=1)
    data = head(encode(tokenizer, task, cfg.max_len), args.examples)
    config = config_from_hf(json.loads((model_dir / "config.json").read_text()))
    ours_precision = fine_tuning_precision("auto", device, config.hidden_size)
    peaks = {dtype: matmul_peak(device, dtype) for dtype in (torch.float32, torch.bfloat16)
             if dtype == torch.float32 or resolve_precision("auto", device) == "bf16"}
    flops = training_flops(config, np.array([len(x) for x in data.ids["train"]]), 0)
    rows = []
    variants = [("ours", ours_precision), ("run_glue", "fp32")]
    if torch.bfloat16 in peaks:
        variants.append(("run_glue --bf16", "bf16"))
    for name, precision in variants:
        torch.manual_seed(0)
        if name == "ours":
            seconds = len(data.ids["train"]) / finetune(model_dir, task, data, cfg, 0, "pretrained", device, precision,
                                                        tokenizer.pad_token_id).examples_per_sec
        else:
            seconds = run_glue(model_dir, task, data, cfg, device, precision, tokenizer.pad_token_id)
        peak = peaks[torch.bfloat16 if precision == "bf16" else torch.float32]
        rows.append({"variant": name, "precision": precision, "examples_per_sec": len(data.ids["train"]) / seconds,
                     "tokens_per_sec": sum(map(len, data.ids["train"])) / seconds,
                     "mfu": flops / seconds / peak, "peak_tflops": peak / 1e12})
    stage = run_stage(args.stage, model_dir, args.tasks, device) if args.stage else None
    print_table(task, config, device, rows, stage)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "stage": stage}, indent=1))


def run_stage(folder: Path, model_dir: Path, tasks_dir: Path, device: torch.device) -> dict:
    """The downstream stage's command on every task of `tasks_dir`, the repository's params with this device."""
    folder.mkdir(parents=True, exist_ok=True)
    yaml = YAML(typ="safe")
    params = yaml.load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["downstream"]["device"], params["mlflow"]["enabled"] = device.type, False
    with open(folder / "params.yaml", "w", encoding="utf-8") as out:
        yaml.dump(params, out)
    (folder / "export.json").write_text("{}")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "stages" / "downstream.py"), str(model_dir.resolve()),
                           str(tasks_dir.resolve()), "export.json", "downstream.json"], cwd=folder)
    report = folder / "downstream.json"
    return {"seconds": round(time.perf_counter() - start, 1), "returncode": done.returncode,
            "report": json.loads(report.read_text()) if report.is_file() else None}


def sized(model_dir: Path, preset: str) -> Path:
    """The export, or a copy of its config and tokenizer at BERT-base's size (weights drawn anew)."""
    if preset == "export":
        return model_dir
    folder = Path(tempfile.mkdtemp(prefix="bench-downstream-"))
    config = json.loads((model_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **PRESETS["base"]}))
    for path in model_dir.iterdir():
        if path.name not in ("config.json", "model.safetensors"):
            (folder / path.name).write_bytes(path.read_bytes())
    from transformers import BertConfig, BertForPreTraining

    BertForPreTraining(BertConfig.from_pretrained(folder)).save_pretrained(folder)
    return folder


def head(data: Encoded, n: int) -> Encoded:
    """The first `n` training rows (and every dev row)."""
    return dataclasses.replace(data, ids={**data.ids, "train": data.ids["train"][:n]},
                               segments={**data.segments, "train": data.segments["train"][:n]},
                               labels={**data.labels, "train": data.labels["train"][:n]})


def run_glue(model_dir: Path, task: TaskData, data: Encoded, cfg: DownstreamConfig, device: torch.device,
             precision: str, pad_id: int) -> float:
    """Seconds for one epoch as run_glue.py trains by default: rows padded to max_len, torch's AdamW."""
    model = load_classifier(model_dir, task, "pretrained").to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rows = len(data.ids["train"])
    ids = np.full((rows, cfg.max_len), pad_id, dtype=np.int64)
    segments, mask = np.zeros_like(ids), np.zeros_like(ids)
    for i, (row, seg) in enumerate(zip(data.ids["train"], data.segments["train"], strict=True)):
        ids[i, :len(row)], segments[i, :len(row)], mask[i, :len(row)] = row, seg, 1
    labels = torch.from_numpy(data.labels["train"])
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(0))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    start = time.perf_counter()
    for batch in order.split(cfg.batch_size):
        inputs = {"input_ids": torch.from_numpy(ids[batch]), "token_type_ids": torch.from_numpy(segments[batch]),
                  "attention_mask": torch.from_numpy(mask[batch]), "labels": labels[batch]}
        with autocast:
            loss = model(**{k: v.to(device) for k, v in inputs.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def print_table(task: TaskData, config: object, device: torch.device, rows: list[dict], stage: dict | None) -> None:
    ours = rows[0]["examples_per_sec"]
    print(f"\n{task.name}, {config.num_hidden_layers} layers x {config.hidden_size}, {device.type}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| variant | precision | examples/s | real tokens/s | MFU | ours vs this |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        mfu = f"{100 * row['mfu']:.1f}% of {row['peak_tflops']:.2f} TFLOP/s" if math.isfinite(row["mfu"]) else "-"
        print(f"| {row['variant']} | {row['precision']} | {row['examples_per_sec']:,.0f} | "
              f"{row['tokens_per_sec']:,.0f} | {mfu} | {ours / row['examples_per_sec']:.2f}x |")
    if stage is not None:
        report = stage["report"] or {}
        tasks = [name for name in report if isinstance(report[name], dict)]
        scores = "; ".join(f"{n} {report[n]['score']:.2f} (random init {report[n]['random_init']['score']:.2f})"
                           for n in tasks)
        print(f"\nstages/downstream.py: exit {stage['returncode']}, {stage['seconds']:.0f} s ({report.get('device')}, "
              f"{report.get('precision')}): {scores}")


if __name__ == "__main__":
    main()
