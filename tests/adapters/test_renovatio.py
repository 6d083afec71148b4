"""Renovatio: the form-POST emulator and the date-window adapter that diffs rows by content hash."""

from __future__ import annotations

import itertools
import json
import re
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from werkzeug.test import Client, TestResponse

from clinicsync.adapters.renovatio.source import (
    RenovatioApi,
    RenovatioError,
    RenovatioRefused,
    RenovatioSource,
    parse_rn_date,
    parse_rn_time,
)
from clinicsync.application.poll import Poller
from clinicsync.domain.config import ClinicConfig, MisConnection
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.models import Appointment, AppointmentStatus
from clinicsync.domain.ports import ChangePage
from clinicsync_cli.memory_store import MemoryStore
from sandbox.emulators.base import Clock
from sandbox.emulators.renovatio import STATUSES, RenovatioEmulator
from sandbox.seed import CLINIC_TZ, SampleClinic, build_sample_clinic
from tests.helpers import demo_config

NOW = datetime(2025, 6, 10, 13, 0, tzinfo=CLINIC_TZ)
KEY = "rn-test-key-0123456789"
BASE = "https://rn.test/api/public"


# --- fixtures and helpers ---------------------------------------------------------------------


def rn_config(tz: str = "Europe/Moscow", statuses: dict[str, AppointmentStatus] | None = None) -> ClinicConfig:
    mis = MisConnection(kind="renovatio", base_url=BASE, secret_ref="clinicsync/test/mis", statuses=statuses or {})
    return demo_config().model_copy(update={"mis": mis, "timezone": tz})


@pytest.fixture(scope="module")
def clinic() -> SampleClinic:
    return build_sample_clinic(seed=11, patients=150, appointments=220, now=NOW)


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW.timestamp())


@pytest.fixture
def emu(clinic: SampleClinic, clock: Clock) -> RenovatioEmulator:
    return RenovatioEmulator(clinic, KEY, clock)


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def make_api(emu: RenovatioEmulator, key: str = KEY, sleeps: Sleeps | None = None) -> RenovatioApi:
    http = httpx.Client(transport=httpx.WSGITransport(app=emu))
    return RenovatioApi(BASE, key, http=http, sleep=sleeps if sleeps is not None else Sleeps())


def make_source(
    emu: RenovatioEmulator, config: ClinicConfig | None = None, key: str = KEY, **kw: Any
) -> RenovatioSource:
    return RenovatioSource(make_api(emu, key), config or rn_config(), clock=emu.clock.now, **kw)


def call(emu: RenovatioEmulator, method: str, via: str = "POST", **params: Any) -> TestResponse:
    params.setdefault("api_key", KEY)
    if params["api_key"] is None:
        del params["api_key"]
    client = Client(emu)
    if via == "GET":
        return client.get(f"/api/public/{method}", query_string=params)
    return client.post(f"/api/public/{method}", data=params)


def one_pass(source: RenovatioSource, cursor: Any = None) -> tuple[list[ChangePage], Any]:
    pages = []
    while True:
        page = source.fetch_changes(cursor)
        pages.append(page)
        cursor = json.loads(json.dumps(page.cursor))  # stored as JSON, like the poller's DynamoDB item
        if not page.more:
            return pages, cursor


def appointments(pages: list[ChangePage]) -> dict[str, Appointment]:
    return {a.mis_id: a for page in pages for c in page.changes for a in c.appointments}


def in_window(clinic: SampleClinic, first: date, last: date) -> set[str]:
    return {str(a.id) for a in clinic.appointments if first <= a.start.date() <= last}


TODAY = NOW.date()
FIRST, LAST = TODAY - timedelta(days=45), TODAY + timedelta(days=30)


# --- the API ----------------------------------------------------------------------------------


def test_envelope_and_api_key(emu: RenovatioEmulator) -> None:
    ok = call(emu, "getClinics")
    assert ok.status_code == 200 and ok.json["error"] == 0
    assert {c["title"] for c in ok.json["data"]} == {"Клиника на Тверской", "Клиника в Химках"}
    assert call(emu, "getClinics", via="GET").json == ok.json  # some clients send a query string
    for key, code in ((None, 401), ("wrong", 401)):
        refused = call(emu, "getClinics", api_key=key)
        assert refused.status_code == 200 and refused.json["error"] == 1
        assert refused.json["data"]["code"] == code and refused.json["data"]["desc"]
    assert call(emu, "getNothing").json["data"]["code"] == 404
    users = call(emu, "getUsers", clinic_id=2).json["data"]
    assert users and all(2 in u["clinic"] for u in users)
    assert emu.request_log[-1] == ("getUsers", 0, 200) and emu.request_log[-2] == ("getNothing", 1, 200)
    assert KEY not in repr(emu.request_log)


