"""The shared leaky bucket on moto: burst then 1/rate spacing, one budget across containers, 503 back-off."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import boto3
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from moto import mock_aws
from werkzeug.test import Client

from clinicsync.adapters.aws.budget import BUDGET_PK, BudgetTimeout, RequestPacer, SharedLeakyBucket
from clinicsync.adapters.http.pacing import Pacer
from clinicsync.domain.config import CRM_BUDGETS
from sandbox.bench.simclock import leaky_bucket_floor_seconds, sliding_window_floor_seconds
from sandbox.emulators.amocrm import AmoCrmEmulator
from sandbox.emulators.base import Clock, ServedApp
from sandbox.emulators.bitrix24 import Bitrix24Emulator

REGION = "eu-central-1"
KEY = "portal-1"


class AtomicTable:
    """Table proxy that runs each call under one lock.

    DynamoDB applies a conditional write atomically; moto checks the condition and then writes in
    plain Python, so two threads can both pass the check. The lock restores DynamoDB's guarantee
    (and counts the calls)."""

    _lock = threading.Lock()

    def __init__(self, table: Any) -> None:
        self._table = table
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._table, name)
        if not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            with AtomicTable._lock:
                return target(*args, **kwargs)

        return call


@pytest.fixture
def new_table(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], AtomicTable]]:
    """Returns a factory: each call is one "container" with its own boto3 session on the same table."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        boto3.resource("dynamodb", region_name=REGION).create_table(
            TableName="clinic-table",
            AttributeDefinitions=[
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
            ],
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
            BillingMode="PAY_PER_REQUEST",
        )

        def make() -> AtomicTable:
            resource = boto3.session.Session().resource("dynamodb", region_name=REGION)
            return AtomicTable(resource.Table("clinic-table"))

        yield make


class FakeTime:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _bucket(table: AtomicTable, t: FakeTime, **kw: Any) -> SharedLeakyBucket:
    kw.setdefault("rate", 2.0)
    kw.setdefault("burst", 5)
    return SharedLeakyBucket(table, KEY, clock=t.clock, sleep=t.sleep, **kw)  # type: ignore[arg-type]


def test_both_pacers_satisfy_the_protocol(new_table: Callable[[], AtomicTable]) -> None:
    shared: RequestPacer = _bucket(new_table(), FakeTime())
    local: RequestPacer = Pacer()
    assert isinstance(shared, RequestPacer)
    assert isinstance(local, RequestPacer)


def test_burst_goes_at_once_then_requests_are_spaced_at_one_over_rate(new_table: Callable[[], AtomicTable]) -> None:
    t = FakeTime()
    table = new_table()
    bucket = _bucket(table, t, rate=2.0, burst=5)
    sent_at = []
    for _ in range(9):
        bucket.wait()
        sent_at.append(t.now - 1_800_000_000.0)
    assert sent_at == pytest.approx([0, 0, 0, 0, 0, 0.5, 1.0, 1.5, 2.0])
    assert t.sleeps == pytest.approx([0.5] * 4)

    # The level drains at `rate` while idle: after 2 s, 4 of the 5 slots are free again.
    t.now += 2.0
    for _ in range(4):
        bucket.wait()
    assert len(t.sleeps) == 4
    bucket.wait()
    assert t.sleeps[-1] == pytest.approx(0.5)

    item = table.get_item(Key={"pk": BUDGET_PK, "sk": KEY})["Item"]
    assert isinstance(item["level"], Decimal)
    assert float(item["level"]) == pytest.approx(6.0)
    assert int(item["expires_at"]) > t.now
    # One read to start, then one conditional write per admitted request.
    table.calls.clear()
    bucket.dynamodb_calls = 0
    for _ in range(5):
        bucket.wait()
    assert table.calls == ["put_item"] * 5


def test_two_containers_share_one_budget_and_stay_within_two_calls_per_request(
    new_table: Callable[[], AtomicTable],
) -> None:
    t = FakeTime()
    a, b = _bucket(new_table(), t, burst=4), _bucket(new_table(), t, burst=4)
    for _ in range(2):  # together they spend the burst of 4
        a.wait()
        b.wait()
    assert t.sleeps == []
    for _ in range(3):  # then each one's request waits for the other's
        a.wait()
        b.wait()
    assert t.sleeps == pytest.approx([0.5] * 6)
    assert a.dynamodb_calls + b.dynamodb_calls <= 2 * 10 + 2


