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


def test_private_ucxx_names_only_in_the_compat_module():
    """ucxx's private modules and attributes are used in ucxx_transport/ucxx_compat.py only
    (one place to update, behind a version check)."""
    import re

    private = re.compile(r"ucxx\._(?!_)|from ucxx\._|\._ep\b|\._ctx\b|\._tags\b|core\._get_ctx|core\._ctx")
    bad = []
    for package in ORDER:
        for path in sorted((ROOT / package).glob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel == "ucxx_transport/ucxx_compat.py":
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#")[0]
                if private.search(code) and not code.strip().startswith(("\"", "'", "``")):
                    bad.append(f"{rel}:{i}: {line.strip()}")
    assert not bad, "private ucxx access outside ucxx_compat:\n" + "\n".join(bad)


def test_the_installed_ucxx_is_a_tested_release():
    ucxx = pytest.importorskip("ucxx")
    from ucxx_transport import ucxx_compat

    assert ucxx_compat.version_tuple(ucxx.__version__) in ucxx_compat.TESTED
    assert ucxx_compat.version_tuple("0.52.00") == (0, 52)
    assert ucxx_compat.names().Array is not None
