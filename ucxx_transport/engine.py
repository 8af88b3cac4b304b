"""UCX engine: initialisation, progress driver, and teardown -- in one place.

Progress modes (``UCXX_TRANSPORT_PROGRESS_MODE``):

* ``adaptive`` (default): the asyncio loop progresses the UCX worker itself,
  spinning only while traffic flows and sleeping on the worker's epoll fd when
  idle (0% CPU idle, ~polling latency under load). Chosen from the
  measurements in docs/PROGRESS_MODES.md.
* ``thread``, ``thread-polling``, ``polling``, ``blocking``: ucxx's own modes.

Rules this module enforces: initialise once per process, never fork after
(spawn children instead); teardown cancels in-flight requests, stops the
progress driver and resets ucxx so interpreter exit never segfaults.

Coexistence with the application's own ucxx use (ucxx has one context per
process; see ucxx_compat.current_context):

* ucxx already initialised when we start (the application called
  ``ucxx.init()`` or used ``ucxx.create_listener`` / ``create_endpoint``): we
  share that context and run in *its* progress mode on our loop (our
  ``adaptive`` driver would race the application's progress for completions);
  our teardown never cancels its requests nor resets it.
* we start first: the application's later ``ucxx.create_*`` calls share our
  context; teardown leaves it alive while a loop of theirs still progresses it.
  A later ``ucxx.init()`` is refused by ucxx itself ("UCX is already
  initiated"): call it before the first client or server, or not at all.

Why one module past 400 lines: initialisation, the progress driver and
teardown share one piece of process-wide state (the ucxx context and the
buffers UCX may still write to); splitting them would spread that state's
invariants over several files.
"""

from __future__ import annotations

import _signal  # the C module under ``signal``: its calls skip the enum wrapping (11 us per direct call)
import asyncio
import concurrent.futures
import logging
import os
import queue
import signal
import threading
import time
import weakref
from dataclasses import dataclass, field

from . import ucxx_compat as compat

log = logging.getLogger("ucxx_transport.engine")

#: how long the driver polls a receive abandoned by a cancelled task; after that its
#: buffer moves to ``_Engine.orphaned`` (referenced for the life of the process, never freed)
ABANDONED_KEEP_S = 300.0
#: how often a connect in progress checks whether its endpoint died (refused)
REFUSED_POLL_S = 0.005
#: how often a driver with nothing in flight looks again while another driver runs a call
PEER_BUSY_RECHECK_S = 0.005
_SIGINT = int(signal.SIGINT)
PROGRESS_MODES = ("adaptive", "thread", "thread-polling", "polling", "blocking")
DEFAULT_PROGRESS_MODE = "adaptive"


class UCXStoppedError(RuntimeError):
    """UCX is not running here: never started, or stopped (its last client closed) while a call
    was under way."""


@dataclass
class _Engine:
    """What this process runs UCX with, in one place (one instance, :data:`_engine`; its
    fields change under :data:`_lock`, or on the UCX loop for the request lists)."""

    #: progress mode in use (None: not initialised) and the process that initialised it
    mode: str | None = None
    pid: int | None = None
    #: the adaptive progress driver (adaptive mode only)
    driver: "AdaptiveProgress | None" = None
    #: the ucxx ApplicationContext in use; ``shared``: the application made it before us (we
    #: use its progress mode and never reset it); ``loops``: loops whose ucxx progress entry is ours
    ctx: object = None
    shared: bool = False
    loops: list = field(default_factory=list)
    #: the context ucxx.init() made for us (weak): still ours if found again after a teardown
    #: that left it to the application
    created_ctx: object = None
    #: the shared UCX loop thread (:func:`acquire`) and how many holders it has
    loop: asyncio.AbstractEventLoop | None = None
    thread: threading.Thread | None = None
    refs: int = 0
    #: (request, keepalive) of requests abandoned outside the adaptive driver, kept until UCX is done
    abandoned: list = field(default_factory=list)
    #: keepalives of requests still pending when ucxx could not be reset (never freed: UCX may write there)
    orphaned: list = field(default_factory=list)
    #: every adaptive driver of the worker: the UCX loop's, then those of callers' own loops
    #: (:func:`run_here`); and those loops (closed at release)
    drivers: list = field(default_factory=list)
    caller_loops: list = field(default_factory=list)
    #: bumped at every start of the UCX loop: a caller's loop from an earlier start is not reused
    epoch: int = 0

    def update(self, **fields) -> None:
        for name, value in fields.items():
            setattr(self, name, value)


_engine = _Engine()
_lock = threading.RLock()
#: per thread: its own event loop and driver for calls run in it (:func:`run_here`)
_here = threading.local()


#: UCX settings we start with unless the environment sets them (measured A/B on TCP
#: loopback, benchmarks/README.md): larger TCP segments move 1-64 MiB payloads 2-3.5x
#: faster and cost nothing below; one poll per ready socket per progress call (UCX's
#: default is 16) bounds how long one call holds the loop while 64 MiB payloads stream
#: to several clients (server loop lag p99 89-98 -> 31-42 ms, 4 clients on 2 cores) at
#: the same throughput
UCX_DEFAULTS = {
    "UCX_WARN_UNUSED_ENV_VARS": "n",
    "UCX_TCP_CM_REUSEADDR": "y",  # a restarted server rebinds its ports at once
    "UCX_TCP_TX_SEG_SIZE": "1M",
    "UCX_TCP_RX_SEG_SIZE": "4M",
    "UCX_TCP_MAX_POLL": "1",
    # quiet by default: a dead peer is one classified error from us, not pages of C++ logs
    # (set UCX_LOG_LEVEL=warn / UCXX_LOG_LEVEL=ERROR to see them)
    "UCX_LOG_LEVEL": "fatal",
    "UCXX_LOG_LEVEL": "FATAL",
}


