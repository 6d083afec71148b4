"""The pollers' opaque cursors on the table (``Cursors``)."""

from __future__ import annotations

import json
import time

from clinicsync.adapters.aws import keys
from clinicsync.adapters.aws.table import TableRepository
from clinicsync.domain.ports import Cursor


class DynamoCursors(TableRepository):
    def get_cursor(self, source: str) -> Cursor | None:
        item = self._table.get_item(Key=keys.cursor(source)).get("Item")
        return json.loads(str(item["cursor"])) if item else None

    def put_cursor(self, source: str, cursor: Cursor) -> None:
        self._table.put_item(
            Item={**keys.cursor(source), "cursor": json.dumps(dict(cursor)), "updated_at": int(time.time())}
        )
