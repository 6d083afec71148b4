"""The emulators' indexes and caches answer exactly what a scan of every record answered.

They exist only to make the 10k and 50k scale points measurable (``make bench-scale-50k``): each
lookup here is checked, after random sequences of writes, against the scan it replaced, kept in this
file as the reference model.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.test import Client

from sandbox.emulators.amocrm import AmoCrmEmulator
from sandbox.emulators.base import Clock
from sandbox.emulators.bitrix24 import Bitrix24Emulator, _OperatingWindow, normalize_email, normalize_phone
from sandbox.emulators.medods import MedodsEmulator, mint_token
from sandbox.seed import CLINIC_TZ, build_sample_clinic

T0 = 1_767_258_000.0
PHONES = ("+7 916 000-00-01", "8 (916) 000-00-01", "9160000002", "+7 916 000-00-03 доб. 5", "")
EMAILS = ("a@x.ru", " A@X.ru ", "b@x.ru")
ORIGINS = ("1", "2", "02", "x", "")

# --- Bitrix24: list filters and crm.duplicate.findbycomm ----------------------------------------------

bitrix_ops = st.lists(
    st.one_of(
        st.tuples(st.just("contact"), st.sampled_from(PHONES), st.sampled_from(EMAILS), st.sampled_from(ORIGINS)),
        st.tuples(st.just("update"), st.integers(0, 20), st.sampled_from(PHONES), st.sampled_from(ORIGINS)),
        st.tuples(st.just("delete"), st.integers(0, 20)),
        st.tuples(st.just("deal"), st.integers(0, 20), st.sampled_from(ORIGINS)),
        st.tuples(st.just("query"), st.integers(0, 20)),
    ),
    max_size=25,
)


def _bitrix_call(emu: Bitrix24Emulator, method: str, **params: Any) -> Any:
    response = Client(emu).post(emu.webhook_path + method, json=params)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["result"]


def _scan_list(emu: Bitrix24Emulator, entity: str, filt: dict[str, Any]) -> list[str]:
    """The list handler before its index: every record through the filter."""
    rows = [rec for rec in emu._records[entity].values() if emu._matches(entity, rec, filt)]
    return [r["ID"] for r in emu._sorted(entity, rows, None)][:50]


def _scan_findbycomm(emu: Bitrix24Emulator, comm: str, values: list[str], entity: str) -> list[int]:
    normalize = normalize_phone if comm == "PHONE" else normalize_email
    keys = [k for k in dict.fromkeys(normalize(v) for v in values if v) if k][:20]
    return [
        rid
        for rid, rec in sorted(emu._records[entity].items())
        if any(normalize(e["VALUE"]) in keys for e in rec.get(comm, []))
    ][:20]


def _check_bitrix(emu: Bitrix24Emulator, ids: list[int]) -> None:
    filters: list[tuple[str, dict[str, Any]]] = [
        ("contact", {"ORIGIN_ID": o}) for o in ORIGINS if o
    ]  # fmt: skip
    filters += [
        ("contact", {"@ORIGIN_ID": ["1", "x"]}),
        ("contact", {"ORIGIN_ID": ["2", "02"], "HAS_PHONE": "Y"}),
        ("contact", {"@ID": [str(i) for i in ids[:5]] + ["999"]}),
        ("contact", {"ID": ids[0] if ids else 1}),
        ("contact", {"PHONE": "79160000001"}),
        ("contact", {"EMAIL": "a@x.ru"}),
        ("deal", {"CONTACT_ID": ids[-1] if ids else 1}),
        ("deal", {"@CONTACT_ID": [str(i) for i in ids]}),
        ("deal", {"ORIGIN_ID": "1", "!CONTACT_ID": ""}),
        ("contact", {"ORIGIN_ID": ""}),
    ]
    for entity, filt in filters:
        got = [r["ID"] for r in _bitrix_call(emu, f"crm.{entity}.list", filter=filt, select=["ID"])]
        assert got == _scan_list(emu, entity, filt), (entity, filt)
    for comm, values in (("PHONE", list(PHONES)), ("PHONE", ["89160000002"]), ("EMAIL", list(EMAILS))):
        for entity_type in ("CONTACT", ""):
            found = _bitrix_call(emu, "crm.duplicate.findbycomm", type=comm, values=values, entity_type=entity_type)
            expected = _scan_findbycomm(emu, comm, values, "contact")
            assert (found or {}).get("CONTACT", []) == expected, (comm, values)


@settings(max_examples=60, deadline=None)
@given(bitrix_ops)
def test_bitrix24_indexed_lists_and_findbycomm_answer_what_the_scan_answered(ops: list[tuple[Any, ...]]) -> None:
    emu = Bitrix24Emulator(Clock(T0))
    emu.limits.enabled = False  # a frozen clock: the bucket would refuse every check after the 50th
    ids: list[int] = []
    _check_bitrix(emu, ids)  # builds the indexes first, so every write below must keep them
    for op in ops:
        live = [i for i in ids if i in emu.contacts]
        if op[0] == "contact":
            fields: dict[str, Any] = {"NAME": "Тест", "ORIGIN_ID": op[3]}
            if op[1]:
                fields["PHONE"] = [{"VALUE": op[1], "VALUE_TYPE": "WORK"}]
            fields["EMAIL"] = [{"VALUE": op[2], "VALUE_TYPE": "WORK"}]
            ids.append(emu.manager_create_contact(**fields))
        elif op[0] == "update" and live:
            change: dict[str, Any] = {"ORIGIN_ID": op[3]}
            if op[2]:
                change["PHONE"] = [{"VALUE": op[2], "VALUE_TYPE": "MOBILE"}]
            emu.manager_update_contact(live[op[1] % len(live)], **change)
        elif op[0] == "delete" and live:
            emu.manager_delete("contact", live[op[1] % len(live)])
        elif op[0] == "deal" and live:
            emu.manager_create_deal(TITLE="Визит", ORIGIN_ID=op[2], CONTACT_ID=live[op[1] % len(live)])
        elif op[0] == "query":
            _check_bitrix(emu, live)
    _check_bitrix(emu, [i for i in ids if i in emu.contacts])


def _old_operating_used(records: deque[tuple[float, float]], cutoff: float) -> float:
    """``_operating_used`` before the kept sum: the window re-summed for every command."""
    if not records:
        return 0.0
    while records and records[0][0] <= cutoff:
        records.popleft()
    return sum(cost for _, cost in records)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from((0.0, 0.0, 0.5, 7.25, 300.0, 600.0)), st.sampled_from((0.05, 0.1, 0.3, 1.7, 0.0, 2))),
        max_size=80,
    )
)
def test_bitrix24_operating_time_is_the_same_number_as_summing_the_window(charges: list[tuple[float, float]]) -> None:
    emu = Bitrix24Emulator(Clock(T0))
    key, reference = ("user", "crm.deal.add"), deque[tuple[float, float]]()
    now = T0
    for step, cost in charges:
        now += step
        used = emu._operating_used(key, now)
        expected = _old_operating_used(reference, now - emu.limits.operating_window)
        assert used == expected and type(used) is type(expected)
        emu._operating.setdefault(key, _OperatingWindow()).add(now, cost)
        reference.append((now, cost))


# --- MEDODS: pages of one ordered scan ---------------------------------------------------------------

NOW = datetime(2025, 6, 10, 13, 0, tzinfo=CLINIC_TZ)
KEY, SECRET = "identity-key-42", "s3cr3t-" + "x" * 64
medods_ops = st.lists(
    st.one_of(
        st.tuples(st.just("status"), st.integers(0, 10**6), st.sampled_from(("arrived", "canceled", "serviced"))),
        st.tuples(st.just("client"), st.integers(0, 10**6)),
        st.tuples(st.just("book"), st.integers(0, 10**6)),
        st.tuples(st.just("tick"), st.integers(0, 5)),
        st.tuples(st.just("read"), st.sampled_from((None, 0, 1)), st.integers(1, 100), st.integers(0, 120)),
    ),
    max_size=20,
)


@settings(max_examples=40, deadline=None)
@given(medods_ops)
def test_medods_pages_are_the_sorted_filtered_set_after_any_writes(ops: list[tuple[Any, ...]]) -> None:
    clock = Clock(NOW.timestamp())
    emu = MedodsEmulator(build_sample_clinic(seed=7, now=NOW, patients=20, appointments=60), KEY, SECRET, clock)
    appts, clients = sorted(a["id"] for a in emu.all_appointments()), sorted(c["id"] for c in emu.all_clients())
    since = int(NOW.timestamp()) - 86400 * 30
    for op in ops:
        if op[0] == "status":
            emu.set_status(appts[op[1] % len(appts)], op[2])
        elif op[0] == "client":
            emu.update_client(clients[op[1] % len(clients)], denyEmail=bool(op[1] % 2))
        elif op[0] == "book":
            doctor = emu._users[op[1] % len(emu._users)]
            start = NOW + timedelta(days=1 + op[1] % 7)
            appts.append(emu.book(clients[op[1] % len(clients)], doctor["id"], doctor["clinicIds"][0], start))
        elif op[0] == "tick":
            clock.advance(op[1])
        else:
            _, after, limit, offset = op
            params = {"limit": limit, "offset": offset} | ({} if after is None else {"updatedAtAfter": since + after})
            for path, rows in (
                ("/api/v2/appointments", emu.all_appointments()),
                ("/api/v2/clients", emu.all_clients()),
            ):
                token = "Bearer " + mint_token(KEY, SECRET, clock.now())
                body = Client(emu).get(path, headers={"Authorization": token}, query_string=params).json
                assert body is not None
                kept = [r for r in rows if after is None or r["updatedAt"] > since + after]
                ordered = sorted(kept, key=lambda r: (r.get("updatedAt", 0), r["id"]))  # the old per-page sort
                assert body == {"data": ordered[offset : offset + limit], "total": len(ordered)}


# --- amoCRM: a contact's leads, and lists by id ------------------------------------------------------

amo_ops = st.lists(
    st.one_of(
        st.tuples(st.just("contact"), st.integers(0, 0)),
        st.tuples(st.just("lead"), st.integers(0, 20)),
        st.tuples(st.just("link"), st.integers(0, 20), st.integers(0, 20), st.booleans()),
        st.tuples(st.just("unlink"), st.integers(0, 20), st.integers(0, 20)),
        st.tuples(st.just("delete_lead"), st.integers(0, 20)),
        st.tuples(st.just("delete_contact"), st.integers(0, 20)),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(amo_ops)
def test_amocrm_contact_leads_and_id_lists_answer_what_the_scan_answered(ops: list[tuple[Any, ...]]) -> None:
    emu = AmoCrmEmulator(Clock(T0), rate_limit=False)
    client = Client(emu)
    auth = {"Authorization": "Bearer " + emu.issue_tokens()["access_token"]}
    contacts = [emu.manager_create_contact(name="Первый")]

    def check() -> None:
        live = sorted(emu.contacts)
        for cid in live:
            scanned = [lid for lid, links in emu._lead_contacts.items() if cid in links]
            assert emu.contact_lead_ids(cid) == scanned
        wanted = [*live[:3], 1]
        query = [("with", "leads")] + [("filter[id][]", str(i)) for i in wanted]
        response = client.get("/api/v4/contacts", headers=auth, query_string=query)
        got = response.get_json()["_embedded"]["contacts"] if response.status_code == 200 else []
        expected = [emu.contacts[i] for i in sorted(emu.contacts) if i in wanted]  # the scan, ordered by id
        assert [c["id"] for c in got] == [c["id"] for c in expected]
        for row in got:
            scanned = [lid for lid, links in emu._lead_contacts.items() if row["id"] in links]
            assert [lead["id"] for lead in row["_embedded"]["leads"]] == scanned

    check()
    for op in ops:
        leads = sorted(emu.leads)
        if op[0] == "contact":
            contacts.append(emu.manager_create_contact(name="Ещё"))
        elif op[0] == "lead" and emu.contacts:
            live = sorted(emu.contacts)
            emu.manager_create_lead("Визит", contact_ids=[live[op[1] % len(live)]])
        elif op[0] == "link" and leads and emu.contacts:
            live = sorted(emu.contacts)
            emu.manager_link(leads[op[1] % len(leads)], live[op[2] % len(live)], is_main=op[3])
        elif op[0] == "unlink" and leads and emu.contacts:
            live = sorted(emu.contacts)
            lead = leads[op[1] % len(leads)]
            body = [{"to_entity_id": live[op[2] % len(live)], "to_entity_type": "contacts"}]
            client.post(f"/api/v4/leads/{lead}/unlink", headers=auth, json=body)
        elif op[0] == "delete_lead" and leads:
            emu.manager_delete_lead(leads[op[1] % len(leads)])
        elif op[0] == "delete_contact" and emu.contacts:
            live = sorted(emu.contacts)
            emu.manager_delete_contact(live[op[1] % len(live)])
        check()


# --- what each lookup costs: these failed on the scanning emulators -----------------------------------


def test_bitrix24_a_list_by_origin_and_findbycomm_look_at_the_matches_not_every_contact(monkeypatch: Any) -> None:
    emu = Bitrix24Emulator(Clock(T0))
    emu.limits.enabled = False
    for n in range(200):
        emu.manager_create_contact(NAME="Тест", ORIGIN_ID=str(n), PHONE=[{"VALUE": f"+7 916 100-{n:04d}"}])
    _bitrix_call(emu, "crm.duplicate.findbycomm", type="PHONE", values=["+79161000001"])  # builds the index
    _bitrix_call(emu, "crm.contact.list", filter={"ORIGIN_ID": "1"})
    matched: list[str] = []
    real_matches = emu._matches
    monkeypatch.setattr(emu, "_matches", lambda e, rec, f: matched.append(rec["ID"]) or real_matches(e, rec, f))
    normalised = 0

    def counting(value: str) -> str:
        nonlocal normalised
        normalised += 1
        return normalize_phone(value)

    monkeypatch.setattr("sandbox.emulators.bitrix24.normalize_phone", counting)
    for n in range(10):
        assert len(_bitrix_call(emu, "crm.contact.list", filter={"ORIGIN_ID": str(n)})) == 1
        found = _bitrix_call(emu, "crm.duplicate.findbycomm", type="PHONE", values=[f"+7916100{n:04d}"])
        assert len(found["CONTACT"]) == 1
    assert len(matched) == 10  # one candidate per list, not 200
    assert normalised == 10  # the wanted phone of each look-up, not every contact's


def test_medods_an_offset_scan_orders_the_set_once_not_per_page(monkeypatch: Any) -> None:
    emu = MedodsEmulator(
        build_sample_clinic(seed=7, now=NOW, patients=20, appointments=60), KEY, SECRET, Clock(NOW.timestamp())
    )
    orderings = 0

    def counting_sorted(*args: Any, **kwargs: Any) -> Any:
        nonlocal orderings
        orderings += "key" in kwargs  # the feed order (updatedAt, id); not the sorting of query arguments
        return sorted(*args, **kwargs)

    monkeypatch.setattr("sandbox.emulators.medods.sorted", counting_sorted, raising=False)
    token = "Bearer " + mint_token(KEY, SECRET, NOW.timestamp())
    rows: list[Any] = []
    for offset in range(0, 60, 10):
        query = {"limit": 10, "offset": offset}
        body = Client(emu).get("/api/v2/appointments", headers={"Authorization": token}, query_string=query).json
        assert body is not None
        rows += body["data"]
    assert len({r["id"] for r in rows}) == 60
    assert orderings == 1


class _CountingLinks(dict[int, dict[int, bool]]):
    scans = 0

    def items(self) -> Any:
        type(self).scans += 1
        return super().items()


def test_amocrm_a_page_of_contacts_with_their_leads_reads_the_links_once() -> None:
    emu = AmoCrmEmulator(Clock(T0), rate_limit=False)
    auth = {"Authorization": "Bearer " + emu.issue_tokens()["access_token"]}
    for n in range(20):
        emu.manager_create_lead("Визит", contact_ids=[emu.manager_create_contact(name=f"Пациент {n}")])
    emu._lead_contacts = _CountingLinks(emu._lead_contacts)
    response = Client(emu).get("/api/v4/contacts", headers=auth, query_string={"with": "leads", "limit": 250})
    assert all(len(c["_embedded"]["leads"]) == 1 for c in response.get_json()["_embedded"]["contacts"])
    assert _CountingLinks.scans == 1  # not one scan of every lead per contact
