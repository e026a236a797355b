"""What the docs name exists: every `bertpipe.…` name in a docstring, comment or the READMEs, and every
`bertpipe/…`, `stages/…`, `bench/…` and `tests/…` path they give.

Docstrings go stale when code moves (a model docstring once sent readers to a `train.py` that no
longer existed); this finds them when they do.
"""

from __future__ import annotations

import importlib
import re

import pytest
from conftest import REPO

from bertpipe.init.folder import EXPORT_RECORD, INIT_TAGS
from bertpipe.tracking.run import ENDED_TAG, PROCESS_TAGS, REFUSED_TAG

TEXTS = sorted([*(p for folder in ("bertpipe", "stages", "bench", "tests") for p in (REPO / folder).rglob("*.py")
                  if p.name != "test_references.py"),
                REPO / "README.md", REPO / "bench" / "README.md", REPO / "dvc.yaml", REPO / "params.yaml"])
NOT_MODULES = {*PROCESS_TAGS, ENDED_TAG, REFUSED_TAG, *INIT_TAGS, EXPORT_RECORD}  # MLflow tag and file names
DOTTED = re.compile(r"(?<![\w/.])bertpipe(?:\.[A-Za-z_]\w*)+")
PATH = re.compile(r"(?<![\w/.-])(?:bertpipe|stages|bench|tests)/[\w./<>{}*-]*\w")


def resolves(dotted: str) -> bool:
    """A module, or an attribute of the longest importable module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            thing = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(thing, name):
                return False
            thing = getattr(thing, name)
        return True
    return False


def references(pattern: re.Pattern) -> list[tuple[str, str]]:
    return [(str(path.relative_to(REPO)), match) for path in TEXTS
            for match in pattern.findall(path.read_text(encoding="utf-8"))]


def test_every_dotted_name_resolves() -> None:
    broken = sorted({(where, name) for where, name in references(DOTTED)
                     if name not in NOT_MODULES and not resolves(name)})
    assert not broken, broken


@pytest.mark.parametrize("kind", ["files", "folders"])
def test_every_path_exists(kind: str) -> None:
    found = {(where, ref) for where, ref in references(PATH) if not any(c in ref for c in "<>{}*")}
    names = {(where, ref) for where, ref in found if (ref.endswith(".py") or ref.endswith(".md")) == (kind == "files")}
    missing = sorted((where, ref) for where, ref in names if not (REPO / ref).exists())
    assert not missing, missing


def test_the_scan_finds_references() -> None:
    assert len(references(DOTTED)) > 50 and len(references(PATH)) > 50
    assert not resolves("bertpipe.train") and resolves("bertpipe.training.loop.train")
