"""TransportClient against a real server subprocess."""

import queue
import threading
import time

import numpy as np
import pytest

import shm
from clients import (
    AlreadyDeliveredError,
    AuthError,
    CallTimeoutError,
    ConnectionLostError,
    FetchStream,
    StaleSlotError,
    TransportClient,
    TransportError,
    UCXXDataPackerMixin,
)
from tests import helpers
from tests.fake_peers import SilentPeer

pytestmark = pytest.mark.timeout(120)


put_many = helpers.put_many


def with_ports(ref, host, ports):
    return shm.SlotRef(ref.ring, ref.slot, ref.generation, ref.nbytes, host, tuple(ports))


def test_rotation_successive_calls_successive_ports(make_ring, ring_name, serve):
    ring = make_ring(slots=16)
    srv = serve(ring_name, "--n-ports", "4")
    refs = put_many(ring, 8)
    with TransportClient(local_fast_path=False) as c:
        for r in refs:
            c.fetch(r)
        by_port = c.server_stats(srv.address)["metrics"]["requests_by_port"]
    # 8 GETs spread 2 per port (+1 STATS on the next port in rotation)
    counts = sorted(by_port.get(str(i), 0) for i in range(4))
    assert counts[:3] == [2, 2, 2] and counts[3] == 3


@pytest.fixture
def silent_peer():
    peer = SilentPeer()  # accepts, never answers: a wedged port (tests/fake_peers.py)
    yield peer
    peer.stop()


def test_wedged_port_quarantined_skipped_then_eligible(make_ring, ring_name, serve, silent_peer):
    ring = make_ring(slots=16)
    srv = serve(ring_name, "--n-ports", "1")
    ports = [silent_peer.port, srv.ports[0]]  # the server's port 0 is wedged
    refs = [with_ports(r, "127.0.0.1", ports) for r in put_many(ring, 6)]
    with TransportClient(local_fast_path=False, timeout=0.5, quarantine_s=1.5) as c:
        t0 = time.monotonic()
        assert c.fetch(refs[0])["i"] == 0  # port 0 times out -> quarantined -> port 1 serves
        assert time.monotonic() - t0 < 3
        assert c.stats()["quarantines"] == 1
        attempts = c.stats()["attempts"]
        for r in refs[1:4]:  # while quarantined, port 0 is skipped: one attempt per fetch, no timeouts
            c.fetch(r)
        assert c.stats()["attempts"] - attempts == 3 and c.stats()["quarantines"] == 1
        time.sleep(1.6)  # quarantine expiry is a matter of time, not of an event
        assert not c._pool.is_quarantined("127.0.0.1", silent_peer.port)
        c.fetch(refs[4])  # may start on port 0 again -> timeout -> quarantined again -> port 1
        c.fetch(refs[5])
        assert c.stats()["quarantines"] == 2
        # every port quarantined: the call uses them all anyway (never starve)
        for p in ports:
            c._pool.quarantine("127.0.0.1", p, "test")
        ref = with_ports(ring.put({"x": np.ones(3)}), "127.0.0.1", ports)
        got = 0
        for _ in range(2):
            try:
                c.fetch(ref)
                got += 1
                break
            except CallTimeoutError:
                continue
        assert got == 1


def test_endpoint_past_max_age_is_replaced(make_ring, ring_name, serve):
    ring = make_ring(slots=8)
    serve(ring_name, "--n-ports", "1")
    refs = put_many(ring, 3)
    with TransportClient(local_fast_path=False, endpoint_max_age_s=0.3) as c:
        c.fetch(refs[0])
        c.fetch(refs[1])
        assert c.stats()["connects"] == 1 and c.stats()["reused"] == 1
        time.sleep(0.4)
        c.fetch(refs[2])
        assert c.stats()["expired"] == 1 and c.stats()["connects"] == 2


