"""vTiger's webservice as the emulator reproduces it and as our client uses it (real HTTP on loopback),
the directory merge rule, and the LIS adapter's handling of bad rows."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from clinicsync.adapters.lis.source import LisApi, LisSource, to_record
from clinicsync.adapters.vtiger.client import VtigerClient, VtigerDirectory, VtigerError, quote
from clinicsync.application.directory import DirectorySync
from clinicsync.domain.config import DirectorySettings, parse_clinic_config
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.directory_records import (
    CrmRecord,
    CrmWriteSpec,
    DirectoryPage,
    DirectoryRecord,
    DirectoryState,
    directory_subject,
    merge_fields,
)
from clinicsync.domain.ports import Cursor
from sandbox.emulators.base import ServedApp
from sandbox.emulators.lis import LisEmulator
from sandbox.emulators.vtiger import VtigerEmulator


@pytest.fixture
def vtiger() -> Iterator[tuple[VtigerEmulator, str, dict[str, str]]]:
    emulator = VtigerEmulator()
    user = emulator.add_user("clinicsync")
    with ServedApp(emulator) as server:
        yield emulator, server.base_url, user


def _client(base_url: str, user: dict[str, str], key: str | None = None) -> VtigerClient:
    return VtigerClient(base_url, user["user_name"], key or user["access_key"], httpx.Client(timeout=10))


def test_login_is_challenge_then_md5_of_token_and_access_key(
    vtiger: tuple[VtigerEmulator, str, dict[str, str]],
) -> None:
    emulator, url, user = vtiger
    http = httpx.Client(timeout=10)
    challenge = http.get(f"{url}/webservice.php", params={"operation": "getchallenge", "username": "clinicsync"}).json()
    token = challenge["result"]["token"]
    wrong = http.post(
        f"{url}/webservice.php", data={"operation": "login", "username": "clinicsync", "accessKey": user["access_key"]}
    ).json()
    assert wrong == {
        "success": False,
        "error": {"code": "INVALID_USER_CREDENTIALS", "message": wrong["error"]["message"]},
    }
    key = hashlib.md5((token + user["access_key"]).encode(), usedforsecurity=False).hexdigest()
    ok = http.post(f"{url}/webservice.php", data={"operation": "login", "username": "clinicsync", "accessKey": key})
    assert ok.json()["success"] is True and ok.json()["result"]["userId"] == user["id"]
    again = http.post(f"{url}/webservice.php", data={"operation": "login", "username": "clinicsync", "accessKey": key})
    assert again.json()["error"]["code"] == "INVALID_USER_CREDENTIALS"  # a challenge token is single use
    no_session = http.get(f"{url}/webservice.php", params={"operation": "query", "query": "SELECT * FROM Contacts;"})
    assert no_session.json()["error"]["code"] == "INVALID_SESSIONID"
    with pytest.raises(VtigerError) as refused:
        _client(url, user, key="0" * 16).login()
    assert refused.value.code == "INVALID_USER_CREDENTIALS"
    assert emulator.stats()["logins"] == 1


def test_query_pages_by_100_and_the_session_is_renewed_once(vtiger: tuple[VtigerEmulator, str, dict[str, str]]) -> None:
    emulator, url, user = vtiger
    for i in range(230):
        emulator.manager_create("Contacts", lastname=f"L{i}", cf_lis_id=f"D{i}")
    client = _client(url, user)
    capped = client.call("GET", "query", {"query": "SELECT * FROM Contacts LIMIT 0,500;"})
    assert len(capped) == 100  # vTiger's ceiling, whatever LIMIT asks
    emulator.expire_sessions()
    before = client.requests
    rows = client.query_all("SELECT * FROM Contacts ORDER BY lastname")
    assert len({r["id"] for r in rows}) == 230
    assert client.logins == 2  # the expired session was renewed once
    assert client.requests - before == 1 + 2 + 3  # the refused call, challenge + login, three pages
    with pytest.raises(VtigerError) as syntax:
        client.call("GET", "query", {"query": "SELECT * FROM Contacts"})  # no trailing ';'
    assert syntax.value.code == "QUERY_SYNTAX_ERROR"
    with pytest.raises(VtigerError) as denied:
        client.call("GET", "query", {"query": "SELECT * FROM Potentials;"})
    assert denied.value.code == "ACCESS_DENIED"


def test_update_replaces_the_record_so_the_gateway_retrieves_first(
    vtiger: tuple[VtigerEmulator, str, dict[str, str]],
) -> None:
    emulator, url, user = vtiger
    client = _client(url, user)
    crm_id = emulator.manager_create("Contacts", lastname="Иванов", cf_lis_id="D1", mailingcity="София")
    bare = client.update({"id": crm_id, "lastname": "Иванов", "assigned_user_id": emulator.admin_id})
    assert bare["mailingcity"] == "" and bare["cf_lis_id"] == ""  # the vendor's trap, reproduced
    emulator.manager_update(crm_id, mailingcity="София", cf_lis_id="D1", description_kept="x")
    directory = VtigerDirectory(client, DirectorySettings(), "BG")
    spec = CrmWriteSpec("doctor", "D1", crm_id, {"last_name": "Иванов", "phone": "+359888123456"}, False)
    assert directory.write(spec) == crm_id
    row = emulator.record(crm_id)
    assert row is not None
    assert row["assigned_user_id"] == emulator.admin_id  # a field we do not map survives our update
    assert row["mobile"] == "+359888123456" and row["modifiedby"] == user["id"]
    with pytest.raises(VtigerError) as missing:
        client.create("Contacts", {"firstname": "no last name"})
    assert missing.value.code == "MANDATORY_FIELDS_MISSING"


def test_changed_since_returns_our_rows_too_and_finds_by_lis_id(
    vtiger: tuple[VtigerEmulator, str, dict[str, str]],
) -> None:
    """Who saved a row last decides nothing here: the directory sync tells our echoes by content."""
    emulator, url, user = vtiger
    client = _client(url, user)
    directory = VtigerDirectory(client, DirectorySettings(), "BG")
    ours = directory.write(CrmWriteSpec("doctor", "D7", None, {"last_name": "Наш"}, False))
    theirs = emulator.manager_create("Contacts", lastname="Чужд", mobile="не е номер")
    changed, cursor = directory.changed_since("doctor", None)
    assert sorted(r.crm_id for r in changed) == sorted([ours, theirs])
    manager = next(r for r in changed if r.crm_id == theirs)
    assert manager.lis_id is None and manager.invalid == frozenset({"phone"})
    assert cursor is not None and len(cursor) == 19
    assert directory.find("doctor", ["D7", "D8"])["D7"].crm_id == ours
    with pytest.raises(ValueError):
        quote("x' OR '1'='1")


def _lis(kind: str = "doctor", **fields: str | None) -> DirectoryRecord:
    base: dict[str, str | None] = {"first_name": "Иван", "last_name": "Иванов", "specialty": "Кардиолог"}
    base |= {"region": "Варна", "city": "Варна", "phone": "+359888000001", "email": "i@example.bg"}
    return DirectoryRecord(kind="doctor", lis_id="D1", fields=base | fields, version=1)


def _crm(record: DirectoryRecord, **fields: str | None) -> CrmRecord:
    return CrmRecord("doctor", "12x1", "D1", {**record.fields, **fields})


def _digest(value: str | None) -> str:
    return f"h:{value}"


def test_merge_rule_field_by_field() -> None:
    synced = _lis()
    base = {name: _digest(value) for name, value in synced.fields.items()}
    # Only the CRM changed the phone: it flows back.
    merge = merge_fields("doctor", synced, _crm(synced, phone="+359888000002"), base, _digest, lambda f: "lis")
    assert merge.to_lis == {"phone": "+359888000002"} and merge.conflicts == ()
    # Only the LIS changed: the CRM gets it, nothing flows back.
    changed = _lis(city="Бургас")
    merge = merge_fields("doctor", changed, _crm(synced), base, _digest, lambda f: "crm")
    assert merge.values["city"] == "Бургас" and merge.to_lis == {}
    # Both changed: the owner wins, and it is a conflict.
    for owner, expected in (("lis", "Бургас"), ("crm", "Сливен")):
        merge = merge_fields("doctor", changed, _crm(synced, city="Сливен"), base, _digest, lambda f, o=owner: o)  # type: ignore[misc]
        assert merge.values["city"] == expected and [c.field for c in merge.conflicts] == ["city"]
        assert merge.to_lis == ({"city": "Сливен"} if owner == "crm" else {})
    # Never synced (no base): the register wins; a phone vTiger cannot parse is never taken.
    merge = merge_fields("doctor", synced, _crm(synced, city="Сливен"), {}, _digest, lambda f: "crm")
    assert merge.values["city"] == "Варна" and merge.to_lis == {}
    bad = CrmRecord("doctor", "12x1", "D1", {**synced.fields, "phone": None}, invalid=frozenset({"phone"}))
    assert merge_fields("doctor", synced, bad, base, _digest, lambda f: "crm").to_lis == {}


def _drain(source: LisSource, cursor: Cursor | None) -> tuple[list[DirectoryRecord], Cursor, int]:
    records: list[DirectoryRecord] = []
    rejected = 0
    while True:
        page = source.changed("doctor", cursor)
        records += page.records
        rejected += page.rejected
        cursor = page.cursor
        if not page.more:
            return records, cursor, rejected


def test_lis_adapter_rejects_bad_rows_and_keeps_the_rest() -> None:
    lis = LisEmulator(doctors=5)
    lis.edit("doctor", "D1002", organisation_id="../../etc")  # not a LIS id: the row is refused
    with ServedApp(lis) as server:
        source = LisSource(LisApi(server.base_url, lis.api_key, httpx.Client(timeout=10)), "BG", page_size=2)
        records, cursor, rejected = _drain(source, None)
        assert rejected == 1 and sorted(r.lis_id for r in records) == ["D1001", "D1003", "D1004", "D1005"]
        assert all(r.fields["phone"] is None or r.fields["phone"].startswith("+359") for r in records)
        assert _drain(source, cursor)[0::2] == ([], 0)  # nothing new; the bad row is reported once per change
        lis.edit("doctor", "D1003", city="Русе")
        assert [r.lis_id for r in _drain(source, cursor)[0]] == ["D1003"]
        source.write_opt_outs("doctor:D1004", ["email"])
        assert lis.get("doctor", "D1004")["do_not_send_marketing"] is True
        bad = httpx.patch(
            f"{server.base_url}/api/v1/doctors/D1004", json={"id": "X"}, headers={"X-Api-Key": lis.api_key}
        )
        assert bad.status_code == 400 and bad.json()["error"] == "not_writable"


class _Fakes:
    """In-memory LIS, CRM, state store and cursors for the use case alone."""

    def __init__(self) -> None:
        self.lis = {"D1": _lis()}
        self.crm: dict[str, CrmRecord] = {}
        self.states: dict[str, Any] = {}
        self.cursors: dict[str, Any] = {}
        self.mailchimp_down = True
        self.members: list[str] = []

    # DirectorySource
    def changed(self, kind: str, cursor: Any) -> DirectoryPage:
        records = list(self.lis.values()) if kind == "doctor" else []  # always re-read: hashes decide
        return DirectoryPage(records, {"done": True})

    def get(self, kind: str, ids: Any) -> dict[str, DirectoryRecord]:
        return {i: self.lis[i] for i in ids if i in self.lis}

    def update(self, kind: str, lis_id: str, fields: Any) -> None:
        raise AssertionError("nothing flows back here")

    # DirectoryCrm
    def changed_since(self, kind: str, since: Any) -> tuple[list[CrmRecord], str | None]:
        return [], since

    def find(self, kind: str, ids: Any) -> dict[str, CrmRecord]:
        return {i: self.crm[i] for i in ids if i in self.crm}

    def write(self, spec: CrmWriteSpec) -> str:
        self.crm[spec.lis_id] = CrmRecord(spec.kind, "12x1", spec.lis_id, dict(spec.fields), spec.do_not_mail)
        return "12x1"

    # DirectoryStore
    def load(self, kind: str, ids: Any) -> dict[str, DirectoryState]:
        return {i: self.states.get(i) or DirectoryState(kind, i) for i in ids}  # type: ignore[arg-type]

    def save(self, states: Any, now: int) -> None:
        self.states |= {s.lis_id: s for s in states}

    # Cursors
    def get_cursor(self, source: str) -> Any:
        return self.cursors.get(source)

    def put_cursor(self, source: str, cursor: Any) -> None:
        self.cursors[source] = cursor

    # AudienceSink
    def upsert(self, kind: str, members: Any) -> set[str]:
        if self.mailchimp_down:
            raise RuntimeError("Mailchimp is down")
        self.members += [m.patient_id for m in members]
        return {m.patient_id for m in members}


def test_mailchimp_down_keeps_the_cursor_and_the_next_run_converges() -> None:
    fakes = _Fakes()
    settings = DirectorySettings(mailchimp={"doctors_list_id": "d1", "organisations_list_id": "o1"})
    config = parse_clinic_config(
        "clinic_id: lab-unit\nmis: {kind: lis, base_url: x, secret_ref: s}\ncrm: {kind: vtiger, secret_ref: s}\n"
    )
    hasher = KeyedHasher(b"k" * 32)
    sync = DirectorySync(config, settings, fakes, fakes, fakes, fakes, hasher, audiences=fakes)  # type: ignore[arg-type]
    first = sync.run()
    assert first.crm_created == 1 and first.failed == {"doctor:audience": "RuntimeError"}
    assert "lis:doctor" not in fakes.cursors  # read again next run
    assert fakes.states["D1"].crm_id == "12x1"  # the CRM write stands
    fakes.mailchimp_down = False
    second = sync.run()
    assert second.failed == {} and second.crm_created == 0 and second.crm_updated == 0
    assert fakes.members == ["D1"] and fakes.cursors["lis:doctor"] == {"done": True}
    third = sync.run()  # the same record read again, nothing changed: no write, not sent again
    assert (third.crm_updated, third.audience_upserted, fakes.members) == (0, 0, ["D1"])


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_row_keys = st.sampled_from(
    ["id", "first_name", "last_name", "name", "type", "phone", "email", "organisation_id", "updated_at"]
)


@given(st.dictionaries(_row_keys, _json, max_size=9) | _json)
def test_hostile_lis_rows_are_refused_cleanly(raw: Any) -> None:
    for kind in ("doctor", "organisation"):
        try:
            record = to_record(kind, raw, "BG")  # type: ignore[arg-type]
        except ValidationError:
            continue
        assert record.lis_id == raw["id"] and record.version >= 0


@given(st.binary(max_size=200) | _json.map(lambda v: json.dumps(v).encode()), st.sampled_from([200, 400, 500]))
@example(b'{"success": true, "result": {}}', 200)
@example(b'{"success": true, "result": null}', 200)
@example(b'{"success": true, "result": {"token": 5}}', 200)
@example(b'{"success": false, "error": "text"}', 200)
def test_hostile_vtiger_answers_raise_only_vtiger_errors(body: bytes, status: int) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
    client = VtigerClient("http://vtiger.invalid", "u", "k", httpx.Client(transport=transport), sleep=lambda s: None)
    try:
        client.login()
    except VtigerError:
        return
    except (KeyError, TypeError) as exc:  # a "success" envelope whose result lacks token/sessionName
        raise AssertionError(f"unhandled {type(exc).__name__}") from exc


def test_an_odd_modifiedtime_never_becomes_the_cursor() -> None:
    rows = [
        {"id": "12x1", "modifiedtime": "2026-12-03 07:55:17", "modifiedby": "19x1", "lastname": "A"},
        {"id": "12x2", "modifiedtime": "2026-12-04T07:55:17+02:00' OR 1", "modifiedby": "19x1", "lastname": "B"},
        {"id": "12x3", "modifiedtime": None, "modifiedby": "19x1", "lastname": "C"},
    ]

    def answer(request: httpx.Request) -> httpx.Response:
        operation = request.url.params.get("operation") or dict(
            p.split("=", 1) for p in request.content.decode().split("&")
        ).get("operation")
        result: Any = {
            "getchallenge": {"token": "t"},
            "login": {"sessionName": "s", "userId": "19x9"},
            "query": rows,
        }[str(operation)]
        return httpx.Response(200, json={"success": True, "result": result})

    client = VtigerClient("http://vtiger.invalid", "u", "k", httpx.Client(transport=httpx.MockTransport(answer)))
    changed, cursor = VtigerDirectory(client, DirectorySettings(), "BG").changed_since("doctor", None)
    assert cursor == "2026-12-03 07:55:17" and len(changed) == 3


class _FeedFakes(_Fakes):
    """vTiger's feed re-reads every row each run, ours included (as ``modifiedtime >=`` does at its cursor);
    the LIS reports D1 once. Counts the LIS's per-record reads."""

    def __init__(self) -> None:
        super().__init__()
        self.mailchimp_down = False
        self.lis_reads = 0
        self.first_read = True

    def changed(self, kind: str, cursor: Any) -> DirectoryPage:
        records = list(self.lis.values()) if kind == "doctor" and self.first_read else []
        self.first_read = self.first_read and kind != "doctor"
        return DirectoryPage(records, {"done": True})

    def get(self, kind: str, ids: Any) -> dict[str, DirectoryRecord]:
        self.lis_reads += len(ids)
        return super().get(kind, ids)

    def update(self, kind: str, lis_id: str, fields: Any) -> None:
        record = self.lis[lis_id]
        self.lis[lis_id] = record.model_copy(update={"fields": {**record.fields, **fields}})

    def changed_since(self, kind: str, since: Any) -> tuple[list[CrmRecord], str | None]:
        return (list(self.crm.values()) if kind == "doctor" else []), since


