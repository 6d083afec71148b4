"""The pollers' opaque cursors on the table (``Cursors``), and a feed's poll (``PollLeases``).

A poll takes its lease (``LEASE/poll:<source>``, the same item and conditions as ``DynamoLeases``),
reads the cursor, stores a cursor per page and releases the lease: four requests a run. A warm
container saves the read. Its release leaves the lease item behind, free (no owner, ``expires_at`` 0:
an older release still takes it) and naming a random version of the cursor it stored; the container
keeps that cursor in memory. Its next take (a conditional put returning the old item) reuses the
cursor only when the item it replaced is that same release: no poll has run since, and every cursor
write happens under a lease that only a release naming a new version lets go. Anything else (a
crashed holder, another container, an older release deleting or replacing the item, TTL) reads it.
"""

from __future__ import annotations

import json
import secrets
import time
from functools import cached_property
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from clinicsync.adapters.aws import keys
from clinicsync.adapters.aws.coordination import LEASE_FREE
from clinicsync.adapters.aws.spill import SpilledJson
from clinicsync.adapters.aws.table import TableRepository, failed_condition

if TYPE_CHECKING:
    from clinicsync.domain.ports import Cursor

STORED = "stored"  # on a released poll lease: the version of the cursor its holder stored


class _PollMemory:
    """One container's memory of its polls, per source (never persisted)."""

    def __init__(self) -> None:
        self.kept: dict[str, tuple[str, str]] = {}  # cursor stored at this container's last release: version, JSON
        self.vouched: dict[str, str] = {}  # the kept cursor, vouched for by this poll's take
        self.written: dict[str, str | None] = {}  # what this poll stored (None: a write's outcome is unknown)


class DynamoCursors(TableRepository):
    @cached_property
    def _cursors(self) -> SpilledJson:
        # A feed's cursor can outgrow its item (Renovatio's hashes of a large clinic's window): spilled.
        return SpilledJson(self._table, "cursor")

    @cached_property
    def _polls(self) -> _PollMemory:
        return _PollMemory()

    def get_cursor(self, source: str) -> Cursor | None:
        key = keys.cursor(source)
        # Consistent: a spilled cursor's head must name parts that still exist.
        item = self._table.get_item(Key=key, ConsistentRead=True).get("Item")
        return self._cursors.load(key, item)  # type: ignore[no-any-return]

    def put_cursor(self, source: str, cursor: Cursor) -> None:
        self._cursors.store(keys.cursor(source), dict(cursor), {"updated_at": int(time.time())})

    # --- a feed's poll -----------------------------------------------------------------------------

    def take_poll(self, source: str, owner: str, seconds: int, now: int) -> bool:
        memory = self._polls
        kept = memory.kept.pop(source, None)
        memory.vouched.pop(source, None)
        memory.written.pop(source, None)
        try:
            old = self._table.put_item(
                Item={**keys.poll_lease(source), "owner": owner, "expires_at": now + seconds},
                ConditionExpression=LEASE_FREE,
                ExpressionAttributeNames={"#o": "owner"},
                ExpressionAttributeValues={":now": now, ":owner": owner},
                ReturnValues="ALL_OLD",
            ).get("Attributes", {})
        except ClientError as exc:
            if failed_condition(exc):
                return False
            raise
        if kept is not None and "owner" not in old and old.get(STORED) == kept[0]:
            memory.vouched[source] = kept[1]
        return True

    def poll_cursor(self, source: str) -> Cursor | None:
        text = self._polls.vouched.pop(source, None)
        return json.loads(text) if text is not None else self.get_cursor(source)

    def store_poll_cursor(self, source: str, cursor: Cursor) -> None:
        written = self._polls.written
        written[source] = None  # a write that raises may still have landed
        self.put_cursor(source, cursor)
        written[source] = json.dumps(dict(cursor))

    def release_poll(self, source: str, owner: str) -> None:
        text = self._polls.written.pop(source, None)
        key = keys.poll_lease(source)
        names, values = {"#o": "owner"}, {":owner": owner}
        try:
            if text is None:  # nothing stored, or not surely: the next take reads the cursor
                self._table.delete_item(
                    Key=key,
                    ConditionExpression="#o = :owner",
                    ExpressionAttributeNames=names,
                    ExpressionAttributeValues=values,
                )
                return
            version = secrets.token_hex(8)
            self._table.put_item(
                Item={**key, "expires_at": 0, STORED: version},
                ConditionExpression="#o = :owner",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
            )
        except ClientError as exc:
            if not failed_condition(exc):
                raise
            return  # taken over after expiry, or a resent release after a lost answer: nothing kept
        self._polls.kept[source] = (version, text)