def test_stale_tried_exactly_once(make_ring, ring_name, serve):
    ring = make_ring(slots=4)
    srv = serve(ring_name)
    ref = ring.put(b"x")
    with ring.claim(ref):
        pass
    with TransportClient(local_fast_path=False, max_attempts=3) as c:
        with pytest.raises(StaleSlotError) as ei:
            c.fetch(ref)
        assert isinstance(ei.value, shm.StaleSlotError)  # one except serves both paths
        reqs = c.server_stats(srv.address)["metrics"]["requests"]
    assert reqs.get("GET:STALE") == 1


def test_transient_failure_in_round_1_succeeds_in_round_2(make_ring, ring_name, serve, monkeypatch):
    ring = make_ring(slots=8)
    serve(ring_name)
    refs = put_many(ring, 3)
    lease = ring.claim(refs[1])  # BUSY over the network while we hold it
    rounds = []

    with TransportClient(local_fast_path=False, max_attempts=1, max_rounds=3) as c:
        real_getv = c._exchanges.getv_once

        async def getv_then_release(batch, *args, **kw):  # wraps the exchange: the holder lets go after it
            out = await real_getv(batch, *args, **kw)
            rounds.append([r.key for r in batch])
            if not lease.finalised:
                lease.nack()
            return out

        monkeypatch.setattr(c._exchanges, "getv_once", getv_then_release)
        res = c.fetch_many(refs)
    assert [r.ok for r in res] == [True, True, True]
    assert rounds == [[r.key for r in refs], [refs[1].key]]  # round 2 asked again for the BUSY one only
    assert [int(r.payload["i"]) for r in res] == [0, 1, 2]


def test_fetch_many_200_with_stale(make_ring, ring_name, serve):
    ring = make_ring(slots=210, slot_bytes=1 << 16)
    serve(ring_name)
    refs = put_many(ring, 200, size=20000)
    stale_idx = {3, 50, 199}
    for i in stale_idx:
        with ring.claim(refs[i]):
            pass
    with TransportClient(local_fast_path=False, max_inflight=16) as c:
        res = c.fetch_many(refs)
    assert len(res) == 200
    for i, r in enumerate(res):
        assert r.ref == refs[i]
        if i in stale_idx:
            assert not r.ok and isinstance(r.error, StaleSlotError)
        else:
            assert r.ok, r.error
            assert helpers.checksum(r.payload) == r.payload.meta["crc"] and r.payload.meta["i"] == i
    assert helpers.wait_until(lambda: helpers.all_free(ring)), ring.state_counts()  # ACKs are fire-and-forget


def test_take_outgrowing_its_one_message_buffer_falls_back_then_adapts(make_ring, ring_name, serve, monkeypatch):
    from clients.exchanges import Exchanges

    ring = make_ring(slots=8, slot_bytes=1 << 20)
    srv = serve(ring_name)
    formats = []
    planned = Exchanges.recv_planned

    async def recv_planned(self, *args):  # the usual batch answer's payload messages
        formats.append("batch")
        return await planned(self, *args)

    monkeypatch.setattr(Exchanges, "recv_planned", recv_planned)
    address = (srv.host, srv.ports)
    with TransportClient(local_fast_path=False) as c:
        big = [ring.put({"x": np.full(300_000, i, np.uint8)}) for i in range(3)]  # 3 x 300 KB: past the first guess
        got = c.take(address, n=3, wait=5)
        assert [int(p["x"][0]) for p in got] == [0, 1, 2] and formats == ["batch"]
        assert all(p.nbytes == r.nbytes for p, r in zip(got, big))
        del got
        for i in range(3):
            ring.put({"x": np.full(300_000, 10 + i, np.uint8)})
        got = c.take(address, n=3, wait=5)  # sized from what came before: one message now
        assert [int(p["x"][-1]) for p in got] == [10, 11, 12] and formats == ["batch"]
        del got
        ring.put({"x": np.arange(50, dtype=np.int32)})
        (small,) = c.take(address, n=8, wait=5)  # one small payload in a buffer sized for 8 big ones
        np.testing.assert_array_equal(small["x"], np.arange(50))
        assert formats == ["batch"]
        held = small["x"]
        while isinstance(held, memoryview) or held.base is not None:  # down to the memory the view keeps
            held = held.obj if isinstance(held, memoryview) else held.base
        assert held.nbytes < 64 << 10, f"a 1-payload answer holds a {held.nbytes}-byte buffer"
    assert helpers.wait_until(lambda: helpers.all_free(ring)), ring.state_counts()