def ucx_settings() -> dict:
    """The UCX_* settings in effect: ours (UCX_DEFAULTS) unless the environment set them."""
    return {k: os.environ.get(k, v) for k, v in UCX_DEFAULTS.items()} | \
        {k: v for k, v in os.environ.items() if k.startswith(("UCX_", "UCXX_"))}


def apply_ucx_defaults() -> None:
    """Put :data:`UCX_DEFAULTS` into the environment where the user set nothing (UCX reads
    its configuration when ucxx is first imported and initialised: this must come first)."""
    for key, value in UCX_DEFAULTS.items():
        os.environ.setdefault(key, value)


def import_ucxx():
    """The ucxx module, imported with our UCX defaults (:data:`UCX_DEFAULTS`) in the
    environment; ImportError says how to install it."""
    apply_ucx_defaults()
    try:
        import ucxx  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on install
        raise ImportError(
            "the ucxx bindings are not installed: pip install 'ucxx-transport[cu12]' "
            "(or [cu13] on CUDA 13 machines)"
        ) from exc
    return ucxx


def resolve_mode(progress_mode: str | None) -> str:
    """The progress mode to run: ``progress_mode``, else ``UCXX_TRANSPORT_PROGRESS_MODE``,
    else the default; one of :data:`PROGRESS_MODES` (the knob table validates it:
    :class:`~ucxx_transport.config.ConfigError`, a ValueError, names flag and variable)."""
    from .config import resolve  # config imports this module: resolved at call time

    return resolve("progress_mode", progress_mode)


def init(progress_mode: str | None = None) -> str:
    """Initialise ucxx in this process (idempotent for the same mode); returns the
    progress mode in effect: the application's own when it initialised ucxx first."""
    with _lock:
        return _init_locked(resolve_mode(progress_mode))


def _ucxx_mode(mode: str) -> str:
    """The ucxx progress mode behind one of ours."""
    return "polling" if mode == "adaptive" else mode


def _init_locked(mode: str) -> str:
    if _engine.mode is not None:
        if _engine.pid != os.getpid():
            raise RuntimeError("ucxx was initialised in a parent process and this one was forked; "
                               "start children with the 'spawn' method")
        if _engine.mode != mode and not _engine.shared:
            raise RuntimeError(f"ucxx already initialised in this process with progress mode "
                               f"{_engine.mode!r}, asked for {mode!r}; use one mode per process")
        return _engine.mode
    ucxx = import_ucxx()
    ProgressTasks = compat.progress_tasks()

    existing = compat.current_context()
    mine = _engine.created_ctx() if _engine.created_ctx is not None else None
    if existing is not None and not (existing is mine and existing.progress_mode == _ucxx_mode(mode)):
        # the application initialised ucxx first: ucxx allows one context per process, so share it
        eff = existing.progress_mode
        log.info("ucxx is already initialised in this process (progress mode %r): sharing its context%s",
                 eff, "" if eff == mode else f" and its progress mode instead of {mode!r}")
        _engine.update(mode=eff, pid=os.getpid(), ctx=existing, shared=True, loops=[])
        return eff
    loops = []
    if existing is None:
        ucxx.init(progress_mode=_ucxx_mode(mode))
        existing = compat.current_context()
        _engine.created_ctx = weakref.ref(existing)
        loops = list(ProgressTasks)  # ucxx.init() attached progress to the running loop, or a fresh one
    _engine.update(mode=mode, pid=os.getpid(), ctx=existing, shared=False, loops=loops)
    log.debug("ucxx initialised, progress mode %s", mode)
    return mode


def _context():
    """The ucxx context we use (the application's when shared)."""
    ctx = _engine.ctx
    if ctx is None:
        if getattr(_here, "driver", None) is not None:  # a call in a caller's thread outlived release()
            raise UCXStoppedError("UCX was stopped while this call ran (its client was closed)")
        import_ucxx()
        return compat.get_or_create_context()
    return ctx


class _SharedThreadProgress:
    """Our loop's entry in ucxx's progress table when we share an application's context
    in a ``thread`` mode: the worker's one progress thread already serves every loop.
    (A ``ThreadMode`` of ours would stop that thread when it is collected.)"""

    _tasks = ()

    def __init__(self, loop):
        self.event_loop = loop

    def __hash__(self):
        return hash(self.event_loop)


def mode() -> str | None:
    return _engine.mode


def ucx_loop() -> asyncio.AbstractEventLoop | None:
    """The shared UCX loop (:func:`acquire`), or None when it is not running."""
    return _engine.loop


