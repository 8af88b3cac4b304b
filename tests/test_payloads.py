"""Payloads as RL frameworks have them (issue 10): every numeric dtype plus bf16/fp8,
torch in and out, nested dicts and lists, ragged sequences, strings, scalars -- and
views that can never show a recycled slot's bytes."""

import gc
import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shm
from clients import TransportClient
from shm import PayloadReleasedError, Ragged
from shm.frame import FRAME_HEADER, decode, encode_into
from tests import helpers

pytestmark = pytest.mark.timeout(120)

NUMERIC = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
           np.float16, np.float32, np.float64, np.complex64, np.complex128]
ML = [ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.int4]
DTYPES = [np.dtype(d) for d in NUMERIC + ML]


# ----------------------------------------------------------- comparison --
def assert_same(got, want, where="payload"):
    """Structural equality; arrays compare dtype, shape and bytes (NaN payloads included)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), (where, got, want)
        for k in want:
            assert_same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, (list, tuple)) and not all(isinstance(x, str) for x in want):
        assert isinstance(got, (list, Ragged)) and len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}/{i}")
    elif isinstance(want, Ragged):
        assert_same(got, list(want), where)
    elif isinstance(want, np.ndarray) or isinstance(want, np.generic):
        want = np.asarray(want)
        assert isinstance(got, np.ndarray), (where, type(got))
        assert got.dtype == want.dtype and got.shape == want.shape, (where, got.dtype, got.shape, want.dtype,
                                                                     want.shape)
        assert got.tobytes() == np.ascontiguousarray(want).tobytes(), where
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), where
    else:
        assert type(got) is type(want) and got == want, (where, got, want)


# ----------------------------------------------------------- strategies --
@st.composite
def arrays(draw, dtype=None, min_ndim=0):
    dt = draw(st.sampled_from(DTYPES)) if dtype is None else dtype
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=min_ndim, max_size=3)))
    n = math.prod(shape) * dt.itemsize
    raw = draw(st.binary(min_size=n, max_size=n))
    return np.frombuffer(raw, dt).reshape(shape).copy()


@st.composite
def ragged_lists(draw):
    dt = draw(st.sampled_from(DTYPES))
    tail = tuple(draw(st.lists(st.integers(1, 3), max_size=1)))
    items = []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(0, 5))
        raw = draw(st.binary(min_size=n * math.prod(tail) * dt.itemsize, max_size=n * math.prod(tail) * dt.itemsize))
        items.append(np.frombuffer(raw, dt).reshape((n, *tail)).copy())
    return items


keys = st.text(min_size=1, max_size=8)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**62, 2**62), st.floats(allow_nan=True))
leaves = st.one_of(arrays(), ragged_lists(), st.text(max_size=20), st.binary(max_size=20), scalars,
                   st.lists(st.text(max_size=5), min_size=1, max_size=4))
values = st.recursive(leaves, lambda inner: st.one_of(st.dictionaries(keys, inner, max_size=3),
                                                      st.lists(inner, max_size=3)), max_leaves=8)
payloads = st.dictionaries(keys, values, max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads)
def test_structured_round_trip_frame(p):
    buf = bytearray(1 << 20)
    n = encode_into(buf, p, meta={"k": 1})
    got = decode(memoryview(buf)[:n])
    assert got.meta == {"k": 1}
    assert_same(dict(got), p)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=payloads)
def test_structured_round_trip_put_claim(make_ring, p):
    ring = getattr(test_structured_round_trip_put_claim, "ring", None)
    if ring is None or ring._closed:
        ring = test_structured_round_trip_put_claim.ring = make_ring(slots=2, slot_bytes=1 << 20)
    ref = ring.put(p, timeout=5)
    lease = ring.claim(ref, timeout=5)
    got = dict(lease.payload)
    lease.ack()
    try:
        assert_same(got, p)
    finally:
        del got
        assert ring.state_counts()["FREE"] == 2


@pytest.mark.parametrize("dt", DTYPES, ids=str)
def test_every_dtype_flat_round_trip(dt):
    a = np.frombuffer(np.random.default_rng(0).bytes(12 * dt.itemsize), dt).reshape(3, 4)
    buf = bytearray(4096)
    got = decode(memoryview(buf)[:encode_into(buf, {"x": a, "nc": a.T})])
    assert_same(got["x"], a)
    assert_same(got["nc"], a.T)  # non-contiguous input written correctly


def test_what_a_payload_can_hold_reads_back_as_documented():
    p = {
        "tokens": np.arange(6, dtype=np.int32),
        "obs": {"image": np.zeros((2, 2, 3), np.uint8), "depth": np.ones(4, ml_dtypes.bfloat16)},
        "turns": [np.arange(3), np.arange(5), np.arange(0)],      # ragged -> Ragged
        "texts": ["prompt", "réponse"],                           # list of str
        "prompt": "hello", "blob": b"\x00\x01", "reward": 0.5, "done": True, "id": None,
        "mixed": [np.arange(2), "x", 3],                          # a plain list
    }
    buf = bytearray(1 << 16)
    got = decode(memoryview(buf)[:encode_into(buf, p)])
    assert isinstance(got["turns"], Ragged) and [len(t) for t in got["turns"]] == [3, 5, 0]
    assert got["turns"].offsets.tolist() == [0, 3, 8, 8]
    assert got["turns"].padded(-1).tolist() == [[0, 1, 2, -1, -1], [0, 1, 2, 3, 4], [-1] * 5]
    assert got["texts"] == ["prompt", "réponse"] and got["prompt"] == "hello" and got["blob"] == b"\x00\x01"
    assert (got["reward"], got["done"], got["id"]) == (0.5, True, None)
    assert got["obs"]["depth"].dtype == ml_dtypes.bfloat16
    assert_same(got["mixed"], [np.arange(2), "x", 3])


@pytest.mark.parametrize("bad,msg", [
    ({"x": object()}, "payload value at 'x' is a object"),
    ({"x": {1: np.ones(2)}}, "keys must be non-empty str"),
    ({"x": np.array(["a"], dtype=object)}, "dtype object is not supported"),
    ({"x": [np.ones(2, np.float32), np.ones(2, np.int8)]}, None),  # not raggable: stored as a list
])
def test_unsupported_values_are_refused_clearly(make_ring, bad, msg):
    ring = make_ring(slots=2)
    if msg is None:
        ref = ring.put(bad)
        with ring.claim(ref) as lease:
            assert isinstance(lease.payload["x"], list)
        return
    with pytest.raises(TypeError, match=msg):
        ring.put(bad)
    assert ring.state_counts()["FREE"] == 2  # nothing published, nothing leaked


@pytest.mark.parametrize("meta", [[1, 2], {"x": object()}, "text"])
def test_bad_meta_refused_at_put_nothing_published(make_ring, meta):
    ring = make_ring(slots=2)
    with pytest.raises(TypeError, match="meta must be"):
        ring.put({"x": np.ones(2)}, meta=meta)
    assert ring.state_counts()["FREE"] == 2


def test_version_1_frames_still_decode_and_unknown_versions_fail_clearly():
    buf = bytearray(4096)
    n = encode_into(buf, {"x": np.arange(4, dtype=np.float32)}, meta={"a": 1})
    v1 = bytearray(buf[:n])
    v1[4:6] = (1).to_bytes(2, "little")  # a flat numpy payload is laid out as in version 1
    got = decode(memoryview(v1))
    assert got["x"].tolist() == [0, 1, 2, 3] and got.meta == {"a": 1}
    v9 = bytearray(buf[:n])
    v9[4:6] = (9).to_bytes(2, "little")
    with pytest.raises(shm.FrameError, match="frame version 9 is not supported"):
        decode(memoryview(v9))
    assert FRAME_HEADER.size == 64


# ----------------------------------------------------------------- torch --
@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="torch is not installed (pip install 'ucxx-transport[torch]')")


def test_torch_in_any_dtype_noncontiguous_requires_grad(make_ring, torch):
    ring = make_ring(slots=2)
    src = {
        "logp": torch.randn(4, 6, dtype=torch.bfloat16).t(),         # non-contiguous bf16
        "w": torch.randn(3, requires_grad=True),                      # requires_grad: detached
        "fp8": torch.randn(5).to(torch.float8_e4m3fn),
        "ids": torch.arange(10, dtype=torch.int64)[::2],
        "turns": [torch.arange(3), torch.arange(2)],                  # ragged torch
    }
    ref = ring.put(src)
    with ring.claim(ref) as lease:
        p = lease.payload
        assert p["logp"].dtype == ml_dtypes.bfloat16 and p["fp8"].dtype == ml_dtypes.float8_e4m3fn
        t = p.to_torch()
        assert t["logp"].dtype == torch.bfloat16 and torch.equal(t["logp"], src["logp"])
        assert torch.equal(t["w"], src["w"].detach())
        assert torch.equal(t["fp8"].view(torch.uint8), src["fp8"].view(torch.uint8))
        assert torch.equal(t["ids"], src["ids"]) and torch.equal(t["turns"][1], torch.arange(2))
        # zero-copy: the tensor's memory is the slot's
        assert t["ids"].data_ptr() == p["ids"].ctypes.data


def test_to_torch_of_arrays_tensors_and_array_subclasses(torch):
    from shm import dtypes

    sub = np.arange(6, dtype=np.float32).reshape(2, 3).view(np.recarray)  # an ndarray subclass
    assert torch.equal(dtypes.to_torch(sub), torch.arange(6, dtype=torch.float32).reshape(2, 3))
    bf = np.arange(4, dtype=np.float32).astype(ml_dtypes.bfloat16)
    t = dtypes.to_torch(bf)
    assert t.dtype == torch.bfloat16 and t.tolist() == [0.0, 1.0, 2.0, 3.0] and t.data_ptr() == bf.ctypes.data
    own = torch.ones(3)
    assert dtypes.to_torch(own) is own
    grad = torch.ones(3, requires_grad=True)
    assert not dtypes.torch_as_numpy(grad).flags.owndata  # detached, then shared: no copy
    np.testing.assert_array_equal(dtypes.torch_as_numpy(grad), np.ones(3, np.float32))


def test_client_tensor_type_torch_over_the_network(make_ring, ring_name, serve, torch):
    ring = make_ring(slots=8)
    srv = serve(ring_name)
    x = torch.randn(16, dtype=torch.bfloat16)
    refs = [ring.put({"x": x, "n": {"ids": torch.arange(i + 1)}}) for i in range(4)]
    with TransportClient(local_fast_path=False, tensor_type="torch", timeout=5) as c:
        one = c.fetch(refs[0])
        assert isinstance(one["x"], torch.Tensor) and one["x"].dtype == torch.bfloat16 and torch.equal(one["x"], x)
        many = c.fetch_many(refs[1:3])
        assert all(torch.equal(r.payload["n"]["ids"], torch.arange(i + 2)) for i, r in enumerate(many))
        taken = c.take(srv.address, n=1, wait=1.0)
        assert torch.equal(taken[0]["x"], x)
    with pytest.raises(ValueError, match="tensor_type"):
        TransportClient(tensor_type="jax")


# ------------------------------------------------------- view lifetime ----
PRODUCE_CONSUME = textwrap.dedent("""
    import sys, numpy as np, shm
    ring = shm.RingBuffer.attach(sys.argv[1])
    pinned = int(sys.argv[2])
    for i in range(int(sys.argv[3])):
        ref = ring.put({"x": np.full(1024, 99, np.int64)}, timeout=5)
        assert ref.slot != pinned, "a pinned slot was handed to a writer"
        with ring.claim(ref, timeout=5) as lease:
            assert int(lease.payload["x"][0]) == 99
    print("ok")