def test_take_two_consumer_processes_exactly_once(make_ring, ring_name, serve, spawn):
    ring = make_ring(slots=16, slot_bytes=1 << 17)
    srv = serve(ring_name)
    out_q, res_q, stop = spawn.Queue(), spawn.Queue(), spawn.Event()
    per = 150
    prods = [spawn.Process(target=helpers.producer, args=(ring_name, per, s, 1 << 15, out_q)) for s in range(2)]
    cons = [spawn.Process(target=helpers.take_consumer, args=(srv.host, srv.ports, stop, res_q)) for _ in range(2)]
    for p in cons + prods:
        p.start()
    done = 0
    while done < 2:
        if out_q.get(timeout=90) is None:
            done += 1
    for p in prods:
        p.join(30)
    stop.set()
    results = [res_q.get(timeout=90) for _ in cons]
    for p in cons:
        p.join(30)
        assert p.exitcode == 0
    seen = [x for r in results for x in r[0]]
    assert sum(r[1] for r in results) == 0
    assert all(len(r[0]) > 0 for r in results), "both consumers progress"
    assert len(seen) == len(set(seen)) == 2 * per
    assert helpers.wait_until(lambda: helpers.all_free(ring)), ring.state_counts()  # ACKs are fire-and-forget


def test_local_fast_path_and_network_same_bytes(make_ring, ring_name, serve):
    ring = make_ring(slots=8)
    serve(ring_name)
    p = {"a": np.random.rand(1000), "b": np.arange(7, dtype=np.int16)}
    r1, r2 = ring.put(p), ring.put(p)
    with TransportClient() as c:
        local = c.fetch(r1)
        assert c.stats().get("local_fetches") == 1 and c.stats().get("connects", 0) == 0
        # consumed at hand-out, like a network fetch; the slot is kept (PINNED) while views live
        assert ring.state_counts()["PINNED"] == 1 and ring.state_counts()["READING"] == 0
        a_view = local["a"]
        local.release()
        assert ring.state_counts()["PINNED"] == 1  # a view is still alive: the slot is not reused
        a_local = a_view.copy()
        del a_view
        assert ring.state_counts()["PINNED"] == 0 and ring.state_counts()["FREE"] == 7
    with TransportClient(local_fast_path=False) as c:
        net = c.fetch(r2)
        assert c.stats().get("local_fetches") is None and c.stats()["connects"] == 1
        np.testing.assert_array_equal(net["a"], a_local)
        np.testing.assert_array_equal(net["b"], p["b"])


def test_refs_of_another_host_skip_the_shared_memory_look_up(make_ring, ring_name, serve, monkeypatch):
    """With the local fast path on (the default), a batch of refs naming another host goes
    straight to the network: no look-up of this host's rings (an executor hop each round)."""
    ring = make_ring(slots=8)
    serve(ring_name)
    refs = [ring.put({"x": np.full(10, i)}) for i in range(4)]
    with TransportClient() as c:
        monkeypatch.setattr(c._local, "_local_addrs", frozenset({"192.0.2.1"}))  # 127.0.0.1: another host now
        looked = []
        real = c._local.ring_for
        monkeypatch.setattr(c._local, "ring_for", lambda ref: looked.append(ref) or real(ref))
        results = c.fetch_many(refs)
        assert [int(r.payload["x"][0]) for r in results] == [0, 1, 2, 3]
        assert c.stats().get("local_fetches") is None
        assert not looked, "a ref of another host was looked up in this host's shared memory"


