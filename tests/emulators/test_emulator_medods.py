"""The MEDODS v2 emulator and the sample clinic behave like the real thing, down to the awkward parts."""

from __future__ import annotations

import re
import time
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
from werkzeug.test import Client, TestResponse

from sandbox.emulators.base import Clock, serve
from sandbox.emulators.medods import STATUSES, MedodsEmulator, mint_token, phone_digits
from sandbox.seed import CLINIC_TZ, SampleClinic, VisitStatus, build_sample_clinic

NOW = datetime(2025, 6, 10, 13, 0, tzinfo=CLINIC_TZ)
KEY = "identity-key-42"
SECRET = "s3cr3t-" + "x" * 64  # >= 64 bytes, as HS512 wants


@pytest.fixture(scope="module")
def clinic() -> SampleClinic:
    return build_sample_clinic(seed=7, now=NOW)


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW.timestamp())


@pytest.fixture
def emu(clinic: SampleClinic, clock: Clock) -> MedodsEmulator:
    return MedodsEmulator(clinic, KEY, SECRET, clock)


def call(
    emu: MedodsEmulator, path: str, token: str | None = "auto", method: str = "GET", **params: Any
) -> TestResponse:
    headers = {}
    if token == "auto":
        token = "Bearer " + mint_token(KEY, SECRET, emu.clock.now())
    if token is not None:
        headers["Authorization"] = token
    return Client(emu).open(path, method=method, headers=headers, query_string=params)


def raw_token(now: float, *, iat: float | None = None, exp: float | None = None, alg: str = "HS512",
              key: str = SECRET, iss: str = KEY) -> str:  # fmt: skip
    iat = now if iat is None else iat
    exp = iat + 60 if exp is None else exp
    return jwt.encode({"iss": iss, "iat": int(iat), "exp": int(exp)}, key, algorithm=alg)


def read_all(emu: MedodsEmulator, path: str, limit: int = 100, **params: Any) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    offset = 0
    while True:
        body = call(emu, path, limit=limit, offset=offset, **params).json
        rows.extend(body["data"])
        offset += limit
        if offset >= body["total"]:
            return rows


# --- auth -------------------------------------------------------------------------------------


def test_accepts_bearer_and_raw_token(emu: MedodsEmulator) -> None:
    token = mint_token(KEY, SECRET, NOW.timestamp())
    assert jwt.get_unverified_header(token) == {"alg": "HS512", "typ": "JWT"}
    assert call(emu, "/api/v2/clinics", token="Bearer " + token).status_code == 200
    assert call(emu, "/api/v2/clinics", token=token).status_code == 200  # the WordPress client style
    assert call(emu, "/api/v2/clinics", token="bearer  " + token).status_code == 200


def test_tolerates_30s_clock_skew(emu: MedodsEmulator) -> None:
    now = NOW.timestamp()
    client_ahead = raw_token(now, iat=now + 25, exp=now + 85)
    recently_expired = raw_token(now, iat=now - 80, exp=now - 25)
    assert call(emu, "/api/v2/clinics", token="Bearer " + client_ahead).status_code == 200
    assert call(emu, "/api/v2/clinics", token="Bearer " + recently_expired).status_code == 200


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (None, "missing"),
        (raw_token(NOW.timestamp(), iat=NOW.timestamp() - 100, exp=NOW.timestamp() - 31), "expired"),
        (raw_token(NOW.timestamp(), iat=NOW.timestamp() + 31), "future"),
        (raw_token(NOW.timestamp(), key="wrong-" + "y" * 64), "signature"),
        (raw_token(NOW.timestamp(), alg="HS256"), "HS512"),
        (raw_token(NOW.timestamp(), iss="someone-else"), "identity"),
        (raw_token(NOW.timestamp(), exp=NOW.timestamp() + 3600), "lifetime"),
        ("Bearer not.a.jwt", "malformed"),
        (jwt.encode({"iss": KEY, "iat": int(NOW.timestamp())}, SECRET, algorithm="HS512"), "malformed"),
    ],
)
def test_rejects_bad_tokens_with_403(emu: MedodsEmulator, token: str | None, reason: str) -> None:
    resp = call(emu, "/api/v2/appointments", token=token)
    assert resp.status_code == 403
    assert reason in resp.json["error"]
    assert "data" not in resp.json


