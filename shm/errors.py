"""Exception hierarchy of the shared-memory ring.

Every error raised by :mod:`shm` derives from :class:`RingError`, so one
``except shm.RingError`` catches them all.  Whether an error is worth retrying
is part of its type (:attr:`RingError.retryable`), never of its message.
"""

from __future__ import annotations


class RingError(Exception):
    """Base class of every error raised by the ring."""

    #: True when the same request may succeed if tried again later.
    retryable = False


class ForkedHandleError(RingError):
    """A lease, batch or writer inherited through ``os.fork()`` used in the child to
    finalise or write a slot its parent holds (the parent does that; claim or reserve
    slots of your own in the child). Also raised by an inherited ring handle when the
    child could not get a file description of its own at the fork: attach the ring
    again in the child."""


class RingFullError(RingError):
    """No FREE slot became available before the writer's deadline."""

    retryable = True


class RingEmptyError(RingError):
    """No READY payload became available before the reader's deadline."""

    retryable = True


class StaleSlotError(RingError):
    """The ref's (slot, generation) is gone: consumed, dropped or overwritten.

    Never retryable: the payload it named will not come back, and the slot's
    newer content is never served under the old ref.
    """


class InvalidRefError(RingError, ValueError):
    """A ref (or ref dict) is malformed: a field of the wrong type or out of range.

    Final: the same ref will never become valid. Also a ``ValueError``.
    """


class DeadLetterError(RingError):
    """The payload was moved to DEAD after repeated decode failures; never served
    again (inspect it with ``RingBuffer.dead_letters()`` / ``claim_dead``)."""


class SlotBusyError(RingError):
    """The ref's payload is leased by another reader right now.

    Retryable: if that reader nacks or dies the payload becomes READY again.
    """

    retryable = True


class SlotLockTimeoutError(RingError):
    """A slot's transition lock stayed busy past the deadline: another process
    froze in the middle of a transition on that slot (SIGSTOP, a debugger).
    Nothing changed; retryable. Other slots are unaffected."""

    retryable = True


class PayloadTooLargeError(RingError):
    """The encoded payload does not fit in one slot."""

    def __init__(self, nbytes: int, slot_bytes: int, what: str = "payload"):
        super().__init__(
            f"{what} needs {nbytes} bytes but a slot holds {slot_bytes} bytes; "
            f"create the ring with a larger slot_bytes (>= {nbytes}) or split the payload"
        )
        self.nbytes = nbytes
        self.slot_bytes = slot_bytes


class FrameError(RingError):
    """A payload frame is corrupt, truncated, or not a frame of this format."""


class RingLayoutError(RingError):
    """The segment is not a ring of this format/version, or is too small."""


class PayloadReleasedError(RingError, RuntimeError):
    """A payload was used after :meth:`~shm.Payload.release`. Views taken from it
    before the release stay valid (they keep its memory); the payload object
    itself hands out nothing more."""


def without_tracebacks(exc: BaseException) -> BaseException:
    """``exc`` with no traceback, nor any on the errors it chains (cause, context): an error
    kept as a result must not keep alive the frames it passed through, nor the payload views
    those frames hold (a batch's views share their memory)."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        todo += (e.__cause__, e.__context__)
    return exc