def test_get_appointments_window_and_patient_data(emu: RenovatioEmulator, clinic: SampleClinic) -> None:
    rows = call(emu, "getAppointments", date_from="03.06.2025", date_to="09.06.2025").json["data"]
    expected = sorted(
        (a.start, a.id) for a in clinic.appointments if date(2025, 6, 3) <= a.start.date() <= date(2025, 6, 9)
    )
    assert [r["id"] for r in rows] == [i for _, i in expected] and rows
    assert "patient_phone" not in rows[0]
    with_data = call(emu, "getAppointments", date_from="03.06.2025", date_to="09.06.2025", show_patient_data=1)
    row = with_data.json["data"][0]
    patient = clinic.patient(row["patient_id"])
    assert row["patient_name"].startswith(patient.surname) and row["patient_phone"] == (patient.phone or "")
    assert re.fullmatch(r"\d\d\.\d\d\.\d{4} \d\d:\d\d", row["time_start"]) and row["status"] in STATUSES
    assert row["services"][0]["count"] == 1
    narrow = call(emu, "getAppointments", time_start=row["time_start"], time_end=row["time_end"]).json["data"]
    assert row["id"] in {r["id"] for r in narrow}
    assert len(narrow) < len(rows)


@pytest.mark.parametrize(
    ("params", "desc"),
    [
        ({"date_from": "01.05.2025", "date_to": "10.06.2025"}, "31"),
        ({"date_from": "2025-06-01", "date_to": "10.06.2025"}, "date_from"),
        ({"date_from": "10.06.2025", "date_to": "01.06.2025"}, "раньше"),
        ({}, "date_from"),
        ({"date_from": "01.06.2025", "date_to": "02.06.2025", "status": "lost"}, "статус"),
    ],
)
def test_get_appointments_refuses_bad_windows(emu: RenovatioEmulator, params: dict[str, str], desc: str) -> None:
    with pytest.raises(RenovatioRefused, match=desc) as refused:
        make_api(emu).call("getAppointments", **params)
    assert refused.value.code == 400


def test_retries_server_errors_and_reports_refusals(emu: RenovatioEmulator) -> None:
    sleeps = Sleeps()
    api = make_api(emu, sleeps=sleeps)
    emu.faults.fail_next(2, status=503, method="getClinics")
    assert len(api.call("getClinics")) == 2 and sleeps == [0.5, 1.0]
    emu.faults.fail_next(4, status=502)
    with pytest.raises(RenovatioError, match=r"retries exhausted \(HTTP 502\)"):
        api.call("getClinics")
    emu.faults.error_next(code=500, desc="База недоступна", method="getPatient")
    with pytest.raises(RenovatioRefused, match="code 500"):
        api.call("getPatient", patient_id=1)
    with pytest.raises(RenovatioRefused) as wrong_key:
        make_api(emu, key="not-the-key").call("getClinics")
    assert wrong_key.value.code == 401 and "not-the-key" not in str(wrong_key.value)
    emu.faults.fail_next(1, status=404)
    with pytest.raises(RenovatioError, match="HTTP 404"):
        api.call("getClinics")
    with pytest.raises(RenovatioError, match="api_key"):
        RenovatioApi.from_secret(BASE, {})


# --- the window feed --------------------------------------------------------------------------


def test_a_pass_walks_the_window_in_chunks_and_returns_every_row_once(
    emu: RenovatioEmulator, clinic: SampleClinic
) -> None:
    pages, cursor = one_pass(make_source(emu))
    assert len(pages) == 11 and [p.more for p in pages] == [True] * 10 + [False]
    windows = [(parse_rn_date(a), parse_rn_date(b)) for a, b in emu.windows]
    assert windows[0][0] == FIRST and windows[-1][1] == LAST
    assert all((b - a).days <= 6 for a, b in windows)  # client-side batching: 7-day chunks
    assert all(nxt[0] == prev[1] + timedelta(days=1) for prev, nxt in itertools.pairwise(windows))
    got = appointments(pages)
    assert set(got) == in_window(clinic, FIRST, LAST) and sum(p.rejected for p in pages) == 0
    assert cursor["next"] is None and cursor["previous"] == {} and set(cursor["hashes"]) == set(got)
    assert all(re.fullmatch(r"[0-9a-f]{16}", h) for h in cursor["hashes"].values())


