"""The IDENT connector on its own: its SQL against the SQLite stand-in of IDENT's schema, the derived
statuses, the clinic's filters applied before anything leaves, the cursor across restarts and failures,
batch sizes; plus IDENT's date parsing and the request signatures."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from clinicsync.adapters.http.signing import TIMESTAMP_HEADER, sign_request, verify_request
from clinicsync.adapters.ident.contract import MAX_BATCH_BYTES, ConnectorBatch, parse_ident_datetime
from clinicsync.domain.models import AppointmentStatus as S
from clinicsync.domain.models import PatientChanges
from clinicsync_ident.db import IdentDatabase
from clinicsync_ident.push import StackClient, StackRefused, StackUnavailable
from clinicsync_ident.runner import Connector
from clinicsync_ident.state import ConnectorState, load_state, save_state
from sandbox.emulators.base import Clock
from sandbox.emulators.ident import IdentEmulator
from sandbox.seed import CLINIC_TZ, build_sample_clinic

SETTINGS: dict[str, Any] = {
    "clinic_id": "test",
    "timezone": "Europe/Moscow",
    "default_region": "RU",
    "no_show_grace_minutes": 60,
    "filters": {"branches": None, "doctors": None, "refused_processing": "skip", "skip_anonymous": True},
}


class FakeStack:
    """Stands in for the stack's two connector routes; can be taken down to test the cursor."""

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        self.settings_reply = settings or SETTINGS
        self.batches: list[ConnectorBatch] = []
        self.down = False
        self.fail_after: int | None = None

    def settings(self) -> dict[str, Any]:
        if self.down:
            raise StackUnavailable("down")
        return self.settings_reply

    def push(self, body: bytes) -> dict[str, Any]:
        if self.down or (self.fail_after is not None and len(self.batches) >= self.fail_after):
            raise StackUnavailable("down")
        assert len(body) <= MAX_BATCH_BYTES
        self.batches.append(ConnectorBatch.model_validate_json(body))
        return {"status": "queued"}

    def changes(self) -> dict[str, PatientChanges]:
        return {c.patient.mis_id: c for b in self.batches for c in b.changes}

    def visit(self, visit_id: int) -> Any:
        return next(a for b in self.batches for c in b.changes for a in c.appointments if a.mis_id == str(visit_id))


def _sent_visit_ids(stack: FakeStack) -> list[str]:
    return [a.mis_id for b in stack.batches for c in b.changes for a in c.appointments]


# Pinned, and at 05:00 before the 09:00-20:00 day: whether a sample booking falls due during a test must
# not depend on the hour CI runs it (a 10-minute advance once swept a real-time booking to no-show).
SAMPLE_DAY = datetime(2026, 6, 2, tzinfo=CLINIC_TZ)


@pytest.fixture
def ident(tmp_path: Path) -> IdentEmulator:
    sample = build_sample_clinic(seed=3, patients=40, appointments=60, now=SAMPLE_DAY)
    clock = Clock((SAMPLE_DAY + timedelta(hours=5)).timestamp())
    return IdentEmulator(sample, tmp_path / "ident.sqlite3", clock)


def _connector(ident: IdentEmulator, stack: FakeStack, state_file: Path, **kwargs: Any) -> Connector:
    return Connector(
        "test",
        IdentDatabase.connect("sqlite", str(ident.path)),
        stack,  # type: ignore[arg-type]
        load_state(state_file),
        lambda state: save_state(state_file, state),
        clock=ident.clock.now,
        **kwargs,
    )


# --- statuses ----------------------------------------------------------------------------------------


def test_statuses_are_derived_from_the_tables(ident: IdentEmulator, tmp_path: Path) -> None:
    stack = FakeStack()
    connector = _connector(ident, stack, tmp_path / "state.json")
    patient = ident.add_client("Лебедева", "89161112233")
    booked = ident.book(patient, ident.at(2, "10:00"))
    cancelled = ident.book(patient, ident.at(3, "10:00"))
    visited = ident.book(patient, ident.at(4, "10:00"))
    ident.cancel(cancelled)
    ident.complete(visited)
    past = ident.book(patient, (ident.now_local() - timedelta(hours=3)).replace(tzinfo=CLINIC_TZ))
    connector.run_once()
    assert stack.visit(booked).status is S.BOOKED
    assert stack.visit(cancelled).status is S.CANCELLED
    assert stack.visit(visited).status is S.COMPLETED
    assert stack.visit(past).status is S.NO_SHOW  # 30 min visit + 60 min grace: long gone
    sent = stack.changes()[str(patient)].patient
    assert sent.phone == "+79161112233" and sent.last_name == "Лебедева"


