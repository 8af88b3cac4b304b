"""Fan-in without Ray: many `ucxx-transport serve --directory-file` processes on loopback,
one trainer pulling from all through a StaticDirectory (clients.fanin.FanIn).

Checked: fairness while every ring is full (max/min payloads per server <= 1.5), the
client's endpoint budget (idle caps in all and per server; open endpoints <= idle cap +
one call in flight per server), a SIGKILLed server skipped within its deadline while the
others keep serving, its payloads served after it restarts (same ring id, re-registered),
and every payload exactly once with its checksum. Figures are printed (run with -s)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import shm
from clients import FanIn, TransportClient
from tests.helpers import checksum
from ucxx_transport import engine
from ucxx_transport.directory import StaticDirectory

SLOTS = 64


class _Server:
    def __init__(self, ring: str, directory_file, wait: bool = True):
        self.ring = ring
        args = [sys.executable, "-m", "ucxx_transport", "serve", "--ring", ring, "--host", "127.0.0.1",
                "--n-ports", "2", "--directory-file", str(directory_file), "--ack-timeout-s", "5"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.info = None
        if wait:
            self.ready()

    def ready(self):
        line = self.proc.stdout.readline()
        assert line, f"server for {self.ring} did not start"
        self.info = json.loads(line)
        return self

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class _EndpointCounter:
    """Open endpoints of this process (test-side wrapper around the engine)."""

    def __init__(self, monkeypatch):
        self.open: set = set()
        self.max_open = 0
        real_connect, real_abort = engine.connect, engine.abort

        async def connect(host, port, timeout):
            ep = await real_connect(host, port, timeout)
            self.open.add(id(ep))
            self.max_open = max(self.max_open, len(self.open))
            return ep

        def abort(ep):
            self.open.discard(id(ep))
            return real_abort(ep)
        monkeypatch.setattr(engine, "connect", connect)
        monkeypatch.setattr(engine, "abort", abort)


def _fill(ring, tag: int, n: int):
    for i in range(n):
        p = {"x": np.full(256, (tag * 7 + i) % 251, np.uint8), "i": np.int64(i)}
        ring.put(p, meta={"crc": checksum(p), "src": tag, "i": i})


def _scenario(n_servers: int, tmp_path, monkeypatch) -> dict:
    dfile = tmp_path / "directory.json"
    names = [f"fanin-{os.getpid()}-{k}" for k in range(n_servers)]
    rings = [shm.RingBuffer.create(nm, slots=SLOTS, slot_bytes=1 << 14) for nm in names]
    servers = []
    # a small budget, to be hit: fewer idle endpoints in all than servers x ports
    max_idle = n_servers
    monkeypatch.setenv("UCXX_TRANSPORT_MAX_IDLE_ENDPOINTS", str(max_idle))
    monkeypatch.setenv("UCXX_TRANSPORT_MAX_IDLE_PER_SERVER", "1")
    counter = _EndpointCounter(monkeypatch)
    figures = {"servers": n_servers}
    try:
        for k, r in enumerate(rings):
            _fill(r, k, SLOTS)
        servers = [_Server(nm, dfile, wait=False) for nm in names]  # start them all, then wait for all
        for s in servers:
            s.ready()
        directory = StaticDirectory(path=dfile)
        assert len(directory.live()) == n_servers
        seen: dict = {}
        bad = 0
        with TransportClient(timeout=3.0, local_fast_path=False) as client, \
                FanIn(client, directory, refresh_s=0.5, round_s=0.5, retry_s=0.5, max_retry_s=2.0) as fan:
            client.connect(*[e.address for e in directory.live()])

            def pull(n, wait=0.0):
                nonlocal bad
                t0 = time.monotonic()
                got = fan.take(n, wait=wait)
                dt = time.monotonic() - t0
                for p in got:
                    key = (p.meta["src"], p.meta["i"])
                    assert key not in seen, f"payload {key} delivered twice"
                    bad += checksum(p) != p.meta["crc"]
                    seen[key] = p.meta["src"]
                    p.release()
                pool = client._pool
                assert pool.idle <= max_idle, f"{pool.idle} idle endpoints > budget {max_idle}"
                assert max(pool._per_server.values(), default=0) <= 1
                return got, dt

            # ---- phase 1: every ring full; fairness and rate
            per = [0] * n_servers
            t0 = time.monotonic()
            goal = n_servers * SLOTS // 2  # every ring stays at least half full
            while sum(per) < goal:
                got, _ = pull(min(12, goal - sum(per)))
                for p in got:
                    per[p.meta["src"]] += 1
            elapsed = time.monotonic() - t0
            figures.update(per_server=per, fairness=max(per) / max(1, min(per)),
                           payloads_per_s=sum(per) / elapsed, payloads_per_s_per_server=sum(per) / elapsed / n_servers)

            # ---- phase 2: SIGKILL one server; the others keep serving
            victim = servers[0]
            victim.proc.kill()
            victim.proc.wait(10)
            t_kill = time.monotonic()
            detected = None
            worst_call = 0.0
            others = 0
            while time.monotonic() - t_kill < 8.0:
                got, dt = pull(12, wait=0.2)
                worst_call = max(worst_call, dt)
                others += sum(1 for p in got if p.meta["src"] != 0)
                state = fan.stats()["servers"][rings[0].ring_id]["state"]
                if detected is None and state in ("down", "gone"):
                    detected = time.monotonic() - t_kill
                if detected is not None and others >= 2 * n_servers:
                    break
            assert detected is not None, "the killed server was never skipped"
            figures.update(failover_s=detected, worst_call_during_failover_s=worst_call)
            assert others > 0, "the other servers stalled"

            # ---- phase 3: restart it on the same ring: re-registered, its payloads served again
            t_restart = time.monotonic()
            servers[0] = _Server(names[0], dfile)
            assert servers[0].info["ring_id"] == rings[0].ring_id
            readmitted = None
            while time.monotonic() - t_restart < 20.0 and len(seen) < n_servers * SLOTS:
                got, _ = pull(16, wait=0.2)
                if readmitted is None and any(p.meta["src"] == 0 for p in got):
                    readmitted = time.monotonic() - t_restart
            figures.update(readmitted_after_restart_s=readmitted, max_open_endpoints=counter.max_open,
                           phase3_s=time.monotonic() - t_restart,
                           fan_stats={k: v for k, v in fan.stats().items() if k != "servers"})
            not_done = {k for k in range(n_servers) for i in range(SLOTS) if (k, i) not in seen}
            figures["servers_not_done"] = {k: fan.stats()["servers"][rings[k].ring_id] for k in sorted(not_done)[:3]}
        assert readmitted is not None, "the restarted server's payloads were never served"
        assert bad == 0
        missing = {(k, i) for k in range(n_servers) for i in range(SLOTS)} - set(seen)
        assert not missing, (f"{len(missing)} payloads never delivered, e.g. {sorted(missing)[:5]}; ring states "
                             f"{[rings[k].state_counts() for k in sorted({k for k, _ in missing})][:3]}; {figures}")
        assert counter.max_open <= max_idle + n_servers + 1, figures
        return figures
    finally:
        for s in servers:
            s.stop()
        for r, nm in zip(rings, names):
            r.close()
            shm.RingBuffer.unlink_name(nm)


def _check(figures):
    print("\nfan-in figures:", json.dumps(figures))
    assert figures["fairness"] <= 1.5, figures
    assert figures["failover_s"] <= 3.0, figures
    assert figures["worst_call_during_failover_s"] <= 2.0, figures


@pytest.mark.timeout(120)
def test_fan_in_over_8_servers(tmp_path, monkeypatch):
    _check(_scenario(8, tmp_path, monkeypatch))


@pytest.mark.soak
@pytest.mark.timeout(400)
@pytest.mark.parametrize("n_servers", [16, 32])
def test_fan_in_over_many_servers(n_servers, tmp_path, monkeypatch):
    _check(_scenario(n_servers, tmp_path, monkeypatch))


def test_take_any_and_budget_arguments_on_the_client(tmp_path):
    """TransportClient.take_any pulls from every live server of a directory (one FanIn per
    directory, closed with the client: nothing held is left behind); the endpoint budget
    is also a constructor argument."""
    dfile = tmp_path / "directory.json"
    names = [f"takeany-{os.getpid()}-{k}" for k in range(2)]
    rings = [shm.RingBuffer.create(nm, slots=8, slot_bytes=1 << 14) for nm in names]
    servers = []
    try:
        for k, r in enumerate(rings):
            _fill(r, k, 4)
        for nm in names:  # one by one: a server that fails to start still lets finally stop the others
            servers.append(_Server(nm, dfile))
        directory = StaticDirectory(path=dfile)
        with TransportClient(timeout=3.0, local_fast_path=False, max_idle_endpoints=3, max_idle_per_server=1,
                             endpoint_idle_s=5) as c:
            assert (c._pool.max_idle, c._pool.max_idle_per_server, c._pool.idle_s) == (3, 1, 5.0)
            got = []
            deadline = time.monotonic() + 20
            while len(got) < 8 and time.monotonic() < deadline:
                got += c.take_any(directory, n=8 - len(got), wait=1.0)
            assert sorted(p.meta["src"] for p in got) == [0] * 4 + [1] * 4
            assert all(checksum(p) == p.meta["crc"] for p in got)
        assert all(r.ready_count() == 0 and r.state_counts()["READING"] == 0 for r in rings)
    finally:
        for s in servers:
            s.stop()
        for r in rings:
            r.close()
            r.unlink()
