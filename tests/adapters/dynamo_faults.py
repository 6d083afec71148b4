"""A TransactWriteItems cancelled as DynamoDB cancels it, for the reasons moto cannot produce.

moto evaluates conditions (a ``ConditionalCheckFailed`` reason is real there), but it has no concurrent
transactions, so never a ``TransactionConflict`` (or a throttled item). ``cancel_next_transaction``
answers the table's next TransactWriteItems itself, before moto sees it: botocore builds the
``TransactionCanceledException`` from the answer, with one reason per item in the request's order, as
the service does; every other request reaches moto.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

from mypy_boto3_dynamodb.service_resource import Table

from clinicsync.adapters.aws.table import wire_client

# (operation, pk, sk) of an item in a transaction -> its cancellation code, or None: not the cause.
ReasonFor = Callable[[str, str, str], str | None]

_hooks = itertools.count()


def item_keys(body: bytes) -> tuple[str, list[tuple[str, str, str]]]:
    """The table a TransactWriteItems request body writes, and (operation, pk, sk) of each item in order."""
    table, keys = "", []
    for entry in json.loads(body)["TransactItems"]:
        ((operation, params),) = entry.items()
        key = params["Item"] if operation == "Put" else params["Key"]
        table = params["TableName"]
        keys.append((operation, key["pk"]["S"], key["sk"]["S"]))
    return table, keys


@contextmanager
def cancel_next_transaction(table: Table, reason_for: ReasonFor) -> Iterator[list[list[tuple[str, str, str]]]]:
    """Cancels the table's next TransactWriteItems that ``reason_for`` names a cause in, with its code
    for each item; yields every TransactWriteItems of the table sent meanwhile (its items' keys)."""
    sent: list[list[tuple[str, str, str]]] = []
    cancelled_one = False
    client = wire_client(table)  # one per resource client: the tables of one moto share it
    hook_id = f"cancel-next-transaction-{next(_hooks)}"

    def answer(params: dict[str, Any], **_: Any) -> tuple[SimpleNamespace, dict[str, Any]] | None:
        nonlocal cancelled_one
        name, keys = item_keys(params["body"])
        if name != table.name:
            return None
        sent.append(keys)
        codes = [reason_for(*key) for key in keys]
        if cancelled_one or not any(codes):
            return None  # to moto: cancelled once already, or nothing here to cancel it for
        cancelled_one = True
        cancelled = {
            "Error": {"Code": "TransactionCanceledException", "Message": f"Transaction cancelled {codes}"},
            "CancellationReasons": [{"Code": code or "None"} for code in codes],
            "ResponseMetadata": {"HTTPStatusCode": 400},
        }
        return SimpleNamespace(status_code=400), cancelled

    client.meta.events.register("before-call.dynamodb.TransactWriteItems", answer, unique_id=hook_id)
    try:
        yield sent
    finally:
        client.meta.events.unregister("before-call.dynamodb.TransactWriteItems", unique_id=hook_id)
