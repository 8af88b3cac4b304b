"""Smoke test of `python -m benchmarks.payload_bench` at one small size (not a performance assertion)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(120)
def test_payload_bench_runs_and_prints_ratios():
    r = subprocess.run([sys.executable, "-m", "benchmarks.payload_bench", "--sizes", "64KiB", "--reps", "1",
                        "--seconds", "0.05"],
                       capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "put numpy-f32 GB/s" in out and "read to_torch us" in out and "memcpy GB/s" in out
    assert "ratio put   64KiB: torch-bf16 GB/s / numpy-f32 GB/s = " in out
    assert "ratio read  64KiB: to_torch reads/s / numpy reads/s = numpy us / to_torch us = " in out