def attach_loop(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Make sure UCX progresses on ``loop`` (call from inside the loop)."""
    c = compat.names()
    ProgressTasks, ThreadMode = compat.progress_tasks(), c.ThreadMode

    loop = loop or asyncio.get_running_loop()
    ctx = _context()
    if loop not in _engine.loops and loop not in ProgressTasks:
        _engine.loops.append(loop)
    if _engine.mode == "adaptive":
        old = ProgressTasks.get(loop)
        if not isinstance(old, AdaptiveProgress):
            if old is not None:  # ucxx.init() attached its polling task to this loop: replace it
                for t in compat.progress_task_handles(old):
                    if t is not None:
                        t.cancel()
            from .config import resolve  # config imports this module: resolved at call time

            drv = AdaptiveProgress(ctx.worker, loop, spin_s=resolve("progress_spin_s", None), peers=_engine.drivers)
            ProgressTasks[loop] = drv
            _engine.driver = drv
            _engine.drivers.append(drv)
    elif _engine.shared and _engine.mode.startswith("thread") and \
            any(isinstance(t, ThreadMode) for t in ProgressTasks.values()):
        ProgressTasks.setdefault(loop, _SharedThreadProgress(loop))
    else:
        ctx.continuous_ucx_progress(event_loop=loop)


def progress_call_max_s() -> float | None:
    """Longest single UCX progress call seen by the adaptive driver (what bounds loop lag)."""
    drv = _engine.driver
    return None if drv is None else drv.max_call_s


def _driver() -> "AdaptiveProgress | None":
    """The adaptive driver of the loop this code runs on: the calling thread's own while
    :func:`run_here` runs a call in it, else the UCX loop's (None outside adaptive mode)."""
    here = getattr(_here, "driver", None)
    return here if here is not None else _engine.driver


def kick() -> None:
    """Tell the progress driver an operation was just posted (no-op unless adaptive)."""
    drv = _driver()
    if drv is not None:
        drv.kick()


def kick_all() -> None:
    """Wake every driver of the worker: after an endpoint was aborted, the cancellations of
    requests posted from other threads' calls complete at once rather than at their next look."""
    mine = _driver()
    for d in list(_engine.drivers):
        if d is mine:
            d.kick()
        elif d.event_loop.is_running():  # a stopped loop's driver progresses when it next runs
            try:
                d.event_loop.call_soon_threadsafe(d.kick)
            except RuntimeError:  # its loop was closed meanwhile
                pass


async def send(ep, buf):
    """Send ``buf`` on a ucxx Endpoint.

    With the adaptive driver the request is completed by the driver after it
    progressed the worker (no per-request polling: ucxx's own ``wait()`` in the
    non-thread modes re-checks every pending request on every loop iteration,
    which keeps a server with idle connections at 100 % CPU).
    """
    drv = _driver()
    if drv is None:
        return await ep.send(buf)  # (no task per send in ucxx's own progress modes)
    await _post_send(drv, ep, buf)


def post_send(ep, buf) -> asyncio.Future:
    """Post the send of ``buf`` on a ucxx Endpoint now (messages of one endpoint arrive
    in the order they were posted); the future completes when UCX is done with ``buf``.
    With the adaptive driver ``buf`` stays referenced until then, even if the future is
    abandoned. In ucxx's own progress modes the send is a task that starts when the loop
    next runs (tasks start in posting order); as with :func:`post_recv`, abort the
    endpoint before dropping such a future unfinished."""
    drv = _driver()
    if drv is None:
        return asyncio.ensure_future(ep.send(buf))
    return _post_send(drv, ep, buf)


def _post_send(drv: "AdaptiveProgress", ep, buf) -> asyncio.Future:
    c = compat.names()
    e = compat.raw_endpoint(ep)
    if e is None:
        raise c.UCXCloseError("Endpoint closed")
    e.raise_on_error()
    arr = c.Array(buf)
    req = e.tag_send(arr, c.Tag(compat.endpoint_tags(ep)[0]))
    return drv.wait(req, (arr, buf))


async def recv(ep, buf):
    """Receive into ``buf`` on a ucxx Endpoint (see :func:`send`)."""
    await post_recv(ep, buf)


def post_recv(ep, buf) -> asyncio.Future:
    """Post a receive into ``buf`` on a ucxx Endpoint now, e.g. before sending the
    request it answers; the future completes when the message is in ``buf``.
    Cancelling it abandons the receive; ``buf`` stays referenced until UCX is done."""
    drv = _driver()
    if drv is None:
        return asyncio.ensure_future(ep.recv(buf))
    c = compat.names()
    tag = c.Tag(compat.endpoint_tags(ep)[1])
    arr = c.Array(buf)
    e = compat.raw_endpoint(ep)
    try:
        if e is None:
            raise c.UCXCloseError("Endpoint closed")
        e.raise_on_error()
        req = e.tag_recv(arr, tag, c.TagMaskFull)
    except Exception:
        # closed or failed, but its last message may already sit on the worker
        ctx = compat.endpoint_context(ep)
        worker = None if ctx is None else ctx.worker
        probe = worker.tag_probe(tag, remove=True) if worker is not None else None
        if probe is None or not probe.matched:
            raise
        req = worker.tag_recv_with_handle(arr, probe)
    return drv.wait(req, (arr, buf))


async def _await_request(req, keepalive) -> None:
    """Await UCX request ``req``; ``keepalive`` (the buffers UCX reads or writes)
    stays referenced until UCX is done with it, even if the awaiting task is
    cancelled (a late completion must never land in freed memory)."""
    drv = _driver()
    if drv is not None:
        await drv.wait(req, keepalive)
        return
    try:
        await req.wait()
    except BaseException:
        if not req.completed:
            _engine.abandoned.append((req, keepalive))
        raise


def _prune_abandoned() -> None:
    _engine.abandoned[:] = [x for x in _engine.abandoned if not x[0].completed]


async def connect(host: str, port: int, timeout: float):
    """``ucxx.create_endpoint`` without its hazard.

    ucxx's own ``create_endpoint`` receives the peer's info into a local
    ``bytearray``; when the exchange times out or is cancelled (server
    SIGSTOPped, overloaded), that receive stays posted on the endpoint, nobody
    closes the endpoint, and when the peer answers later UCX writes 16 bytes
    into freed memory: heap corruption and a SIGSEGV somewhere else soon after.
    Here the buffers stay referenced until UCX completed or cancelled the
    request, and the endpoint is closed (cancelling it) on any failure.
    """
    import struct

    import_ucxx()
    c = compat.names()
    ucx_api, Array, Endpoint, hash64bits = c.libucxx, c.Array, c.Endpoint, c.hash64bits

    _prune_abandoned()
    ctx = _context()
    ucx_ep = ucx_api.UCXEndpoint.create(ctx.worker, host, port, True)
    kick()
    fmt = "QQ"
    msg_tag = hash64bits("msg_tag", os.urandom(16), ucx_ep.handle)
    mine = struct.pack(fmt, msg_tag, hash64bits(msg_tag))
    peer = bytearray(len(mine))
    mine_arr, peer_arr = Array(mine), Array(peer)

    async def exchange():
        req = ucx_ep.stream_recv(peer_arr)
        kick()
        await _await_request(req, (peer_arr, peer, ucx_ep))
        req = ucx_ep.stream_send(mine_arr)
        kick()
        await _await_request(req, (mine_arr, mine, ucx_ep))

    try:
        # a refused connection (nothing listens there) shows as a dead endpoint within
        # milliseconds: fail then, not when the deadline passes
        task = asyncio.ensure_future(exchange())
        deadline = time.monotonic() + timeout
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=min(REFUSED_POLL_S, max(0.0, deadline - time.monotonic())))
                if done:
                    task.result()
                    break
                if not ucx_ep.alive:
                    ucx_ep.raise_on_error()
                    raise ConnectionRefusedError(f"connect {host}:{port}: endpoint closed during the handshake")
                if time.monotonic() >= deadline:
                    raise asyncio.TimeoutError(f"connect {host}:{port}: no handshake within {timeout:.1f} s")
        finally:
            if not task.done():
                task.cancel()
        peer_tag, checksum = struct.unpack(fmt, peer)
        if hash64bits(peer_tag) != checksum:
            raise RuntimeError(f"peer info checksum invalid: {hash64bits(peer_tag):#x} != {checksum:#x}")
    except BaseException as exc:
        try:
            ucx_ep.close_blocking(period=10**10, max_attempts=1)  # cancels the exchange's requests
            ucx_ep.remove_close_callback()
        except (*compat.ucx_errors(), RuntimeError) as close_exc:  # pragma: no cover - a failed endpoint may refuse
            log.debug("closing a failed endpoint: %r", close_exc)
        finally:
            kick_all()
        if isinstance(exc, ucx_api.UCXMessageTruncatedError):
            ucx_ep.raise_on_error()
        raise
    return Endpoint(endpoint=ucx_ep, ctx=ctx, tags={"msg_send": peer_tag, "msg_recv": msg_tag})