@given(
    edits=st.dictionaries(
        st.sampled_from(["first_name", "last_name", "specialty", "region", "city"]),
        st.sampled_from(["Иван", "Иванов", "Кардиолог", "Варна", "Русе"]),
    ),
    opt_out=st.booleans(),
)
def test_a_manager_edit_is_heard_whoever_saved_it_and_our_echo_never_is(edits: dict[str, str], opt_out: bool) -> None:
    """vTiger's feed carries our own writes back, and a manager may save under the integration's user: a row
    is a change exactly when its content differs from what the last sync left, and after any sync the next
    run sees no change (no loop). An echo costs no LIS read."""
    fakes = _FeedFakes()
    config = parse_clinic_config(
        "clinic_id: lab-unit\nmis: {kind: lis, base_url: x, secret_ref: s}\ncrm: {kind: vtiger, secret_ref: s}\n"
    )
    sync = DirectorySync(config, DirectorySettings(), fakes, fakes, fakes, fakes, KeyedHasher(b"k" * 32))  # type: ignore[arg-type]
    assert sync.run().crm_created == 1
    echo = sync.run()
    assert (echo.crm_changed, echo.crm_updated, fakes.lis_reads) == (0, 0, 0)
    synced = fakes.crm["D1"]
    fakes.crm["D1"] = CrmRecord("doctor", synced.crm_id, "D1", {**synced.fields, **edits}, opt_out)
    differs = any(synced.fields.get(name) != value for name, value in edits.items()) or opt_out
    heard = sync.run()
    assert heard.crm_changed == int(differs)
    assert all(fakes.lis["D1"].fields[name] == value for name, value in edits.items())
    settled = sync.run()
    assert (settled.crm_changed, settled.crm_updated) == (0, 0)


