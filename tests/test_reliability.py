"""Issue 8: each way a payload was lost, duplicated, misread or stuck, with real
processes. Each test failed on the code before its fix."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import shm
from clients import (
    AlreadyDeliveredError,
    CorruptPayloadError,
    InvalidRefError,
    NoAddressError,
    StaleSlotError,
    TransportClient,
    TransportError,
)
from shm.state import READY
from tests import helpers

pytestmark = pytest.mark.timeout(120)


put_many = helpers.put_many


def forge(ref, **fields):
    """A SlotRef with fields set around its constructor (what a buggy or hostile
    sender can hand a client, e.g. after unpickling)."""
    bad = object.__new__(shm.SlotRef)
    for k, v in {**ref.__dict__, **fields}.items():
        object.__setattr__(bad, k, v)
    return bad


# ------------------------------------------------------------- 1. bad refs --
@pytest.mark.parametrize("field,value", [
    ("slot", -1), ("slot", 1 << 20), ("generation", 2**64), ("generation", "7"), ("nbytes", 2**60),
    ("host", 123), ("ports", (70000,)), ("ports", ("x",)), ("ports", [[1]]), ("ring", "../etc"), ("ring_id", "zz"),
])
def test_slotref_validated_when_built(field, value):
    good = dict(ring="r", slot=1, generation=2, nbytes=10, host="h", ports=[1, 2], ring_id="ab" * 16)
    shm.SlotRef.from_dict(good)
    with pytest.raises(shm.InvalidRefError, match=field.rstrip("s")):
        shm.SlotRef.from_dict({**good, field: value})
    with pytest.raises(ValueError):  # InvalidRefError is also a ValueError
        shm.SlotRef(**{**good, field: value})


@pytest.mark.parametrize("local", [True, False])
def test_a_forged_ref_of_unhashable_or_lookalike_fields_is_its_own_error(make_ring, ring_name, serve, local):
    """Refs re-checked by the client: a ring or ring id of an unhashable type, or ports
    equal to a validated tuple but of floats or bools, are that ref's InvalidRefError
    (before, an unhashable name raised TypeError out of a same-host fetch_many)."""
    ring = make_ring(slots=8)
    serve(ring_name, "--n-ports", "1")
    refs = put_many(ring, 3)
    bad = [forge(refs[2], ring=[ring_name]), forge(refs[2], ring_id=[refs[2].ring_id]),
           forge(refs[2], ports=tuple(float(p) for p in refs[2].ports)), forge(refs[2], ports=(True,)),
           forge(refs[2], host=[refs[2].host]), forge(refs[2], ports=([refs[2].ports[0]],))]
    with TransportClient(local_fast_path=local, timeout=2.0) as c:
        results = c.fetch_many([refs[0], *bad, refs[1]])
        assert [r.payload["i"] for r in results if r.ok] == [0, 1]
        assert all(isinstance(r.error, InvalidRefError) for r in results[1:-1]), [r.error for r in results]
    assert ring.state_counts()["READY"] == 1  # the forged ref's payload is untouched


def test_one_malformed_ref_never_loses_the_batch(make_ring, ring_name, serve):
    ring = make_ring(slots=16)
    serve(ring_name, "--n-ports", "2")
    refs = put_many(ring, 6)
    good = refs[:5]
    bad = [forge(refs[5], slot=1 << 20), forge(refs[5], generation=2**64), forge(refs[5], host=7),
           forge(refs[5], ports=(70000,)), forge(refs[5], nbytes=2**62), {"ring": ring_name, "slot": "x"},
           "not a ref", forge(refs[5], nbytes=1 << 40)]
    batch = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], bad[4], good[3], bad[5], bad[6], good[4],
             bad[7]]
    with TransportClient(local_fast_path=False, timeout=2.0) as c:
        results = c.fetch_many(batch)
        assert len(results) == len(batch)
        got = [r for r in results if r.ok]
        assert [r.payload["i"] for r in got] == [0, 1, 2, 3, 4]
        for r in got:
            assert helpers.checksum(r.payload) == r.payload.meta["crc"]
        errors = [r.error for r in results if not r.ok]
        assert len(errors) == len(bad)
        assert all(isinstance(e, InvalidRefError) for e in errors[:-1]), errors
        with pytest.raises(InvalidRefError):
            c.fetch(bad[1])
    # the unrequested payload is still there; nothing else was consumed behind the caller's back
    assert ring.state_counts()["READY"] == 1 and helpers.wait_until(lambda: ring.state_counts()["FREE"] == 15)


# ----------------------------------------------------- 2. identity across hosts --
def _serve_in_private_shm(ring_name, n, tag):
    """A server whose /dev/shm is its own (another 'host' as far as rings go)."""
    code = f"from tests import helpers; helpers.fill_and_serve({ring_name!r}, {n}, {tag!r})"
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
           f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {sys.executable} -c \"{code}\""]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = p.stdout.readline()
    if not line:
        p.wait(10)
        raise RuntimeError(p.stderr.read()[-2000:])
    return p, json.loads(line)


@pytest.fixture
def private_shm_servers():
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private /dev/shm per server")
    procs = []

    def start(ring_name, n, tag):
        p, info = _serve_in_private_shm(ring_name, n, tag)
        procs.append(p)
        return info

    yield start
    for p in procs:
        p.stdin.close()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


def test_same_ring_name_on_two_hosts_both_delivered(ring_name, private_shm_servers):
    a = private_shm_servers(ring_name, 3, "A")
    b = private_shm_servers(ring_name, 3, "B")
    assert a["ring_id"] != b["ring_id"]
    with TransportClient(local_fast_path=False, timeout=5.0) as c:
        got = c.take(("127.0.0.1", a["ports"]), n=3, wait=1.0) + c.take(("127.0.0.1", b["ports"]), n=3, wait=1.0)
        srcs = sorted((p.meta["src"], p.meta["i"]) for p in got)
        assert srcs == [("A", 0), ("A", 1), ("A", 2), ("B", 0), ("B", 1), ("B", 2)]
        assert c.stats().get("duplicates_dropped", 0) == 0


# ------------------------------------------------- 3. ring re-created --------
def test_recreated_ring_long_lived_client_sees_new_payloads(ring_name, serve):
    with TransportClient(timeout=5.0) as c:
        ring = shm.RingBuffer.create(ring_name, slots=4, slot_bytes=1 << 16)
        old = ring.put({"x": np.zeros(10, np.int32)})
        assert c.fetch(old)["x"].sum() == 0  # local fast path: the client caches a handle of this segment
        ring.close()
        shm.RingBuffer.unlink_name(ring_name)
        ring = shm.RingBuffer.create(ring_name, slots=4, slot_bytes=1 << 16)
        try:
            new = ring.put({"x": np.full(10, 99, np.int32)})
            assert (new.slot, new.generation) == (old.slot, old.generation) and new.ring_id != old.ring_id
            p = c.fetch(new)
            assert p["x"].tolist() == [99] * 10
            p.release()
            with pytest.raises(StaleSlotError):  # the old ref names a ring that is gone
                c.fetch(old.with_address("127.0.0.1", [1]))
            # and over the network, TAKE from a server of the new ring is not mistaken for a repeat
            ring.put({"x": np.full(10, 7, np.int32)})
            srv = serve(ring_name)
            got = c.take(srv.address, n=1, wait=1.0)
            assert len(got) == 1 and got[0]["x"][0] == 7
        finally:
            ring.close()


# ------------------------------------ 5. GET exactly once across a server crash --
def _as_if_ack_died_with_server(ring, ref):
    """The slot state after a server crashed between receiving our ACK and applying
    it: READY again at the same generation (what recovery makes of its lease)."""
    t = ring._table
    assert t.state[ref.slot] == 0 and t.gen[ref.slot] == ref.generation  # consumed: FREE
    t.state[ref.slot] = READY


@pytest.mark.parametrize("local", [False, True])
def test_get_redelivered_after_crash_is_not_returned_twice(make_ring, ring_name, serve, local):
    ring = make_ring(slots=4)
    srv = serve(ring_name)
    (ref,) = put_many(ring, 1)
    with TransportClient(local_fast_path=local, timeout=5.0) as c:
        p = c.fetch(ref)
        assert p["i"] == 0
        p.release()
        assert helpers.wait_until(lambda: ring.state_counts()["FREE"] == 4)
        _as_if_ack_died_with_server(ring, ref)
        with pytest.raises(AlreadyDeliveredError):
            c.fetch(ref)
        # the repeat was ACKed: consumed, not left READY for someone else
        assert helpers.wait_until(lambda: ring.state_counts()["FREE"] == 4)
        _as_if_ack_died_with_server(ring, ref)
        res = c.fetch_many([ref])
        assert isinstance(res[0].error, AlreadyDeliveredError)
    assert srv.proc.poll() is None


# ----------------------------------------------- 6. frozen producer ----------
def test_producer_frozen_mid_transition_blocks_one_slot_only(make_ring, ring_name, serve, spawn):
    ring = make_ring(slots=4)
    held = spawn.Event()
    frozen = spawn.Process(target=helpers.freeze_holding_slot_lock, args=(ring_name, 0, held))
    frozen.start()
    try:
        assert held.wait(30)
        assert helpers.wait_until(lambda: open(f"/proc/{frozen.pid}/stat").read().split()[2] == "T")
        srv = serve(ring_name)
        t0 = time.monotonic()
        refs = [ring.put({"i": np.int64(i)}, timeout=2) for i in range(3)]  # the 3 other slots
        assert {r.slot for r in refs} == {1, 2, 3}
        with pytest.raises(shm.RingFullError):
            ring.put({"i": np.int64(9)}, timeout=0.5)  # the timeout is honoured
        assert time.monotonic() - t0 < 5
        assert ring.stuck_slots() == [0]
        with TransportClient(local_fast_path=False, timeout=3.0) as c:
            c.ping(srv.address)
            got = c.take(srv.address, n=3, wait=1.0)
            assert sorted(int(p["i"]) for p in got) == [0, 1, 2]
            assert c.server_stats(srv.address)["ring"]["stuck_slots"] == [0]
        assert helpers.wait_until(lambda: ring.state_counts()["FREE"] == 4)
    finally:
        frozen.kill()
        frozen.join(10)


# ------------------------------------------------ 8. poison payloads ---------
@pytest.mark.parametrize("meta", [[1, 2], "text", 5, {"x": object()}])
def test_put_refuses_meta_a_reader_cannot_decode(make_ring, meta):
    ring = make_ring(slots=2)
    with pytest.raises(TypeError, match="meta"):
        ring.put({"x": np.zeros(3)}, meta=meta)
    with ring.reserve() as w:
        w.set("x", np.zeros(3))
        with pytest.raises(TypeError):
            w.publish(meta)
    assert helpers.all_free(ring) and ring.stats()["published"] == 0


def test_undecodable_payload_is_dead_lettered_not_blocking(make_ring, ring_name, serve):
    ring = make_ring(slots=8)
    srv = serve(ring_name)
    (poison,) = put_many(ring, 1)
    ring.slot_array(poison.slot)[:4] = 0  # corrupted after publish (a buggy producer writing on)
    put_many(ring, 4)
    got = []
    with TransportClient(local_fast_path=False, timeout=3.0) as c:
        for _ in range(20):
            try:
                got += c.take(srv.address, n=2, wait=0.5)
            except CorruptPayloadError:
                continue
            if len(got) == 4:
                break
        assert sorted(int(p["i"]) for p in got) == [0, 1, 2, 3]  # the second put_many
        stats = c.server_stats(srv.address)
    assert stats["ring"]["dead_letters"] == 1 and stats["metrics"]["dead_letters"] == 1
    (dead,) = ring.dead_letters()
    assert (dead["slot"], dead["generation"]) == (poison.slot, poison.generation)
    assert len(ring.read_dead(poison.slot)) == poison.nbytes
    assert ring.discard_dead(poison.slot, poison.generation) and helpers.wait_until(lambda: helpers.all_free(ring))


# ------------------------------------- 9. refs across a server restart -------
def test_restart_reuses_ports_and_addressless_refs_resolve(make_ring, ring_name, serve):
    ring = make_ring(slots=8)
    early = put_many(ring, 1)[0]  # published while no server ran: no address
    assert early.host is None
    srv = serve(ring_name)
    before = put_many(ring, 1)[0]
    ports = srv.ports
    srv.kill()  # SIGKILL: nothing cleaned up
    srv2 = serve(ring_name)
    assert srv2.ports == ports  # the ports recorded in the ring header, free again
    with TransportClient(local_fast_path=False, timeout=3.0) as c:
        assert c.fetch(before)["i"] == 0
        assert c.fetch(early)["i"] == 0  # resolved through the ring's header
        with pytest.raises(NoAddressError):
            c.fetch(shm.SlotRef("no-such-ring-xyz", 0, 1, 10))


# ---------------------------------------------------------- 10. security -----
def test_create_refuses_existing_segment_and_attach_refuses_foreign(ring_name, tmp_path):
    path = f"/dev/shm/{ring_name}"
    r = shm.RingBuffer.create(ring_name, slots=2, slot_bytes=1 << 16)
    r.close()
    try:
        out = subprocess.run([sys.executable, "-m", "ucxx_transport", "serve", "--ring", ring_name, "--create",
                              "--host", "127.0.0.1"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 5 and "already exists" in out.stderr and "--attach-existing" in out.stderr  # RING
        os.chmod(path, 0o666)  # world-writable: anyone could have planted or may read it
        with pytest.raises(PermissionError, match="0666"):
            shm.RingBuffer.attach(ring_name)
        os.chown(path, 12345, 12345) if os.geteuid() == 0 else None
        os.chmod(path, 0o600)
        if os.geteuid() == 0:
            with pytest.raises(PermissionError, match="uid 12345"):
                shm.RingBuffer.attach(ring_name)
        shm.RingBuffer.attach(ring_name, allow_shared=True).close()
    finally:
        shm.RingBuffer.unlink_name(ring_name)


# ------------------------------------------------------------- 11. TAKE ------
def test_take_honours_max_nbytes_server_side(make_ring, ring_name, serve):
    ring = make_ring(slots=8, slot_bytes=1 << 20)
    srv = serve(ring_name)
    big = ring.put({"x": np.zeros(200_000, np.uint8)})
    small = put_many(ring, 2, size=100)
    with TransportClient(local_fast_path=False, timeout=3.0, max_nbytes=2000) as c:
        got = c.take(srv.address, n=4, wait=0.5)
        assert sorted(int(p["i"]) for p in got) == [0, 1] and all(p.nbytes <= 2000 for p in got)
        assert c.take(srv.address, n=4, wait=0.2) == []
    assert ring.state_counts()["READY"] == 1 and ring.try_claim(big) is not None
    assert small


def test_short_message_is_never_reparsed_as_the_previous_request(make_ring, ring_name, serve):
    from tests.rawucx import RawConn
    from ucxx_transport.protocol import Op, Request, Status

    make_ring(slots=2)
    srv = serve(ring_name)
    with RawConn("127.0.0.1", srv.ports[0]) as c:
        assert c.request(Request(Op.TAKE, 1, n=1, wait_ms=10)).status == Status.EMPTY
        c.send(b"U")  # one byte: the rest of the server's receive buffer is the old TAKE
        assert c.recv_response().status == Status.BAD_REQUEST


# ------------------------------------- 4. a closed stream consumes what it handed out only --
@pytest.mark.parametrize("mode", ["refs", "take", "local"])
def test_stream_close_gives_back_what_was_not_handed_out(make_ring, ring_name, serve, mode):
    ring = make_ring(slots=16)
    srv = serve(ring_name)
    refs = put_many(ring, 12)
    with TransportClient(local_fast_path=mode == "local", timeout=3.0) as c:
        if mode == "take":
            s = c.stream(address=srv.address, depth=4, take_n=2, wait=0.2)
        else:
            s = c.stream(iter(refs), depth=4)
        first = next(s)
        assert helpers.checksum(first) == first.meta["crc"]
        # let the fetcher run ahead (it fills its queue) before the consumer leaves
        helpers.wait_until(lambda: ring.state_counts()["READY"] <= 12 - 1 - 4, timeout=5)
        s.close()
        first_i = int(first["i"][()])
        first.release()
        assert helpers.wait_until(lambda: ring.state_counts()["READY"] == 11, timeout=10), ring.state_counts()
        # what came back is fetchable again, by anyone
        rest = c.take(srv.address, n=11, wait=1.0) if mode == "take" else \
            [r.payload for r in c.fetch_many([r for r in refs if r.key != refs[first_i].key])]
        assert len(rest) == 11 and all(helpers.checksum(p) == p.meta["crc"] for p in rest if p is not None)


# ------------------------------------- nothing left behind on a bad start (issue 11) --
@pytest.mark.parametrize("case", ["bad-env", "bad-mode", "port-in-use"])
def test_create_unlink_on_exit_leaves_no_segment_when_start_fails(make_ring, ring_name, serve, case):
    other = f"{ring_name}-b"
    env = dict(os.environ)
    args = ["--ring", other, "--create", "--unlink-on-exit", "--host", "127.0.0.1", "--slots", "2",
            "--slot-bytes", "64KiB"]
    if case == "bad-env":
        env["UCXX_TRANSPORT_ACK_TIMEOUT_S"] = "-1"
    elif case == "bad-mode":
        args += ["--progress-mode", "turbo"]
    else:
        make_ring(slots=2)
        busy = serve(ring_name)
        args += ["--ports", str(busy.ports[0])]
    try:
        out = subprocess.run([sys.executable, "-m", "ucxx_transport", "serve", *args], capture_output=True,
                             text=True, timeout=60, env=env)
        assert out.returncode != 0
        assert "Traceback" not in out.stderr, out.stderr[-2000:]
        assert not os.path.exists(f"/dev/shm/{other}")
    finally:
        shm.RingBuffer.unlink_name(other)


def test_unconfirmed_settle_still_counts_as_delivered_to_this_client(make_ring, ring_name, serve):
    """A held TAKE handed to the caller, then the server dies before the ACK is
    confirmed: the payload comes back READY after the restart, and this client must
    drop it (ACK it, never return it twice). Found by the fault campaign."""
    ring = make_ring(slots=4)
    srv = serve(ring_name)
    put_many(ring, 1)
    with TransportClient(local_fast_path=False, timeout=2.0, max_attempts=1) as c:
        d = c.submit_take(srv.address, n=1, wait=1.0, hold_s=30).result(30)
        assert len(d.items) == 1
        srv.kill()
        assert d.settle_sync(1, 10) is None  # unconfirmed: the server never saw the ACK
        srv2 = serve(ring_name)
        assert srv2.ports == srv.ports
        assert helpers.wait_until(lambda: ring.state_counts()["READY"] == 1)  # given back by recovery
        got = []
        for _ in range(3):  # the first call may meet the dead pooled endpoint
            try:
                got += c.take(srv2.address, n=1, wait=0.5)
            except TransportError:
                continue
            if helpers.all_free(ring):
                break
        assert got == [] and c.stats()["duplicates_dropped"] == 1
    assert helpers.wait_until(lambda: helpers.all_free(ring))


def test_refused_connection_fails_fast_not_at_the_deadline():
    """Nothing listens on the port: the connect fails within a fraction of the call
    timeout (the endpoint dies at once), not when the 5 s deadline passes (issue 11)."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ref = shm.SlotRef("nobody", 0, 1, 100, "127.0.0.1", (port,))
    with TransportClient(local_fast_path=False, timeout=5.0, max_attempts=1) as c:
        t0 = time.monotonic()
        res = c.fetch_many([ref])
        assert not res[0].ok and res[0].error.retryable
        assert time.monotonic() - t0 < 2.0


