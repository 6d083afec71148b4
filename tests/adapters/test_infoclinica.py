"""InfoClinica: the XML emulator and the change-queue adapter, over loopback mutual TLS where it matters."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from defusedxml.ElementTree import fromstring as safe_fromstring
from werkzeug.test import Client, TestResponse

from clinicsync.adapters.infoclinica.api import (
    InfoClinicaApi,
    InfoClinicaError,
    InfoClinicaRefused,
    UnsafeXml,
    child,
    children,
    parse_xml,
    record,
    text_at,
)
from clinicsync.adapters.infoclinica.source import InfoClinicaSource, parse_ic_date, parse_ic_datetime
from clinicsync.application.poll import Poller
from clinicsync.domain.config import ClinicConfig, MisConnection
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.models import AppointmentStatus, PatientChanges
from clinicsync.domain.ports import ChangePage
from clinicsync_cli.memory_store import MemoryStore
from sandbox.emulators.base import Clock
from sandbox.emulators.infoclinica import NS, STATUSES, InfoClinicaEmulator, serve_tls
from sandbox.seed import CLINIC_TZ, SampleClinic, build_sample_clinic
from sandbox.tls import LoopbackPki, loopback_pki
from tests.helpers import demo_config

NOW = datetime(2025, 6, 10, 13, 0, tzinfo=CLINIC_TZ)
URL = "https://ic.test/api/xml"

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<ACK xmlns="http://sdsys.ru/"><MSA><MSA.1>AA</MSA.1><MSA.3>&lol9;</MSA.3></MSA></ACK>"""

XXE = b"""<?xml version="1.0"?>
<!DOCTYPE ACK [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<ACK xmlns="http://sdsys.ru/"><MSA><MSA.1>AA</MSA.1><MSA.3>&xxe;</MSA.3></MSA></ACK>"""


# --- fixtures and helpers ---------------------------------------------------------------------


def ic_config(tz: str = "Europe/Moscow", statuses: dict[str, AppointmentStatus] | None = None) -> ClinicConfig:
    mis = MisConnection(kind="infoclinica", base_url=URL, secret_ref="clinicsync/test/mis", statuses=statuses or {})
    return demo_config().model_copy(update={"mis": mis, "timezone": tz})


@pytest.fixture(scope="module")
def clinic() -> SampleClinic:
    return build_sample_clinic(seed=7, patients=120, appointments=160, now=NOW)


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW.timestamp())


@pytest.fixture
def emu(clinic: SampleClinic, clock: Clock) -> InfoClinicaEmulator:
    return InfoClinicaEmulator(clinic, clock)


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def make_api(emu: InfoClinicaEmulator, sleeps: Sleeps | None = None, **kw: Any) -> InfoClinicaApi:
    http = httpx.Client(transport=httpx.WSGITransport(app=emu))
    return InfoClinicaApi(URL, http, clock=emu.clock.now, sleep=sleeps if sleeps is not None else Sleeps(), **kw)


def make_source(emu: InfoClinicaEmulator, config: ClinicConfig | None = None, **kw: Any) -> InfoClinicaSource:
    return InfoClinicaSource(make_api(emu, **kw), config or ic_config())


def envelope(method: str, body: str = "", *, msg_id: str = "m-1", msg2: str | None = None, ns: str = NS,
             ts: str = "20250610130000", extra_msh: str = "") -> str:  # fmt: skip
    return (
        f'<WEB_{method} xmlns="{ns}"><MSH><MSH.7><TS.1>{ts}</TS.1></MSH.7>'
        f"<MSH.9><MSG.1>WEB</MSG.1><MSG.2>{msg2 or method}</MSG.2></MSH.9>"
        f"<MSH.10>{msg_id}</MSH.10><MSH.18>UTF-8</MSH.18>{extra_msh}</MSH>"
        f"<{method}_IN>{body}</{method}_IN></WEB_{method}>"
    )


def post(emu: InfoClinicaEmulator, xml: str | bytes, path: str = "/api/xml") -> TestResponse:
    data = xml.encode() if isinstance(xml, str) else xml
    return Client(emu).post(path, data=data, content_type="text/xml; charset=utf-8")


def ack(response: TestResponse) -> Any:
    return safe_fromstring(response.data, forbid_dtd=True)


def out_of(root: Any, method: str) -> Any:
    out = child(root, f"{method}_OUT")
    assert out is not None, method
    return out


def drain(source: InfoClinicaSource, cursor: Any = None, ack_pages: bool = True) -> list[ChangePage]:
    pages = []
    while True:
        page = source.fetch_changes(cursor)
        pages.append(page)
        if ack_pages:
            source.acknowledge(page)
        cursor = page.cursor
        if not page.more:
            return pages


