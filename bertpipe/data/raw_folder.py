"""The download stage's folder (`data/raw`), the prepare stage's input: which file holds which split.

Two layouts, both written by `bertpipe.data.download`:

- `wikitext`: WikiText's own `wiki.{train,valid,test}.tokens`, byte for byte as its archive holds them;
- `documents`: your own text as `bertpipe.data.ingest` rewrites it, `{train,valid,test}.txt` (documents
  separated by a blank line, a paragraph per line), with `ingest.json` beside them: what ingestion
  changed in each split (byte-order marks dropped, long lines cut), which the prepare stage adds to
  `metrics/prepare.json`.

The prepare stage reads train and valid; test is kept for the user and read by no stage.
"""

from __future__ import annotations

from pathlib import Path

from bertpipe.atomic import read_json, write_json
from bertpipe.errors import DataError

SPLITS = ("train", "valid", "test")
LAYOUTS = {"wikitext": {split: f"wiki.{split}.tokens" for split in SPLITS},
           "documents": {split: f"{split}.txt" for split in SPLITS}}
WIKITEXT_FILES = tuple(LAYOUTS["wikitext"].values())
INGEST_REPORT = "ingest.json"
READ = ("train", "valid")


def documents_file(folder: Path, split: str) -> Path:
    """Where `bertpipe.data.ingest` writes `split` of your own text."""
    return folder / LAYOUTS["documents"][split]


def write_ingest_report(folder: Path, report: dict[str, dict[str, int]]) -> None:
    """What ingestion changed, per split (`bertpipe.data.ingest.SplitText.report`)."""
    write_json(folder / INGEST_REPORT, report)


def read_ingest_report(raw_dir: Path) -> dict[str, dict[str, int]]:
    """`ingest.json`'s counts per split; {} for WikiText's layout, which has none."""
    path = raw_dir / INGEST_REPORT
    return read_json(path, "download") if path.is_file() else {}


def split_files(raw_dir: Path) -> tuple[str, dict[str, Path]]:
    """The folder's layout and its train and valid files.

    Raises:
        DataError: neither layout is whole (the download stage did not finish, or the folder is another's).
    """
    for layout, names in LAYOUTS.items():
        files = {split: raw_dir / names[split] for split in READ}
        missing = [path for path in files.values() if not path.is_file()]
        if not missing:
            return layout, files
        if len(missing) < len(files):
            raise DataError(f"{missing[0]} is missing; the download stage should have written it")
    expected = " or ".join(", ".join(names[split] for split in READ) for names in LAYOUTS.values())
    raise DataError(f"{raw_dir} lacks the split files ({expected}); the download stage should have written them")
