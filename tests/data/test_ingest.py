"""A folder of the user's own text as `data.source` (bertpipe/data/ingest.py, through bertpipe.data.download).

Each format (txt, jsonl, parquet) must give the same `{split}.txt` layout: documents separated by one
empty line, paragraphs one per line. Text is typed as people type it: any language, CRLF line ends,
a byte-order mark, blank lines of spaces. Every bad input stops with one line naming the file and
what is allowed, and leaves an earlier good download as it was.
"""

from __future__ import annotations

import codecs
import gzip
import json
import logging
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, STAGE_ENV, params_with

from bertpipe.config import DataConfig, PrepareConfig
from bertpipe.data.download import download
from bertpipe.data.prepare import prepare
from bertpipe.errors import DataError

DOCUMENTS = [["Der Kranich fliegt. Er ist grau.", "Zweiter Absatz, mit Umlauten: äöü ß."],
             ["今日は晴れです。明日は雨でしょう！"],
             ["A crane is flying.  ", "Ελληνικά κείμενα. Και ένα ακόμα!"]]
EXPECTED = ("Der Kranich fliegt. Er ist grau.\nZweiter Absatz, mit Umlauten: äöü ß.\n\n"
            "今日は晴れです。明日は雨でしょう！\n\nA crane is flying.\nΕλληνικά κείμενα. Και ένα ακόμα!\n")


def write_txt(path: Path, documents: list[list[str]]) -> None:
    """Windows-style: a BOM, CRLF, and documents separated by two blank lines, one of them spaces."""
    text = "\r\n  \r\n\r\n".join("\r\n".join(paragraphs) for paragraphs in documents) + "\r\n"
    path.write_bytes(codecs.BOM_UTF8 + text.encode("utf-8"))


def write_jsonl(path: Path, documents: list[list[str]]) -> None:
    lines = [json.dumps({"id": i, "text": "\n\n".join(paragraphs)}, ensure_ascii=i % 2 == 0)
             for i, paragraphs in enumerate(documents)]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")


def write_parquet(path: Path, documents: list[list[str]]) -> None:
    pq.write_table(pa.table({"title": [f"d{i}" for i in range(len(documents))],
                             "text": ["\n".join(paragraphs) for paragraphs in documents]}), path, row_group_size=1)


def compressed(data: bytes, compression: str) -> bytes:
    import bz2
    import lzma

    from backports import zstd

    return {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress, "zst": zstd.compress}[compression](data)


WRITERS: dict[str, Callable[[Path, list[list[str]]], None]] = {
    "txt": write_txt, "jsonl": write_jsonl, "parquet": write_parquet}


def user_folder(root: Path, fmt: str = "txt", test: bool = False) -> Path:
    folder = root / "corpus"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", *(("test",) if test else ())):
        WRITERS[fmt](folder / f"{split}.{fmt}", DOCUMENTS)
    return folder


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_every_format_gives_the_same_documents(fmt: str, tmp_path: Path) -> None:
    download(DataConfig(source=str(user_folder(tmp_path, fmt, test=True))), tmp_path / "raw")
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["ingest.json", "test.txt", "train.txt",
                                                                     "valid.txt"]
    for split in ("train", "valid", "test"):
        assert (tmp_path / "raw" / f"{split}.txt").read_text(encoding="utf-8") == EXPECTED


def test_test_split_is_optional(tmp_path: Path) -> None:
    download(DataConfig(source=str(user_folder(tmp_path))), tmp_path / "raw")
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["ingest.json", "train.txt", "valid.txt"]


def test_a_crlf_cut_by_the_read_block_is_one_line_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bertpipe.data import ingest

    monkeypatch.setattr(ingest, "BLOCK", 7)  # "abcdef\r" | "\nghi..." and every other cut
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_bytes(b"abcdef\r\nghij klm\r\n\r\nnop\rqrs\n")
    (folder / "valid.txt").write_bytes(b"x\n")
    download(DataConfig(source=str(folder)), tmp_path / "raw")
    assert (tmp_path / "raw" / "train.txt").read_bytes() == b"abcdef\nghij klm\n\nnop\nqrs\n"


def _bad(name: str, data: bytes) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        (folder / name).write_bytes(data)
    return write


