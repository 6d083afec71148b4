"""A cursor larger than a DynamoDB item (400 KB) is stored whole: compressed, in part items written with
its head in one transaction, the previous parts deleted in the same write; a cursor that fits costs one
request as before. Before this, such a cursor failed to save and the poller stayed on its old one."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mypy_boto3_dynamodb.service_resource import Table

from clinicsync.adapters.aws import keys
from clinicsync.adapters.aws.backfill_checkpoint import DynamoBackfillCheckpoint
from clinicsync.adapters.aws.spill import MAX_PART_COUNT, PART_BYTES, ValueTooLarge
from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.adapters.aws.table import wire_client
from clinicsync.domain.backfill import BackfillState

DYNAMODB_ITEM_LIMIT = 400 * 1024


def renovatio_cursor(visits: int, seed: int = 0) -> dict[str, Any]:
    """Renovatio's cursor mid-pass: a keyed 16-hex-digit hash per visit of its window, half read again
    (``hashes``), half from the last pass (``previous``). Hashes are random: they do not compress."""
    rng = random.Random(seed)
    rows = {str(1_000_000 + n): f"{rng.getrandbits(64):016x}" for n in range(visits)}
    ids = list(rows)
    half = len(ids) // 2
    return {
        "from": "01.10.2026",
        "to": "15.01.2027",
        "next": "12.11.2026",
        "hashes": {i: rows[i] for i in ids[:half]},
        "previous": {i: rows[i] for i in ids[half:]},
    }


def logged(table: Table) -> list[str]:
    """Every DynamoDB request made on ``table``, by operation."""
    log: list[str] = []
    for client in (table.meta.client, wire_client(table)):  # the resource's and the plain one
        client.meta.events.register("before-call.dynamodb", lambda model, **_: log.append(model.name))
    return log


def partition(table: Table, pk: str) -> list[str]:
    page = table.query(KeyConditionExpression="pk = :p", ExpressionAttributeValues={":p": pk})
    return sorted(str(i["sk"]) for i in page["Items"])


def test_a_cursor_larger_than_an_item_is_stored_whole_in_one_transaction(template_tables: Callable[[], Table]) -> None:
    table = template_tables()
    store = DynamoStore(table)
    cursor = renovatio_cursor(40_000)  # a 75-day window of a clinic with ~530 visits a day
    assert len(str(cursor)) > 2 * DYNAMODB_ITEM_LIMIT
    log = logged(table)

    assert store.get_cursor("renovatio") is None  # as the poller does: read, then write
    store.put_cursor("renovatio", cursor)

    assert log == ["GetItem", "TransactWriteItems"]
    assert DynamoStore(table).get_cursor("renovatio") == cursor  # a new container reads it whole
    assert len(partition(table, keys.CURSOR)) > 2  # the head and its parts


def test_a_cursor_that_fits_costs_one_put_and_one_get_as_before(template_tables: Callable[[], Table]) -> None:
    table = template_tables()
    store = DynamoStore(table)
    log = logged(table)

    store.put_cursor("medods", {"appointments": 17})
    reader = DynamoStore(table)
    assert reader.get_cursor("medods") == {"appointments": 17}
    reader.put_cursor("medods", {"appointments": 18})

    assert log == ["PutItem", "GetItem", "PutItem"]
    assert partition(table, keys.CURSOR) == ["medods"]
    assert table.get_item(Key=keys.cursor("medods"))["Item"]["cursor"] == '{"appointments": 18}'  # same format


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.sampled_from([0, 10, 5_000, 30_000, 60_000]), min_size=1, max_size=6),
    fresh=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_every_write_reads_back_whole_and_leaves_no_parts_behind(
    template_tables: Callable[[], Table], sizes: list[int], fresh: list[bool]
) -> None:
    """Any sequence of small and large cursors, each written by the same container or a new one (which
    does not know which parts are on the table): the last one reads back, and the partition holds only
    its head and its own parts."""
    table = template_tables()
    store = DynamoStore(table)
    for n, size in enumerate(sizes):
        if fresh[n]:
            store = DynamoStore(table)
        cursor = renovatio_cursor(size, seed=n)
        store.put_cursor("renovatio", cursor)
        assert DynamoStore(table).get_cursor("renovatio") == cursor
        items = partition(table, keys.CURSOR)
        head = table.get_item(Key=keys.cursor("renovatio"))["Item"]
        generation, count = int(str(head.get("spill_gen", 0))), int(str(head.get("spill_parts", 0)))
        parts = [keys.spilled_part(keys.cursor("renovatio"), generation, i)["sk"] for i in range(count)]
        assert items == sorted(["renovatio", *parts])


def test_a_cursor_beyond_what_a_transaction_holds_is_refused_before_anything_is_written(
    template_tables: Callable[[], Table],
) -> None:
    table = template_tables()
    store = DynamoStore(table)
    store.put_cursor("renovatio", {"next": None})
    rng = random.Random(7)
    noise = rng.randbytes(MAX_PART_COUNT * PART_BYTES).hex()  # random: compresses to half, still too large

    with pytest.raises(ValueTooLarge) as refused:
        store.put_cursor("renovatio", {"noise": noise})

    assert "bytes" in str(refused.value) and noise[:16] not in str(refused.value)
    assert DynamoStore(table).get_cursor("renovatio") == {"next": None}
    assert partition(table, keys.CURSOR) == ["renovatio"]


def test_the_first_imports_checkpoint_keeps_a_large_cursor_and_clears_it_whole(
    template_tables: Callable[[], Table],
) -> None:
    table = template_tables()
    checkpoint = DynamoBackfillCheckpoint(table, "renovatio")
    state = BackfillState(window_days=90, started_at=1_780_000_000, cursor=renovatio_cursor(40_000), pages=3)

    checkpoint.save(state)
    loaded = DynamoBackfillCheckpoint(table, "renovatio").load()
    assert loaded is not None and loaded.cursor == state.cursor and loaded.pages == 3

    DynamoBackfillCheckpoint(table, "renovatio").clear()  # a new container: it learns the parts first
    assert partition(table, "BACKFILL") == []
