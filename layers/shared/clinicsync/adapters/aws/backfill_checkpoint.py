"""The first import's checkpoint in the table: ``BACKFILL`` / ``<MIS kind>`` (see ``keys.py``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from clinicsync.adapters.aws import keys
from clinicsync.adapters.aws.spill import SpilledJson
from clinicsync.domain.backfill import BackfillState

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table


class DynamoBackfillCheckpoint:
    def __init__(self, table: Table, source: str) -> None:
        self._table = table
        self._key = keys.backfill(source)
        self._cursor = SpilledJson(table, "cursor")  # a large first import's cursor can outgrow the item

    def load(self) -> BackfillState | None:
        item = self._table.get_item(Key=self._key, ConsistentRead=True).get("Item")
        if not item:
            self._cursor.load(self._key, None)  # known to hold no parts
            return None
        return BackfillState(
            window_days=int(item["window_days"]),  # type: ignore[arg-type]
            started_at=int(item["started_at"]),  # type: ignore[arg-type]
            cursor=self._cursor.load(self._key, item),
            pages=int(item.get("pages", 0)),  # type: ignore[arg-type]
            patients=int(item.get("patients", 0)),  # type: ignore[arg-type]
            appointments=int(item.get("appointments", 0)),  # type: ignore[arg-type]
            messages=int(item.get("messages", 0)),  # type: ignore[arg-type]
            done=bool(item.get("done", False)),
            updated_at=int(item.get("updated_at", 0)),  # type: ignore[arg-type]
        )

    def save(self, state: BackfillState) -> None:
        state.updated_at = int(time.time())
        self._cursor.store(
            self._key,
            state.cursor,
            {
                "window_days": state.window_days,
                "started_at": state.started_at,
                "pages": state.pages,
                "patients": state.patients,
                "appointments": state.appointments,
                "messages": state.messages,
                "done": state.done,
                "updated_at": state.updated_at,
            },
        )

    def clear(self) -> None:
        self._cursor.delete(self._key)
