"""Fast unit tests (no UCX, no processes): sizes and durations, knobs, error
classification, and the wire format's encode/decode round trips."""

import errno
import socket

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.errors import (
    BadRequestError,
    CallTimeoutError,
    ConnectionLostError,
    PayloadTooLargeError,
    ServerBusyError,
    StaleSlotError,
    TransportError,
    classify,
    status_error,
)
from ucxx_transport import protocol
from ucxx_transport.config import KNOBS, ConfigError, resolve
from ucxx_transport.protocol import Op, ProtocolError, Request, Response, Status
from ucxx_transport.units import format_size, parse_duration, parse_size

import shm


# ------------------------------------------------------------------ units --
@pytest.mark.parametrize("text,want", [("4096", 4096), ("64KiB", 64 << 10), ("16mib", 16 << 20), ("1GiB", 1 << 30),
                                       ("2MB", 2_000_000), ("1.5KiB", 1536), (" 8 B ", 8), (7, 7)])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["64m", "1g", "4k", "", "MiB", "-1", "1 MiB MiB", "1e3"])
def test_parse_size_refuses_ambiguous_or_malformed(text):
    with pytest.raises(ValueError, match="ambiguous|cannot parse"):
        parse_size(text)


@pytest.mark.parametrize("text,want", [("10", 10.0), ("250ms", 0.25), ("2min", 120.0), ("1h", 3600.0),
                                       ("5us", 5e-6), (1.5, 1.5)])
def test_parse_duration(text, want):
    assert parse_duration(text) == pytest.approx(want)


def test_parse_duration_refuses_m():
    with pytest.raises(ValueError, match="ambiguous; write min"):
        parse_duration("5m")


@given(st.integers(0, 1 << 44))
def test_format_size_round_trips(n):
    assert parse_size(format_size(n)) == n


# ------------------------------------------------------------------ knobs --
def test_every_knob_resolves_its_default_and_names_flag_and_env_on_error():
    for name, knob in KNOBS.items():
        assert resolve(name, env={}) == knob.default
    with pytest.raises(ConfigError) as ei:
        resolve("timeout", env={"UCXX_TRANSPORT_TIMEOUT": "soon"})
    msg = str(ei.value)
    assert "UCXX_TRANSPORT_TIMEOUT" in msg and "--timeout" in msg and "'soon'" in msg


def test_explicit_value_beats_environment():
    assert resolve("timeout", 3.0, env={"UCXX_TRANSPORT_TIMEOUT": "9"}) == 3.0
    assert resolve("timeout", None, env={"UCXX_TRANSPORT_TIMEOUT": "9"}) == 9.0


# ------------------------------------------------------ error classification --
def test_classify_by_type():
    assert isinstance(classify(TimeoutError(), "x"), CallTimeoutError)
    assert isinstance(classify(ConnectionResetError(), "x"), ConnectionLostError)
    assert isinstance(classify(socket.gaierror(-2, "no such host"), "x"), ConnectionLostError)
    assert isinstance(classify(OSError(errno.EHOSTUNREACH, "unreachable"), "x"), ConnectionLostError)
    assert isinstance(classify(ProtocolError("garbage"), "x"), ConnectionLostError)
    for not_the_ports_fault in (OSError(errno.EMFILE, "too many open files"), ValueError("bug"), KeyError("k")):
        assert classify(not_the_ports_fault, "x") is not_the_ports_fault  # propagates, nothing quarantined
    err = StaleSlotError("gone")
    assert classify(err, "x") is err


def test_statuses_map_to_final_or_retryable_errors():
    assert isinstance(status_error(Status.STALE, "", "x"), StaleSlotError)
    assert not status_error(Status.STALE, "", "x").retryable
    assert isinstance(status_error(Status.BAD_REQUEST, "", "x"), BadRequestError)
    for st_ in (Status.BUSY, Status.SHUTTING_DOWN, Status.ERROR):
        e = status_error(st_, "", "x")
        assert isinstance(e, ServerBusyError) and e.retryable


def test_client_size_error_is_also_shms():
    e = PayloadTooLargeError("too big for max_nbytes")
    assert isinstance(e, shm.PayloadTooLargeError) and isinstance(e, TransportError) and not e.retryable


