"""A real labelled task drawn from the WikiText-2 sample, for machines without GLUE's files (the tests, the GPU
check): is a line a section heading (` = Title = `) or the start of a paragraph?

    heading_task(wikitext, folder, train=240, validation=80) -> folder with train.csv and validation.csv
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd


def heading_task(wikitext: Path, folder: Path, train: int = 240, validation: int = 80) -> Path:
    """`folder/{train,validation}.csv`: half headings, half the first 12 words of a paragraph, shuffled."""
    lines = (wikitext / "wiki.valid.tokens").read_text(encoding="utf-8").splitlines()
    headings = [line.strip() for line in lines if line.startswith(" = ")]
    text = [" ".join(line.split()[:12]) for line in lines if line.strip() and not line.startswith(" = ")]
    half = (train + validation) // 2
    rows = [(t, "heading") for t in headings[:half]] + [(t, "text") for t in text[:half]]
    random.Random(0).shuffle(rows)
    folder.mkdir(parents=True)
    frame = pd.DataFrame(rows, columns=["text", "label"])
    frame[:train].to_csv(folder / "train.csv", index=False)
    frame[train:].to_csv(folder / "validation.csv", index=False)
    return folder