def test_token_checks_use_the_emulator_clock(emu: MedodsEmulator, clock: Clock) -> None:
    token = "Bearer " + mint_token(KEY, SECRET, clock.now())
    assert call(emu, "/api/v2/clinics", token=token).status_code == 200
    clock.advance(120)  # exp was now+50; 120 s later it is past the 30 s leeway
    assert call(emu, "/api/v2/clinics", token=token).status_code == 403


# --- appointments feed ------------------------------------------------------------------------


def test_appointment_shape_and_statuses(emu: MedodsEmulator, clinic: SampleClinic) -> None:
    body = call(emu, "/api/v2/appointments", limit=5).json
    assert body["total"] == len(clinic.appointments)
    assert len(body["data"]) == 5
    row = body["data"][0]
    assert set(row) == {
        "id", "clientId", "userId", "clinicId", "date", "time", "duration", "status", "appointmentTypeId",
        "appointmentSourceId", "price", "insurancePolicyNumber", "anonymous", "createdAt", "updatedAt",
        "deletedAt",
    }  # fmt: skip
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", row["date"]) and re.fullmatch(r"\d\d:\d\d", row["time"])
    assert re.fullmatch(r"\d+\.\d\d", row["price"])
    assert isinstance(row["updatedAt"], int) and row["deletedAt"] is None
    everything = read_all(emu, "/api/v2/appointments")
    assert {r["status"] for r in everything} <= set(STATUSES)
    assert {"serviced", "paid", "canceled", "failed", "approved", "need_approval"} <= {r["status"] for r in everything}


def test_updated_at_after_is_strict_and_ordered(emu: MedodsEmulator) -> None:
    everything = read_all(emu, "/api/v2/appointments")
    keys = [(r["updatedAt"], r["id"]) for r in everything]
    assert keys == sorted(keys)
    cursor = everything[len(everything) // 2]["updatedAt"]
    newer = read_all(emu, "/api/v2/appointments", updatedAtAfter=cursor)
    assert newer and all(r["updatedAt"] > cursor for r in newer)
    assert len(newer) == sum(1 for r in everything if r["updatedAt"] > cursor)
    assert call(emu, "/api/v2/appointments", updatedAtAfter=cursor).json["total"] == len(newer)


def test_offset_paging_total_and_last_page(emu: MedodsEmulator, clinic: SampleClinic) -> None:
    total = len(clinic.appointments)
    assert len(call(emu, "/api/v2/appointments").json["data"]) == 25  # default limit
    last_offset = (total - 1) // 100 * 100
    last = call(emu, "/api/v2/appointments", limit=100, offset=last_offset).json
    assert last["total"] == total and len(last["data"]) == total - last_offset
    beyond = call(emu, "/api/v2/appointments", limit=100, offset=total + 5).json
    assert beyond == {"data": [], "total": total}
    ids = [r["id"] for r in read_all(emu, "/api/v2/appointments", limit=37)]
    assert len(ids) == len(set(ids)) == total


def test_status_and_id_filters(emu: MedodsEmulator) -> None:
    canceled = read_all(emu, "/api/v2/appointments", status="canceled")
    assert canceled and {r["status"] for r in canceled} == {"canceled"}
    two = read_all(emu, "/api/v2/appointments", status="billed,paid")
    assert {r["status"] for r in two} == {"billed", "paid"}
    client_id = canceled[0]["clientId"]
    assert {r["clientId"] for r in read_all(emu, "/api/v2/appointments", clientId=client_id)} == {client_id}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 101}, "limit"),
        ({"limit": "abc"}, "limit"),
        ({"limit": -1}, "limit"),
        ({"limit": 0}, "limit"),
        ({"limit": "1.5"}, "limit"),
        ({"offset": -5}, "offset"),
        ({"updatedAtAfter": "yesterday"}, "updatedAtAfter"),
        ({"updatedAtAfter": "1e99"}, "updatedAtAfter"),
        ({"status": "done"}, "status"),
        ({"clientId": "x"}, "clientId"),
    ],
)
def test_validation_errors_are_422(emu: MedodsEmulator, params: dict[str, Any], field: str) -> None:
    resp = call(emu, "/api/v2/appointments", **params)
    assert resp.status_code == 422
    assert list(resp.json["errors"]) == [field]
    assert isinstance(resp.json["errors"][field][0], str)


