"""Behaviour tests for the Bitrix24 REST emulator (sandbox/emulators/bitrix24.py).

Most tests drive the WSGI app in-process through werkzeug's test client; the real-client tests serve it on
loopback. Time-dependent behaviour (rate limits, token expiry, DATE_MODIFY) uses the controllable clock.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
import pytest
from fast_bitrix24 import Bitrix
from werkzeug.test import Client
from werkzeug.wrappers import Request, Response

from sandbox.emulators.base import Clock, serve
from sandbox.emulators.bitrix24 import (
    Bitrix24Emulator,
    PhpQueryError,
    build_php_tree,
    normalize_phone,
    parse_php_query,
)

T0 = 1_767_258_000.0  # 2026-01-01T12:00:00+03:00


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def emu(clock: Clock) -> Bitrix24Emulator:
    return Bitrix24Emulator(clock)


@pytest.fixture
def client(emu: Bitrix24Emulator) -> Client:
    return Client(emu)


def call(client: Client, emu: Bitrix24Emulator, method: str, expect: int = 200, **params: Any) -> Any:
    response = client.post(emu.webhook_path + method, json=params)
    assert response.status_code == expect, response.get_data(as_text=True)
    return response.get_json()


# --------------------------------------------------------------------------------------------------------
# Auth and routing
# --------------------------------------------------------------------------------------------------------


def test_bad_webhook_secret_and_user_are_rejected_with_no_auth_found(emu: Bitrix24Emulator, client: Client) -> None:
    for path in (f"/rest/{emu.user_id}/wrong-secret/crm.contact.list", "/rest/99/" + emu.webhook_secret + "/profile"):
        response = client.post(path, json={})
        assert response.status_code == 401
        assert response.get_json() == {"error": "NO_AUTH_FOUND", "error_description": "Wrong authorization data"}
    # The right secret works, with and without the .json suffix.
    assert call(client, emu, "profile")["result"]["ID"] == str(emu.user_id)
    assert call(client, emu, "profile.json")["result"]["ID"] == str(emu.user_id)
    assert emu.webhook_url("http://h:1/") == f"http://h:1/rest/{emu.user_id}/{emu.webhook_secret}/"


def test_unknown_method_is_404_method_not_found(emu: Bitrix24Emulator, client: Client) -> None:
    body = call(client, emu, "crm.deal.frobnicate", expect=404)
    assert body == {"error": "ERROR_METHOD_NOT_FOUND", "error_description": "Method not found!"}


# --------------------------------------------------------------------------------------------------------
# CRUD, paging, legacy errors
# --------------------------------------------------------------------------------------------------------


def test_contact_add_get_update_with_string_typed_fields(emu: Bitrix24Emulator, client: Client) -> None:
    new_id = call(
        client,
        emu,
        "crm.contact.add",
        fields={
            "NAME": "Анна",
            "LAST_NAME": "Петрова",
            "BIRTHDATE": "1990-05-17",
            "ORIGINATOR_ID": "mis",
            "ORIGIN_ID": "p-42",
            "UF_CRM_MIS_PATIENT": 42,
            "ID": 999,  # read-only: silently ignored
            "BOGUS": "x",  # unknown: silently dropped
        },
    )["result"]
    assert isinstance(new_id, int) and new_id != 999
    got = call(client, emu, "crm.contact.get", id=new_id)["result"]
    assert got["ID"] == str(new_id)
    assert got["NAME"] == "Анна" and got["ORIGIN_ID"] == "p-42" and got["ORIGINATOR_ID"] == "mis"
    assert got["UF_CRM_MIS_PATIENT"] == "42"  # UF values come back as strings
    assert got["BIRTHDATE"] == "1990-05-17T03:00:00+03:00"
    assert got["DATE_CREATE"] == "2026-01-01T12:00:00+03:00"
    assert got["CREATED_BY_ID"] == got["ASSIGNED_BY_ID"] == str(emu.user_id)
    assert got["HAS_PHONE"] == "N" and "BOGUS" not in got and "PHONE" not in got

    emu.clock.advance(90)
    assert call(client, emu, "crm.contact.update", ID=new_id, FIELDS={"LAST_NAME": "Сидорова"})["result"] is True
    got = call(client, emu, "crm.contact.get", ID=new_id)["result"]
    assert got["LAST_NAME"] == "Сидорова" and got["NAME"] == "Анна"
    assert got["DATE_MODIFY"] == "2026-01-01T12:01:30+03:00"
    assert got["DATE_CREATE"] == "2026-01-01T12:00:00+03:00"

    assert call(client, emu, "crm.contact.delete", id=new_id)["result"] is True
    assert new_id not in emu.contacts


def test_legacy_error_envelopes(emu: Bitrix24Emulator, client: Client) -> None:
    assert call(client, emu, "crm.deal.get", expect=400, id=0) == {
        "error": "",
        "error_description": "ID is not defined or invalid.",
    }
    assert call(client, emu, "crm.deal.get", expect=400, id=12345)["error_description"] == "Not found"
    assert call(client, emu, "crm.deal.update", expect=400, id=12345, fields={})["error_description"] == "Not found"
    assert call(client, emu, "crm.contact.add", expect=400)["error_description"] == "Parameter 'fields' must be array."
    assert call(client, emu, "crm.lead.add", expect=400, fields="TITLE")["error"] == ""
    bad_email = call(client, emu, "crm.contact.add", expect=400, fields={"EMAIL": [{"VALUE": "not-an-email"}]})
    assert bad_email["error"] == "ERROR_CORE"
    assert emu.contacts == {}


def test_list_paging_total_next_and_fast_mode(emu: Bitrix24Emulator, client: Client) -> None:
    for i in range(120):
        emu.manager_create_contact(NAME=f"Пациент {i:03d}")
    first = call(client, emu, "crm.contact.list", select=["ID", "NAME"], order={"ID": "ASC"})
    assert first["total"] == 120 and first["next"] == 50 and len(first["result"]) == 50
    assert set(first["result"][0]) == {"ID", "NAME"}
    assert set(first) == {"result", "total", "next", "time"}
    assert set(first["time"]) == {
        "start",
        "finish",
        "duration",
        "processing",
        "date_start",
        "date_finish",
        "operating",
        "operating_reset_at",
    }
    second = call(client, emu, "crm.contact.list", select=["ID"], start=50)
    assert second["next"] == 100 and second["result"][0]["ID"] == "51"
    last = call(client, emu, "crm.contact.list", select=["ID"], start=100)
    assert "next" not in last and len(last["result"]) == 20 and last["total"] == 120
    # Bitrix turns start into a page number, so an unaligned start falls back to the page boundary.
    assert call(client, emu, "crm.contact.list", select=["ID"], start=75)["result"][0]["ID"] == "51"

    # Fast paging: >ID window + start=-1 → no count ("total": 0) and never a "next".
    seen: list[str] = []
    last_id = 0
    while True:
        page = call(
            client,
            emu,
            "crm.contact.list",
            select=["ID"],
            order={"ID": "ASC"},
            filter={">ID": last_id},
            start=-1,
        )
        assert page["total"] == 0 and "next" not in page
        seen += [row["ID"] for row in page["result"]]
        if len(page["result"]) < 50:
            break
        last_id = int(page["result"][-1]["ID"])
    assert seen == [str(i) for i in range(1, 121)]


def test_top_level_param_names_are_case_insensitive_and_get_query_strings_work(
    emu: Bitrix24Emulator, client: Client
) -> None:
    lead_id = call(client, emu, "crm.lead.add", FIELDS={"TITLE": "Запись с сайта", "NAME": "Олег"})["result"]
    call(client, emu, "crm.lead.add", Fields={"TITLE": "Другой"})
    by_get = client.get(
        emu.webhook_path + "crm.lead.list?FILTER[%3DTITLE]=%D0%97%D0%B0%D0%BF%D0%B8%D1%81%D1%8C+%D1%81+%D1%81%D0%B0"
        "%D0%B9%D1%82%D0%B0&SELECT[]=ID&SELECT[]=TITLE&ORDER[ID]=DESC"
    ).get_json()
    assert by_get["result"] == [{"ID": str(lead_id), "TITLE": "Запись с сайта"}]
    form = urlencode({"id": lead_id, "fields[STATUS_ID]": "IN_PROCESS", "fields[UTM_SOURCE]": "yandex"})
    response = client.post(
        emu.webhook_path + "crm.lead.update", data=form, content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 200 and response.get_json()["result"] is True
    lead = emu.record("lead", lead_id)
    assert lead is not None
    assert lead["STATUS_ID"] == "IN_PROCESS" and lead["UTM_SOURCE"] == "yandex" and lead["STATUS_SEMANTIC_ID"] == "P"


# --------------------------------------------------------------------------------------------------------
# Multifields and filters
# --------------------------------------------------------------------------------------------------------


def test_multifield_edit_append_delete_semantics(emu: Bitrix24Emulator, client: Client) -> None:
    contact_id = call(
        client,
        emu,
        "crm.contact.add",
        fields={
            "NAME": "Ирина",
            "PHONE": [
                {"VALUE": "+79161234567", "VALUE_TYPE": "MOBILE"},
                {"VALUE": "+74951112233", "VALUE_TYPE": "WORK"},
                {"VALUE": "+74950000000", "VALUE_TYPE": "HOME"},
            ],
            "EMAIL": [{"VALUE": "irina@example.com", "VALUE_TYPE": "WORK"}],
        },
    )["result"]
    phones = call(client, emu, "crm.contact.get", id=contact_id)["result"]["PHONE"]
    assert [p["TYPE_ID"] for p in phones] == ["PHONE"] * 3
    assert all(isinstance(p["ID"], str) for p in phones)
    mobile, work, home = phones

    call(
        client,
        emu,
        "crm.contact.update",
        id=contact_id,
        fields={
            "PHONE": [
                {"ID": mobile["ID"], "VALUE": "+79160000001", "VALUE_TYPE": "MOBILE"},  # edit
                {"ID": work["ID"], "DELETE": "Y"},  # delete by flag
                {"VALUE": "+78120000002", "VALUE_TYPE": "OTHER"},  # append
            ]
        },
    )
    after = call(client, emu, "crm.contact.get", id=contact_id)["result"]
    assert [(p["ID"], p["VALUE"]) for p in after["PHONE"]] == [
        (mobile["ID"], "+79160000001"),
        (home["ID"], "+74950000000"),  # not mentioned → kept
        (after["PHONE"][2]["ID"], "+78120000002"),
    ]
    assert int(after["PHONE"][2]["ID"]) > int(home["ID"])
    assert after["EMAIL"][0]["VALUE"] == "irina@example.com"  # other multifield untouched

    # An empty VALUE deletes; a naive "set PHONE=[number]" appends a duplicate every time.
    call(client, emu, "crm.contact.update", id=contact_id, fields={"PHONE": [{"ID": home["ID"], "VALUE": ""}]})
    call(client, emu, "crm.contact.update", id=contact_id, fields={"PHONE": [{"VALUE": "+79160000001"}]})
    values = [p["VALUE"] for p in emu.contacts[contact_id]["PHONE"]]
    assert values == ["+79160000001", "+78120000002", "+79160000001"]

    star = call(client, emu, "crm.contact.list", select=["*"], filter={"ID": contact_id})["result"][0]
    assert "PHONE" not in star and "EMAIL" not in star and star["NAME"] == "Ирина"
    with_phone = call(client, emu, "crm.contact.list", select=["*", "PHONE"], filter={"ID": contact_id})["result"][0]
    assert len(with_phone["PHONE"]) == 3 and "EMAIL" not in with_phone and with_phone["NAME"] == "Ирина"


def test_list_filters(emu: Bitrix24Emulator, client: Client, clock: Clock) -> None:
    ids = []
    for i, name in enumerate(["Алексей", "Борис", "Вера", "Галина"]):
        ids.append(emu.manager_create_contact(NAME=name, PHONE=[{"VALUE": f"+7916000000{i}"}], ORIGINATOR_ID="mis"))
        clock.advance(60)
    checkpoint = "2026-01-01T12:01:30+03:00"
    clock.advance(3600)
    emu.manager_update_contact(ids[0], POST="врач")  # touches DATE_MODIFY of the first one

    def names(flt: dict[str, Any], order: dict[str, str] | None = None) -> list[str]:
        params: dict[str, Any] = {"filter": flt, "select": ["NAME"]}
        if order:
            params["order"] = order
        return [row["NAME"] for row in call(client, emu, "crm.contact.list", **params)["result"]]

    assert names({"@ID": [ids[1], str(ids[3])]}) == ["Борис", "Галина"]
    assert names({"!@ID": [ids[1], ids[3]]}) == ["Алексей", "Вера"]
    assert names({">DATE_MODIFY": checkpoint}) == ["Алексей", "Вера", "Галина"]
    assert names({">=ID": ids[2], "<ID": ids[3]}) == ["Вера"]
    assert names({"%NAME": "ЕР"}) == ["Вера"]  # LIKE, case-insensitive
    assert names({"!NAME": "Вера", "ORIGINATOR_ID": "mis"}, {"NAME": "DESC"}) == ["Галина", "Борис", "Алексей"]
    assert names({"PHONE": "+79160000002"}) == ["Вера"]
    assert names({"PHONE": "89160000002"}) == []  # multifield filters are exact string matches
    assert names({"NOT_A_FIELD": "x", "=ID": ids[0]}) == ["Алексей"]  # unknown keys are ignored


def test_findbycomm_matches_phone_formats_and_returns_php_empty_array(emu: Bitrix24Emulator, client: Client) -> None:
    contact_id = emu.manager_create_contact(NAME="Мария", PHONE=[{"VALUE": "+7 916 123-45-67"}])
    lead_id = emu.manager_create_lead(TITLE="Звонок", PHONE=[{"VALUE": "89161234567"}])
    emu.manager_create_contact(NAME="Чужой", PHONE=[{"VALUE": "+7 916 765-43-21"}])
    for query in ("+7 916 123-45-67", "89161234567", "9161234567", "+7 (916) 123-45-67 доб. 12"):
        body = call(client, emu, "crm.duplicate.findbycomm", type="PHONE", values=[query])
        assert body["result"] == {"LEAD": [lead_id], "CONTACT": [contact_id]}, query
    only_contacts = call(
        client, emu, "crm.duplicate.findbycomm", type="PHONE", values=["9161234567"], entity_type="CONTACT"
    )
    assert only_contacts["result"] == {"CONTACT": [contact_id]}

    raw = client.post(
        emu.webhook_path + "crm.duplicate.findbycomm", json={"type": "PHONE", "values": ["+79990000000"]}
    ).get_data(as_text=True)
    assert raw.startswith('{"result":[],')  # PHP empty array, not {}
    assert call(client, emu, "crm.duplicate.findbycomm", expect=400, values=["1"])["error_description"] == (
        "Communication type is not defined."
    )
    assert normalize_phone("8 (916) 123-45-67") == normalize_phone("+79161234567") == "79161234567"


# --------------------------------------------------------------------------------------------------------
# Pipelines, stages, deals
# --------------------------------------------------------------------------------------------------------


def test_categories_and_stage_lists(emu: Bitrix24Emulator, client: Client) -> None:
    cats = call(client, emu, "crm.category.list", entityTypeId=2)
    assert cats["total"] == 2
    assert [(c["id"], c["name"], c["isDefault"]) for c in cats["result"]["categories"]] == [
        (0, "Первичные", "Y"),
        (1, "Повторные", "N"),
    ]
    stages = call(client, emu, "crm.status.list", filter={"ENTITY_ID": "DEAL_STAGE"})["result"]
    assert [s["STATUS_ID"] for s in stages] == [
        "NEW",
        "PREPARATION",
        "PREPAYMENT_INVOICE",
        "EXECUTING",
        "FINAL_INVOICE",
        "WON",
        "LOSE",
        "APOLOGY",
    ]
    by_id = {s["STATUS_ID"]: s for s in stages}
    assert by_id["PREPAYMENT_INVOICE"]["NAME"] == "Запись на прием"
    assert by_id["EXECUTING"]["NAME"] == "Прием состоялся"
    assert by_id["WON"]["SEMANTICS"] == "S" and by_id["WON"]["EXTRA"]["SEMANTICS"] == "success"
    assert by_id["APOLOGY"]["SEMANTICS"] == "F" and by_id["NEW"]["SEMANTICS"] is None
    assert by_id["NEW"]["CATEGORY_ID"] is None and isinstance(by_id["NEW"]["SORT"], str)

    assert call(client, emu, "crm.status.list", filter={"ENTITY_ID": "DEAL_STAGE_0"})["result"] == []
    repeat = call(client, emu, "crm.status.list", filter={"ENTITY_ID": "DEAL_STAGE_1"})["result"]
    assert repeat[0]["STATUS_ID"] == "C1:NEW" and repeat[0]["CATEGORY_ID"] == "1"
    leads = call(client, emu, "crm.status.list", filter={"ENTITY_ID": "STATUS"})["result"]
    assert {s["STATUS_ID"] for s in leads} == {"NEW", "IN_PROCESS", "PROCESSED", "JUNK", "CONVERTED"}

    emu.rename_stage("C1:EXECUTING", "Повторный прием проведен")
    cid = emu.add_category("Стоматология")
    extra = emu.add_stage(cid, "Ждет рентген")
    renamed = call(client, emu, "crm.status.list", filter={"STATUS_ID": "C1:EXECUTING"})["result"]
    assert [s["NAME"] for s in renamed] == ["Повторный прием проведен"]
    new_stages = [
        s["STATUS_ID"]
        for s in call(client, emu, "crm.status.list", filter={"ENTITY_ID": f"DEAL_STAGE_{cid}"})["result"]
    ]
    assert (
        extra.startswith(f"C{cid}:UC_")
        and extra in new_stages
        and new_stages.index(extra) < new_stages.index(f"C{cid}:WON")
    )


def test_deal_stage_category_and_contact_bindings(emu: Bitrix24Emulator, client: Client) -> None:
    c1, c2, c3 = (emu.manager_create_contact(NAME=n) for n in ("А", "Б", "В"))
    deal_id = call(
        client,
        emu,
        "crm.deal.add",
        fields={"TITLE": "Прием", "CATEGORY_ID": 1, "CONTACT_IDS": [c1, c2], "OPPORTUNITY": 1500},
    )["result"]
    deal = call(client, emu, "crm.deal.get", id=deal_id)["result"]
    assert deal["STAGE_ID"] == "C1:NEW" and deal["CATEGORY_ID"] == "1" and deal["OPPORTUNITY"] == "1500.00"
    assert deal["STAGE_SEMANTIC_ID"] == "P" and deal["CLOSED"] == "N" and deal["CONTACT_ID"] == str(c1)
    assert "CONTACT_IDS" not in deal

    # CATEGORY_ID is immutable through crm.deal.update; a stage of another pipeline is refused.
    call(client, emu, "crm.deal.update", id=deal_id, fields={"CATEGORY_ID": 0, "STAGE_ID": "C1:WON"})
    deal = call(client, emu, "crm.deal.get", id=deal_id)["result"]
    assert deal["CATEGORY_ID"] == "1" and deal["STAGE_ID"] == "C1:WON"
    assert deal["STAGE_SEMANTIC_ID"] == "S" and deal["CLOSED"] == "Y"
    assert call(client, emu, "crm.deal.update", expect=400, id=deal_id, fields={"STAGE_ID": "WON"})["error"] == ""

    # CONTACT_IDS on update replaces the set; crm.deal.contact.add adds one binding.
    call(client, emu, "crm.deal.update", id=deal_id, fields={"CONTACT_IDS": [c3]})
    assert emu.deal_contact_ids(deal_id) == [c3]
    call(client, emu, "crm.deal.contact.add", id=deal_id, fields={"CONTACT_ID": c1, "IS_PRIMARY": "Y"})
    items = call(client, emu, "crm.deal.contact.items.get", id=deal_id)["result"]
    assert {(i["CONTACT_ID"], i["IS_PRIMARY"]) for i in items} == {(c3, "N"), (c1, "Y")}
    assert call(client, emu, "crm.deal.get", id=deal_id)["result"]["CONTACT_ID"] == str(c1)

    default_deal = call(client, emu, "crm.deal.add", fields={"STAGE_ID": "PREPAYMENT_INVOICE"})["result"]
    assert (
        emu.deals[default_deal]["CATEGORY_ID"] == "0" and emu.deals[default_deal]["TITLE"] == f"Сделка #{default_deal}"
    )


# --------------------------------------------------------------------------------------------------------
# Batch
# --------------------------------------------------------------------------------------------------------


def test_batch_chaining_sections_and_php_empty_arrays(emu: Bitrix24Emulator, client: Client) -> None:
    emu.manager_create_contact(NAME="Существующий", ORIGIN_ID="p-1")
    response = client.post(
        emu.webhook_path + "batch",
        json={
            "halt": 0,
            "cmd": {
                "c1": "crm.contact.add?fields[NAME]=%D0%98%D0%B2%D0%B0%D0%BD&fields[PHONE][0][VALUE]=%2B79161234567",
                "d1": "crm.deal.add?fields[TITLE]=Visit&fields[CONTACT_ID]=$result[c1]",
                "found": "crm.contact.list?filter[ORIGIN_ID]=p-1&select[]=ID",
                "again": "crm.contact.get?id=$result[found][0][ID]",
                "phone": "crm.contact.get?id=$result[c1]",
                "title": "crm.deal.update?id=$result[d1]&fields[COMMENTS]=for+$result[again][NAME]",
            },
        },
    )
    assert response.status_code == 200
    raw = response.get_data(as_text=True)
    assert '"result_error":[]' in raw and '"result_next":[]' in raw
    body = response.get_json()["result"]
    c1, d1 = body["result"]["c1"], body["result"]["d1"]
    assert emu.deals[d1]["CONTACT_ID"] == str(c1)
    assert body["result"]["again"]["NAME"] == "Существующий"
    assert body["result"]["phone"]["PHONE"][0]["VALUE"] == "+79161234567"  # %2B survived as "+"
    assert emu.deals[d1]["COMMENTS"] == "for Существующий"
    assert body["result_total"] == {"found": 1}
    assert set(body["result_time"]) == {"c1", "d1", "found", "again", "phone", "title"}
    assert emu.stats()["methods"] == {"batch": 1}
    assert emu.stats()["batch_commands"]["crm.contact.get"] == 2


def test_batch_halt_length_limit_nesting_and_list_cmd(emu: Bitrix24Emulator, client: Client) -> None:
    halted = call(
        client,
        emu,
        "batch",
        halt=1,
        cmd={"a": "crm.lead.add?fields[TITLE]=one", "b": "crm.lead.get?id=0", "c": "crm.lead.add?fields[TITLE]=two"},
    )["result"]
    assert list(halted["result"]) == ["a"] and list(halted["result_error"]) == ["b"]
    assert "c" not in halted["result"] and "c" not in halted["result_error"]
    assert [lead["TITLE"] for lead in emu.leads.values()] == ["one"]

    not_halted = call(client, emu, "batch", cmd={"b": "crm.lead.get?id=0", "c": "crm.lead.add?fields[TITLE]=two"})
    assert "c" in not_halted["result"]["result"]

    many = {f"k{i:02d}": "crm.lead.list?select[]=ID&start=-1" for i in range(52)}
    too_long = call(client, emu, "batch", cmd=many)["result"]
    assert len(too_long["result"]) == 50
    assert too_long["result_error"] == {
        key: {"error": "ERROR_BATCH_LENGTH_EXCEEDED", "error_description": "Max batch length exceeded"}
        for key in ("k50", "k51")
    }

    nested = call(client, emu, "batch", cmd=["batch?cmd[x]=profile", "profile"])["result"]
    # PHP arrays keyed 0..n-1 encode as JSON lists, other numeric keys as objects.
    assert nested["result_error"] == [
        {"error": "ERROR_BATCH_METHOD_NOT_ALLOWED", "error_description": "Method is not allowed for batch usage"}
    ]
    assert nested["result"] == {"1": {"ID": "1", "ADMIN": True, "NAME": "Администратор", "LAST_NAME": "Клиники"}}
    as_list = call(client, emu, "batch", cmd=["profile", "server.time"])["result"]
    assert isinstance(as_list["result"], list) and as_list["result"][1] == "2026-01-01T12:00:00+03:00"


# --------------------------------------------------------------------------------------------------------
# Rate limits
# --------------------------------------------------------------------------------------------------------


def test_leaky_bucket_503_after_burst_and_recovery(emu: Bitrix24Emulator, client: Client, clock: Clock) -> None:
    for i in range(50):
        call(client, emu, "crm.lead.add", fields={"TITLE": f"burst {i}"})
    refused = client.post(emu.webhook_path + "crm.lead.add", json={"fields": {"TITLE": "refused"}})
    assert refused.status_code == 503
    assert refused.get_json() == {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}
    assert len(emu.leads) == 50  # the refused request did not execute

    clock.advance(1.0)  # drains 2 requests
    call(client, emu, "profile")
    call(client, emu, "batch", cmd={f"c{i}": "profile" for i in range(50)})  # a whole batch costs one slot
    assert client.post(emu.webhook_path + "profile", json={}).status_code == 503
    assert emu.stats()["rate_limited_503"] == 2 and emu.stats()["requests"] == 54

    clock.advance(30)
    assert emu.bucket_level() == 0.0
    call(client, emu, "profile")
    emu.limits.enabled = False
    for _ in range(60):
        call(client, emu, "profile")


def test_operating_time_limit_blocks_only_that_method(emu: Bitrix24Emulator, client: Client, clock: Clock) -> None:
    emu.limits.method_costs["crm.deal.list"] = 100.0
    for n in range(1, 6):
        body = call(client, emu, "crm.deal.list")
        assert body["time"]["operating"] == pytest.approx(100.0 * n)
        assert body["time"]["operating_reset_at"] == int(T0 + 600)
    blocked = call(client, emu, "crm.deal.list", expect=429)
    assert blocked == {
        "error": "OPERATION_TIME_LIMIT",
        "error_description": "Method is blocked due to operation time limit.",
    }
    call(client, emu, "crm.contact.list")  # other methods keep working
    in_batch = call(client, emu, "batch", cmd={"d": "crm.deal.list", "c": "crm.contact.list"})["result"]
    assert in_batch["result_error"]["d"]["error"] == "OPERATION_TIME_LIMIT" and "c" in in_batch["result"]
    assert emu.stats()["rate_limited_429"] == 1

    clock.advance(601)
    assert call(client, emu, "crm.deal.list")["time"]["operating"] == pytest.approx(100.0)


# --------------------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------------------


def test_html_fault_body_then_normal_service(emu: Bitrix24Emulator, client: Client) -> None:
    emu.faults.add(method="crm.deal.add", status=502, html=True)
    other = call(client, emu, "crm.contact.add", fields={"NAME": "ok"})  # not the faulted method
    assert other["result"] == 1
    response = client.post(emu.webhook_path + "crm.deal.add", json={"fields": {"TITLE": "x"}})
    assert response.status_code == 502 and response.mimetype == "text/html"
    assert response.get_data(as_text=True) == "<html><body>502 Bad Gateway</body></html>"
    assert emu.deals == {}  # failed before the write
    assert call(client, emu, "crm.deal.add", fields={"TITLE": "x"})["result"] == 1  # times=1: consumed

    emu.faults.add(status=500)  # any method, JSON body
    assert call(client, emu, "profile", expect=500)["error"] == "INTERNAL_SERVER_ERROR"


def test_after_apply_fault_loses_the_response_but_keeps_the_write(emu: Bitrix24Emulator, client: Client) -> None:
    emu.bind_event("ONCRMCONTACTADD", "https://sync.example/b24")
    emu.faults.add(method="crm.contact.add", status=504, after_apply=True)
    response = client.post(emu.webhook_path + "batch", json={"cmd": {"a": "crm.contact.add?fields[ORIGIN_ID]=p-7"}})
    assert response.status_code == 504
    assert [c["ORIGIN_ID"] for c in emu.contacts.values()] == ["p-7"]  # the add happened
    assert [e.event for e in emu.pending_events()] == ["ONCRMCONTACTADD"]
    retry_lookup = call(client, emu, "crm.contact.list", filter={"ORIGIN_ID": "p-7"}, select=["ID"])
    assert retry_lookup["total"] == 1


# --------------------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------------------


def test_events_for_own_writes_are_delivered_form_encoded_without_retries(
    emu: Bitrix24Emulator, client: Client, clock: Clock
) -> None:
    handler_id = emu.bind_event("ONCRMDEALUPDATE", "https://sync.example/b24")
    emu.bind_event("ONCRMDEALADD", "https://sync.example/b24")
    deal_id = call(client, emu, "crm.deal.add", fields={"TITLE": "x"})["result"]
    call(client, emu, "crm.deal.update", id=deal_id, fields={"STAGE_ID": "EXECUTING"})
    emu.manager_update_deal(deal_id, COMMENTS="правка менеджера")
    assert [e.event for e in emu.pending_events()] == ["ONCRMDEALADD", "ONCRMDEALUPDATE", "ONCRMDEALUPDATE"]

    clock.advance(5)
    received: list[tuple[str, dict[str, str], dict[str, str]]] = []

    def post(url: str, body: bytes, headers: dict[str, str]) -> int:
        received.append((url, dict(parse_qsl(body.decode())), headers))
        return 500 if len(received) == 3 else 200

    results = emu.deliver_events(post)
    assert [r.ok for r in results] == [True, True, False]
    url, form, headers = received[1]
    assert url == "https://sync.example/b24" and headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert form == {
        "event": "ONCRMDEALUPDATE",
        "event_handler_id": str(handler_id),
        "data[FIELDS][ID]": str(deal_id),
        "ts": str(int(T0 + 5)),
        "auth[domain]": emu.domain,
        "auth[client_endpoint]": f"https://{emu.domain}/rest/",
        "auth[server_endpoint]": "https://oauth.bitrix.info/rest/",
        "auth[member_id]": emu.member_id,
        "auth[application_token]": emu.application_token,
    }
    nested = parse_php_query(results[1].body.decode())
    assert nested["data"] == {"FIELDS": {"ID": str(deal_id)}} and nested["auth"]["application_token"]
    assert emu.pending_events() == [] and emu.deliver_events(post) == []  # never retried
    assert len(emu.delivery_failures) == 1 and emu.stats()["events_failed"] == 1

    emu.drop_next_events(1)
    call(client, emu, "crm.deal.update", id=deal_id, fields={"COMMENTS": "lost"})
    call(client, emu, "crm.deal.update", id=deal_id, fields={"COMMENTS": "kept"})
    assert len(emu.pending_events()) == 1 and len(emu.dropped_events) == 1


def test_default_event_delivery_posts_over_http(emu: Bitrix24Emulator) -> None:
    bodies: list[dict[str, str]] = []

    def handler(environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        bodies.append(dict(request.form))
        return Response("ok")(environ, start_response)

    receiver = serve(handler)
    try:
        emu.bind_event("ONCRMLEADADD", receiver.base_url + "/events")
        lead_id = emu.manager_create_lead(TITLE="С сайта")
        (result,) = emu.deliver_events()
        assert result.ok and result.status == 200
        assert bodies == [bodies[0]] and bodies[0]["data[FIELDS][ID]"] == str(lead_id)
        assert bodies[0]["auth[application_token]"] == emu.application_token
    finally:
        receiver.stop()


# --------------------------------------------------------------------------------------------------------
# OAuth
# --------------------------------------------------------------------------------------------------------


def test_oauth_expiry_refresh_rotation_and_app_only_methods(
    emu: Bitrix24Emulator, client: Client, clock: Clock
) -> None:
    tokens = emu.issue_tokens()
    ok = client.get(f"/rest/crm.deal.list?auth={tokens['access_token']}")
    assert ok.status_code == 200 and ok.get_json()["total"] == 0
    bind = client.post(
        "/rest/event.bind",
        json={"auth": tokens["access_token"], "event": "ONCRMDEALADD", "handler": "https://sync.example/app"},
    )
    assert bind.get_json()["result"] is True
    webhook_bind = call(client, emu, "event.bind", expect=403, event="ONCRMDEALADD", handler="https://x.example/")
    assert webhook_bind["error"] == "WRONG_AUTH_TYPE"

    clock.advance(3601)
    expired = client.post("/rest/crm.deal.list", json={"auth": tokens["access_token"]})
    assert expired.status_code == 401
    assert expired.get_json() == {
        "error": "expired_token",
        "error_description": "The access token provided has expired.",
    }

    refresh = {
        "grant_type": "refresh_token",
        "client_id": emu.client_id,
        "client_secret": emu.client_secret,
        "refresh_token": tokens["refresh_token"],
    }
    renewed = client.get("/oauth/token/?" + urlencode(refresh))
    assert renewed.status_code == 200
    pair = renewed.get_json()
    assert set(pair) >= {
        "access_token",
        "refresh_token",
        "expires",
        "expires_in",
        "client_endpoint",
        "server_endpoint",
        "domain",
        "member_id",
        "scope",
        "status",
        "user_id",
    }
    assert pair["expires_in"] == 3600 and pair["expires"] == int(T0 + 3601 + 3600)
    assert pair["refresh_token"] != tokens["refresh_token"] and pair["member_id"] == emu.member_id
    assert client.post("/rest/crm.deal.list", json={"auth": pair["access_token"]}).status_code == 200

    reused = client.post("/oauth/token/", data=refresh)
    assert reused.status_code == 400 and reused.get_json()["error"] == "invalid_grant"

    call(client, emu, "crm.deal.add", fields={"TITLE": "app event"})
    (app_event,) = emu.pending_events()
    form = dict(parse_qsl(emu.deliver_events(lambda *_: 200)[0].body.decode()))
    assert app_event.app and form["auth[access_token]"] and form["auth[status]"] == "L"


# --------------------------------------------------------------------------------------------------------
# Parsing robustness
# --------------------------------------------------------------------------------------------------------


def test_php_bracket_parser() -> None:
    tree = parse_php_query(
        "filter[>ID]=5&filter[@STAGE_ID][]=NEW&filter[@STAGE_ID][]=C1%3ANEW&select[]=ID&select[]=PHONE"
        "&fields[PHONE][0][VALUE]=%2B7916&fields[PHONE][0][VALUE_TYPE]=MOBILE&order[ID]=ASC&halt=0&a.b=1"
    )
    assert tree == {
        "filter": {">ID": "5", "@STAGE_ID": ["NEW", "C1:NEW"]},
        "select": ["ID", "PHONE"],
        "fields": {"PHONE": [{"VALUE": "+7916", "VALUE_TYPE": "MOBILE"}]},
        "order": {"ID": "ASC"},
        "halt": "0",
        "a_b": "1",
    }
    assert build_php_tree([("m[5]", "x"), ("m[]", "y")]) == {"m": {"5": "x", "6": "y"}}
    assert build_php_tree([("0", "a"), ("1", "b")]) == {"0": "a", "1": "b"}  # top level stays a map
    for bad in ("a[b=1", "a]=1", "[x]=1", "a[b]c=1", "a[[b]]=1"):
        with pytest.raises(PhpQueryError):
            parse_php_query(bad)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ("fields[NAME=x", "application/x-www-form-urlencoded"),
        ("{not json", "application/json"),
        ("[1, 2]", "application/json"),
        ("fields]]=1&x[", "application/x-www-form-urlencoded"),
        ('{"fields": "str", "filter": 5}', "application/json"),
        ('{"id": {"a": 1}, "fields": {"PHONE": "x", "EMAIL": [1, null, {"ID": []}]}}', "application/json"),
        ('{"cmd": "crm.contact.add"}', "application/json"),
        ('{"cmd": {"a": 5, "b": "crm.contact.get?id[]=1&x[=2"}}', "application/json"),
    ],
)
def test_malformed_input_gives_error_envelope_never_500(
    emu: Bitrix24Emulator, client: Client, body: str, content_type: str
) -> None:
    for method in ("crm.contact.add", "crm.contact.update", "crm.contact.list", "batch"):
        response = client.post(emu.webhook_path + method, data=body, content_type=content_type)
        assert response.status_code in (200, 400), (method, body, response.get_data(as_text=True))
        payload = response.get_json()
        if response.status_code == 400:
            assert set(payload) == {"error", "error_description"}
    assert client.get(emu.webhook_path + "crm.contact.list?filter[>ID=1").status_code == 400


# --------------------------------------------------------------------------------------------------------
# Real clients over loopback
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def served(emu: Bitrix24Emulator) -> Iterator[str]:
    server = serve(emu)
    try:
        yield server.base_url
    finally:
        server.stop()


def test_fast_bitrix24_client_works_unchanged(emu: Bitrix24Emulator, served: str) -> None:
    for i in range(70):
        emu.manager_create_contact(NAME=f"Старый {i}", ORIGINATOR_ID="mis")
    bitrix = Bitrix(emu.webhook_url(served), verbose=False)

    created = bitrix.call(
        "crm.contact.add",
        [
            {"fields": {"NAME": f"Новый {i}", "PHONE": [{"VALUE": f"+7916555{i:04d}", "VALUE_TYPE": "MOBILE"}]}}
            for i in range(60)
        ],
    )
    assert len(created) == 60 and len(set(created)) == 60  # parallel batches, every id unique
    # "+" survives batch encoding. fast_bitrix24 merges parallel batch replies in completion order, so
    # call() results are not guaranteed to follow input order: compare as sets.
    phones = {emu.contacts[cid]["PHONE"][0]["VALUE"] for cid in created}
    assert phones == {f"+7916555{i:04d}" for i in range(60)}

    everyone = bitrix.get_all("crm.contact.list", {"select": ["ID", "NAME"], "filter": {">ID": 0}})
    assert len(everyone) == 130 and {row["ID"] for row in everyone} == {str(i) for i in emu.contacts}

    batch = bitrix.call_batch(
        {"halt": 0, "cmd": {"deal": "crm.deal.add?fields[TITLE]=fb24", "get": "crm.deal.get?id=$result[deal]"}}
    )
    assert batch["get"]["ID"] == str(batch["deal"]) and batch["get"]["STAGE_ID"] == "NEW"
    stats = emu.stats()
    assert stats["methods"]["crm.contact.list"] == 1 and stats["batch_commands"]["crm.contact.add"] == 60
    assert stats["writes"] == 61 and stats["rate_limited_503"] == 0


def test_concurrent_http_clients_get_unique_ids(emu: Bitrix24Emulator, served: str) -> None:
    emu.limits.enabled = False
    url = emu.webhook_url(served)

    def worker(n: int) -> None:
        with httpx.Client() as http:
            for i in range(10):
                http.post(url + "crm.lead.add", json={"fields": {"TITLE": f"{n}-{i}"}}).raise_for_status()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(emu.leads) == list(range(1, 81))
    assert json.loads(httpx.get(url + "crm.lead.list?start=-1").text)["total"] == 0
    assert emu.stats()["requests"] == 81


def test_user_fields_keep_what_their_type_keeps(emu: Bitrix24Emulator, client: Client) -> None:
    """A date field drops the time (as BEGINDATE does); a datetime field keeps it, in the portal's offset."""
    for name, kind in (("CS_DAY", "date"), ("CS_AT", "datetime")):
        call(client, emu, "crm.deal.userfield.add", fields={"FIELD_NAME": name, "USER_TYPE_ID": kind})
    at = "2026-11-20T07:00:00+00:00"  # 10:00 in Moscow
    deal_id = call(
        client, emu, "crm.deal.add", fields={"TITLE": "t", "UF_CRM_CS_DAY": at, "UF_CRM_CS_AT": at, "BEGINDATE": at}
    )["result"]
    deal = call(client, emu, "crm.deal.get", id=deal_id)["result"]
    assert deal["UF_CRM_CS_AT"] == "2026-11-20T10:00:00+03:00"
    assert deal["UF_CRM_CS_DAY"] == deal["BEGINDATE"] == "2026-11-20T03:00:00+03:00"
    call(client, emu, "crm.deal.update", expect=400, id=deal_id, fields={"UF_CRM_CS_AT": "not a date"})