def appointments(pages: list[ChangePage]) -> dict[str, Any]:
    return {a.mis_id: a for page in pages for c in page.changes for a in c.appointments}


def patient_changes(page: ChangePage, pcode: int) -> PatientChanges:
    return next(c for c in page.changes if c.patient.mis_id == str(pcode))


# --- envelope ---------------------------------------------------------------------------------


def test_ack_echoes_the_message_id_and_carries_spresult(emu: InfoClinicaEmulator) -> None:
    resp = post(emu, envelope("GET_FILIAL_LIST", msg_id="abc123"))
    assert resp.status_code == 200 and resp.mimetype == "text/xml"
    root = ack(resp)
    assert root.tag == f"{{{NS}}}ACK"
    assert text_at(root, "MSA", "MSA.1") == "AA"
    assert text_at(root, "MSA", "MSA.2") == "abc123"
    assert text_at(root, "MSH", "MSH.9", "MSG.2") == "GET_FILIAL_LIST"
    assert text_at(root, "MSH", "MSH.7", "TS.1") == "20250610130000"  # the emulator's clock, Moscow time
    out = out_of(root, "GET_FILIAL_LIST")
    assert text_at(out, "SPRESULT") == "1"
    names = {record(el)["FNAME"] for el in children(out, "FILIAL_INFO")}
    assert names == {"Клиника на Тверской", "Клиника в Химках"}


@pytest.mark.parametrize(
    ("xml", "status", "error"),
    [
        (envelope("GET_FILIAL_LIST", ns="http://example.org/"), 200, "namespace"),
        (envelope("GET_FILIAL_LIST", msg2="SCHEDULE_LIST"), 200, "MSH.9"),
        (envelope("GET_FILIAL_LIST", msg_id=""), 200, "MSH.10"),
        (envelope("GET_FILIAL_LIST", ts="10.06.2025"), 200, "TS.1"),
        (envelope("GET_FILIAL_LIST", extra_msh="<MSH.99>first</MSH.99>"), 200, "MSH.99"),
        (envelope("PRICE_LIST"), 200, "not supported"),
        ('<WEB_CLIENT_INFO xmlns="http://sdsys.ru/"><MSH/></WEB_CLIENT_INFO>', 200, "MSH.9"),
        ("<WEB_CLIENT_INFO", 400, "malformed"),
        (BILLION_LAUGHS, 400, "unsafe XML"),
    ],
)
def test_envelope_errors_answer_ae(emu: InfoClinicaEmulator, xml: str | bytes, status: int, error: str) -> None:
    resp = post(emu, xml)
    assert resp.status_code == status
    root = ack(resp)
    assert text_at(root, "MSA", "MSA.1") == "AE"
    assert error in (text_at(root, "MSA", "MSA.3") or "")
    assert child(root, "GET_FILIAL_LIST_OUT") is None


def test_only_post_to_api_xml(emu: InfoClinicaEmulator) -> None:
    assert Client(emu).get("/api/xml").status_code == 405
    assert post(emu, envelope("GET_FILIAL_LIST"), path="/api/json").status_code == 404


def test_adapter_builds_the_envelope(emu: InfoClinicaEmulator) -> None:
    api = make_api(emu, filial=2, system_id="crm-bridge")
    root = parse_xml(api.envelope("SCHEDULE_INFO", "id-7", [("SCHEDID", 500003), ("NOTE", "a<b&c")]).encode())
    assert root.tag == f"{{{NS}}}WEB_SCHEDULE_INFO"
    assert text_at(root, "MSH", "MSH.3") == "crm-bridge"
    assert text_at(root, "MSH", "MSH.7", "TS.1") == NOW.astimezone(ZoneInfo("UTC")).strftime("%Y%m%d%H%M%S")
    assert (text_at(root, "MSH", "MSH.9", "MSG.1"), text_at(root, "MSH", "MSH.9", "MSG.2")) == ("WEB", "SCHEDULE_INFO")
    assert (text_at(root, "MSH", "MSH.10"), text_at(root, "MSH", "MSH.18"), text_at(root, "MSH", "MSH.99")) == (
        "id-7", "UTF-8", "2",
    )  # fmt: skip
    assert text_at(root, "SCHEDULE_INFO_IN", "SCHEDID") == "500003"
    assert text_at(root, "SCHEDULE_INFO_IN", "NOTE") == "a<b&c"  # escaped on the way out
    assert "<MSH.99>" not in make_api(emu).envelope("SCHEDULE_INFO", "id-8")
    with pytest.raises(ValueError):
        api.envelope("SCHEDULE_INFO", "x", [("bad tag", "1")])