""")


def test_view_kept_past_ack_never_sees_a_reused_slot(make_ring, ring_name):
    ring = make_ring(slots=4, slot_bytes=1 << 16)
    ref = ring.put({"x": np.arange(1024, dtype=np.int64)})
    with ring.claim(ref) as lease:
        view = lease.payload["x"]
    assert ring.state_counts()["PINNED"] == 1  # consumed (never served again), memory kept
    with pytest.raises(shm.StaleSlotError):
        ring.claim(ref)
    out = subprocess.run([sys.executable, "-c", PRODUCE_CONSUME, ring_name, str(ref.slot), "200"],
                         capture_output=True, text=True, timeout=60, cwd=helpers.REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    np.testing.assert_array_equal(view, np.arange(1024))  # never [99 99 ...]
    del view
    assert ring.state_counts() == {**{s.name: 0 for s in shm.SlotState}, "FREE": 4}


def test_release_then_use_raises_but_kept_views_stay_valid(make_ring):
    ring = make_ring(slots=2)
    ref = ring.put({"x": np.arange(8), "s": "text"})
    lease = ring.claim(ref)
    p = lease.payload
    x = p["x"]
    lease.ack()
    p.release()
    with pytest.raises(PayloadReleasedError):
        p["x"]
    with pytest.raises(PayloadReleasedError):
        len(p)
    assert x.tolist() == list(range(8)) and ring.state_counts()["PINNED"] == 1
    del x
    assert ring.state_counts()["FREE"] == 2


def test_nack_with_live_views_returns_the_payload_only_when_they_are_gone(make_ring):
    ring = make_ring(slots=2)
    ref = ring.put({"x": np.arange(8)})
    lease = ring.claim(ref)
    view = lease.payload["x"]
    lease.nack()
    assert ring.state_counts()["READING"] == 1 and ring.try_claim() is None  # nobody can rewrite it yet
    del view
    assert ring.state_counts()["READY"] == 1
    with ring.claim(ref) as again:
        assert again.payload["x"].tolist() == list(range(8))


HOLDER = textwrap.dedent("""
    import sys, time, shm
    ring = shm.RingBuffer.attach(sys.argv[1])
    lease = ring.claim(timeout=5)
    view = lease.payload["x"]
    lease.ack()
    print("holding", flush=True)
    time.sleep(60)
