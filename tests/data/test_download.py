"""Tests for bertpipe/data/download.py and stages/download.py, offline, against a local HTTP server.

Archives are built from the real WikiText-2 files in ../shared/data/wikitext-2, which lacks the
training split: the validation split stands in for train, the test split for valid, and the
test split's first 1,000 lines for test, so the three files differ and a mix-up would show.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import REPO
from conftest import SHARED_WIKITEXT as SHARED
from helpers.http_server import Reply, Server

from bertpipe.config import DataConfig, load_params
from bertpipe.data import download as dl
from bertpipe.errors import ConfigError, DataError

FAST = dl.Retry(tries=3, backoff_s=0.01, timeout_s=5)

pytestmark = pytest.mark.skipif(not (SHARED / "wiki.valid.tokens").is_file(), reason=f"needs {SHARED}")


@pytest.fixture(scope="module")
def splits() -> dict[str, bytes]:
    """The three stand-in split files (see the module docstring)."""
    valid, test = (SHARED / "wiki.valid.tokens").read_bytes(), (SHARED / "wiki.test.tokens").read_bytes()
    return {"wiki.train.tokens": valid, "wiki.valid.tokens": test,
            "wiki.test.tokens": b"".join(test.splitlines(keepends=True)[:1000])}


def make_zip(files: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(zipfile.ZipInfo("wikitext-2/"), b"")
        for name, data in files.items():
            zf.writestr(name, data)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, b"/etc/passwd")
    return buf.getvalue()


def canonical(splits: dict[str, bytes]) -> dict[str, bytes]:
    return {f"wikitext-2/{name}": data for name, data in splits.items()}


def make_parquet(text: bytes) -> bytes:
    """Hugging Face's layout: one row per line with its '\\n', blank lines (' \\n') as ''."""
    lines = text.decode("utf-8").split("\n")[:-1]
    rows = ["" if line == " " else line + "\n" for line in lines]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": pa.array(rows, pa.string())}), buf)
    return buf.getvalue()


def sha1(data: bytes) -> str:
    return "sha1:" + hashlib.sha1(data).hexdigest()


def record(data: bytes, with_sha256: bool = True) -> dl.SplitRecord:
    sha256 = hashlib.sha256(data).hexdigest() if with_sha256 else None
    return dl.SplitRecord(size=len(data), lines=data.count(b"\n"), sha256=sha256)


@pytest.fixture(scope="module")
def good_zip(splits: dict[str, bytes]) -> bytes:
    return make_zip(canonical(splits))


def stand_in_records(splits: dict[str, bytes]) -> dict[str, dl.SplitRecord]:
    """Records of the stand-in files: sha256 for valid and test, size and lines only for train, as for the real data."""
    return {name: record(data, with_sha256=name != "wiki.train.tokens") for name, data in splits.items()}