def _replace(old: str, name: str, data: bytes) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        (folder / old).unlink()
        (folder / name).write_bytes(data)
    return write


def _parquet_without_text(folder: Path) -> None:
    (folder / "train.txt").unlink()
    pq.write_table(pa.table({"body": ["a . b"]}), folder / "train.parquet")


def _parquet_with_null(folder: Path) -> None:
    (folder / "train.txt").unlink()
    pq.write_table(pa.table({"text": ["a", None, "b"]}), folder / "train.parquet")


def _folder_beside_file(folder: Path) -> None:
    (folder / "train").mkdir()
    (folder / "train" / "doc.txt").write_text("a\n")


def _unknown_in_folder(folder: Path) -> None:
    (folder / "valid.txt").unlink()
    (folder / "valid").mkdir()
    (folder / "valid" / "doc.txt").write_text("a\n")
    (folder / "valid" / "notes.md").write_text("# notes\n")


def _empty_folder(folder: Path) -> None:
    (folder / "valid.txt").unlink()
    (folder / "valid").mkdir()


def _corrupt_parquet_page(folder: Path) -> None:
    (folder / "train.txt").unlink()
    pq.write_table(pa.table({"text": [f"sentence {i} " * 20 for i in range(2000)]}), folder / "train.parquet",
                   use_dictionary=False)
    data = bytearray((folder / "train.parquet").read_bytes())
    data[200:2000] = bytes(b ^ 0x5A for b in data[200:2000])
    (folder / "train.parquet").write_bytes(bytes(data))


def _parquet_footer_past_the_end(folder: Path) -> None:
    (folder / "train.txt").unlink()
    pq.write_table(pa.table({"text": ["a b"]}), folder / "train.parquet")
    data = bytearray((folder / "train.parquet").read_bytes())
    data[-8:-4] = (10**9).to_bytes(4, "little")
    (folder / "train.parquet").write_bytes(bytes(data))


def _nothing_readable(folder: Path) -> None:
    for path in list(folder.iterdir()):
        path.unlink()
    (folder / "notes").mkdir()
    (folder / "notes" / "a.txt").write_text("a\n")
    (folder / "readme.md").write_text("hello\n")


