"""The MEDODS feed's cursor remembers only what its next read can return again, so a first import of any
size checkpoints in one DynamoDB item, and every record is still delivered exactly once."""

from __future__ import annotations

import json
from typing import cast

from hypothesis import given, settings
from hypothesis import strategies as st

from clinicsync.adapters.medods.source import MedodsApi, MedodsSource
from clinicsync.domain.ports import Cursor
from tests.adapters.medods_fake import MedodsFake
from tests.helpers import demo_config

NOW = 1_780_000_000  # a fixed clock: the import window ends here
DAY = 86_400
WINDOW_DAYS = 90
DYNAMODB_ITEM_LIMIT = 400 * 1024


def clinic(appointments: int, patients: int, spread: list[int]) -> MedodsFake:
    """``appointments`` visits of ``patients`` clients; visit i changed at ``spread[i % len(spread)]``
    seconds after the window opens, clients before the window's start (their cards did not change)."""
    start = NOW - WINDOW_DAYS * DAY
    clients = [{"id": p, "surname": "X", "phone": None, "updatedAt": start - DAY} for p in range(1, patients + 1)]
    visits = [
        {
            "id": 10_000 + i,
            "clientId": 1 + i % patients,
            "date": "2026-10-01",
            "time": "10:00",
            "status": "approved",
            "updatedAt": start + 1 + spread[i % len(spread)],
        }
        for i in range(appointments)
    ]
    return MedodsFake(visits, clients)


def import_all(api: MedodsFake, max_records: int, page_size: int = 100) -> tuple[list[str], list[Cursor]]:
    """A first import as the checkpointed backfill job reads it: page after page from the resync cursor;
    the appointment ids delivered and every cursor it would checkpoint."""
    config = demo_config()
    config = config.model_copy(update={"mis": config.mis.model_copy(update={"page_size": page_size})})
    source = MedodsSource(cast(MedodsApi, api), config, max_records=max_records)
    cursor = source.resync_cursor(WINDOW_DAYS * DAY, NOW)
    delivered: list[str] = []
    checkpoints: list[Cursor] = []
    while True:
        page = source.fetch_changes(cursor)
        delivered += [a.mis_id for change in page.changes for a in change.appointments]
        cursor = page.cursor
        checkpoints.append(cursor)
        if not page.more:
            return delivered, checkpoints


def test_a_large_first_import_checkpoints_a_cursor_that_fits_one_dynamodb_item() -> None:
    # 30,000 visits over the 90 days, read 5,000 at a time as the backfill job does. The shared floor
    # kept every visit's marker until the clients' feed moved: 1 MB of cursor by the sixth page.
    api = clinic(30_000, 2_000, spread=[i * (WINDOW_DAYS * DAY // 30_000) for i in range(30_000)])
    delivered, checkpoints = import_all(api, max_records=5_000)
    assert sorted(delivered) == sorted(str(r["id"]) for r in api.visits.values())
    largest = max(len(json.dumps(c)) for c in checkpoints)
    assert largest < DYNAMODB_ITEM_LIMIT // 10, largest


@settings(max_examples=60, deadline=None)
@given(
    appointments=st.integers(1, 300),
    patients=st.integers(1, 40),
    spread=st.lists(st.integers(0, 400), min_size=1, max_size=30),
    max_records=st.integers(1, 60),
    page_size=st.integers(1, 25),
)
def test_every_visit_is_delivered_once_and_the_cursor_forgets_what_cannot_come_back(
    appointments: int, patients: int, spread: list[int], max_records: int, page_size: int
) -> None:
    # Changes bunched within seconds of each other (the overlap is 120 s), so re-reads happen all the time.
    api = clinic(appointments, patients, spread)
    delivered, checkpoints = import_all(api, max_records=max_records, page_size=page_size)
    assert sorted(delivered) == sorted(str(r["id"]) for r in api.visits.values())
    overlap = demo_config().mis.overlap_seconds
    for cursor in checkpoints:
        for key, marker in cursor["seen"].items():
            mark = cursor["appointments" if key.startswith("a") else "clients"]
            assert int(marker.split(":", 1)[0]) >= mark - overlap, (key, marker, mark)


@settings(max_examples=40, deadline=None)
@given(
    first_poll_days=st.integers(1, 730),
    ages=st.lists(st.integers(0, 3 * 365 * DAY), min_size=1, max_size=60),
    max_records=st.integers(1, 30),
)
def test_the_first_poll_without_a_cursor_reads_first_poll_days_back_not_the_whole_history(
    first_poll_days: int, ages: list[int], max_records: int
) -> None:
    # Visits changed up to three years ago, their clients' cards older still. Without a stored cursor the
    # feed began at updatedAtAfter=0: a clinic's whole history through the incremental path, whatever
    # window the operator's backfill chose.
    clients = [{"id": 1, "surname": "X", "phone": None, "updatedAt": NOW - 4 * 365 * DAY}]
    visits = [
        {"id": 10_000 + i, "clientId": 1, "date": "2026-10-01", "time": "10:00", "status": "approved",
         "updatedAt": NOW - age}
        for i, age in enumerate(ages)
    ]  # fmt: skip
    api = MedodsFake(visits, clients)
    config = demo_config()
    config = config.model_copy(update={"mis": config.mis.model_copy(update={"first_poll_days": first_poll_days})})
    source = MedodsSource(cast(MedodsApi, api), config, max_records=max_records, clock=lambda: NOW)
    delivered: list[str] = []
    cursor: Cursor | None = None
    while True:
        page = source.fetch_changes(cursor)
        delivered += [a.mis_id for change in page.changes for a in change.appointments]
        cursor = page.cursor
        if not page.more:
            break
    window_start = NOW - first_poll_days * DAY
    assert sorted(delivered) == sorted(str(v["id"]) for v in visits if int(v["updatedAt"]) > window_start)


def test_without_first_poll_days_the_first_poll_reads_every_record() -> None:
    ages = [0, 100 * DAY, 3 * 365 * DAY]
    visits = [
        {"id": 10_000 + i, "clientId": 1, "date": "2026-10-01", "time": "10:00", "status": "approved",
         "updatedAt": NOW - age}
        for i, age in enumerate(ages)
    ]  # fmt: skip
    clients = [{"id": 1, "surname": "X", "phone": None, "updatedAt": NOW - 4 * 365 * DAY}]
    source = MedodsSource(cast(MedodsApi, MedodsFake(visits, clients)), demo_config(), clock=lambda: NOW)
    page = source.fetch_changes(None)
    assert not page.more
    assert sorted(a.mis_id for change in page.changes for a in change.appointments) == ["10000", "10001", "10002"]
    assert [change.patient.mis_id for change in page.changes] == ["1"]
