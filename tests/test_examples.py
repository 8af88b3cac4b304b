"""The README's examples run as documented."""

import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(240)


def test_ring_demo():
    r = subprocess.run([sys.executable, "examples/ring_demo.py", "--producers", "2", "--payloads", "50"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "consumed 100 payloads exactly once" in r.stdout and "'FREE': 16" in r.stdout


def test_trainer_loop_example():
    pytest.importorskip("torch")
    r = subprocess.run([sys.executable, "examples/trainer_loop.py", "--steps", "4", "--batch", "4"],
                       capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "done: 4 steps, 0 failed fetches" in r.stdout and "'FREE': 64" in r.stdout


ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _section(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(name)
    end = text.find("\n## ", start + len(name))
    return text[start:end if end > 0 else None]


def test_readme_tour_runs_as_written(tmp_path):
    """Every block of the tour, in order: the bash block's `serve` line is started as written
    (ring renamed so parallel runs do not collide), then the python blocks run in one namespace."""
    tour = _section("## Five-minute tour")
    ring = f"tour-{uuid.uuid4().hex[:8]}"
    [bash] = _blocks(tour, "bash")
    [line] = [ln for ln in bash.splitlines() if ln.startswith("ucxx-transport serve")]
    args = shlex.split(line.replace("rollouts", ring).rstrip("& "))
    server = subprocess.Popen([sys.executable, "-m", "ucxx_transport", *args[1:]], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(server.stdout.readline())
        assert info["ring"] == ring and info["host"] == "127.0.0.1" and len(info["ports"]) == 2
        namespace: dict = {}
        pythons = _blocks(tour, "python")
        assert len(pythons) >= 3
        for i, code in enumerate(pythons):
            exec(compile(code.replace('"rollouts"', repr(ring)), f"README.md#tour-{i}", "exec"), namespace)
        ns = namespace
        assert ns["payload"]["tokens"].size == 300 and ns["payload"].meta == {"turns": 3}
        assert [r.payload["tokens"].size for r in ns["results"]] == [16, 32] and len(ns["batch"]) == 1
        assert ns["steps"] == [0, 1, 2] and len(ns["many"]) == 3
        assert ns["ring"].ready_count() == 0
        for name in ("payload", "results", "batch", "one", "many", "tokens", "lease"):
            ns.pop(name, None)
        ns["ring"].close()
    finally:
        server.terminate()
        assert server.wait(20) == 0
    assert not os.path.exists(f"/dev/shm/{ring}")  # --unlink-on-exit, as the tour says


def test_readme_payload_section_runs_as_written():
    numpy_block, torch_block = _blocks(_section("## What a payload can hold"), "python")
    exec(compile(numpy_block, "README.md#what-a-payload-can-hold", "exec"), {})
    pytest.importorskip("torch", reason="the torch example needs torch")
    ns: dict = {}
    exec(compile(torch_block, "README.md#what-a-payload-can-hold-torch", "exec"), ns)
    assert ns["owned"]["turns"][1].tolist() == list(range(5))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_command_line_parses(doc):
    """Each `ucxx-transport ...` line in a bash block of README.md and docs/ is a valid command
    (subcommand, flags and their values as the CLI's own parser reads them)."""
    from ucxx_transport.cli import build_parser

    for block in _blocks(doc.read_text(), "bash"):
        for line in block.replace("\\\n", " ").splitlines():  # continuation lines joined
            if not line.startswith("ucxx-transport "):
                continue
            argv = shlex.split(line.split(" #")[0].split(" &&")[0].rstrip("& "))[1:]
            try:
                build_parser().parse_args(argv)
            except SystemExit as exc:
                pytest.fail(f"{doc.name}: {line!r} does not parse (exit {exc.code})")


def _deployment_blocks() -> list[str]:
    return _blocks((ROOT / "docs" / "DEPLOYMENT.md").read_text(), "python")


def test_deployment_fanin_snippet_runs_as_written(tmp_path, make_ring, ring_name):
    """docs/DEPLOYMENT.md's FanIn block against a real server registered in a directory file
    (the file path and the token are this test's)."""
    import numpy as np

    [fanin_block] = [b for b in _deployment_blocks() if "StaticDirectory" in b]
    ring = make_ring(slots=96, slot_bytes=1 << 14)
    for i in range(80):
        ring.put({"i": np.int64(i)})
    token_file = tmp_path / "token"
    token_file.write_text("s3cret")
    token_file.chmod(0o600)
    dfile = tmp_path / "dir.json"
    server = subprocess.Popen([sys.executable, "-m", "ucxx_transport", "serve", "--ring", ring_name,
                               "--host", "127.0.0.1", "--token-file", str(token_file), "--directory-file", str(dfile)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert json.loads(server.stdout.readline())["ring"] == ring_name
        ns = {"TOKEN": "s3cret"}
        exec(compile(fanin_block.replace("/shared/ucxx-directory.json", str(dfile)), "DEPLOYMENT.md#fanin", "exec"),
             ns)
        assert 1 <= len(ns["batch"]) <= 64 and "i" in ns["payload"]
        del ns
    finally:
        server.terminate()
        assert server.wait(20) == 0


def test_deployment_ray_snippet_runs_as_written():
    """docs/DEPLOYMENT.md's Ray block in a fresh process (ray.init() made to dial nowhere, as
    its comment says for a laptop); skipped without Ray."""
    pytest.importorskip("ray", reason="the Ray extra is not installed (pip install 'ucxx-transport[ray]')")
    [ray_block] = [b for b in _deployment_blocks() if "start_node_servers" in b]
    code = "TOKEN = 's3cret'\n" + ray_block.replace("ray.init()", "ray_cluster.init_local()")
    code = code.replace('ring="rollouts"', f'ring="docs-{uuid.uuid4().hex[:6]}"') + "\nprint('ok')\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