def test_wrong_token_is_auth_error(make_ring, ring_name, serve, tmp_path):
    ring = make_ring()
    tok = tmp_path / "tok"
    tok.write_text("abc")
    serve(ring_name, "--token-file", str(tok))
    ref = ring.put(b"x")
    with TransportClient(local_fast_path=False, token="nope") as c:
        with pytest.raises(AuthError):
            c.fetch(ref)
    with TransportClient(local_fast_path=False, token="abc") as c:
        assert c.fetch(ref).raw.tobytes() == b"x"


def test_async_twins_from_another_loop(make_ring, ring_name, serve):
    import asyncio

    ring = make_ring(slots=8)
    srv = serve(ring_name)
    refs = put_many(ring, 4)

    async def main(c):
        p = await c.afetch(refs[0])
        res = await c.afetch_many(refs[1:3])
        got = await c.atake(srv.address, n=5, wait=0.1)
        return p, res, got

    with TransportClient(local_fast_path=False) as c:
        p, res, got = asyncio.run(main(c))
    assert p.meta["i"] == 0 and [r.payload.meta["i"] for r in res] == [1, 2]
    assert [g.meta["i"] for g in got] == [3]


# ------------------------------------------------------------ streaming ----
def test_stream_source_ends_tail_drains(make_ring, ring_name, serve):
    ring = make_ring(slots=32)
    serve(ring_name)
    refs = put_many(ring, 20)
    with TransportClient(local_fast_path=False) as c:
        with c.stream(iter(refs), depth=3) as s:
            got = [p.meta["i"] for p in s]
        assert got == list(range(20))
        assert not s.alive


def test_stream_consumer_stops_first_fetcher_winds_down(make_ring, ring_name, serve):
    ring = make_ring(slots=32)
    srv = serve(ring_name)
    put_many(ring, 10)
    before = threading.active_count()
    with TransportClient(local_fast_path=False) as c:
        s = c.stream(address=srv.address, depth=2, wait=0.2)  # endless TAKE stream
        first = [next(s).meta["i"] for _ in range(3)]
        s.close(timeout=10)
        assert not s.alive
    assert first == [0, 1, 2]
    assert threading.active_count() <= before


def test_stream_error_reraises_in_consumer(make_ring, ring_name, serve):
    ring = make_ring(slots=8)
    serve(ring_name)
    refs = put_many(ring, 3)
    with ring.claim(refs[1]):  # consumed -> refs[1] stale
        pass

    def source():
        yield refs[0]
        yield refs[1]
        yield refs[2]

    with TransportClient(local_fast_path=False) as c:
        s = c.stream(source())
        got = []
        with pytest.raises(StaleSlotError):
            for p in s:
                got.append(p.meta["i"])
        assert got == [0, 2]  # fetches already started are delivered, nothing consumed is dropped
        assert not s.alive
        with pytest.raises(StopIteration):
            next(s)

    def bad_source():
        yield refs[2]
        raise RuntimeError("control plane died")

    refs = put_many(ring, 3)
    with TransportClient(local_fast_path=False) as c:
        s = FetchStream(c, bad_source())
        assert next(s).meta["i"] == 2
        with pytest.raises(RuntimeError, match="control plane died"):
            next(s)
        s.close()
        assert not s.alive


def test_stream_from_queue_source(make_ring, ring_name, serve):
    ring = make_ring(slots=8)
    serve(ring_name)
    q = queue.Queue()
    with TransportClient(local_fast_path=False) as c:
        s = c.stream(q)
        for r in put_many(ring, 3):
            q.put(r)
        q.put(None)
        assert [p.meta["i"] for p in s] == [0, 1, 2]