def test_no_show_sweep_sends_a_booking_once_when_it_becomes_due(ident: IdentEmulator, tmp_path: Path) -> None:
    stack = FakeStack()
    connector = _connector(ident, stack, tmp_path / "state.json")
    patient = ident.add_client("Смирнова", "89160000001")
    visit = ident.book(patient, (ident.now_local() + timedelta(minutes=30)).replace(tzinfo=CLINIC_TZ), length=30)
    connector.run_once()
    booked_version = stack.visit(visit).version
    stack.batches.clear()
    # The sample clinic's own bookings fall due too, depending on the time of day the test runs:
    # only this visit is judged.
    ident.clock.advance((30 + 30 + 60) * 60 - 1)  # one second before it is due
    connector.run_once()
    assert str(visit) not in _sent_visit_ids(stack)
    ident.clock.advance(2)
    connector.run_once()
    assert _sent_visit_ids(stack).count(str(visit)) == 1
    assert stack.visit(visit).status is S.NO_SHOW
    assert stack.visit(visit).version > booked_version  # newer than the booking, so it wins in the store
    stack.batches.clear()
    assert connector.run_once().batches == 0  # never swept twice


# --- filters, cursor, batches ---------------------------------------------------------------------------


def test_clinic_filters_apply_before_anything_leaves(ident: IdentEmulator, tmp_path: Path) -> None:
    settings = {**SETTINGS, "filters": {**SETTINGS["filters"], "doctors": ["11"]}}
    stack = FakeStack(settings)
    report = _connector(ident, stack, tmp_path / "state.json").run_once()
    doctors = {a.doctor_id for c in stack.changes().values() for a in c.appointments}
    assert doctors == {"11"}
    assert report.excluded.get("doctor_filtered", 0) > 0


def test_cursor_survives_a_restart_and_only_changes_are_sent_again(ident: IdentEmulator, tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    first = FakeStack()
    _connector(ident, first, state_file).run_once()
    assert len(first.changes()) > 10
    ident.clock.advance(600)
    restarted = FakeStack()
    connector = _connector(ident, restarted, state_file)  # a new process reading the same state file
    assert connector.run_once().batches == 0
    patient = int(next(iter(first.changes())))
    ident.clock.advance(60)
    ident.edit_phone(patient, "+7 999 000-11-22")
    connector.run_once()
    assert set(restarted.changes()) == {str(patient)}
    assert restarted.changes()[str(patient)].patient.phone == "+79990001122"
    saved = json.loads(state_file.read_text(encoding="utf-8"))
    assert saved["changed_since"] == ident.now_local().isoformat()


def test_a_failed_push_keeps_the_cursor_and_the_next_run_resends(ident: IdentEmulator, tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    stack = FakeStack()
    stack.fail_after = 1  # the first batch lands, the second does not
    connector = _connector(ident, stack, state_file, patients_per_batch=5)
    with pytest.raises(StackUnavailable):
        connector.run_once()
    assert load_state(state_file).changed_since is None  # nothing moved
    stack.fail_after = None
    connector = _connector(ident, stack, state_file, patients_per_batch=5)
    connector.run_once()
    assert load_state(state_file).changed_since is not None
    ids = [c.patient.mis_id for b in stack.batches[1:] for c in b.changes]
    assert len(ids) == len(set(ids))  # the retry run sent everything once
    assert all(len(b.changes) <= 5 for b in stack.batches)


def test_without_the_clinics_settings_nothing_is_sent(ident: IdentEmulator, tmp_path: Path) -> None:
    stack = FakeStack()
    stack.down = True
    with pytest.raises(StackUnavailable):
        _connector(ident, stack, tmp_path / "state.json").run_once()
    assert stack.batches == []


def test_cached_settings_are_used_while_the_stack_is_unreachable(ident: IdentEmulator, tmp_path: Path) -> None:
    state_file = tmp_path / "state.json"
    save_state(state_file, ConnectorState(settings=SETTINGS))
    stack = FakeStack()
    stack.settings_reply = {}  # would fail if asked
    stack.down = True
    connector = _connector(ident, stack, state_file)
    with pytest.raises(StackUnavailable):  # settings come from the cache, then the push fails
        connector.run_once()
    assert load_state(state_file).changed_since is None


def test_deleted_patients_are_sent_as_archived(ident: IdentEmulator, tmp_path: Path) -> None:
    stack = FakeStack()
    patient = ident.add_client("Удалова", "89160000077")
    ident.book(patient, ident.at(2, "12:00"))
    with ident._connect() as db:  # IDENT marks a deleted card with Status = 3
        db.execute("UPDATE Patients SET Status = 3 WHERE ID_Patients = ?", (patient,))
    _connector(ident, stack, tmp_path / "state.json").run_once()
    assert stack.changes()[str(patient)].patient.archived


# --- IDENT's dates and our signatures ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2026-11-23T10:00:00+03:00", "2026-11-23T10:00:00+03:00"),
        ("2026-11-23T10:00:00+0300", "2026-11-23T10:00:00+03:00"),
        ("2026-11-23T10:00:00 03:00", "2026-11-23T10:00:00+03:00"),  # '+' decoded to a space
        ("2026-11-23T07:00:00Z", "2026-11-23T07:00:00+00:00"),
        ("2026-11-23T10:00+03:00", "2026-11-23T10:00:00+03:00"),
        ("2026-11-23T10:00:00.1234567-05:00", "2026-11-23T10:00:00.123456-05:00"),
        ("2026-11-23 10:00:00+03:00", "2026-11-23T10:00:00+03:00"),
    ],
)
def test_ident_datetimes(raw: str, expected: str) -> None:
    assert parse_ident_datetime(raw) == datetime.fromisoformat(expected)


