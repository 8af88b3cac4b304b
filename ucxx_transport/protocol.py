"""Wire protocol: the only module that knows the byte layout of messages.

Every message on an endpoint is one UCX tag message. A request is exactly
``REQUEST.size`` (272) bytes, a response header exactly ``RESPONSE.size``
(128) bytes; a payload (or STATS JSON) follows its response header as one
message of exactly ``nbytes`` bytes. All integers are little-endian. The last
4 bytes of each header are a CRC-32 of the bytes before it, so a short,
truncated or stale buffer is detected, never misread. See docs/PROTOCOL.md.
"""

from __future__ import annotations

import enum
import json
import struct
import zlib
from dataclasses import dataclass

import numpy as np

PROTOCOL_VERSION = 2
REQUEST_MAGIC = b"UXRQ"
RESPONSE_MAGIC = b"UXRS"

#: magic, version, op, flags, request_id, generation, max_nbytes, slot, n, wait_ms, text_len, hold_s, ring_id,
#: text
REQUEST = struct.Struct("<4sHBBQQQIIIHH16s204sI")
#: magic, version, status, flags, request_id, generation, nbytes, slot, index, count, msg_len, ring_id, message
RESPONSE = struct.Struct("<4sHBBQQQIIIH2x16s60sI")
assert REQUEST.size == 272 and RESPONSE.size == 128

MAX_TEXT = 204  # ring name (GET), token (HELLO)
MAX_MESSAGE = 60
RING_ID_BYTES = 16
NO_RING_ID = bytes(RING_ID_BYTES)
#: TAKE never hands out more than this many payloads per request
MAX_TAKE = 256
# Request flags and response flags are separate namespaces (the request's and the
# response's own ``flags`` byte): the same bit may mean different things in each.
#: response flag: another (header, payload) pair of the same TAKE follows
FLAG_MORE = 0x1
#: GET request flag: send the response header and the payload as ONE message of
#: RESPONSE.size + max_nbytes bytes (max_nbytes = the ref's exact nbytes); an
#: error answer is the header alone. GETV: the whole batch answer is one message
#: (one_message_layout). TAKEV: the client's receive buffer holds ``generation``
#: bytes; the answer is one message when it fits (the response says so with
#: FLAG_PAYLOADS_INLINE), else the usual batch answer
FLAG_ONE_MESSAGE = 0x1
#: response flag (TAKEV): the payloads are in this same message, at one_message_layout's offsets
FLAG_PAYLOADS_INLINE = 0x2
#: NACK request flag: the payloads could not be decoded (counted towards dead-lettering)
FLAG_UNDECODABLE = 0x2
#: GET/TAKE request flag: the client will hold the payloads up to ``hold_s`` seconds
#: before its ACK (a stream hands them to its consumer first); capped by the server
FLAG_HOLD = 0x4
#: the longest hold a server grants
MAX_HOLD_S = 3600
#: ACK request flag (GETV/TAKEV): text holds one verdict per batch item: "A" consumed,
#: "N" back to READY, "U" back to READY as undecodable (counts towards DEAD)
FLAG_VERDICTS = 0x8
#: GETV/TAKEV request flag: send only some top-level fields of each payload (a projection; the
#: whole payload is still consumed by the ACK). The field list (UTF-8 JSON array of names,
#: ``slot`` bytes long, at most MAX_FIELDS_BYTES) follows the entry table (GETV) or the header (TAKEV)
FLAG_FIELDS = 0x10
MAX_FIELDS_BYTES = 4096


class Op(enum.IntEnum):
    HELLO = 1  # text = token
    GET = 2  # text = ring name; slot, generation
    TAKE = 3  # n, wait_ms: the next READY payloads, publish order, long-poll
    ACK = 4  # request_id of the GET/TAKE whose payloads were received intact; n > 0: only the first n
    #          (the rest go back to READY)
    NACK = 5  # ... or not: give them back
    STATS = 6  # server metrics as JSON
    PING = 7
    GETV = 8  # n refs of one ring: text = ring name, ring id; the entry table follows in the same message
    TAKEV = 9  # like TAKE, answered in the batch format (entry table + coalesced payloads)