def test_limit_at_max_is_fine_and_clients_validate_too(emu: MedodsEmulator) -> None:
    assert len(call(emu, "/api/v2/appointments", limit=100).json["data"]) == 100
    assert call(emu, "/api/v2/clients", limit=1000).status_code == 422
    assert call(emu, "/api/v2/clients", phone="---").json == {"errors": {"phone": ["must contain digits"]}}


def test_unknown_path_404_wrong_method_405_weird_input_never_500(emu: MedodsEmulator) -> None:
    assert call(emu, "/api/v2/nope").status_code == 404
    assert call(emu, "/api/v2/nope").json == {"error": "not found"}
    assert call(emu, "/api/v2/clients/abc").status_code == 404
    resp = call(emu, "/api/v2/clinics", method="DELETE")
    assert resp.status_code == 405 and "GET" in resp.headers["Allow"] and "error" in resp.json
    for params in ({"limit": "9" * 40}, {"offset": "\x00"}, {"phone": "☎️"}, {"updatedAtAfter": "٣"}):
        assert call(emu, "/api/v2/clients", **params).status_code == 422


# --- clients, users, clinics ------------------------------------------------------------------


def test_client_by_id_and_404(emu: MedodsEmulator, clinic: SampleClinic) -> None:
    p = clinic.patients[0]
    row = call(emu, f"/api/v2/clients/{p.id}").json
    assert row["surname"] == p.surname and row["name"] == p.name and row["secondName"] == p.patronymic
    assert row["phone"] == p.phone and row["email"] == p.email and row["birthdate"] == p.birthdate.isoformat()
    assert {"denyCalls", "denyEmail", "denySmsNotifications", "denySmsDispatches", "denyWhatsappMessages",
            "denyDataProcessing", "archived", "sex", "updatedAt"} <= set(row)  # fmt: skip
    missing = call(emu, "/api/v2/clients/999999")
    assert missing.status_code == 404 and "error" in missing.json


def test_client_feed_and_phone_search_finds_whole_family(emu: MedodsEmulator, clinic: SampleClinic) -> None:
    assert len(read_all(emu, "/api/v2/clients")) == len(clinic.patients)
    family = [p for p in clinic.patients if p.family_id == 1]
    assert len(family) >= 2
    national = phone_digits(family[0].phone or "")
    for typed in (f"8 ({national[:3]}) {national[3:6]}-{national[6:8]}-{national[8:]}", "+7" + national):
        found = call(emu, "/api/v2/clients", phone=typed).json
        assert sorted(r["id"] for r in found["data"]) == sorted(p.id for p in family)
        assert found["total"] == len(family)
    assert call(emu, "/api/v2/clients", phone="+7 000 000-00-00").json == {"data": [], "total": 0}


def test_users_and_clinics(emu: MedodsEmulator, clinic: SampleClinic) -> None:
    users = call(emu, "/api/v2/users", userGroup="medical_staff").json
    assert users["total"] == len(clinic.doctors) >= 8
    assert {"id", "name", "surname", "specialty"} <= set(users["data"][0])
    assert "ортодонт" in {u["specialty"] for u in users["data"]}
    assert call(emu, "/api/v2/users", userGroup="administrative_staff").json["total"] == 0
    clinics = call(emu, "/api/v2/clinics").json["data"]
    assert {(c["title"], c["city"]) for c in clinics} == {
        ("Клиника на Тверской", "Москва"),
        ("Клиника в Химках", "Химки"),
    }


# --- mutations --------------------------------------------------------------------------------


