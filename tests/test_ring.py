import os
import stat
import threading

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import shm
from shm import RingBuffer, SlotRef

pytestmark = pytest.mark.timeout(60)


def test_create_attach_properties(make_ring, ring_name):
    r = make_ring(slots=4, slot_bytes=10000)
    assert (r.name, r.slots, r.slot_bytes) == (ring_name, 4, 10000)
    st_ = os.stat(f"/dev/shm/{ring_name}")
    assert stat.S_IMODE(st_.st_mode) == 0o600
    with RingBuffer.attach(ring_name) as r2:
        assert (r2.slots, r2.slot_bytes) == (4, 10000)
        ref = r2.put({"a": np.arange(3)})
    with r.claim(ref) as lease:
        np.testing.assert_array_equal(lease.payload["a"], np.arange(3))


def test_create_errors(make_ring, ring_name):
    make_ring()
    with pytest.raises(FileExistsError, match="attach"):
        RingBuffer.create(ring_name, slots=8, slot_bytes=1 << 16)
    with pytest.raises(shm.RingLayoutError, match="slots=8"):
        RingBuffer.create(ring_name, slots=9, slot_bytes=1 << 16, exist_ok=True)
    with pytest.raises(ValueError, match="ring name"):
        RingBuffer.create("a/b", slots=1, slot_bytes=4096)
    with pytest.raises(ValueError, match="slot_bytes"):
        RingBuffer.create("x-ok", slots=1, slot_bytes=10)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RingBuffer.attach("no-such-ring-xyz")


def test_slot_data_is_page_aligned(make_ring):
    r = make_ring(slots=3, slot_bytes=5000)
    for i in range(3):
        assert r.slot_array(i, headroom=True).ctypes.data % 4096 == 0  # slot region: page-aligned
        assert r.slot_array(i).ctypes.data % 64 == 0  # frame after the headroom: 64-byte aligned


def test_legal_transitions(make_ring):
    r = make_ring(slots=2)
    assert r.state_counts() == {"FREE": 2, "WRITING": 0, "READY": 0, "READING": 0, "DEAD": 0, "PINNED": 0}
    w = r.reserve()
    assert r.state_counts()["WRITING"] == 1
    w.set("x", np.ones(4))
    ref = w.publish()
    assert ref.generation == 1 and r.state_counts()["READY"] == 1 and r.ready_count() == 1
    lease = r.claim(ref)
    assert r.state_counts()["READING"] == 1
    assert lease.nack()
    assert r.state_counts()["READY"] == 1
    lease = r.claim(ref)
    assert lease.ack()
    assert r.state_counts()["FREE"] == 2
    with r.reserve():
        pass  # abort on exit without publish
    assert r.state_counts()["FREE"] == 2
    with pytest.raises(RuntimeError):
        with r.reserve() as w:
            w.set("x", np.ones(3))
            raise RuntimeError("producer bug")
    assert r.state_counts()["FREE"] == 2 and r.ready_count() == 0


def test_lease_context_manager_acks_or_nacks(make_ring):
    r = make_ring()
    ref = r.put({"x": np.ones(2)})
    with pytest.raises(KeyError):
        with r.claim(ref):
            raise KeyError("trainer bug")
    assert r.ready_count() == 1  # nacked: nothing lost
    with r.claim(ref):
        pass
    assert r.ready_count() == 0 and r.state_counts()["FREE"] == r.slots


def test_finalisers_in_wrong_state_are_noops(make_ring, caplog):
    r = make_ring(slots=1)
    ref = r.put({"x": np.ones(2)})
    lease = r.claim(ref)
    assert lease.ack()
    assert not lease.ack() and not lease.nack()  # already finalised
    # orphaned finaliser with an old lease number: must not clobber the new owner
    ref2 = r.put({"x": np.zeros(2)})
    t = r._table
    assert not t.nack(ref2.slot, lease._lease)
    assert not t.ack(ref2.slot, lease._lease)
    assert not t.abort(ref2.slot, lease._lease)
    assert r.state_counts()["READY"] == 1
    assert "ignored" in caplog.text
    w = r.reserve(timeout=0) if r.state_counts()["FREE"] else None
    assert w is None


