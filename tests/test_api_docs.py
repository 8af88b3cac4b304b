"""docs/API.md is generated from the docstrings and must match them."""

import pathlib
import subprocess
import sys

import pytest


@pytest.mark.timeout(60)
def test_api_reference_is_up_to_date():
    script = pathlib.Path(__file__).resolve().parent.parent / "docs" / "gen_api.py"
    r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
