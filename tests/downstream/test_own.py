"""Your own labelled task: the four formats, class names, ids and scores, and each bad folder as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from bertpipe.config import DownstreamConfig
from bertpipe.downstream.own import read_own_task
from bertpipe.downstream.tasks import build_tasks, read_tasks
from bertpipe.errors import DataError

TRAIN = [("Great film!", "yes"), ("Dull, \"slow\" plot.", "no"), ("Ótimo; 映画 ✓", "yes")]
VALID = [("Loved it.", "yes"), ("Awful.", "no")]


def write(folder: Path, split: str, fmt: str, rows: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.{fmt}"
    frame = pd.DataFrame(rows)
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        path.write_text("\t".join(frame.columns) + "\n" + "".join(
            "\t".join(str(v) for v in row) + "\n" for row in frame.itertuples(index=False)), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        frame.to_parquet(path, index=False)
    return path


def labelled(rows: list[tuple[str, object]]) -> list[dict]:
    return [{"text": text, "label": label} for text, label in rows]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_each_format_with_class_names(tmp_path: Path, fmt: str) -> None:
    write(tmp_path, "train", fmt, labelled(TRAIN))
    write(tmp_path, "validation", fmt, labelled(VALID))
    task = read_own_task("reviews", tmp_path)
    assert task.labels == ("no", "yes")  # sorted
    assert task.splits["train"].to_dict("records") == [{"text": t, "label": int(label == "yes")} for t, label in TRAIN]
    assert task.splits["validation"]["label"].tolist() == [1, 0]


def test_pairs_ids_and_scores(tmp_path: Path) -> None:
    ids = tmp_path / "ids"
    write(ids, "train", "jsonl", [{"text": "a", "text_pair": "b", "label": 2}, {"text": "c", "text_pair": "d",
                                                                                "label": 0}])
    write(ids, "validation", "jsonl", [{"text": "e", "text_pair": "f", "label": 2}])
    task = read_own_task("ids", ids)
    assert task.labels == ("0", "2") and task.splits["validation"].to_dict("records") == [
        {"text": "e", "text_pair": "f", "label": 1}]
    scores = tmp_path / "scores"
    write(scores, "train", "csv", [{"text": "a", "label": 1.5}, {"text": "b", "label": 4.0}])
    write(scores, "validation", "csv", [{"text": "c", "label": 3}])
    task = read_own_task("scores", scores)
    assert task.labels is None and task.splits["validation"]["label"].tolist() == [3.0]


def test_the_stage_writes_an_own_task_found_relative_to_the_repository(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`./tasks/reviews` is the repository's, as for --temp and queued experiments run in .dvc/tmp/exps."""
    (tmp_path / ".dvc" / "tmp" / "exps" / "run").mkdir(parents=True)
    write(tmp_path / "tasks" / "reviews", "train", "csv", labelled(TRAIN))
    write(tmp_path / "tasks" / "reviews", "validation", "csv", labelled(VALID))
    monkeypatch.chdir(tmp_path / ".dvc" / "tmp" / "exps" / "run")
    build_tasks(DownstreamConfig(tasks=("./tasks/reviews", "mine=tasks/reviews")), tmp_path / "out")
    reviews, mine = read_tasks(tmp_path / "out")
    assert (reviews.name, mine.name) == ("reviews", "mine") and reviews.sha256 == mine.sha256
    assert reviews.metrics == ("accuracy", "macro_f1") and not reviews.glue and reviews.num_labels == 2


BAD = {
    "no label column": (lambda f: (write(f, "train", "csv", [{"text": "a", "class": "x"}]),
                                   write(f, "validation", "csv", [{"text": "b", "class": "x"}])),
                        ("train.csv", "no column label")),
    "no text column": (lambda f: (write(f, "train", "jsonl", [{"sentence": "a", "label": 1}]),
                                  write(f, "validation", "jsonl", [{"sentence": "b", "label": 1}])),
                       ("train.jsonl", "no column text")),
    "a label unseen in train": (lambda f: (write(f, "train", "csv", labelled(TRAIN)),
                                           write(f, "validation", "csv", labelled([*VALID, ("Meh.", "maybe")]))),
                                ("validation.csv", "'maybe'", "never has")),
    "an empty split": (lambda f: (write(f, "train", "csv", labelled(TRAIN)),
                                  (f / "validation.csv").write_text("text,label\n")),
                       ("validation.csv", "no rows")),
    "an empty text": (lambda f: (write(f, "train", "tsv", labelled([*TRAIN, ("", "no")])),
                                 write(f, "validation", "tsv", labelled(VALID))),
                      ("train.tsv", "row 4", "no text")),
    "no validation file": (lambda f: write(f, "train", "csv", labelled(TRAIN)),
                           ("no validation file", "validation.*")),
    "two train files": (lambda f: (write(f, "train", "csv", labelled(TRAIN)), write(f, "train", "jsonl",
                                                                                    labelled(TRAIN))),
                        ("more than one train file",)),
    "latin-1 text": (lambda f: ((f / "train.csv").write_bytes("text,label\ncaf\xe9,yes\n".encode("latin-1")),
                                write(f, "validation", "csv", labelled(VALID))),
                     ("train.csv", "not UTF-8")),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_folder_is_one_line_naming_the_file(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "task"
    folder.mkdir()
    spoil, words = BAD[case]
    spoil(folder)
    with pytest.raises(DataError) as err:
        read_own_task("task", folder)
    assert "\n" not in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_a_missing_folder_stops_the_stage_before_any_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_tasks(DownstreamConfig(tasks=("cola", str(tmp_path / "nowhere"))), tmp_path / "out", mirrors=[])
    assert not (tmp_path / "out").exists()