def test_adapter_checks_the_acknowledgement(emu: InfoClinicaEmulator, clinic: SampleClinic) -> None:
    api = make_api(emu)
    out = api.call("SCHEDULE_INFO", [("SCHEDID", clinic.appointments[0].id)])
    assert record(child(out, "SCHEDULEREC"))["SCHEDID"] == str(clinic.appointments[0].id)  # type: ignore[arg-type]
    stale = post(emu, envelope("GET_FILIAL_LIST", msg_id="somebody-else")).data
    emu.faults.respond_next(stale, method="GET_FILIAL_LIST")
    with pytest.raises(InfoClinicaError, match="acknowledges another message"):
        api.call("GET_FILIAL_LIST")
    with pytest.raises(InfoClinicaRefused) as refused:
        api.call("SCHEDULE_INFO", [("SCHEDID", 1)])
    assert refused.value.spresult == 0 and refused.value.comment == "Запись не найдена"
    assert "Запись" not in str(refused.value)  # free text stays out of log lines
    emu.faults.respond_next(b"<html>oops</html>", method="GET_FILIAL_LIST")
    with pytest.raises(InfoClinicaError, match="not an ACK"):
        api.call("GET_FILIAL_LIST")


# --- paging -----------------------------------------------------------------------------------


def schedule_list(emu: InfoClinicaEmulator, first: int | None, last: int | None, bdate: str, fdate: str,
                  extra_msh: str = "") -> Any:  # fmt: skip
    rows = (f"<FIRSTROW>{first}</FIRSTROW>" if first else "") + (f"<LASTROW>{last}</LASTROW>" if last else "")
    body = f"<BDATE>{bdate}</BDATE><FDATE>{fdate}</FDATE>{rows}"
    return out_of(ack(post(emu, envelope("SCHEDULE_LIST", body, extra_msh=extra_msh))), "SCHEDULE_LIST")


def test_schedule_list_pages_by_rows(emu: InfoClinicaEmulator, clinic: SampleClinic) -> None:
    first_day, last_day = NOW.date() - timedelta(days=20), NOW.date() + timedelta(days=10)
    expected = sorted(
        (a.start, a.id) for a in clinic.appointments if first_day <= a.start.date() <= last_day
    )  # fmt: skip
    assert len(expected) > 25
    bdate, fdate = first_day.strftime("%Y%m%d"), last_day.strftime("%Y%m%d")
    page1 = schedule_list(emu, 1, 10, bdate, fdate)
    page2 = schedule_list(emu, 11, 20, bdate, fdate)
    assert text_at(page1, "RECORDSDATA", "ITEMSNUMBER") == str(len(expected))
    ids1 = [int(record(el)["SCHEDID"]) for el in children(page1, "SCHEDULEREC")]
    ids2 = [int(record(el)["SCHEDID"]) for el in children(page2, "SCHEDULEREC")]
    assert ids1 + ids2 == [i for _, i in expected[:20]]
    tail = schedule_list(emu, len(expected) - 2, len(expected) + 50, bdate, fdate)
    assert len(list(children(tail, "SCHEDULEREC"))) == 3
    default = schedule_list(emu, None, None, bdate, fdate)
    assert len(list(children(default, "SCHEDULEREC"))) == min(100, len(expected))
    only_khimki = schedule_list(emu, 1, 500, bdate, fdate, extra_msh="<MSH.99>2</MSH.99>")
    assert {record(el)["FILIAL"] for el in children(only_khimki, "SCHEDULEREC")} == {"2"}

    rec = record(next(children(page1, "SCHEDULEREC")))
    start = expected[0][0]
    assert (rec["WORKDATE"], rec["BHOUR"], rec["BMIN"]) == (
        start.strftime("%Y%m%d"),
        str(start.hour),
        str(start.minute),
    )
    assert rec["SCHEDSTATUS"] in STATUSES
    assert parse_ic_datetime(rec["MODIFYDATE"], CLINIC_TZ) <= NOW


@pytest.mark.parametrize(
    ("first", "last", "bdate", "fdate"),
    [(1, 501, "20250601", "20250610"), (5, 4, "20250601", "20250610"), (1, 10, "20250610", "20250601"),
     (1, 10, "10.06.2025", "20250610"), (0, 10, "20250601", "20250610")],
)  # fmt: skip
def test_schedule_list_refuses_bad_input(
    emu: InfoClinicaEmulator, first: int, last: int, bdate: str, fdate: str
) -> None:
    api = make_api(emu)
    fields: list[tuple[str, Any]] = [("BDATE", bdate), ("FDATE", fdate), ("FIRSTROW", first), ("LASTROW", last)]
    with pytest.raises(InfoClinicaRefused) as refused:
        api.call("SCHEDULE_LIST", fields)
    assert refused.value.spresult == -1


