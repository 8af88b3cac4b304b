"""`ucxx-transport status --watch`: a live view of a real ring and a real server, refreshed
--count times (plain blocks when stdout is not a terminal), ended cleanly by Ctrl-C."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from ucxx_transport import status

pytestmark = pytest.mark.timeout(120)

HEADER = "ucxx-transport status --watch"
RATES = re.compile(r"payloads/s: in (\d+\.\d) {2}out (\d+\.\d)")


def watch(*args):
    env = {k: v for k, v in os.environ.items() if k != "UCXX_TRANSPORT_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-m", "ucxx_transport", "status", *args], capture_output=True,
                          text=True, timeout=90, env=env)


class Churn:
    """A thread that keeps publishing and consuming payloads (through ``consume``) while a test runs."""

    def __init__(self, ring, consume):
        self.ring, self.consume, self.n = ring, consume, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            ref = self.ring.put({"x": np.arange(100)})
            self.consume(ref)
            self.n += 1
            time.sleep(0.002)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)


def test_watch_ring_two_refreshes_with_rates(make_ring, ring_name):
    ring = make_ring()
    with Churn(ring, lambda ref: ring.claim(timeout=5).ack()):
        r = watch("--ring", ring_name, "--watch", "0.4", "--count", "2")
        rj = watch("--ring", ring_name, "--watch", "0.4", "--count", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert status.CLEAR not in r.stdout  # not a terminal: plain blocks, no screen clears
    blocks = r.stdout.strip().split("\n\n")
    assert len(blocks) == 2 and all(b.startswith(HEADER) for b in blocks), r.stdout
    assert "slots: FREE=" in blocks[0] and "rates from the next refresh" in blocks[0]
    rin, rout = map(float, RATES.search(blocks[1]).groups())
    assert rin > 0 and rout > 0, blocks[1]
    assert f"ring {ring_name} (8 slots x 64KiB, on_full=block)" in blocks[1]
    assert rj.returncode == 0, rj.stderr
    views = [json.loads(line) for line in rj.stdout.splitlines()]
    assert len(views) == 2 and views[0]["payloads_in_per_s"] is None
    assert views[1]["payloads_in_per_s"] > 0 and views[1]["payloads_out_per_s"] > 0
    assert set(views[1]["states"]) >= {"FREE", "READY", "READING"}


def test_watch_server_shows_rates_latency_and_clients(make_ring, ring_name, serve):
    from clients import TransportClient

    ring = make_ring()
    srv = serve(ring_name, "--n-ports", "1")
    with TransportClient(local_fast_path=False) as c:
        with Churn(ring, lambda ref: c.fetch(ref).release()) as churn:
            while churn.n < 5:  # the view is asked for while payloads flow
                time.sleep(0.05)
            r = watch("--address", f"127.0.0.1:{srv.ports[0]}", "--watch", "0.5", "--count", "2")
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.strip().split("\n\n")
    assert len(blocks) == 2, r.stdout
    last = blocks[1]
    rin, rout = map(float, RATES.search(last).groups())
    assert rin > 0 and rout > 0, last
    assert re.search(r"ACK latency \(claim to ACK\): p50 \d+\.\d+ ms {2}p99 \d+\.\d+ ms", last), last
    assert re.search(r"bytes out/s: \d+(\.\d+)? [kMG]?B/s", last), last
    assert re.search(r"clients: [1-9]\d* connected endpoint", last), last


def test_watch_stops_on_ctrl_c_with_exit_0(make_ring, ring_name):
    make_ring()
    p = subprocess.Popen([sys.executable, "-m", "ucxx_transport", "status", "--ring", ring_name, "--watch", "0.2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().startswith(HEADER)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert "Traceback" not in err and "interrupted" not in err


def test_watch_clears_the_screen_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    counters = iter(range(0, 1000, 10))

    def sample():
        n = next(counters)
        return {"ring": "r", "slots": 2, "slot_bytes": 4096, "on_full": "block", "states": {"FREE": 2},
                "published": n, "consumed": n, "drops": 0, "dead_letters": 0, "stuck_slots": [], "server": None}

    out = Tty()
    assert status.watch(sample, 0.01, count=3, out=out) == 0
    assert out.getvalue().count(status.CLEAR) == 3 and out.getvalue().count(HEADER) == 3
