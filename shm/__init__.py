"""Shared-memory ring buffer for rollout payloads (no network, no ucxx).

See ``docs/RING.md`` for the layout and the slot state machine.
"""

from .errors import (
    DeadLetterError,
    ForkedHandleError,
    FrameError,
    InvalidRefError,
    PayloadReleasedError,
    PayloadTooLargeError,
    RingEmptyError,
    RingError,
    RingFullError,
    RingLayoutError,
    SlotBusyError,
    SlotLockTimeoutError,
    StaleSlotError,
)
from .payload import Payload
from .ref import SlotRef
from .ring import LeaseBatch, RingBuffer, SlotLease, SlotWriter
from .state import DEAD_LETTER_AFTER, SlotState
from .tree import Ragged

__all__ = [
    "RingBuffer", "SlotWriter", "SlotLease", "LeaseBatch", "SlotRef", "SlotState", "Payload",
    "RingError", "RingFullError", "RingEmptyError", "StaleSlotError", "SlotBusyError",
    "PayloadTooLargeError", "FrameError", "RingLayoutError", "InvalidRefError", "DeadLetterError",
    "SlotLockTimeoutError", "DEAD_LETTER_AFTER", "PayloadReleasedError", "Ragged", "ForkedHandleError",
]
