"""The sandbox's moto (sandbox.runtime.tune_moto): a cancelled DynamoDB transaction is rolled back item by
item and leaves the table exactly as it was, a transaction copies the items it writes, not the table, and a
query on the table's key sorts its partition, not the table (both made a 50k-appointment scale point
quadratic)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moto.dynamodb.models.dynamo_type import DynamoType, Item

from sandbox.runtime import LocalAws

TABLE = "t"
KEYS = [f"k{i}" for i in range(8)]


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: type, method: str) -> list[int]:
    """Patch ``owner.method`` to count its calls; the one-element list holds the count."""
    calls = [0]
    real = getattr(owner, method)

    def counting(self: Any, *args: Any) -> Any:
        calls[0] += 1
        return real(self, *args)

    monkeypatch.setattr(owner, method, counting)
    return calls


@pytest.fixture(scope="module")
def dynamodb() -> Iterator[Any]:
    saved = dict(os.environ)
    aws = LocalAws().start()
    try:
        client = aws.client("dynamodb")
        client.create_table(
            TableName=TABLE,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
            AttributeDefinitions=[
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )
        yield client
    finally:
        aws.stop()
        os.environ.clear()
        os.environ.update(saved)


def _key(k: str) -> dict[str, Any]:
    return {"pk": {"S": "P"}, "sk": {"S": k}}


def _table(client: Any) -> list[dict[str, Any]]:
    return sorted(client.scan(TableName=TABLE)["Items"], key=lambda i: i["sk"]["S"])


def _op(kind: str, k: str, n: int) -> dict[str, Any]:
    if kind == "put":
        return {"Put": {"TableName": TABLE, "Item": {**_key(k), "n": {"N": str(n)}}}}
    if kind == "delete":
        return {"Delete": {"TableName": TABLE, "Key": _key(k)}}
    return {
        "Update": {
            "TableName": TABLE,
            "Key": _key(k),
            "UpdateExpression": "SET n = :n, m = :n",
            "ExpressionAttributeValues": {":n": {"N": str(n)}},
        }
    }


@settings(max_examples=40, deadline=None)
@given(
    before=st.dictionaries(st.sampled_from(KEYS), st.integers(0, 9), max_size=6),
    ops=st.lists(st.tuples(st.sampled_from(("put", "update", "delete")), st.sampled_from(KEYS)), max_size=5),
    fail_at=st.integers(0, 5),
)
def test_a_cancelled_transaction_leaves_the_table_as_it_was(
    dynamodb: Any, before: dict[str, int], ops: list[tuple[str, str]], fail_at: int
) -> None:
    for item in dynamodb.scan(TableName=TABLE)["Items"]:
        dynamodb.delete_item(TableName=TABLE, Key={"pk": item["pk"], "sk": item["sk"]})
    for k, n in before.items():
        dynamodb.put_item(TableName=TABLE, Item={**_key(k), "n": {"N": str(n)}})
    state = _table(dynamodb)
    # One write per key: DynamoDB refuses a transaction that names an item twice.
    items = [_op(kind, k, 100 + i) for i, (k, kind) in enumerate({k: kind for kind, k in ops}.items())]
    failing = {
        "ConditionCheck": {"TableName": TABLE, "Key": _key("never"), "ConditionExpression": "attribute_exists(pk)"}
    }
    items.insert(min(fail_at, len(items)), failing)
    with pytest.raises(dynamodb.exceptions.TransactionCanceledException):
        dynamodb.transact_write_items(TransactItems=items)
    assert _table(dynamodb) == state


def test_a_transaction_copies_the_items_it_writes_not_the_table(dynamodb: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for n in range(200):
        dynamodb.put_item(TableName=TABLE, Item={**_key(f"row{n:03d}"), "n": {"N": str(n)}})
    copies = count_calls(monkeypatch, Item, "__deepcopy__")
    dynamodb.transact_write_items(TransactItems=[_op("update", "row001", 1), _op("update", "row002", 2)])
    assert copies[0] <= 2 * 2  # per updated item: its rollback copy, and the copy moto's update_item makes itself


@settings(max_examples=30, deadline=None)
@given(
    rows=st.sets(st.tuples(st.sampled_from("ABC"), st.sampled_from(KEYS)), max_size=20),
    partition=st.sampled_from("ABCD"),
    forward=st.booleans(),
    limit=st.integers(1, 5),
    prefix=st.sampled_from(("", "k", "k1")),
)
def test_a_query_on_the_table_key_answers_the_partition_in_key_order(
    dynamodb: Any, rows: set[tuple[str, str]], partition: str, forward: bool, limit: int, prefix: str
) -> None:
    for item in dynamodb.scan(TableName=TABLE)["Items"]:
        dynamodb.delete_item(TableName=TABLE, Key={"pk": item["pk"], "sk": item["sk"]})
    for pk, sk in rows:
        dynamodb.put_item(TableName=TABLE, Item={"pk": {"S": pk}, "sk": {"S": sk}, "v": {"S": pk + sk}})
    wanted = sorted((sk for pk, sk in rows if pk == partition and sk.startswith(prefix)), reverse=not forward)
    condition = "pk = :p" + (" AND begins_with(sk, :s)" if prefix else "")
    values = {":p": {"S": partition}} | ({":s": {"S": prefix}} if prefix else {})
    got: list[str] = []
    start: dict[str, Any] = {}
    while True:
        page = dynamodb.query(
            TableName=TABLE,
            KeyConditionExpression=condition,
            ExpressionAttributeValues=values,
            ScanIndexForward=forward,
            Limit=limit,
            **start,
        )
        got += [item["sk"]["S"] for item in page["Items"]]
        if "LastEvaluatedKey" not in page:
            break
        start = {"ExclusiveStartKey": page["LastEvaluatedKey"]}
    assert got == wanted


def test_a_query_on_the_table_key_sorts_its_partition_not_the_table(
    dynamodb: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(200):
        dynamodb.put_item(TableName=TABLE, Item={"pk": {"S": f"other{n}"}, "sk": {"S": "x"}})
    for sk in ("a", "b"):
        dynamodb.put_item(TableName=TABLE, Item={"pk": {"S": "mine"}, "sk": {"S": sk}})
    compared = count_calls(monkeypatch, DynamoType, "__lt__")
    page = dynamodb.query(
        TableName=TABLE, KeyConditionExpression="pk = :p", ExpressionAttributeValues={":p": {"S": "mine"}}
    )
    assert [item["sk"]["S"] for item in page["Items"]] == ["a", "b"]
    assert compared[0] < 20  # a table-wide sort of 202 items compares over a thousand times
