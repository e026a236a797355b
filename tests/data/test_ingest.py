"""A folder of the user's own text as `data.source` (bertpipe/data/ingest.py, through bertpipe.data.download).

Each format (txt, jsonl, parquet) must give the same `{split}.txt` layout: documents separated by one
empty line, paragraphs one per line. Text is typed as people type it: any language, CRLF line ends,
a byte-order mark, blank lines of spaces. Every bad input stops with one line naming the file and
what is allowed, and leaves an earlier good download as it was.
"""

from __future__ import annotations

import codecs
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, STAGE_ENV, params_with

from bertpipe.config import DataConfig
from bertpipe.data.download import download
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
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["test.txt", "train.txt", "valid.txt"]
    for split in ("train", "valid", "test"):
        assert (tmp_path / "raw" / f"{split}.txt").read_text(encoding="utf-8") == EXPECTED


def test_test_split_is_optional(tmp_path: Path) -> None:
    download(DataConfig(source=str(user_folder(tmp_path))), tmp_path / "raw")
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["train.txt", "valid.txt"]


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


BAD_FOLDERS: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "missing-valid": (lambda f: (f / "valid.txt").unlink(), ("has no valid split", "valid.txt, valid.jsonl")),
    "empty-train": (_bad("train.txt", b"\n  \n\n"), ("train.txt holds no text", "at least one document")),
    "unknown-format": (_replace("train.txt", "train.csv", b"text\na\n"),
                       ("train.csv is not a format bertpipe reads", "train.txt, train.jsonl or train.parquet")),
    "two-train-files": (_bad("train.jsonl", b'{"text": "a"}\n'), ("holds 2 train files", "train.jsonl, train.txt")),
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
    "parquet-without-text": (_parquet_without_text, ('train.parquet has no string column "text" (columns: body)',)),
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
