"""MIS dates arrive in four shapes; every one is read here, in the clinic's time zone.

- ``dd.mm.yyyy`` with an optional ``HH:MM[:SS]`` (Renovatio, InfoClinica),
- ``yyyymmdd`` with an optional ``HHMM[SS]`` (InfoClinica),
- ISO 8601, with or without an offset (MEDODS dates and times),
- unix seconds (MEDODS ``updatedAt``).

A wall time without an offset is the clinic's local time, never the server's.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, tzinfo

_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\d{2}\.\d{2}\.\d{4} \d{1,2}:\d{2}:\d{2}", "%d.%m.%Y %H:%M:%S"),
    (r"\d{2}\.\d{2}\.\d{4} \d{1,2}:\d{2}", "%d.%m.%Y %H:%M"),
    (r"\d{2}\.\d{2}\.\d{4}", "%d.%m.%Y"),
    (r"\d{14}", "%Y%m%d%H%M%S"),
    (r"\d{12}", "%Y%m%d%H%M"),
    (r"\d{8}", "%Y%m%d"),
)
_UNIX = re.compile(r"\d{9,10}")  # seconds since 1970: 2001-09-09 .. 2286; never 8, 12 or 14 digits


def parse_mis_datetime(
    value: str | int, tz: tzinfo, shape: re.Pattern[str] | None = None, what: str = "a MIS date"
) -> datetime:
    """An aware datetime in ``tz``; raises ValueError naming the shape, never guessing.

    ``shape`` narrows the accepted text to one vendor's formats (``what`` names them in the error).
    """
    if isinstance(value, int):
        return datetime.fromtimestamp(value, UTC).astimezone(tz)
    text = " ".join(str(value).split())
    if shape is not None and not shape.fullmatch(text):
        raise ValueError(f"not {what}: {text[:30]!r}")
    if _UNIX.fullmatch(text):
        return datetime.fromtimestamp(int(text), UTC).astimezone(tz)
    for pattern, fmt in _PATTERNS:
        if re.fullmatch(pattern, text):
            return datetime.strptime(text, fmt).replace(tzinfo=tz)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"unrecognised MIS date {text[:40]!r}") from None
    return parsed.astimezone(tz) if parsed.tzinfo else parsed.replace(tzinfo=tz)


def parse_mis_date(value: str, shape: re.Pattern[str] | None = None, what: str = "a MIS date") -> date:
    """A calendar date (no zone involved: only the wall-clock day is read)."""
    return parse_mis_datetime(value, UTC, shape, what).date()