def test_an_unchanged_reread_returns_nothing_and_changes_return_only_their_rows(
    emu: RenovatioEmulator, clinic: SampleClinic
) -> None:
    source = make_source(emu)
    _, cursor = one_pass(source)
    patient_calls = emu.calls["getPatient"]
    pages, cursor = one_pass(source, cursor)
    assert appointments(pages) == {} and all(p.changes == [] for p in pages)
    assert emu.calls["getPatient"] == patient_calls  # nothing changed, nobody re-read

    future = [
        a for a in clinic.appointments if TODAY < a.start.date() <= LAST and emu.visit(a.id)["status"] == "upcoming"
    ]
    confirmed, moved_phone = future[0], future[1]
    emu.confirm(confirmed.id)
    emu.update_client(moved_phone.patient_id, mobile="+7 (999) 765-43-21")
    pages, cursor = one_pass(source, cursor)
    got = appointments(pages)
    with_new_phone = {str(a.id) for a in clinic.appointments
                      if a.patient_id == moved_phone.patient_id and FIRST <= a.start.date() <= LAST}  # fmt: skip
    assert set(got) == {str(confirmed.id)} | with_new_phone
    assert got[str(confirmed.id)].status is AppointmentStatus.CONFIRMED
    phones = {c.patient.phone for p in pages for c in p.changes if c.patient.mis_id == str(moved_phone.patient_id)}
    assert phones == {"+79997654321"}
    assert appointments(one_pass(source, cursor)[0]) == {}


def test_reschedule_is_the_same_appointment_with_a_new_start(emu: RenovatioEmulator, clinic: SampleClinic) -> None:
    source = make_source(emu)
    _, cursor = one_pass(source)
    visit = next(a for a in clinic.appointments if TODAY < a.start.date() < LAST - timedelta(days=10))
    before = emu.visit(visit.id)["start"]
    emu.reschedule(visit.id, before + timedelta(days=9, hours=2))
    pages, cursor = one_pass(source, cursor)
    (after,) = appointments(pages).values()
    assert after.mis_id == str(visit.id)
    assert after.starts_at == before + timedelta(days=9, hours=2) and after.status is AppointmentStatus.BOOKED

    emu.reschedule(visit.id, emu.at(60, "10:00"))  # out of the window: its hash is forgotten after the pass
    pages, cursor = one_pass(source, cursor)
    assert appointments(pages) == {} and str(visit.id) not in cursor["hashes"]


def test_statuses_map_and_an_unknown_status_is_rejected_until_mapped(
    emu: RenovatioEmulator, clinic: SampleClinic, captured_logs: Any
) -> None:
    expected = {"upcoming": "booked", "confirmed": "confirmed", "arrived": "arrived", "completed": "completed",
                "canceled": "cancelled", "refused": "no_show"}  # fmt: skip
    assert set(expected) == set(STATUSES)
    patient = clinic.patients[0].id
    doctor = clinic.doctors[0].id
    booked = {w: emu.book(patient, doctor, 1, emu.at(i + 1, "10:00"), status=w) for i, w in enumerate(STATUSES)}
    odd = emu.book(patient, doctor, 1, emu.at(9, "10:00"))
    emu.set_status(odd, "in_chair", unchecked=True)
    source = make_source(emu)
    pages, cursor = one_pass(source)
    got = {k: v.status.value for k, v in appointments(pages).items()}
    assert {str(booked[w]): got[str(booked[w])] for w in STATUSES} == {str(booked[w]): c for w, c in expected.items()}
    assert str(odd) not in got and sum(p.rejected for p in pages) == 1
    assert "in_chair" in captured_logs.text and str(odd) not in cursor["hashes"]

    pages, cursor = one_pass(source, cursor)  # reported again, not silently dropped
    assert sum(p.rejected for p in pages) == 1 and appointments(pages) == {}
    mapped = make_source(emu, rn_config(statuses={"in_chair": AppointmentStatus.ARRIVED}))
    pages, cursor = one_pass(mapped, cursor)
    assert [(k, v.status) for k, v in appointments(pages).items()] == [(str(odd), AppointmentStatus.ARRIVED)]
    assert sum(p.rejected for p in pages) == 0