""")


def test_process_killed_holding_views_frees_its_slots(make_ring, ring_name):
    ring = make_ring(slots=2)
    ring.put({"x": np.arange(8)})
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, ring_name], stdout=subprocess.PIPE, text=True,
                            cwd=helpers.REPO)
    try:
        assert proc.stdout.readline().strip() == "holding"
        assert ring.state_counts()["PINNED"] == 1 and ring.recover() == 0  # alive: its slot is kept
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert ring.recover() == 1
        assert ring.state_counts()["FREE"] == 2 and ring.stats()["consumed"] == 1  # consumed once, not redelivered
    finally:
        proc.kill()


def test_a_decoded_batch_keeps_all_its_slots_until_its_last_view_is_gone(make_ring, ring_name):
    """A batch decoded together shares one anchor: one live view of any of its payloads keeps
    every slot of the batch PINNED (never handed to a writer), and when the last view goes
    they are all freed; their views are read-only and show their own payload's bytes."""
    ring = make_ring(slots=8, slot_bytes=1 << 16)
    refs = [ring.put({"x": np.full(1024, i, np.int64)}) for i in range(4)]
    batch, codes = ring.claim_batch([r.slot for r in refs], [r.generation for r in refs])
    assert (codes > 0).all()
    payloads = batch.payloads()
    kept = payloads[2]["x"]
    assert not kept.flags.writeable and [int(p["x"][0]) for p in payloads] == [0, 1, 2, 3]
    del payloads
    assert batch.finalise(True)
    assert ring.state_counts()["PINNED"] == 4 and ring.stats()["consumed"] == 4
    out = subprocess.run([sys.executable, "-c", PRODUCE_CONSUME, ring_name, str(refs[0].slot), "100"],
                         capture_output=True, text=True, timeout=60, cwd=helpers.REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]  # 4 slots left to reuse
    assert ring.state_counts()["PINNED"] == 4 and kept.tolist() == [2] * 1024
    del kept
    assert ring.state_counts() == {**{s.name: 0 for s in shm.SlotState}, "FREE": 8}