# ----------------------------------------------------------------- mixin ---
class Packer(UCXXDataPackerMixin):
    def __init__(self, **kw):
        self.failed = []
        self.setup_ucxx_transport(**kw)

    def on_rollout_fetch_failed(self, ref, error):
        self.failed.append((ref, error))


def test_mixin_timed_out_batch_never_fills_the_next(make_ring, ring_name, serve, silent_peer):
    ring = make_ring(slots=16)
    serve(ring_name, "--n-ports", "2")
    refs = put_many(ring, 6)
    wedged = [with_ports(r, "127.0.0.1", [silent_peer.port]) for r in refs[:2]]  # only a silent port
    good = refs[2:5]
    packer = Packer(local_fast_path=False, timeout=1.0, max_attempts=1, max_rounds=1)
    try:
        h1 = packer.prefetch_rollouts(wedged)
        with pytest.raises(TimeoutError):
            packer.collect_prefetch(h1, timeout=0.2)
        h2 = packer.prefetch_rollouts(good)
        batch2 = packer.collect_prefetch(h2, timeout=30)
        assert [p.meta["i"] for p in batch2] == [2, 3, 4]
        late = packer.collect_prefetch(h1, timeout=30)  # its own results, late
        assert late == []
        assert [r.key for r, _ in packer.failed] == [w.key for w in wedged]
        assert all(isinstance(e, TransportError) for _, e in packer.failed)
        assert packer.fetch_rollouts([refs[5]])[0].meta["i"] == 5
    finally:
        packer.shutdown_ucxx_transport()
    assert ring.state_counts()["READY"] == 2  # the wedged ones were never consumed


def test_sync_calls_from_threads_while_another_thread_runs_a_loop(make_ring, ring_name, serve):
    import asyncio

    ring = make_ring(slots=16)
    serve(ring_name)
    refs = put_many(ring, 8)
    stop = threading.Event()
    ticks = []

    def busy_loop():
        async def main():
            while not stop.is_set():
                ticks.append(1)
                await asyncio.sleep(0.001)
        asyncio.run(main())

    lt = threading.Thread(target=busy_loop)
    lt.start()
    out = {}
    with TransportClient(local_fast_path=False) as c:
        def worker(k):
            out[k] = [c.fetch(r).meta["i"] for r in refs[k::2]]
        ts = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
    stop.set()
    lt.join(10)
    assert sorted(out[0] + out[1]) == list(range(8)) and ticks


def test_closing_right_after_fetches_loses_no_ack(make_ring, ring_name, serve):
    """Endpoints leaving the pool (overflow, close) confirm their last ACK first:
    otherwise the server sees the endpoint die and returns delivered payloads to READY."""
    ring = make_ring(slots=64, slot_bytes=1 << 16)
    srv = serve(ring_name)
    for _ in range(3):
        refs = put_many(ring, 48)
        with TransportClient(local_fast_path=False, max_inflight=16, pool_size=1) as c:
            res = c.fetch_many(refs)
        assert all(r.ok for r in res)
        assert helpers.wait_until(lambda: helpers.all_free(ring), timeout=10), ring.state_counts()
    from tests.rawucx import RawConn
    from ucxx_transport.protocol import Op, Request

    with RawConn("127.0.0.1", srv.ports[0]) as conn:
        conn.send(Request(Op.STATS, 1))
        r = conn.recv_response()
        import json

        stats = json.loads(conn.recv_bytes(r.nbytes).tobytes())
    assert stats["metrics"]["nacks"] == 0 and stats["metrics"]["acks"] == 144