def test_aba_stale_ref_never_served_newer_payload(make_ring):
    r = make_ring(slots=1)
    old = r.put({"x": np.array([1])})
    with r.claim(old):
        pass
    new = r.put({"x": np.array([2])})
    assert new.slot == old.slot and new.generation == old.generation + 1
    with pytest.raises(shm.StaleSlotError) as ei:
        r.claim(old)
    assert not ei.value.retryable
    with r.claim(new) as lease:
        assert lease.payload["x"][0] == 2


def test_busy_is_retryable_and_distinct_from_stale(make_ring):
    r = make_ring()
    ref = r.put({"x": np.ones(1)})
    lease = r.claim(ref)
    with pytest.raises(shm.SlotBusyError) as ei:
        r.claim(ref)
    assert ei.value.retryable
    lease.nack()
    r.claim(ref).ack()


def test_head_of_line_one_stuck_slot_blocks_nothing(make_ring):
    r = make_ring(slots=4)
    stuck = r.claim(r.put({"x": np.ones(1)}))  # held forever
    writer_stuck = r.reserve()  # and one stuck mid-write
    for i in range(50):
        ref = r.put({"i": np.array([i])}, timeout=1)
        assert ref.slot not in (stuck.slot, writer_stuck.slot)
        with r.claim(timeout=1) as lease:
            assert lease.payload["i"][0] == i
    stuck.ack()
    writer_stuck.abort()


def test_on_full_block_times_out_with_clear_error(make_ring):
    r = make_ring(slots=2)
    r.put(b"a")
    r.put(b"b")
    with pytest.raises(shm.RingFullError, match="no FREE slot"):
        r.put(b"c", timeout=0.2)
    assert r.ready_count() == 2


def test_on_full_block_wakes_when_slot_freed(make_ring):
    r = make_ring(slots=1)
    r.put(b"a")

    def consume():
        with r.claim(timeout=5):
            pass

    timer = threading.Timer(0.1, consume)
    timer.start()
    ref = r.put(b"b", timeout=5)  # blocks on the futex until the consumer's ack frees the slot
    assert r.stats()["consumed"] == 1 and ref.generation == 2
    timer.join()


def test_on_full_error(make_ring):
    r = make_ring(slots=1, on_full="error")
    r.put(b"a")
    with pytest.raises(shm.RingFullError):
        r.put(b"b", timeout=10)  # does not wait


def test_on_full_drop_oldest(make_ring):
    r = make_ring(slots=2, on_full="drop_oldest")
    a = r.put(b"a")
    r.put(b"b")
    c = r.put(b"c")
    assert r.stats()["drops"] == 1
    with pytest.raises(shm.StaleSlotError):
        r.claim(a)
    assert bytes(r.claim(timeout=0).payload.raw) == b"b"
    with r.claim(c) as lease:
        assert bytes(lease.payload.raw) == b"c"


def test_claim_oldest_follows_publish_order(make_ring):
    r = make_ring(slots=6)
    refs = [r.put({"i": np.array([i])}) for i in range(6)]
    with r.claim(refs[0]):  # consume 0, then publish 6 into its slot
        pass
    r.put({"i": np.array([6])})
    got = []
    for _ in range(6):
        with r.claim(timeout=0) as lease:
            got.append(int(lease.payload["i"][0]))
    assert got == [1, 2, 3, 4, 5, 6]
    with pytest.raises(shm.RingEmptyError):
        r.claim(timeout=0.05)


def test_payload_too_large_before_claim(make_ring):
    r = make_ring(slots=1, slot_bytes=4096)
    with pytest.raises(shm.PayloadTooLargeError, match="4096"):
        r.put({"x": np.zeros(5000, np.uint8)})
    assert r.state_counts()["FREE"] == 1


def test_ref_roundtrip_dict():
    ref = SlotRef("r", 3, 7, 100, host="10.0.0.1", ports=[1, 2])
    assert SlotRef.from_dict(ref.to_dict()) == ref
    assert ref.ports == (1, 2)
    with pytest.raises(ValueError, match="not a SlotRef"):
        SlotRef.from_dict({"ring": "r"})


