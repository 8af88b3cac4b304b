"""Two hosts on one machine: server in one network namespace, trainer in another.

Skipped cleanly where namespaces cannot be created (not root, no iproute2,
no CAP_SYS_ADMIN). Traffic stays on a veth pair between namespaces this test
creates and deletes.
"""

import json
import os
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest

from tests import helpers

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]

SRV_IP, CLI_IP = "10.213.7.1", "10.213.7.2"


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns)")
    tag = uuid.uuid4().hex[:6]
    a, b = f"uxt-srv-{tag}", f"uxt-cli-{tag}"
    va, vb = f"vs{tag}", f"vc{tag}"
    try:
        _ip("netns", "add", a)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create network namespaces here: {exc.stderr.strip()}")
    try:
        _ip("netns", "add", b)
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", a)
        _ip("link", "set", vb, "netns", b)
        for ns, dev, ip in ((a, va, SRV_IP), (b, vb, CLI_IP)):
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        _ip("netns", "del", a, check=False)
        _ip("netns", "del", b, check=False)


def _ns_env() -> dict:
    """The environment for processes inside the namespaces: the repo importable, and no
    UCX device restriction inherited from a loopback-only shell (``UCX_NET_DEVICES=lo``
    would keep UCX off the veth pair these tests route over)."""
    env = {k: v for k, v in os.environ.items() if k != "UCX_NET_DEVICES"}
    env["PYTHONPATH"] = os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")
    return env


CLIENT = r"""
import json, sys
import shm
from clients import TransportClient, StaleSlotError
refs = [shm.SlotRef.from_dict(d) for d in json.loads(sys.argv[1])]
out = {"ok": [], "stale": 0}
with TransportClient(timeout=5) as c:   # local fast path on: the ring's host is not this one
    for r in c.fetch_many(refs):
        if r.ok:
            out["ok"].append([r.payload.meta["i"], r.payload.meta["crc"], __import__("tests.helpers").helpers.checksum(r.payload)])
        elif isinstance(r.error, StaleSlotError):
            out["stale"] += 1
    out["local_fetches"] = c.stats().get("local_fetches", 0)
    out["taken"] = [p.meta["i"] for p in c.take(refs[0], n=10, wait=0.5)]
print(json.dumps(out))
"""