def test_resync_rereads_the_window_with_no_hashes(emu: RenovatioEmulator, clinic: SampleClinic) -> None:
    source = make_source(emu)
    _, cursor = one_pass(source)
    upcoming = {a.patient_id for a in clinic.appointments if a.start.date() > TODAY}
    quiet = next(p for p in clinic.patients if p.id in upcoming and not (p.deny_calls or p.deny_data_processing))
    emu.update_client(quiet.id, refuse_call=1, refuse_sms=1, refuse_pd=1, refuse_adv=1)
    assert appointments(one_pass(source, cursor)[0]) == {}  # a card edit alone shows on the next resync

    resync = source.resync_cursor(3 * 24 * 3600, NOW.timestamp())
    assert resync == {"from": "07.06.2025", "to": "10.07.2025", "next": "07.06.2025", "hashes": {}, "previous": {}}
    pages, _ = one_pass(source, resync)
    assert set(appointments(pages)) == in_window(clinic, date(2025, 6, 7), date(2025, 7, 10))
    refused = next(c.patient for p in pages for c in p.changes if c.patient.mis_id == str(quiet.id))
    assert refused.consent.call_opt_out and refused.consent.sms_opt_out and refused.consent.marketing_opt_out
    assert not refused.consent.email_opt_out or quiet.deny_email
    assert refused.refused_data_processing is True


def test_refusal_flags_and_card_fields_reach_the_patient(emu: RenovatioEmulator, clinic: SampleClinic) -> None:
    pid = emu.add_client(
        "Сидорова", "Мария", third_name="Ивановна", gender=2, birth_date=date(1984, 3, 9),
        mobile="8916 000 11 22", email=" Maria@Example.org ", refuse_email=True, is_archive=True,
    )  # fmt: skip
    dms = emu.book(pid, clinic.doctors[0].id, 1, emu.at(1, "10:00"), insurance_policy="ДМС-0001234")
    anon = emu.book(pid, clinic.doctors[0].id, 2, emu.at(2, "10:00"), anonymous=True, price="3100.50", duration=45)
    pages, _ = one_pass(make_source(emu))
    (change,) = [c for p in pages for c in p.changes if c.patient.mis_id == str(pid)]
    p = change.patient
    assert (p.last_name, p.first_name, p.middle_name, p.sex, p.birth_date) == (
        "Сидорова", "Мария", "Ивановна", "f", "1984-03-09",
    )  # fmt: skip
    assert (p.phone, p.email, p.archived) == ("+79160001122", "maria@example.org", True)
    assert p.consent.email_opt_out and not (p.consent.sms_opt_out or p.consent.call_opt_out)
    by_id = {a.mis_id: a for a in change.appointments}
    assert by_id[str(dms)].is_dms and by_id[str(dms)].insurance_policy == "ДМС-0001234"
    assert by_id[str(anon)].anonymous and str(by_id[str(anon)].price) == "3100.50"
    assert by_id[str(anon)].duration_min == 45 and by_id[str(anon)].branch_id == "2"
    assert by_id[str(dms)].visit_category == "Первичный прием" and by_id[str(anon)].visit_category == "Повторный прием"


def test_a_patient_that_cannot_be_read_rejects_its_rows_and_they_come_back(
    emu: RenovatioEmulator, clinic: SampleClinic
) -> None:
    source = make_source(emu)
    _, cursor = one_pass(source)
    visit = next(a for a in clinic.appointments if TODAY < a.start.date() <= LAST)
    emu.confirm(visit.id)
    emu.faults.error_next(code=404, desc="Пациент не найден", method="getPatient")
    pages, cursor = one_pass(source, cursor)
    assert appointments(pages) == {} and sum(p.rejected for p in pages) == 1
    pages, cursor = one_pass(source, cursor)
    assert set(appointments(pages)) == {str(visit.id)}


# --- dates and time zones ---------------------------------------------------------------------