def test_doctor_list_is_paged_and_branch_scoped(emu: InfoClinicaEmulator, clinic: SampleClinic) -> None:
    out = out_of(ack(post(emu, envelope("GET_DOCTOR_LIST", "<FIRSTROW>1</FIRSTROW><LASTROW>3</LASTROW>"))),
                 "GET_DOCTOR_LIST")  # fmt: skip
    assert len(list(children(out, "DOCTOR_INFO"))) == 3
    assert text_at(out, "RECORDSDATA", "ITEMSNUMBER") == str(len(clinic.doctors))
    khimki = out_of(ack(post(emu, envelope("GET_DOCTOR_LIST", "", extra_msh="<MSH.99>2</MSH.99>"))), "GET_DOCTOR_LIST")
    codes = {int(record(el)["DCODE"]) for el in children(khimki, "DOCTOR_INFO")}
    assert codes == {d.id for d in clinic.doctors if 2 in d.branch_ids}


# --- the change queue -------------------------------------------------------------------------


def change_ids(emu: InfoClinicaEmulator, method: str = "SCHEDULE_CHANGE_LIST") -> list[int]:
    out = out_of(ack(post(emu, envelope(method))), method)
    block = "CHANGE_INFO" if method == "SCHEDULE_CHANGE_LIST" else "CLIENT_CHANGE_INFO"
    return [int(record(el)["CHANGEID"]) for el in children(out, block)]


def accept(emu: InfoClinicaEmulator, ids: list[int]) -> Any:
    blocks = "".join(f"<CHANGE_INFO><CHANGEID>{i}</CHANGEID></CHANGE_INFO>" for i in ids)
    return out_of(ack(post(emu, envelope("SCHEDULE_CHANGE_ACCEPT", blocks))), "SCHEDULE_CHANGE_ACCEPT")


def test_queue_returns_unacknowledged_changes_until_accepted(emu: InfoClinicaEmulator, clinic: SampleClinic) -> None:
    assert change_ids(emu) == []
    visit = emu.book(clinic.patients[0].id, clinic.doctors[0].id, 1, emu.at(2, "10:00"))
    emu.confirm(visit)
    first = change_ids(emu)
    assert len(first) == 2
    assert change_ids(emu) == first  # reading does not consume
    assert text_at(accept(emu, [first[0]]), "SPRESULT") == "1"
    assert change_ids(emu) == [first[1]]
    emu.arrive(visit)
    pending = change_ids(emu)
    assert pending[0] == first[1] and len(pending) == 2
    assert text_at(accept(emu, [first[0], *pending]), "ACCEPTED") == "2"  # an accepted id again is a no-op
    assert change_ids(emu) == []
    refused = accept(emu, [])
    assert text_at(refused, "SPRESULT") == "-99"


def test_source_gets_unacknowledged_changes_again(emu: InfoClinicaEmulator, clinic: SampleClinic) -> None:
    source = make_source(emu)
    patient = clinic.patients[5]
    visit = emu.book(patient.id, clinic.doctors[2].id, 1, emu.at(3, "11:15"))
    first = source.fetch_changes(None)
    assert [a.mis_id for c in first.changes for a in c.appointments] == [str(visit)]
    assert first.cursor["mode"] == "queue" and len(first.cursor["ack"]["schedule"]) == 1 and not first.more
    again = source.fetch_changes(first.cursor)  # the poller crashed before acknowledging
    assert [a.mis_id for c in again.changes for a in c.appointments] == [str(visit)]
    assert again.cursor["ack"] == first.cursor["ack"]

    emu.clock.advance(60)
    emu.cancel(visit)  # a change made after the read and before the acknowledgement
    source.acknowledge(again)
    left = emu.pending_changes()
    assert [c["CHANGEOP"] for c in left] == [2] and left[0]["CHANGEID"] not in again.cursor["ack"]["schedule"]
    latest = source.fetch_changes(again.cursor)
    (appointment,) = [a for c in latest.changes for a in c.appointments]
    assert appointment.status is AppointmentStatus.CANCELLED
    source.acknowledge(latest)
    assert source.fetch_changes(latest.cursor).changes == []
    assert emu.pending_changes() == [] and emu.pending_changes("clients") == []


def test_queue_is_read_in_batches_with_more(clinic: SampleClinic, clock: Clock) -> None:
    emu = InfoClinicaEmulator(clinic, clock, preload_queue=True, change_batch=50)
    source = make_source(emu)
    pages = drain(source)
    assert [p.more for p in pages] == [True, True, True, False]
    assert [len(p.cursor["ack"]["schedule"]) for p in pages] == [50, 50, 50, 10]
    assert set(appointments(pages)) == {str(a.id) for a in clinic.appointments}
    assert emu.pending_changes() == []
    assert emu.calls["SCHEDULE_INFO"] == len(clinic.appointments)
    assert emu.calls["SCHEDULE_CHANGE_ACCEPT"] == 4
    for page in pages:  # one change set per patient per page
        ids = [c.patient.mis_id for c in page.changes]
        assert len(ids) == len(set(ids))


