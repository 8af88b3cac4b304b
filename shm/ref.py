"""SlotRef: the small, serialisable name of one published payload.

A ref is validated whole when it is built (constructor and :meth:`SlotRef.from_dict`):
a ref that exists is well formed, so no layer below ever meets an out-of-range
slot, a generation that does not fit the wire, a non-string host or a port
above 65535. A bad one raises :class:`InvalidRefError` naming the field.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from .errors import InvalidRefError
from .layout import MAX_HOST_BYTES, MAX_PORTS

#: ring names: what may follow /dev/shm/
RING_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
#: a ring id is 16 random bytes written at create time, shown as 32 hex digits
RING_ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_SLOTS = 65536
#: generations and sizes travel as u64 on the wire; no payload is anywhere near 2**48 bytes
MAX_GENERATION = 2**64 - 1
MAX_REF_NBYTES = 2**48


#: ring names, ids and hosts already validated once, and validated ports tuples (each
#: its own canonical object, which refs share), bounded: the constructor's fast path
_KNOWN_MAX = 4096
_NAMES_OK: set = set()
_IDS_OK: set = set()
_HOSTS_OK: set = set()
_PORTS_OK: dict = {}


def valid_ring_name(name) -> bool:
    return isinstance(name, str) and bool(RING_NAME_RE.match(name)) and name not in (".", "..")


def _int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRefError(f"ref field {name} must be an int, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise InvalidRefError(f"ref field {name}={value} is out of range [{lo}, {hi}]")
    return value


@dataclass(frozen=True)
class SlotRef:
    """Names one published payload: (ring id, slot, generation) plus its size.

    ``ring_id`` is the ring's random identity (unique across hosts and across
    re-creation of a ring under the same name); ``ring`` is its name on its
    host. ``host``/``ports`` say where a server exposes the ring (filled in when
    a server is running for it, else resolved later through the ring). The
    generation makes a ref single-use: once the payload is consumed or dropped,
    the ref is STALE forever, even after the slot is reused.
    """

    ring: str
    slot: int
    generation: int
    nbytes: int
    host: str | None = None
    ports: tuple[int, ...] = field(default=())
    ring_id: str | None = None

    def __post_init__(self):
        # fast path (every field of the usual types and in range; ring, id, host and ports
        # among those validated before: the ports tuple is that very object); anything
        # else is checked field by field below, which names the culprit
        ports, host = self.ports, self.host
        try:
            fast = (type(self.slot) is int and 0 <= self.slot < MAX_SLOTS
                    and type(self.generation) is int and 0 <= self.generation <= MAX_GENERATION
                    and type(self.nbytes) is int and 0 <= self.nbytes <= MAX_REF_NBYTES
                    and type(self.ring) is str and self.ring in _NAMES_OK
                    and (host is None or (type(host) is str and host in _HOSTS_OK))
                    and type(ports) is tuple and (not ports or _PORTS_OK.get(ports) is ports or self._intern_ports())
                    and (self.ring_id is None or (type(self.ring_id) is str and self.ring_id in _IDS_OK)))
        except TypeError:  # an unhashable port: the checks below name it
            fast = False
        if fast:
            return
        self._validate()
        if type(self.ring) is str and len(_NAMES_OK) < _KNOWN_MAX:  # (plain strings only: a subclass
            _NAMES_OK.add(self.ring)                                  # could compare equal to anything)
        if type(self.ring_id) is str and len(_IDS_OK) < _KNOWN_MAX:
            _IDS_OK.add(self.ring_id)
        if type(host) is str and len(_HOSTS_OK) < _KNOWN_MAX:
            _HOSTS_OK.add(host)
        if self.ports:
            self._intern_ports()

    def _intern_ports(self) -> bool:
        """Are the ports a tuple of valid ints? Then the ref holds the canonical tuple of
        those values (an equal one is as good), which the next check finds by identity."""
        ports = self.ports
        if not (len(ports) <= MAX_PORTS and all(type(p) is int and 0 < p < 65536 for p in ports)):
            return False
        if len(_PORTS_OK) < _KNOWN_MAX:
            object.__setattr__(self, "ports", _PORTS_OK.setdefault(ports, ports))
        return True

    def _validate(self):
        if not valid_ring_name(self.ring):
            raise InvalidRefError(f"ref field ring={self.ring!r} is not a ring name "
                                  f"(1-200 characters from [A-Za-z0-9._-])")
        _int("slot", self.slot, 0, MAX_SLOTS - 1)
        _int("generation", self.generation, 0, MAX_GENERATION)
        _int("nbytes", self.nbytes, 0, MAX_REF_NBYTES)
        if self.host is not None:
            if not isinstance(self.host, str) or not self.host or len(self.host.encode("utf-8")) > MAX_HOST_BYTES:
                raise InvalidRefError(f"ref field host={self.host!r} must be a non-empty string of at most "
                                      f"{MAX_HOST_BYTES} bytes, or None")
        ports = self.ports
        if isinstance(ports, (str, bytes)) or not hasattr(ports, "__iter__"):
            raise InvalidRefError(f"ref field ports={ports!r} must be a sequence of ints")
        ports = tuple(ports)
        if len(ports) > MAX_PORTS:
            raise InvalidRefError(f"ref has {len(ports)} ports; at most {MAX_PORTS}")
        for p in ports:
            _int("ports[]", p, 1, 65535)
        object.__setattr__(self, "ports", ports)
        if self.ring_id is not None and not (isinstance(self.ring_id, str) and RING_ID_RE.match(self.ring_id)):
            raise InvalidRefError(f"ref field ring_id={self.ring_id!r} must be 32 lowercase hex digits or None")

    @property
    def key(self) -> tuple[str, int, int]:
        """(ring id, slot, generation): identifies the payload uniquely, across
        hosts and re-creations (the ring name stands in for a ref without an id)."""
        return (self.ring_id or self.ring, self.slot, self.generation)

    def with_address(self, host: str, ports) -> "SlotRef":
        """The same payload, served at ``host``/``ports``."""
        return SlotRef(self.ring, self.slot, self.generation, self.nbytes, host, tuple(ports), self.ring_id)

    def to_dict(self) -> dict:
        """A JSON-able dict (send it over any control plane; :meth:`from_dict` rebuilds the ref)."""
        d = asdict(self)
        d["ports"] = list(self.ports)
        return d

    @classmethod
    def from_dict(cls, d) -> "SlotRef":
        """Build from :meth:`to_dict`'s output; :class:`InvalidRefError` names what is wrong.
        Numbers must be ints (JSON numbers), never strings or floats."""
        if not isinstance(d, dict):
            raise InvalidRefError(f"not a SlotRef dict: {type(d).__name__} {d!r:.200}")
        missing = [k for k in ("ring", "slot", "generation", "nbytes") if k not in d]
        if missing:
            raise InvalidRefError(f"not a SlotRef dict: missing {', '.join(missing)} in {d!r:.200}")
        ports = d.get("ports")
        return cls(d["ring"], d["slot"], d["generation"], d["nbytes"], d.get("host"),
                   () if ports is None else tuple(ports) if type(ports) is list else ports, d.get("ring_id"))