def test_a_decoded_batch_nacked_with_live_views_goes_back_only_when_they_are_gone(make_ring):
    ring = make_ring(slots=4)
    refs = [ring.put({"x": np.arange(8) + i}) for i in range(3)]
    batch, _ = ring.claim_batch([r.slot for r in refs], [r.generation for r in refs])
    view = batch.payloads()[1]["x"]
    assert batch.finalise(False)
    assert ring.state_counts()["READING"] == 3 and ring.try_claim() is None  # nobody can rewrite them yet
    del view
    assert ring.state_counts()["READY"] == 3
    assert [int(ring.claim(r).payload["x"][0]) for r in refs] == [0, 1, 2]


def test_a_decoded_batch_freed_while_the_ring_is_busy_is_applied_later(make_ring):
    ring = make_ring(slots=4)
    refs = [ring.put({"x": np.arange(4)}) for _ in range(2)]
    batch, _ = ring.claim_batch([r.slot for r in refs], [r.generation for r in refs])
    views = [p["x"] for p in batch.payloads()]
    assert batch.finalise(True) and ring.state_counts()["PINNED"] == 2
    with ring._table._tlock:  # what a ring call interrupted by the collector would hold
        del views  # the batch's callback runs now: it must not deadlock
    assert ring.state_counts()["PINNED"] == 0 and ring.state_counts()["FREE"] == 4


