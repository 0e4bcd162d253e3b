"""Text formatting for people: aligned tables, human sizes and durations, size parsing."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TextIO

from pycontainerd.errdefs import InvalidArgument

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["ago", "duration", "human_size", "parse_size", "print_table", "truncate"]

_UNITS = ("B", "kB", "MB", "GB", "TB")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)$", re.IGNORECASE)


def print_table(out: TextIO, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell, three spaces apart, as docker prints them."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    for row in (headers, *rows):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        out.write("   ".join(cells).rstrip() + "\n")


def human_size(n: float) -> str:
    """Decimal units like docker (``5.6MB``)."""
    for unit in _UNITS:
        if abs(n) < 1000 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{int(n)}B"
            return f"{n:.3g}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """``512m``, ``1g``, ``1.5GiB``, ``100000`` → bytes (binary multiples, as docker)."""
    m = _SIZE.match(text.strip())
    if m is None:
        raise InvalidArgument(f"invalid size {text!r}: want a number with an optional k/m/g/t")
    factor = 1024 ** " kmgt".index((m.group(2) or " ").lower())
    return int(float(m.group(1)) * factor)


def duration(seconds: float) -> str:
    """``5 seconds``, ``About a minute``, ``3 hours``, ``2 days`` (docker's wording)."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(s / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    days = s // 86400
    if days < 14:
        return f"{days} days"
    if days < 60:
        return f"{days // 7} weeks"
    if days < 730:
        return f"{days // 30} months"
    return f"{days // 365} years"


def ago(when: datetime | None, now: datetime | None = None) -> str:
    if when is None or when.timestamp() <= 0:
        return "N/A"
    now = now or datetime.now(UTC)
    return duration((now - when).total_seconds()) + " ago"


def truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
