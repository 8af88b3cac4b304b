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


@pytest.mark.parametrize("name", [b"01", b"01f4", b"f4,i4", b"(2,)f4", b"<f4 ", b"float32", b"V4", b"O", b"M8[s]",
                                  b"<U4", b"S4", b"<i3", b"\xff4", b"<f" + b"9" * 30])
def test_a_damaged_dtype_name_is_a_frame_error(name):
    """Only the names the encoder writes reach numpy's dtype parser: any other text in a
    field entry is a FrameError (numpy raised SyntaxError for "01", found by the byte-flip fuzz)."""
    buf, n = good_frame()
    table_off = FRAME_HEADER.unpack_from(buf, 0)[6]
    b = bytearray(buf)
    struct.pack_into("<B", b, table_off + 17, len(name))  # the first field's dtype length
    b[table_off + 88:table_off + 120] = name.ljust(32, b"\0")
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


# ------------------------------------------------------------ decode_many --
def _same_decode(a, b) -> bool:
    """Two outcomes of decoding one frame agree: both FrameError, or equal payloads."""
    if isinstance(a, FrameError) or isinstance(b, FrameError):
        return isinstance(a, FrameError) and isinstance(b, FrameError)
    if a.meta != b.meta or a.nbytes != b.nbytes or a.is_raw != b.is_raw:
        return False
    return bytes(a.raw) == bytes(b.raw) if a.is_raw else repr(a) == repr(b) and all(
        _same_value(a[k], b[k]) for k in a)


def _same_value(x, y) -> bool:
    if isinstance(x, np.ndarray):
        return (isinstance(y, np.ndarray) and x.dtype == y.dtype and x.shape == y.shape
                and x.tobytes() == y.tobytes())
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same_value(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_same_value(p, q) for p, q in zip(x, y))
    return repr(x) == repr(y)


def _batch_payload(rng, kind: int, n: int | None = None):
    n = int(rng.integers(0, 40)) if n is None else n
    import ml_dtypes

    return [
        lambda: {"tok": np.arange(n, dtype=np.int64), "lp": np.ones(n, np.float32), "r": np.float32(n)},
        lambda: {"tok": np.arange(n, dtype=np.int64), "lp": np.ones((n, 2), ml_dtypes.bfloat16)},
        lambda: {"x": np.arange(n, dtype=np.uint8), "empty": np.zeros((0, 3), np.float32)},
        lambda: {"nested": {"a": np.ones(n), "s": "text"}, "l": [np.zeros(2, np.uint8), 3]},
        lambda: b"raw %d" % n,
    ][kind]()


FIELDS_AT = FRAME_HEADER.size  # the first field's offset: the table follows the data


def _pick(rng, values: list) -> int:
    return values[int(rng.integers(0, len(values)))]  # Python ints: some exceed int64


