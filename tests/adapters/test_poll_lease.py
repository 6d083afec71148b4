"""A feed's poll on the table: its lease and its cursor (``adapters/aws/cursors.py``).

A warm container reuses the cursor it stored at its own last release, and reads it otherwise: three
requests a steady poll instead of four. The cursor stays on its own item, where every other reader
(the CLI, the resync, an older release) finds it; the lease item and its conditions are the ones an
older release takes and releases too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from botocore.exceptions import ClientError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mypy_boto3_dynamodb.service_resource import Table

from clinicsync.adapters.aws import keys
from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.adapters.aws.table import wire_client
from clinicsync.application.poll import Poller
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.models import PatientChanges, SyncMessage
from clinicsync.domain.ports import ChangePage, Cursor
from tests.helpers import demo_config, patient

SOURCE = "feed"
HOUR = 3600


def logged(table: Table) -> list[str]:
    """Every DynamoDB request made on ``table``, by operation."""
    log: list[str] = []
    for client in (table.meta.client, wire_client(table)):
        client.meta.events.register("before-call.dynamodb", lambda model, **_: log.append(model.name))
    return log


class CountingFeed:
    """A MIS feed whose cursor counts the pages read; each page names one patient."""

    kind = SOURCE

    def __init__(self) -> None:
        self.read_from: list[Cursor | None] = []

    def fetch_changes(self, cursor: Cursor | None) -> ChangePage:
        self.read_from.append(cursor)
        n = int((cursor or {}).get("page", 0))
        changes = [PatientChanges(patient=patient(f"p{n}", phone=None, email=None), appointments=())]
        return ChangePage(changes=changes, cursor={"page": n + 1}, more=False)

    def acknowledge(self, page: ChangePage) -> None:
        pass

    def resync_cursor(self, window_seconds: int, now: float) -> Cursor:
        return {}


class ListQueue:
    def __init__(self) -> None:
        self.sent: list[SyncMessage] = []

    def send(self, messages: Any) -> None:
        self.sent.extend(messages)


def _poller(store: DynamoStore, feed: CountingFeed, now: Callable[[], float] = lambda: 1_700_000_000.0) -> Poller:
    return Poller(demo_config(), feed, store, ListQueue(), KeyedHasher(b"k" * 32), clock=now)  # type: ignore[arg-type]


def test_a_warm_poller_stores_its_cursor_and_reuses_it_without_reading(template_tables: Callable[[], Table]) -> None:
    table = template_tables()
    feed = CountingFeed()
    poller = _poller(DynamoStore(table), feed)
    log = logged(table)
    poller.poll(lambda: 300_000, owner="run-1")
    first = list(log)
    log.clear()
    poller.poll(lambda: 300_000, owner="run-2")
    second = [op for op in log if op != "TransactWriteItems"]  # the page's phone index (none here) aside
    assert "GetItem" in first  # a new container reads the cursor
    # take (returning the item it replaced), the page's cursor, the release naming the cursor's version
    assert second == ["PutItem", "PutItem", "PutItem"]
    assert feed.read_from == [None, {"page": 1}]
    assert DynamoStore(table).get_cursor(SOURCE) == {"page": 2}  # where every other reader looks


def test_a_cursor_another_container_stored_since_is_read(template_tables: Callable[[], Table]) -> None:
    table = template_tables()
    warm, other = CountingFeed(), CountingFeed()
    warm_poller, other_poller = _poller(DynamoStore(table), warm), _poller(DynamoStore(table), other)
    warm_poller.poll(lambda: 300_000, owner="run-1")
    other_poller.poll(lambda: 300_000, owner="run-2")
    log = logged(table)
    warm_poller.poll(lambda: 300_000, owner="run-3")
    assert "GetItem" in log
    assert warm.read_from == [None, {"page": 2}]  # not its own {"page": 1}


def test_a_deployed_stacks_cursor_and_held_lease_are_honoured(template_tables: Callable[[], Table]) -> None:
    """What the previous release leaves: the cursor on its item, a lease item held by a poll still running
    (its conditional put), deleted at its release."""
    table = template_tables()
    now = 1_700_000_000
    DynamoStore(table).put_cursor(SOURCE, {"page": 7})
    table.put_item(Item={**keys.poll_lease(SOURCE), "owner": "old-run", "expires_at": now + 300})
    store = DynamoStore(table)
    assert not store.take_poll(SOURCE, "new-run", 300, now)  # the old poll holds it
    table.delete_item(Key=keys.poll_lease(SOURCE))  # its release
    feed = CountingFeed()
    _poller(store, feed, lambda: now + 1).poll(lambda: 300_000, owner="new-run")
    assert feed.read_from == [{"page": 7}]
    assert store.get_cursor(SOURCE) == {"page": 8}


def _old_release_poll(table: Table, owner: str, now: int) -> bool:
    """The previous release's poll, verbatim: a conditional put of the lease, the cursor, a delete."""
    try:
        table.put_item(
            Item={**keys.poll_lease(SOURCE), "owner": owner, "expires_at": now + 300},
            ConditionExpression="attribute_not_exists(pk) OR expires_at < :now OR #o = :owner",
            ExpressionAttributeNames={"#o": "owner"},
            ExpressionAttributeValues={":now": now, ":owner": owner},
        )
    except ClientError:
        return False
    store = DynamoStore(table)  # its own container
    cursor = store.get_cursor(SOURCE) or {}
    store.put_cursor(SOURCE, {"page": int(cursor.get("page", 0)) + 1})
    table.delete_item(Key=keys.poll_lease(SOURCE))
    return True


