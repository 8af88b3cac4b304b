"""Directory of running servers: who serves which ring, where, and is it alive.

A server *registers* (ring id, ring name, host, ports, node id) and then
*heartbeats*; an entry whose last heartbeat is older than ``ttl_s`` is not
live any more (its server died, froze, or lost its node). Entries are keyed by
ring id: a server restarted on the same ring re-registers under the same key,
with a new ``incarnation``, so clients see "the same server is back" rather
than "a new one appeared".

Backends:

* :class:`StaticDirectory`: a list given in code (entries without heartbeat
  never expire: you vouch for them) and/or a JSON file shared by the processes
  of one host or a shared filesystem (re-read when it changes; writes are
  locked and atomic). Liveness compares wall clocks: keep hosts in NTP sync.
* ``ucxx_transport.ray_cluster.RayDirectory``: a named detached Ray actor
  (needs ``pip install 'ucxx-transport[ray]'``).

:func:`register_server` keeps a running :class:`~ucxx_transport.server.TransportServer`
registered (a heartbeat thread) until stopped. Clients read :meth:`Directory.live`
(``clients.fanin.FanIn`` does, on failure and every few seconds).
See docs/DEPLOYMENT.md.
"""

from __future__ import annotations

import abc
import fcntl
import json
import logging
import os
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace

log = logging.getLogger("ucxx_transport.directory")

#: an entry is live while its last heartbeat is at most this old (seconds)
DEFAULT_TTL_S = 6.0
#: a file entry whose heartbeat is older than this many TTLs is removed on the next write
PRUNE_TTLS = 20
FILE_VERSION = 1


class DirectoryError(RuntimeError):
    """The directory cannot be read or written (bad file, unreachable backend)."""


@dataclass(frozen=True)
class ServerEntry:
    """One registered server. ``heartbeat``: wall-clock time of its last heartbeat
    (None: a static entry that never expires); ``incarnation``: changes each time
    a server (re)registers the ring."""

    ring_id: str
    ring: str
    host: str
    ports: tuple[int, ...]
    node_id: str | None = None
    heartbeat: float | None = None
    incarnation: str | None = None

    def __post_init__(self):
        if not isinstance(self.ring_id, str) or not self.ring_id:
            raise ValueError(f"ring_id must be a non-empty string, got {self.ring_id!r}")
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be a non-empty string, got {self.host!r}")
        ports = tuple(int(p) for p in self.ports)
        if not ports or any(not 0 < p < 65536 for p in ports):
            raise ValueError(f"ports must be 1..65535, at least one, got {self.ports!r}")
        object.__setattr__(self, "ports", ports)

    @property
    def address(self) -> tuple[str, list[int]]:
        """(host, ports), as ``TransportClient.take`` wants it."""
        return self.host, list(self.ports)

    def live(self, ttl_s: float, now: float | None = None) -> bool:
        if self.heartbeat is None:
            return True
        return (time.time() if now is None else now) - self.heartbeat <= ttl_s

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ports"] = list(self.ports)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ServerEntry":
        try:
            return cls(ring_id=d["ring_id"], ring=d.get("ring", d["ring_id"]), host=d["host"], ports=d["ports"],
                       node_id=d.get("node_id"), heartbeat=d.get("heartbeat"), incarnation=d.get("incarnation"))
        except (KeyError, TypeError, ValueError) as exc:
            raise DirectoryError(f"bad directory entry {d!r:.200}: {exc!r} (needs ring_id, host, ports)") from None