def test_a_booking_changed_twice_is_read_once_and_both_entries_acknowledged(
    emu: InfoClinicaEmulator, clinic: SampleClinic
) -> None:
    source = make_source(emu)
    visit = clinic.appointments[-1].id
    emu.confirm(visit)
    emu.clock.advance(5)
    emu.reschedule(visit, emu.at(4, "16:30"))
    page = source.fetch_changes(None)
    assert emu.calls["SCHEDULE_INFO"] == 1
    assert len(page.cursor["ack"]["schedule"]) == 2
    source.acknowledge(page)
    assert emu.pending_changes() == []


# --- with the real poller ---------------------------------------------------------------------


def _lease_free(store: MemoryStore) -> bool:
    """Nobody holds the poll lease (the poller's would outlive time 0)."""
    return store.acquire_lease("poll:infoclinica", "probe", 1, now=0)


class FakeQueue:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[Any] = []

    def send(self, messages: Any) -> None:
        if self.fail:
            raise RuntimeError("SQS unavailable")
        self.sent.extend(messages)


def poller(source: InfoClinicaSource, store: MemoryStore, queue: FakeQueue) -> Poller:
    return Poller(ic_config(), source, store, queue, KeyedHasher(b"k" * 32))  # type: ignore[arg-type]


def test_poller_acknowledges_only_after_the_changes_are_enqueued(
    emu: InfoClinicaEmulator, clinic: SampleClinic
) -> None:
    source, store = make_source(emu), MemoryStore()
    visit = emu.book(clinic.patients[1].id, clinic.doctors[0].id, 1, emu.at(1, "09:00"))
    with pytest.raises(RuntimeError, match="SQS"):
        poller(source, store, FakeQueue(fail=True)).poll(lambda: 900_000)
    assert len(emu.pending_changes()) == 1 and store.get_cursor("infoclinica") is None and _lease_free(store)

    queue = FakeQueue()
    report = poller(source, store, queue).poll(lambda: 900_000)
    assert (report.appointments, report.rejected) == (1, 0)
    assert [a.mis_id for m in queue.sent for c in m.changes for a in c.appointments] == [str(visit)]
    assert emu.pending_changes() == []
    assert (store.get_cursor("infoclinica") or {})["mode"] == "queue"
    assert poller(source, store, FakeQueue()).poll(lambda: 900_000).messages == 0


def test_hostile_xml_is_refused_and_the_poller_recovers(emu: InfoClinicaEmulator, clinic: SampleClinic) -> None:
    source, store, queue = make_source(emu), MemoryStore(), FakeQueue()
    emu.update_client(clinic.patients[2].id, REFUSESMS=True)
    for payload in (BILLION_LAUGHS, XXE):
        emu.faults.respond_next(payload, method="CLIENTS_CHANGE_LIST")
        started = time.monotonic()
        with pytest.raises(UnsafeXml, match=r"CLIENTS_CHANGE_LIST: unsafe XML refused \((DTD|Entities)Forbidden\)"):
            poller(source, store, queue).poll(lambda: 900_000)
        assert time.monotonic() - started < 2
        assert _lease_free(store) and store.get_cursor("infoclinica") is None and queue.sent == []
    report = poller(source, store, queue).poll(lambda: 900_000)
    assert report.patients == 1 and emu.pending_changes("clients") == []
    (message,) = queue.sent
    assert message.changes[0].patient.consent.sms_opt_out is True


def test_parse_xml_refuses_entities_before_expanding_them() -> None:
    for payload in (BILLION_LAUGHS, XXE, b'<!DOCTYPE ACK SYSTEM "http://127.0.0.1:9/evil.dtd"><ACK/>'):
        with pytest.raises(UnsafeXml):
            parse_xml(payload)
    with pytest.raises(InfoClinicaError, match="malformed"):
        parse_xml(b"<ACK><MSA></ACK>")
    assert parse_xml(b'<ACK xmlns="http://sdsys.ru/"><X>1</X></ACK>').tag == f"{{{NS}}}ACK"


# --- translation: statuses, dates, flags ------------------------------------------------------