def test_connect_warms_up_every_port_so_the_first_fetch_does_not_connect(make_ring, ring_name, serve):
    import socket

    ring = make_ring(slots=4)
    srv = serve(ring_name, "--n-ports", "2")
    ref = ring.put({"x": np.arange(10)})
    with TransportClient(local_fast_path=False, timeout=5) as c:
        got = c.connect(srv.address)
        assert sorted(p for _, p in got) == sorted(srv.ports) and all(rtt > 0 for rtt in got.values())
        assert c.stats()["connects"] == 2
        assert c.fetch(ref)["x"].tolist() == list(range(10))
        assert c.stats()["connects"] == 2  # served on a warmed endpoint
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    with TransportClient(timeout=2) as c:
        with pytest.raises(ConnectionLostError, match="none of 1 port"):
            c.connect(("127.0.0.1", dead))


def test_mixin_warm_up_opens_the_connections_before_the_first_step(make_ring, ring_name, serve):
    ring = make_ring(slots=4)
    srv = serve(ring_name, "--n-ports", "2")
    ref = ring.put({"i": np.int64(7)})
    packer = Packer(local_fast_path=False, timeout=5)
    try:
        got = packer.warm_up_ucxx_transport(srv.address)
        assert len(got) == 2 and packer.ucxx_client.stats()["connects"] == 2
        assert packer.fetch_rollouts([ref])[0].meta == {} and packer.ucxx_client.stats()["connects"] == 2
    finally:
        packer.shutdown_ucxx_transport()


def test_local_batch_gives_each_ref_its_own_outcome(make_ring, ring_name):
    """fetch_many of same-host refs claims a ring's refs together; each ref still gets exactly
    its own result: payload, STALE, a duplicate in the batch, a slot busy elsewhere, a repeat."""
    ring = make_ring(slots=8)
    refs = [ring.put({"x": np.full(4, i)}) for i in range(5)]
    with ring.claim(refs[0]):
        pass  # consumed: its ref is STALE now
    busy = ring.claim(refs[1])  # leased by another reader right now
    with TransportClient(timeout=2.0, max_attempts=1, max_rounds=1) as c:
        res = c.fetch_many([refs[0], refs[1], refs[2], refs[2], refs[3], refs[4]])
        assert isinstance(res[0].error, StaleSlotError)
        assert res[1].error is not None and getattr(res[1].error, "retryable", False)
        assert res[2].payload["x"].tolist() == [2] * 4
        assert isinstance(res[3].error, (AlreadyDeliveredError, StaleSlotError))  # the same ref twice
        assert [r.payload["x"][0] for r in res[4:]] == [3, 4]
        assert c.stats()["local_fetches"] == 3 and c.stats().get("fetches", 0) == 0
        busy.nack()
        again = c.fetch_many([refs[1], refs[4]])
        assert again[0].payload["x"].tolist() == [1] * 4
        assert isinstance(again[1].error, (AlreadyDeliveredError, StaleSlotError))
        del res, again
    assert ring.state_counts()["FREE"] == 8


def test_dropped_batch_results_free_their_slots_without_the_garbage_collector(make_ring):
    """A same-host batch's payloads share their slots' lifetime; an error kept as a result
    must not keep the frames it was raised through (and the batch's payloads they hold)
    alive in a reference cycle: dropping the results frees every slot at once."""
    import gc

    ring = make_ring(slots=8)
    refs = [ring.put({"x": np.full(4, i)}) for i in range(5)]
    with ring.claim(refs[0]):
        pass  # STALE
    busy = ring.claim(refs[1])  # BUSY: the one-by-one path raises through its retries
    gc.collect()
    gc.disable()
    try:
        with TransportClient(timeout=2.0, max_attempts=2, max_rounds=1) as c:
            res = c.fetch_many([refs[0], refs[1], refs[2], refs[2], refs[3], refs[4]])
            assert [r.ok for r in res] == [False, False, True, False, True, True]
            del res
            assert ring.state_counts()["PINNED"] == 0 and ring.state_counts()["FREE"] == 7
    finally:
        gc.enable()
    busy.nack()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["fetch", "fetch_many"])