def test_mutations_bump_updated_at_and_reach_the_feed(emu: MedodsEmulator, clock: Clock, clinic: SampleClinic) -> None:
    cursor = int(clock.now())
    assert call(emu, "/api/v2/appointments", updatedAtAfter=cursor).json["total"] == 0
    clock.advance(1)  # updatedAtAfter is strict: a change in the cursor's own second is not "after"
    client_id = emu.add_client("Сидорова", "Мария", second_name="Ивановна", phone="+7 916 000-11-22")
    clock.advance(5)
    appt = emu.book(client_id, clinic.doctors[0].id, 1, emu.at(2, "10:30"), duration=60)
    feed = call(emu, "/api/v2/appointments", updatedAtAfter=cursor).json["data"]
    assert [(r["id"], r["status"], r["time"], r["clientId"]) for r in feed] == [(appt, "approved", "10:30", client_id)]
    assert [r["id"] for r in call(emu, "/api/v2/clients", updatedAtAfter=cursor).json["data"]] == [client_id]

    # Frozen clock: several changes in the same second still move updatedAt strictly forward.
    stamps = [emu.appointment(appt)["updatedAt"]]
    for change in (emu.confirm, emu.arrive, emu.complete):
        change(appt)
        stamps.append(emu.appointment(appt)["updatedAt"])
    assert stamps == sorted(set(stamps)) and len(stamps) == 4
    assert emu.appointment(appt)["status"] == "serviced"

    before = emu.appointment(appt)["updatedAt"]
    emu.reschedule(appt, emu.at(3, "15:00"))
    moved = call(emu, f"/api/v2/appointments/{appt}").json
    assert (moved["id"], moved["date"], moved["time"], moved["status"]) == (
        appt, emu.at(3, "15:00").date().isoformat(), "15:00", "approved",
    )  # fmt: skip
    assert [r["id"] for r in call(emu, "/api/v2/appointments", updatedAtAfter=before).json["data"]] == [appt]

    emu.cancel(appt)
    emu.no_show(clinic.appointments[0].id)
    assert emu.appointment(appt)["status"] == "canceled"
    assert emu.appointment(clinic.appointments[0].id)["status"] == "failed"
    with pytest.raises(ValueError, match="unknown MEDODS status"):
        emu.set_status(appt, "done")


def test_client_mutations(emu: MedodsEmulator, clock: Clock, clinic: SampleClinic) -> None:
    p = clinic.patients[3]
    old = emu.client(p.id)["updatedAt"]
    clock.advance(60)
    emu.update_client(p.id, phone="8 (999) 123-45-67", denySmsDispatches=True)
    row = call(emu, f"/api/v2/clients/{p.id}").json
    assert row["phone"] == "8 (999) 123-45-67" and row["denySmsDispatches"] is True
    assert row["updatedAt"] == int(clock.now()) > old
    emu.archive_client(p.id)
    assert call(emu, f"/api/v2/clients/{p.id}").json["archived"] is True
    assert clinic.patient(p.id).archived is False  # the shared seed is never mutated
    with pytest.raises(TypeError):
        emu.update_client(p.id, diagnosis="K02.1")


def test_book_dms_and_soft_delete(emu: MedodsEmulator, clinic: SampleClinic) -> None:
    appt = emu.book(clinic.patients[1].id, clinic.doctors[1].id, 2, emu.at(1, "09:00"), insurance_policy="ДМС-1")
    row = emu.appointment(appt)
    assert (row["price"], row["insurancePolicyNumber"]) == ("0.00", "ДМС-1")
    emu.delete_appointment(appt)
    assert call(emu, f"/api/v2/appointments/{appt}").json["deletedAt"] == int(emu.clock.now())
    with pytest.raises(KeyError):
        emu.book(1, clinic.doctors[0].id, 1, emu.at(1, "09:00"))


# --- faults and counters ----------------------------------------------------------------------