def test_every_status_word_maps_and_an_unknown_one_is_rejected(
    emu: InfoClinicaEmulator, clinic: SampleClinic, captured_logs: Any
) -> None:
    expected = {
        "reserved": "booked", "booked": "booked", "confirmed": "confirmed", "arrived": "arrived",
        "visited": "completed", "paid": "completed", "cancelled": "cancelled", "removed": "cancelled",
        "noshow": "no_show",
    }  # fmt: skip
    assert set(expected) == set(STATUSES)
    visits = {}
    for i, word in enumerate(STATUSES):
        visits[word] = emu.book(clinic.patients[i].id, clinic.doctors[0].id, 1, emu.at(1 + i, "10:00"), status=word)
    odd = emu.book(clinic.patients[20].id, clinic.doctors[0].id, 1, emu.at(12, "10:00"))
    emu.set_status(odd, "на_приёме", unchecked=True)
    source = make_source(emu)
    page = source.fetch_changes(None)
    got = {a.mis_id: a.status.value for c in page.changes for a in c.appointments}
    assert got == {str(visits[w]): canonical for w, canonical in expected.items()}
    assert page.rejected == 1 and str(odd) not in got
    assert "на_приёме" in captured_logs.text and str(odd) in captured_logs.text
    source.acknowledge(page)
    assert emu.pending_changes() == []  # a rejected change cannot block the queue

    mapped = make_source(emu, ic_config(statuses={"на_приёме": AppointmentStatus.ARRIVED}))
    emu.set_status(odd, "на_приёме", unchecked=True)
    again = mapped.fetch_changes(None)
    assert [(a.mis_id, a.status) for c in again.changes for a in c.appointments] == [
        (str(odd), AppointmentStatus.ARRIVED)
    ]
    assert again.rejected == 0


def test_dates_in_both_formats() -> None:
    assert parse_ic_date("20250610") == parse_ic_date("10.06.2025") == date(2025, 6, 10)
    ekb = ZoneInfo("Asia/Yekaterinburg")
    assert parse_ic_datetime("10.06.2025 09:30:15", ekb) == datetime(2025, 6, 10, 9, 30, 15, tzinfo=ekb)
    assert parse_ic_datetime("10.06.2025 9:30", ekb) == datetime(2025, 6, 10, 9, 30, tzinfo=ekb)
    assert parse_ic_datetime("20250610093015", ekb) == parse_ic_datetime("10.06.2025 09:30:15", ekb)
    assert parse_ic_datetime("20250610", ekb) == datetime(2025, 6, 10, tzinfo=ekb)
    for bad in ("2025-06-10", "10/06/2025", "31.02.2025", "20251310", ""):
        with pytest.raises(ValueError):
            parse_ic_date(bad)
    with pytest.raises(ValueError):
        parse_ic_datetime("10.06.2025T09:30", ekb)


@pytest.mark.parametrize("tz", ["Europe/Moscow", "Asia/Yekaterinburg", "Europe/Kaliningrad"])
def test_times_are_read_in_the_clinic_time_zone(emu: InfoClinicaEmulator, clinic: SampleClinic, tz: str) -> None:
    visit = emu.book(clinic.patients[3].id, clinic.doctors[1].id, 2, emu.at(2, "09:45"), duration=60)
    raw = record(child(make_api(emu).call("SCHEDULE_INFO", [("SCHEDID", visit)]), "SCHEDULEREC"))  # type: ignore[arg-type]
    page = make_source(emu, ic_config(tz=tz)).fetch_changes(None)
    (appointment,) = [a for c in page.changes for a in c.appointments]
    zone = ZoneInfo(tz)
    local = (NOW + timedelta(days=2)).date()
    assert appointment.starts_at == datetime(local.year, local.month, local.day, 9, 45, tzinfo=zone)
    assert appointment.starts_at.utcoffset() == datetime(2025, 6, 12, tzinfo=zone).utcoffset()
    assert appointment.duration_min == 60
    assert raw["WORKDATE"] == local.strftime("%Y%m%d") and raw["CREATEDATE"] == "10.06.2025 13:00:00"
    assert appointment.booked_at == datetime(2025, 6, 10, 13, 0, tzinfo=zone)
    assert appointment.version == int(datetime(2025, 6, 10, 13, 0, tzinfo=zone).timestamp())


def test_reschedule_is_the_same_appointment_with_a_new_start(emu: InfoClinicaEmulator, clinic: SampleClinic) -> None:
    source = make_source(emu)
    visit = emu.book(clinic.patients[4].id, clinic.doctors[3].id, 1, emu.at(1, "12:00"))
    emu.confirm(visit)
    first = source.fetch_changes(None)
    source.acknowledge(first)
    (before,) = [a for c in first.changes for a in c.appointments]
    emu.clock.advance(30)
    emu.reschedule(visit, emu.at(5, "17:30"))
    page = source.fetch_changes(first.cursor)
    (after,) = [a for c in page.changes for a in c.appointments]
    assert after.mis_id == before.mis_id == str(visit)
    assert (before.starts_at.day, before.starts_at.hour) != (after.starts_at.day, after.starts_at.hour)
    assert after.starts_at == emu.at(5, "17:30") and after.status is AppointmentStatus.BOOKED
    assert after.version > before.version