def test_dates_times_and_the_clinic_time_zone(emu: RenovatioEmulator, clinic: SampleClinic) -> None:
    ekb = ZoneInfo("Asia/Yekaterinburg")
    assert parse_rn_date("09.03.1984") == date(1984, 3, 9)
    assert parse_rn_time("12.06.2025 09:45", ekb) == datetime(2025, 6, 12, 9, 45, tzinfo=ekb)
    assert parse_rn_time("12.06.2025  09:45:30", ekb) == datetime(2025, 6, 12, 9, 45, 30, tzinfo=ekb)
    for bad in ("2025-06-12 09:45", "12.06.2025", "32.06.2025 09:45"):
        with pytest.raises(ValueError):
            parse_rn_time(bad, ekb)

    visit = emu.book(clinic.patients[2].id, clinic.doctors[1].id, 2, emu.at(2, "09:45"), duration=60)
    pages, _ = one_pass(make_source(emu, rn_config(tz="Asia/Yekaterinburg")))
    got = appointments(pages)[str(visit)]
    assert got.starts_at == datetime(2025, 6, 12, 9, 45, tzinfo=ekb)
    assert got.starts_at.astimezone(CLINIC_TZ).hour == 7  # the wall time is the clinic's, not Moscow's
    assert got.duration_min == 60 and got.booked_at == datetime(2025, 6, 10, 13, 0, tzinfo=ekb)
    assert got.version == int(NOW.timestamp())


def test_the_window_follows_the_clinic_calendar_day(clinic: SampleClinic) -> None:
    late = datetime(2025, 6, 9, 22, 30, tzinfo=ZoneInfo("UTC"))  # 01:30 on 10 June in Moscow
    emu = RenovatioEmulator(clinic, KEY, Clock(late.timestamp()))
    make_source(emu, rn_config(tz="Europe/Moscow")).fetch_changes(None)
    make_source(emu, rn_config(tz="Europe/London")).fetch_changes(None)
    assert emu.windows == [("26.04.2025", "02.05.2025"), ("25.04.2025", "01.05.2025")]


# --- the cursor -------------------------------------------------------------------------------


def test_hashes_are_keyed_and_carry_no_personal_data(emu: RenovatioEmulator, clinic: SampleClinic) -> None:
    _, cursor = one_pass(make_source(emu, chunk_days=31))
    _, other = one_pass(make_source(emu, key=KEY, chunk_days=31))
    assert cursor["hashes"] == other["hashes"]
    emu.api_key = "rotated-key"
    _, rotated = one_pass(make_source(emu, key="rotated-key", chunk_days=31))
    assert set(rotated["hashes"]) == set(cursor["hashes"])
    assert not set(rotated["hashes"].items()) & set(cursor["hashes"].items())
    text = json.dumps(cursor, ensure_ascii=False)
    assert not any(p.surname in text or (p.email and p.email in text) for p in clinic.patients)
    assert len(emu.windows) == 3 * 3  # 76 days in 31-day chunks


def test_a_pass_interrupted_by_the_deadline_resumes_where_it_stopped(
    emu: RenovatioEmulator, clinic: SampleClinic
) -> None:
    source = make_source(emu)
    first = source.fetch_changes(None)
    assert first.more and first.cursor["next"] == (FIRST + timedelta(days=7)).strftime("%d.%m.%Y")
    pages, _ = one_pass(source, first.cursor)
    assert set(appointments([first, *pages])) == in_window(clinic, FIRST, LAST)
    assert len(emu.windows) == 11


def test_chunk_size_is_bounded_by_the_api_limit(emu: RenovatioEmulator) -> None:
    with pytest.raises(ValueError, match="chunk_days"):
        make_source(emu, chunk_days=32)


# --- with the real poller ---------------------------------------------------------------------


class FakeQueue:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, messages: Any) -> None:
        self.sent.extend(messages)


def test_poller_sends_each_change_once(emu: RenovatioEmulator, clinic: SampleClinic) -> None:
    source, store = make_source(emu), MemoryStore()

    def poll() -> tuple[Any, FakeQueue]:
        queue = FakeQueue()
        poller = Poller(rn_config(), source, store, queue, KeyedHasher(b"k" * 32))  # type: ignore[arg-type]
        return poller.poll(lambda: 900_000), queue

    report, queue = poll()
    assert report.pages == 11 and report.appointments == len(in_window(clinic, FIRST, LAST))
    report, queue = poll()
    assert (report.pages, report.appointments, queue.sent) == (11, 0, [])
    visit = next(a for a in clinic.appointments if TODAY < a.start.date() <= LAST)
    emu.cancel(visit.id)
    report, queue = poll()
    assert report.appointments == 1
    (message,) = queue.sent
    assert message.changes[0].appointments[0].status is AppointmentStatus.CANCELLED