class Status(enum.IntEnum):
    OK = 0
    STALE = 1  # the ref's generation is gone: final
    BUSY = 2  # leased by another reader: retry later
    EMPTY = 3  # TAKE: nothing READY within wait_ms
    DENIED = 4  # authentication missing or wrong: endpoint closed
    BAD_REQUEST = 5  # malformed request: endpoint closed
    TOO_LARGE = 6  # payload exceeds the client's max_nbytes (stays READY)
    SHUTTING_DOWN = 7  # server stopping: try another server/port later
    ERROR = 8  # server-side failure: retryable



class ProtocolError(Exception):
    """A message that does not parse; ``status`` is what the server answers."""

    def __init__(self, message: str, status: Status = Status.BAD_REQUEST):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Request:
    op: Op
    request_id: int
    slot: int = 0
    generation: int = 0
    n: int = 0
    wait_ms: int = 0
    max_nbytes: int = 0
    text: str = ""
    flags: int = 0
    ring_id: bytes = NO_RING_ID  # GET: the ref's ring id (all zero: not known)
    hold_s: int = 0  # with FLAG_HOLD: seconds the client may take before its ACK


@dataclass(frozen=True)
class Response:
    status: Status
    request_id: int
    slot: int = 0
    generation: int = 0
    nbytes: int = 0
    index: int = 0
    count: int = 0
    message: str = ""
    flags: int = 0
    ring_id: bytes = NO_RING_ID  # OK: the id of the ring the payload came from


def _crc(buf, n: int) -> int:
    return zlib.crc32(memoryview(buf)[:n])


def _seal(out, layout: struct.Struct) -> None:
    """Write the CRC-32 of everything before the header's last 4 bytes into them."""
    struct.pack_into("<I", out, layout.size - 4, _crc(out, layout.size - 4))


def _unseal(buf, layout: struct.Struct, magic: bytes, what: str) -> tuple:
    """Check size, magic, version and CRC of a header; return its unpacked fields."""
    mv = memoryview(buf).cast("B")
    if len(mv) != layout.size:
        raise ProtocolError(f"{what} is {len(mv)} bytes, expected {layout.size}")
    fields = layout.unpack(mv)
    if fields[0] != magic:
        raise ProtocolError(f"bad {what} magic {fields[0]!r} (expected {magic!r}: a ucxx-transport peer?)")
    if fields[1] != PROTOCOL_VERSION:
        raise ProtocolError(f"{what} has protocol version {fields[1]}; this side speaks {PROTOCOL_VERSION}")
    if fields[-1] != _crc(mv, layout.size - 4):
        raise ProtocolError(f"{what} checksum mismatch (truncated or corrupt message)")
    return fields


def encode_request(req: Request) -> bytearray:
    text = req.text.encode("utf-8")
    if len(text) > MAX_TEXT:
        raise ValueError(f"request text is {len(text)} bytes; at most {MAX_TEXT}")
    out = bytearray(REQUEST.size)
    REQUEST.pack_into(out, 0, REQUEST_MAGIC, PROTOCOL_VERSION, int(req.op), req.flags, req.request_id,
                      req.generation, req.max_nbytes, req.slot, req.n, req.wait_ms, len(text), req.hold_s,
                      req.ring_id, text, 0)
    _seal(out, REQUEST)
    return out


def decode_request(buf) -> Request:
    """Parse a request; raises :class:`ProtocolError` (status BAD_REQUEST)."""
    (_, _, op, flags, rid, gen, max_nbytes, slot, n, wait_ms, text_len, hold_s, ring_id, text, _) = \
        _unseal(buf, REQUEST, REQUEST_MAGIC, "request")
    try:
        op = Op(op)
    except ValueError:
        raise ProtocolError(f"unknown op {op}") from None
    if text_len > MAX_TEXT:
        raise ProtocolError(f"text length {text_len} exceeds {MAX_TEXT}")
    try:
        text_s = text[:text_len].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("request text is not UTF-8") from None
    return Request(op, rid, slot, gen, n, wait_ms, max_nbytes, text_s, flags, ring_id, hold_s)