def test_server_address_recorded_in_header(make_ring, ring_name):
    r = make_ring()
    assert r.put(b"x").host is None
    r.set_server_address("127.0.0.1", [5000, 5001])
    with RingBuffer.attach(ring_name) as r2:
        ref = r2.put(b"y")
        assert ref.host == "127.0.0.1" and ref.ports == (5000, 5001)
        with pytest.raises(shm.RingError, match="already served"):
            r2.set_server_address("h", [1])
    r.clear_server_address()
    assert r.put(b"z").host is None


# ------------------------------------------------------------ model test ----
class RingModel(RuleBasedStateMachine):
    SLOTS = 3

    def __init__(self):
        super().__init__()
        import uuid

        self.name = f"test-sm-{uuid.uuid4().hex[:8]}"
        self.ring = RingBuffer.create(self.name, slots=self.SLOTS, slot_bytes=4096)
        self.ready = {}  # key -> (ref, value); READY in model
        self.leased = {}  # key -> (lease, value)
        self.writers = []
        self.dead_refs = []
        self.counter = 0

    def teardown(self):
        for w in self.writers:
            w.abort()
        for lease, _ in self.leased.values():
            lease.nack()
        self.ring.close()
        RingBuffer.unlink_name(self.name)

    def used(self):
        return len(self.ready) + len(self.leased) + len(self.writers)

    @rule()
    def put(self):
        self.counter += 1
        if self.used() == self.SLOTS:
            with pytest.raises(shm.RingFullError):
                self.ring.put({"v": np.array([self.counter])}, timeout=0)
            return
        ref = self.ring.put({"v": np.array([self.counter])}, timeout=0)
        self.ready[ref.key] = (ref, self.counter)

    @precondition(lambda self: self.used() < self.SLOTS)
    @rule()
    def reserve(self):
        self.writers.append(self.ring.reserve(timeout=0))

    @precondition(lambda self: self.writers)
    @rule(publish=st.booleans())
    def finish_writer(self, publish):
        w = self.writers.pop()
        if publish:
            self.counter += 1
            w.set("v", np.array([self.counter]))
            ref = w.publish()
            self.ready[ref.key] = (ref, self.counter)
        else:
            w.abort()

    @rule()
    def claim_oldest(self):
        if not self.ready:
            with pytest.raises(shm.RingEmptyError):
                self.ring.claim(timeout=0)
            return
        lease = self.ring.claim(timeout=0)
        oldest = min(self.ready.values(), key=lambda rv: rv[1])
        assert lease.ref.key == oldest[0].key
        assert lease.payload["v"][0] == oldest[1]
        self.leased[lease.ref.key] = (lease, self.ready.pop(lease.ref.key)[1])

    @precondition(lambda self: self.ready)
    @rule(data=st.data())
    def claim_ref(self, data):
        key = data.draw(st.sampled_from(sorted(self.ready)))
        ref, v = self.ready.pop(key)
        lease = self.ring.claim(ref)
        assert lease.payload["v"][0] == v
        self.leased[key] = (lease, v)

    @precondition(lambda self: self.leased)
    @rule(data=st.data(), ack=st.booleans())
    def finish_lease(self, data, ack):
        key = data.draw(st.sampled_from(sorted(self.leased)))
        lease, v = self.leased.pop(key)
        if ack:
            assert lease.ack()
            self.dead_refs.append(lease.ref)
        else:
            assert lease.nack()
            self.ready[key] = (lease.ref, v)

    @precondition(lambda self: self.leased)
    @rule(data=st.data())
    def claim_busy(self, data):
        key = data.draw(st.sampled_from(sorted(self.leased)))
        with pytest.raises(shm.SlotBusyError):
            self.ring.claim(self.leased[key][0].ref)

    @precondition(lambda self: self.dead_refs)
    @rule(data=st.data())
    def claim_stale(self, data):
        ref = data.draw(st.sampled_from(self.dead_refs))
        with pytest.raises(shm.StaleSlotError):
            self.ring.claim(ref)

    @invariant()
    def counts_match(self):
        c = self.ring.state_counts()
        assert c["READY"] == len(self.ready) == self.ring.ready_count()
        assert c["READING"] == len(self.leased)
        assert c["WRITING"] == len(self.writers)
        assert c["FREE"] == self.SLOTS - self.used()
        assert self.ring.recover() == 0  # nobody is dead: recovery must touch nothing


RingModel.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_ring_state_machine = RingModel.TestCase


