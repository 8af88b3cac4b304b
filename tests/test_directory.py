"""Directory (ucxx_transport.directory) and the client's endpoint budget (clients.pool): no UCX needed."""

import json
import threading
import time

import pytest

from clients.pool import EndpointPool, PooledEndpoint
from ucxx_transport.directory import DirectoryError, ServerEntry, StaticDirectory


def test_entries_expire_without_heartbeat_and_come_back_under_the_same_ring_id(tmp_path):
    path = tmp_path / "dir.json"
    d = StaticDirectory(path=path, ttl_s=0.3)
    e1 = d.register("r1", "ring-a", "127.0.0.1", [4001, 4002], "node-1")
    d.register("r2", "ring-b", "127.0.0.1", [4003], "node-2")
    other = StaticDirectory(path=path, ttl_s=0.3)  # another process reading the same file
    assert [e.ring_id for e in other.live()] == ["r1", "r2"]
    assert other.live()[0].address == ("127.0.0.1", [4001, 4002])
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.6:
        assert d.heartbeat("r1")
        time.sleep(0.05)
    assert [e.ring_id for e in other.live()] == ["r1"], "r2 stopped heartbeating: expired"
    assert {e.ring_id for e in other.entries()} == {"r1", "r2"}, "expired entries stay listed until pruned"
    e1b = d.register("r1", "ring-a", "127.0.0.1", [5001], "node-1")  # restarted: same id, new incarnation
    got = {e.ring_id: e for e in other.live()}
    assert got["r1"].ports == (5001,) and got["r1"].incarnation != e1.incarnation
    assert e1b.incarnation == got["r1"].incarnation
    d.unregister("r1")
    assert not d.heartbeat("r1"), "an unknown id asks the caller to register again"
    assert other.live() == []


def test_static_list_never_expires_and_bad_input_is_a_clear_error(tmp_path):
    d = StaticDirectory([{"ring_id": "x", "host": "10.0.0.1", "ports": [1, 2]}], ttl_s=0.01)
    time.sleep(0.05)
    assert [e.address for e in d.live()] == [("10.0.0.1", [1, 2])]
    with pytest.raises(DirectoryError, match="needs ring_id, host, ports"):
        StaticDirectory([{"host": "h"}])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DirectoryError, match="cannot read directory file"):
        StaticDirectory(path=bad).live()
    bad.write_text(json.dumps({"servers": "nope"}))
    with pytest.raises(DirectoryError, match="is not"):
        StaticDirectory(path=bad).live()
    with pytest.raises(ValueError, match="ports"):
        ServerEntry("r", "r", "h", ())


def test_concurrent_writers_lose_no_registration(tmp_path):
    path = tmp_path / "dir.json"

    def worker(i):
        d = StaticDirectory(path=path)
        for j in range(20):
            d.register(f"r{i}", f"ring{i}", "127.0.0.1", [1000 + i])
            d.heartbeat(f"r{i}")
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(StaticDirectory(path=path).live()) == 6


def test_keep_registered_heartbeats_reregisters_and_watch_sees_changes(tmp_path):
    d = StaticDirectory(path=tmp_path / "dir.json", ttl_s=0.4)
    reg = d.keep_registered("r1", "ring", "127.0.0.1", [7000], interval_s=0.05)
    try:
        time.sleep(0.6)
        assert [e.ring_id for e in d.live()] == ["r1"], "the heartbeat thread keeps it alive"
        before = d.live()
        d.unregister("r1")  # pruned behind its back: the next heartbeat registers it again
        after = d.watch(before, timeout=2.0, interval=0.02)
        assert after == [] or after[0].incarnation != before[0].incarnation
        assert StaticDirectory(path=tmp_path / "dir.json").watch([], timeout=2.0, interval=0.02)[0].ring_id == "r1"
    finally:
        reg.stop()
    assert d.live() == [], "stop() unregisters"


# --------------------------------------------------------------- pool budget --
class _FakeEndpoint:
    """Stands in for a ucxx endpoint where only the pool's bookkeeping is under test."""

    aborted = False

    def abort(self):
        self.aborted = True


def _pool(retired, **kw):
    kw.setdefault("max_idle", 100)
    return EndpointPool(pool_size=2, endpoint_max_age_s=100, quarantine_s=30, retire=retired.append, **kw)


