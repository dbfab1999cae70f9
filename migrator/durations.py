"""Durations as written in playbooks and on the command line: ``0s``, ``90s``, ``30m``, ``48h``, ``7d``, ``1h30m``."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(text: Any) -> timedelta:
    """Parse ``7d``, ``1h30m``, ``250ms`` or a bare number of seconds into a timedelta."""
    if isinstance(text, timedelta):
        return text
    if isinstance(text, bool):
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"duration must not be negative: {text!r}")
        return timedelta(seconds=text)
    if not isinstance(text, str):
        raise ValueError(f"not a duration: {text!r}")
    s = text.strip().lower().replace(" ", "")
    if not s:
        raise ValueError("empty duration")
    pos, total = 0, 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ValueError(f"not a duration: {text!r} (use e.g. 0s, 90s, 30m, 48h, 7d, 1h30m)")
    return timedelta(seconds=total)


def format_duration(td: timedelta | float) -> str:
    """Render a duration compactly for humans: ``2h13m``, ``7d``, ``45s``, ``120ms``."""
    seconds = td.total_seconds() if isinstance(td, timedelta) else float(td)
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 1:
        return f"{sign}{int(round(seconds * 1000))}ms" if seconds else "0s"
    secs = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if secs >= size:
            parts.append(f"{secs // size}{unit}")
            secs %= size
    return sign + "".join(parts[:2])


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(lambda td: format_duration(td), return_type=str),
]
