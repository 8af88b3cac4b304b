"""Every private ucxx name this project relies on, in one place, behind a version check.

ucxx's Python package exposes no public API for what the engine needs: the process's
application context and its progress-task table (to share a context with an
application that initialised ucxx first, and to install our own progress driver),
the raw endpoint under an ``Endpoint`` (to post tag sends and receives whose buffers
we keep alive ourselves, see :mod:`ucxx_transport.engine`), and the handshake pieces
of ``create_endpoint`` (whose own version frees a buffer UCX may still write to).
These names moved between ucxx releases before, so they are looked up here only,
after ``ucxx`` itself was imported (by :func:`ucxx_transport.engine.import_ucxx`),
and a ucxx outside :data:`TESTED` logs one warning naming the version.

One behaviour is relied on as well: a tag receive into a buffer larger than the
message completes with the shorter message (UCX's own rule; ucxx 0.52 does not check
the length). A one-message TAKEV answer arrives that way; tests/test_client.py and
tests/test_server.py fail if a release starts refusing it.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

log = logging.getLogger("ucxx_transport.ucxx_compat")

#: ucxx (major, minor) releases these names were checked against (pyproject pins the same range)
TESTED = ((0, 52),)

_names: SimpleNamespace | None = None


def version_tuple(version: str) -> tuple[int, int]:
    """``"0.52.00"`` -> ``(0, 52)``."""
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def names() -> SimpleNamespace:
    """The private ucxx names, imported once (ucxx must be importable)."""
    global _names
    if _names is None:
        import ucxx
        from ucxx._lib import libucxx
        from ucxx._lib.arr import Array
        from ucxx._lib_async import application_context
        from ucxx._lib_async.continuous_ucx_progress import ThreadMode
        from ucxx._lib_async.endpoint import Endpoint
        from ucxx._lib_async.utils import hash64bits
        from ucxx.types import Tag, TagMaskFull

        if version_tuple(ucxx.__version__) not in TESTED:
            log.warning("ucxx %s is not a release this transport was tested with (%s): its private "
                        "interfaces may differ; pin ucxx to a tested release if anything fails",
                        ucxx.__version__, ", ".join(f"{a}.{b}" for a, b in TESTED))
        _names = SimpleNamespace(
            ucxx=ucxx, libucxx=libucxx, Array=Array, Endpoint=Endpoint, hash64bits=hash64bits, Tag=Tag,
            TagMaskFull=TagMaskFull, ThreadMode=ThreadMode, UCXCloseError=libucxx.UCXCloseError,
            application_context=application_context,
            clear_progress_tasks=application_context.clear_progress_tasks,
        )
    return _names


def ucx_errors() -> tuple[type[BaseException], ...]:
    """What a UCX operation raises when its endpoint or peer fails (every ucxx error
    derives from ``ucxx.exceptions.UCXError``); anything else is a bug to surface."""
    return (names().ucxx.exceptions.UCXError,)


def progress_tasks() -> dict:
    """ucxx's table of progress drivers, one per event loop (looked up live: never cached)."""
    return names().application_context.ProgressTasks


def current_context():
    """The process's ucxx application context, or None before ``ucxx.init()``."""
    return names().ucxx.core._ctx


def get_or_create_context():
    """The process's ucxx application context, created with ucxx's defaults if none exists."""
    return names().ucxx.core._get_ctx()


def raw_endpoint(ep):
    """The libucxx endpoint under a ucxx ``Endpoint`` (None once closed)."""
    return ep._ep


def endpoint_tags(ep) -> tuple[int, int]:
    """(send tag, receive tag) of a ucxx ``Endpoint``'s message channel."""
    return ep._tags["msg_send"], ep._tags["msg_recv"]


def endpoint_context(ep):
    """The application context an ``Endpoint`` belongs to (None once closed)."""
    return ep._ctx


def progress_task_handles(progress) -> tuple:
    """The asyncio tasks behind one entry of ucxx's progress table (to cancel them)."""
    return tuple(getattr(progress, "_tasks", ()) or ())