def _mutate(rng, buf, start: int, length: int) -> None:
    """Damage one frame where the batch checks look: a header word, a table word, any byte."""
    where = rng.integers(0, 7)
    head = list(FRAME_HEADER.unpack_from(buf[start:start + 64].tobytes())) if length >= 64 else None
    if where == 3 and head and 72 <= head[6] <= head[5] <= length:  # the index moved 8 bytes back:
        to, total = head[6], head[5]                                  # consistent, but unaligned
        buf[start + to - 8:start + total - 8] = buf[start + to:start + total].copy()
        head[5], head[6], head[7] = total - 8, to - 8, head[7] - 8
        buf[start:start + 64] = np.frombuffer(FRAME_HEADER.pack(*head), np.uint8)
    elif where == 4 and head and head[3] and head[6] + FIELD_ENTRY.size <= length:  # a field moved 8 bytes on
        at = start + head[6]
        off = int.from_bytes(buf[at:at + 8].tobytes(), "little")
        buf[at:at + 8] = np.frombuffer(((off + 8) % (1 << 64)).to_bytes(8, "little"), np.uint8)
    elif where == 5 and head and head[3]:  # the frame's length moved by a word: the index is inconsistent
        head[5] = max(0, head[5] + _pick(rng, [-8, 8]))
        buf[start:start + 64] = np.frombuffer(FRAME_HEADER.pack(*head), np.uint8)
    elif where == 6 and head and head[3] and head[6] + FIELD_ENTRY.size <= length:  # field 0 grown, its shape
        at = start + head[6]                                      # and size consistent, past the data area
        off, nbytes, ndim = (int.from_bytes(buf[at + k:at + k + 8].tobytes(), "little") for k in (0, 8, 16))
        rows = int.from_bytes(buf[at + 24:at + 32].tobytes(), "little")
        if ndim & 0xFF == 1 and 0 < rows and nbytes % rows == 0:
            size = nbytes // rows
            grow = -(-(head[6] - off - nbytes + 64) // size)
            for k, v in ((8, nbytes + grow * size), (24, rows + grow)):
                buf[at + k:at + k + 8] = np.frombuffer(v.to_bytes(8, "little"), np.uint8)
    elif where == 0:  # a header field, set to a small, a plausible or a huge value
        off = _pick(rng, [6, 8, 12, 16, 24, 32, 40, 48])
        width = 4 if off in (8, 12) else 2 if off == 6 else 8
        val = _pick(rng, [0, 1, 64, 128, length, length + 64, (1 << (8 * width)) - 1, int(rng.integers(0, 1 << 16))])
        buf[start + off:start + off + width] = np.frombuffer(val.to_bytes(width, "little"), np.uint8)
    elif where == 1:  # a word of the field table
        table_off = int.from_bytes(buf[start + 24:start + 32].tobytes(), "little")
        if table_off + FIELD_ENTRY.size <= length:
            off = table_off + int(rng.integers(0, FIELD_ENTRY.size // 8)) * 8
            val = _pick(rng, [0, 1, 63, 64, 1 << 20, (1 << 63) + 64, (1 << 64) - 1])
            buf[start + off:start + off + 8] = np.frombuffer(val.to_bytes(8, "little"), np.uint8)
    else:
        buf[start + int(rng.integers(0, length))] = rng.integers(0, 256)


@pytest.mark.parametrize("seed", range(6))
def test_decode_many_agrees_with_decoding_each_frame_alone(seed, monkeypatch):
    """The batch decoder validates a batch's headers and tables as arrays: whatever the
    frames (ragged, bf16, nested, raw, with meta, damaged anywhere, truncated), each item
    is exactly what decode() of it alone gives, payload or FrameError."""
    import shm.frame as frame
    from shm.frame import _decode_one, decode_many

    monkeypatch.setattr(frame, "DECODE_MANY_MIN", 1)  # the array checks for every batch size
    monkeypatch.setattr(frame, "RAGGED_MANY_MIN", 1)

    rng = np.random.default_rng(seed)
    stride, checked, errors = 4096, 0, 0
    for trial in range(60):
        b = int(rng.integers(1, 24))
        buf = np.zeros(b * stride, np.uint8)
        uniform = trial % 2 == 0  # half the batches share one field set (the fast path)
        identical = trial % 4 == 0  # a quarter also share shapes, without metadata (the fastest path)
        size = int(rng.integers(0, 40))
        starts, lengths = [], []
        for i in range(b):
            start = i * stride + (0 if trial % 3 else int(rng.integers(0, 4)) * 8)  # some unaligned
            kind = (trial // 4) % 3 if identical else 0 if uniform else int(rng.integers(0, 5))  # (identical:
            p = _batch_payload(rng, kind, size if identical else None)  # 2-D bf16, 0-d and empty fields too)
            meta = {"i": i} if rng.random() < 0.3 and not identical else None
            n = encode_into(memoryview(buf)[start:start + stride - 64], p, meta)
            starts.append(start)
            lengths.append(min(n + 64, stride - 64) if rng.random() < 0.3 else n)
        for _ in range(int(rng.integers(0, 4))):
            i = int(rng.integers(0, b))
            _mutate(rng, buf, starts[i], lengths[i])
        if rng.random() < 0.2:
            lengths[int(rng.integers(0, b))] = int(rng.integers(0, 200))
        got = decode_many(buf, starts, lengths)
        for i in range(b):
            want = _decode_one(buf, starts[i], lengths[i])
            assert _same_decode(got[i], want), (trial, i, got[i], want)
            checked += 1
            errors += isinstance(want, FrameError)
    assert errors > 20 and checked - errors > 500  # both outcomes were exercised


def test_decode_many_validates_a_ragged_batch_together(monkeypatch):
    """Rollouts of one batch differ in length; their fields have the same names and dtypes:
    none of them needs the one-by-one decoder (that is what makes a batch cheap)."""
    import shm.frame as frame

    stride = 8192
    buf = np.zeros(64 * stride, np.uint8)
    lengths = [encode_into(memoryview(buf)[i * stride:(i + 1) * stride],
                           {"tok": np.arange(10 + i), "lp": np.ones(10 + i, np.float32), "done": np.bool_(True)},
                           {"step": i}) for i in range(64)]
    alone = []
    monkeypatch.setattr(frame, "_decode_one", lambda *a: alone.append(a) or decode(buf[a[1]:a[1] + a[2]]))
    got = frame.decode_many(buf, np.arange(64) * stride, lengths)
    assert not alone
    assert [p["tok"].tolist() for p in got] == [list(range(10 + i)) for i in range(64)]
    assert [p.meta for p in got] == [{"step": i} for i in range(64)] and got[5]["done"].shape == ()
    assert all(p.nbytes == n for p, n in zip(got, lengths))


def test_a_batch_of_identical_layouts_is_validated_by_its_first_frame(monkeypatch):
    """The usual batch (same fields, same shapes, no metadata): the first frame is parsed
    and the others' headers and tables compared with it as arrays. A frame whose table
    differs in one word (here a field moved past the data area) sends the batch to the
    general checks, and only that frame fails."""
    import shm.frame as frame

    stride = 8192
    buf = np.zeros(64 * stride, np.uint8)
    lengths = [encode_into(memoryview(buf)[i * stride:(i + 1) * stride],
                           {"tok": np.full(100, i), "lp": np.full((10, 10), i, np.float32), "r": np.float32(i),
                            "none": np.zeros((0, 3), np.int16)}) for i in range(64)]
    general = []
    real = frame._batch_group
    monkeypatch.setattr(frame, "_batch_group", lambda *a: general.append(1) or real(*a))
    got = frame.decode_many(buf, np.arange(64) * stride, lengths)
    assert not general
    assert [int(p["tok"][0]) for p in got] == list(range(64)) and all(p["lp"].shape == (10, 10) for p in got)
    assert [float(p["lp"][9, 9]) for p in got] == list(range(64)) and [float(p["r"]) for p in got] == list(range(64))
    assert all(isinstance(p["r"], np.ndarray) and p["r"].shape == () and p["none"].shape == (0, 3) for p in got)
    assert all(p["lp"].flags.c_contiguous and p["tok"].base is not None for p in got)  # views, as decode() gives
    assert all(p.meta == {} for p in got) and got[3].meta is not got[4].meta  # a fresh dict each
    table = int.from_bytes(buf[7 * stride + 24:7 * stride + 32].tobytes(), "little")
    buf[7 * stride + table:7 * stride + table + 8] = np.frombuffer((1 << 20).to_bytes(8, "little"), np.uint8)
    got = frame.decode_many(buf, np.arange(64) * stride, lengths)
    assert general and isinstance(got[7], FrameError)
    assert all(not isinstance(p, FrameError) for i, p in enumerate(got) if i != 7)


def test_a_small_batch_is_decoded_frame_by_frame(monkeypatch):
    """Below DECODE_MANY_MIN frames the array checks cost more than they save (~40 us
    fixed): such a batch goes through the one-frame decoder, with the same results."""
    import shm.frame as frame

    stride = 4096
    buf = np.zeros(3 * stride, np.uint8)
    lengths = [encode_into(memoryview(buf)[i * stride:(i + 1) * stride], {"tok": np.arange(5 + i)})
               for i in range(3)]
    lengths[2] = 10  # truncated: its own error, the others decoded
    alone = []
    real = frame._decode_one
    monkeypatch.setattr(frame, "_decode_one", lambda *a: alone.append(a[1]) or real(*a))
    got = frame.decode_many(buf, np.arange(3) * stride, lengths)
    assert alone == [0, stride, 2 * stride] and frame.DECODE_MANY_MIN > 3
    assert [p["tok"].tolist() for p in got[:2]] == [list(range(5)), list(range(6))]
    assert isinstance(got[2], FrameError)


def test_a_mid_sized_batch_uses_the_array_checks_only_for_identical_layouts(monkeypatch):
    """Between DECODE_MANY_MIN and RAGGED_MANY_MIN frames, identical layouts are compared
    as arrays and ragged ones decoded frame by frame (each the faster there)."""
    import shm.frame as frame

    n, stride = 20, 4096
    assert frame.DECODE_MANY_MIN <= n < frame.RAGGED_MANY_MIN
    alone = []
    real = frame._decode_one
    monkeypatch.setattr(frame, "_decode_one", lambda *a: alone.append(a[1]) or real(*a))
    for ragged in (False, True):
        buf = np.zeros(n * stride, np.uint8)
        lengths = [encode_into(memoryview(buf)[i * stride:(i + 1) * stride], {"tok": np.arange(5 + ragged * i)})
                   for i in range(n)]
        alone.clear()
        got = frame.decode_many(buf, np.arange(n) * stride, lengths)
        assert len(alone) == (n if ragged else 0)
        assert [p["tok"].tolist() for p in got] == [list(range(5 + ragged * i)) for i in range(n)]