def encode_response(resp: Response, out: bytearray | None = None) -> bytearray:
    msg = resp.message.encode("utf-8")[:MAX_MESSAGE]
    out = out if out is not None else bytearray(RESPONSE.size)
    RESPONSE.pack_into(out, 0, RESPONSE_MAGIC, PROTOCOL_VERSION, int(resp.status), resp.flags, resp.request_id,
                       resp.generation, resp.nbytes, resp.slot, resp.index, resp.count, len(msg), resp.ring_id,
                       msg, 0)
    _seal(out, RESPONSE)
    return out


def decode_response(buf) -> Response:
    """Parse a response header; raises :class:`ProtocolError` on anything odd."""
    (_, _, status, flags, rid, gen, nbytes, slot, index, count, msg_len, ring_id, msg, _) = \
        _unseal(buf, RESPONSE, RESPONSE_MAGIC, "response")
    try:
        status = Status(status)
    except ValueError:
        raise ProtocolError(f"unknown status {status}") from None
    message = msg[: min(msg_len, MAX_MESSAGE)].decode("utf-8", "replace")
    return Response(status, rid, slot, gen, nbytes, index, count, message, flags, ring_id)


def answer_to(buf, request_id: int) -> Response:
    """Decode a response header that must answer request ``request_id`` (answers come in
    request order on an endpoint); :class:`ProtocolError` when it is corrupt or answers another."""
    resp = decode_response(buf)
    if resp.request_id != request_id:
        raise ProtocolError(f"response for request {resp.request_id}, expected {request_id}")
    return resp


def ring_id_bytes(ring_id: str | None) -> bytes:
    """A ref's ring id (32 hex digits, or None) as the wire's 16 bytes."""
    return NO_RING_ID if ring_id is None else bytes.fromhex(ring_id)


def ring_id_hex(raw: bytes) -> str | None:
    """The wire's 16 ring-id bytes as a ref's ring id (None when all zero)."""
    return None if raw == NO_RING_ID else raw.hex()


# ------------------------------------------------------------------ batches --
#: most items in one GETV/TAKEV (an ACK's verdicts fit the request's text field)
MAX_BATCH = 200
#: payloads below this many bytes are coalesced with their neighbours into one message
COALESCE_BELOW = 256 << 10
#: a coalesced message stops growing past this many bytes
COALESCE_MAX = 4 << 20
#: offsets of payloads inside a coalesced message are multiples of this (views stay aligned)
COALESCE_ALIGN = 64


#: one item of a batch: status (answers; 0 in a GETV request), slot, generation, nbytes
BATCH_DTYPE = np.dtype([("status", "u1"), ("_pad", "V3"), ("slot", "<u4"), ("generation", "<u8"),
                        ("nbytes", "<u8")])
assert BATCH_DTYPE.itemsize == 24
#: a GETV request is one message: the request header, then its entry table
GETV_MAX_BYTES = REQUEST.size + MAX_BATCH * BATCH_DTYPE.itemsize + 4 + MAX_FIELDS_BYTES


def encode_fields(names) -> bytes:
    """The field list of a FLAG_FIELDS request."""
    if isinstance(names, (str, bytes)):  # list("tokens") would ask for the fields t, o, k, e, n, s
        raise ValueError(f"fields must be a list of field names, not a single string: use [{names!r}]")
    names = list(names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"fields must be a non-empty list of field names, got {names!r:.200}")
    blob = json.dumps(names, separators=(",", ":")).encode("utf-8")
    if len(blob) > MAX_FIELDS_BYTES:
        raise ValueError(f"the field list is {len(blob)} bytes encoded; at most {MAX_FIELDS_BYTES}")
    return blob


