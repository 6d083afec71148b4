"""Where the directory poll is in a LIS register (its cursor), and which rows of a page are news.

The register lists rows by ``(updated_at, id)`` from an inclusive ``updated_since``, paged by ``offset``, with
the ``total`` of rows from ``updated_since`` on. ``updated_at`` has one-second resolution; an edit gives a row
the LIS's current second, so it leaves its place for the end of the list, and a row edited or added in the
current second joins that second's rows in id order. Two rules follow:

- **A row is skipped only if it is unchanged.** The last finished pass keeps each row it read at its
  watermark second with the row's digest. A row read again at that second is news when its digest differs:
  an opt-out ticked in the same second as our own write to that doctor is read by the next poll, not at the
  twice-daily deep resync.
- **A page boundary never skips a row.** Within a pass, each page asks from the last row's second, at the
  number of rows read at that second minus one: the last row read is asked for again. Rows that left that
  second before it move it up (it is no longer the answer's first row); rows that joined it raise the
  ``total`` above what the last page implied. Either way the second is read again from its first row, and
  rows this pass has read unchanged are not news twice. (The position alone misses a row that joined while
  another left; the total alone misses rows that only left.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from clinicsync.adapters.row_digest import row_digest
from clinicsync.domain.ports import Cursor


def _digests(raw: Any) -> dict[str, str]:
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    # A cursor written before digests were kept lists ids only: each such row is news once more.
    return dict.fromkeys(map(str, raw or ()), "")


@dataclass
class ReadPosition:
    since: int  # the last finished pass's newest second
    seen: dict[str, str]  # the rows it read at ``since``: id -> digest
    group_at: int | None = None  # this pass so far: the second of the last row read...
    group: dict[str, str] = field(default_factory=dict)  # ...the rows read at that second...
    last: str | None = None  # ...the last of them...
    ahead: int | None = None  # ...and how many rows the last answer implied from that second on
    reread: dict[str, str] = field(default_factory=dict)  # that second's rows read before it was read again

    @classmethod
    def load(cls, cursor: Cursor | None) -> ReadPosition:
        state = dict(cursor or {})
        position = cls(since=int(state.get("since", 0)), seen=_digests(state.get("seen")))
        if "group_at" in state and state.get("last") is not None:  # a pass under way
            position.group_at = int(state["group_at"])
            position.group = _digests(state.get("group"))
            position.last = str(state["last"])
            ahead = state.get("ahead")
            position.ahead = int(ahead) if ahead is not None else None
            position.reread = _digests(state.get("reread"))
        return position

    def request(self, overlap_seconds: int) -> tuple[int, int]:
        """``(updated_since, offset)`` of the next page."""
        if self.group_at is None:
            return max(0, self.since - overlap_seconds), 0
        return self.group_at, max(0, len(self.group) - 1)

    def continues(self, rows: Sequence[Any], total: int | None) -> bool:
        """Whether the answer picks up where the last one ended: it starts with the last row read, and no row
        joined the rows from that second on. Always true at a pass's or a second's start."""
        if self.group_at is None or not self.group:
            return True
        first = rows[0] if rows else None
        if not (isinstance(first, dict) and _key(first) == self.last and _version(first, -1) == self.group_at):
            return False
        return total is None or self.ahead is None or total == self.ahead

    def restart_group(self) -> None:
        self.reread, self.group, self.last, self.ahead = {**self.reread, **self.group}, {}, None, None

    def read(self, rows: Sequence[Any], total: int | None, asked: tuple[int, int]) -> list[bool]:
        """Note an answer's rows, in order (``asked`` is its ``(updated_since, offset)``); for each row,
        whether it is news (not already read unchanged)."""
        news, versions = [], []
        for row in rows:
            key, digest = _key(row), row_digest(row)
            version = _version(row, self.group_at if self.group_at is not None else self.since)
            if version != self.group_at:
                self.group_at, self.group, self.reread = version, {}, {}
            known = self.group.get(key) == digest or self.reread.get(key) == digest
            news.append(not (known or (version == self.since and self.seen.get(key) == digest)))
            versions.append(version)
            self.group[key] = digest
            self.last = key
        if isinstance(total, int) and self.group_at is not None:
            # Rows before the offset are at the asked second: they count unless it is older than the last row's.
            asked_since, offset = asked
            before = (offset if asked_since < self.group_at else 0) + sum(v < self.group_at for v in versions)
            self.ahead = total - before
        else:
            self.ahead = None
        return news

    def dump(self, more: bool) -> Cursor:
        if more and self.group_at is not None:
            return {"since": self.since, "seen": self.seen, "group_at": self.group_at, "group": self.group,
                    "last": self.last, "ahead": self.ahead, "reread": self.reread}  # fmt: skip
        if self.group_at is None or self.group_at < self.since:
            return {"since": self.since, "seen": self.seen}
        return {"since": self.group_at, "seen": self.group}


def _key(row: Any) -> str:
    return str(row.get("id") if isinstance(row, dict) else None)[:16]


def whole_number(value: Any) -> int | None:
    """``value`` if the LIS sent a non-negative JSON integer (``true`` is no number here), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _version(row: Any, default: int) -> int:
    value = whole_number(row.get("updated_at") if isinstance(row, dict) else None)
    return default if value is None else value
