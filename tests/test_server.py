"""Real server subprocess; requests from a raw ucxx endpoint using the protocol module."""

import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest

import shm
from shm.frame import decode
from tests import helpers
from tests.rawucx import RawConn
from ucxx_transport.protocol import REQUEST, Op, Request, Status, encode_request

pytestmark = pytest.mark.timeout(120)


def get(conn, ref, rid=1, ack=True):
    resp = conn.request(Request(Op.GET, rid, ref.slot, ref.generation, text=ref.ring))
    if resp.status != Status.OK:
        return resp, None
    data = conn.recv_bytes(resp.nbytes)
    if ack is not None:
        conn.send(Request(Op.ACK if ack else Op.NACK, rid))
    return resp, data


def test_get_roundtrip_ack_frees_nack_restores(make_ring, ring_name, serve):
    ring = make_ring(slots=4, slot_bytes=1 << 20)
    srv = serve(ring_name)
    payload = {"tokens": np.arange(5000, dtype=np.int32), "lp": np.random.rand(5000).astype(np.float32)}
    ref = ring.put(payload, meta={"crc": helpers.checksum(payload)})
    assert ref.host == "127.0.0.1" and list(ref.ports) == srv.ports
    with RawConn("127.0.0.1", srv.ports[0]) as c:
        resp, data = get(c, ref, 1, ack=False)  # NACK
        assert resp.status == Status.OK and resp.nbytes == ref.nbytes
        p = decode(data)
        assert helpers.checksum(p) == p.meta["crc"]
        c.send(Request(Op.PING, 2))  # ordered after the NACK on the same endpoint
        assert c.recv_response().status == Status.OK
        assert ring.state_counts()["READY"] == 1
        resp, data = get(c, ref, 3, ack=True)
        assert bytes(data) == bytes(ring.slot_buffer(ref.slot, ref.nbytes))  # byte-identical to shm
        assert c.request(Request(Op.PING, 4)).status == Status.OK
    assert ring.state_counts()["FREE"] == 4


def test_take_publish_order_and_long_poll(make_ring, ring_name, serve):
    ring = make_ring(slots=8)
    srv = serve(ring_name)
    refs = [ring.put({"i": np.array([i])}) for i in range(3)]
    with RawConn("127.0.0.1", srv.ports[1]) as c:
        c.send(Request(Op.TAKE, 1, n=10, wait_ms=0))
        got = []
        while True:
            r = c.recv_response()
            assert r.status == Status.OK
            got.append(int(decode(c.recv_bytes(r.nbytes))["i"][0]))
            if r.index + 1 == r.count:
                break
        c.send(Request(Op.ACK, 1))
        assert got == [0, 1, 2]
        assert [(r.slot, r.generation) for r in refs]  # noqa
        # EMPTY after the wait
        t0 = time.monotonic()
        assert c.request(Request(Op.TAKE, 2, n=1, wait_ms=200)).status == Status.EMPTY
        assert 0.15 < time.monotonic() - t0 < 5
        # long-poll is woken by a publish (well before its 20 s wait ends)
        publisher = threading.Timer(0.3, lambda: ring.put({"i": np.array([99])}))
        publisher.start()
        t0 = time.monotonic()
        r = c.request(Request(Op.TAKE, 3, n=1, wait_ms=20000))
        assert r.status == Status.OK and time.monotonic() - t0 < 5
        assert int(decode(c.recv_bytes(r.nbytes))["i"][0]) == 99
        c.send(Request(Op.ACK, 3))
        publisher.join()
        assert c.request(Request(Op.PING, 4)).status == Status.OK
    assert ring.state_counts()["FREE"] == 8


