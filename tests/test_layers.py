"""Layers point one way: shm <- ucxx_transport <- clients <- benchmarks; only the CLI
(ucxx_transport/cli.py, the composition root) may reach up to wire them together."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ORDER = ["shm", "ucxx_transport", "clients", "benchmarks"]
COMPOSITION_ROOTS = {"ucxx_transport/cli.py"}


def _imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("package", ORDER)
def test_no_lower_layer_imports_a_higher_one(package):
    higher = set(ORDER[ORDER.index(package) + 1:])
    bad = []
    for path in sorted((ROOT / package).glob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel in COMPOSITION_ROOTS:
            continue
        bad += [f"{rel} imports {m}" for m in _imports(path) if m in higher]
    assert not bad, bad