def decode_fields(buf, offset: int, length: int) -> frozenset:
    """Parse a FLAG_FIELDS request's field list (ProtocolError if malformed)."""
    if not 0 < length <= MAX_FIELDS_BYTES or offset + length > len(buf):
        raise ProtocolError(f"field list of {length} bytes at {offset} is out of range")
    try:
        names = json.loads(bytes(buf[offset:offset + length]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"field list is not UTF-8 JSON: {exc}") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ProtocolError("field list must be a non-empty JSON array of names")
    return frozenset(names)


def batch_array(n: int) -> np.ndarray:
    return np.zeros(n, BATCH_DTYPE)


def write_batch_array(arr: np.ndarray, out: np.ndarray, offset: int = 0) -> int:
    """Write table ``arr`` (+ CRC-32) into uint8 array ``out`` at ``offset``; returns the end offset."""
    raw = arr.view(np.uint8)
    end = offset + len(raw)
    out[offset:end] = raw
    out[end:end + 4] = np.frombuffer(struct.pack("<I", zlib.crc32(raw)), np.uint8)
    return end + 4


def read_batch_array(buf, n: int, offset: int = 0) -> np.ndarray:
    """The ``n``-entry table at ``offset`` of ``buf`` as an array (a copy); ProtocolError
    on a short or corrupt table."""
    mv = memoryview(buf).cast("B")
    end = offset + n * BATCH_DTYPE.itemsize
    if len(mv) < end + 4:
        raise ProtocolError(f"batch table of {n} entries needs {end + 4 - offset} bytes, got {len(mv) - offset}")
    if struct.unpack_from("<I", mv, end)[0] != zlib.crc32(mv[offset:end]):
        raise ProtocolError("batch table checksum mismatch (truncated or corrupt message)")
    return np.frombuffer(mv, BATCH_DTYPE, n, offset).copy()


def batch_table_size(n: int) -> int:
    """Bytes of a GETV entry-table message, and of a batch answer's table after its header."""
    return n * BATCH_DTYPE.itemsize + 4


def plan_batch(sizes) -> list[list[tuple[int, int]]]:
    """How a batch answer's payloads travel, computed the same way by both sides from
    the sizes of the OK items (in table order): a list of messages, each a list of
    (item index, offset in the message). Consecutive payloads below COALESCE_BELOW
    share a message (offsets aligned to COALESCE_ALIGN) up to COALESCE_MAX bytes;
    larger payloads travel alone, straight from shared memory."""
    msgs: list[list[tuple[int, int]]] = []
    cur: list[tuple[int, int]] = []
    fill = 0
    for i, n in sizes:
        if n >= COALESCE_BELOW:
            if cur:
                msgs.append(cur)
                cur, fill = [], 0
            msgs.append([(i, 0)])
            continue
        off = (fill + COALESCE_ALIGN - 1) // COALESCE_ALIGN * COALESCE_ALIGN
        if cur and off + n > COALESCE_MAX:
            msgs.append(cur)
            cur, off = [], 0
        cur.append((i, off))
        fill = off + n
    if cur:
        msgs.append(cur)
    return msgs


def message_size(plan_msg, sizes: dict) -> int:
    """Bytes of one planned message (``sizes``: item index -> nbytes)."""
    i, off = plan_msg[-1]
    return off + sizes[i]


#: GETV with FLAG_ONE_MESSAGE: the whole answer (header, table, every payload) is one
#: message when the refs' sizes add up to at most this many bytes
ONE_MESSAGE_MAX = 4 << 20


def one_message_layout(n: int, sizes) -> tuple[list[int], int]:
    """Offsets of the payloads in a one-message GETV answer of ``n`` items whose
    requested sizes are ``sizes`` (every item has its place; an item not served
    leaves its place unwritten), and the message's total size."""
    off = (RESPONSE.size + batch_table_size(n) + COALESCE_ALIGN - 1) // COALESCE_ALIGN * COALESCE_ALIGN
    offsets = []
    for size in sizes:
        offsets.append(off)
        off = (off + size + COALESCE_ALIGN - 1) // COALESCE_ALIGN * COALESCE_ALIGN
    return offsets, off