def test_finalise_after_close_is_a_logged_noop(make_ring, ring_name, caplog):
    r = make_ring(slots=2)
    ref = r.put(b"x")
    other = RingBuffer.attach(ring_name)
    lease = other.claim(ref)
    other.close()
    assert lease.ack() is False and "after its ring handle was closed" in caplog.text
    assert r.state_counts()["READING"] == 1
    # the closed handle's ownership lock is gone with its file description: recoverable
    assert r.recover() == 1 and r.ready_count() == 1


def test_slots_one_handle_holds_are_alive_to_another_handle_of_the_same_process(make_ring, ring_name):
    """The owner pid of a held slot is our own: whether its holder is alive is judged by this
    process's record of ownerships, for single leases and batches alike; once the holding
    handle closes they are recoverable."""
    ring = make_ring(slots=8)
    refs = [ring.put({"x": np.arange(4) + i}) for i in range(4)]
    holder = shm.RingBuffer.attach(ring_name)
    try:
        batch, codes = holder.claim_batch([r.slot for r in refs[:3]], [r.generation for r in refs[:3]])
        single = holder.claim(refs[3])
        assert (codes > 0).all() and ring.state_counts()["READING"] == 4
        assert ring.recover() == 0  # alive, in this very process
        batch.finalise(True)
        assert ring.recover() == 0 and ring.state_counts()["FREE"] == 7
    finally:
        holder.close()
    assert single is not None and ring.recover() == 1 and ring.ready_count() == 1


@pytest.mark.parametrize("layout", ["even", "uneven", "ragged", "large"])
def test_copy_frames_puts_each_frame_at_its_offset(make_ring, layout):
    """A batch's frames copied into a staging buffer (the server's coalesced answer): small
    frames of one size at evenly spaced offsets go in one gather, any other layout (and
    frames above GATHER_MAX) frame by frame; either way each frame lands whole at its
    offset and nothing else is written."""
    from shm.leases import GATHER_MAX

    ring = make_ring(slots=16)
    sizes = [(GATHER_MAX + 100 if layout == "large" else 40) + (i if layout == "ragged" else 0) for i in range(12)]
    refs = [ring.put({"x": np.full(n, i, np.uint8)}) for i, n in enumerate(sizes)]
    order = [5, 0, 11, 3, 7, 1, 9, 2, 10, 4, 8, 6]  # slots out of order, as a GETV names them
    batch, codes = ring.claim_batch([refs[i].slot for i in order], [refs[i].generation for i in order])
    assert (codes > 0).all()
    frames = [bytes(batch.frame(k)) for k in range(len(order))]
    step = max(len(f) for f in frames) + 64
    offsets = [k * step + (8 * k * k if layout == "uneven" else 0) for k in range(len(order))]
    out = np.full(offsets[-1] + step, 0xEE, np.uint8)  # (uneven: 8 k^2 bytes of gap grow between frames)
    batch.copy_frames(out, offsets)
    mask = np.ones(len(out), bool)
    for k, (off, f) in enumerate(zip(offsets, frames)):
        assert bytes(out[off:off + len(f)]) == f, k
        mask[off:off + len(f)] = False
    assert (out[mask] == 0xEE).all()
    part = np.full(len(out), 0xEE, np.uint8)
    batch.copy_frames(part, offsets[:3], [4, 5, 6])  # some items only (the server's coalesced plans)
    assert [bytes(part[o:o + len(frames[k])]) for o, k in zip(offsets[:3], (4, 5, 6))] == frames[4:7]
    batch.finalise(True)


def test_runs_of_consecutive_values_match_a_plain_loop():
    """The lock ranges of a batch: runs found with array operations, exactly what walking
    the values one by one gives (sorted or not, with repeats or not)."""
    from shm._sync import runs

    def walk(values):
        out = []
        for v in values:
            if out and out[-1][0] + out[-1][1] == v:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((v, 1))
        return out

    rng = np.random.default_rng(3)
    for _ in range(300):
        values = rng.integers(0, 12, int(rng.integers(0, 10))).tolist()
        if rng.random() < 0.5:
            values = sorted(set(values))
        assert runs(np.asarray(values, np.int64)) == walk(values), values
        assert runs(values) == walk(values), values
