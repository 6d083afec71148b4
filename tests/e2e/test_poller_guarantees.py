"""The poller's promises: it stops before the Lambda deadline and the next run resumes; a feed is
enqueued before its cursor moves; and MIS outages and SQS failures at random still deliver every
change exactly once in effect."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import boto3
import pytest
from moto import mock_aws

from clinicsync.adapters.aws.queue import SqsChangeQueue
from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.adapters.medods import source as medods
from clinicsync.application.poll import Poller
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.models import PatientChanges, SyncMessage
from clinicsync.domain.ports import ChangePage, Cursor
from sandbox.local import LocalClinic
from tests.helpers import appointment, demo_config, patient

CONFIG = demo_config()


class PagedSource:
    """A feed with ``pages`` pages of one patient each; the cursor is the next page number."""

    kind = "paged"

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.reads: list[int] = []

    def fetch_changes(self, cursor: Cursor | None) -> ChangePage:
        page = int((cursor or {}).get("page", 0))
        self.reads.append(page)
        changes = [PatientChanges(patient=patient(f"p{page}"), appointments=(appointment(f"a{page}", f"p{page}"),))]
        return ChangePage(changes=changes, cursor={"page": page + 1}, more=page + 1 < self.pages)

    def acknowledge(self, page: ChangePage) -> None:
        pass

    def resync_cursor(self, window_seconds: int, now: float) -> Cursor:
        return {"page": 0}


class ListQueue:
    def __init__(self, fail_first: int = 0) -> None:
        self.sent: list[SyncMessage] = []
        self.fail_first = fail_first

    def send(self, messages: Sequence[SyncMessage]) -> None:
        if self.fail_first:
            self.fail_first -= 1
            raise RuntimeError("SQS is unavailable")
        self.sent.extend(messages)


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[DynamoStore]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        table = boto3.resource("dynamodb", region_name="eu-central-1").create_table(
            TableName="t",
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
            AttributeDefinitions=[
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )
        yield DynamoStore(table)


def _clock(budgets: list[int]) -> Callable[[], int]:
    """remaining_ms() as Lambda reports it: each call returns the next value (then the last)."""
    values = iter(budgets)
    last = budgets[-1]

    def remaining() -> int:
        nonlocal last
        last = next(values, last)
        return last

    return remaining


def test_a_poll_stops_before_the_deadline_and_the_next_run_resumes(store: DynamoStore) -> None:
    source, queue = PagedSource(pages=10), ListQueue()
    poller = Poller(CONFIG, source, store, queue, KeyedHasher(b"k" * 32))
    # Plenty of time for three pages, then less than the safety margin.
    first = poller.poll(_clock([300_000, 290_000, 280_000, 270_000, 10_000]), owner="run-1")
    assert first.stopped_early and first.pages == 4
    assert store.get_cursor("paged") == {"page": 4}
    second = poller.poll(_clock([300_000]), owner="run-2")
    assert not second.stopped_early and second.pages == 6
    assert source.reads == list(range(10))  # nothing read twice, nothing skipped
    assert sorted(c.patient.mis_id for m in queue.sent for c in m.changes) == sorted(f"p{i}" for i in range(10))


def test_a_failed_enqueue_leaves_the_cursor_where_it_was(store: DynamoStore) -> None:
    source, queue = PagedSource(pages=2), ListQueue(fail_first=1)
    poller = Poller(CONFIG, source, store, queue, KeyedHasher(b"k" * 32))
    with pytest.raises(RuntimeError):
        poller.poll(_clock([300_000]), owner="run-1")
    assert store.get_cursor("paged") is None  # the page was not on SQS, so the cursor did not move
    poller.poll(_clock([300_000]), owner="run-2")
    assert store.get_cursor("paged") == {"page": 2}
    assert [c.patient.mis_id for m in queue.sent for c in m.changes] == ["p0", "p1"]


def test_random_mis_and_sqs_failures_still_deliver_every_change_once(
    make_clinic: Callable[..., LocalClinic], monkeypatch: pytest.MonkeyPatch
) -> None:
    clinic = make_clinic(patients=40, appointments=50)
    rng = random.Random(11)
    real_send = SqsChangeQueue.send

    def flaky_send(self: SqsChangeQueue, messages: Any) -> None:
        if rng.random() < 0.3:
            raise RuntimeError("injected SQS failure")
        real_send(self, messages)

    monkeypatch.setattr(SqsChangeQueue, "send", flaky_send)
    # The MEDODS client's back-offs (0.5 s doubling to 8 s) are recorded, not slept: the retries still
    # happen, the test does not spend half a minute waiting for them.
    backoffs: list[float] = []
    monkeypatch.setattr(medods, "MedodsApi", functools.partial(medods.MedodsApi, sleep=backoffs.append))
    for round_no in range(8):
        if rng.random() < 0.5:
            clinic.medods.faults.fail_next(rng.randint(1, 6), status=rng.choice([500, 502, 503]))
        # Between polls, the front desk keeps working.
        visit = clinic.open_booking() if round_no % 3 == 0 else None
        if visit is not None:
            rng.choice([clinic.medods.confirm, clinic.medods.cancel, clinic.medods.no_show])(visit)
        try:
            clinic.sync()
        except Exception:
            clinic.stack.drain_all()
    clinic.medods.faults.clear()
    monkeypatch.setattr(SqsChangeQueue, "send", real_send)
    clinic.sync()
    assert clinic.mismatches() == []
    assert max(clinic.crm.contacts_by_origin().values()) == 1
    assert len(clinic.crm.deals()) == len(clinic.expected_deals())
    assert backoffs  # the injected MIS failures were really retried
