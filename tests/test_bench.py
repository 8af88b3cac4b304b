"""Smoke test of `ucxx-transport bench --quick` with tiny sizes (not a performance assertion)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(240)


def test_bench_quick_json_schema(tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "-m", "ucxx_transport", "bench", "--quick", "--sizes", "4KiB,16KiB",
                        "--duration", "0.3s", "--warmup", "0.1s", "--mode", "get,take,local", "--json", str(out)],
                       capture_output=True, text=True, timeout=200)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert {"machine", "config", "results", "ratios", "date", "command"} <= rep.keys()
    systems = {row["system"] for row in rep["results"]}
    assert {"ours-get", "ours-take", "ours-local", "raw-ucxx", "memcpy"} <= systems
    for row in rep["results"]:
        for k in ("size", "payloads_per_s", "gbps", "lat_p50_us", "lat_p99_us", "lat_p999_us", "cpu_pct", "rss_mb"):
            assert k in row
        assert row["payloads_per_s"] > 0 and row["gbps"] > 0
    assert rep["ratios"] and all(q["ratio"] > 0 for q in rep["ratios"])
    assert "ours-get" in r.stdout and "ratios" in r.stdout


def test_bench_rejects_bad_mode():
    r = subprocess.run([sys.executable, "-m", "ucxx_transport", "bench", "--mode", "teleport"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "teleport" in r.stderr