def test_fetch_across_namespaces(two_hosts, make_ring, ring_name):
    ns_srv, ns_cli = two_hosts
    ring = make_ring(slots=16, slot_bytes=1 << 20)
    env = _ns_env()
    srv = subprocess.Popen(["ip", "netns", "exec", ns_srv, sys.executable, "-m", "ucxx_transport", "serve",
                            "--ring", ring_name, "--host", SRV_IP, "--n-ports", "2"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = srv.stdout.readline()
        assert line, srv.stderr.read()[-2000:]
        info = json.loads(line)
        assert info["host"] == SRV_IP
        refs = []
        for i in range(6):
            p = {"x": np.random.default_rng(i).integers(0, 255, 300_000, dtype=np.uint8)}
            refs.append(ring.put(p, meta={"i": i, "crc": helpers.checksum(p)}))
        assert refs[0].host == SRV_IP
        with ring.claim(refs[5]):  # consumed before the trainer asks: STALE over the wire
            pass
        extra = ring.put({"x": np.ones(10, np.uint8)}, meta={"i": 99, "crc": 0})
        del extra
        r = subprocess.run(["ip", "netns", "exec", ns_cli, sys.executable, "-c", CLIENT,
                            json.dumps([x.to_dict() for x in refs])], capture_output=True, text=True,
                           timeout=120, env=env, cwd=os.getcwd())
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["local_fetches"] == 0  # the ring is on another host: network path
        assert sorted(i for i, _, _ in out["ok"]) == [0, 1, 2, 3, 4]
        assert all(crc == got for _, crc, got in out["ok"])
        assert out["stale"] == 1
        assert out["taken"] == [99]
        assert helpers.wait_until(lambda: helpers.all_free(ring)), ring.state_counts()  # ACKs are fire-and-forget
    finally:
        srv.terminate()
        srv.wait(15)


SLOW_CLIENT = r"""
import json, sys, time
import shm
from clients import TransportClient
ref = shm.SlotRef.from_dict(json.loads(sys.argv[1]))
with TransportClient(timeout=1.0, max_attempts=1) as c:   # 1 s: far less than the transfer takes
    t0 = time.monotonic()
    p = c.fetch(ref)
    print(json.dumps({"s": time.monotonic() - t0, "crc": __import__("tests.helpers").helpers.checksum(p)}))
"""


def test_large_payload_over_slow_link_is_slow_not_impossible(two_hosts, make_ring, ring_name):
    """tbf at 40 Mbit/s: a 12 MiB payload takes ~2.5 s, more than the 1 s call timeout; the
    deadline grows with the payload (nbytes / min_rate), so the fetch succeeds."""
    ns_srv, ns_cli = two_hosts
    dev = _ip("-n", ns_srv, "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip().split("@")[0]
    if shutil.which("tc") is None:
        pytest.skip("needs tc (iproute2) for a tbf qdisc")
    tbf = subprocess.run(["tc", "-n", ns_srv, "qdisc", "add", "dev", dev, "root", "tbf", "rate", "40mbit",
                          "burst", "64kb", "latency", "200ms"], capture_output=True, text=True, timeout=30)
    if tbf.returncode:
        pytest.skip(f"tbf qdisc not available: {tbf.stderr.strip()}")
    ring = make_ring(slots=2, slot_bytes=13 << 20)
    env = _ns_env()
    srv = subprocess.Popen(["ip", "netns", "exec", ns_srv, sys.executable, "-m", "ucxx_transport", "serve",
                            "--ring", ring_name, "--host", SRV_IP, "--n-ports", "1"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert srv.stdout.readline(), srv.stderr.read()[-2000:]
        p = {"x": np.random.default_rng(0).integers(0, 255, 12 << 20, dtype=np.uint8)}
        ref = ring.put(p)
        r = subprocess.run(["ip", "netns", "exec", ns_cli, sys.executable, "-c", SLOW_CLIENT,
                            json.dumps(ref.to_dict())], capture_output=True, text=True, timeout=120, env=env,
                           cwd=os.getcwd())
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["crc"] == helpers.checksum(p)
        assert out["s"] > 1.5  # it really was slower than the base timeout
        assert helpers.wait_until(lambda: helpers.all_free(ring))
    finally:
        srv.terminate()
        srv.wait(15)


LINK_CLIENT = r"""
import json, sys, time
import shm
from clients import TransportClient
refs = [shm.SlotRef.from_dict(d) for d in json.loads(sys.argv[1])]
got, errors = [], 0
with TransportClient(timeout=1.0, max_attempts=2, max_rounds=2, quarantine_s=0.2) as c:
    pending = list(refs)
    deadline = time.monotonic() + 100
    while pending and time.monotonic() < deadline:
        res = c.fetch_many(pending)
        pending = []
        for r in res:
            if r.ok:
                got.append([r.payload.meta["i"], r.payload.meta["crc"],
                            __import__("tests.helpers").helpers.checksum(r.payload)])
                r.payload.release()
            elif getattr(r.error, "retryable", False):
                pending.append(r.ref)
                errors += 1
            else:
                errors += 1
print(json.dumps({"got": got, "errors": errors, "left": len(pending)}))
"""


@pytest.mark.faults
def test_link_cuts_and_blackholes_lose_nothing(two_hosts, make_ring, ring_name):
    """While a trainer in another namespace fetches, the link goes down and up and, in
    turns, a zero-length pfifo drops every packet: every payload arrives exactly once,
    byte-identical, and the ring ends all FREE."""
    import random
    import threading

    ns_srv, ns_cli = two_hosts
    dev = _ip("-n", ns_srv, "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip().split("@")[0]
    if shutil.which("tc") is None:
        pytest.skip("needs tc (iproute2)")
    ring = make_ring(slots=64, slot_bytes=1 << 20)
    env = _ns_env()
    srv = subprocess.Popen(["ip", "netns", "exec", ns_srv, sys.executable, "-m", "ucxx_transport", "serve",
                            "--ring", ring_name, "--host", SRV_IP, "--n-ports", "2", "--ack-timeout-s", "2"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stop = threading.Event()
    faults = []

    def cut():
        rnd = random.Random(5)
        while not stop.is_set():
            stop.wait(rnd.uniform(0.1, 0.4))
            if rnd.random() < 0.5:
                _ip("-n", ns_srv, "link", "set", dev, "down")
                stop.wait(rnd.uniform(0.05, 0.8))
                _ip("-n", ns_srv, "link", "set", dev, "up")
                faults.append("down")
            else:
                subprocess.run(["tc", "-n", ns_srv, "qdisc", "replace", "dev", dev, "root", "pfifo", "limit", "0"],
                               capture_output=True, timeout=10)
                stop.wait(rnd.uniform(0.05, 0.8))
                subprocess.run(["tc", "-n", ns_srv, "qdisc", "del", "dev", dev, "root"], capture_output=True,
                               timeout=10)
                faults.append("blackhole")

    t = threading.Thread(target=cut, daemon=True)
    try:
        assert srv.stdout.readline(), srv.stderr.read()[-2000:]
        refs = []
        for i in range(60):
            p = {"x": np.random.default_rng(i).integers(0, 255, 64 << 10, dtype=np.uint8)}
            refs.append(ring.put(p, meta={"i": i, "crc": helpers.checksum(p)}))
        t.start()
        r = subprocess.run(["ip", "netns", "exec", ns_cli, sys.executable, "-c", LINK_CLIENT,
                            json.dumps([x.to_dict() for x in refs])], capture_output=True, text=True,
                           timeout=150, env=env, cwd=os.getcwd())
        stop.set()
        t.join(10)
        _ip("-n", ns_srv, "link", "set", dev, "up")
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        ids = [i for i, _, _ in out["got"]]
        assert len(ids) == len(set(ids)), "a payload returned twice to one client"
        assert all(crc == got for _, crc, got in out["got"]), "wrong bytes"
        assert faults, "no fault was injected"
        # what the client did not get (its retries ran out during a long cut) is still in the ring
        assert helpers.wait_until(lambda: ring.state_counts()["READING"] == 0, timeout=15), ring.state_counts()
        assert len(set(ids)) + ring.state_counts()["READY"] == 60, (len(ids), ring.state_counts(), out)
    finally:
        stop.set()
        srv.terminate()
        srv.wait(15)
