"""One test per README guarantee mechanism that the rest of the suite let go unnoticed.

Each test here fails when its mechanism is removed (``python tests/mutation_check.py``
removes them one at a time and reports which test catches it) and passes on the real
code. Real processes and real servers where a mechanism involves them; pure Python
for the two decoders' fuzz tests.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest

import shm
from clients import CorruptPayloadError, StaleSlotError, TransportClient
from shm import _sync
from shm.frame import FIELD_ENTRY, FRAME_HEADER, decode, encode_into
from shm.state import DEAD, READING, READY
from tests import helpers
from ucxx_transport.protocol import (
    MAX_TEXT,
    REQUEST,
    Op,
    ProtocolError,
    Request,
    decode_request,
    encode_request,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ helpers --
def _in_futex_wait(tid: int, addr: int) -> bool:
    """Is thread ``tid`` of this process asleep in futex(2) on ``addr`` right now?"""
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] == str(_sync._SYS_FUTEX) and int(fields[1], 16) == addr


def _need_futex_introspection():
    if _sync._SYS_FUTEX is None or _sync._libc is None:
        pytest.skip("no futex(2) on this platform: waits degrade to short sleeps")
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/syscall") as f:
            f.read()
    except OSError:
        pytest.skip("/proc/<tid>/syscall is not readable here")


def _publish_when_told(ring_name: str, go, out_q) -> None:
    """Spawned producer: publish one payload when ``go`` is set; report when it published."""
    ring = shm.RingBuffer.attach(ring_name)
    try:
        assert go.wait(30)
        t = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes
        ring.put(b"wake up")
        out_q.put(t)
    finally:
        ring.close()


# ------------------------------------------- nothing lost: peer death --------
NO_ACK_CLIENT = r"""
import sys, time
from tests.rawucx import RawConn
from ucxx_transport.protocol import Op, Request
c = RawConn("127.0.0.1", int(sys.argv[1]))
c.send(Request(Op.GET, 1, int(sys.argv[2]), int(sys.argv[3]), text=sys.argv[4]))
r = c.recv_response()
c.recv_bytes(r.nbytes)
print("received", flush=True)
time.sleep(3600)  # never ACKs; SIGKILLed by the test
"""


@pytest.mark.timeout(90)
def test_client_sigkilled_before_ack_returns_payload_long_before_the_ack_deadline(make_ring, ring_name, serve):
    """The server notices a dead peer (UCX close callback) and returns its payload at
    once: the ACK deadline (60 s here) is only for peers that are alive but silent."""
    ring = make_ring(slots=2)
    srv = serve(ring_name, "--ack-timeout-s", "60", "--idle-timeout-s", "120")
    ref = ring.put({"x": np.arange(10)})
    p = subprocess.Popen([sys.executable, "-c", NO_ACK_CLIENT, str(srv.ports[0]), str(ref.slot),
                          str(ref.generation), ring_name], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert p.stdout.readline().strip() == "received"
        assert ring.state_counts()["READING"] == 1
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        t0 = time.monotonic()
        assert helpers.wait_until(lambda: ring.state_counts()["READY"] == 1, timeout=15), ring.state_counts()
        assert time.monotonic() - t0 < 15
    finally:
        p.kill()
        p.wait(10)
    with TransportClient(local_fast_path=False, timeout=5.0) as c:  # and anyone can fetch it again
        assert c.fetch(ref)["x"].tolist() == list(range(10))
    assert helpers.wait_until(lambda: helpers.all_free(ring))


# --------------------------------------- no wrong data: corrupt GET ----------
@pytest.mark.timeout(90)
def test_corrupt_payload_fetched_by_get_is_nacked_then_dead_lettered_never_consumed(make_ring, ring_name, serve):
    """A client that cannot decode a GET payload NACKs it as undecodable: it stays READY
    (failures counted) and after DEAD_LETTER_AFTER such NACKs it is DEAD, never consumed."""
    ring = make_ring(slots=4)
    serve(ring_name, "--n-ports", "1")
    poison = ring.put({"x": np.arange(100, dtype=np.int32)})
    ring.slot_array(poison.slot)[:4] = 0  # frame magic destroyed after publish
    good = ring.put({"x": np.arange(5, dtype=np.int32)})
    t = ring._table
    with TransportClient(local_fast_path=False, timeout=3.0, max_attempts=1) as c:
        for i in range(1, shm.DEAD_LETTER_AFTER + 1):
            with pytest.raises(CorruptPayloadError):
                c.fetch(poison)
            want = READY if i < shm.DEAD_LETTER_AFTER else DEAD
            assert helpers.wait_until(lambda: t.state[poison.slot] == want and t.failures[poison.slot] == i,
                                      timeout=10), (i, ring.slot_info()[poison.slot], int(t.failures[poison.slot]))
        assert ring.stats()["consumed"] == 0
        with pytest.raises(StaleSlotError):  # dead: never served again
            c.fetch(poison)
        assert c.fetch(good)["x"].tolist() == list(range(5))  # and it never blocked the others
    (dead,) = ring.dead_letters()
    assert (dead["slot"], dead["generation"], dead["failures"]) == (poison.slot, poison.generation,
                                                                     shm.DEAD_LETTER_AFTER)


@pytest.mark.timeout(90)
def test_corrupt_payload_in_a_held_take_is_nacked_not_consumed(make_ring, ring_name, serve):
    """A held TAKE (what a stream fetches ahead) holding an undecodable payload is NACKed
    as undecodable: the payload stays READY with one failure counted, never consumed."""
    ring = make_ring(slots=4)
    srv = serve(ring_name, "--n-ports", "1")
    poison = ring.put({"x": np.arange(100, dtype=np.int32)})
    ring.slot_array(poison.slot)[:4] = 0
    t = ring._table
    with TransportClient(local_fast_path=False, timeout=3.0, max_attempts=1) as c:
        with pytest.raises(CorruptPayloadError):
            c.submit_take(srv.address, n=2, wait=0.5, hold_s=30).result(60)
        assert helpers.wait_until(lambda: t.state[poison.slot] == READY and t.failures[poison.slot] == 1,
                                  timeout=10), (ring.slot_info()[poison.slot], int(t.failures[poison.slot]))
    assert ring.stats()["consumed"] == 0


# ------------------------------------ no wrong data: ring identity ------------
def _old_ref_of_recreated_ring(ring_name, make_ring):
    """A ref published by a ring that was then removed and re-created under the same
    name, and the new ring whose payload has the very same (slot, generation, nbytes)."""
    old_ring = shm.RingBuffer.create(ring_name, slots=2, slot_bytes=1 << 16)
    old = old_ring.put({"x": np.full(8, 1, np.int32)})
    old_ring.close()
    shm.RingBuffer.unlink_name(ring_name)
    ring = make_ring(slots=2)
    return ring, old


def test_ref_of_a_recreated_ring_is_stale_never_the_new_payload(ring_name, make_ring):
    ring, old = _old_ref_of_recreated_ring(ring_name, make_ring)
    new = ring.put({"x": np.full(8, 2, np.int32)})
    assert (new.slot, new.generation, new.nbytes) == (old.slot, old.generation, old.nbytes)
    assert new.ring_id != old.ring_id
    foreign = shm.SlotRef(ring_name, new.slot, new.generation, new.nbytes, ring_id="0" * 32)  # another host's
    for ref in (old, foreign):
        with pytest.raises(shm.StaleSlotError, match="ring id"):
            ring.claim(ref)
        with pytest.raises(shm.StaleSlotError, match="ring id"):
            ring.try_claim(ref)
    assert ring.ready_count() == 1
    with ring.claim(new) as lease:
        assert lease.payload["x"][0] == 2


@pytest.mark.timeout(90)
def test_get_of_a_recreated_rings_ref_is_stale_over_the_network(ring_name, make_ring, serve):
    ring, old = _old_ref_of_recreated_ring(ring_name, make_ring)
    srv = serve(ring_name, "--n-ports", "1")
    new = ring.put({"x": np.full(8, 2, np.int32)})
    assert (new.slot, new.generation, new.nbytes) == (old.slot, old.generation, old.nbytes)
    stale = old.with_address(*srv.address)
    with TransportClient(local_fast_path=False, timeout=3.0) as c:
        with pytest.raises(StaleSlotError):
            c.fetch(stale)
        (res,) = c.fetch_many([stale])
        assert isinstance(res.error, StaleSlotError)
        assert ring.ready_count() == 1  # the new payload was neither served nor consumed
        assert c.fetch(new)["x"][0] == 2


# ------------------------------------------ finalisers: lease numbers --------
def _recovered_and_leased_again(ring, ref):
    """(old, new): ``old`` is a lease whose ownership was dropped (what ring.close() does
    to the slots a handle still holds), recovered to READY and leased again as ``new``."""
    old = ring.claim(ref)
    ring._table.forget_ownerships()  # the holder is gone as far as the ring can tell
    assert ring.recover() == 1 and ring.ready_count() == 1
    new = ring.claim(ref)
    assert ring._table.state[ref.slot] == READING
    return old, new


def test_late_finaliser_of_a_recovered_lease_never_clobbers_the_new_owner(make_ring):
    """The old holder's finaliser, run late, must be a no-op (its state is READING as
    expected, but not under its lease): one by one, in a batch, and for writers."""
    ring = make_ring(slots=1)
    t = ring._table
    ref = ring.put({"x": np.arange(4)})
    old, new = _recovered_and_leased_again(ring, ref)
    assert old.ack() is False
    assert t.state[ref.slot] == READING and ring.stats()["consumed"] == 0
    assert old.nack() is False and t.state[ref.slot] == READING
    new.nack()

    old, new = _recovered_and_leased_again(ring, ref)
    assert ring.try_finalise_many([old], True)  # the batch finaliser leaves it alone too
    assert t.state[ref.slot] == READING and ring.stats()["consumed"] == 0
    assert new.payload["x"].tolist() == [0, 1, 2, 3]
    assert new.ack() is True and ring.stats()["consumed"] == 1

    w_old = ring.reserve(timeout=0)
    t.forget_ownerships()
    assert ring.recover() == 1 and helpers.all_free(ring)
    w_new = ring.reserve(timeout=0)
    assert w_new.slot == w_old.slot
    w_old.abort()  # late abort: must not free the slot under the new writer
    assert ring.state_counts()["WRITING"] == 1
    w_new.set("y", np.ones(3))
    ref2 = w_new.publish()
    with ring.claim(ref2) as lease:
        assert lease.payload["y"].tolist() == [1.0, 1.0, 1.0]


def test_batch_claim_never_serves_a_stale_ref_the_newer_payload(make_ring):
    ring = make_ring(slots=2)
    old = ring.put({"x": np.array([1])})
    with ring.claim(old):
        pass
    new = ring.put({"x": np.array([2])})
    assert (new.slot, new.generation) == (old.slot, old.generation + 1)
    (got,) = ring.claim_many([old.slot], [old.generation])
    assert isinstance(got, shm.StaleSlotError) and ring.ready_count() == 1
    (got,) = ring.claim_many([new.slot], [new.generation])
    assert isinstance(got, shm.SlotLease) and got.payload["x"][0] == 2
    got.ack()


# ---------------------------------------------------------- futex wakes -----
@pytest.mark.timeout(60)
def test_publish_in_another_process_wakes_a_sleeping_reader_at_once(make_ring, ring_name, spawn):
    """A reader asleep on the ring's ready futex (wait_ready, 5 s) is woken by a publish
    in another process within milliseconds, not when its sleep times out."""
    _need_futex_introspection()
    ring = make_ring(slots=2)
    go, out_q = spawn.Event(), spawn.Queue()
    producer = spawn.Process(target=_publish_when_told, args=(ring_name, go, out_q))
    producer.start()
    got: dict = {}

    def reader():
        got["tid"] = threading.get_native_id()
        got["ready"] = ring.wait_ready(5.0)
        got["woke"] = time.monotonic()

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        assert helpers.wait_until(lambda: "tid" in got, timeout=5)
        assert helpers.wait_until(lambda: _in_futex_wait(got["tid"], ring._table.ready_addr), timeout=5, interval=0.001)
        go.set()
        published = out_q.get(timeout=30)
        th.join(10)
        assert got["ready"] is True
        assert got["woke"] - published < 1.0, f"woke {got['woke'] - published:.3f} s after the publish"
    finally:
        go.set()
        producer.join(30)
        th.join(10)
    assert producer.exitcode == 0


@pytest.mark.timeout(60)
def test_ack_wakes_a_writer_blocked_on_a_full_ring_at_once(make_ring):
    """A writer blocked on a full ring sleeps on the free futex; an ACK wakes it within
    milliseconds (without the wake it would notice only at the end of its 0.25 s slice)."""
    _need_futex_introspection()
    ring = make_ring(slots=1)
    ring.put(b"first")
    lat = []
    for i in range(3):
        got: dict = {}

        def writer():
            got["tid"] = threading.get_native_id()
            w = ring.reserve(timeout=5.0)
            got["t"] = time.monotonic()
            w.set_raw(b"next %d" % i)
            w.publish()

        th = threading.Thread(target=writer, daemon=True)
        th.start()
        assert helpers.wait_until(lambda: "tid" in got, timeout=5)
        assert helpers.wait_until(lambda: _in_futex_wait(got["tid"], ring._table.free_addr), timeout=5,
                                  interval=0.001)
        lease = ring.claim(timeout=0)
        t0 = time.monotonic()
        lease.ack()
        th.join(10)
        assert "t" in got
        lat.append(got["t"] - t0)
    assert statistics.median(lat) < 0.1, f"writer woke {lat} s after the ACK"


# ------------------------------------------------------------ frame fuzz ----
def _valid_frames():
    rng = np.random.default_rng(7)
    frames = []
    for k in range(6):
        payload = helpers.random_payload(rng, 4096)
        frames.append((payload, {"k": k, "tag": "x" * k}))
    frames.append(({"tokens": np.arange(50, dtype=np.int32), "lp": np.zeros((3, 7), np.float32),
                    "r": np.float32(1.5), "empty": np.zeros(0, np.int64)}, None))
    frames.append((b"raw payload bytes" * 9, {"raw": True}))
    frames.append((b"", None))
    out = []
    for payload, meta in frames:
        buf = bytearray(1 << 16)
        n = encode_into(buf, payload, meta)
        out.append(bytes(buf[:n]))
    return out


def _addr(a) -> int:
    return np.frombuffer(a, np.uint8).ctypes.data if isinstance(a, memoryview) else a.ctypes.data


def _check_decoded_or_frame_error(frame: bytearray) -> bool:
    """decode() must raise FrameError, or return views that lie inside the buffer and
    inside the frame's data area (never over the header, the field table or the metadata)."""
    try:
        p = decode(frame)
    except shm.FrameError:
        return False
    base, end = np.frombuffer(frame, np.uint8).ctypes.data, len(frame)
    table_off = FRAME_HEADER.unpack_from(frame, 0)[6]
    views = [p.raw] if p.raw is not None else list(p.values())
    if p.raw is not None:
        assert len(p.raw) == FRAME_HEADER.unpack_from(frame, 0)[8]  # exactly the declared raw length
    for v in views:
        n = v.nbytes
        if not n:
            continue
        lo = _addr(v) - base
        assert 0 <= lo and lo + n <= end, f"view [{lo}, {lo + n}) outside the {end}-byte buffer"
        assert FRAME_HEADER.size <= lo and lo + n <= table_off, \
            f"view [{lo}, {lo + n}) outside the data area [{FRAME_HEADER.size}, {table_off})"
    p.release()
    return True


