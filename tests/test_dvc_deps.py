"""dvc.yaml's deps cover the code each stage runs, so editing a module reruns the stages that use it.

Every bertpipe module a stage script reaches through its imports (lazy ones inside functions
included, read from the source) must lie under one of the stage's deps: a file, or a package folder.
Package `__init__.py` files hold only a docstring and imports, so they are not required.
"""

from __future__ import annotations

import ast

import pytest
import yaml
from helpers.imports import REPO, reached

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_imports_is_one_of_its_deps(stage: str) -> None:
    deps = [REPO / dep for dep in STAGES[stage]["deps"]]
    script = REPO / STAGES[stage]["cmd"].split()[1]
    assert script in deps
    uncovered = sorted(str(path.relative_to(REPO)) for path in reached(script)
                       if path.name != "__init__.py" and not any(path == dep or dep in path.parents for dep in deps))
    assert not uncovered, f"{stage}: add to its deps in dvc.yaml: {uncovered}"


def test_package_inits_hold_no_code() -> None:
    """What the test above may leave out: a package's `__init__.py` is its docstring, imports and dunders."""
    for path in (REPO / "bertpipe").rglob("__init__.py"):
        body = ast.parse(path.read_text()).body
        code = [node for node in body if not isinstance(node, ast.Import | ast.ImportFrom | ast.Expr)
                and not (isinstance(node, ast.Assign) and all(t.id.startswith("__") for t in node.targets))]
        assert not code, f"{path} holds code"


def test_a_missing_module_is_found() -> None:
    """The check is real: the pretrain stage without bertpipe/model among its deps fails it."""
    deps = [REPO / dep for dep in STAGES["pretrain"]["deps"] if dep != "bertpipe/model"]
    reached_files = reached(REPO / "stages" / "pretrain.py")
    assert REPO / "bertpipe" / "model" / "bert.py" in reached_files
    assert not any(dep in (REPO / "bertpipe" / "model" / "bert.py").parents for dep in deps)
