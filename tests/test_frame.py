import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shm import FrameError, PayloadTooLargeError
from shm.frame import ALIGN, FIELD_ENTRY, FRAME_HEADER, FrameBuilder, decode, encode_into, encoded_size
from tests.helpers import DTYPES


def roundtrip(payload, meta=None, size=1 << 20):
    buf = bytearray(size)
    n = encode_into(buf, payload, meta)
    assert n == encoded_size(payload, meta)
    return decode(memoryview(buf)[:n]), buf, n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (2, 3, 4)])
def test_roundtrip_dtypes_shapes(dtype, shape):
    a = (np.arange(int(np.prod(shape))) % 100).astype(dtype).reshape(shape)
    p, buf, n = roundtrip({"x": a, "y": np.ones(3, np.int32)}, {"k": [1, 2]})
    assert p["x"].dtype == a.dtype and p["x"].shape == a.shape
    np.testing.assert_array_equal(p["x"], a)
    assert p.meta == {"k": [1, 2]}
    assert not p["x"].flags.writeable


def test_fields_are_64_byte_aligned_views():
    buf = bytearray(1 << 16)
    n = encode_into(buf, {"a": np.arange(3, dtype=np.int8), "b": np.arange(5, dtype=np.float64)})
    p = decode(buf, n)
    base = np.frombuffer(buf, np.uint8).ctypes.data
    for v in p.values():
        assert (v.ctypes.data - base) % ALIGN == 0
        assert v.base is not None  # a view, not a copy


def test_raw_bytes_roundtrip():
    p, _, _ = roundtrip(b"\x00\x01hello", {"fmt": "mine"})
    assert bytes(p.raw) == b"\x00\x01hello" and p.meta == {"fmt": "mine"} and len(p) == 0
    assert p.raw.readonly


def test_non_contiguous_input_is_written_correctly():
    a = np.arange(100, dtype=np.int64).reshape(10, 10)[:, ::3]
    p, _, _ = roundtrip({"a": a})
    np.testing.assert_array_equal(p["a"], a)


def test_interleaved_appends_gather_once():
    buf = bytearray(1 << 16)
    b = FrameBuilder(buf)
    toks, lps = [], []
    for t in range(5):
        tk = np.arange(t * 4, t * 4 + 4, dtype=np.int32)
        lp = np.full((4, 2), t, dtype=np.float32)
        b.append("tokens", tk)
        b.append("logp", lp)
        toks.append(tk)
        lps.append(lp)
    b.set("reward", np.float32(1.5))
    n = b.finish({"turns": 5})
    p = decode(buf, n)
    np.testing.assert_array_equal(p["tokens"], np.concatenate(toks))
    np.testing.assert_array_equal(p["logp"], np.concatenate(lps))
    assert p["reward"] == np.float32(1.5)


def test_sequential_appends_are_contiguous_without_gather():
    buf = bytearray(1 << 16)
    b = FrameBuilder(buf)
    for t in range(4):
        b.append("tokens", np.full(8, t, np.int64))
    used = b.bytes_used
    n = b.finish()
    # no gather copy: index follows the data directly
    assert n == (used + 63) // 64 * 64 + FIELD_ENTRY.size
    np.testing.assert_array_equal(decode(buf, n)["tokens"], np.repeat(np.arange(4), 8))


def test_append_mismatch_is_clear_error():
    b = FrameBuilder(bytearray(4096))
    b.append("t", np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="append to 't'"):
        b.append("t", np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="at least one axis"):
        b.append("u", np.int32(1))


@pytest.mark.parametrize("bad", [np.array(["a"]), np.array([object()]), np.zeros(2, dtype="M8[s]")])
def test_unsupported_dtype_rejected(bad):
    with pytest.raises(TypeError, match="not supported"):
        encode_into(bytearray(4096), {"x": bad})


def test_too_large_names_sizes():
    with pytest.raises(PayloadTooLargeError) as ei:
        encode_into(bytearray(4096), {"x": np.zeros(4096, np.uint8)})
    assert ei.value.slot_bytes == 4096 and ei.value.nbytes > 4096
    assert "4096" in str(ei.value)


# ------------------------------------------------------------ corruption ----
def good_frame():
    buf = bytearray(8192)
    n = encode_into(buf, {"a": np.arange(16, dtype=np.float32), "b": np.ones((2, 3), np.int8)}, {"m": 1})
    return buf, n


