"""The original archive: verified by its checksum before a single entry is read, then its split files
copied out, every entry that could escape the output folder refused first (zip-slip)."""

from __future__ import annotations

import hashlib
import logging
import shutil
import stat
import zipfile
import zlib
from pathlib import Path

from bertpipe.data.raw_folder import WIKITEXT_FILES
from bertpipe.errors import DataError, one_line
from bertpipe.fetch import CHUNK

log = logging.getLogger(__name__)


def verify_checksum(path: Path, checksum: str, label: str) -> None:
    """Compare the archive with `checksum` (`sha1:<hex>` or `sha256:<hex>`, as `DataConfig` checks it)
    before a single entry is read from it."""
    algorithm, _, expected = checksum.partition(":")
    with open(path, "rb") as f:
        actual = hashlib.file_digest(f, algorithm).hexdigest()
    if actual != expected.lower():
        raise DataError(f"checksum mismatch for {label}: expected {algorithm}:{expected}, got {algorithm}:{actual}")
    log.info("Verified %s (%s)", label, checksum)


def extract(archive: Path, dest: Path, label: str) -> None:
    """Copy the three split files out of the zip after refusing every entry that could escape `dest`."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                check_entry(info, dest, label)
            members = _split_members(zf.namelist(), label)
            for name, member in members.items():
                with zf.open(member) as src, open(dest / name, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise DataError(f"{label} is not a valid zip archive: {one_line(err)}") from None


def _split_members(names: list[str], label: str) -> dict[str, str]:
    """The archive's one folder holding the three split files (`wikitext-2/`, `wikitext-103/`)."""
    folders = {name.rpartition("/")[0] for name in names if name.rpartition("/")[2] in WIKITEXT_FILES}
    complete = sorted(f for f in folders if all(f"{f}/{split}" in names for split in WIKITEXT_FILES))
    if len(complete) != 1:
        raise DataError(f"{label} holds {'no' if not complete else 'more than one'} folder with "
                        f"{', '.join(WIKITEXT_FILES)}")
    return {split: f"{complete[0]}/{split}" for split in WIKITEXT_FILES}


def check_entry(info: zipfile.ZipInfo, dest: Path, label: str) -> None:
    """Refuse absolute, `..`, drive-letter and symlink entries, even ones we would not extract (zip-slip)."""
    name = info.filename.replace("\\", "/")
    root = dest.resolve()
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DataError(f"{label} has a symlink entry {info.filename!r}, which could point outside the output folder")
    if ":" in name or not (root / name).resolve().is_relative_to(root):
        raise DataError(f"{label} has an entry {info.filename!r} that would land outside the output folder")
