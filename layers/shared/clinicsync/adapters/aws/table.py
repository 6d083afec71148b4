"""DynamoDB mechanics the store's repositories share: batched reads with backoff, paged queries,
transactions in chunks, and telling a failed condition from a real error."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import boto3
from boto3.dynamodb.conditions import Key
from boto3.dynamodb.table import BatchWriter
from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import ClientError

from clinicsync.adapters.aws.clients import PLAIN_CONFIG
from clinicsync.retrying import Transient, call_with_retries, exponential

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient
    from mypy_boto3_dynamodb.service_resource import Table

TRANSACT_LIMIT = 100  # items per TransactWriteItems request


def batch_get(
    table: Table, keys: Sequence[Mapping[str, str]], sleep: Callable[[float], None] = time.sleep
) -> list[dict[str, Any]]:
    """The items of ``keys``, 100 per ``BatchGetItem``. Throttled keys come back unprocessed: they are
    asked again after a backoff (0.05 s doubling), 8 requests per 100 keys at most."""
    return batch_get_wire(wire_client(table), table.name, keys, sleep)


def batch_get_wire(
    client: DynamoDBClient, name: str, keys: Sequence[Mapping[str, str]], sleep: Callable[[float], None]
) -> list[dict[str, Any]]:
    """``batch_get`` on a client without boto3's resource layer: keys go out and items come back in
    DynamoDB's own format, (de)serialised here value by value."""
    items: list[dict[str, Any]] = []
    for start in range(0, len(keys), 100):
        items.extend(_batch_get_chunk(client, name, keys[start : start + 100], sleep))
    return items


def _batch_get_chunk(
    client: DynamoDBClient, name: str, keys: Sequence[Mapping[str, str]], sleep: Callable[[float], None]
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    request: dict[str, Any] = {name: {"Keys": [{k: _to_wire(v) for k, v in key.items()} for key in keys]}}

    def attempt(_: int) -> list[dict[str, Any]]:
        nonlocal request
        response = client.batch_get_item(RequestItems=request)
        items.extend(item_from_wire(item) for item in response.get("Responses", {}).get(name, []))
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


_to_wire = TypeSerializer().serialize
_from_wire = TypeDeserializer().deserialize


def item_from_wire(item: Mapping[str, Any]) -> dict[str, Any]:
    """An item in DynamoDB's own format (a read on the plain client, a cancellation reason's ``Item``)."""
    return {name: _from_wire(value) for name, value in item.items()}


_VALUE_MAPS = ("Item", "Key", "ExpressionAttributeValues")  # a request's parts that hold DynamoDB values


def _wire_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {
        part: {name: _to_wire(v) for name, v in value.items()} if part in _VALUE_MAPS else value
        for part, value in params.items()
    }


_WIRE_LOCK = threading.Lock()
_WIRE_CLIENTS: weakref.WeakKeyDictionary[Any, DynamoDBClient] = weakref.WeakKeyDictionary()


class _WireBatchWriter(BatchWriter):
    """boto3's batch writer (25 a request, unprocessed items sent again, a key written twice kept once)
    on the plain client: each item converted here once."""

    def put_item(self, Item: Mapping[str, Any]) -> None:
        super().put_item({name: _to_wire(v) for name, v in Item.items()})

    def delete_item(self, Key: Mapping[str, Any]) -> None:
        super().delete_item({name: _to_wire(v) for name, v in Key.items()})


def batch_writer(table: Table, overwrite_by_pkeys: Sequence[str] | None = None) -> BatchWriter:
    """``table.batch_writer(...)`` without boto3's resource layer (see ``wire_client``)."""
    return _WireBatchWriter(
        table.name, wire_client(table), overwrite_by_pkeys=list(overwrite_by_pkeys) if overwrite_by_pkeys else None
    )


def wire_client(table: Table) -> DynamoDBClient:
    """A plain client beside the table's resource client (same region, endpoint and config; the default
    credential chain, as every caller of the store uses), one per resource client. The resource's client
    deep-copies each request and walks it against the service model to convert every value; for a
    sync's read of hundreds of keys that was the largest part of its CPU in the SDK."""
    resource_client = table.meta.client
    with _WIRE_LOCK:  # handlers may share a container's table from several threads
        client = _WIRE_CLIENTS.get(resource_client)
        if client is None:
            meta = resource_client.meta
            config = meta.config.merge(PLAIN_CONFIG)
            client = boto3.client(
                "dynamodb", region_name=meta.region_name, endpoint_url=meta.endpoint_url, config=config
            )
            _WIRE_CLIENTS[resource_client] = client
    return client


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

    def _query(self, pk: str, consistent: bool = False, sk_prefix: str = "") -> Iterator[dict[str, Any]]:
        """Every item of one partition (those whose sort key starts with ``sk_prefix``), page after page."""
        condition = Key("pk").eq(pk) & Key("sk").begins_with(sk_prefix) if sk_prefix else Key("pk").eq(pk)
        kwargs: dict[str, Any] = {"KeyConditionExpression": condition}
        if consistent:
            kwargs["ConsistentRead"] = True
        while True:
            page = self._table.query(**kwargs)
            yield from page.get("Items", [])
            if "LastEvaluatedKey" not in page:
                return
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def _transact(self, items: Sequence[Mapping[str, Any]]) -> None:
        """One TransactWriteItems on the plain client: its items, keys and values converted here."""
        wire = [{op: _wire_params(params) for op, params in item.items()} for item in items]
        wire_client(self._table).transact_write_items(TransactItems=wire)  # type: ignore[arg-type]

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