BAD_FOLDERS: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "missing-valid": (lambda f: (f / "valid.txt").unlink(), ("has no valid split", "valid.txt, valid.jsonl")),
    "empty-train": (_bad("train.txt", b"\n  \n\n"), ("train.txt holds no text", "at least one document")),
    "unknown-format": (_replace("train.txt", "train.csv", b"text\na\n"),
                       ("train.csv is not a format bertpipe reads", "train.txt, train.jsonl or train.parquet")),
    "two-train-files": (_bad("train.jsonl", b'{"text": "a"}\n'), ("holds train.jsonl, train.txt for the train split",
                                                                  "expected one of: train.txt")),
    "file-and-folder": (_folder_beside_file, ("holds train/ (1 files), train.txt for the train split",)),
    "shards-and-file": (_bad("train-00000-of-00001.txt", b"a\n"), ("train-00000-of-00001.txt, train.txt",)),
    "unknown-file-in-folder": (_unknown_in_folder, ("holds notes.md, not a format bertpipe reads",)),
    "empty-split-folder": (_empty_folder, ("valid is an empty folder",)),
    "corrupt-gzip": (_replace("train.txt", "train.txt.gz", gzip.compress(b"a crane\n" * 1000)[:-40] + b"x" * 40),
                     ("train.txt.gz is not a readable .gz file", "expected a complete archive")),
    "truncated-zstd": (_replace("train.txt", "train.jsonl.zst", compressed(b'{"text": "a"}\n' * 999, "zst")[:30]),
                       ("train.jsonl.zst is not a readable .zst file",)),
    "parquet-compressed": (_replace("train.txt", "train.parquet.gz", b"x"), ("train.parquet.gz is not a format",)),
    "parquet-corrupt-page": (_corrupt_parquet_page, ("train.parquet is not a readable parquet file",
                                                     "deserialize")),
    "parquet-footer-past-the-end": (_parquet_footer_past_the_end, ("train.parquet is not a readable parquet file",
                                                                   "size reported by footer")),
    "neither-layout": (_nothing_readable, ("holds neither your own text", "nor WikiText's wiki.train.tokens",
                                           "found: notes/ (1 files), readme.md")),
    "latin-1": (_bad("train.txt", "caf\u00e9 cr\u00e8me\n".encode("latin-1")),
                ("train.txt is not UTF-8 text (invalid byte at offset 3)", "expected UTF-8")),
    "utf-16": (_bad("train.txt", "a crane\n".encode("utf-16")), ("train.txt is UTF-16 text", "expected UTF-8")),
    "jsonl-not-json": (_replace("train.txt", "train.jsonl", b'{"text": "a"}\n{"text": "b"\n'),
                       ("train.jsonl line 2 is not JSON", 'a string field "text"')),
    "jsonl-without-text": (_replace("train.txt", "train.jsonl", b'{"text": "a"}\n{"body": "b"}\n'),
                           ('train.jsonl line 2 has no string field "text"',)),
    "jsonl-text-not-string": (_replace("train.txt", "train.jsonl", b'{"text": ["a"]}\n'),
                              ('train.jsonl line 1 has no string field "text"',)),
    "jsonl-lone-surrogate": (_replace("train.txt", "train.jsonl", b'{"text": "a \\ud800"}\n'),
                             ("train.jsonl line 1 holds an unpaired surrogate",)),
    "parquet-without-text": (_parquet_without_text,
                             ('train.parquet has no string column "text" (columns: body (string))',)),
    "parquet-null": (_parquet_with_null, ("train.parquet row 1 has no text (null)",)),
    "not-parquet": (_replace("train.txt", "train.parquet", b"PAR1 not really"), ("train.parquet is not a readable",)),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_a_bad_folder_is_one_line_and_keeps_the_earlier_download(case: str, tmp_path: Path) -> None:
    folder = user_folder(tmp_path)
    download(DataConfig(source=str(folder)), tmp_path / "raw")
    before = {p.name: p.read_bytes() for p in (tmp_path / "raw").iterdir()}
    change, words = BAD_FOLDERS[case]
    change(folder)
    with pytest.raises(DataError) as caught:
        download(DataConfig(source=str(folder)), tmp_path / "raw")
    message = str(caught.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    assert {p.name: p.read_bytes() for p in (tmp_path / "raw").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "raw"]  # no staging folder left


def test_the_stage_says_it_in_one_error_line(tmp_path: Path) -> None:
    folder = user_folder(tmp_path)
    (folder / "valid.txt").write_bytes(b"\xff\xfe\x00")
    (tmp_path / "params.yaml").write_text(json.dumps(params_with({"data.source": str(folder)})))
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "download.py"), "raw"], cwd=tmp_path,
                          env=STAGE_ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("Error:")] == [
        f"Error: {folder / 'valid.txt'} is UTF-16 text; expected UTF-8 (save it as UTF-8, e.g. iconv -f UTF-16 "
        "-t UTF-8)"]
    assert not (tmp_path / "raw").exists()


# Corpora as they ship: one file per document, shards with the Hub's or C4's names, compressed streams.

def written(fmt: str, documents: list[list[str]], tmp_path: Path) -> bytes:
    """The bytes WRITERS[fmt] writes for `documents`."""
    path = tmp_path / f"scratch.{fmt}"
    WRITERS[fmt](path, documents)
    data = path.read_bytes()
    path.unlink()
    return data


def ingested(folder: Path, tmp_path: Path) -> tuple[dict[str, str], dict]:
    """Each split as written, and the ingest report."""
    raw = tmp_path / "raw"
    download(DataConfig(source=str(folder)), raw)
    report = json.loads((raw / "ingest.json").read_text())
    return {path.stem: path.read_text(encoding="utf-8") for path in raw.glob("*.txt")}, report