def test_stale_and_busy(make_ring, ring_name, serve):
    ring = make_ring(slots=1)
    srv = serve(ring_name)
    old = ring.put(b"one")
    with ring.claim(old) as lease:  # leased locally -> BUSY over the network
        with RawConn("127.0.0.1", srv.ports[0]) as c:
            r = c.request(Request(Op.GET, 1, old.slot, old.generation, text=ring_name))
            assert r.status == Status.BUSY
        assert lease.payload.raw.tobytes() == b"one"
    new = ring.put(b"two")  # same slot, next generation
    assert new.slot == old.slot
    with RawConn("127.0.0.1", srv.ports[0]) as c:
        r = c.request(Request(Op.GET, 1, old.slot, old.generation, text=ring_name))
        assert r.status == Status.STALE and r.nbytes == 0
        resp, data = get(c, new, 2)
        assert decode(data).raw.tobytes() == b"two"


@pytest.mark.parametrize("bad", ["random", "short", "magic", "version", "oversized", "ack_first"])
def test_malformed_requests_error_or_close_server_survives(make_ring, ring_name, serve, bad):
    ring = make_ring(slots=2)
    srv = serve(ring_name)
    ring.put(b"x")
    rng = np.random.default_rng(0)
    if bad == "random":
        msg = rng.integers(0, 256, REQUEST.size, dtype=np.uint8).tobytes()
    elif bad == "short":
        msg = encode_request(Request(Op.PING, 1))[:10]
    elif bad == "magic":
        msg = bytearray(encode_request(Request(Op.PING, 1)))
        msg[:4] = b"EVIL"
    elif bad == "version":
        msg = bytearray(encode_request(Request(Op.PING, 1)))
        struct.pack_into("<H", msg, 4, 77)
        struct.pack_into("<I", msg, REQUEST.size - 4, zlib.crc32(bytes(msg[:REQUEST.size - 4])))
    elif bad == "oversized":
        msg = bytes(4 * REQUEST.size)
    else:
        msg = encode_request(Request(Op.ACK, 5))
    c = RawConn("127.0.0.1", srv.ports[0], timeout=5)
    try:
        c.send(msg)
        if bad != "oversized":  # a truncated receive just closes the endpoint
            r = c.recv_response()
            assert r.status == Status.BAD_REQUEST
            assert r.message
    except Exception:
        assert bad == "oversized"
    finally:
        c.close()
    with RawConn("127.0.0.1", srv.ports[0]) as c2:  # server alive, nothing leaked
        assert c2.request(Request(Op.PING, 1)).status == Status.OK
        r = c2.request(Request(Op.GET, 2, 7, 1, text=ring_name))  # slot out of range
        assert r.status == Status.STALE
        r = c2.request(Request(Op.GET, 3, 0, 1, text="other-ring"))
        assert r.status == Status.BAD_REQUEST
    assert srv.proc.poll() is None
    assert ring.state_counts() == {"FREE": 1, "WRITING": 0, "READY": 1, "READING": 0, "DEAD": 0, "PINNED": 0}


def test_huge_take_is_capped(make_ring, ring_name, serve):
    ring = make_ring(slots=4)
    srv = serve(ring_name, "--max-take", "2")
    for i in range(4):
        ring.put({"i": np.array([i])})
    with RawConn("127.0.0.1", srv.ports[0]) as c:
        c.send(Request(Op.TAKE, 1, n=2**31, wait_ms=0))
        r1 = c.recv_response()
        c.recv_bytes(r1.nbytes)
        r2 = c.recv_response()
        c.recv_bytes(r2.nbytes)
        assert (r1.count, r2.count) == (2, 2)
        c.send(Request(Op.ACK, 1))
        assert c.request(Request(Op.PING, 2)).status == Status.OK
    assert ring.state_counts()["READY"] == 2


