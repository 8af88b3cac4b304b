"""Write docs/API.md from the docstrings of the public names (``__all__``) of
``shm``, ``clients`` and ``ucxx_transport``.

    python docs/gen_api.py          # rewrite docs/API.md
    python docs/gen_api.py --check  # exit 1 if docs/API.md is out of date (a test runs this)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "API.md"
PACKAGES = {
    "shm": "the shared-memory ring: write, claim, payload frames (no network, no ucxx)",
    "clients": "the trainer side: fetch, batch fetch, take, streams, the data-packer mixin",
    "ucxx_transport": "the server side: the UCX server, configuration knobs (the CLI is `ucxx-transport --help`)",
}


def _doc(obj) -> str:
    """The first paragraph of ``obj``'s docstring, on one line."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _sig(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def _members(cls) -> list[tuple[str, object]]:
    out = []
    for name, member in vars(cls).items():
        if name.startswith("_") and name != "__init__":
            continue
        if isinstance(member, property):
            out.append((name, member))
        elif inspect.isfunction(member) or isinstance(member, (classmethod, staticmethod)):
            out.append((name, getattr(cls, name)))
    return out


def render() -> str:
    sys.path.insert(0, str(ROOT))
    lines = ["# API reference", "",
             "Generated from the docstrings by `python docs/gen_api.py` (a test fails when it is out of date).",
             "One entry per public name (each package's `__all__`); see README.md for a tour.", ""]
    for pkg, what in PACKAGES.items():
        mod = importlib.import_module(pkg)
        lines += [f"## `{pkg}`: {what}", ""]
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if inspect.isclass(obj):
                kind = "exception" if issubclass(obj, BaseException) else "class"
                lines += [f"### `{pkg}.{name}` ({kind})", "", _doc(obj) or "(no docstring)", ""]
                if issubclass(obj, BaseException):
                    continue
                for mname, member in _members(obj):
                    if mname == "__init__" and _doc(member).startswith("Initialize self"):
                        continue  # no docstring of its own: the class's says it
                    if isinstance(member, property):
                        lines.append(f"* `{mname}` (property): {_doc(member)}")
                    else:
                        shown = name if mname == "__init__" else f".{mname}"
                        lines.append(f"* `{shown}{_sig(member)}`: {_doc(member)}")
                lines.append("")
            elif callable(obj):
                lines += [f"### `{pkg}.{name}{_sig(obj)}`", "", _doc(obj) or "(no docstring)", ""]
            else:
                lines += [f"### `{pkg}.{name}` = `{obj!r}`", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/API.md differs from the docstrings")
    a = ap.parse_args(argv)
    text = render()
    if a.check:
        if not OUT.exists() or OUT.read_text() != text:
            sys.stderr.write("docs/API.md is out of date: run python docs/gen_api.py\n")
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
