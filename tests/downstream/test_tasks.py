"""The `tasks` stage: GLUE's files from a local HTTP server (original layout, then the parquet copy), verified
and read with their quirks; a local folder in either layout; and the one-line refusals.

The tests build small files in GLUE's formats and register their sizes, sha256 and row counts in place of
the real ones (`registered`), as the real files' records sit in bertpipe/downstream/glue.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.http_server import Reply, Server

from bertpipe.config import DownstreamConfig
from bertpipe.downstream import glue
from bertpipe.downstream.glue import File, Mirror
from bertpipe.downstream.tasks import build_tasks, read_tasks
from bertpipe.errors import DataError
from bertpipe.fetch import Retry

FAST = Retry(tries=2, backoff_s=0.01, timeout_s=5)
BOM = "\ufeff"


def zip_of(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(name, text.encode("utf-8"))
    return buf.getvalue()


# GLUE's formats in miniature: CoLA headerless (label in column 1), STS-B with a stray quote that
# QUOTE_NONE keeps, MNLI's two dev sets, QQP with a row missing a field, MRPC's BOM and dev ids.
COLA = {"CoLA/train.tsv": "gj04\t1\t\tThe cat sat.\ngj04\t0\t*\tSat cat the.\nbc01\t1\t\tA dog ran.\n",
        "CoLA/dev.tsv": "gj04\t0\t*\tRan dog a.\ngj04\t1\t\tIt rained.\n",
        "CoLA/test.tsv": "index\tsentence\n0\tHidden label.\n"}
STSB_HEAD = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
STSB = {"STS-B/train.tsv": STSB_HEAD + '0\tg\tf\t2012\t0\tn\tn\tHe said "hi.\tHe greeted.\t4.250\n'
                                      "1\tg\tf\t2012\t1\tn\tn\tA man runs.\tA cat sleeps.\t0.500\n",
        "STS-B/dev.tsv": STSB_HEAD + "0\tg\tf\t2012\t0\tn\tn\tA plane.\tAn airplane.\t5.000\n"}
MNLI_HEAD = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tgold_label\n"
MNLI = {"MNLI/train.tsv": MNLI_HEAD + "0\t1\t1\tf\tA man sleeps.\tA man rests.\tentailment\n"
                                      "1\t2\t2\tf\tA man sleeps.\tA man runs.\tcontradiction\n",
        "MNLI/dev_matched.tsv": MNLI_HEAD + "0\t3\t3\tf\tIt is late.\tIt is night.\tneutral\n",
        "MNLI/dev_mismatched.tsv": MNLI_HEAD + "0\t4\t4\tg\tShe won.\tShe lost.\tcontradiction\n"}
QQP_HEAD = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
QQP = {"QQP/train.tsv": QQP_HEAD + "0\t1\t2\tHow?\tWhy?\t0\n1\t3\t4\tA question with no pair\n2\t5\t6\tWho?\tWho?\t1\n",
       "QQP/dev.tsv": QQP_HEAD + "0\t7\t8\tWhen?\tWhen?\t1\n"}
MRPC_HEAD = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
MRPC_TRAIN = (BOM + MRPC_HEAD + "1\t11\t12\tA said B .\tB was said by A .\n0\t21\t22\tIt is red .\tIt is blue .\n"
              '1\t31\t32\t" Quoted , he said .\tHe said it .\n').encode("utf-8")
MRPC_DEV_IDS = b"21\t22\n"
ORIGINAL = {"cola": {"glue/data/CoLA.zip": zip_of(COLA)}, "stsb": {"glue/data/STS-B.zip": zip_of(STSB)},
            "mnli": {"glue/data/MNLI.zip": zip_of(MNLI)}, "qqp": {"glue/data/QQP-clean.zip": zip_of(QQP)},
            "mrpc": {"senteval/senteval_data/msr_paraphrase_train.txt": MRPC_TRAIN,
                     "glue/data/mrpc_dev_ids.tsv": MRPC_DEV_IDS}}
ROWS = {"cola": {"train": 3, "validation": 2}, "stsb": {"train": 2, "validation": 1},
        "mnli": {"train": 2, "validation_matched": 1, "validation_mismatched": 1},
        "qqp": {"train": 2, "validation": 1}, "mrpc": {"train": 2, "validation": 1}}


def registered(monkeypatch: pytest.MonkeyPatch, name: str, files: dict[str, bytes]) -> None:
    """GLUE's record of task `name` replaced by the sizes and sha256 of `files` and the row counts of ROWS."""
    task = glue.TASKS[name]
    monkeypatch.setitem(glue.TASKS, name, replace(
        task, files=tuple(File(path, len(data), hashlib.sha256(data).hexdigest()) for path, data in files.items()),
        splits=tuple(replace(s, rows=ROWS[name][s.name], parquet_sha256=None) for s in task.splits)))