def test_pool_caps_idle_endpoints_per_server_and_in_all_lru_first():
    retired = []
    pool = _pool(retired, max_idle=3, max_idle_per_server=2)
    pool.order("a", [1, 2])
    pool.order("b", [3, 4])
    eps = [PooledEndpoint(_FakeEndpoint(), h, p) for h, p in [("a", 1), ("a", 2), ("a", 1)]]
    for pe in eps:
        pool.checkin(pe)
    assert retired == [eps[0]] and pool.stats["evicted_server_cap"] == 1, "server a over its cap: its LRU goes"
    b = [PooledEndpoint(_FakeEndpoint(), "b", 3), PooledEndpoint(_FakeEndpoint(), "b", 4)]
    for pe in b:
        pool.checkin(pe)
    assert pool.idle == 3 and retired[1:] == [eps[1]] and pool.stats["evicted_lru"] == 1, "total cap: global LRU"
    assert pool.checkout("a", 1) is eps[2] and pool.idle == 2
    assert pool.checkout("a", 1) is None


def test_pool_closes_endpoints_idle_too_long_and_keeps_old_rules(monkeypatch):
    retired = []
    pool = _pool(retired, idle_s=0.2)
    old = PooledEndpoint(_FakeEndpoint(), "h", 1)
    pool.checkin(old)
    time.sleep(0.25)
    assert pool.checkout("h", 2) is None and retired == [old] and pool.stats["evicted_idle"] == 1
    # pool_size per (host, port) still holds, quarantine still drops idle endpoints
    three = [PooledEndpoint(_FakeEndpoint(), "h", 1) for _ in range(3)]
    for pe in three:
        pool.checkin(pe)
    assert retired[-1] is three[2] and pool.idle == 2
    pool.quarantine("h", 1, "test")
    assert pool.idle == 0 and pool.checkout("h", 1) is None
    assert [pe.ep.aborted for pe in three[:2]] == [True, True]  # the idle ones were closed, not just forgotten


def test_pool_budget_knobs_read_the_environment(monkeypatch):
    monkeypatch.setenv("UCXX_TRANSPORT_MAX_IDLE_ENDPOINTS", "7")
    monkeypatch.setenv("UCXX_TRANSPORT_MAX_IDLE_PER_SERVER", "1")
    monkeypatch.setenv("UCX_TCP_MAX_NUM_EPS", "64")
    p = EndpointPool(pool_size=2, endpoint_max_age_s=100, quarantine_s=30)
    assert (p.max_idle, p.max_idle_per_server) == (7, 1)
    monkeypatch.delenv("UCXX_TRANSPORT_MAX_IDLE_ENDPOINTS")
    assert EndpointPool(pool_size=2, endpoint_max_age_s=100, quarantine_s=30).max_idle == 48, "3/4 of UCX's cap"


def test_pool_closes_endpoints_outside_its_lock():
    """An abort can block (close_blocking): another thread's call must still use the pool meanwhile."""
    release = threading.Event()
    in_abort = threading.Event()

    class SlowToAbort(_FakeEndpoint):
        def abort(self):
            in_abort.set()
            release.wait(10)
            self.aborted = True

    pool = _pool([])
    pool.checkin(PooledEndpoint(SlowToAbort(), "h", 1))
    quarantining = threading.Thread(target=pool.quarantine, args=("h", 1, "test"))
    quarantining.start()
    try:
        assert in_abort.wait(5)
        ordered: list = []
        other = threading.Thread(target=lambda: ordered.append(pool.order("h", [1, 2])))
        other.start()
        other.join(2)
        assert ordered == [[2, 1]] or ordered == [[2]], f"the pool was locked while an endpoint aborted: {ordered}"
    finally:
        release.set()
        quarantining.join(10)


def test_an_endpoint_checked_in_after_the_pool_was_drained_is_retired_not_pooled():
    """A call in another thread that ends while its client closes returns its endpoint after
    close() drained the pool: it must be closed (confirming its ACK), not left open in the pool."""
    retired = []
    pool = _pool(retired)
    early = PooledEndpoint(_FakeEndpoint(), "h", 1)
    pool.checkin(early)
    assert pool.drain() == [early]
    late = PooledEndpoint(_FakeEndpoint(), "h", 1)
    pool.checkin(late)
    assert retired == [late] and pool.idle == 0
