"""What bench/gpu_check.py's parts share: the sizes, the time limits, calls in their own process group."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = {"cuda": [("base", 128, 256), ("large", 128, 256), ("base", 512, 64), ("large", 512, 64)],
         "cpu": [("tiny", 64, 32), ("tiny", 128, 32)]}
STEPS = {"cuda": ["--steps", "10", "--warmup", "3"], "cpu": ["--steps", "2", "--warmup", "1"]}
LIMITS = {"cuda": {"tests": 100, "pipeline": 90, "first": 70, "bench": 50, "ddp": 60, "compile": 150, "downstream": 60},
          "cpu": {"tests": 300, "pipeline": 300, "first": 150, "bench": 120, "ddp": 150, "compile": 240,
                  "downstream": 300}}
LEVERS = {"masked": "no key mask without padding (flash)", "foreach": "fused Adam"}
RESERVE = 5.0  # seconds kept for the table


@dataclass
class Row:
    part: str
    check: str
    result: str
    seconds: float | None  # None: derived from another part's runs
    status: str


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.device, self.out = args.device, args.out
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.deadline = time.monotonic() + args.budget
        self.started = time.monotonic()
        self.rows: list[Row] = []
        self.results: dict = {"device": self.device, "budget_s": args.budget}
        self.sample = find_sample()

    def call(self, command: list[str], log: str, limit: float, env: dict | None = None) -> tuple[int | str, float]:
        """`command` in a new process group, output appended to OUT/log; "timeout" or "no time" instead of a code."""
        limit = min(limit, self.deadline - time.monotonic() - RESERVE)
        if limit < 5:
            return "no time", 0.0
        with open(self.out / log, "a") as sink:
            sink.write(f"\n$ {' '.join(map(str, command))}\n")
            sink.flush()
            start = time.monotonic()
            proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                    env={**os.environ, **(env or {})})
            try:
                code: int | str = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = "timeout"
        return code, time.monotonic() - start

    def add(self, part: str, check: str, result: str, seconds: float | None, status: str) -> None:
        self.rows.append(Row(part, check, result, None if seconds is None else round(seconds, 1), status))


def status_of(code: int | str) -> str:
    return {0: "ok", "timeout": "TIMEOUT", "no time": "not run (time)"}.get(code, f"FAIL (exit {code})")


def find_sample() -> Path | None:
    """The WikiText-2 sample: $BERTPIPE_WIKITEXT, the copy gpu_prepare.sh makes in .gpu/, or ../shared."""
    for folder in (os.environ.get("BERTPIPE_WIKITEXT"), REPO / ".gpu" / "wikitext-2",
                   REPO.parent / "shared" / "data" / "wikitext-2", REPO / "shared" / "data" / "wikitext-2"):
        if folder and (Path(folder) / "wiki.valid.tokens").is_file() and (Path(folder) / "wiki.test.tokens").is_file():
            return Path(folder).resolve()
    return None


def bench(c: Check, name: str, preset: str, max_len: int, batch: int, variants: list[str], limit: float,
          extra: list[str] = (), launcher: list[str] = ()) -> tuple[dict | None, float, int | str]:
    """One bench/train.py run; its JSON (None when it failed) and the call's seconds and code."""
    precision = "bf16" if c.device == "cuda" else "fp32"
    result = c.work / f"{name}.json"
    command = [*(launcher or [sys.executable]), "bench/train.py", "--synthetic", "--preset", preset, "--max-len",
               str(max_len), "--batch", str(batch), "--buckets", "1", "--precision", precision, "--device", c.device,
               *STEPS[c.device], "--variants", *variants, "--json", str(result), *extra]
    code, seconds = c.call(command, "bench.log", limit)
    data = json.loads(result.read_text()) if code == 0 and result.is_file() else None
    c.results.setdefault("bench", {})[name] = data
    return data, seconds, code


