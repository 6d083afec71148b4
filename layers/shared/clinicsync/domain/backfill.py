"""A first full import's progress, checkpointed page by page, and the port that keeps it.

Each page is enqueued before its checkpoint is saved (as the poll does with its cursor), so an import
stopped at any point resumes at the first page not yet on the queue; a page read twice costs nothing
(unchanged records are skipped by content hash in the syncer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


@dataclass
class BackfillState:
    window_days: int
    started_at: int
    cursor: dict[str, Any] | None = None
    pages: int = 0
    patients: int = 0
    appointments: int = 0
    messages: int = 0
    done: bool = False
    updated_at: int = 0
    resumed: bool = field(default=False, compare=False)
    step_patients: int = field(default=0, compare=False)  # enqueued by this invocation

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("cursor")
        return data


class BackfillCheckpoint(Protocol):
    """One MIS feed's import checkpoint (the adapter is bound to the feed)."""

    def load(self) -> BackfillState | None: ...

    def save(self, state: BackfillState) -> None: ...

    def clear(self) -> None: ...