BATCH_HOLDER = textwrap.dedent("""
    import json, sys, time, shm
    from clients import TransportClient
    refs = [shm.SlotRef.from_dict(json.loads(arg)) for arg in sys.argv[1:]]
    client = TransportClient(local_fast_path=True, timeout=5)
    views = [r.payload["x"] for r in client.fetch_many(refs)]
    print("holding", len(views), flush=True)
    time.sleep(60)
""")


def test_process_killed_holding_a_batchs_views_frees_its_slots_and_redelivers_nothing(make_ring, ring_name):
    ring = make_ring(slots=8)
    refs = [ring.put({"x": np.arange(8) + i}) for i in range(5)]
    proc = subprocess.Popen([sys.executable, "-c", BATCH_HOLDER, *[json.dumps(r.to_dict()) for r in refs]],
                            stdout=subprocess.PIPE, text=True, cwd=helpers.REPO)
    try:
        assert proc.stdout.readline().split() == ["holding", "5"]
        assert ring.state_counts()["PINNED"] == 5 and ring.recover() == 0  # alive: its slots are kept
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert ring.recover() == 5
        assert ring.state_counts()["FREE"] == 8 and ring.stats()["consumed"] == 5  # consumed once each
    finally:
        proc.kill()


@pytest.mark.parametrize("how", ["fetch", "fetch_many", "local"])
def test_client_views_survive_release_and_buffer_or_slot_reuse(make_ring, ring_name, serve, how):
    ring = make_ring(slots=4, slot_bytes=1 << 16)
    serve(ring_name)
    with TransportClient(local_fast_path=how == "local", timeout=5) as c:
        first = ring.put({"x": np.arange(2048, dtype=np.int32)})
        p = c.fetch(first) if how != "fetch_many" else c.fetch_many([first])[0].payload
        view = p["x"]
        p.release()
        del p
        for i in range(40):  # same size: the receive buffer (or the slot) would be reused
            refs = [ring.put({"x": np.full(2048, 7, np.int32)}) for _ in range(2)]
            got = c.fetch_many(refs) if how == "fetch_many" else [c.fetch(r) for r in refs]
            del got
        np.testing.assert_array_equal(view, np.arange(2048))
        del view
    assert helpers.wait_until(lambda: helpers.all_free(ring)), ring.state_counts()


def test_last_view_dropped_while_the_ring_is_busy_is_applied_later(make_ring):
    """The view callback may run inside the garbage collector, in the middle of a ring
    call that holds the table's thread lock: it must not block, and must not be lost."""
    ring = make_ring(slots=2)
    ring.put({"x": np.arange(4)})
    lease = ring.claim()
    view = lease.payload["x"]
    lease.ack()
    assert ring.state_counts()["PINNED"] == 1
    with ring._table._tlock:  # what a ring call interrupted by the collector would hold
        del view  # the callback runs now: it must not deadlock
    assert ring.state_counts()["PINNED"] == 0 and ring.state_counts()["FREE"] == 2  # applied on the next call


# ---------------------------------------------------- field-selective fetch --
def test_field_selective_fetch_sends_only_those_fields_and_consumes_the_payload(make_ring, ring_name, serve):
    ring = make_ring(slots=8, slot_bytes=2 << 20)
    srv = serve(ring_name)
    big = np.ones(1 << 20, np.uint8)
    refs = [ring.put({"tokens": np.arange(i + 4), "image": big, "turns": [np.arange(2), np.arange(3)],
                      "prompt": f"p{i}"}, meta={"i": i}) for i in range(4)]
    with TransportClient(local_fast_path=False, timeout=5) as c:
        before = c.server_stats(srv.address)["metrics"]["bytes_out"]
        got = c.fetch_many(refs[:2], fields=["tokens", "turns", "missing"])
        assert [sorted(r.payload) for r in got] == [["tokens", "turns"]] * 2
        assert got[1].payload["tokens"].tolist() == list(range(5)) and got[1].payload.meta == {"i": 1}
        assert [len(t) for t in got[0].payload["turns"]] == [2, 3]
        one = c.fetch(refs[2], fields=["prompt"])
        assert dict(one) == {"prompt": "p2"}
        taken = c.take(srv.address, n=1, wait=1.0, fields=["tokens"])
        assert list(taken[0]) == ["tokens"] and taken[0].meta == {"i": 3}
        sent = c.server_stats(srv.address)["metrics"]["bytes_out"] - before
        assert sent < 64 << 10, f"{sent} bytes sent: the 1 MiB fields travelled"
        with pytest.raises(ValueError, match="fields must be"):
            c.fetch_many(refs, fields=[])
    # the whole payloads were consumed (rule: a projection consumes the payload)
    assert helpers.wait_until(lambda: helpers.all_free(ring)), ring.state_counts()
    with pytest.raises(shm.StaleSlotError):
        ring.claim(refs[0])


