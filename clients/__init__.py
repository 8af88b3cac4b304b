"""Trainer side: TransportClient, FetchStream, FanIn, UCXXDataPackerMixin."""

from .client import FetchResult, TransportClient
from .errors import (
    AlreadyDeliveredError,
    AuthError,
    BadRequestError,
    CallTimeoutError,
    ConnectionLostError,
    CorruptPayloadError,
    ForkedClientError,
    InvalidRefError,
    NoAddressError,
    PayloadTooLargeError,
    ServerBusyError,
    StaleSlotError,
    TransientTransportError,
    TransportError,
)
from .fanin import FanIn, FanInStream
from .mixin import PrefetchHandle, UCXXDataPackerMixin
from .stream import FetchStream

__all__ = [
    "TransportClient", "FetchResult", "FetchStream", "FanIn", "FanInStream", "UCXXDataPackerMixin", "PrefetchHandle",
    "TransportError", "StaleSlotError", "AuthError", "BadRequestError", "PayloadTooLargeError",
    "TransientTransportError", "ConnectionLostError", "CallTimeoutError", "ServerBusyError",
    "CorruptPayloadError", "AlreadyDeliveredError", "InvalidRefError", "NoAddressError", "ForkedClientError",
]
