"""Parsing and formatting of sizes ("64MiB") and durations ("10s")."""

from __future__ import annotations

import re

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
#: bare letters are refused: "m" would be 10^6 bytes here but minutes in a duration,
#: and people who write "64m" usually mean MiB
_AMBIGUOUS = {"k": "KB (10^3) or KiB (2^10)", "m": "MB (10^6) or MiB (2^20)", "g": "GB (10^9) or GiB (2^30)",
              "t": "TB (10^12) or TiB (2^40)"}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DUR_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "min": 60.0, "h": 3600.0}


def parse_size(text: str | int, *, what: str = "size") -> int:
    """``"64MiB"`` -> 67108864. Units (any case): B, KB/MB/GB/TB (10^3), KiB/MiB/GiB/TiB
    (2^10). A bare ``k``/``m``/``g``/``t`` is refused as ambiguous."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if unit in _AMBIGUOUS:
        raise ValueError(f"{what}: {text!r} is ambiguous; write {_AMBIGUOUS[unit]}")
    if not m or unit not in _SIZE_UNITS:
        raise ValueError(f"{what}: cannot parse {text!r}; use a number with an optional unit, e.g. 4096, 64KiB, 16MiB, 1GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def parse_duration(text: str | float, *, what: str = "duration") -> float:
    """``"10s"`` -> 10.0; ``"250ms"`` -> 0.25; ``"2min"`` -> 120.0; a bare number is
    seconds. ``m`` is refused (minutes or milliseconds?)."""
    if isinstance(text, (int, float)):
        return float(text)
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if unit == "m":
        raise ValueError(f"{what}: {text!r} is ambiguous; write min (minutes) or ms (milliseconds)")
    if not m or unit not in _DUR_UNITS:
        raise ValueError(f"{what}: cannot parse {text!r}; use e.g. 10s, 250ms, 2min")
    return float(m.group(1)) * _DUR_UNITS[unit]


def format_size(n: int) -> str:
    for unit, k in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= k and n % k == 0:
            return f"{n // k}{unit}"
    return f"{n}B"
