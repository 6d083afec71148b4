"""A first full import that survives interruptions: the resync read, checkpointed page by page.

Item (single table, see docs/storage.md)::

    pk="BACKFILL"  sk=<MIS kind>   cursor (the next page to read), window_days, started_at, updated_at,
                                   pages, patients, appointments, messages, done

Each page is enqueued before its cursor is stored (as the poll does), so an import stopped at any point
resumes at the first page not yet on the queue; a page read twice costs nothing (unchanged records are
skipped by content hash in the syncer).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from clinicsync.domain.ports import Cursor

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

BACKFILL_PK = "BACKFILL"


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


class BackfillCheckpoint:
    def __init__(self, table: Table, source: str) -> None:
        self._table = table
        self._source = source

    def load(self) -> BackfillState | None:
        item = self._table.get_item(Key={"pk": BACKFILL_PK, "sk": self._source}).get("Item")
        if not item:
            return None
        return BackfillState(
            window_days=int(item["window_days"]),  # type: ignore[arg-type]
            started_at=int(item["started_at"]),  # type: ignore[arg-type]
            cursor=json.loads(str(item["cursor"])) if item.get("cursor") else None,
            pages=int(item.get("pages", 0)),  # type: ignore[arg-type]
            patients=int(item.get("patients", 0)),  # type: ignore[arg-type]
            appointments=int(item.get("appointments", 0)),  # type: ignore[arg-type]
            messages=int(item.get("messages", 0)),  # type: ignore[arg-type]
            done=bool(item.get("done", False)),
            updated_at=int(item.get("updated_at", 0)),  # type: ignore[arg-type]
        )

    def save(self, state: BackfillState) -> None:
        state.updated_at = int(time.time())
        self._table.put_item(
            Item={
                "pk": BACKFILL_PK,
                "sk": self._source,
                "window_days": state.window_days,
                "started_at": state.started_at,
                "cursor": json.dumps(state.cursor) if state.cursor is not None else "",
                "pages": state.pages,
                "patients": state.patients,
                "appointments": state.appointments,
                "messages": state.messages,
                "done": state.done,
                "updated_at": state.updated_at,
            }
        )

    def clear(self) -> None:
        self._table.delete_item(Key={"pk": BACKFILL_PK, "sk": self._source})


def as_cursor(value: dict[str, Any] | None) -> Cursor | None:
    return value
