"""Real processes (spawn), real shared memory, real SIGKILL."""

import os
import signal
import time

import numpy as np
import pytest

import shm
from shm import RingBuffer
from tests import helpers

pytestmark = pytest.mark.timeout(180)


def test_4_producers_2_consumers_exactly_once(make_ring, ring_name, spawn):
    ring = make_ring(slots=16, slot_bytes=1 << 18)
    per = 500
    out_q, res_q, stop = spawn.Queue(), spawn.Queue(), spawn.Event()
    prods = [spawn.Process(target=helpers.producer, args=(ring_name, per, s, 1 << 17, out_q)) for s in range(4)]
    cons = [spawn.Process(target=helpers.consumer, args=(ring_name, res_q, stop)) for _ in range(2)]
    for p in prods + cons:
        p.start()
    published, done = [], 0
    while done < 4:
        item = out_q.get(timeout=120)
        if item is None:
            done += 1
        else:
            published.append(item)
    for p in prods:
        p.join(30)
        assert p.exitcode == 0
    stop.set()
    results = [res_q.get(timeout=60) for _ in cons]
    for c in cons:
        c.join(30)
        assert c.exitcode == 0
    seen = [x for r in results for x in r[0]]
    assert sum(r[1] for r in results) == 0, "checksum mismatch: corrupt payload"
    assert all(len(r[0]) > 0 for r in results), "both consumers must make progress"
    assert len(published) == 4 * per
    ids = [(p, i) for p, i, _, _ in seen]
    assert len(ids) == len(set(ids)) == 4 * per, "every payload exactly once"
    keys = {(d["slot"], d["generation"]) for d in published}
    assert keys == {(s, g) for _, _, s, g in seen}
    assert ring.state_counts() == {"FREE": 16, "WRITING": 0, "READY": 0, "READING": 0, "DEAD": 0, "PINNED": 0}
    assert ring.stats()["published"] == ring.stats()["consumed"] == 4 * per


def test_sigkill_writer_at_random_points(make_ring, ring_name, spawn):
    ring = make_ring(slots=8, slot_bytes=1 << 20)
    helpers.sigkill_writer_trials(ring, ring_name, spawn, trials=12, seed=1234)


def test_sigkill_writer_recovered_automatically_by_blocked_writer(make_ring, ring_name, spawn):
    ring = make_ring(slots=1, slot_bytes=1 << 16)
    held = spawn.Event()
    # a process that reserves the only slot and is killed mid-write
    p = spawn.Process(target=_reserve_and_hang, args=(ring_name, held))
    p.start()
    assert held.wait(30)
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    # no operator action: the next put finds no FREE slot, recovers, succeeds
    ref = ring.put(b"after", timeout=5)
    assert ring.claim(ref).payload.raw.tobytes() == b"after"


def _reserve_and_hang(name, evt):
    r = RingBuffer.attach(name)
    w = r.reserve()
    w.set("x", np.ones(100))
    evt.set()
    time.sleep(3600)


def test_sigkill_reader_holding_lease_payload_ready_again(make_ring, ring_name, spawn):
    ring = make_ring(slots=4)
    payload = {"tokens": np.arange(1000, dtype=np.int32)}
    ref = ring.put(payload, meta={"crc": helpers.checksum(payload)})
    held = spawn.Event()
    p = spawn.Process(target=helpers.hold_lease, args=(ring_name, ref.to_dict(), held))
    p.start()
    assert held.wait(30)
    assert ring.state_counts()["READING"] == 1
    with pytest.raises(shm.SlotBusyError):
        ring.claim(ref)
    assert ring.recover() == 0  # owner alive: never reclaimed
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    # no operator action: claim(None) finds nothing READY, recovers, gets it
    with ring.claim(timeout=5) as lease:
        assert lease.ref.key == ref.key
        assert helpers.checksum(lease.payload) == lease.payload.meta["crc"]
    assert ring.state_counts()["FREE"] == 4


def test_live_owner_in_other_process_never_reclaimed(make_ring, ring_name, spawn):
    ring = make_ring(slots=2)
    ring.put(b"x")
    held = spawn.Event()
    p = spawn.Process(target=helpers.hold_lease, args=(ring_name, None, held))
    p.start()
    try:
        assert held.wait(30)
        for _ in range(20):
            assert ring.recover() == 0
        with pytest.raises(shm.RingEmptyError):
            ring.claim(timeout=0.3)  # its own recovery pass must not steal the lease
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)


def _unshare_pid_works() -> bool:
    import shutil
    import subprocess

    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "true"], timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _unshare_pid_works(), reason="needs root and unshare(1) for PID namespaces")
@pytest.mark.parametrize("held", ["writer", "lease"])
def test_a_live_holder_with_the_same_pid_in_another_pid_namespace_is_not_recovered(make_ring, ring_name, held):
    """Containers sharing /dev/shm each have their own PID namespace: the producer in one and
    the server in another are often both PID 1. A slot held by a live process whose PID
    number equals the recovering process's own must not look like one of its own slots
    that it no longer holds (before: recovered while held: a live writer's slot FREE, a live
    reader's payload READY again, so read twice)."""
    import subprocess
    import sys
    import textwrap

    ring = make_ring(slots=4)
    if held == "lease":
        ring.put({"x": np.arange(3)})
    env = dict(os.environ, PYTHONPATH=helpers.REPO)
    holder = subprocess.Popen(
        ["unshare", "--pid", "--fork", sys.executable, "-c", textwrap.dedent(f"""
            import os, sys, shm
            ring = shm.RingBuffer.attach({ring_name!r})
            h = ring.reserve(timeout=5) if {held!r} == "writer" else ring.claim(timeout=5)
            print(os.getpid(), h.slot, flush=True)
            sys.stdin.readline()  # held until the test says
            """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        pid, slot = map(int, holder.stdout.readline().split())
        assert pid == 1  # (PID 1 of its own namespace)
        held_state = ring.slot_info()[slot]["state"]
        recoverer = subprocess.run(
            ["unshare", "--pid", "--fork", sys.executable, "-c", textwrap.dedent(f"""
                import os, shm
                assert os.getpid() == 1
                ring = shm.RingBuffer.attach({ring_name!r})
                print(ring.recover())
                """)], capture_output=True, text=True, env=env, timeout=60)
        assert recoverer.returncode == 0, recoverer.stderr
        assert recoverer.stdout.split() == ["0"], recoverer.stdout
        assert ring.slot_info()[slot]["state"] == held_state  # still held by the live process
    finally:
        holder.stdin.close()
        holder.wait(30)
    ring.recover()  # the holder is gone now: its slot is recovered
    assert ring.state_counts()["FREE" if held == "writer" else "READY"] >= 1