def test_a_rolled_back_release_takes_the_released_lease_and_its_cursor_is_then_read(
    template_tables: Callable[[], Table],
) -> None:
    table = template_tables()
    now = 1_700_000_000
    feed = CountingFeed()
    poller = _poller(DynamoStore(table), feed, lambda: now)
    poller.poll(lambda: 300_000, owner="run-1")  # released: the item stays, ownerless, expires_at 0
    assert _old_release_poll(table, "old-run", now + 60)  # a rollback: the old code takes it at once
    poller.poll(lambda: 300_000, owner="run-2")  # rolled forward again, in the same warm container
    assert feed.read_from == [None, {"page": 2}]  # the old code's cursor, not the one kept in memory


# --- every interleaving: a poll always starts from the stored cursor -----------------------------------------

_steps = st.lists(
    st.tuples(
        st.sampled_from(["poll", "crash", "lost_release", "failed_write", "old_poll", "ttl", "wait"]),
        st.integers(0, 2),  # which container
        st.integers(1, 2),  # pages the poll stores
    ),
    min_size=1,
    max_size=14,
)


class LostAnswers:
    """The table as a container's store sees it; ``lose_next_put`` makes the next PutItem land, lose its
    answer and go again, as botocore resends a request whose answer never came."""

    def __init__(self, table: Table) -> None:
        self._table = table
        self.lose_next_put = False
        self.fail_next_put = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._table, name)

    def put_item(self, **request: Any) -> Any:
        answer = self._table.put_item(**request)
        if self.lose_next_put:
            self.lose_next_put = False
            return self._table.put_item(**request)  # refused if conditional on what the first one changed
        if self.fail_next_put:  # landed, but every answer was lost: the caller sees an error
            self.fail_next_put = False
            raise ClientError({"Error": {"Code": "InternalServerError", "Message": "lost"}}, "PutItem")
        return answer


class Container:
    """One warm poller container: its store (and memory) over the shared table."""

    def __init__(self, table: Table) -> None:
        self.table = LostAnswers(table)
        self.store = DynamoStore(self.table)  # type: ignore[arg-type]
        self.runs = 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=_steps)
def test_every_poll_starts_from_the_stored_cursor_and_holds_the_feed_alone(
    template_tables: Callable[[], Table], steps: list[tuple[str, int]]
) -> None:
    """Three containers, crashes after a stored page (the lease left to expire), releases whose answer was
    lost (landed, then resent and refused), cursor writes that landed but answered with an error, the
    previous release's polls and TTL deleting the lease item: whatever happened, a poll's cursor is the
    one on the table, and a live lease keeps others out."""
    table = template_tables()
    containers = [Container(table) for _ in range(3)]
    reader = DynamoStore(table)
    now = 1_700_000_000
    held_until = 0  # a lease left behind by a crash
    for action, which, pages in steps:
        now += 61
        box = containers[which]
        box.runs += 1
        owner = f"c{which}-{box.runs}"
        if action == "wait":
            now += 400
            continue
        if action == "ttl":  # TTL deletes an expired item (a released one says 0), whenever it gets to it
            if now > held_until:
                table.delete_item(Key=keys.poll_lease(SOURCE))
            continue
        if action == "old_poll":
            assert _old_release_poll(table, owner, now) == (now > held_until)
            continue
        taken = box.store.take_poll(SOURCE, owner, 300, now)
        assert taken == (now > held_until)
        if not taken:
            continue
        cursor = box.store.poll_cursor(SOURCE)
        assert cursor == reader.get_cursor(SOURCE)
        page = int((cursor or {}).get("page", 0))
        for n in range(1, pages + 1):
            box.table.fail_next_put = action == "failed_write" and n == pages
            try:
                box.store.store_poll_cursor(SOURCE, {"page": page + n, "by": owner})
            except ClientError:
                assert action == "failed_write"  # the poller's `finally` releases the lease all the same
        if action == "crash":
            held_until = now + 300
            continue
        box.table.lose_next_put = action == "lost_release"
        box.store.release_poll(SOURCE, owner)
        assert "owner" not in table.get_item(Key=keys.poll_lease(SOURCE)).get("Item", {})  # released