class _LostWriteFakes(_FeedFakes):
    """The LIS reports a record each time its content changes (and again while a run failed on it: the
    cursor stays); vTiger's feed re-reads every row. ``crm_write_fails`` / ``lose_upsert``: the next write fails
    (the caller sees an error, the outcome is unknown to it), after it ran or before."""

    def __init__(self) -> None:
        super().__init__()
        self.pending = {"D1"}
        self.crm_write_fails: str | None = None  # "before" it ran (refused) or "after" (its answer lost)
        self.lose_upsert: str | None = None  # "answer": its answer is lost; "unconfirmed": still running
        self.audience: dict[str, dict[str, str]] = {}
        self.crm_opt_outs: list[str] = []

    def edit_lis(self, do_not_mail: bool | None = None, **fields: str | None) -> None:
        record = self.lis["D1"]
        flag = record.do_not_mail if do_not_mail is None else do_not_mail
        self.lis["D1"] = record.model_copy(update={"fields": {**record.fields, **fields}, "do_not_mail": flag})
        self.pending.add("D1")

    # ConsentLedger (the CRM's opt-outs only: the LIS flag's are recorded from the audience step)
    def opt_out(self, subjects: Any, channels: Any, source: str, detail: str, **_: Any) -> list[str]:
        if source == "crm":
            self.crm_opt_outs += list(subjects)
        return list(subjects)

    def changed(self, kind: str, cursor: Any) -> DirectoryPage:
        records = [self.lis[i] for i in sorted(self.pending)] if kind == "doctor" else []
        if kind == "doctor":
            self.pending = set()
        return DirectoryPage(records, {"done": True})

    def run(self, sync: DirectorySync) -> Any:
        report = sync.run()
        if "doctor:D1" in report.failed or "doctor:audience" in report.failed:
            self.pending.add("D1")  # the LIS cursor stayed: the record is read again
        return report

    def write(self, spec: CrmWriteSpec) -> str:
        fails, self.crm_write_fails = self.crm_write_fails, None
        if fails == "before":
            raise TimeoutError("the connection failed before the update ran")
        crm_id = super().write(spec)
        if fails == "after":
            raise TimeoutError("the update ran; its answer never came")
        return crm_id

    def upsert(self, kind: str, members: Any) -> set[str]:
        for m in members:
            self.audience[m.patient_id] = dict(m.merge_fields)
        lost, self.lose_upsert = self.lose_upsert, None
        if lost == "answer":
            raise TimeoutError("the batch ran; its answer never came")
        return set() if lost == "unconfirmed" else {m.patient_id for m in members}