# ------------------------------------------------------------ wire format --
texts = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=protocol.MAX_TEXT)


@settings(max_examples=200)
@given(op=st.sampled_from(list(Op)), rid=st.integers(0, 2**63 - 1), slot=st.integers(0, 2**31 - 1),
       gen=st.integers(0, 2**63 - 1), text=texts, flags=st.integers(0, 31), n=st.integers(0, 256))
def test_request_round_trip(op, rid, slot, gen, text, flags, n):
    req = Request(op, rid, slot, gen, text=text, flags=flags, n=n, ring_id=b"\x07" * protocol.RING_ID_BYTES)
    got = protocol.decode_request(protocol.encode_request(req))
    assert (got.op, got.request_id, got.slot, got.generation, got.text, got.flags, got.n) == \
        (op, rid, slot, gen, text, flags, n)


@settings(max_examples=200)
@given(status=st.sampled_from(list(Status)), rid=st.integers(0, 2**63 - 1), nbytes=st.integers(0, 2**40),
       msg=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=protocol.MAX_MESSAGE))
def test_response_round_trip(status, rid, nbytes, msg):
    resp = Response(status, rid, nbytes=nbytes, message=msg)
    got = protocol.decode_response(protocol.encode_response(resp))
    assert (got.status, got.request_id, got.nbytes, got.message) == (status, rid, nbytes, msg)


def test_a_flipped_byte_is_a_protocol_error():
    raw = protocol.encode_request(Request(Op.GET, 5, 1, 2, text="ring"))
    for pos in (0, 9, 100, len(raw) - 1):
        bad = bytearray(raw)
        bad[pos] ^= 0x40
        with pytest.raises(ProtocolError):
            protocol.decode_request(bytes(bad))


def test_batch_table_round_trip():
    t = protocol.batch_array(3)
    t["slot"], t["generation"], t["nbytes"] = [1, 2, 3], [10, 20, 30], [100, 200, 300]
    buf = np.zeros(protocol.batch_table_size(3) + 8, np.uint8)
    protocol.write_batch_array(t, buf, 8)
    back = protocol.read_batch_array(buf, 3, 8)
    assert back["slot"].tolist() == [1, 2, 3] and back["nbytes"].tolist() == [100, 200, 300]


def test_field_list_round_trip_and_limits():
    blob = protocol.encode_fields(["tokens", "logprobs"])
    assert protocol.decode_fields(blob, 0, len(blob)) == frozenset({"tokens", "logprobs"})
    # a bare string once became the fields "t", "o", "k", ...: the payload consumed, nothing delivered
    with pytest.raises(ValueError, match=r"not a single string: use \['tokens'\]"):
        protocol.encode_fields("tokens")
    with pytest.raises(ValueError):
        protocol.encode_fields([])


def test_the_log_knobs_are_in_the_table_like_every_other():
    assert resolve("log_level", "debug", env={}) == "DEBUG"
    assert resolve("log_level", None, env={"UCXX_TRANSPORT_LOG_LEVEL": "warning"}) == "WARNING"
    assert resolve("log_format", None, env={"UCXX_TRANSPORT_LOG_FORMAT": "JSON"}) == "json"
    with pytest.raises(ConfigError, match="UCXX_TRANSPORT_LOG_LEVEL.*one of DEBUG"):
        resolve("log_level", None, env={"UCXX_TRANSPORT_LOG_LEVEL": "loud"})


def test_progress_spin_knob_takes_zero_and_refuses_negative():
    assert resolve("progress_spin_s", env={}) == 0.002
    assert resolve("progress_spin_s", env={"UCXX_TRANSPORT_PROGRESS_SPIN_S": "0"}) == 0.0
    assert resolve("progress_spin_s", env={"UCXX_TRANSPORT_PROGRESS_SPIN_S": "0.5ms"}) == pytest.approx(0.0005)
    with pytest.raises(ConfigError, match="UCXX_TRANSPORT_PROGRESS_SPIN_S"):
        resolve("progress_spin_s", env={"UCXX_TRANSPORT_PROGRESS_SPIN_S": "-1"})