class Directory(abc.ABC):
    """Where servers register and clients look them up. Thread-safe."""

    ttl_s: float = DEFAULT_TTL_S

    @abc.abstractmethod
    def register(self, ring_id: str, ring: str, host: str, ports, node_id: str | None = None) -> ServerEntry:
        """Add or replace the entry of ``ring_id`` (a new incarnation, heartbeat now)."""

    @abc.abstractmethod
    def heartbeat(self, ring_id: str) -> bool:
        """Mark ``ring_id`` alive now. False when it is not registered (register again)."""

    @abc.abstractmethod
    def unregister(self, ring_id: str) -> None:
        """Remove ``ring_id`` (a clean shutdown); unknown ids are ignored."""

    @abc.abstractmethod
    def entries(self) -> list[ServerEntry]:
        """Every entry, expired ones included. Raises :class:`DirectoryError`."""

    def live(self) -> list[ServerEntry]:
        """The entries whose heartbeat is recent enough (sorted by ring id)."""
        now = time.time()
        return sorted((e for e in self.entries() if e.live(self.ttl_s, now)), key=lambda e: e.ring_id)

    def refresh(self) -> list[ServerEntry]:
        """Re-read the backing store now; the live entries."""
        return self.live()

    def watch(self, previous, timeout: float, interval: float = 0.2) -> list[ServerEntry]:
        """Block until the live set differs from ``previous`` (a list of entries, as
        :meth:`live` returned it; heartbeats alone are no change) or ``timeout``
        passes; the live entries then."""
        def sig(entries):
            return {(e.ring_id, e.incarnation, e.host, e.ports) for e in entries}
        before = sig(previous)
        deadline = time.monotonic() + timeout
        while True:
            now_live = self.refresh()
            if sig(now_live) != before or time.monotonic() >= deadline:
                return now_live
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))

    def keep_registered(self, ring_id: str, ring: str, host: str, ports, node_id: str | None = None,
                        interval_s: float | None = None) -> "Registration":
        """Register now and heartbeat every ``interval_s`` (default ttl/3) from a thread."""
        return Registration(self, ring_id, ring, host, ports, node_id, interval_s or self.ttl_s / 3)


class Registration:
    """A heartbeat thread keeping one server registered; :meth:`stop` unregisters.

    A heartbeat the directory does not know (it was pruned, or the directory
    restarted) registers again; a directory that cannot be reached is logged
    (WARNING, once per outage) and retried: meanwhile the entry expires, which
    is what clients should see of a server nobody can vouch for."""

    def __init__(self, directory: Directory, ring_id, ring, host, ports, node_id, interval_s: float):
        self.directory = directory
        self._args = (ring_id, ring, host, list(ports), node_id)
        self.interval_s = interval_s
        self.entry = directory.register(*self._args)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"directory-heartbeat-{ring}", daemon=True)
        self._thread.start()

    def _run(self):
        failing = False
        while not self._stop.wait(self.interval_s):
            try:
                if not self.directory.heartbeat(self._args[0]):
                    self.entry = self.directory.register(*self._args)
                if failing:
                    log.warning("directory reachable again: ring %r registered", self._args[1])
                failing = False
            except Exception as exc:  # noqa: BLE001 - logged, retried; the entry expires meanwhile
                log.log(logging.DEBUG if failing else logging.WARNING,
                        "heartbeat of ring %r failed (%r): retrying every %.1f s; clients will treat the server "
                        "as dead once its entry expires", self._args[1], exc, self.interval_s)
                failing = True

    def stop(self, unregister: bool = True, timeout: float = 5.0) -> None:
        """Stop heartbeating (bounded) and, by default, remove the entry."""
        self._stop.set()
        self._thread.join(timeout)
        if unregister:
            try:
                self.directory.unregister(self._args[0])
            except Exception as exc:  # noqa: BLE001 - the entry will expire instead
                log.warning("could not unregister ring %r (%r): its entry expires in %.0f s",
                            self._args[1], exc, self.directory.ttl_s)


def register_server(directory: Directory, server, node_id: str | None = None,
                    interval_s: float | None = None) -> Registration:
    """Keep a started ``TransportServer`` registered in ``directory`` (its ring id,
    ring name, advertised host and bound ports); ``.stop()`` before stopping the server."""
    host, ports = server.address
    if not ports:
        raise RuntimeError("start the server before registering it (it has no ports yet)")
    return directory.keep_registered(server.ring.ring_id, server.ring.name, host, ports,
                                     node_id or os.uname().nodename, interval_s)