def test_penalise_makes_every_container_back_off(new_table: Callable[[], AtomicTable]) -> None:
    t = FakeTime()
    a, b = _bucket(new_table(), t, rate=2.0, burst=10), _bucket(new_table(), t, rate=2.0, burst=10)
    a.wait()
    b.wait()
    assert t.sleeps == []
    a.penalise()  # container A met a 503 ...
    b.wait()  # ... and container B, which never saw it, waits for the bucket to drain one slot
    assert t.sleeps == pytest.approx([0.5])


def test_a_slot_further_away_than_max_wait_raises_without_booking(new_table: Callable[[], AtomicTable]) -> None:
    t = FakeTime()
    table = new_table()
    bucket = _bucket(table, t, rate=1.0, burst=1, max_wait=2.0)
    bucket.wait()
    bucket.wait()  # booked 1 s ahead
    before = table.get_item(Key={"pk": BUDGET_PK, "sk": KEY})["Item"]
    other = _bucket(new_table(), t, rate=1.0, burst=1, max_wait=0.5)
    with pytest.raises(BudgetTimeout):
        other.wait()
    assert t.sleeps == [1.0]
    assert table.get_item(Key={"pk": BUDGET_PK, "sk": KEY})["Item"] == before  # nothing booked
    t.now += 1.0
    other.wait()  # within max_wait again
    assert t.sleeps == [1.0]


# --- against the portal emulator, in real time -------------------------------------------------------

REQUESTS_PER_CONTAINER = 16
RATE, BURST = 15.0, 5  # the emulator below allows 20/s and 10: two pacers of burst 5 each just fit,
# but two pacers of 15/s each send 30/s into a 20/s drain.


@pytest.fixture
def portal() -> Iterator[tuple[Bitrix24Emulator, str]]:
    emu = Bitrix24Emulator()
    emu.limits.bucket_size = 10
    emu.limits.drain_per_second = 20
    served = ServedApp(emu).start()
    yield emu, emu.webhook_url(served.base_url)
    served.stop()


def _two_containers(url: str, pacers: list[RequestPacer]) -> tuple[list[int], float]:
    statuses: list[int] = []
    errors: list[BaseException] = []

    def run(pacer: RequestPacer) -> None:
        try:
            with httpx.Client(timeout=5.0) as http:
                for _ in range(REQUESTS_PER_CONTAINER):
                    pacer.wait()
                    statuses.append(http.post(url + "server.time.json", json={}).status_code)
        except BaseException as exc:
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(p,)) for p in pacers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    return statuses, time.monotonic() - started


def test_containers_sharing_the_budget_meet_no_503_where_separate_pacers_do(
    new_table: Callable[[], AtomicTable], portal: tuple[Bitrix24Emulator, str]
) -> None:
    emu, url = portal
    shared = [SharedLeakyBucket(new_table(), KEY, rate=RATE, burst=BURST) for _ in range(2)]  # type: ignore[arg-type]
    statuses, elapsed = _two_containers(url, list(shared))
    assert len(statuses) == 2 * REQUESTS_PER_CONTAINER
    assert statuses.count(503) == 0
    assert emu.stats()["rate_limited_503"] == 0
    # They really were paced as one: the burst, then one request per 1/RATE for the rest.
    assert elapsed >= 0.9 * (2 * REQUESTS_PER_CONTAINER - BURST) / RATE
    assert sum(s.dynamodb_calls for s in shared) <= 2 * len(statuses) + 4

    emu.reset_limits()
    emu.reset_stats()
    time.sleep(0.6)  # let the portal's bucket drain
    statuses, _ = _two_containers(url, [Pacer(rate=RATE, burst=BURST), Pacer(rate=RATE, burst=BURST)])
    assert statuses.count(503) > 0
    assert emu.stats()["rate_limited_503"] == statuses.count(503)


# --- the default budgets at the CRMs' real limits, containers late on their slots ---------------------------

CONTAINERS, REQUESTS_EACH = 3, 25
LATENESS = {"bitrix24": 0.5, "amocrm": 0.05}
_RUNS = itertools.count()  # seconds a request may reach the CRM after its booked slot