def _lost_write_sync(fakes: _LostWriteFakes, mailchimp: bool = False, ledger: bool = False) -> DirectorySync:
    config = parse_clinic_config(
        "clinic_id: lab-unit\nmis: {kind: lis, base_url: x, secret_ref: s}\ncrm: {kind: vtiger, secret_ref: s}\n"
    )
    settings = (
        DirectorySettings(mailchimp={"doctors_list_id": "d1", "organisations_list_id": "o1"})
        if mailchimp
        else DirectorySettings()
    )
    return DirectorySync(
        config,
        settings,
        fakes,  # type: ignore[arg-type]
        fakes,  # type: ignore[arg-type]
        fakes,  # type: ignore[arg-type]
        fakes,  # type: ignore[arg-type]
        KeyedHasher(b"k" * 32),
        audiences=fakes if mailchimp else None,  # type: ignore[arg-type]
        ledger=fakes if ledger else None,  # type: ignore[arg-type]
    )


_CITIES = st.sampled_from(["Варна", "Русе", "Сливен", "Бургас"])


@given(
    attempted=_CITIES,
    applied=st.booleans(),
    lis_next=_CITIES,
    manager=st.none() | _CITIES,
)
@example(attempted="Русе", applied=True, lis_next="Варна", manager=None)  # X -> Y (lost) -> X
def test_a_vtiger_write_of_unknown_outcome_is_never_taken_for_a_managers_edit(
    attempted: str, applied: bool, lis_next: str, manager: str | None
) -> None:
    """The LIS moves a field X -> ``attempted``; our vTiger update of it runs (``applied``) or not, and its
    answer is lost. Then the LIS holds ``lis_next`` and a manager may set a value in vTiger. The next runs
    never copy our own write back into the LIS (the lab's data overwritten by our stale write): the LIS
    keeps ``lis_next`` unless a manager set a value different from both X and our attempt, and vTiger ends
    at what the LIS holds."""
    fakes = _LostWriteFakes()
    sync = _lost_write_sync(fakes)
    assert fakes.run(sync).crm_created == 1
    before = fakes.crm["D1"]
    original = before.fields["city"]
    fakes.edit_lis(city=attempted)
    fakes.crm_write_fails = ("after" if applied else "before") if attempted != original else None
    lost = fakes.run(sync)
    assert ("doctor:D1" in lost.failed) == (attempted != original)
    assert fakes.crm["D1"].fields["city"] == (attempted if applied else original)
    fakes.edit_lis(city=lis_next)
    row = fakes.crm["D1"]
    if manager is not None:
        fakes.crm["D1"] = CrmRecord("doctor", row.crm_id, "D1", {**row.fields, "city": manager}, row.do_not_mail)
    for _ in range(2):
        assert fakes.run(sync).failed == {}
    # A value that is neither the last synced one nor our attempt is a manager's edit; if the LIS changed
    # too, it is a conflict and the LIS (the default owner) wins.
    heard = manager is not None and manager not in (original, attempted) and lis_next == original
    expected = manager if heard else lis_next
    assert fakes.lis["D1"].fields["city"] == expected
    assert fakes.crm["D1"].fields["city"] == expected
    settled = fakes.run(sync)
    assert (settled.crm_changed, settled.crm_updated, settled.lis_updated) == (0, 0, 0)