def test_refusal_flags_land_in_consent(emu: InfoClinicaEmulator, clinic: SampleClinic) -> None:
    calm, other = [
        p for p in clinic.patients
        if not (p.deny_calls or p.deny_sms_dispatches or p.deny_sms_notifications or p.deny_data_processing)
    ][:2]  # fmt: skip
    emu.update_client(calm.id, REFUSECALL=True)
    emu.update_client(other.id, REFUSESMS=True, REFUSEPD=True, PPHONE="8 (916) 555-12-34")
    source = make_source(emu)
    page = source.fetch_changes(None)
    first = patient_changes(page, calm.id)
    assert first.appointments == ()  # a card change without any booking change still reaches the sync
    assert (first.patient.consent.call_opt_out, first.patient.consent.sms_opt_out) == (True, False)
    second = patient_changes(page, other.id).patient
    assert second.consent.sms_opt_out and not second.consent.call_opt_out
    assert second.refused_data_processing is True and second.phone == "+79165551234"
    assert len(page.cursor["ack"]["clients"]) == 2
    source.acknowledge(page)
    assert emu.pending_changes("clients") == []


def test_card_fields_dms_and_anonymous_visits(emu: InfoClinicaEmulator, clinic: SampleClinic) -> None:
    pcode = emu.add_client("Сидорова", "Мария", midname="Ивановна", gender=2, bdate=date(1984, 3, 9),
                           phone="8916 000 11 22", email=" Maria@Example.org ")  # fmt: skip
    dms = emu.book(pcode, clinic.doctors[0].id, 1, emu.at(1, "10:00"), insurance_policy="ДМС-0001234")
    anon = emu.book(pcode, clinic.doctors[0].id, 1, emu.at(2, "10:00"), anonymous=True, price="3100.50")
    page = make_source(emu).fetch_changes(None)
    change = patient_changes(page, pcode)
    p = change.patient
    assert (p.last_name, p.first_name, p.middle_name, p.sex, p.birth_date) == (
        "Сидорова", "Мария", "Ивановна", "f", "1984-03-09",
    )  # fmt: skip
    assert (p.phone, p.email) == ("+79160001122", "maria@example.org")
    by_id = {a.mis_id: a for a in change.appointments}
    assert by_id[str(dms)].is_dms and by_id[str(dms)].insurance_policy == "ДМС-0001234"
    assert by_id[str(anon)].anonymous and str(by_id[str(anon)].price) == "3100.50"
    assert by_id[str(dms)].doctor_name == " ".join(
        (clinic.doctors[0].surname, clinic.doctors[0].name, clinic.doctors[0].patronymic)
    )


# --- resync -----------------------------------------------------------------------------------