def test_truncated_frame():
    buf, n = good_frame()
    for cut in (0, 10, 63, 64, n // 2, n - 1):
        with pytest.raises(FrameError):
            decode(bytes(buf[:cut]))


def test_wrong_magic_and_version():
    buf, n = good_frame()
    b2 = bytearray(buf)
    b2[0:4] = b"XXXX"
    with pytest.raises(FrameError, match="magic"):
        decode(b2, n)
    b3 = bytearray(buf)
    struct.pack_into("<H", b3, 4, 99)
    with pytest.raises(FrameError, match="version"):
        decode(b3, n)


def test_huge_lengths_rejected():
    buf, n = good_frame()
    for off, fmt, val in [(8, "<I", 2**31), (16, "<Q", 2**62), (24, "<Q", 2**62), (40, "<Q", 2**40)]:
        b = bytearray(buf)
        struct.pack_into(fmt, b, off, val)
        with pytest.raises(FrameError):
            decode(b, n)


def test_field_entry_out_of_bounds_rejected():
    buf, n = good_frame()
    table_off = FRAME_HEADER.unpack_from(buf, 0)[6]
    for field_off, val in [(0, 2**40), (0, 3), (8, 2**50), (16, 200)]:  # offset, nbytes, ndim
        b = bytearray(buf)
        fmt = "<B" if field_off == 16 else "<Q"
        struct.pack_into(fmt, b, table_off + field_off, val)
        with pytest.raises(FrameError):
            decode(b, n)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=600))
def test_random_bytes_never_crash(data):
    try:
        p = decode(data)
    except FrameError:
        return
    for v in p.values():  # if it decoded, every view lies inside the buffer
        assert v.nbytes <= len(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 255))
def test_random_byte_flips_never_escape(pos, val):
    buf, n = good_frame()
    b = bytearray(buf[:n])
    b[pos % n] = val
    try:
        p = decode(b)
    except FrameError:
        return
    base = np.frombuffer(b, np.uint8).ctypes.data
    for v in p.values():
        if v.nbytes:
            assert base <= v.ctypes.data and v.ctypes.data + v.nbytes <= base + len(b)


TREES = [b"", b"\xff", b"[]", b"{}", b'{"d": []}', b'{"d": {"x": {}}}', b'{"d": {"x": {"a": 9}}}',
         b'{"d": {"x": {"a": "0"}}}', b'{"d": {"x": {"a": -1}}}', b'{"d": {"x": {"r": [0]}}}',
         b'{"d": {"x": {"r": [0, 0]}}}', b'{"d": {"x": {"rs": [1, 0]}}}', b'{"l": [{"a": 0}]}',
         b'{"d": {"x": {"zz": 1}}}', b'{"d": {"x": {"s": 0}}}', b'{"d": {"x": {"l": {}}}}',
         b'{"d": {"x": {"v": [1, 2]}}}', b'{"d": {"x": {"d": {"y": {"a": true}}}}}',
         b'{"d": {"x": ' + b'{"l": [' * 80 + b'{"a": 0}' + b"]}" * 80 + b"}}"]


@pytest.mark.parametrize("tree_json", TREES, ids=range(len(TREES)))
def test_corrupt_layout_tree_is_a_frame_error_never_a_crash(tree_json):
    """The layout tree of a structured frame is input like any other: every malformed tree
    (bad JSON, wrong node kinds, field indices out of range or of the wrong type, offsets
    that do not fit, nesting too deep) is a FrameError, never another exception or a view
    past its field."""
    from shm import tree

    arrays = [np.arange(4, dtype=np.int64), np.array([0, 5], np.int64)]

    def fail(msg):
        raise FrameError(msg)

    with pytest.raises(FrameError):
        tree.rebuild(tree_json, arrays, fail)


def test_meta_of_one_payload_is_its_own():
    """A payload without meta gets a fresh {} (a shared one, modified by one reader, once
    showed up as every later payload's meta)."""
    buf = bytearray(4096)
    n = encode_into(buf, {"x": np.arange(2)})
    a, b = decode(memoryview(buf)[:n]), decode(memoryview(buf)[:n])
    a.meta["seen"] = True
    assert b.meta == {} and decode(memoryview(buf)[:n]).meta == {}