def test_after_two_writes_of_unknown_outcome_either_is_ours() -> None:
    """X -> Y (ran, answer lost) -> Z (failed before it ran) -> X: vTiger shows Y, which the second failed run
    read and judged ours; it stays ours, so the LIS keeps X."""
    fakes = _LostWriteFakes()
    sync = _lost_write_sync(fakes)
    fakes.run(sync)
    original = fakes.lis["D1"].fields["city"]
    for city, fails in (("Русе", "after"), ("Сливен", "before")):
        fakes.edit_lis(city=city)
        fakes.crm_write_fails = fails
        assert "doctor:D1" in fakes.run(sync).failed
    assert fakes.crm["D1"].fields["city"] == "Русе"
    fakes.edit_lis(city=original)
    assert fakes.run(sync).failed == {}
    assert fakes.lis["D1"].fields["city"] == fakes.crm["D1"].fields["city"] == original


@pytest.mark.parametrize("lost", ["answer", "unconfirmed"])
def test_a_lost_mailchimp_upsert_is_sent_again_when_the_content_returns(lost: str) -> None:
    """X is in the audience; an upsert of Y runs but its answer is lost (or its batch is still running when
    we stop waiting); the LIS returns to X, whose digest is the stored one: without forgetting that digest
    the audience kept Y."""
    fakes = _LostWriteFakes()
    sync = _lost_write_sync(fakes, mailchimp=True)
    assert fakes.run(sync).audience_upserted == 1
    synced = dict(fakes.audience["D1"])
    fakes.edit_lis(city="Русе")
    fakes.lose_upsert = lost
    failed = {"doctor:audience": "TimeoutError"} if lost == "answer" else {}
    assert fakes.run(sync).failed == failed
    assert fakes.audience["D1"] != synced  # the lost upsert ran
    fakes.edit_lis(city="Варна")  # what the audience was sent first
    back = fakes.run(sync)
    assert back.failed == {} and back.audience_upserted == 1
    assert fakes.audience["D1"] == synced
    again = fakes.run(sync)
    assert again.audience_upserted == 0  # settled: the same content is not sent twice