def test_field_selective_fetch_same_host_reads_in_place(make_ring, ring_name, serve):
    ring = make_ring(slots=4)
    serve(ring_name)
    ref = ring.put({"a": np.arange(3), "b": np.zeros(4)})
    with TransportClient(timeout=5) as c:
        r = c.fetch_many([ref], fields=["b"])[0]
        assert list(r.payload) == ["b"] and c.stats().get("local_fetches") == 1


# ------------------------------------------- round trips over the network --
class _NetRig:
    """One server + client reused across hypothesis examples (a server per example would cost seconds)."""

    def __init__(self, make_ring, ring_name, serve):
        self.ring = make_ring(slots=4, slot_bytes=1 << 20)
        self.server = serve(ring_name)
        self.client = TransportClient(local_fast_path=False, timeout=10)


def _net_rig(fn, make_ring, ring_name, serve) -> _NetRig:
    rig = getattr(fn, "rig", None)
    if rig is None or rig.ring._closed:
        if rig is not None:
            rig.client.close()
        rig = fn.rig = _NetRig(make_ring, ring_name, serve)
    return rig


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=payloads, how=st.sampled_from(["fetch", "fetch_many", "take"]))
def test_structured_round_trip_over_the_network(make_ring, ring_name, serve, p, how):
    rig = _net_rig(test_structured_round_trip_over_the_network, make_ring, ring_name, serve)
    ref = rig.ring.put(p, timeout=5)
    if how == "fetch":
        got = rig.client.fetch(ref)
    elif how == "fetch_many":
        [r] = rig.client.fetch_many([ref])
        assert r.ok, r.error
        got = r.payload
    else:
        [got] = rig.client.take(rig.server.address, n=1, wait=5.0)
    assert got.meta == {} or got.meta is not None
    assert_same(dict(got), p)
    got.release()
    assert rig.ring.ready_count() == 0


def test_client_copy_true_hands_out_owned_arrays_and_frees_the_slot_at_once(make_ring, ring_name, serve):
    ring = make_ring(slots=4)
    serve(ring_name)
    refs = [ring.put({"x": np.arange(16) + i, "r": [np.arange(i + 1)]}) for i in range(3)]
    with TransportClient(copy=True, timeout=5) as local, TransportClient(copy=True, local_fast_path=False,
                                                                          timeout=5) as net:
        kept = [local.fetch(refs[0]), net.fetch(refs[1]), net.fetch_many([refs[2]])[0].payload]
        # the caller still holds every array, yet no slot is pinned by them: they are owned copies
        # (the servers apply the network fetches' ACKs a moment after the fetch returns)
        assert helpers.wait_until(lambda: ring.state_counts()["FREE"] == 4), ring.state_counts()
        assert ring.state_counts()["PINNED"] == 0
        for i, p in enumerate(kept):
            assert p["x"].flags.owndata and p["x"].tolist() == list(range(i, 16 + i))
            assert p["r"][0].tolist() == list(range(i + 1))
        for i in range(8):  # every slot reused: the copies never change
            with ring.claim(ring.put({"x": np.full(16, -1)})) as lease:
                assert lease.payload["x"][0] == -1
        assert [p["x"][0] for p in kept] == [0, 1, 2]


def test_pinned_slots_show_in_ring_stats(make_ring):
    ring = make_ring(slots=2)
    lease = ring.claim(ring.put({"x": np.arange(4)}))
    view = lease.payload["x"]
    lease.ack()
    assert ring.stats()["states"]["PINNED"] == 1
    del view
    assert ring.stats()["states"]["PINNED"] == 0


