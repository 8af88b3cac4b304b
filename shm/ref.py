"""SlotRef: the small, serialisable name of one published payload."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class SlotRef:
    """Names one published payload: (ring, slot, generation) plus its size.

    ``host``/``ports`` say where a server exposes the ring (filled in when a
    server is running for it). The generation makes a ref single-use: once the
    payload is consumed or dropped, the ref is STALE forever, even after the
    slot is reused.
    """

    ring: str
    slot: int
    generation: int
    nbytes: int
    host: str | None = None
    ports: tuple[int, ...] = field(default=())

    def __post_init__(self):
        if not isinstance(self.ports, tuple):
            object.__setattr__(self, "ports", tuple(int(p) for p in self.ports))

    @property
    def key(self) -> tuple[str, int, int]:
        """(ring, slot, generation): identifies the payload uniquely."""
        return (self.ring, self.slot, self.generation)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ports"] = list(self.ports)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SlotRef":
        try:
            return cls(
                ring=str(d["ring"]),
                slot=int(d["slot"]),
                generation=int(d["generation"]),
                nbytes=int(d["nbytes"]),
                host=d.get("host"),
                ports=tuple(int(p) for p in d.get("ports") or ()),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a SlotRef dict ({exc!r}): {d!r}") from None