class StaticDirectory(Directory):
    """A fixed list of servers and/or a JSON file of registrations.

    ``entries``: ServerEntry objects or dicts (``ring_id``, ``host``, ``ports``,
    optional ``ring``, ``node_id``); without a ``heartbeat`` they never expire.
    ``path``: a JSON file ``{"version": 1, "servers": [entry, ...]}`` that
    servers register into (``serve --directory-file PATH``) and that is re-read
    whenever it changed; writes take an exclusive ``flock`` on ``PATH.lock``
    and replace the file atomically, so readers never see half a file.
    Without ``path``, register/heartbeat keep entries in this object only
    (one process, e.g. tests).
    """

    def __init__(self, entries=(), *, path: str | os.PathLike | None = None, ttl_s: float = DEFAULT_TTL_S):
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0 seconds")
        self.ttl_s = ttl_s
        self.path = os.fspath(path) if path is not None else None
        self._lock = threading.Lock()
        self._static = {e.ring_id: e for e in (x if isinstance(x, ServerEntry) else ServerEntry.from_dict(x)
                                               for x in entries)}
        self._mem: dict[str, ServerEntry] = {}
        self._cache: tuple[tuple, dict[str, ServerEntry]] | None = None  # (file stamp, entries)

    # ------------------------------------------------------------ file I/O --
    def _stamp(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read_file(self) -> dict[str, ServerEntry]:
        stamp = self._stamp()
        if stamp is None:
            return {}
        if self._cache is not None and self._cache[0] == stamp:
            return self._cache[1]
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError) as exc:
            raise DirectoryError(f"cannot read directory file {self.path!r}: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("servers"), list):
            raise DirectoryError(f"directory file {self.path!r} is not {{\"version\": {FILE_VERSION}, "
                                 f"\"servers\": [...]}}")
        out = {e.ring_id: e for e in map(ServerEntry.from_dict, doc["servers"])}
        self._cache = (stamp, out)
        return out

    def _update(self, fn) -> None:
        """Apply ``fn(entries: dict)`` to the file under its lock, atomically."""
        d = os.path.dirname(os.path.abspath(self.path))
        with open(self.path + ".lock", "a") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            try:
                self._cache = None
                entries = dict(self._read_file())
                fn(entries)
                now = time.time()
                keep = [e.to_dict() for e in entries.values()
                        if e.heartbeat is None or now - e.heartbeat <= PRUNE_TTLS * self.ttl_s]
                fd, tmp = tempfile.mkstemp(prefix=".directory-", dir=d)
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        json.dump({"version": FILE_VERSION, "servers": keep}, f)
                    os.replace(tmp, self.path)
                except BaseException:
                    os.unlink(tmp)
                    raise
            finally:
                fcntl.flock(lockf, fcntl.LOCK_UN)

    # ---------------------------------------------------------- interface --
    def register(self, ring_id, ring, host, ports, node_id=None) -> ServerEntry:
        entry = ServerEntry(ring_id, ring, host, tuple(ports), node_id, time.time(), uuid.uuid4().hex[:12])
        with self._lock:
            if self.path is None:
                self._mem[ring_id] = entry
            else:
                self._update(lambda es: es.__setitem__(ring_id, entry))
        log.info("registered ring %r (%s) at %s:%s", ring, ring_id, host, list(entry.ports))
        return entry

    def heartbeat(self, ring_id) -> bool:
        known = []
        now = time.time()

        def beat(es):
            if ring_id in es:
                es[ring_id] = replace(es[ring_id], heartbeat=now)
                known.append(True)
        with self._lock:
            if self.path is None:
                beat(self._mem)
            else:
                self._update(beat)
        return bool(known)

    def unregister(self, ring_id) -> None:
        with self._lock:
            if self.path is None:
                self._mem.pop(ring_id, None)
            else:
                self._update(lambda es: es.pop(ring_id, None))

    def entries(self) -> list[ServerEntry]:
        with self._lock:
            merged = dict(self._static)
            merged.update(self._mem if self.path is None else self._read_file())
        return list(merged.values())