def serve_parquet(server: Server, splits: dict[str, bytes], prefix: str = "/hf/",
                  dataset: str = "wikitext-2") -> str:
    """Each split file as the dataset's parquet shards (the lines dealt out in order)."""
    for name, shards in dl.DATASETS[dataset].parquet_files.items():
        lines = splits[name].splitlines(keepends=True)
        cut = [len(lines) * k // len(shards) for k in range(len(shards) + 1)]
        for k, parquet_name in enumerate(shards):
            server.serve(prefix + parquet_name, Reply(body=make_parquet(b"".join(lines[cut[k]:cut[k + 1]]))))
    return server.url(prefix)


def with_records(monkeypatch: pytest.MonkeyPatch, records: dict[str, dl.SplitRecord],
                 dataset: str = "wikitext-2") -> None:
    monkeypatch.setitem(dl.DATASETS, dataset, replace(dl.DATASETS[dataset], records=records))


OFFLINE_HINT = dl.offline_hint(dl.DATASETS["wikitext-2"])


def assert_files(out: Path, splits: dict[str, bytes]) -> None:
    assert sorted(p.name for p in out.iterdir()) == sorted(splits)
    for name, data in splits.items():
        assert (out / name).read_bytes() == data, name


def assert_no_leftovers(out: Path) -> None:
    assert [p.name for p in out.parent.iterdir()] == ([out.name] if out.exists() else [])


# Library: the good paths.

def test_zip_url_gives_the_original_bytes(server: Server, splits: dict[str, bytes], good_zip: bytes,
                                          tmp_path: Path) -> None:
    url = server.serve("/wikitext-2-v1.zip", Reply(body=good_zip))
    out = tmp_path / "raw" / "wikitext-2"
    assert dl.download(DataConfig(urls=(url,), checksum=sha1(good_zip)), out, retry=FAST) == url
    assert_files(out, splits)
    assert_no_leftovers(out)


def test_sha256_checksum_is_accepted(server: Server, splits: dict[str, bytes], good_zip: bytes,
                                     tmp_path: Path) -> None:
    url = server.serve("/w.zip", Reply(body=good_zip))
    checksum = "sha256:" + hashlib.sha256(good_zip).hexdigest()
    dl.download(DataConfig(urls=(url,), checksum=checksum), tmp_path / "out", retry=FAST)
    assert_files(tmp_path / "out", splits)


def test_next_mirror_is_tried_when_the_first_fails(server: Server, splits: dict[str, bytes], good_zip: bytes,
                                                   tmp_path: Path) -> None:
    urls = (server.url("/missing.zip"), server.serve("/mirror.zip", Reply(body=good_zip)))
    assert dl.download(DataConfig(urls=urls, checksum=sha1(good_zip)), tmp_path / "out", retry=FAST) == urls[1]
    assert_files(tmp_path / "out", splits)
    assert_no_leftovers(tmp_path / "out")


@pytest.mark.parametrize("status", [500, 503, 429])
def test_transient_errors_are_retried_with_exponential_backoff(
        server: Server, splits: dict[str, bytes], good_zip: bytes, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, status: int) -> None:
    url = server.serve("/flaky.zip", Reply(status), Reply(status), Reply(body=good_zip))
    with caplog.at_level("WARNING", logger="bertpipe.data.download"):
        dl.download(DataConfig(urls=(url,), checksum=sha1(good_zip)), tmp_path / "out", retry=FAST)
    assert server.hits["/flaky.zip"] == 3
    reason = BaseHTTPRequestHandler.responses[status][0]
    assert [m for m in caplog.messages if "retrying" in m] == [
        f"{url}: HTTP {status} {reason}; retrying in {delay} s" for delay in (0.01, 0.02)]
    assert_files(tmp_path / "out", splits)


def test_parquet_folder_is_rebuilt_byte_identical(server: Server, splits: dict[str, bytes], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with_records(monkeypatch, stand_in_records(splits))
    rows = pq.read_table(io.BytesIO(make_parquet(splits["wiki.valid.tokens"])))["text"].to_pylist()
    assert rows.count("") == splits["wiki.valid.tokens"].split(b"\n").count(b" ") > 0  # blank lines stored as ''
    url = serve_parquet(server, splits)
    assert dl.download(DataConfig(urls=(url,)), tmp_path / "out", retry=FAST) == url
    assert_files(tmp_path / "out", splits)
    assert_no_leftovers(tmp_path / "out")


def test_real_records_describe_the_shared_files() -> None:
    for name in ("wiki.valid.tokens", "wiki.test.tokens"):
        assert record((SHARED / name).read_bytes()) == dl.DATASETS["wikitext-2"].records[name]


def test_local_zip_source(splits: dict[str, bytes], good_zip: bytes, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "wikitext-2-v1.zip").write_bytes(good_zip)
    monkeypatch.chdir(tmp_path)
    dl.download(DataConfig(source="wikitext-2-v1.zip", checksum=sha1(good_zip)), "data/raw", retry=FAST)
    assert_files(tmp_path / "data" / "raw", splits)


def test_local_folder_source(splits: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, data in splits.items():
        (tmp_path / "local" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "local" / name).write_bytes(data)
    monkeypatch.chdir(tmp_path)
    dl.download(DataConfig(source="local"), "data/raw")
    assert_files(tmp_path / "data" / "raw", splits)


# Library: every failure is one line, leaves nothing behind and keeps an earlier good download.

@dataclass
class Ctx:
    server: Server
    splits: dict[str, bytes]
    good_zip: bytes
    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch

    def zip_url(self, body: bytes, reply: Reply | None = None) -> DataConfig:
        """A config with one .zip URL serving `body` (or `reply`) whose checksum matches `body`."""
        return DataConfig(urls=(self.server.serve("/bad.zip", reply or Reply(body=body)),), checksum=sha1(body))

    def hf_url(self, **wrong: dl.SplitRecord) -> DataConfig:
        """A config with one parquet folder URL; `wrong` replaces records, e.g. valid=SplitRecord(...)."""
        records = stand_in_records(self.splits) | {f"wiki.{k}.tokens": v for k, v in wrong.items()}
        with_records(self.monkeypatch, records)
        return DataConfig(urls=(serve_parquet(self.server, self.splits),))

    def local(self, source: str, checksum: str = "") -> DataConfig:
        self.monkeypatch.chdir(self.tmp_path)
        return DataConfig(source=source, checksum=checksum)


def _damaged(data: bytes) -> bytes:
    middle = len(data) // 3
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:]


def _folder_without_test(ctx: Ctx) -> DataConfig:
    for name in ("wiki.train.tokens", "wiki.valid.tokens"):
        (ctx.tmp_path / "local" / name).parent.mkdir(exist_ok=True)
        (ctx.tmp_path / "local" / name).write_bytes(ctx.splits[name])
    return ctx.local("local")


def _local_zip(ctx: Ctx, checksum: str) -> DataConfig:
    (ctx.tmp_path / "w.zip").write_bytes(ctx.good_zip)
    return ctx.local("w.zip", checksum)


def _junk_parquet(ctx: Ctx) -> DataConfig:
    ctx.server.serve("/junk/train-00000-of-00001.parquet", Reply(body=b"not parquet"))
    return DataConfig(urls=(ctx.server.url("/junk/"),))


def _parquet_without_test(ctx: Ctx) -> DataConfig:
    """Train and valid arrive and are verified before the test split's 404, and must not be kept."""
    cfg = ctx.hf_url()
    del ctx.server.routes["/hf/test-00000-of-00001.parquet"]
    return cfg


def _two_bad_mirrors(ctx: Ctx) -> DataConfig:
    urls = (ctx.server.url("/gone.zip"), ctx.server.serve("/other.zip", Reply(body=ctx.good_zip)))
    return DataConfig(urls=urls, checksum=sha1(b"other"))


BAD_CASES: dict[str, tuple[Callable[[Ctx], DataConfig], tuple[str, ...]]] = {
    "checksum": (lambda c: DataConfig(urls=(c.server.serve("/w.zip", Reply(body=c.good_zip)),),
                                      checksum=sha1(b"other")),
                 ("checksum mismatch", "expected " + sha1(b"other"), "got sha1:")),
    "truncated": (lambda c: c.zip_url(c.good_zip, Reply(body=c.good_zip[:5000], length=len(c.good_zip))),
                  ("truncated", "received 5000 of", "after 3 tries")),
    "http-404": (lambda c: DataConfig(urls=(c.server.url("/nothing.zip"),), checksum=sha1(b"")),
                 ("/nothing.zip failed: HTTP 404 Not Found", "set data.source")),
    "http-500": (lambda c: c.zip_url(c.good_zip, Reply(500)), ("HTTP 500", "after 3 tries")),
    "dotdot-entry": (lambda c: c.zip_url(make_zip(canonical(c.splits) | {"../evil": b"x"})),
                     ("'../evil'", "outside the output folder")),
    "absolute-entry": (lambda c: c.zip_url(make_zip(canonical(c.splits) | {"/tmp/evil": b"x"})),
                       ("'/tmp/evil'", "outside the output folder")),
    "symlink-entry": (lambda c: c.zip_url(make_zip(canonical(c.splits), symlinks=("wikitext-2/link",))),
                      ("symlink", "'wikitext-2/link'")),
    "damaged-zip": (lambda c: c.zip_url(_damaged(c.good_zip)), ("not a valid zip archive",)),
    "cut-zip": (lambda c: c.zip_url(c.good_zip[: len(c.good_zip) // 2]), ("not a valid zip archive",)),
    "missing-member": (lambda c: c.zip_url(make_zip({"wikitext-2/wiki.train.tokens": b"x\n"})),
                       ("holds no folder with wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens",)),
    "parquet-sha256": (lambda c: c.hf_url(valid=replace(stand_in_records(c.splits)["wiki.valid.tokens"],
                                                        sha256="0" * 64)),
                       ("wiki.valid.tokens rebuilt from parquet differs", f"sha256 expected {'0' * 64}, got")),
    "parquet-train-lines": (lambda c: c.hf_url(train=dl.SplitRecord(lines=1, size=len(c.splits["wiki.train.tokens"]))),
                            ("wiki.train.tokens", "lines expected 1, got 3760")),
    "parquet-not-parquet": (_junk_parquet, ("train-00000-of-00001.parquet is not a readable parquet file",)),
    "parquet-missing-test": (_parquet_without_test, ("/hf/ failed: test-00000-of-00001.parquet: HTTP 404 Not Found",)),
    "two-mirrors": (_two_bad_mirrors, ("all 2 download URLs failed", "/gone.zip: HTTP 404",
                                       "/other.zip: checksum mismatch", "set data.source")),
    "folder-missing-test": (_folder_without_test, ("/local has no wiki.test.tokens",
                                                   "found: wiki.train.tokens, wiki.valid.tokens")),
    "local-zip-checksum": (lambda c: _local_zip(c, sha1(b"other")), ("checksum mismatch for ", "/w.zip: expected")),
    "local-missing": (lambda c: c.local("nowhere.zip"), ("/nowhere.zip does not exist",
                                                         "a relative path starts at the repository")),
}


@pytest.mark.parametrize("earlier", [True, False], ids=["over-good", "fresh"])
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_failure_is_one_line_and_leaves_no_trace(case: str, earlier: bool, server: Server, splits: dict[str, bytes],
                                                 good_zip: bytes, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "raw" / "wikitext-2"
    if earlier:
        url = server.serve("/good.zip", Reply(body=good_zip))
        dl.download(DataConfig(urls=(url,), checksum=sha1(good_zip)), out, retry=FAST)
    build, words = BAD_CASES[case]
    with pytest.raises(DataError) as info:
        dl.download(build(Ctx(server, splits, good_zip, tmp_path, monkeypatch)), out, retry=FAST)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    if earlier:
        assert_files(out, splits)
    assert_no_leftovers(out)


def test_4xx_is_not_retried_and_5xx_is_until_tries_run_out(server: Server, tmp_path: Path) -> None:
    urls = (server.url("/a.zip"), server.serve("/b.zip", Reply(502)))
    with pytest.raises(DataError):
        dl.download(DataConfig(urls=urls, checksum=sha1(b"")), tmp_path / "out", retry=FAST)
    assert server.hits == {"/a.zip": 1, "/b.zip": 3}


def test_bad_urls_and_checksums_are_config_errors(server: Server, good_zip: bytes, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.urls = 'http://x/file\.tar\.gz'"):
        dl.download(DataConfig(urls=(server.url("/w.zip"), "http://x/file.tar.gz")), tmp_path / "download" / "out")
    with pytest.raises(ConfigError, match=r"data\.checksum = 'md5:0' is not allowed"):
        load_params_from(tmp_path / "params", "data:\n  checksum: md5:0\n")
    assert server.hits == {}  # refused before any download
    assert not (tmp_path / "download").exists()


def load_params_from(folder: Path, text: str) -> object:
    folder.mkdir()
    (folder / "params.yaml").write_text(text)
    return load_params(folder / "params.yaml")


# The stage: a thin click command over `download`.

def write_params(folder: Path, urls: list[str], checksum: str) -> None:
    items = "".join(f"\n    - {url}" for url in urls)
    (folder / "params.yaml").write_text(f"data:\n  source: ''\n  urls:{items}\n  checksum: {checksum}\n")


def load_stage() -> Callable[..., object]:
    spec = importlib.util.spec_from_file_location("stage_download", REPO / "stages" / "download.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_stage_downloads_into_out_dir(server: Server, splits: dict[str, bytes], good_zip: bytes, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    write_params(tmp_path, [server.serve("/w.zip", Reply(body=good_zip))], sha1(good_zip))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(load_stage(), ["data/raw"])
    assert result.exit_code == 0, result.output
    assert_files(tmp_path / "data" / "raw", splits)


def test_stage_failure_is_one_error_line_and_exit_1(server: Server, tmp_path: Path) -> None:
    write_params(tmp_path, [server.url("/nothing.zip")], sha1(b""))
    env = os.environ | {"PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "stages" / "download.py"), "out"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: download from {server.url('/nothing.zip')} failed: HTTP 404 Not Found; "
                      f"{OFFLINE_HINT}"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_offline_error_is_one_readable_line_ending_with_the_way_out(tmp_path: Path) -> None:
    """Every mirror unreachable (a port nothing listens on, a name that never resolves): the error names
    each source briefly and ends with data.source, the fix that needs no network."""
    urls = ("http://127.0.0.1:9/wikitext-2-v1.zip", "http://wikitext.invalid/wikitext-2-v1.zip",
            "http://127.0.0.1:9/hf/wikitext-2-v1/")
    with pytest.raises(DataError) as caught:
        dl.download(DataConfig(urls=urls, checksum=sha1(b"")), tmp_path / "out", retry=FAST)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 450, message  # the default mirrors (distinct hosts): ~380
    assert message.startswith("all 3 download URLs failed (127.0.0.1:9/wikitext-2-v1.zip: network error: Connection ")
    assert "wikitext.invalid/wikitext-2-v1.zip: network error: " in message
    assert "127.0.0.1:9/.../wikitext-2-v1/: train-00000-of-00001.parquet: network" in message
    assert message.endswith(OFFLINE_HINT) and "data.source" in OFFLINE_HINT


# WikiText-103: the same routes, its own folder name, checksum and parquet shards.

def test_wikitext_103_comes_from_its_own_mirrors_with_its_own_checksum(
        server: Server, splits: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`data.dataset: wikitext-103` with empty urls and checksum takes the dataset's (pointed at the test
    server here): its archive's folder is `wikitext-103/`, verified by sha256."""
    archive = make_zip({f"wikitext-103/{name}": data for name, data in splits.items()})
    url = server.serve("/wikitext-103-v1.zip", Reply(body=archive))
    checksum = "sha256:" + hashlib.sha256(archive).hexdigest()
    monkeypatch.setitem(dl.DATASETS, "wikitext-103", replace(dl.DATASETS["wikitext-103"], urls=(url,),
                                                             checksum=checksum))
    assert dl.download(DataConfig(dataset="wikitext-103"), tmp_path / "out", retry=FAST) == url
    assert_files(tmp_path / "out", splits)
    with pytest.raises(DataError, match="checksum mismatch"):  # WikiText-2's archive is not WikiText-103's
        dl.download(DataConfig(dataset="wikitext-103", urls=(server.serve("/2.zip", Reply(body=make_zip(
            canonical(splits)))),)), tmp_path / "out2", retry=FAST)


def test_wikitext_103_parquet_joins_the_two_train_shards(server: Server, splits: dict[str, bytes], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with_records(monkeypatch, stand_in_records(splits), "wikitext-103")
    url = serve_parquet(server, splits, "/hf103/", "wikitext-103")
    assert server.routes.keys() >= {"/hf103/train-00000-of-00002.parquet", "/hf103/train-00001-of-00002.parquet"}
    assert dl.download(DataConfig(dataset="wikitext-103", urls=(url,)), tmp_path / "out", retry=FAST) == url
    assert_files(tmp_path / "out", splits)


def test_the_recorded_mirrors_and_checksums() -> None:
    """WikiText-103's sha256 as Hugging Face's former loading script recorded it; its line counts torchtext's."""
    wt103 = dl.DATASETS["wikitext-103"]
    assert wt103.checksum == "sha256:242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590"
    assert [url.rsplit("/", 2)[-2:] for url in wt103.urls] == [
        ["wikitext.smerity.com", "wikitext-103-v1.zip"], ["wikitext", "wikitext-103-v1.zip"], ["wikitext-103-v1", ""]]
    assert [r.lines for r in wt103.records.values()] == [1_801_350, 3_760, 4_358]
    assert dl.DATASETS["wikitext-2"].checksum == "sha1:3c914d17d80b1459be871a5039ac23e752a53cbe"  # d2l's
