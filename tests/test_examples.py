"""The README's examples run as documented."""

import subprocess
import sys

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


def test_readme_payload_section_runs_as_written():
    import re
    from pathlib import Path

    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    section = text[text.index("## What a payload can hold"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md#what-a-payload-can-hold", "exec"), {})