def test_token_required(make_ring, ring_name, serve, tmp_path):
    ring = make_ring(slots=2)
    tok = tmp_path / "token"
    tok.write_text("s3cret\n")
    os.chmod(tok, 0o600)
    srv = serve(ring_name, "--token-file", str(tok))
    ref = ring.put(b"secret payload")
    for hello in (None, "wrong"):
        c = RawConn("127.0.0.1", srv.ports[0])
        try:
            if hello is not None:
                assert c.request(Request(Op.HELLO, 1, text=hello)).status == Status.DENIED
            else:
                r = c.request(Request(Op.GET, 1, ref.slot, ref.generation, text=ring_name))
                assert r.status == Status.DENIED and r.nbytes == 0
        finally:
            c.close()
    assert ring.state_counts()["READY"] == 1  # nothing was read
    with RawConn("127.0.0.1", srv.ports[0]) as c:
        assert c.request(Request(Op.HELLO, 1, text="s3cret")).status == Status.OK
        resp, data = get(c, ref, 2)
        assert decode(data).raw.tobytes() == b"secret payload"


CLIENT_NO_ACK = r"""
import os, signal, sys, time
from tests.rawucx import RawConn
from ucxx_transport.protocol import Op, Request
c = RawConn("127.0.0.1", int(sys.argv[1]))
c.send(Request(Op.GET, 1, int(sys.argv[2]), int(sys.argv[3]), text=sys.argv[4]))
r = c.recv_response()
c.recv_bytes(r.nbytes)
print("received", flush=True)
if sys.argv[5] == "freeze":
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen: UCX never notices; only the ACK deadline does
time.sleep(3600)  # never ACKs; the test kills us with SIGKILL
"""


def start_client_without_ack(port, ref, ring_name, mode):
    """A real client process that receives ``ref`` and never ACKs ("sleep" or "freeze")."""
    p = subprocess.Popen([sys.executable, "-c", CLIENT_NO_ACK, str(port), str(ref.slot), str(ref.generation),
                          ring_name, mode], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    assert p.stdout.readline().strip() == "received"
    return p


def test_client_killed_before_ack_payload_ready_again(make_ring, ring_name, serve):
    ring = make_ring(slots=2)
    srv = serve(ring_name, "--ack-timeout-s", "1")
    ref = ring.put({"x": np.arange(10)})
    p = start_client_without_ack(srv.ports[0], ref, ring_name, "sleep")
    assert ring.state_counts()["READING"] == 1
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)
    t0 = time.monotonic()
    assert ring.wait_ready(10) or ring.wait_ready(10)
    assert time.monotonic() - t0 < 5
    with RawConn("127.0.0.1", srv.ports[1]) as c:  # another client gets it
        resp, data = get(c, ref, 1)
        np.testing.assert_array_equal(decode(data)["x"], np.arange(10))
        assert c.request(Request(Op.PING, 2)).status == Status.OK  # answered after the ACK was applied
    assert ring.state_counts()["FREE"] == 2


def test_server_sigkilled_mid_send_restart_recovers(make_ring, ring_name, serve):
    ring = make_ring(slots=4, slot_bytes=32 << 20)
    srv = serve(ring_name)
    payloads = [{"x": np.full(8 << 20, i, dtype=np.uint8)} for i in range(3)]
    refs = [ring.put(p) for p in payloads]
    c = RawConn("127.0.0.1", srv.ports[0])
    try:
        r = c.request(Request(Op.GET, 1, refs[0].slot, refs[0].generation, text=ring_name))
        assert r.status == Status.OK  # header sent, payload in flight
        assert ring.state_counts()["READING"] == 1
        srv.kill()
    finally:
        c.close()
    srv2 = serve(ring_name)  # restart on the same ring: recovery at start
    assert ring.state_counts() == {"FREE": 1, "WRITING": 0, "READY": 3, "READING": 0, "DEAD": 0, "PINNED": 0}
    from clients import TransportClient

    with TransportClient(local_fast_path=False) as client:
        for i, ref in enumerate(refs):
            ref2 = shm.SlotRef(ref.ring, ref.slot, ref.generation, ref.nbytes, "127.0.0.1", tuple(srv2.ports))
            assert client.fetch(ref2)["x"][0] == i
    assert ring.state_counts()["FREE"] == 4