def test_torch_values_pad_copy_and_write_like_numpy(make_ring, torch):
    ring = make_ring(slots=2)
    with ring.reserve() as w:  # the incremental writer takes torch tensors too (bf16 included)
        w.set("ids", torch.arange(6)[::2])
        w.append("logp", torch.ones(2, dtype=torch.bfloat16))
        w.append("logp", torch.zeros(3, dtype=torch.bfloat16))
        ref = w.publish()
    ring2_ref = ring.put({"turns": [torch.arange(3), torch.arange(1)],
                          "lp": [torch.ones(2, dtype=torch.bfloat16), torch.ones(1, dtype=torch.bfloat16)]})
    with ring.claim(ref) as lease:
        t = lease.payload.to_torch()
        assert t["ids"].tolist() == [0, 2, 4] and t["logp"].dtype == torch.bfloat16
        assert t["logp"].float().tolist() == [1, 1, 0, 0, 0]
        del t
    with ring.claim(ring2_ref) as lease:
        p = lease.payload
        tt = p.to_torch()
        padded = tt["turns"].padded(pad_value=-1)  # torch in, torch out: no numpy detour
        assert isinstance(padded, torch.Tensor) and padded.tolist() == [[0, 1, 2], [0, -1, -1]]
        lp = tt["lp"].padded(length=3)
        assert lp.dtype == torch.bfloat16 and lp.float().tolist() == [[1, 1, 0], [1, 0, 0]]
        owned = p.with_values(tt).copy()  # torch values copied, not aliased
        assert owned["turns"].values.data_ptr() != tt["turns"].values.data_ptr()
        assert owned["lp"][0].dtype == torch.bfloat16
        del tt, padded, lp, p
    assert ring.state_counts()["FREE"] == 2
    assert owned["turns"][0].tolist() == [0, 1, 2]


LAZY_READER = textwrap.dedent("""
    import sys
    import shm, clients, ucxx_transport.cli  # noqa: F401
    assert "ml_dtypes" not in sys.modules, "ml_dtypes imported eagerly (a second of start-up for every process)"
    ring = shm.RingBuffer.attach(sys.argv[1])
    with ring.claim() as lease:
        p = lease.payload
        print(p["b"].dtype, p["f8"].dtype, p["x"].dtype, float(p["f8"][1]), flush=True)
""")


def test_ml_dtypes_is_imported_only_when_a_payload_needs_it(make_ring, ring_name):
    """ml_dtypes costs about a second to import: the CLI, servers and readers of numpy-only
    payloads never load it; a reader that meets bf16/fp8 fields loads it then and gets them."""
    ring = make_ring(slots=2)
    ring.put({"b": np.ones(4, ml_dtypes.bfloat16), "f8": np.full(2, 0.5, ml_dtypes.float8_e5m2), "x": np.arange(3)})
    out = subprocess.run([sys.executable, "-c", LAZY_READER, ring_name], capture_output=True, text=True, timeout=60,
                         cwd=helpers.REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["bfloat16", "float8_e5m2", "int64", "0.5"]


@pytest.mark.parametrize("how", ["lease", "batch"])
def test_closing_a_handle_while_views_are_alive_keeps_their_memory_and_slots(make_ring, ring_name, how):
    """A reader that closes its ring handle (or drops its batch) while arrays it was handed are
    alive: the mapping stays (no view of unmapped memory), the slots stay PINNED, and they are
    freed when the last view goes."""
    ring = make_ring(slots=4)
    refs = [ring.put({"x": np.arange(512) + i}) for i in range(2)]
    reader = shm.RingBuffer.attach(ring_name)
    if how == "lease":
        lease = reader.claim(refs[0])
        view = lease.payload["x"]
        lease.ack()
        del lease
    else:
        batch, _ = reader.claim_batch([r.slot for r in refs], [r.generation for r in refs])
        view = batch.payloads()[1]["x"]
        batch.finalise(True)
        del batch
    reader.close()
    gc.collect()
    assert ring.state_counts()["PINNED"] == (1 if how == "lease" else 2)
    assert int(view.sum()) == int((np.arange(512) + (0 if how == "lease" else 1)).sum())  # still mapped
    del view
    counts = ring.state_counts()
    assert counts["PINNED"] == 0 and counts["FREE"] == (3 if how == "lease" else 4)  # (the lease left one READY)