def _crm_at_its_real_limits(kind: str, clock: Clock) -> Callable[[], int]:
    """One request to the emulator at the clock's time; returns its status (503/429 = refused)."""
    if kind == "bitrix24":
        bitrix = Bitrix24Emulator(webhook_secret="budget", clock=clock, rate_limit=True)
        client, path = Client(bitrix), bitrix.webhook_url("http://crm.invalid").split("crm.invalid", 1)[1]
        return lambda: client.post(path + "server.time.json", json={}).status_code
    amo = AmoCrmEmulator(clock, rate_limit=True)
    amo_client = Client(amo)
    headers = {"Authorization": "Bearer " + amo.issue_tokens()["access_token"]}
    return lambda: amo_client.get("/api/v4/account", headers=headers).status_code


def _containers_sharing_the_default_budget(
    new_table: Callable[[], AtomicTable], kind: str, lateness: list[float]
) -> tuple[list[int], float]:
    """CONTAINERS syncers, each sending REQUESTS_EACH requests one after another through its own
    SharedLeakyBucket on the one DynamoDB item, at the budget the config gives the CRM kind. Each request
    reaches the CRM ``lateness[i]`` after its booked slot (scheduling, GC, network), with 50 ms of
    latency before the container books its next one. Events run in time order on one simulated clock."""
    rate, burst = CRM_BUDGETS[kind]
    start = 1_800_000_000.0
    clock = Clock(start)
    now = [start]
    send = _crm_at_its_real_limits(kind, clock)
    booked: list[float] = []
    key = f"portal-{next(_RUNS)}"  # hypothesis runs many examples on the fixture's one table
    buckets = [
        SharedLeakyBucket(new_table(), key, rate=rate, burst=burst, clock=lambda: now[0], sleep=booked.append)  # type: ignore[arg-type]
        for _ in range(CONTAINERS)
    ]
    events = [(start + 0.001 * c, c, "book", REQUESTS_EACH) for c in range(CONTAINERS)]
    statuses: list[int] = []
    late = iter(lateness)
    while events:
        events.sort()
        at, c, kind_of_event, left = events.pop(0)
        now[0] = at
        clock.freeze(at)
        if kind_of_event == "book":
            booked.clear()
            buckets[c].wait()  # books the slot; the "sleep" is recorded, the container sends when it is due
            events.append((at + sum(booked) + next(late, 0.0), c, "send", left))
        else:
            statuses.append(send())
            if left > 1:
                events.append((at + 0.05, c, "book", left - 1))
    return statuses, now[0] - start


@pytest.mark.parametrize("kind", ["bitrix24", "amocrm"])
@settings(max_examples=10)  # each example is 75 requests through moto: the small profile's 30 take minutes
@given(data=st.data())
def test_containers_late_on_their_slots_meet_no_503_or_429_at_the_default_budget(
    new_table: Callable[[], AtomicTable], kind: str, data: st.DataObject
) -> None:
    """The defaults sit close under the real limits (Bitrix24: 48 of the bucket's 50 at 2/s; amoCRM: 6.6/s
    of 7 in any second) so a backfill runs near the floor's time, and keep a margin for requests that
    reach the CRM after their shared slot: 1 s worth of the Bitrix24 bucket, 60 ms of amoCRM's second."""
    lateness = data.draw(
        st.lists(
            st.floats(0.0, LATENESS[kind]), min_size=CONTAINERS * REQUESTS_EACH, max_size=CONTAINERS * REQUESTS_EACH
        )
    )
    statuses, _ = _containers_sharing_the_default_budget(new_table, kind, lateness)
    assert len(statuses) == CONTAINERS * REQUESTS_EACH
    assert [s for s in statuses if s != 200] == []


@pytest.mark.parametrize("kind", ["bitrix24", "amocrm"])
def test_the_default_budget_keeps_the_time_of_the_floors_requests_within_the_backfill_target(
    new_table: Callable[[], AtomicTable], kind: str
) -> None:
    """On time, the shared budget spends the CRM's limit almost whole: the same requests as a perfect client's
    take at most 1.15 × its time (the backfill target), leaving the rest of the target to extra requests."""
    statuses, elapsed = _containers_sharing_the_default_budget(new_table, kind, [])
    n = CONTAINERS * REQUESTS_EACH
    assert set(statuses) == {200}
    floor = (
        leaky_bucket_floor_seconds(n, latency=0.0)
        if kind == "bitrix24"
        else sliding_window_floor_seconds(n, latency=0.0)
    )
    assert elapsed <= 1.15 * floor