def test_port_zero_advertises_bound_ports(make_ring, ring_name, serve):
    ring = make_ring()
    srv = serve(ring_name, "--ports", "0,0,0")
    assert len(srv.ports) == 3 and all(p > 0 for p in srv.ports)
    ref = ring.put(b"x")
    assert list(ref.ports) == srv.ports
    with RawConn("127.0.0.1", srv.ports[2]) as c:
        assert c.request(Request(Op.PING, 1)).status == Status.OK
    assert srv.stop() == 0  # SIGTERM -> graceful, exit 0
    assert ring.put(b"y").host is None  # server gone: no longer advertised


def test_stats_and_status_cli(make_ring, ring_name, serve):
    ring = make_ring()
    srv = serve(ring_name)
    ring.put(b"x")
    out = subprocess.run([sys.executable, "-m", "ucxx_transport", "status", "--address",
                          f"127.0.0.1:{srv.ports[0]}", "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import json

    info = json.loads(out.stdout)
    assert info["ring"]["states"]["READY"] == 1
    assert "loop_lag_s" in info["metrics"] and "handler_latency_s" in info["metrics"]
    out = subprocess.run([sys.executable, "-m", "ucxx_transport", "status", "--ring", ring_name],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "READY=1" in out.stdout and str(srv.ports[0]) in out.stdout


def test_start_stop_twenty_times_in_process(make_ring):
    from ucxx_transport import TransportServer

    ring = make_ring()
    for _ in range(20):
        s = TransportServer(ring, host="127.0.0.1", n_ports=2)
        ports = s.start()
        assert len(ports) == 2
        s.stop(timeout=5)
    assert ring.server_address() is None


def test_cli_help_lists_env_and_bad_value_is_named():
    out = subprocess.run([sys.executable, "-m", "ucxx_transport", "serve", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert "UCXX_TRANSPORT_PORTS" in out.stdout and "UCXX_TRANSPORT_ACK_TIMEOUT_S" in out.stdout
    out = subprocess.run([sys.executable, "-m", "ucxx_transport", "serve", "--ring", "nope-x", "--create",
                          "--slot-bytes", "12 parsecs"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "slot_bytes" in out.stderr and "UCXX_TRANSPORT_SLOT_BYTES" in out.stderr


def test_get_one_message_header_in_slot_headroom(make_ring, ring_name, serve):
    from ucxx_transport.protocol import FLAG_ONE_MESSAGE, RESPONSE, decode_response

    ring = make_ring(slots=2)
    srv = serve(ring_name)
    ref = ring.put({"x": np.arange(100, dtype=np.int64)})
    with RawConn("127.0.0.1", srv.ports[0]) as c:
        # wrong nbytes in the ref: header-only BAD_REQUEST, payload stays READY
        c.send(Request(Op.GET, 1, ref.slot, ref.generation, max_nbytes=ref.nbytes + 8, text=ring_name,
                       flags=FLAG_ONE_MESSAGE))
        r = c.recv_response()
        assert r.status == Status.BAD_REQUEST and ring.ready_count() == 1
    with RawConn("127.0.0.1", srv.ports[0]) as c:
        c.send(Request(Op.GET, 2, ref.slot, ref.generation, max_nbytes=ref.nbytes, text=ring_name,
                       flags=FLAG_ONE_MESSAGE))
        msg = c.recv_bytes(RESPONSE.size + ref.nbytes)
        r = decode_response(msg[:RESPONSE.size])
        assert r.status == Status.OK and r.nbytes == ref.nbytes and r.ring_id.hex() == ref.ring_id
        np.testing.assert_array_equal(decode(msg[RESPONSE.size:])["x"], np.arange(100))
        c.send(Request(Op.ACK, 2))
        assert c.request(Request(Op.PING, 3)).status == Status.OK
    assert ring.state_counts()["FREE"] == 2


def test_takev_one_message_when_the_answer_fits_the_clients_buffer(make_ring, ring_name, serve):
    from ucxx_transport.protocol import (FLAG_ONE_MESSAGE, FLAG_PAYLOADS_INLINE, RESPONSE, batch_table_size,
                                         decode_response, message_size, one_message_layout, plan_batch,
                                         read_batch_array)

    ring = make_ring(slots=8)
    srv = serve(ring_name)
    refs = [ring.put({"x": np.full(100 + 30 * i, i, np.int64)}) for i in range(3)]
    sizes = [r.nbytes for r in refs]
    offsets, size = one_message_layout(3, sizes)
    head = RESPONSE.size + batch_table_size(3)
    with RawConn("127.0.0.1", srv.ports[0]) as c:
        # a buffer one byte short: the usual batch answer (header + table, then the payloads)
        c.send(Request(Op.TAKEV, 1, n=3, flags=FLAG_ONE_MESSAGE, generation=size - 1))
        msg = c.recv_bytes(head)
        r = decode_response(msg[:RESPONSE.size])
        assert r.status == Status.OK and r.count == 3 and not r.flags & FLAG_PAYLOADS_INLINE
        assert read_batch_array(msg, 3, RESPONSE.size)["nbytes"].tolist() == sizes
        (plan,) = plan_batch(list(enumerate(sizes)))
        body = c.recv_bytes(message_size(plan, dict(enumerate(sizes))))
        assert [int(decode(body[off:off + sizes[i]])["x"][0]) for i, off in plan] == [0, 1, 2]
        c.send(Request(Op.NACK, 1))  # all three back to READY
        # room enough: header, table and the three payloads are one message of exactly that size
        c.send(Request(Op.TAKEV, 2, n=3, flags=FLAG_ONE_MESSAGE, generation=size))
        msg = c.recv_bytes(size)
        r = decode_response(msg[:RESPONSE.size])
        assert r.status == Status.OK and r.count == 3 and r.flags & FLAG_PAYLOADS_INLINE
        for i, off in enumerate(offsets):
            np.testing.assert_array_equal(decode(msg[off:off + sizes[i]])["x"], np.full(100 + 30 * i, i))
        c.send(Request(Op.ACK, 2))
        assert c.request(Request(Op.PING, 3)).status == Status.OK
    assert ring.state_counts()["FREE"] == 8


def test_a_batched_take_of_256_is_answered_by_one_request(make_ring, ring_name, serve):
    """A TAKEV may return up to the server's max_take (256 by default), not only a GETV's 200:
    a trainer's take(n=256) is one round trip."""
    from ucxx_transport.protocol import FLAG_ONE_MESSAGE, FLAG_PAYLOADS_INLINE, MAX_TAKE, RESPONSE, decode_response

    ring = make_ring(slots=MAX_TAKE + 4, slot_bytes=4096)
    srv = serve(ring_name)
    for i in range(MAX_TAKE + 4):
        ring.put({"x": np.full(8, i, np.int64)})
    with RawConn("127.0.0.1", srv.ports[0]) as c:
        c.send(Request(Op.TAKEV, 1, n=MAX_TAKE, flags=FLAG_ONE_MESSAGE, generation=1 << 20))
        msg = c.recv_bytes(1 << 20)  # header, table and payloads: one (shorter) message
        r = decode_response(msg[:RESPONSE.size])
        assert r.status == Status.OK and r.flags & FLAG_PAYLOADS_INLINE and r.count == MAX_TAKE
        c.send(Request(Op.NACK, 1))  # all back to READY
        assert c.request(Request(Op.PING, 2)).status == Status.OK
    assert ring.ready_count() == MAX_TAKE + 4


def test_a_batch_answer_that_cannot_be_built_gives_its_payloads_back(make_ring):
    from ucxx_transport import TransportServer
    from ucxx_transport.protocol import FLAG_ONE_MESSAGE

    ring = make_ring(slots=4)
    srv = TransportServer(ring, host="127.0.0.1", n_ports=1)
    (port,) = srv.start()
    try:
        for i in range(3):
            ring.put({"x": np.full(100, i)})

        def no_staging_buffer(nbytes):  # e.g. MemoryError: the answer's buffer cannot be had
            raise MemoryError(f"no {nbytes}-byte staging buffer")

        srv._staging.get = no_staging_buffer
        with RawConn("127.0.0.1", port) as c:
            c.send(Request(Op.TAKEV, 1, n=3, flags=FLAG_ONE_MESSAGE, generation=1 << 20))
            # the claimed batch goes back to READY, not stranded in READING until a restart
            assert helpers.wait_until(lambda: ring.state_counts()["READY"] == 3, timeout=10), ring.state_counts()
    finally:
        srv.stop(timeout=5)


def test_a_batch_answer_of_several_messages_arrives_in_plan_order(make_ring, ring_name, serve):
    """Header + table, then each message of plan_batch in order (large payloads alone, straight
    from their slots; small neighbours coalesced), each posted as soon as it is ready."""
    from ucxx_transport.protocol import (RESPONSE, batch_table_size, decode_response, message_size, plan_batch,
                                         read_batch_array)

    ring = make_ring(slots=6, slot_bytes=1 << 20)
    srv = serve(ring_name)
    counts = [40_000, 500, 700, 60_000, 300]  # int64: 320 KB and 480 KB travel alone
    refs = [ring.put({"x": np.full(c, i, np.int64)}) for i, c in enumerate(counts)]
    sizes = [r.nbytes for r in refs]
    plans = plan_batch(list(enumerate(sizes)))
    assert [len(p) for p in plans] == [1, 2, 1, 1]  # (the layout this test is about)
    with RawConn("127.0.0.1", srv.ports[0]) as c:
        c.send(Request(Op.TAKEV, 1, n=5))
        head = c.recv_bytes(RESPONSE.size + batch_table_size(5))
        r = decode_response(head[:RESPONSE.size])
        assert r.status == Status.OK and r.count == 5
        assert read_batch_array(head, 5, RESPONSE.size)["nbytes"].tolist() == sizes
        for plan in plans:
            body = c.recv_bytes(message_size(plan, dict(enumerate(sizes))))
            for i, off in plan:
                np.testing.assert_array_equal(decode(body[off:off + sizes[i]])["x"], np.full(counts[i], i))
        c.send(Request(Op.ACK, 1))
        assert c.request(Request(Op.PING, 2)).status == Status.OK
    assert ring.state_counts()["FREE"] == 6


def test_a_batch_answer_that_fails_after_its_first_messages_gives_everything_back_quietly(make_ring, caplog):
    """The header and a zero-copy payload are posted, then the next message cannot be built:
    the batch goes back to READY, and the sends already posted end without an unretrieved
    failure in the log."""
    import gc
    import logging

    from ucxx_transport import TransportServer

    ring = make_ring(slots=4, slot_bytes=1 << 20)
    srv = TransportServer(ring, host="127.0.0.1", n_ports=1)
    (port,) = srv.start()
    caplog.set_level(logging.ERROR, logger="asyncio")
    # the server's own report of the failure is not recorded: a kept record's traceback would
    # keep the sends alive past this test's garbage collection
    server_log = logging.getLogger("ucxx_transport.server")
    level = server_log.level
    server_log.setLevel(logging.CRITICAL)
    try:
        ring.put({"x": np.zeros(40_000, np.int64)})  # travels alone, straight from its slot
        ring.put({"x": np.ones(100, np.int64)})
        ring.put({"x": np.ones(100, np.int64)})

        def no_staging_buffer(nbytes):
            raise MemoryError(f"no {nbytes}-byte staging buffer")

        srv._staging.get = no_staging_buffer
        earlier = {id(p) for p in engine_pending()}  # (requests other tests left behind in this process)
        with RawConn("127.0.0.1", port) as c:
            c.send(Request(Op.TAKEV, 1, n=3))
            assert helpers.wait_until(lambda: ring.state_counts()["READY"] == 3, timeout=10), ring.state_counts()
        # the sends this answer posted have ended (failed on the aborted endpoint)
        assert helpers.wait_until(lambda: all(id(p) in earlier for p in engine_pending()), timeout=10)
        gc.collect()
        assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    finally:
        server_log.setLevel(level)
        srv.stop(timeout=5)


def engine_pending() -> list:
    from ucxx_transport import engine

    return [p for d in engine._engine.drivers for p in d.pending]


def test_a_receive_posted_before_its_request_gets_the_answer(make_ring, ring_name, serve):
    import asyncio

    from ucxx_transport import engine
    from ucxx_transport.protocol import RESPONSE, decode_response

    make_ring(slots=2)
    srv = serve(ring_name)

    async def ping(ep):
        buf = np.zeros(RESPONSE.size, np.uint8)
        answer = engine.post_recv(ep, buf)  # posted now, not when first awaited
        assert isinstance(answer, asyncio.Future) and not answer.done()
        await engine.send(ep, np.frombuffer(bytes(encode_request(Request(Op.PING, 9))), np.uint8))
        await answer
        return decode_response(buf)

    with RawConn("127.0.0.1", srv.ports[0]) as c:
        r = engine.run(ping(c.ep), 10)
        assert r.status == Status.OK and r.request_id == 9


def test_idle_server_uses_no_cpu(make_ring, ring_name, serve):
    import psutil

    make_ring()
    srv = serve(ring_name)
    with RawConn("127.0.0.1", srv.ports[0]) as c:  # one connected, idle endpoint
        assert c.request(Request(Op.PING, 1)).status == Status.OK
        p = psutil.Process(srv.proc.pid)
        t0 = sum(p.cpu_times()[:2])
        time.sleep(2.0)  # measuring idle CPU over wall time: the sleep *is* the measurement
        used = sum(p.cpu_times()[:2]) - t0
    assert used < 0.2, f"idle server used {used:.2f} CPU-seconds in 2 s (busy-spin?)"


def test_prometheus_metrics_endpoint(make_ring, ring_name, serve):
    pytest.importorskip("prometheus_client")
    import socket
    import urllib.request

    ring = make_ring()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        mport = s.getsockname()[1]
    srv = serve(ring_name, "--metrics-port", str(mport))
    ref = ring.put(b"x")
    with RawConn("127.0.0.1", srv.ports[0]) as c:
        get(c, ref, 1)
        c.request(Request(Op.PING, 2))
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
    assert 'ucxx_transport_requests_total{op="GET",status="OK"} 1.0' in text
    assert 'ucxx_transport_slots{state="FREE"}' in text
    assert "ucxx_transport_loop_lag_seconds" in text and "ucxx_transport_bytes_out_total" in text
    # latencies are histograms over fixed buckets (they add up across servers), not quantile gauges
    assert 'ucxx_transport_handler_latency_seconds_bucket{le="+Inf"} 1.0' in text
    assert 'ucxx_transport_handler_latency_seconds_bucket{le="0.001"}' in text and 'quantile="p99"' not in text
    # bound to the serve host (loopback here), not to every interface
    import psutil

    bound = {c.laddr.ip for c in psutil.Process(srv.proc.pid).net_connections(kind="tcp")
             if c.status == psutil.CONN_LISTEN and c.laddr.port == mport}
    assert bound == {srv.host}, bound


def test_doctor_reports_and_exits_zero():
    import json

    out = subprocess.run([sys.executable, "-m", "ucxx_transport", "doctor", "--json"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    rep = json.loads(out.stdout)
    assert rep["ucx_version"] and "tcp" in rep["transports"] and rep["dev_shm"]["total"] > 0
    assert rep["progress_mode"] == "adaptive" and rep["problems"] == []


def test_frozen_client_ack_deadline_returns_payload(make_ring, ring_name, serve):
    ring = make_ring(slots=2)
    srv = serve(ring_name, "--ack-timeout-s", "1")
    ref = ring.put({"x": np.arange(10)})
    p = start_client_without_ack(srv.ports[0], ref, ring_name, "freeze")
    try:
        t0 = time.monotonic()
        assert ring.wait_ready(10) or ring.wait_ready(10)  # woken by the server's NACK after the deadline
        assert 0.5 < time.monotonic() - t0 < 8
        with RawConn("127.0.0.1", srv.ports[1]) as c:
            resp, data = get(c, ref, 1)
            assert resp.status == Status.OK
            st = c.request(Request(Op.STATS, 2))
            import json

            m = json.loads(c.recv_bytes(st.nbytes).tobytes())["metrics"]
        assert m["ack_timeouts"] == 1
    finally:
        p.kill()
        p.wait(10)


def test_idle_endpoint_evicted(make_ring, ring_name, serve):
    import json

    make_ring()
    srv = serve(ring_name, "--idle-timeout-s", "0.5")
    idle = RawConn("127.0.0.1", srv.ports[0])
    try:
        assert idle.request(Request(Op.PING, 1)).status == Status.OK
        evicted = False
        deadline = time.monotonic() + 10
        while not evicted and time.monotonic() < deadline:
            with RawConn("127.0.0.1", srv.ports[1]) as c:
                st = c.request(Request(Op.STATS, 1))
                evicted = json.loads(c.recv_bytes(st.nbytes).tobytes())["metrics"]["evictions"] >= 1
            if not evicted:
                time.sleep(0.2)
        assert evicted
    finally:
        idle.close()


def test_second_server_on_same_ring_is_refused_clearly(make_ring, ring_name, serve):
    make_ring()
    serve(ring_name)
    out = subprocess.run([sys.executable, "-m", "ucxx_transport", "serve", "--ring", ring_name, "--host",
                          "127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 5 and "already served by a live process" in out.stderr  # ExitCode.RING
    assert "Traceback" not in out.stderr


def test_an_ack_deferred_by_a_busy_slot_lock_warns_only_when_the_lock_stays_held(make_ring, ring_name, spawn,
                                                                                   caplog):
    """A slot lock busy for a millisecond (a producer descheduled on a loaded box) defers the
    server's ACK quietly; one held for a second (a frozen process) is warned of, once, naming the
    slot and where to look; when the holder is gone the ACK applies and the payload is consumed."""
    import logging

    from ucxx_transport import TransportServer
    from ucxx_transport import server as server_mod

    ring = make_ring()
    ref = ring.put({"x": np.arange(4)})
    srv = TransportServer(ring, host="127.0.0.1", n_ports=1)  # not started: its finaliser alone
    lease = ring.claim(ref)
    held = spawn.Event()
    holder = spawn.Process(target=helpers.freeze_holding_slot_lock, args=(ring_name, ref.slot, held))
    holder.start()
    try:
        assert held.wait(20)
        with caplog.at_level(logging.DEBUG, logger="ucxx_transport.server"):
            srv._finalise([lease], True)
            srv._retry_deferred()
            assert len(srv._deferred) == 1
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "a short wait is no warning"
            srv._deferred[0].since -= server_mod.FROZEN_LOCK_WARN_S  # held that long now
            srv._retry_deferred()
            srv._retry_deferred()
            warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(warned) == 1 and f"slot {ref.slot}" in warned[0] and "status --ring" in warned[0], warned
    finally:
        holder.kill()
        holder.join(10)
    assert helpers.wait_until(lambda: (srv._retry_deferred(), not srv._deferred)[1], 10), "the ACK never applied"
    assert ring.stats()["consumed"] == 1
