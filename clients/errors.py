"""Client exception hierarchy, and the one place that classifies low-level errors.

::

    TransportError
    |-- StaleSlotError (also shm.StaleSlotError)   final: the payload is gone
    |   `-- AlreadyDeliveredError                   final: this client already returned it once
    |-- InvalidRefError (also shm.InvalidRefError)  final: the ref is malformed
    |-- NoAddressError                              final: no server address for the ref's ring
    |-- ForkedClientError                           final: a client used in a fork of its process
    |-- AuthError                                   final: token missing/wrong
    |-- BadRequestError                             final: the server rejected the request
    |-- PayloadTooLargeError (also shm.PayloadTooLargeError)  final: exceeds the client's limit
    `-- TransientTransportError                     retryable
        |-- ConnectionLostError   reset / cancel / close / truncation: port quarantined
        |-- CallTimeoutError      the call's deadline passed: port quarantined
        |-- ServerBusyError       BUSY / SHUTTING_DOWN / ERROR from the server
        `-- CorruptPayloadError   length or frame check failed (NACKed)

Which ucxx exceptions mean what is decided by *type* in :func:`classify`.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import socket

import shm
from shm.errors import without_tracebacks
from ucxx_transport.protocol import ProtocolError, Status


class TransportError(Exception):
    """Base of every client error."""

    retryable = False
    #: the (host, port) should be quarantined
    quarantine = False


class StaleSlotError(TransportError, shm.StaleSlotError):
    """The ref's (slot, generation) was consumed or dropped. Never retried."""


class AlreadyDeliveredError(StaleSlotError):
    """This client already returned this payload once (a server that died between
    our ACK and applying it served it again); the repeat was ACKed and dropped."""


class InvalidRefError(TransportError, shm.InvalidRefError):
    """The ref is malformed (wrong type, field out of range). Never retried."""


class NoAddressError(TransportError):
    """No server address is known for the ref's ring: the ref carries none, the
    ring is not on this host, and no resolver was configured."""


class AuthError(TransportError):
    """The server requires a token and ours is missing or wrong."""


class BadRequestError(TransportError):
    """The server rejected the request as malformed (a bug or a version skew)."""


class PayloadTooLargeError(TransportError, shm.PayloadTooLargeError):
    """The payload exceeds the client's ``max_nbytes`` (also a
    ``shm.PayloadTooLargeError``: one except serves both sides' size limits)."""

    def __init__(self, message: str):
        Exception.__init__(self, message)


class TransientTransportError(TransportError):
    """May succeed if retried (another port, later)."""

    retryable = True


class ForkedClientError(TransportError):
    """A TransportClient created before ``os.fork()`` used in the forked child: its UCX
    loop thread and endpoints did not survive the fork (and its same-host ring handles
    belong to the parent). Create the client in the child, after the fork."""

    def __init__(self, created_in: int, here: int):
        super().__init__(
            f"this TransportClient was created in process {created_in} and this process ({here}) is a fork of "
            f"it: its UCX loop thread and endpoints do not survive fork(). Create a TransportClient in the "
            f"child after the fork (e.g. in a DataLoader's worker_init_fn), or start workers with the "
            f"'spawn' method")


class ConnectionLostError(TransientTransportError):
    quarantine = True


class CallTimeoutError(TransientTransportError):
    quarantine = True


class ServerBusyError(TransientTransportError):
    pass


class CorruptPayloadError(TransientTransportError):
    pass


_STATUS_ERRORS = {
    Status.STALE: StaleSlotError,
    Status.BUSY: ServerBusyError,
    Status.DENIED: AuthError,
    Status.BAD_REQUEST: BadRequestError,
    Status.TOO_LARGE: PayloadTooLargeError,
    Status.SHUTTING_DOWN: ServerBusyError,
    Status.ERROR: ServerBusyError,
}


def status_error(status: Status, message: str, where: str) -> TransportError:
    cls = _STATUS_ERRORS.get(status, TransientTransportError)
    return cls(f"{where}: server answered {status.name}" + (f" ({message})" if message else ""))


def _ucx_types():
    try:
        from ucxx import exceptions as ux
    except ImportError:  # pragma: no cover
        return (), ()
    lost = (ux.UCXConnectionResetError, ux.UCXCanceledError, ux.UCXCloseError, ux.UCXMessageTruncatedError,
            ux.UCXNotConnectedError, ux.UCXUnreachableError, ux.UCXRejectedError, ux.UCXEndpointTimeoutError,
            ux.UCXIOError, ux.UCXError)
    timeouts = (ux.UCXTimedOutError,)
    return lost, timeouts


#: OSErrors that mean the peer or the path to it is gone; any other OSError (out of
#: memory or file descriptors, a bad buffer) is not the port's fault and propagates
_CONNECTION_ERRNOS = frozenset({errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
                                errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH,
                                errno.ENETDOWN, errno.EHOSTDOWN})


def classify(exc: BaseException, where: str) -> TransportError:
    """Map any exception raised during a call to a :class:`TransportError`, by type."""
    if isinstance(exc, TransportError):
        return exc
    lost, timeouts = _ucx_types()
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError) + timeouts):
        err: TransportError = CallTimeoutError(f"{where}: timed out")
    elif isinstance(exc, ProtocolError):
        err = ConnectionLostError(f"{where}: unintelligible response ({exc})")
    elif isinstance(exc, lost + (ConnectionError, socket.gaierror)) or (
            isinstance(exc, OSError) and exc.errno in _CONNECTION_ERRNOS):
        err = ConnectionLostError(f"{where}: {type(exc).__name__}: {exc}")
    else:
        return exc  # a bug, not a transport condition: let it propagate
    err.__cause__ = exc
    return err


#: an error kept as a batch's result, freed of the frames it passed through (shm's helper)
detached = without_tracebacks


def any_failed(outcomes, kind: type = BaseException) -> bool:
    """Is any of a batch's ``outcomes`` an error (an instance of ``kind``)? Checked in C:
    the usual batch has none, and its per-item handling is then skipped."""
    return any(map(isinstance, outcomes, itertools.repeat(kind)))
