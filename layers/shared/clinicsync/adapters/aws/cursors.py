"""The pollers' opaque cursors on the table (``Cursors``)."""

from __future__ import annotations

import time
from functools import cached_property
from typing import TYPE_CHECKING

from clinicsync.adapters.aws import keys
from clinicsync.adapters.aws.spill import SpilledJson
from clinicsync.adapters.aws.table import TableRepository

if TYPE_CHECKING:
    from clinicsync.domain.ports import Cursor


class DynamoCursors(TableRepository):
    @cached_property
    def _cursors(self) -> SpilledJson:
        # A feed's cursor can outgrow its item (Renovatio's hashes of a large clinic's window): spilled.
        return SpilledJson(self._table, "cursor")

    def get_cursor(self, source: str) -> Cursor | None:
        key = keys.cursor(source)
        # Consistent: a spilled cursor's head must name parts that still exist.
        item = self._table.get_item(Key=key, ConsistentRead=True).get("Item")
        return self._cursors.load(key, item)  # type: ignore[no-any-return]

    def put_cursor(self, source: str, cursor: Cursor) -> None:
        self._cursors.store(keys.cursor(source), dict(cursor), {"updated_at": int(time.time())})