def test_an_opt_out_tick_of_unknown_outcome_is_ours_and_a_managers_tick_is_still_heard() -> None:
    """The LIS flag is written to vTiger's ``emailoptout``; the write runs, its answer is lost, and the clerk
    lifts the flag. The tick vTiger shows is our write, not a manager's opt-out: nothing is recorded from it
    and vTiger follows the LIS. After a lost write that left the box unticked, a manager's tick is heard."""
    fakes = _LostWriteFakes()
    sync = _lost_write_sync(fakes, ledger=True)
    assert fakes.run(sync).crm_created == 1
    fakes.edit_lis(do_not_mail=True)
    fakes.crm_write_fails = "after"
    assert "doctor:D1" in fakes.run(sync).failed and fakes.crm["D1"].do_not_mail
    fakes.edit_lis(do_not_mail=False)
    assert fakes.run(sync).failed == {}
    assert fakes.crm_opt_outs == [] and not fakes.crm["D1"].do_not_mail
    fakes.edit_lis(city="Русе")
    fakes.crm_write_fails = "after"
    assert "doctor:D1" in fakes.run(sync).failed
    row = fakes.crm["D1"]
    fakes.crm["D1"] = CrmRecord("doctor", row.crm_id, "D1", row.fields, do_not_mail=True)  # a manager ticks it
    fakes.run(sync)
    assert fakes.crm_opt_outs == [directory_subject("doctor", "D1")] and fakes.crm["D1"].do_not_mail