def test_a_folder_of_one_file_per_document_keeps_each_document_apart(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    for i, paragraphs in enumerate(DOCUMENTS):  # doc10 sorts before doc2: names, not numbers, set the order
        path = folder / "train" / ("sub" if i == 2 else "") / f"doc{[1, 10, 2][i]}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(paragraphs), encoding="utf-8")  # no final newline, no blank line after
    (folder / "validation").mkdir()
    (folder / "validation" / "part-0.jsonl").write_bytes(written("jsonl", DOCUMENTS, tmp_path))
    (folder / "train" / ".DS_Store").write_bytes(b"\x00\x01")  # hidden files are not text
    splits, report = ingested(folder, tmp_path)
    assert splits["valid"] == EXPECTED
    assert splits["train"] == EXPECTED
    assert report["train"]["files"] == 3 and report["train"]["documents"] == 3


@pytest.mark.parametrize("names", [
    {"train": ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"],
     "valid": ["validation-00000-of-00001.parquet"]},
    {"train": ["c4-train.00000-of-00002.json.gz", "c4-train.00001-of-00002.json.gz"],
     "valid": ["c4-validation.00000-of-00001.json.gz"]},
    {"train": ["train.00000-of-00002.jsonl.zst", "train.00001-of-00002.jsonl.zst"], "valid": ["valid.txt"]},
], ids=["hub-parquet", "c4-json-gz", "jsonl-zst"])
def test_shards_are_read_in_name_order_as_one_split(names: dict[str, list[str]], tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    parts = {"train": [DOCUMENTS[:2], DOCUMENTS[2:]], "valid": [DOCUMENTS]}
    for split, files in names.items():
        for name, documents in zip(reversed(files), reversed(parts[split]), strict=True):  # written last first
            fmt = {"parquet": "parquet", "json": "jsonl", "jsonl": "jsonl", "txt": "txt"}[name.split(".")[-2 if
                   name.endswith((".gz", ".zst")) else -1]]
            data = written(fmt, documents, tmp_path)
            (folder / name).write_bytes(compressed(data, name.rsplit(".", 1)[1]) if name.endswith((".gz", ".zst"))
                                        else data)
    splits, report = ingested(folder, tmp_path)
    assert splits == {"train": EXPECTED, "valid": EXPECTED}
    assert report["train"]["files"] == 2


@pytest.mark.parametrize("compression", ["gz", "zst", "bz2", "xz"])
@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_compressed_files_are_read_as_they_are_decompressed(fmt: str, compression: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from bertpipe.data import ingest

    monkeypatch.setattr(ingest, "BLOCK", 5)  # many blocks: every cut of a line and of a UTF-8 character
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split in ("train", "valid"):
        (folder / f"{split}.{fmt}.{compression}").write_bytes(compressed(written(fmt, DOCUMENTS, tmp_path),
                                                                         compression))
    splits, _ = ingested(folder, tmp_path)
    assert splits == {"train": EXPECTED, "valid": EXPECTED}


def test_byte_order_marks_anywhere_are_dropped_and_counted(tmp_path: Path, sample_raw: Path) -> None:
    """Two Windows files joined with `cat`: the second one's BOM lands mid-file, glued to its first word."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    first, second = (codecs.BOM_UTF8 + text.encode("utf-8") for text in ("Erste Zeile. Noch ein Satz.\r\n",
                                                                           "Zweite Datei. Ende.\r\n"))
    (folder / "train.txt").write_bytes(first + second)
    (folder / "valid.jsonl").write_bytes(codecs.BOM_UTF8 + b'{"text": "a b"}\n' + codecs.BOM_UTF8
                                         + b'{"text": "\\ufeffc d"}\n')
    splits, report = ingested(folder, tmp_path)
    assert splits == {"train": "Erste Zeile. Noch ein Satz.\nZweite Datei. Ende.\n", "valid": "a b\n\nc d\n"}
    assert report["train"]["byte_order_marks"] == 2 and report["valid"]["byte_order_marks"] == 3
    metrics = prepare(tmp_path / "raw", tmp_path / "prepared", PrepareConfig(sentences="sentencex"))
    assert metrics["train"]["byte_order_marks"] == 2 and metrics["valid"]["byte_order_marks"] == 3


def test_byte_order_marks_in_wikitext_files_are_dropped_and_counted(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "wiki.train.tokens").write_bytes(codecs.BOM_UTF8 + b" = A = \n a b . c d .\n = B = \n"
                                            + codecs.BOM_UTF8 + b"e f . a b .\n")
    (raw / "wiki.valid.tokens").write_bytes(b" a b . c d .\n")
    metrics = prepare(raw, tmp_path / "prepared", PrepareConfig(min_freq=1))
    tokens = pd.read_parquet(tmp_path / "prepared" / "vocab.parquet")["token"].tolist()
    assert "e" in tokens and not any("\ufeff" in t for t in tokens)
    assert metrics["train"]["byte_order_marks"] == 2 and metrics["train"]["documents"] == 2


def test_a_line_longer_than_the_maximum_is_cut_as_it_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bertpipe.data import ingest
    from bertpipe.data.lines import MAX_LINE_BYTES

    monkeypatch.setattr(ingest, "BLOCK", 4096)
    sentence = "Ein Kranich fliegt über das Land, und niemand sieht ihn. "
    line = sentence * (3 * MAX_LINE_BYTES // len(sentence.encode("utf-8")))
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").write_text(line + "\n\nZweites Dokument.\n", encoding="utf-8")
    (folder / "valid.jsonl").write_text(json.dumps({"text": line}) + "\n", encoding="utf-8")
    splits, report = ingested(folder, tmp_path)
    train, valid = splits["train"], splits["valid"]
    assert all(0 < len(p.encode("utf-8")) <= MAX_LINE_BYTES for p in train.split("\n\n")[0].split("\n"))
    assert train.split("\n\n")[1] == "Zweites Dokument.\n"  # the cuts made paragraphs, not documents
    assert all(p.endswith("sieht ihn.") for p in valid.rstrip("\n").split("\n"))  # cut at sentence ends
    assert " ".join(valid.split()) == " ".join(line.split()) == " ".join(train.split("\n\n")[0].split())
    assert report["train"]["long_line_cuts"] >= 2 and report["valid"]["long_line_cuts"] >= 2


def test_reading_shows_the_bytes_read_as_it_goes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    import random

    monkeypatch.setenv("BERTPIPE_PROGRESS_SECONDS", "0")
    rng = random.Random(0)
    words = [rng.choice(["kranich", "fliegt", "über", "das", "land"]) for _ in range(600_000)]
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt.gz").write_bytes(compressed(" ".join(words).encode("utf-8"), "gz"))  # one line
    (folder / "valid.txt").write_text("a b\n")
    with caplog.at_level(logging.INFO, logger="bertpipe.progress"):
        download(DataConfig(source=str(folder)), tmp_path / "raw")
    read = [int(m.group(1).replace(",", "")) for r in caplog.records
            if (m := re.match(r"reading train: ([\d,]+)/", r.getMessage()))]
    assert len(read) >= 3 and read == sorted(read) and read[-1] == (folder / "train.txt.gz").stat().st_size


@pytest.mark.parametrize("kind", ["dictionary", "categorical", "large_string"])
def test_parquet_text_columns_as_other_tools_write_them(kind: str, tmp_path: Path) -> None:
    import pandas as pd

    folder = user_folder(tmp_path, "parquet")
    texts = ["\n".join(paragraphs) for paragraphs in DOCUMENTS]
    if kind == "categorical":
        pd.DataFrame({"text": pd.Categorical(texts)}).to_parquet(folder / "train.parquet")
    else:
        column = pa.array(texts).dictionary_encode() if kind == "dictionary" else pa.array(texts, pa.large_string())
        pq.write_table(pa.table({"text": column}), folder / "train.parquet")
    splits, _ = ingested(folder, tmp_path)
    assert splits["train"] == EXPECTED


def test_a_relative_source_is_the_repository_s_folder_also_from_a_temp_experiment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dvc exp run --temp` and queued runs work in .dvc/tmp/exps/<name>/, a copy that lacks what git ignores."""
    project = tmp_path / "project"
    user_folder(project)
    (project / ".dvc").mkdir()
    workspace = project / ".dvc" / "tmp" / "exps" / "tmpabc123"
    (workspace / ".dvc").mkdir(parents=True)
    monkeypatch.chdir(workspace)
    download(DataConfig(source="corpus"), workspace / "data" / "raw")
    assert (workspace / "data" / "raw" / "train.txt").read_text(encoding="utf-8") == EXPECTED