def test_resync_reads_the_date_window_without_touching_the_queue(
    emu: InfoClinicaEmulator, clinic: SampleClinic
) -> None:
    source = make_source(emu)
    emu.confirm(clinic.appointments[0].id)
    cursor = source.resync_cursor(7 * 24 * 3600, NOW.timestamp())
    assert cursor == {"mode": "window", "bdate": "20250603", "fdate": "20250809", "row": 1}
    pages = drain(source, cursor, ack_pages=False)
    first_day, last_day = date(2025, 6, 3), date(2025, 8, 9)
    expected = {str(a.id) for a in clinic.appointments if first_day <= a.start.date() <= last_day}
    assert set(appointments(pages)) == expected
    assert len(pages) == -(-len(expected) // 100) and pages[-1].more is False
    assert all("ack" not in p.cursor for p in pages)
    assert len(emu.pending_changes()) == 1 and emu.calls["SCHEDULE_CHANGE_LIST"] == 0
    patients = {c.patient.mis_id for p in pages for c in p.changes}
    assert emu.calls["CLIENT_INFO"] >= len(patients)


# --- transport --------------------------------------------------------------------------------


def test_retries_5xx_then_gives_up(emu: InfoClinicaEmulator, clinic: SampleClinic, sleeps: Sleeps) -> None:
    source = make_source(emu, sleeps=sleeps)
    emu.book(clinic.patients[0].id, clinic.doctors[0].id, 1, emu.at(1, "10:00"))
    emu.faults.fail_next(2, status=503, method="SCHEDULE_CHANGE_LIST")
    assert len(source.fetch_changes(None).changes) == 1
    assert sleeps == [0.5, 1.0]
    emu.faults.fail_next(4, status=502, method="SCHEDULE_INFO")
    with pytest.raises(InfoClinicaError, match=r"SCHEDULE_INFO: retries exhausted \(HTTP 502\)"):
        source.fetch_changes(None)
    emu.faults.fail_next(1, status=403)
    with pytest.raises(InfoClinicaError, match="HTTP 403"):
        source.fetch_changes(None)


def test_request_log_has_no_personal_data(emu: InfoClinicaEmulator, clinic: SampleClinic) -> None:
    emu.update_client(clinic.patients[0].id, PPHONE="+7 916 111-22-33")
    make_source(emu).fetch_changes(None)
    assert [m for m, _, _ in emu.request_log] == ["SCHEDULE_CHANGE_LIST", "CLIENTS_CHANGE_LIST", "CLIENT_INFO"]
    assert all(code == "AA" and status == 200 for _, code, status in emu.request_log)
    assert emu.request_count == 3 and emu.calls["CLIENT_INFO"] == 1
    text = repr(emu.request_log)
    assert "916" not in text and clinic.patients[0].surname not in text


# --- mutual TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki() -> LoopbackPki:
    return loopback_pki()


@pytest.fixture(scope="module")
def stranger() -> LoopbackPki:
    return loopback_pki("another clinic's CA", client_name="stranger")


@pytest.fixture
def served(emu: InfoClinicaEmulator, pki: LoopbackPki) -> Iterator[str]:
    with serve_tls(emu, pki.server_context()) as server:
        yield server.base_url + "/api/xml"


def secret_for(pki: LoopbackPki, trust: LoopbackPki | None = None, **extra: str) -> dict[str, str]:
    return {"client_cert": pki.client.cert_pem, "client_key": pki.client.key_pem,
            "ca_cert": (trust or pki).ca.cert_pem, **extra}  # fmt: skip


def tls_api(url: str, secret: dict[str, str]) -> InfoClinicaApi:
    return InfoClinicaApi.from_secret(url, secret, sleep=lambda _: None, max_attempts=2)


def test_tls_refuses_clients_without_a_certificate_from_the_clinic_ca(
    emu: InfoClinicaEmulator, served: str, pki: LoopbackPki, stranger: LoopbackPki
) -> None:
    body = envelope("GET_FILIAL_LIST").encode()
    with pytest.raises(httpx.TransportError):
        httpx.post(served, content=body, verify=pki.client_context(with_cert=False), timeout=5)
    foreign = stranger.client_context()
    foreign.load_verify_locations(cadata=pki.ca.cert_pem)  # trusts our server, presents the other CA's cert
    with pytest.raises(httpx.TransportError):
        httpx.post(served, content=body, verify=foreign, timeout=5)
    with pytest.raises(InfoClinicaError, match="retries exhausted"):
        tls_api(served, {**secret_for(stranger), "ca_cert": pki.ca.cert_pem}).call("GET_FILIAL_LIST")
    assert emu.request_count == 0  # refused in the handshake: the app never saw a request

    ok = httpx.post(served, content=body, verify=pki.client_context(), timeout=5)
    assert ok.status_code == 200 and emu.request_count == 1


def test_adapter_presents_the_secret_certificate(
    emu: InfoClinicaEmulator,
    clinic: SampleClinic,
    served: str,
    pki: LoopbackPki,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    emu.book(clinic.patients[0].id, clinic.doctors[0].id, 1, emu.at(1, "10:00"))
    # This test's own temp dir: the shared one sees other workers' (and other runs') PEM dirs come and go.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    api = tls_api(served, secret_for(pki, clinic_host="demo.infoclinica.ru", filial="1"))
    assert list(tmp_path.iterdir()) == []  # the PEMs were written to a temp dir, and none is left on disk
    source = InfoClinicaSource(api, ic_config())
    page = source.fetch_changes(None)
    source.acknowledge(page)
    assert len(page.changes) == 1 and emu.pending_changes() == []
    assert set(emu.client_subjects) == {"clinicsync-test-client"}
    api.close()


def test_encrypted_key_needs_its_password(emu: InfoClinicaEmulator, served: str, pki: LoopbackPki) -> None:
    locked = pki.ca.issue("clinicsync-locked", client=True, password="s3cret")
    secret = {"client_cert": locked.cert_pem, "client_key": locked.key_pem, "ca_cert": pki.ca.cert_pem}
    assert "ENCRYPTED" in locked.key_pem
    out = tls_api(served, {**secret, "key_password": "s3cret"}).call("GET_FILIAL_LIST")
    assert text_at(out, "SPRESULT") == "1" and emu.client_subjects == ["clinicsync-locked"]
    with pytest.raises(InfoClinicaError, match="unusable"):
        tls_api(served, {**secret, "key_password": "wrong"})
    with pytest.raises(InfoClinicaError, match="'client_key'"):
        tls_api(served, {"client_cert": locked.cert_pem})


def test_adapter_refuses_a_server_outside_the_pinned_ca(served: str, pki: LoopbackPki, stranger: LoopbackPki) -> None:
    with pytest.raises(InfoClinicaError, match=r"retries exhausted \(ConnectError\)"):
        tls_api(served, secret_for(pki, trust=stranger)).call("GET_FILIAL_LIST")