def test_corrupt_payload_on_the_same_host_path_is_dead_lettered(make_ring, how):
    """A frame that does not decode, read through the local fast path, is NACKed as undecodable
    at once (the failed decode's leftovers never count as a reader's live view): after
    DEAD_LETTER_AFTER tries it is DEAD, never consumed, never stuck in READING."""
    from clients import CorruptPayloadError

    ring = make_ring(slots=4)
    poison = ring.put({"x": np.arange(100, dtype=np.int32)})
    ring.slot_array(poison.slot)[:4] = 0  # frame magic destroyed after publish
    t = ring._table
    with TransportClient(timeout=2.0, max_attempts=1, max_rounds=1) as c:
        for i in range(1, shm.DEAD_LETTER_AFTER + 1):
            if how == "fetch":
                with pytest.raises(CorruptPayloadError) as ei:
                    c.fetch(poison)
                assert ei.value.__cause__ is not None  # the decode error, traceback and all, still alive
            else:
                (r,) = c.fetch_many([poison])
                assert isinstance(r.error, CorruptPayloadError)
            # the error (and its traceback) is still referenced here: the slot must not wait for it
            assert int(t.failures[poison.slot]) == i
            assert int(t.state[poison.slot]) == (shm.state.DEAD if i == shm.DEAD_LETTER_AFTER else shm.state.READY)
    assert ring.stats()["consumed"] == 0 and [d["slot"] for d in ring.dead_letters()] == [poison.slot]


@pytest.mark.timeout(60)
def test_local_batch_ack_blocked_by_a_frozen_process_fails_that_ref_only(make_ring, ring_name, spawn, monkeypatch):
    """Same-host fetch_many: a process frozen holding one slot's lock after we claimed it makes that
    slot's ACK time out; that ref alone is an error (BUSY, retryable), the others are delivered and
    recorded, none is lost."""
    ring = make_ring(slots=8)
    refs = [ring.put({"i": np.int64(i)}) for i in range(4)]
    held = spawn.Event()
    frozen = []
    with TransportClient(timeout=2.0, max_attempts=1, max_rounds=1) as c:
        local_ring = c._local.ring_for(refs[0])
        real_claim_batch = local_ring.claim_batch

        def claim_then_freeze_one(slots, gens):  # wraps the claim: a producer freezes on slot 2's lock after it
            got = real_claim_batch(slots, gens)
            p = spawn.Process(target=helpers.freeze_holding_slot_lock, args=(ring_name, refs[2].slot, held))
            p.start()
            frozen.append(p)
            assert held.wait(20)
            return got

        monkeypatch.setattr(local_ring, "claim_batch", claim_then_freeze_one)
        try:
            res = c.fetch_many(refs)
        finally:
            for p in frozen:
                p.kill()
                p.join(10)
        assert [r.ok for r in res] == [True, True, False, True]
        assert getattr(res[2].error, "retryable", False)
        assert [int(res[i].payload["i"]) for i in (0, 1, 3)] == [0, 1, 3]
        assert all(c.delivered(refs[i].key) for i in (0, 1, 3)) and not c.delivered(refs[2].key)
        # the frozen process is gone: the give-back queued on the client's handle applies at its next
        # call on the ring, and that fetch gets the payload (never lost, never stuck)
        assert int(c.fetch(refs[2])["i"]) == 2
    assert ring.stats()["consumed"] == 4


def test_settings_changed_after_construction_apply_to_the_next_call(make_ring, ring_name, serve):
    """timeout, max_nbytes, local_fast_path and max_attempts are read by the client's parts
    (connector, exchanges, same-host reader): setting them on the client takes effect."""
    from clients.errors import PayloadTooLargeError

    ring = make_ring(slots=8)
    serve(ring_name)
    with TransportClient(timeout=5.0) as c:
        ref = ring.put({"x": np.arange(64)})
        assert int(c.fetch(ref)["x"][3]) == 3 and c.stats()["local_fetches"] == 1
        c.local_fast_path = False
        assert int(c.fetch(ring.put({"x": np.arange(64)}))["x"][5]) == 5 and c.stats()["fetches"] == 1
        c.max_nbytes = 64
        big = ring.put({"x": np.arange(64)})
        with pytest.raises(PayloadTooLargeError):
            c.fetch(big)
        c.max_nbytes = 0
        c.timeout, c.max_attempts = 2.0, 2
        assert int(c.fetch(big)["x"][7]) == 7 and c.call_budget() < 5.0 * 3
        with pytest.raises(ValueError):
            c.max_nbytes = -1


