"""Smoke test of `ucxx-transport bench --quick` with tiny sizes (not a performance assertion)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(240)


def test_bench_quick_json_schema(tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "-m", "ucxx_transport", "bench", "--quick", "--sizes", "4KiB,16KiB",
                        "--duration", "0.3s", "--warmup", "0.1s", "--mode", "get,take,local", "--reps", "2",
                        "--json", str(out)],
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
        assert row["reps"] == 2 and row["gbps_min"] <= row["gbps"] <= row["gbps_max"]
    assert rep["ratios"] and all(q["ratio"] > 0 for q in rep["ratios"])
    assert "ours-get" in r.stdout and "ratios" in r.stdout
    labels = [q["label"] for q in rep["ratios"]]
    assert len(labels) == len(set(labels)), labels  # get and local both have a put / memcpy line
    for q in rep["ratios"]:
        assert q["label"] in r.stdout and q["layout"] in r.stdout


def test_bench_rejects_bad_mode():
    r = subprocess.run([sys.executable, "-m", "ucxx_transport", "bench", "--mode", "teleport"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "teleport" in r.stderr


def _row(system, size, pps, gbps, put=None):
    return {"system": system, "size": size, "payloads_per_s": pps, "gbps": gbps, "lat_p50_us": 100.0,
            "lat_p99_us": 300.0, "lat_p999_us": 500.0, "cpu_pct": {"clients": 50.0}, "rss_mb": {"clients": 1.0},
            "put_gbps": put, "reps": 1}


CONFIG = {"sizes": [4096, 1 << 20], "clients": 1, "producers": 1, "ports": 2, "reps": 1, "progress_mode": "adaptive"}
ROWS = [_row(s, size, 1000.0, 1.0, put=2.0 if s.startswith("ours") else None)
        for s in ("ours-get", "ours-local", "raw-ucxx", "zmq", "memcpy") for size in CONFIG["sizes"]]


def test_every_ratio_line_names_systems_size_metric_and_layout_once():
    from benchmarks.end_to_end import _ratios, format_table

    ratios = _ratios(ROWS, CONFIG)
    labels = [q["label"] for q in ratios]
    assert len(labels) == len(set(labels)) == 10, labels  # get: 2 baselines + put; local: memcpy + put
    assert "put (during ours-get) / memcpy at 4KiB, GB/s" in labels
    assert "put (during ours-local) / memcpy at 4KiB, GB/s" in labels
    assert "ours-get / raw-ucxx at 1MiB, payloads/s" in labels
    assert all("client process" in q["layout"] or "producer" in q["layout"] for q in ratios)
    text = format_table({"machine": {}, "config": CONFIG, "results": ROWS, "ratios": ratios})
    assert "payloads per second" not in text  # some lines are GB/s: each names its own metric
    ratio_lines = text.split("ratios at the same size", 1)[1].splitlines()[1:]
    assert len(ratio_lines) == 10 and len({ln.split(":")[0].strip() for ln in ratio_lines}) == 10


def test_plot_axes_in_kib_mib_with_a_latency_panel(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.end_to_end import _combine, _ratios, plot

    rows = [_combine([dict(r, gbps=r["gbps"] * f) for f in (0.5, 1.0, 2.0)]) for r in ROWS]
    cfg = dict(CONFIG, reps=3)
    fig = plot({"machine": {"cpus": 2}, "config": cfg, "results": rows, "ratios": _ratios(rows, cfg)},
               str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").stat().st_size > 0
    thr, lat = fig.axes
    assert [t.get_text() for t in thr.get_xticklabels()] == ["4KiB", "1MiB"]
    assert "min-max" in thr.get_ylabel() and "p99" in lat.get_title()
    assert {ln.get_label() for ln in lat.get_lines()} >= {"ours-get p50", "ours-get p99"}
    assert rows[0]["gbps_min"] == 0.5 and rows[0]["gbps_max"] == 2.0 and rows[0]["gbps"] == 1.0


@pytest.mark.timeout(60)
def test_bench_client_skips_refs_queued_in_an_earlier_phase(make_ring):
    """A producer's last batch of refs can still be in flight when a phase ends and the ring
    is drained; the next phase's client must skip it (its slots are gone), not fetch it."""
    import queue

    import numpy as np

    from benchmarks.end_to_end import _make_op
    from clients import TransportClient

    ring = make_ring(slots=8)
    stale = ring.put({"x": np.full(16, 1, np.uint8)})
    with ring.claim(stale):
        pass  # drained between phases: the slot is FREE, its ref STALE
    live = ring.put({"x": np.full(16, 2, np.uint8)})
    refq = queue.Queue()
    refq.put((1, [stale]))
    refq.put((2, [live]))
    with TransportClient(local_fast_path=True, timeout=5) as client:
        op = _make_op("ours-local", 16, {"client": client}, {}, refq, 2)
        assert op() > 0
    assert refq.empty() and ring.state_counts()["FREE"] == 8


def test_batch_bench_times_pyzmq_in_a_trainer_process_like_ours():
    """The pyzmq baseline's receiver is a process of its own fed through a pipe, as our
    trainer is (the ratios' basis); the receiver-in-the-bench-process figure is shown too."""
    pytest.importorskip("zmq")
    from benchmarks import batch

    report = batch.run([(8, 4096)], reps=1, baselines=("zmq",))
    row = report["rows"][0]
    assert row["zmq_s"] > 0 and row["zmq_main_s"] > 0
    assert row["fetch_many_vs_zmq"] == pytest.approx(row["zmq_s"] / row["fetch_many_s"])
    assert "raw_ucxx_s" not in row
    table = batch.format_table(report)
    assert "receiver busy before" in table and "8 x 4KiB" in table