DEAD_SERVER_CLIENT = textwrap.dedent("""
    import json, sys, time, shm
    from clients import TransportClient
    refs = [shm.SlotRef.from_dict(d) for d in json.loads(sys.argv[1])]
    with TransportClient(local_fast_path=False, timeout=2.0) as c:  # default attempts and rounds
        t0 = time.monotonic()
        res = c.fetch_many(refs)
        print(json.dumps({"s": time.monotonic() - t0, "ok": [r.ok for r in res],
                          "retryable": [bool(getattr(r.error, "retryable", False)) for r in res]}))
""")


def test_fetch_many_against_a_dead_server_is_quick_and_quiet(make_ring, ring_name, serve):
    """Two refs, a server that was killed: the batch fails within a few seconds (refused
    connections fail fast, default attempts and rounds included), prints no UCX/UCXX C-level
    log lines, and warns once per port state change (quarantine), not once per attempt."""
    ring = make_ring(slots=4)
    srv = serve(ring_name, "--n-ports", "2")
    refs = [ring.put({"x": np.arange(3)}).to_dict() for _ in range(2)]
    srv.kill()
    env = {k: v for k, v in os.environ.items() if k not in ("UCX_LOG_LEVEL", "UCXX_LOG_LEVEL")}
    r = subprocess.run([sys.executable, "-c", DEAD_SERVER_CLIENT, json.dumps(refs)], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["ok"] == [False, False] and all(out["retryable"])
    assert out["s"] < 5.0, out
    assert "UCXX ERROR" not in r.stderr and "UCX  ERROR" not in r.stderr and "[UCX" not in r.stderr, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "quarantining" in ln]
    assert 1 <= len(warnings) <= 2, r.stderr  # one per port of the dead server, however many attempts
    assert ring.ready_count() == 2  # nothing consumed