def test_a_ref_without_an_address_never_maps_a_ring_on_the_ucx_loop(make_ring, ring_name, serve, monkeypatch):
    """A ref published while no server ran carries no address: the client finds the server in
    the ring's header, which may mean attaching the ring (an mmap with MAP_POPULATE). That must
    happen in an executor thread, never on the loop every endpoint of the client shares."""
    ring = make_ring(slots=8)
    bare = [ring.put({"x": np.arange(4) + i}) for i in range(3)]  # before any server: no address
    assert bare[0].host is None
    serve(ring_name)
    attached_on = []
    real_attach = shm.RingBuffer.attach

    def attach(name, *a, **k):
        attached_on.append(threading.current_thread().name)
        return real_attach(name, *a, **k)

    monkeypatch.setattr(shm.RingBuffer, "attach", staticmethod(attach))
    with TransportClient(local_fast_path=False, timeout=5.0) as c:
        assert int(c.fetch(bare[0])["x"][0]) == 0
        assert [int(r.payload["x"][0]) for r in c.fetch_many(bare[1:])] == [1, 2]
    assert attached_on and "ucxx-transport-loop" not in attached_on, attached_on


def test_same_host_batch_of_a_recreated_ring_gives_each_ref_its_error(make_ring, ring_name):
    """fetch_many never raises for one ref's sake: refs of a ring that was removed and
    re-created under the same name are each STALE, not an exception out of the batch."""
    ring = make_ring(slots=4)
    ring.set_server_address("127.0.0.1", [9])  # refs name this host: the ring here is the one they mean
    refs = [ring.put({"x": np.arange(4)}) for _ in range(2)]
    assert refs[0].host == "127.0.0.1"
    ring.close()
    shm.RingBuffer.unlink_name(ring_name)
    again = make_ring(slots=4)
    again.put({"x": np.arange(4)})
    with TransportClient(timeout=2.0, max_rounds=1) as c:
        res = c.fetch_many(refs)
    assert [type(r.error).__name__ for r in res] == ["StaleSlotError", "StaleSlotError"]
    assert again.ready_count() == 1  # the new ring's payload is untouched


def test_a_frame_numpy_cannot_view_fails_alone_and_strands_no_slot(make_ring):
    """A damaged frame can pass every check and still not be viewable (a zero-size field whose
    other dimension is beyond numpy's limit): in a same-host batch that item is corrupt, the
    others are delivered, and no slot is left READING."""
    ring = make_ring(slots=4)
    good = ring.put({"x": np.arange(4)})
    bad = ring.put({"e": np.zeros((0, 3), np.float32)})
    frame = ring.slot_array(bad.slot, bad.nbytes)
    table_off = int.from_bytes(frame[24:32].tobytes(), "little")
    frame[table_off + 32:table_off + 40] = np.frombuffer((1 << 63).to_bytes(8, "little"), np.uint8)  # shape[1]
    with TransportClient(timeout=2.0, max_rounds=1) as c:
        res = c.fetch_many([good, bad])
        assert res[0].ok and res[0].payload["x"].tolist() == [0, 1, 2, 3]
        assert type(res[1].error).__name__ == "CorruptPayloadError"
        del res
    counts = ring.state_counts()
    assert counts["READING"] == 0 and counts["PINNED"] == 0, counts
