"""DynamoDB mechanics the store's repositories share: batched reads with backoff, paged queries,
transactions in chunks, and telling a failed condition from a real error."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from boto3.dynamodb.conditions import Key
from botocore.exceptions import ClientError

from clinicsync.retrying import Transient, call_with_retries, exponential

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

TRANSACT_LIMIT = 100  # items per TransactWriteItems request


def batch_get(
    table: Table, keys: Sequence[Mapping[str, str]], sleep: Callable[[float], None] = time.sleep
) -> list[dict[str, Any]]:
    """The items of ``keys``, 100 per ``BatchGetItem``. Throttled keys come back unprocessed: they are
    asked again after a backoff (0.05 s doubling), 8 requests per 100 keys at most."""
    items: list[dict[str, Any]] = []
    for start in range(0, len(keys), 100):
        items.extend(_batch_get_chunk(table, keys[start : start + 100], sleep))
    return items


def _batch_get_chunk(
    table: Table, keys: Sequence[Mapping[str, str]], sleep: Callable[[float], None]
) -> list[dict[str, Any]]:
    client = table.meta.client
    items: list[dict[str, Any]] = []
    request: dict[str, Any] = {table.name: {"Keys": list(keys)}}

    def attempt(_: int) -> list[dict[str, Any]]:
        nonlocal request
        response = client.batch_get_item(RequestItems=request)
        # The resource's client (de)serialises DynamoDB types itself: items come back plain.
        items.extend(response.get("Responses", {}).get(table.name, []))
        request = dict(response.get("UnprocessedKeys") or {})
        if request:
            raise Transient("unprocessed keys")
        return items

    return call_with_retries(
        attempt,
        attempts=8,
        wait=exponential(0.05),
        sleep=sleep,
        exhausted=lambda _: RuntimeError("DynamoDB kept keys unprocessed"),
        wait_after_last=True,
    )


def failed_condition(exc: ClientError) -> bool:
    """A conditional write refused on purpose (the caller decides); anything else is a real error."""
    return exc.response["Error"]["Code"] == "ConditionalCheckFailedException"


def cancelled(exc: ClientError) -> bool:
    return exc.response["Error"]["Code"] == "TransactionCanceledException"


def set_attributes(key: Mapping[str, str], values: Mapping[str, str]) -> dict[str, Any]:
    """An UpdateItem's arguments that set ``values`` (attribute -> value) on the item ``key``."""
    return {
        "Key": dict(key),
        "UpdateExpression": "SET " + ", ".join(f"#a{i} = :v{i}" for i in range(len(values))),
        "ExpressionAttributeNames": {f"#a{i}": name for i, name in enumerate(values)},
        "ExpressionAttributeValues": {f":v{i}": value for i, value in enumerate(values.values())},
    }


class TableRepository:
    """One seam of the store on the shared table."""

    def __init__(self, table: Table) -> None:
        self._table = table

    def _batch_get(self, keys: Sequence[Mapping[str, str]]) -> list[dict[str, Any]]:
        return batch_get(self._table, keys)

    def _query(self, pk: str, consistent: bool = False) -> Iterator[dict[str, Any]]:
        """Every item of one partition, page after page."""
        kwargs: dict[str, Any] = {"KeyConditionExpression": Key("pk").eq(pk)}
        if consistent:
            kwargs["ConsistentRead"] = True
        while True:
            page = self._table.query(**kwargs)
            yield from page.get("Items", [])
            if "LastEvaluatedKey" not in page:
                return
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def _transact(self, items: Sequence[Mapping[str, Any]]) -> None:
        self._table.meta.client.transact_write_items(TransactItems=list(items))  # type: ignore[arg-type]

    def _update_items(self, updates: Mapping[str, Mapping[str, Any]]) -> None:
        """Unconditional updates (UpdateItem arguments, one per item), up to 100 per transaction: one
        request where each used to cost one. A transaction cancelled by a concurrent update of one of
        its items goes one by one instead; each update is safe to repeat."""
        chunks = list(updates.values())
        for start in range(0, len(chunks), TRANSACT_LIMIT):
            chunk = chunks[start : start + TRANSACT_LIMIT]
            if len(chunk) == 1:
                self._table.update_item(**chunk[0])
                continue
            try:
                self._transact([{"Update": {"TableName": self._table.name, **update}} for update in chunk])
            except ClientError as exc:
                if not cancelled(exc):
                    raise
                for update in chunk:
                    self._table.update_item(**update)
