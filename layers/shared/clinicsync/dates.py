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


def parse_mis_datetime(value: str | int, tz: tzinfo) -> datetime:
    """An aware datetime in ``tz``; raises ValueError naming the shape, never guessing."""
    if isinstance(value, int):
        return datetime.fromtimestamp(value, UTC).astimezone(tz)
    text = " ".join(str(value).split())
    if _UNIX.fullmatch(text):
        return datetime.fromtimestamp(int(text), UTC).astimezone(tz)
    for shape, fmt in _PATTERNS:
        if re.fullmatch(shape, text):
            return datetime.strptime(text, fmt).replace(tzinfo=tz)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"unrecognised MIS date {text[:40]!r}") from None
    return parsed.astimezone(tz) if parsed.tzinfo else parsed.replace(tzinfo=tz)


def parse_mis_date(value: str, tz: tzinfo) -> date:
    return parse_mis_datetime(value, tz).date()