def _mutate_frame(rnd: random.Random, frame: bytes) -> bytearray:
    b = bytearray(frame)
    total, table_off = FRAME_HEADER.unpack_from(b, 0)[5], FRAME_HEADER.unpack_from(b, 0)[6]
    n_fields = FRAME_HEADER.unpack_from(b, 0)[3]
    entries = [table_off + i * FIELD_ENTRY.size for i in range(n_fields)]
    interesting = [0, 1, 63, 64, 128, table_off - 64, table_off, table_off + 64, total - 64, total, total + 64,
                   len(b), 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 64]
    for _ in range(rnd.randint(1, 3)):
        how = rnd.random()
        if how < 0.3:  # any header byte
            b[rnd.randrange(FRAME_HEADER.size)] = rnd.randrange(256)
        elif how < 0.45:  # a header length/offset word: total_len, table_off, meta_off, raw_len
            off = rnd.choice([16, 24, 32, 40])
            struct.pack_into("<Q", b, off, min(max(0, rnd.choice(interesting) + rnd.choice([0, 0, 64, -64])),
                                               2**64 - 1))
        elif how < 0.75 and entries:  # a field entry's data offset: keeps shape x dtype == nbytes consistent
            val = rnd.choice(interesting + [64 * rnd.randrange(len(b) // 64 + 4)])
            struct.pack_into("<Q", b, rnd.choice(entries), min(max(0, val), 2**64 - 1))
        elif how < 0.9 and entries:  # any byte of the field table
            e = rnd.choice(entries)
            b[e + rnd.randrange(FIELD_ENTRY.size)] = rnd.randrange(256)
        elif len(b) > table_off:  # any byte of the index and metadata
            b[rnd.randrange(table_off, len(b))] = rnd.randrange(256)
    return b


def test_fuzzed_valid_frames_decode_inside_their_data_area_or_raise_frame_error():
    rnd = random.Random(20240607)
    frames = _valid_frames()
    decoded = 0
    for case in range(600):
        frame = frames[case % len(frames)]
        b = _mutate_frame(rnd, frame)
        try:
            decoded += _check_decoded_or_frame_error(b)
        except AssertionError as exc:
            raise AssertionError(f"case {case}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - anything but FrameError escaping the decoder is a bug
            pytest.fail(f"case {case}: decode raised {type(exc).__name__}: {exc}")
    assert 0 < decoded < 600  # both outcomes were exercised


# ---------------------------------------------------------- request fuzz ----
def _valid_requests() -> list[bytearray]:
    reqs = [
        Request(Op.HELLO, 1, text="s3cret"),
        Request(Op.GET, 2, slot=3, generation=7, max_nbytes=4096, text="ring-a", flags=1, ring_id=bytes(range(16))),
        Request(Op.TAKE, 3, n=8, wait_ms=250, max_nbytes=1 << 20, flags=4, hold_s=300),
        Request(Op.ACK, 4, n=2),
        Request(Op.NACK, 5, slot=1, generation=2, flags=2),
        Request(Op.STATS, 6),
        Request(Op.PING, 2**64 - 1),
        Request(Op.GET, 8, slot=65535, generation=2**64 - 1, text="é" * 100),
    ]
    return [encode_request(r) for r in reqs]


def _reseal(b: bytearray) -> None:
    struct.pack_into("<I", b, REQUEST.size - 4, zlib.crc32(bytes(b[: REQUEST.size - 4])))


def _decode_request_checked(b) -> Request | None:
    try:
        req = decode_request(b)
    except ProtocolError:
        return None
    except Exception as exc:  # noqa: BLE001 - the point of the test
        pytest.fail(f"decode_request raised {type(exc).__name__}: {exc} for {bytes(b)[:64]!r}...")
    assert isinstance(req, Request) and isinstance(req.op, Op)
    assert len(req.text.encode("utf-8")) <= MAX_TEXT
    return req


def test_fuzzed_requests_raise_protocol_error_or_decode():
    rnd = random.Random(99)
    valid = _valid_requests()
    for v in valid:
        assert _decode_request_checked(bytearray(v)) is not None
    accepted = 0
    for case in range(900):
        b = bytearray(valid[case % len(valid)])
        kind = case % 3
        if kind == 0:  # one byte changed: CRC-32 detects every error burst of <= 32 bits
            pos = rnd.randrange(len(b))
            b[pos] ^= rnd.randrange(1, 256)
            assert _decode_request_checked(b) is None, f"case {case}: byte {pos} changed, request accepted"
        elif kind == 1:  # several bytes changed, checksum recomputed: the parser's own checks
            for _ in range(rnd.randint(1, 4)):
                b[rnd.randrange(REQUEST.size - 4)] = rnd.randrange(256)
            _reseal(b)
            accepted += _decode_request_checked(b) is not None
        else:  # truncated or extended
            cut = rnd.randrange(0, 2 * len(b))
            b = b[:cut] if cut < len(b) else b + bytes(cut - len(b) + 1)
            assert _decode_request_checked(b) is None
    assert accepted > 0  # resealed mutations of fields the parser need not reject were accepted


def test_batch_ack_with_live_views_pins_the_slot_like_a_single_ack(make_ring):
    """A batch finaliser must honour view lifetime exactly as SlotLease.ack/nack do: a view
    alive at the batch ACK keeps its slot PINNED (never rewritten under it); a batch NACK
    with a live view returns the payload to READY only once the view is gone."""
    ring = make_ring(slots=4)
    refs = [ring.put({"x": np.full(8, i)}) for i in range(3)]
    leases = ring.claim_many([r.slot for r in refs], [r.generation for r in refs])
    kept = leases[0].payload["x"]          # a view alive at the ACK
    leases[1].payload                      # decoded, nothing kept
    assert ring.try_finalise_many(leases, True)
    counts = ring.state_counts()
    assert counts["PINNED"] == 1 and counts["FREE"] == 3 and ring.stats()["consumed"] == 3
    for _ in range(12):  # every other slot reused many times: the pinned one is never handed out
        with ring.claim(ring.put({"x": np.full(8, -1)})) as lease:
            assert lease.slot != refs[0].slot
    assert kept.tolist() == [0] * 8
    del kept
    assert ring.state_counts()["FREE"] == 4

    ref = ring.put({"x": np.full(8, 5)})
    (lease,) = ring.claim_many([ref.slot], [ref.generation])
    view = lease.payload["x"]
    assert ring.try_finalise_many([lease], False)
    assert ring.state_counts()["READING"] == 1 and ring.try_claim() is None  # held for the view
    del view
    with ring.claim(ref) as again:
        assert again.payload["x"].tolist() == [5] * 8


# ----------------------------------------------------- sync calls on the UCX loop --
#: engine.run hands a coroutine to the UCX loop thread; engine.run_here runs it in the calling
#: thread on a loop of its own (a direct call): both keep the same rules
RUNNERS = pytest.mark.parametrize("where", ["UCX loop", "calling thread"])


def _runner(engine, where: str):
    if where == "calling thread":
        assert engine.can_run_here()
        return engine.run_here
    return engine.run


@pytest.mark.timeout(60)
@RUNNERS
def test_engine_run_returns_raises_and_cancels_on_timeout(where):
    """A sync call of a coroutine gives its result, its own exception, or on timeout a
    TimeoutError with the coroutine cancelled (nothing keeps running behind the caller's back)."""
    import asyncio

    from ucxx_transport import engine

    engine.acquire()
    try:
        run = _runner(engine, where)
        ran_in: list = []

        async def value():
            ran_in.append(threading.current_thread())
            await asyncio.sleep(0)
            return 42

        async def fails():
            raise KeyError("inside")

        cancelled = threading.Event()

        async def hangs():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        assert run(value(), 5) == 42
        assert (ran_in[0] is threading.current_thread()) == (where == "calling thread"), ran_in
        with pytest.raises(KeyError, match="inside"):
            run(fails(), 5)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            run(hangs(), 0.2)
        assert time.monotonic() - t0 < 2
        # in the calling thread: cancelled before the call returned
        assert cancelled.is_set() if where == "calling thread" else cancelled.wait(5)
        assert run(value(), 5) == 42  # the loop is fine afterwards
    finally:
        engine.release()


@pytest.mark.timeout(60)
@RUNNERS
def test_engine_run_reports_a_cancelled_call_as_an_exception_and_a_negative_timeout_as_one(where):
    import asyncio
    import concurrent.futures

    from ucxx_transport import engine

    engine.acquire()
    try:
        run = _runner(engine, where)

        async def cancelled_on_the_loop():
            asyncio.current_task().cancel()
            await asyncio.sleep(0)

        async def slow():
            await asyncio.sleep(30)

        with pytest.raises(concurrent.futures.CancelledError):
            run(cancelled_on_the_loop(), 5)
        with pytest.raises(TimeoutError):
            run(slow(), -1)
    finally:
        engine.release()


def test_a_decode_error_kept_by_the_caller_holds_no_view_of_the_batch():
    import gc

    from shm.frame import decode_many, encode_into
    from shm.views import anchored

    buf = bytearray(8192)
    n = encode_into(memoryview(buf)[:4096], {"x": np.arange(4)}, {"k": 1})
    meta_at = n - 7
    buf[meta_at] = ord("#")  # the metadata is no longer JSON: decoded alone, with a FrameError
    gone = []
    u8, watch = anchored(buf, readonly=True, on_gone=lambda: gone.append(True))
    (err,) = decode_many(u8, [0], [n])
    assert isinstance(err, shm.FrameError)
    del u8
    gc.collect()
    assert gone and watch() is None, "the error's chained traceback keeps the buffer's views alive"
    assert isinstance(err, shm.FrameError)


def test_late_finalisations_queued_by_a_batch_are_applied_by_the_next_batch_claim(make_ring):
    ring = make_ring(slots=4)
    refs = [ring.put({"x": np.arange(4)}) for _ in range(2)]
    batch, _ = ring.claim_batch([r.slot for r in refs], [r.generation for r in refs])
    views = [p["x"] for p in batch.payloads()]
    assert batch.finalise(True)
    with ring._table._tlock:  # a ring call in progress when the collector frees the views
        del views
    assert len(ring._table._soon) == 2
    ring.claim_batch([], [])  # a batch-only reader: its next call applies them
    assert not ring._table._soon and (ring._table.state == shm.SlotState.FREE).all()