def serve_original(server: Server, monkeypatch: pytest.MonkeyPatch, *names: str) -> Mirror:
    for name in names:
        registered(monkeypatch, name, ORIGINAL[name])
        for path, data in ORIGINAL[name].items():
            server.serve(f"/fb/{path}", Reply(body=data))
    return Mirror(server.url("/fb/"), "original")


def parquet_of(columns: dict[str, list]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


COLA_PARQUET = {"train": {"sentence": ["The cat sat.", "Sat cat the.", "A dog ran."], "label": [1, 0, 1],
                          "idx": [0, 1, 2]},
                "validation": {"sentence": ["Ran dog a.", "It rained."], "label": [0, 1], "idx": [0, 1]},
                "test": {"sentence": ["Hidden label."], "label": [-1], "idx": [0]}}


def serve_parquet(server: Server, monkeypatch: pytest.MonkeyPatch) -> Mirror:
    registered(monkeypatch, "cola", ORIGINAL["cola"])
    for split, columns in COLA_PARQUET.items():
        server.serve(f"/hf/cola/{split}-00000-of-00001.parquet", Reply(body=parquet_of(columns)))
    return Mirror(server.url("/hf/"), "parquet")


def tasks_cfg(*tasks: str, source: str = "") -> DownstreamConfig:
    return DownstreamConfig(tasks=tasks, source=source)


def rows(out: Path, task: str, split: str) -> list[dict]:
    return pd.read_parquet(out / task / f"{split}.parquet").to_dict("records")


def test_original_files_are_verified_and_read_with_glues_quirks(server: Server, monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    mirror = serve_original(server, monkeypatch, "cola", "stsb", "mnli", "qqp", "mrpc")
    out = tmp_path / "tasks"
    build_tasks(tasks_cfg("cola", "stsb", "mnli", "qqp", "mrpc"), out, [mirror], FAST)

    assert rows(out, "cola", "train")[1] == {"text": "Sat cat the.", "label": 0}  # headerless: column 1, column 3
    assert rows(out, "stsb", "train")[0] == {"text": 'He said "hi.', "text_pair": "He greeted.", "label": 4.25}
    assert rows(out, "mnli", "validation_mismatched") == [{"text": "She won.", "text_pair": "She lost.", "label": 2}]
    assert [r["text"] for r in rows(out, "qqp", "train")] == ["How?", "Who?"]  # the row missing a field dropped
    assert rows(out, "mrpc", "validation") == [{"text": "It is red .", "text_pair": "It is blue .", "label": 0}]
    assert rows(out, "mrpc", "train")[1]["text"] == '" Quoted , he said .'  # the BOM is not in the first row
    tasks = {t.name: t for t in read_tasks(out)}
    assert list(tasks) == ["cola", "stsb", "mnli", "qqp", "mrpc"]  # downstream.tasks' order
    assert tasks["mnli"].scored == ("validation_matched", "validation_mismatched")
    assert tasks["stsb"].labels is None and tasks["stsb"].metrics == ("pearson", "spearmanr")
    assert tasks["cola"].labels == ("unacceptable", "acceptable") and not tasks["cola"].pair
    assert tasks["mrpc"].rows == {"train": 2, "validation": 1} and tasks["mrpc"].glue
    assert sorted(p.name for p in out.iterdir()) == ["cola", "mnli", "mrpc", "qqp", "stsb", "tasks.json"]


def test_a_checksum_mismatch_falls_back_to_the_parquet_copy_whose_test_split_is_never_fetched(
        server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    original = serve_original(server, monkeypatch, "cola")
    good = ORIGINAL["cola"]["glue/data/CoLA.zip"]
    server.serve("/fb/glue/data/CoLA.zip", Reply(body=bytes(len(good))))  # the right size, other bytes
    parquet = serve_parquet(server, monkeypatch)
    build_tasks(tasks_cfg("cola"), tmp_path / "tasks", [original, parquet], FAST)

    assert "checksum mismatch for CoLA.zip" in caplog.text
    assert rows(tmp_path / "tasks", "cola", "validation")[1] == {"text": "It rained.", "label": 1}
    assert server.hits["/hf/cola/test-00000-of-00001.parquet"] == 0  # hidden labels: never fetched
    assert json.loads((tmp_path / "tasks" / "tasks.json").read_text())["tasks"][0]["source"] == parquet.url


def test_every_mirror_failing_is_one_line_and_keeps_the_earlier_folder(server: Server, monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    original = serve_original(server, monkeypatch, "cola")
    good = ORIGINAL["cola"]["glue/data/CoLA.zip"]
    server.serve("/fb/glue/data/CoLA.zip", Reply(body=good[:100], length=len(good)))  # cut off mid-body
    out = tmp_path / "tasks"
    out.mkdir()
    (out / "tasks.json").write_text("earlier")
    with pytest.raises(DataError) as err:
        build_tasks(tasks_cfg("cola"), out, [original, Mirror(server.url("/nothing/"), "parquet")], FAST)
    message = str(err.value)
    assert "\n" not in message and "truncated body" in message and "HTTP 404" in message
    assert "downstream.source" in message  # the way out that needs no network
    assert (out / "tasks.json").read_text() == "earlier" and [p.name for p in tmp_path.iterdir()] == ["tasks"]


def test_a_parquet_copy_with_other_row_counts_is_refused(server: Server, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    parquet = serve_parquet(server, monkeypatch)
    server.serve("/hf/cola/train-00000-of-00001.parquet", Reply(body=parquet_of(
        {k: v[:2] for k, v in COLA_PARQUET["train"].items()})))
    with pytest.raises(DataError, match="cola train has 2 rows, GLUE's has 3"):
        build_tasks(tasks_cfg("cola"), tmp_path / "tasks", [parquet], FAST)


def test_no_tasks_download_nothing(server: Server, tmp_path: Path) -> None:
    build_tasks(tasks_cfg(), tmp_path / "tasks", [Mirror(server.url("/fb/"), "original")], FAST)
    assert read_tasks(tmp_path / "tasks") == [] and not server.hits


def test_a_local_folder_in_either_layout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """CoLA as its original zip directly in the folder, MRPC's files at their mirror paths, and RTE as the
    parquet copy; nothing is downloaded."""
    registered(monkeypatch, "cola", ORIGINAL["cola"])
    registered(monkeypatch, "mrpc", ORIGINAL["mrpc"])
    monkeypatch.setitem(glue.TASKS, "rte", replace(glue.TASKS["rte"], splits=tuple(
        replace(s, rows=1, parquet_sha256=None) for s in glue.TASKS["rte"].splits)))
    source = tmp_path / "glue"
    (source / "rte").mkdir(parents=True)
    (source / "CoLA.zip").write_bytes(ORIGINAL["cola"]["glue/data/CoLA.zip"])
    for path, data in ORIGINAL["mrpc"].items():
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).write_bytes(data)
    for split in ("train", "validation"):
        (source / "rte" / f"{split}-00000-of-00001.parquet").write_bytes(parquet_of(
            {"sentence1": ["A won."], "sentence2": ["A lost."], "label": [1], "idx": [0]}))
    build_tasks(tasks_cfg("cola", "mrpc", "rte", source=str(source)), tmp_path / "tasks", [], FAST)
    assert [t.rows["train"] for t in read_tasks(tmp_path / "tasks")] == [3, 2, 1]
    assert rows(tmp_path / "tasks", "rte", "train") == [{"text": "A won.", "text_pair": "A lost.", "label": 1}]


def test_a_local_folder_without_the_task_names_both_layouts(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        build_tasks(tasks_cfg("rte", source=str(tmp_path)), tmp_path / "tasks", [], FAST)
    assert "RTE.zip" in str(err.value) and "rte/train-00000-of-00001.parquet" in str(err.value)


def test_the_real_records_refuse_a_file_of_another_size(tmp_path: Path) -> None:
    """Against GLUE's own records, a CoLA.zip that is not GLUE's fails on its size before its sha256 is read."""
    (tmp_path / "CoLA.zip").write_bytes(ORIGINAL["cola"]["glue/data/CoLA.zip"])
    with pytest.raises(DataError, match=r"CoLA\.zip has [0-9,]+ bytes, GLUE.s has 376,971"):
        build_tasks(tasks_cfg("cola", source=str(tmp_path)), tmp_path / "tasks", [], FAST)


def test_an_archive_entry_that_would_escape_is_refused(server: Server, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    slip = {"glue/data/CoLA.zip": zip_of({**COLA, "../../evil.tsv": "x"})}
    registered(monkeypatch, "cola", slip)
    server.serve("/fb/glue/data/CoLA.zip", Reply(body=slip["glue/data/CoLA.zip"]))
    with pytest.raises(DataError, match="would land outside"):
        build_tasks(tasks_cfg("cola"), tmp_path / "tasks", [Mirror(server.url("/fb/"), "original")], FAST)


def test_registry_matches_the_recorded_row_counts() -> None:
    """The eight tasks with GLUE's dev-set sizes (`../shared/references/glue.md`), WNLI not among them."""
    dev = {name: [s.rows for s in task.scored] for name, task in glue.TASKS.items()}
    assert dev == {"cola": [1043], "sst2": [872], "mrpc": [408], "stsb": [1500], "qqp": [40430],
                   "mnli": [9815, 9832], "qnli": [5463], "rte": [277]}