@pytest.mark.parametrize(
    "raw", ["2026-11-23T10:00:00", "2026-11-23", "tomorrow", "2026-02-30T10:00:00+03:00", "9" * 100, ""]
)
def test_ident_datetimes_without_offset_or_invalid_are_refused(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_ident_datetime(raw)


def test_signature_binds_time_method_path_and_body() -> None:
    key = b"k" * 48
    headers = sign_request(key, 1_000_000, "POST", "/ident/connector/batches", b"{}")
    assert verify_request(key, headers, "POST", "/ident/connector/batches", b"{}", 1_000_100) is None
    assert verify_request(key, headers, "POST", "/ident/connector/batches", b"{ }", 1_000_100) is not None
    assert verify_request(key, headers, "GET", "/ident/connector/batches", b"{}", 1_000_100) is not None
    assert verify_request(key, headers, "POST", "/ident/connector/settings", b"{}", 1_000_100) is not None
    assert verify_request(b"x" * 48, headers, "POST", "/ident/connector/batches", b"{}", 1_000_100) is not None
    late = verify_request(key, headers, "POST", "/ident/connector/batches", b"{}", 1_000_000 + 301)
    assert late is not None and late.status == 401 and "window" in late.reason


# --- what case B needs from the card and the visit ---------------------------------------------------


def test_the_connector_reads_price_policy_card_and_branch_for_case_b(ident: IdentEmulator, tmp_path: Path) -> None:
    """Price (the visit's treatments) and the card's policy feed the DMS rule; card number, comment, city,
    the branch's name and address and the doctors seen before reach the models (sent only if mapped)."""
    stack = FakeStack()
    connector = _connector(ident, stack, tmp_path / "state.json")
    patient = ident.add_client("Лебедева", "89161112244")
    ident.edit_card(patient, CardNumber="004512", Comment="боится анестезии", City="Москва")
    earlier = ident.book(patient, ident.at(1, "09:00"), doctor_id=12, price="3500.00")
    ident.complete(earlier)
    dms = ident.book(patient, ident.at(2, "10:00"), price="0.00", insurance_policy="ДМС 7700 000123")
    booked = ident.book(patient, ident.at(3, "10:00"))
    ident.clock.advance(60)  # the DMS visit is recorded after the first one
    ident.complete(dms)
    connector.run_once()

    sent = stack.changes()[str(patient)].patient
    assert (sent.card_number, sent.card_comment, sent.city) == ("004512", "боится анестезии", "Москва")
    assert sent.policy_number == "ДМС 7700 000123"
    doctors = {d["ID"]: " ".join((d["Surname"], d["Name"], d["Patronymic"])) for d in ident.doctors()}
    assert sent.doctors_seen == (doctors[12], doctors[11])  # first seen first, whatever the names
    visit = stack.visit(dms)
    assert (visit.price, visit.insurance_policy, visit.is_dms) == (Decimal("0.00"), "ДМС 7700 000123", True)
    assert stack.visit(earlier).price == Decimal("3500.00") and not stack.visit(earlier).is_dms
    assert stack.visit(booked).price is None  # IDENT prices the visit, not the booking
    branch = ident.rows("SELECT Name, Address FROM Branches WHERE ID = 1")[0]
    assert (visit.branch_name, visit.branch_address) == (branch["Name"], branch["Address"])


@pytest.mark.parametrize(
    ("answers", "sent", "outcome"),
    [
        ((503, 429, 200), 3, "ok"),
        ((408, 425, 200), 3, "ok"),  # a desktop on a flaky line: request timeout and too-early are retried
        ((400,), 1, "refused"),  # a refusal is never sent again
        ((500, 500, 500), 3, "unavailable"),
    ],
)
def test_the_stack_client_retries_what_is_worth_retrying_and_signs_each_attempt_afresh(
    answers: tuple[int, ...], sent: int, outcome: str
) -> None:
    now = [1_800_000_000.0]
    dates: list[str] = []
    waits: list[float] = []
    replies = iter(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        dates.append(request.headers[TIMESTAMP_HEADER])
        return httpx.Response(next(replies), json={"filters": {}})

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    stack = StackClient(
        "https://stack.example/prod",
        b"k" * 32,
        httpx.Client(transport=httpx.MockTransport(handler)),
        clock=lambda: now[0],
        attempts=3,
        sleep=sleep,
    )
    if outcome == "ok":
        assert stack.settings() == {"filters": {}}
    else:
        with pytest.raises(StackRefused if outcome == "refused" else StackUnavailable):
            stack.settings()
    assert len(dates) == sent
    assert len(set(dates)) == sent  # each attempt carries its own timestamp
    assert waits == [1.0, 2.0, 4.0][: sent - 1] + ([4.0] if outcome == "unavailable" else [])
