"""A JSON value kept on its item while it fits, spilled into part items when it does not.

A DynamoDB item holds at most 400 KB. The pollers' cursors and the first import's checkpoint carry
what a feed has already sent (MEDODS: a marker per row in its overlap; Renovatio: a keyed hash per
visit in its date window), so a large clinic, or a bulk edit in the MIS, can outgrow one item; the
write then fails and the poller is stuck on its last cursor for good.

Here a value that fits (``INLINE_BYTES`` of JSON) stays in its attribute as before, one ``PutItem``.
A larger one is compressed (zlib) and cut into parts of ``PART_BYTES``, each its own item
(``keys.spilled_part``), written with the head item in **one transaction**: a reader sees the old value
or the new, never a mix. Parts are tagged with a generation that the head names; the previous
generation's parts are deleted in the same transaction, so nothing is left behind. The transaction's own
limits (100 items, 4 MB) cap a value at ``MAX_PART_COUNT`` parts; beyond that the write is refused
before anything is sent (:class:`ValueTooLarge`).

Each value has one writer at a time (the poller's lease, the backfill's lease), so the generation the
repository last saw for a key is the one on the table; when it has seen none, it reads the head first.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from clinicsync.adapters.aws import keys
from clinicsync.adapters.aws.table import TableRepository, failed_condition

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

INLINE_BYTES = 300_000  # JSON up to this stays on the item (the rest of the item is small)
PART_BYTES = 350_000  # compressed bytes per part item (under 400 KB with its key)
MAX_PART_COUNT = 10  # parts + head + the old parts' deletes stay under a transaction's 4 MB and 100 items
PARTS = "spill_parts"  # head attributes naming the parts
GENERATION = "spill_gen"
DIGEST = "spill_digest"


class ValueTooLarge(Exception):
    """The value would not fit even spilled; nothing was written. Holds sizes only."""


class SpilledJsonError(Exception):
    """The head names parts that are not all there, or whose digest differs (never expected)."""


class SpilledJson(TableRepository):
    """Stores one JSON attribute per item, spilling it into part items when it is too large."""

    def __init__(self, table: Table, attribute: str) -> None:
        super().__init__(table)
        self._attribute = attribute
        self._generations: dict[tuple[str, str], tuple[int, int]] = {}  # key -> (generation, part count)

    def load(self, key: keys.Key, item: Mapping[str, Any] | None) -> Any:
        """The value of ``item`` (the head, read consistently by the caller), or None when there is no
        item or it holds no value."""
        item = item or {}
        generation, count = int(item.get(GENERATION, 0)), int(item.get(PARTS, 0))
        self._generations[_ident(key)] = (generation, count)
        if not count:
            text = item.get(self._attribute)
            return json.loads(str(text)) if text else None
        return json.loads(zlib.decompress(self._read_parts(key, generation, count, str(item[DIGEST]))))

    def store(self, key: keys.Key, value: Any, attributes: Mapping[str, Any]) -> None:
        """Write the head (``attributes`` plus the value) and the value's parts, as one write."""
        text = json.dumps(value) if value is not None else ""
        head: dict[str, Any] = {**key, **attributes}
        if len(text.encode()) <= INLINE_BYTES:
            head[self._attribute] = text
            known = self._generations.get(_ident(key))
            if (known is None or known[1] == 0) and self._put_unless_spilled(head, known is not None):
                self._generations[_ident(key)] = (known[0] if known else 0, 0)
                return  # the common case: one request, as before
            old_generation, old_count = self._known(key)
            generation, puts = old_generation, []
        else:
            blob = zlib.compress(text.encode(), 6)
            count = -(-len(blob) // PART_BYTES)
            if count > MAX_PART_COUNT:
                raise ValueTooLarge(
                    f"{key['pk']}/{key['sk']}: {len(text.encode())} bytes of JSON, {len(blob)} compressed, "
                    f"over {MAX_PART_COUNT} parts of {PART_BYTES}"
                )
            old_generation, old_count = self._known(key)
            generation = old_generation + 1
            head.update({PARTS: count, GENERATION: generation, DIGEST: _digest(blob)})
            puts = [
                {**keys.spilled_part(key, generation, n), "blob": blob[n * PART_BYTES : (n + 1) * PART_BYTES]}
                for n in range(count)
            ]
        stale = [keys.spilled_part(key, old_generation, n) for n in range(old_count)]
        name = self._table.name
        self._transact(
            [{"Put": {"TableName": name, "Item": item}} for item in [*puts, head]]
            + [{"Delete": {"TableName": name, "Key": part}} for part in stale]
        )
        self._generations[_ident(key)] = (generation, len(puts))

    def _put_unless_spilled(self, head: Mapping[str, Any], known_whole: bool) -> bool:
        """Put ``head`` unless the item on the table names parts (which must then go in the same write)."""
        if known_whole:  # read or written here without parts
            self._table.put_item(Item=head)
            return True
        try:
            self._table.put_item(
                Item=head, ConditionExpression="attribute_not_exists(#p)", ExpressionAttributeNames={"#p": PARTS}
            )
        except ClientError as exc:
            if not failed_condition(exc):
                raise
            return False
        return True

    def delete(self, key: keys.Key) -> None:
        """The head and its parts."""
        old_generation, old_count = self._known(key)
        parts = [keys.spilled_part(key, old_generation, n) for n in range(old_count)]
        if parts:
            name = self._table.name
            self._transact([{"Delete": {"TableName": name, "Key": k}} for k in [key, *parts]])
        else:
            self._table.delete_item(Key=key)
        self._generations[_ident(key)] = (old_generation, 0)

    def _known(self, key: keys.Key) -> tuple[int, int]:
        known = self._generations.get(_ident(key))
        if known is None:  # never read here: ask the table which parts it holds
            item = self._table.get_item(
                Key=key,
                ConsistentRead=True,
                ProjectionExpression="#g, #p",
                ExpressionAttributeNames={"#g": GENERATION, "#p": PARTS},
            ).get("Item", {})
            known = (int(item.get(GENERATION, 0)), int(item.get(PARTS, 0)))  # type: ignore[arg-type]
        return known

    def _read_parts(self, key: keys.Key, generation: int, count: int, digest: str) -> bytes:
        parts = self._query(key["pk"], consistent=True, sk_prefix=keys.spilled_prefix(key, generation))
        found = {str(i["sk"]): bytes(i["blob"]) for i in parts}
        wanted = [keys.spilled_part(key, generation, n)["sk"] for n in range(count)]
        if any(sk not in found for sk in wanted):
            raise SpilledJsonError(f"{key['pk']}/{key['sk']}: generation {generation} is missing parts")
        blob = b"".join(found[sk] for sk in wanted)
        if _digest(blob) != digest:
            raise SpilledJsonError(f"{key['pk']}/{key['sk']}: generation {generation} does not match its digest")
        return blob


def _ident(key: Mapping[str, Any]) -> tuple[str, str]:
    return str(key["pk"]), str(key["sk"])


def _digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()[:32]
