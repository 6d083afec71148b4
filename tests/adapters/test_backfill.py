"""The first import's checkpoint: each page is on the queue before its cursor is saved, so a run stopped at
any point (the Lambda deadline, a MIS error, the operator) resumes at the first page not yet queued."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest
from moto import mock_aws

from clinicsync.adapters.aws.backfill_checkpoint import DynamoBackfillCheckpoint
from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.application.poll import Poller
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.ports import ChangePage, Cursor
from tests.e2e.test_poller_guarantees import ListQueue, PagedSource
from tests.helpers import demo_config

HASHER = KeyedHasher(b"k" * 32)


class FlakySource(PagedSource):
    def __init__(self, pages: int, fail_at: int) -> None:
        super().__init__(pages)
        self.fail_at = fail_at

    def fetch_changes(self, cursor: Cursor | None) -> ChangePage:
        if int((cursor or {}).get("page", 0)) == self.fail_at:
            self.fail_at = -1
            raise RuntimeError("MIS answered 503")
        return super().fetch_changes(cursor)


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        yield boto3.resource("dynamodb", region_name="eu-central-1").create_table(
            TableName="t",
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
            AttributeDefinitions=[
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )


def test_an_interrupted_import_resumes_at_the_first_page_not_queued(table: object) -> None:
    source, queue = FlakySource(pages=7, fail_at=4), ListQueue()
    poller = Poller(demo_config(), source, DynamoStore(table), queue, HASHER)  # type: ignore[arg-type]
    checkpoint = DynamoBackfillCheckpoint(table, source.kind)

    first = poller.backfill(lambda: 10**6, checkpoint, window_days=30, max_pages=2)  # stops after two pages
    assert (first.pages, first.done, first.resumed) == (2, False, False)
    with pytest.raises(RuntimeError):
        poller.backfill(lambda: 10**6, checkpoint, window_days=30)  # page 4 fails
    saved = checkpoint.load()
    assert saved is not None and saved.pages == 4 and saved.cursor == {"page": 4} and not saved.done

    last = poller.backfill(lambda: 10**6, checkpoint, window_days=30)
    assert last.resumed and last.done and last.pages == 7
    assert source.reads == [0, 1, 2, 3, 4, 5, 6]  # every page read once, none skipped
    queued = [c.patient.mis_id for m in queue.sent for c in m.changes]
    assert sorted(queued) == [f"p{i}" for i in range(7)]

    again = poller.backfill(lambda: 10**6, checkpoint, window_days=30)
    assert again.done and source.reads == [0, 1, 2, 3, 4, 5, 6]  # done stays done until --restart
    poller.backfill(lambda: 10**6, checkpoint, window_days=30, restart=True)
    assert source.reads[7:] == [0, 1, 2, 3, 4, 5, 6]


def test_the_import_stops_before_the_lambda_deadline_and_the_next_invocation_goes_on(table: object) -> None:
    source, queue = PagedSource(pages=5), ListQueue()
    poller = Poller(demo_config(), source, DynamoStore(table), queue, HASHER)  # type: ignore[arg-type]
    checkpoint = DynamoBackfillCheckpoint(table, source.kind)
    budget = iter([60_000, 10_000])  # the second page leaves less than the safety margin
    state = poller.backfill(lambda: next(budget, 0), checkpoint, window_days=30)
    assert (state.pages, state.done) == (2, False)
    state = poller.backfill(lambda: 10**6, checkpoint, window_days=30)
    assert (state.pages, state.done) == (5, True) and source.reads == [0, 1, 2, 3, 4]