def test_fail_next_is_deterministic_and_path_scoped(emu: MedodsEmulator) -> None:
    emu.faults.fail_next(2, status=503)
    emu.faults.fail_next(1, status=500, path_prefix="/api/v2/clients")
    first, second = call(emu, "/api/v2/appointments"), call(emu, "/api/v2/appointments")
    assert (first.status_code, second.status_code) == (503, 503)
    assert "nginx" in first.text and first.mimetype == "text/html"
    assert call(emu, "/api/v2/appointments").status_code == 200
    assert call(emu, "/api/v2/clinics").status_code == 200  # 500 rule only hits /clients
    resp = call(emu, "/api/v2/clients")
    assert resp.status_code == 500 and resp.json == {"error": "Internal Server Error"}
    assert call(emu, "/api/v2/clients").status_code == 200
    emu.faults.fail_next(1, status=429, retry_after=7)
    limited = call(emu, "/api/v2/clients")
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
    assert emu.faults.pending == 0


def test_timeout_next_delays_answers(emu: MedodsEmulator) -> None:
    emu.faults.timeout_next(1, seconds=0.3)
    started = time.monotonic()
    assert call(emu, "/api/v2/clinics").status_code == 200
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    call(emu, "/api/v2/clinics")
    assert time.monotonic() - started < 0.3


def test_request_count_and_log(emu: MedodsEmulator) -> None:
    call(emu, "/api/v2/clinics")
    call(emu, "/api/v2/clinics", token=None)
    call(emu, "/api/v2/missing")
    assert emu.request_count == 3
    assert emu.request_log == [
        ("GET", "/api/v2/clinics", 200),
        ("GET", "/api/v2/clinics", 403),
        ("GET", "/api/v2/missing", 404),
    ]


def test_served_on_loopback_with_httpx(emu: MedodsEmulator) -> None:
    served = serve(emu)
    try:
        assert served.base_url.startswith("http://127.0.0.1:")
        token = mint_token(KEY, SECRET, emu.clock.now())
        resp = httpx.get(
            served.base_url + "/api/v2/appointments",
            params={"updatedAtAfter": 0, "limit": 3},
            headers={"Authorization": f"Bearer {token}"},
            timeout=5,
        )
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json")
        assert len(resp.json()["data"]) == 3
        assert httpx.get(served.base_url + "/api/v2/clinics", timeout=5).status_code == 403
    finally:
        served.stop()
    assert emu.request_count == 2


# --- seed -------------------------------------------------------------------------------------


def test_seed_is_deterministic(clinic: SampleClinic) -> None:
    assert build_sample_clinic(seed=7, now=NOW) == clinic
    other = build_sample_clinic(seed=8, now=NOW)
    assert [p.full_name for p in other.patients] != [p.full_name for p in clinic.patients]
    small = build_sample_clinic(seed=1, patients=20, appointments=15, now=NOW)
    assert (len(small.patients), len(small.appointments)) == (20, 15)
    assert (len(clinic.patients), len(clinic.appointments), len(clinic.branches)) == (300, 400, 2)
    assert len(clinic.doctors) >= 8


PHONE_FORMATS = {
    "+7 916 123-45-67": r"\+7 \d{3} \d{3}-\d\d-\d\d",
    "89161234567": r"8\d{10}",
    "8 (916) 123-45-67": r"8 \(\d{3}\) \d{3}-\d\d-\d\d",
    "+79161234567": r"\+7\d{10}",
    "9161234567": r"9\d{9}",
    "7-916-123-45-67": r"7-\d{3}-\d{3}-\d\d-\d\d",
}


def test_phones_come_in_mixed_formats_with_gaps_and_junk(clinic: SampleClinic) -> None:
    phones = [p.phone for p in clinic.patients]
    for example, pattern in PHONE_FORMATS.items():
        assert re.fullmatch(pattern, example)
        assert sum(1 for ph in phones if ph and re.fullmatch(pattern, ph)) >= 5, example
    assert phones.count(None) >= 3
    invalid = [ph for ph in phones if ph and len(phone_digits(ph)) != 10]
    assert len(invalid) >= 3