def abort(ep) -> None:
    """Abort an endpoint and make the driver progress the cancellations at once,
    so pending receives on it raise now rather than at the next wake-up."""
    try:
        ep.abort()
    finally:
        kick_all()


def reset() -> None:
    """Tear ucxx down: stop progress, cancel in-flight requests, reset the context."""
    with _lock:
        _reset_locked()


def _reset_locked() -> None:
    if _engine.mode is None:
        return
    import gc

    ucxx = import_ucxx()
    c = compat.names()
    ProgressTasks, clear_progress_tasks = compat.progress_tasks(), c.clear_progress_tasks

    drivers = list(_engine.drivers)
    _stop_drivers(drivers)
    # buffers of requests UCX may still complete: referenced until the worker is gone
    pending = [item.keepalive for d in drivers for item in d.pending]
    pending += [keep for _, keep in _engine.abandoned]
    _engine.abandoned.clear()
    others = [lp for lp in ProgressTasks if lp not in _engine.loops and not lp.is_closed()]
    if _engine.shared or others:
        # the application's context (or ours, now progressed by the application's loops too):
        # leave its requests and its progress alone; drop only our loops' progress entries
        ThreadMode = c.ThreadMode

        for lp in _engine.loops:
            if not isinstance(ProgressTasks.get(lp), ThreadMode):  # collecting one stops the progress thread
                ProgressTasks.pop(lp, None)
        _engine.orphaned.extend(pending)  # the worker outlives us: so must they
        log.debug("ucxx context left running: %s", "the application's" if _engine.shared else
                  f"{len(others)} other event loop(s) use it")
    else:
        try:
            _context().worker.cancel_inflight_requests()
        except (*compat.ucx_errors(), RuntimeError) as exc:  # pragma: no cover
            log.debug("cancel_inflight_requests: %s", exc)
        clear_progress_tasks()
        _engine.ctx = None  # ucxx.reset() refuses a context still referenced
        gc.collect()
        try:
            ucxx.reset()
        except compat.ucx_errors() as exc:
            _engine.orphaned.extend(pending)  # the worker outlives us: so must they
            # ucxx has already dropped its context; an object still referencing it
            # (e.g. an endpoint inside a caller-held exception traceback) frees it later.
            log.info("ucxx.reset(): context still referenced, freed when that reference goes (%s)",
                     str(exc).splitlines()[0][:200])
    _engine.update(mode=None, pid=None, driver=None, ctx=None, shared=False, loops=[])
    _engine.drivers.clear()  # callers' loops are closed by release() once the UCX loop has stopped


def _stop_drivers(drivers: list) -> None:
    """Stop every driver of the worker (one whose loop runs in another thread, there)."""
    try:
        here = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    for d in drivers:
        lp = d.event_loop
        if lp is here or not lp.is_running():
            d.stop()
            continue
        try:  # (a call that began after _end_callers_calls looked: it ends now, not at its deadline)
            lp.call_soon_threadsafe(_cancel_calls, d, True)
        except RuntimeError:  # closed meanwhile
            d.stop()


