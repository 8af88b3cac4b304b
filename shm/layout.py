"""Segment layout of a ring: described once, as named constants and dtypes.

A ring is one file in ``/dev/shm`` (POSIX shared memory)::

    [0, HEADER_BYTES)                 RING_HEADER   (one page)
    [ctrl_off, ctrl_off + slots*64)   SLOT_RECORD x slots (rounded up to a page)
    [data_off + i*slot_stride, ...)   slot i's region (page-aligned):
        SLOT_HEADROOM bytes reserved for a transport header, then the
        payload frame (64-byte aligned), up to slot_bytes long

All integers are little-endian; records are read and written through numpy
structured views of the mapping.  Fields written only under the ring's
slot's transition lock are marked (L); futex words are 4-byte aligned u32.
There is no ring-wide lock on any transition: a process frozen (SIGSTOP) in
the middle of one transition holds one slot's lock, never the ring.
"""

from __future__ import annotations

import mmap

import numpy as np

RING_MAGIC = b"RLRING01"
RING_VERSION = 2
PAGE = mmap.PAGESIZE
HEADER_BYTES = PAGE
SLOT_RECORD_BYTES = 128
#: bytes before each slot's frame, owned by whoever holds the slot: a server
#: writes its response header there and sends header + frame as one message
SLOT_HEADROOM = 128
MAX_PORTS = 16
MAX_HOST_BYTES = 64

# ---- ring header -----------------------------------------------------------
RING_HEADER = np.dtype(
    [
        ("magic", "S8"),
        ("version", "<u4"),
        ("header_bytes", "<u4"),
        ("slots", "<u4"),
        ("on_full", "<u4"),  # ON_FULL_CODES
        ("slot_bytes", "<u8"),  # usable bytes per slot
        ("slot_stride", "<u8"),  # slot_bytes rounded up to a page
        ("ctrl_off", "<u8"),
        ("data_off", "<u8"),
        ("created_ns", "<u8"),
        ("ready_futex", "<u4"),  # bumped (and woken) whenever a slot becomes READY
        ("free_futex", "<u4"),  # bumped (and woken) whenever a slot becomes FREE
        # address of the server exposing this ring (written by the server)
        ("server_pid", "<u4"),
        ("server_nports", "<u4"),
        ("reserved0", "<u8"),  # unused (server liveness is the LOCK_SERVER byte lock, never a pid)
        ("server_ports", "<u2", (MAX_PORTS,)),
        ("server_host", f"S{MAX_HOST_BYTES}"),
        # identity: random at create time, unique across hosts and re-creations of a name
        ("ring_id", "V16"),
        ("owner_uid", "<u4"),  # uid of the creator (attach refuses another user's ring)
        # the ports the last server used: a restarted server reuses them when free,
        # so refs published before the restart stay fetchable
        ("last_nports", "<u4"),
        ("last_ports", "<u2", (MAX_PORTS,)),
    ],
    align=False,
)
assert RING_HEADER.itemsize <= HEADER_BYTES
assert RING_HEADER.fields["ready_futex"][1] % 4 == 0 and RING_HEADER.fields["free_futex"][1] % 4 == 0

# ---- slot record -----------------------------------------------------------
SLOT_RECORD = np.dtype(
    [
        ("state", "<u4"),  # (L) one of SlotState
        ("owner_pid", "<u4"),  # (L) pid holding the slot in WRITING/READING, else 0
        ("generation", "<u8"),  # (L) bumped by every publish: also this slot's publish count
        ("nbytes", "<u8"),  # (L) frame length of the READY payload
        ("seq", "<u8"),  # (L) CLOCK_MONOTONIC ns of the publish (publish order, host-wide clock)
        ("lease", "<u8"),  # (L) bumped by every claim: finalisers must present it
        ("claimed_ns", "<u8"),  # (L) CLOCK_REALTIME of the last claim (diagnostics)
        ("failures", "<u4"),  # (L) readers that reported this payload undecodable (reset on publish)
        ("drops", "<u4"),  # (L) payloads of this slot dropped by on_full="drop_oldest"
        ("consumed", "<u8"),  # (L) payloads of this slot acked
        ("recovered", "<u4"),  # (L) times this slot was reclaimed from a dead owner
        ("dead", "<u4"),  # (L) payloads of this slot moved to DEAD
        ("_pad", "V56"),
    ]
)
assert SLOT_RECORD.itemsize == SLOT_RECORD_BYTES

# ---- lock byte ranges (OFD locks, far beyond the end of the file) ---------
#: base of the ring's lock bytes
LOCK_TRANSITION = 1 << 40
#: server-liveness lock byte (held by a serving process for as long as it serves)
LOCK_SERVER = LOCK_TRANSITION + 1
#: slot i's ownership lock is held by the process that has it WRITING/READING
LOCK_OWNER_BASE = LOCK_TRANSITION + 4096
#: slot i's transition lock: held for the few field updates of one transition
LOCK_SLOT_BASE = LOCK_OWNER_BASE + 65536 + 4096

ON_FULL_CODES = {"block": 0, "error": 1, "drop_oldest": 2}
ON_FULL_NAMES = {v: k for k, v in ON_FULL_CODES.items()}


def round_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def segment_size(slots: int, slot_bytes: int) -> tuple[int, int, int, int]:
    """Return (total_bytes, ctrl_off, data_off, slot_stride)."""
    ctrl_off = HEADER_BYTES
    data_off = ctrl_off + round_up(slots * SLOT_RECORD_BYTES)
    stride = round_up(SLOT_HEADROOM + slot_bytes)
    return data_off + slots * stride, ctrl_off, data_off, stride