def test_families_share_a_phone_but_stay_distinct_patients(clinic: SampleClinic) -> None:
    by_number: dict[str, list[Any]] = {}
    for p in clinic.patients:
        if p.phone and len(phone_digits(p.phone)) == 10:
            by_number.setdefault(phone_digits(p.phone), []).append(p)
    shared = [group for group in by_number.values() if len(group) > 1]
    assert len(shared) >= 5 and all(2 <= len(g) <= 3 for g in shared)
    for group in shared:
        assert len({p.id for p in group}) == len(group)
        assert len({(p.name, p.birthdate) for p in group}) == len(group)
        assert len({p.family_id for p in group}) == 1
        ages = sorted((NOW.date() - p.birthdate).days // 365 for p in group)
        assert ages[0] < 18 <= ages[-1]  # a parent with a child
    assert any(len({p.phone for p in g}) > 1 for g in shared)  # the same number typed differently


def test_names_agree_with_gender(clinic: SampleClinic) -> None:
    people = [(p.sex, p.surname, p.patronymic) for p in clinic.patients]
    people += [(d.sex, d.surname, d.patronymic) for d in clinic.doctors]
    for sex, surname, patronymic in people:
        if patronymic:
            assert patronymic.endswith("ич" if sex == "male" else "на"), (sex, patronymic)
        if sex == "female":
            assert not re.search(r"(ов|ев|ёв|ин|ский|ой)$", surname), surname
        else:
            assert not re.search(r"(ова|ева|ёва|ина|ская|ая)$", surname), surname
    assert Counter(p.sex for p in clinic.patients).keys() == {"male", "female"}


def test_visit_mix_is_realistic(clinic: SampleClinic) -> None:
    appts = clinic.appointments
    dms = [a for a in appts if a.insurance_policy]
    assert 0.05 <= len(dms) / len(appts) <= 0.16
    assert all(str(a.price) == "0.00" for a in dms)
    assert all(a.price > 0 for a in appts if not a.insurance_policy)
    assert all(NOW - timedelta(days=61) <= a.start <= NOW + timedelta(days=31) for a in appts)
    past = Counter(a.status for a in appts if a.end <= NOW)
    future = Counter(a.status for a in appts if a.start > NOW)
    done = past[VisitStatus.COMPLETED] + past[VisitStatus.PAID] + past[VisitStatus.BILLED]
    assert done / past.total() > 0.6 and past[VisitStatus.CANCELLED] and past[VisitStatus.NO_SHOW]
    assert {VisitStatus.PENDING, VisitStatus.BOOKED, VisitStatus.CONFIRMED} <= set(future)
    assert not {VisitStatus.COMPLETED, VisitStatus.PAID, VisitStatus.NO_SHOW} & set(future)
    assert any(a.anonymous for a in appts)
    visits = Counter(a.patient_id for a in appts)
    assert sum(1 for n in visits.values() if n >= 3) >= 20
    assert all(a.created_at <= a.updated_at <= NOW for a in appts)


def test_patient_flags_emails_and_archive(clinic: SampleClinic) -> None:
    patients = clinic.patients
    with_email = [p for p in patients if p.email]
    assert 0.45 <= len(with_email) / len(patients) <= 0.7
    assert all(re.fullmatch(r"[a-z0-9._]+@[a-z.]+\.[a-z]+", p.email or "") for p in with_email)
    assert sum(p.deny_data_processing for p in patients) >= 2
    assert sum(p.deny_sms_dispatches for p in patients) >= 15
    archived = {p.id for p in patients if p.archived}
    assert archived
    assert not [a for a in clinic.appointments if a.patient_id in archived and a.start > NOW]


def test_all_pii_strings_cover_names_phones_emails(clinic: SampleClinic) -> None:
    pii = clinic.all_pii_strings()
    for p in clinic.patients:
        assert p.surname in pii and p.name in pii and p.full_name in pii
        if p.phone and not (p.phone.isdigit() and len(p.phone) < 10):
            assert p.phone in pii
        if p.email:
            assert p.email in pii
    # Short bare digit runs match by chance inside timestamps; they are no one's phone.
    assert not [s for s in pii if s.isdigit() and len(s) < 10]
    some = next(p for p in clinic.patients if p.phone and len(phone_digits(p.phone)) == 10)
    assert "+7" + phone_digits(some.phone or "") in pii