async def _end_callers_calls(timeout: float) -> None:
    """On the UCX loop, at teardown: cancel the calls still running in callers' threads (their
    client's close() gave up waiting for them) and wait for them to end (bounded), the worker
    progressed meanwhile, so what they abort on the way out (their endpoints) is done."""
    me = asyncio.get_running_loop()
    told: list = []
    end = time.monotonic() + timeout
    while True:  # looked at again each round: a call may start (or be handed to a helper) meanwhile
        busy = [d for d in _engine.drivers if d.event_loop is not me and d.event_loop.is_running()]
        for d in busy:
            if d not in told:
                told.append(d)
                try:
                    d.event_loop.call_soon_threadsafe(_cancel_calls, d)
                except RuntimeError:  # closed meanwhile
                    pass
        if not busy:
            return
        if time.monotonic() >= end:
            log.warning("%d call(s) in other threads did not stop within %.1f s of UCX's teardown",
                        len(busy), timeout)
            return
        await asyncio.sleep(PEER_BUSY_RECHECK_S)  # a loop's end in another thread has no event to await


def _cancel_calls(drv, stop: bool = False) -> None:
    """In a caller's thread: cancel the calls its loop runs (its driver runs on until they end,
    unless ``stop``)."""
    for t in asyncio.all_tasks(drv.event_loop):
        if t is not drv.task:
            t.cancel()
    if stop:
        drv.stop()


# ------------------------------------------------------------ the UCX loop ---
def acquire(progress_mode: str | None = None) -> asyncio.AbstractEventLoop:
    """The process's UCX event loop (one thread, one worker, one progress
    driver), started on first use; every server and client in the process
    shares it. Balance with :func:`release`."""
    mode = resolve_mode(progress_mode)
    with _lock:
        if _engine.refs == 0:
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def run():
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            t = threading.Thread(target=run, name="ucxx-transport-loop", daemon=True)
            t.start()
            started.wait()
            try:
                asyncio.run_coroutine_threadsafe(_init_and_attach(mode), loop).result(30)
            except BaseException:
                loop.call_soon_threadsafe(loop.stop)
                t.join(5)
                raise
            _engine.update(loop=loop, thread=t, epoch=_engine.epoch + 1)
        elif _engine.mode != mode and not _engine.shared:
            raise RuntimeError(f"this process already runs UCX with progress mode {_engine.mode!r}; "
                               f"asked for {mode!r}: use one mode per process")
        _engine.refs += 1
        return _engine.loop


async def _init_and_attach(mode: str):
    _init_locked(mode)  # in the loop thread (acquire() holds _lock), so ucxx binds to this loop
    attach_loop()


def release(timeout: float = 5.0) -> None:
    """Drop one reference; the last one cancels every task on the loop, stops
    the progress driver, resets ucxx and joins the loop thread (bounded)."""
    with _lock:
        if _engine.refs == 0:
            return
        _engine.refs -= 1
        if _engine.refs:
            return
        loop, t = _engine.loop, _engine.thread
        _engine.update(loop=None, thread=None)

        async def _teardown():
            me = asyncio.current_task()
            tasks = [x for x in asyncio.all_tasks() if x is not me]
            for x in tasks:
                x.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=timeout / 4)
            await _end_callers_calls(timeout / 4)
            _reset_locked()  # release() holds _lock

        try:
            asyncio.run_coroutine_threadsafe(_teardown(), loop).result(timeout)
        except Exception as exc:  # noqa: BLE001 - shutdown goes on whatever the teardown hit; it is logged
            log.warning("UCX teardown did not finish cleanly: %r", exc)
        loop.call_soon_threadsafe(loop.stop)
        t.join(timeout)
        if t.is_alive():
            log.error("UCX loop thread did not stop within %.1f s", timeout)
        else:
            loop.close()
        _close_caller_loops()


