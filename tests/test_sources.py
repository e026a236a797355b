"""Scans of the project's own sources (bertpipe/, stages/, bench/, every subfolder): nothing read from disk
or the network is unpickled, and no command goes through a shell."""

from __future__ import annotations

import ast

from conftest import REPO

SOURCES = sorted(path for folder in ("bertpipe", "stages", "bench") for path in (REPO / folder).rglob("*.py"))


def calls(name: str) -> list[tuple[str, ast.Call]]:
    """Every call of `name` (as written, e.g. `torch.load`) in the package and the stages."""
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                found.append((path.name, node))
    return found


def keyword(call: ast.Call, name: str) -> str | None:
    return next((ast.unparse(k.value) for k in call.keywords if k.arg == name), None)


def test_every_torch_load_is_weights_only() -> None:
    """Unpickling a checkpoint can run code: every torch.load must refuse that."""
    loads = calls("torch.load")
    assert loads, "expected the checkpoint module's torch.load calls"
    assert all(keyword(call, "weights_only") == "True" for _, call in loads), [f for f, _ in loads]


def test_nothing_is_unpickled() -> None:
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                modules += [alias.name for alias in node.names]
                assert not {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"} & {
                    m.split(".")[0] for m in modules}, f"{path.name} imports {modules}"
                if isinstance(node, ast.ImportFrom) and node.module in ("torch", "numpy"):
                    assert "load" not in {alias.name for alias in node.names}, f"{path.name} imports load bare"
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                assert not func.endswith(("read_pickle", "pickle.load", "pickle.loads")), f"{path.name}: {func}"
                assert keyword(node, "allow_pickle") in (None, "False"), f"{path.name}: {ast.unparse(node)}"
    for _, call in calls("np.load") + calls("numpy.load"):
        assert keyword(call, "allow_pickle") == "False", ast.unparse(call)


def test_no_shell_strings() -> None:
    for name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
        assert not calls(name), name
    names = ("run", "Popen", "call", "check_call", "check_output")
    launched = [found for name in names for found in calls(f"subprocess.{name}")]
    for file, call in launched:
        assert keyword(call, "shell") in (None, "False"), f"{file}: {ast.unparse(call)}"
        assert isinstance(call.args[0], ast.List | ast.Tuple | ast.Name), f"{file}: a command string"



def test_the_scan_reaches_every_source() -> None:
    assert {path.parent.name for path in SOURCES} >= {"bertpipe", "stages", "bench"}
    assert any(path.name == "checkpoint.py" for path in SOURCES) and len(SOURCES) > 30
