"""Where the directory poll is in a LIS register (its cursor), and which rows of a page are news.

The register lists rows by ``(updated_at, id)`` from an inclusive ``updated_since``, paged by ``offset``.
``updated_at`` has one-second resolution, and an edit moves a row to the end of the list. Two rules follow:

- **A row is skipped only if it is unchanged.** The last finished pass keeps each row it read at its
  watermark second with the row's digest. A row read again at that second is news when its digest differs:
  an opt-out ticked in the same second as our own write to that doctor is read by the next poll, not at the
  twice-daily deep resync.
- **A page boundary never skips a row.** Within a pass, each page asks from the last row's second, at the
  number of rows read at that second minus one: the last row read is asked for again. If it is not the first
  row of the answer, an edit or a new row moved that second's rows while the pass paged, so the second is
  read again from its first row (one more request); rows read unchanged in this pass are not news twice.
"""

from __future__ import annotations

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
    last: str | None = None  # ...and the last of them
    reread: dict[str, str] = field(default_factory=dict)  # the group before it was read again from its start

    @classmethod
    def load(cls, cursor: Cursor | None) -> ReadPosition:
        state = dict(cursor or {})
        position = cls(since=int(state.get("since", 0)), seen=_digests(state.get("seen")))
        if "group_at" in state and state.get("last") is not None:  # a pass under way
            position.group_at = int(state["group_at"])
            position.group = _digests(state.get("group"))
            position.last = str(state["last"])
            position.reread = _digests(state.get("reread"))
        return position

    def request(self, overlap_seconds: int) -> tuple[int, int]:
        """``(updated_since, offset)`` of the next page."""
        if self.group_at is None:
            return max(0, self.since - overlap_seconds), 0
        return self.group_at, max(0, len(self.group) - 1)

    def continues(self, first_row: Any) -> bool:
        """Whether the page starts with the last row read (always true at a pass's or a group's start)."""
        if self.group_at is None or not self.group:
            return True
        return isinstance(first_row, dict) and _key(first_row) == self.last and _version(first_row, -1) == self.group_at

    def restart_group(self) -> None:
        self.reread, self.group, self.last = self.group, {}, None

    def take(self, row: Any) -> bool:
        """Note a row of the answer, in order; whether it is news (not already read unchanged)."""
        key, digest = _key(row), row_digest(row)
        version = _version(row, self.group_at if self.group_at is not None else self.since)
        if version != self.group_at:
            self.group_at, self.group, self.reread = version, {}, {}
        known = self.group.get(key) == digest or self.reread.get(key) == digest
        known = known or (version == self.since and self.seen.get(key) == digest)
        self.group[key] = digest
        self.last = key
        return not known

    def dump(self, more: bool) -> Cursor:
        if more and self.group_at is not None:
            return {"since": self.since, "seen": self.seen, "group_at": self.group_at, "group": self.group,
                    "last": self.last, "reread": self.reread}  # fmt: skip
        if self.group_at is None or self.group_at < self.since:
            return {"since": self.since, "seen": self.seen}
        return {"since": self.group_at, "seen": self.group}


def _key(row: Any) -> str:
    return str(row.get("id") if isinstance(row, dict) else None)[:16]


def _version(row: Any, default: int) -> int:
    value = row.get("updated_at") if isinstance(row, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default