def _close_caller_loops() -> None:
    """Close the callers' own loops (their drivers were stopped by the reset); one still
    running a call (a thread calling while the last client closes) is left to its thread."""
    loops, _engine.caller_loops = _engine.caller_loops, []
    for lp in loops:
        if lp.is_running() or lp.is_closed():
            continue
        try:
            pending = [t for t in asyncio.all_tasks(lp) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                lp.run_until_complete(asyncio.wait(pending, timeout=1.0))
            lp.run_until_complete(lp.shutdown_default_executor())
        except RuntimeError as exc:  # pragma: no cover - e.g. another loop runs in this thread
            log.debug("closing a caller's loop: %r", exc)
        finally:
            if not lp.is_running():
                lp.close()


def run(coro, timeout: float | None = None, on_interrupt=None):
    """Run ``coro`` on the UCX loop from a plain thread; returns its result.

    On ``timeout`` the coroutine is cancelled (nothing keeps running behind the
    caller's back) and ``TimeoutError`` is raised. When the waiting thread is
    interrupted instead (KeyboardInterrupt, or any exception raised in it while
    it waits), the coroutine runs on to its end (cancelling work halfway, e.g.
    between an ACK and its confirmation, could undo what was already decided),
    and ``on_interrupt``, when given, is called at once in the interrupted
    thread with a ``concurrent.futures.Future`` of its outcome (for work whose
    result must not be dropped, like payloads already acknowledged). The
    interrupt propagates.
    """
    loop = _engine.loop
    if loop is None:
        coro.close()
        raise UCXStoppedError("the UCX loop is not running (engine.acquire() first)")
    if _engine.pid != os.getpid():
        coro.close()
        raise RuntimeError(f"the UCX loop belongs to process {_engine.pid} and this process is a fork of it "
                           f"(its loop thread did not survive fork()): start children with the 'spawn' method")
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise RuntimeError("sync call made from the UCX loop thread itself; use the async method")
    # call_soon_threadsafe and a SimpleQueue (C) instead of run_coroutine_threadsafe and its
    # concurrent Future (a Condition): the same hand-over, about 40 us cheaper per sync call here
    done: queue.SimpleQueue = queue.SimpleQueue()
    started: list = []
    interrupted: list = []

    def start() -> None:
        task = loop.create_task(coro)
        started.append(task)
        task.add_done_callback(done.put)

    def on_sigint(signum, frame):  # between two bytecodes of this thread: only note it and wake the wait
        interrupted.append(True)
        done.put(_INTERRUPTED)  # (SimpleQueue.put is reentrant: safe in a handler that interrupts get())

    def run_on() -> None:  # the caller is interrupted while the work runs: it runs on; its outcome to on_interrupt
        if on_interrupt is None:
            return
        outcome: concurrent.futures.Future = concurrent.futures.Future()
        # callbacks run in order: start() has run by the time this does
        loop.call_soon_threadsafe(lambda: [t.add_done_callback(lambda t: _settle_into(t, outcome))
                                           for t in started])
        on_interrupt(outcome)

    # In the main thread with Python's own handler, a Ctrl-C only wakes the wait until the very end:
    # it never lands between handing the work over and taking its result (the result is not dropped)
    held = threading.current_thread() is threading.main_thread() and \
        _signal.getsignal(_SIGINT) is signal.default_int_handler
    if held:
        _signal.signal(_SIGINT, on_sigint)
    try:
        loop.call_soon_threadsafe(start)
        try:
            task = done.get(timeout=None if timeout is None else max(0.0, timeout))
        except queue.Empty:
            # callbacks run in order: start() has run by the time this does; cancel what it started
            loop.call_soon_threadsafe(lambda: [t.cancel() for t in started])
            raise TimeoutError(f"no result within {timeout} s (the coroutine was cancelled)") from None
        except BaseException:  # the waiting thread was interrupted (another handler's Ctrl-C): the work runs on
            run_on()
            raise
        if task is _INTERRUPTED:  # our handler woke the wait: the work runs on
            run_on()
            raise KeyboardInterrupt
        if task.cancelled():  # (by a teardown): an Exception for the caller, as concurrent futures raise
            raise concurrent.futures.CancelledError("the call was cancelled on the UCX loop")
        result = None if interrupted else task.result()
    finally:
        if held:  # (a Ctrl-C still pending runs our handler first, which notes it)
            _signal.signal(_SIGINT, signal.default_int_handler)
    if interrupted:  # Ctrl-C as the work ended: its outcome is kept, the interrupt goes on
        _keep_outcome(task, on_interrupt)
        raise KeyboardInterrupt
    return result


#: what :func:`run`'s wait receives when its SIGINT handler ran
_INTERRUPTED = object()


def can_run_here() -> bool:
    """Can :func:`run_here` run a call in this thread? Only with our adaptive driver (UCX
    progressed by us, not by ucxx's own progress), in the process that started the loop,
    from a thread with no event loop running, and, in the main thread, with Python's own
    Ctrl-C handler (which :func:`run_here` replaces for the call's duration)."""
    if _engine.driver is None or _engine.loop is None or _engine.pid != os.getpid():
        return False
    try:
        asyncio.get_running_loop()
        return False
    except RuntimeError:
        pass
    return threading.current_thread() is not threading.main_thread() or \
        _signal.getsignal(_SIGINT) is signal.default_int_handler


def _caller_loop() -> tuple[asyncio.AbstractEventLoop, "AdaptiveProgress"]:
    """This thread's own event loop and its driver of the worker (made on first use, again
    after the UCX loop was restarted; forgotten when the thread ends)."""
    loop = getattr(_here, "loop", None)
    if loop is not None and _here.epoch == _engine.epoch and not loop.is_closed() and \
            _here.loop_driver.worker is not None:
        return loop, _here.loop_driver
    from .config import resolve  # config imports this module: resolved at call time

    with _lock:
        if _engine.ctx is None or _engine.driver is None:
            raise UCXStoppedError("the UCX loop is not running (engine.acquire() first)")
        loop = asyncio.new_event_loop()
        drv = AdaptiveProgress(_engine.ctx.worker, loop, spin_s=resolve("progress_spin_s", None), peers=_engine.drivers)
        _engine.drivers.append(drv)
        _engine.caller_loops.append(loop)
    _here.loop, _here.loop_driver, _here.epoch = loop, drv, _engine.epoch
    _here.owner = owner = _LoopOwner()  # dropped with the thread's locals when the thread ends
    _here.forget = weakref.finalize(owner, _forget_caller_loop, loop, drv)
    return loop, drv


class _LoopOwner:
    """Lives in one thread's locals: when it goes (the thread ended), so does its loop."""


def _forget_caller_loop(loop, drv) -> None:
    """A thread that ran calls ended: its driver leaves the worker's peers, the buffers of its
    requests still pending are kept for the life of the process, its loop is closed."""
    with _lock:
        if drv in _engine.drivers:
            _engine.drivers.remove(drv)
        if loop in _engine.caller_loops:
            _engine.caller_loops.remove(loop)
        _engine.orphaned.extend(item.keepalive for item in drv.pending if not item.request.completed)
    drv.stop()
    if drv.task is not None:
        drv.task._log_destroy_pending = False  # it never runs again: no warning when it is collected
    if not loop.is_running() and not loop.is_closed():
        loop.close()


def run_here(coro, timeout: float | None = None, on_interrupt=None):
    """:func:`run`, but in the calling thread, on an event loop of its own that progresses
    the same UCX worker: no hand-over to the UCX loop thread and back (two thread wake-ups,
    70-130 us each on a 2-core VM). Check :func:`can_run_here` first.

    The same rules as :func:`run`: on ``timeout`` the coroutine is cancelled and
    ``TimeoutError`` raised. Ctrl-C never lands inside the coroutine: for the call's duration
    the SIGINT handler only stops this loop, between two steps of the work; the work then
    runs on to its end in a helper thread, ``on_interrupt`` gets a
    ``concurrent.futures.Future`` of its outcome, and ``KeyboardInterrupt`` is raised here.
    (UCX endpoints are not tied to a loop: whichever loop runs a call may use one.)"""
    try:
        loop, drv = _caller_loop()
    except BaseException:
        coro.close()
        raise
    stopped: list = []  # why the loop stopped early: "timeout", "interrupt"
    current = [True]  # this call runs the loop: a stop queued for it must not stop a later call

    def stop_this_call() -> None:
        if current[0]:
            loop.stop()

    def on_sigint(signum, frame):  # runs between two bytecodes of this thread: must not raise into the work
        stopped.append("interrupt")
        loop.call_soon_threadsafe(stop_this_call)  # (also wakes the loop if it sleeps)

    main = threading.current_thread() is threading.main_thread()
    previous = _signal.getsignal(_SIGINT) if main else None
    task = timer = None
    handed_over = False
    # Python's own handler is back only at the very end: a Ctrl-C until then only stops the loop,
    # so it never lands between the steps that start, hand over or settle the work
    try:
        if main:
            _signal.signal(_SIGINT, on_sigint)
        if drv.worker is None:  # stopped by UCX's teardown since this thread's last call
            raise UCXStoppedError("UCX was stopped (its last client was closed)")
        task = loop.create_task(coro)
        task.add_done_callback(lambda _: stop_this_call())
        if timeout is not None:
            timer = loop.call_later(max(0.0, timeout), lambda: (stopped.append("timeout"), task.cancel()))
        _here.driver = drv
        try:
            loop.run_forever()
        finally:
            current[0] = False
            _here.driver = None
            if timer is not None:
                timer.cancel()
        if not task.done():  # stopped by Ctrl-C: the work runs on elsewhere
            handed_over = True
            _finish_elsewhere(loop, drv, task, on_interrupt)
            raise KeyboardInterrupt
        if task.cancelled():
            if "timeout" in stopped:
                raise TimeoutError(f"no result within {timeout} s (the coroutine was cancelled)")
            raise concurrent.futures.CancelledError("the call was cancelled")
        if "interrupt" in stopped:  # Ctrl-C as the work ended: its outcome is kept, the interrupt goes on
            _keep_outcome(task, on_interrupt)
            raise KeyboardInterrupt
        result = task.result()
    except BaseException:  # raised before the loop ran, out of the loop itself, or the outcome above
        current[0] = False
        if task is None:
            coro.close()
        elif not task.done() and not handed_over:
            _finish_elsewhere(loop, drv, task, on_interrupt)
        raise
    finally:
        if main:  # (a Ctrl-C still pending runs our handler first, which notes it)
            _signal.signal(_SIGINT, previous if previous is not None else signal.default_int_handler)
    if "interrupt" in stopped:  # Ctrl-C in the call's last steps: its outcome is kept, the interrupt goes on
        _keep_outcome(task, on_interrupt)
        raise KeyboardInterrupt
    return result


def _keep_outcome(task: asyncio.Task, on_interrupt) -> None:
    """Hand a finished ``task``'s outcome to ``on_interrupt`` (the caller was interrupted as it ended)."""
    if on_interrupt is not None:
        outcome: concurrent.futures.Future = concurrent.futures.Future()
        _settle_into(task, outcome)
        on_interrupt(outcome)


def _finish_elsewhere(loop, drv, task, on_interrupt) -> None:
    """An interrupted caller's loop, ``task`` unfinished, goes to a helper thread that runs it
    to the task's end; the caller's next call makes a new loop."""
    _here.loop = None
    _here.forget.detach()  # the helper forgets the loop once the work is done
    outcome: concurrent.futures.Future = concurrent.futures.Future()
    task.add_done_callback(lambda t: _settle_into(t, outcome))
    task.add_done_callback(lambda _: loop.stop())

    def finish() -> None:
        _here.driver = drv
        try:
            while not task.done():  # (a stray stop, e.g. of a second Ctrl-C, only ends one round)
                loop.run_forever()
        except BaseException as exc:  # noqa: BLE001 - the loop itself failed (not the work): said, loop closed
            log.warning("an interrupted call's loop failed (%r); its outcome is lost", exc)
        finally:
            _here.driver = None
            _forget_caller_loop(loop, drv)

    threading.Thread(target=finish, name="ucxx-transport-interrupted-call", daemon=True).start()
    if on_interrupt is not None:
        on_interrupt(outcome)


def _settle_into(task: asyncio.Task, outcome: concurrent.futures.Future) -> None:
    """Copy a finished ``task``'s outcome into ``outcome`` (the future an interrupted caller left)."""
    if task.cancelled():
        outcome.cancel()
    elif task.exception() is not None:
        outcome.set_exception(task.exception())
    else:
        outcome.set_result(task.result())


@dataclass(slots=True)
class _Pending:
    """A UCX request the adaptive driver completes, and the buffers it must keep alive."""

    request: object
    future: asyncio.Future
    keepalive: object
    abandoned_at: float | None = None  # when its awaiting task gave up on it


class AdaptiveProgress:
    """Progress a UCX worker from an asyncio loop: poll while busy, sleep when idle.

    While operations complete it calls ``progress_once`` between other tasks
    (``asyncio.sleep(0)``); after ``spin_s`` without progress it arms the
    worker and sleeps until the worker's epoll fd fires, :meth:`kick` is
    called, or ``idle_wakeup_s`` passes (a safety net, never the latency path).
    """

    def __init__(self, worker, loop, spin_s: float = 0.002, idle_wakeup_s: float = 0.25, slice_s: float = 0.0005,
                 peers: list | None = None):
        self.slice_s = slice_s
        self.worker = worker
        self.event_loop = loop
        self.spin_s = spin_s
        self.idle_wakeup_s = idle_wakeup_s
        worker.init_blocking_progress_mode()  # (once per worker: later calls return at once)
        self._fd = worker.epoll_file_descriptor
        self._wake: asyncio.Future | None = None
        #: every driver of this worker (this one included): progress made here may complete
        #: another's requests, which it then hears of (:meth:`_nudge_peers`) instead of sleeping on
        self._peers = peers if peers is not None else [self]
        self._nudged = False
        self._last_active = time.monotonic()
        self.max_call_s = 0.0  # longest single worker progress call (diagnostics)
        # buffers stay referenced until UCX is done with them, even if the awaiting task was cancelled
        self._pending: list[_Pending] = []
        self.task = loop.create_task(self._run(), name="ucx-progress")

    def __hash__(self):
        return hash(self.event_loop)

    @property
    def pending(self) -> list:
        """Requests not completed yet (with the buffers they keep alive)."""
        return list(self._pending)

    def kick(self) -> None:
        self._last_active = time.monotonic()
        w = self._wake
        if w is not None and not w.done():
            w.set_result(None)

    def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.worker = None

    def _on_fd(self):
        self.kick()

    def _peer_busy(self) -> bool:
        """Is another driver's loop running (a call in progress in a caller's thread, or the UCX loop)?"""
        return any(d is not self and d.event_loop.is_running() for d in self._peers)

    def _nudge_peers(self) -> None:
        """Progress made here may have completed requests of a peer driver sleeping in
        another thread (its worker events were consumed here, so its fd stays quiet):
        wake it, once per sleep."""
        for d in self._peers:
            w = d._wake
            if d is not self and w is not None and d._pending and not d._nudged and not w.done():
                d._nudged = True
                try:
                    d.event_loop.call_soon_threadsafe(d.kick)
                except RuntimeError:  # its loop was closed meanwhile
                    pass

    def wait(self, req, keepalive) -> asyncio.Future:
        """A future completed (or failed) when UCX request ``req`` completes."""
        fut = self.event_loop.create_future()
        if req.completed:
            self._finish(req, fut)
        else:
            self._pending.append(_Pending(req, fut, keepalive))
            self.kick()
        return fut

    @staticmethod
    def _finish(req, fut) -> None:
        if fut.done():
            return
        try:
            req.check_error()
        except BaseException as exc:  # noqa: BLE001 - the request's own failure, handed to its awaiter
            fut.set_exception(exc)
        else:
            fut.set_result(None)

    def _complete(self) -> None:
        """Resolve the futures of completed requests (called after progress)."""
        if not self._pending:
            return
        now = time.monotonic()
        keep = []
        for item in self._pending:
            req, fut = item.request, item.future
            if req.completed:
                self._finish(req, fut)
                continue
            if fut.done():  # abandoned by a cancelled task: keep the buffer alive a while
                if item.abandoned_at is None:
                    item.abandoned_at = now
                elif now - item.abandoned_at > ABANDONED_KEEP_S:
                    # never completed nor cancelled: stop polling it, but never free its buffer
                    # (a late completion into freed memory is a SIGSEGV somewhere else)
                    _engine.orphaned.append(item.keepalive)
                    continue
            keep.append(item)
        self._pending = keep

    async def _run(self):
        loop = self.event_loop
        sleep0 = asyncio.sleep
        while True:
            w = self.worker
            if w is None:
                return
            t_p = time.perf_counter()
            if w.progress_once():
                self.max_call_s = max(self.max_call_s, time.perf_counter() - t_p)
                # keep progressing while there is work, but never hold the loop
                # longer than slice_s: a 64 MiB transfer must not stall other tasks
                t_end = time.monotonic() + self.slice_s
                while w.progress_once() and time.monotonic() < t_end:
                    pass
                if len(self._peers) > 1:
                    self._nudge_peers()
                self._complete()
                self._last_active = time.monotonic()
                await sleep0(0)
                continue
            self._complete()  # completions made by progress calls elsewhere (e.g. connect)
            # nothing of ours in flight while another driver runs a call: leave the worker's
            # events to it (two threads progressing one worker contend for its lock and the
            # GIL) and look again every PEER_BUSY_RECHECK_S, or when an operation is posted here
            deaf = not self._pending and len(self._peers) > 1 and self._peer_busy()
            if not deaf and time.monotonic() - self._last_active < self.spin_s:
                await sleep0(0)
                continue
            if not deaf and not w.arm():  # events pending: keep progressing
                await sleep0(0)
                continue
            self._wake = fut = loop.create_future()
            self._nudged = False
            if len(self._peers) > 1 and any(p.request.completed for p in self._pending):
                self._wake = None  # a peer's progress completed one before this driver slept
                continue
            if not deaf:
                loop.add_reader(self._fd, self._on_fd)
            timer = loop.call_later(PEER_BUSY_RECHECK_S if deaf else self.idle_wakeup_s, self.kick)
            try:
                await fut
            finally:
                timer.cancel()
                if not deaf:
                    loop.remove_reader(self._fd)
                self._wake = None
            self._last_active = time.monotonic()
