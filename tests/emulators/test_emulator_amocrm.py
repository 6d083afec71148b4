"""Behaviour tests for the amoCRM API v4 emulator (sandbox/emulators/amocrm.py).

Most tests drive the WSGI app in-process through werkzeug's test client; the real-client test serves it on
loopback. Time-dependent behaviour (token expiry, rate limits, webhook retries) uses the controllable clock.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
from requests.adapters import HTTPAdapter
from werkzeug.test import Client, TestResponse

from sandbox.emulators.amocrm import (
    CONTACT_FIELD_EMAIL,
    CONTACT_FIELD_MIS_PATIENT_ID,
    CONTACT_FIELD_PHONE,
    LEAD_FIELD_APPOINTMENT_AT,
    LEAD_FIELD_MIS_APPOINTMENT_ID,
    LEAD_FIELD_SOURCE,
    LOST_STATUS_ID,
    MAIN_PIPELINE_ID,
    PHONE_ENUM_IDS,
    SOURCE_ENUM_IDS,
    STATUS_BOOKED,
    STATUS_IN_WORK,
    STATUS_NEW_REQUEST,
    STATUS_UNSORTED,
    STATUS_VISITED,
    WON_STATUS_ID,
    AmoCrmEmulator,
)
from sandbox.emulators.base import Clock, serve

T0 = 1_767_258_000.0  # 2026-01-01T12:00:00+03:00


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def emu(clock: Clock) -> AmoCrmEmulator:
    # The clock is frozen, so every request falls into the same second: limits are switched on only by the
    # rate-limit tests (the ``limited`` fixture).
    return AmoCrmEmulator(clock, rate_limit=False)


@pytest.fixture
def limited(emu: AmoCrmEmulator) -> AmoCrmEmulator:
    emu.limits.enabled = True
    return emu


@pytest.fixture
def client(emu: AmoCrmEmulator) -> Client:
    return Client(emu)


@pytest.fixture
def auth(emu: AmoCrmEmulator) -> dict[str, str]:
    return {"Authorization": "Bearer " + emu.issue_tokens()["access_token"]}


def api(
    client: Client,
    method: str,
    path: str,
    headers: dict[str, str],
    expect: int = 200,
    body: Any = None,
    **query: Any,
) -> Any:
    kwargs: dict[str, Any] = {"headers": headers, "query_string": query or None}
    if body is not None:
        kwargs["json"] = body
    response = client.open(path, method=method, **kwargs)
    assert response.status_code == expect, response.get_data(as_text=True)
    if response.status_code == 204:
        assert response.get_data() == b""
        return None
    if response.mimetype.endswith("json"):
        return response.get_json()
    return response.get_data(as_text=True)


def phone(value: str, enum_code: str = "MOB") -> dict[str, Any]:
    return {"field_code": "PHONE", "values": [{"value": value, "enum_code": enum_code}]}


def create_contact(client: Client, headers: dict[str, str], **fields: Any) -> int:
    body = api(client, "POST", "/api/v4/contacts", headers, body=[fields])
    return int(body["_embedded"]["contacts"][0]["id"])


def create_lead(client: Client, headers: dict[str, str], **fields: Any) -> int:
    body = api(client, "POST", "/api/v4/leads", headers, body=[fields])
    return int(body["_embedded"]["leads"][0]["id"])


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


class Recorder:
    """A webhook receiver for deliver_webhooks(post=...): records bodies, answers the scripted statuses."""

    def __init__(self, *statuses: int | Exception) -> None:
        self.statuses = list(statuses)
        self.calls: list[tuple[str, bytes, dict[str, str]]] = []

    def __call__(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        self.calls.append((url, body, headers))
        outcome = self.statuses.pop(0) if self.statuses else 200
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def form(self, index: int = -1) -> dict[str, str]:
        pairs = parse_qsl(self.calls[index][1].decode(), keep_blank_values=True)
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), "a key repeats: the indexes of several events collide"
        return dict(pairs)


# --------------------------------------------------------------------------------------------------------
# Auth and OAuth
# --------------------------------------------------------------------------------------------------------


def test_every_api_call_needs_a_valid_bearer_token(emu: AmoCrmEmulator, client: Client, clock: Clock) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        response = client.get("/api/v4/leads", headers=headers)
        assert response.status_code == 401
        assert response.mimetype == "application/problem+json"
        assert response.get_json() == {
            "title": "Unauthorized",
            "type": "https://httpstatus.es/401",
            "status": 401,
            "detail": "Invalid user name or password",
        }
    pair = emu.issue_tokens()
    headers = {"Authorization": "Bearer " + pair["access_token"]}
    assert pair["token_type"] == "Bearer" and pair["expires_in"] == 86400
    claims = jwt_claims(pair["access_token"])
    assert claims["exp"] == int(T0) + 86400 and claims["aud"] == emu.client_id
    api(client, "GET", "/api/v4/account", headers)
    clock.advance(86400 - 1)
    assert api(client, "GET", "/api/v4/account", headers)["subdomain"] == "clinic"
    clock.advance(1)  # exp reached
    assert client.get("/api/v4/account", headers=headers).status_code == 401
    assert emu.stats()["unauthorized_401"] == 4


def test_authorization_code_exchange_is_single_use_and_expires(
    emu: AmoCrmEmulator, client: Client, clock: Clock
) -> None:
    def exchange(code: str) -> TestResponse:
        return client.post(
            "/oauth2/access_token",
            json={
                "client_id": emu.client_id,
                "client_secret": emu.client_secret,
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": emu.redirect_uri,
            },
        )

    code = emu.issue_auth_code()
    first = exchange(code)
    assert first.status_code == 200
    assert set(first.get_json()) == {"token_type", "expires_in", "server_time", "access_token", "refresh_token"}
    assert emu.token_valid(first.get_json()["access_token"])
    again = exchange(code)
    assert again.status_code == 400
    assert again.get_json()["hint"] == "Authorization code has been revoked"
    assert again.get_json()["type"] == "https://developers.amocrm.ru/v3/errors/OAuthProblemJson"
    late = emu.issue_auth_code()
    clock.advance(20 * 60)
    assert exchange(late).get_json()["hint"] == "Authorization code has expired"
    assert exchange("garbage").get_json()["hint"] == "Cannot decrypt the authorization code"
    # Wrong secret or redirect URI: client authentication fails (401).
    bad = client.post(
        "/oauth2/access_token",
        json={
            "client_id": emu.client_id,
            "client_secret": "wrong",
            "grant_type": "authorization_code",
            "code": emu.issue_auth_code(),
            "redirect_uri": emu.redirect_uri,
        },
    )
    assert bad.status_code == 401 and bad.get_json()["hint"] == "Client authentication failed"
    assert emu.stats()["oauth_requests"] == 5
    assert emu.stats()["requests"] == 0  # OAuth calls are not API calls


def test_refresh_rotates_the_pair_and_a_reused_refresh_token_is_revoked(
    emu: AmoCrmEmulator, client: Client, clock: Clock
) -> None:
    pair = emu.issue_tokens()

    def refresh(token: str, *, form: bool = False) -> TestResponse:
        data = {
            "client_id": emu.client_id,
            "client_secret": emu.client_secret,
            "grant_type": "refresh_token",
            "refresh_token": token,
            "redirect_uri": emu.redirect_uri,
        }
        if form:
            return client.post("/oauth2/access_token", data=data)
        return client.post("/oauth2/access_token", json=data)

    clock.advance(3600)
    new = refresh(pair["refresh_token"])
    assert new.status_code == 200
    new_pair = new.get_json()
    assert new_pair["refresh_token"] != pair["refresh_token"]
    assert jwt_claims(new_pair["access_token"])["exp"] == int(T0) + 3600 + 86400
    # The old pair is dead: reuse of the refresh token is the classic "Token has been revoked".
    reused = refresh(pair["refresh_token"])
    assert reused.status_code == 400
    assert reused.mimetype == "application/problem+json"
    assert reused.get_json()["hint"] == "Token has been revoked"
    old_headers = {"Authorization": "Bearer " + pair["access_token"]}
    assert client.get("/api/v4/account", headers=old_headers).status_code == 401
    new_headers = {"Authorization": "Bearer " + new_pair["access_token"]}
    assert client.get("/api/v4/account", headers=new_headers).status_code == 200
    # Form-encoded bodies work too; the chain keeps rotating.
    third = refresh(new_pair["refresh_token"], form=True)
    assert third.status_code == 200
    assert refresh("def50200deadbeef").get_json()["hint"] == "Invalid refresh token"
    emu.revoked_refresh_status = 401  # the variant some captures show
    assert refresh(pair["refresh_token"]).status_code == 401
    # A refresh token lives 90 days.
    stale = third.get_json()["refresh_token"]
    clock.advance(90 * 86400)
    assert refresh(stale).get_json()["hint"] == "Token has expired"
    assert emu.stats()["token_refreshes"] == 2


def test_long_lived_token_has_no_refresh_and_outlives_24h(emu: AmoCrmEmulator, client: Client, clock: Clock) -> None:
    token = emu.issue_long_lived_token(days=30)
    headers = {"Authorization": f"Bearer {token}"}
    assert jwt_claims(token)["exp"] == int(T0) + 30 * 86400
    clock.advance(10 * 86400)
    assert client.get("/api/v4/account", headers=headers).status_code == 200
    clock.advance(20 * 86400)
    assert client.get("/api/v4/account", headers=headers).status_code == 401
    with pytest.raises(ValueError, match="1 day and 5 years"):
        emu.issue_long_lived_token(days=0.5)
    with pytest.raises(ValueError, match="1 day and 5 years"):
        emu.issue_long_lived_token(days=6 * 365)
    # expire_access_tokens() also ends long-lived ones; revoke_tokens() models a disabled integration.
    other = emu.issue_long_lived_token(days=365)
    emu.expire_access_tokens()
    assert not emu.token_valid(other)
    fresh = emu.issue_tokens()["access_token"]
    emu.revoke_tokens()
    assert client.get("/api/v4/account", headers={"Authorization": f"Bearer {fresh}"}).status_code == 401


# --------------------------------------------------------------------------------------------------------
# Envelopes, paging, search, filters
# --------------------------------------------------------------------------------------------------------


def test_empty_list_and_missing_entity_are_204_with_an_empty_body(client: Client, auth: dict[str, str]) -> None:
    for path in ("/api/v4/leads", "/api/v4/contacts", "/api/v4/leads/99", "/api/v4/contacts/99"):
        response = client.get(path, headers=auth)
        assert response.status_code == 204
        assert response.get_data() == b""
    # A search with no hits is 204 as well.
    create_contact(client, auth, name="Иван")
    assert api(client, "GET", "/api/v4/contacts", auth, expect=204, query="Пётр") is None


def test_list_paging_follows_links_next_until_it_disappears(
    emu: AmoCrmEmulator, client: Client, auth: dict[str, str]
) -> None:
    api(client, "POST", "/api/v4/leads", auth, body=[{"name": f"Lead {i}"} for i in range(7)])
    seen: list[int] = []
    page = api(client, "GET", "/api/v4/leads", auth, limit=3)
    pages = 1
    while True:
        assert page["_page"] == pages
        assert page["_links"]["self"]["href"].startswith("http://localhost/api/v4/leads?page=")
        seen += [lead["id"] for lead in page["_embedded"]["leads"]]
        if "next" not in page["_links"]:
            break
        href = urlsplit(page["_links"]["next"]["href"])
        page = api(client, "GET", href.path, auth, **dict(parse_qsl(href.query)))
        pages += 1
    assert pages == 3 and seen == sorted(emu.leads)
    assert api(client, "GET", "/api/v4/leads", auth, expect=204, page=4, limit=3) is None
    # Default page size is 50; 250 is the maximum.
    assert len(api(client, "GET", "/api/v4/leads", auth, limit=250)["_embedded"]["leads"]) == 7


def test_a_list_by_250_ids_without_limit_is_a_page_of_50(
    emu: AmoCrmEmulator, client: Client, auth: dict[str, str]
) -> None:
    ids = api(client, "POST", "/api/v4/contacts", auth, body=[{"name": f"C {i}"} for i in range(120)])
    wanted = [row["id"] for row in ids["_embedded"]["contacts"]]
    query = [("filter[id][]", str(i)) for i in wanted]
    body = client.get("/api/v4/contacts", headers=auth, query_string=query).get_json()
    assert [row["id"] for row in body["_embedded"]["contacts"]] == wanted[:50]
    assert "next" in body["_links"]
    limited = client.get("/api/v4/contacts", headers=auth, query_string=[*query, ("limit", "250")]).get_json()
    assert len(limited["_embedded"]["contacts"]) == 120
    assert [("limit" in args) for _, args in emu.list_reads()] == [False, True]


def test_limit_over_250_is_a_400_problem_or_clamped_when_configured(client: Client, auth: dict[str, str]) -> None:
    create_lead(client, auth, name="x")
    response = client.get("/api/v4/leads?limit=251", headers=auth)
    assert response.status_code == 400
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["title"] == "Bad Request" and body["status"] == 400 and "250" in body["detail"]
    assert body["type"] == "https://httpstatus.es/400"
    clamping = AmoCrmEmulator(Clock(T0), limit_over_max="clamp")
    clamp_client = Client(clamping)
    clamp_auth = {"Authorization": "Bearer " + clamping.issue_tokens()["access_token"]}
    create_lead(clamp_client, clamp_auth, name="x")
    assert "limit=250" in api(clamp_client, "GET", "/api/v4/leads", clamp_auth, limit=1000)["_links"]["self"]["href"]


def test_query_is_a_raw_substring_search_so_plus7_does_not_find_8(
    emu: AmoCrmEmulator, client: Client, auth: dict[str, str]
) -> None:
    plus7 = create_contact(client, auth, name="Иванов Иван", custom_fields_values=[phone("+79991234567")])
    eight = create_contact(client, auth, name="Иванова Мария", custom_fields_values=[phone("89991234567", "HOME")])
    other = create_contact(client, auth, name="Петров", custom_fields_values=[phone("+7 (999) 123-45-67")])

    def ids(entity: str, query: str) -> set[int]:
        body = client.get(f"/api/v4/{entity}", headers=auth, query_string={"query": query})
        if body.status_code == 204:
            return set()
        return {row["id"] for row in body.get_json()["_embedded"][entity]}

    assert ids("contacts", "+79991234567") == {plus7}
    assert ids("contacts", "89991234567") == {eight}
    assert ids("contacts", "9991234567") == {plus7, eight}  # the last-10-digits trick
    assert ids("contacts", "123-45-67") == {other}  # formatting is stored and searched as typed
    assert ids("contacts", "ИВАНОВ") == {plus7, eight}  # case-insensitive over names
    # The worst case the product designs for: spaces and brackets stay in the stored string, so neither
    # the last ten digits nor the dashed subscriber part finds "8 (916) 111 22 33".
    spaced = create_contact(client, auth, name="Сидоров", custom_fields_values=[phone("8 (916) 111 22 33")])
    assert ids("contacts", "9161112233") == set() and ids("contacts", "111-22-33") == set()
    assert ids("contacts", "(916) 111 22") == {spaced}
    # Leads are found through their linked contact's phone and through their own fields.
    lead = create_lead(client, auth, name="Приём", _embedded={"contacts": [{"id": eight}]})
    lone = create_lead(
        client,
        auth,
        name="Без контакта",
        custom_fields_values=[{"field_id": LEAD_FIELD_MIS_APPOINTMENT_ID, "values": [{"value": "APPT-777"}]}],
    )
    assert ids("leads", "89991234567") == {lead}
    assert ids("leads", "+79991234567") == set()
    assert ids("leads", "APPT-777") == {lone}


def test_filters_order_and_with_embedding(
    emu: AmoCrmEmulator, client: Client, auth: dict[str, str], clock: Clock
) -> None:
    contact = create_contact(client, auth, name="Пациент")
    first = create_lead(client, auth, name="A", _embedded={"contacts": [{"id": contact}]})
    clock.advance(60)
    second = create_lead(client, auth, name="B", status_id=STATUS_BOOKED)
    clock.advance(60)
    third = create_lead(client, auth, name="C")

    def ids(query: str) -> list[int]:
        response = client.get("/api/v4/leads?" + query, headers=auth)
        if response.status_code == 204:
            return []
        return [row["id"] for row in response.get_json()["_embedded"]["leads"]]

    assert ids(f"filter[id][]={first}&filter[id][]={third}") == [first, third]
    assert ids(f"filter[id]={second}") == [second]
    assert ids(f"filter[updated_at][from]={int(T0) + 60}") == [second, third]
    assert ids(f"filter[updated_at][from]={int(T0)}&filter[updated_at][to]={int(T0) + 59}") == [first]
    assert ids(
        f"filter[statuses][0][pipeline_id]={MAIN_PIPELINE_ID}&filter[statuses][0][status_id]={STATUS_BOOKED}"
    ) == [second]
    assert ids("order[updated_at]=desc") == [third, second, first]
    # Without with=contacts no contacts are embedded; with it they are, with is_main.
    plain = api(client, "GET", f"/api/v4/leads/{first}", auth)
    assert "contacts" not in plain["_embedded"] and plain["_embedded"]["tags"] == []
    embedded = client.get(f"/api/v4/leads/{first}?with=contacts", headers=auth).get_json()
    assert [(c["id"], c["is_main"]) for c in embedded["_embedded"]["contacts"]] == [(contact, True)]
    listed = client.get("/api/v4/leads?with=contacts", headers=auth).get_json()["_embedded"]["leads"]
    assert listed[0]["_embedded"]["contacts"][0]["id"] == contact
    back = client.get(f"/api/v4/contacts/{contact}?with=leads", headers=auth).get_json()
    assert [row["id"] for row in back["_embedded"]["leads"]] == [first]
    # A custom-field filter is silently ignored (account outside the filter alpha) unless switched on.
    assert len(ids(f"filter[custom_fields_values][{LEAD_FIELD_MIS_APPOINTMENT_ID}][]=nothing")) == 3
    emu.cf_filter_enabled = True
    assert ids(f"filter[custom_fields_values][{LEAD_FIELD_MIS_APPOINTMENT_ID}][]=nothing") == []


def test_lead_and_contact_shapes(emu: AmoCrmEmulator, client: Client, auth: dict[str, str]) -> None:
    contact_id = create_contact(client, auth, first_name="Иван", last_name="Петров")
    lead_id = create_lead(client, auth, name="Приём", price=3500, _embedded={"contacts": [{"id": contact_id}]})
    lead = api(client, "GET", f"/api/v4/leads/{lead_id}", auth)
    for key in (
        "id",
        "name",
        "price",
        "status_id",
        "pipeline_id",
        "responsible_user_id",
        "created_at",
        "updated_at",
        "closed_at",
        "created_by",
        "updated_by",
        "custom_fields_values",
        "account_id",
        "is_deleted",
    ):
        assert key in lead, key
    assert lead["status_id"] == STATUS_NEW_REQUEST and lead["pipeline_id"] == MAIN_PIPELINE_ID
    assert lead["updated_by"] == emu.api_user_id and lead["created_at"] == int(T0)
    assert isinstance(lead["updated_at"], int) and lead["closed_at"] is None
    assert lead["custom_fields_values"] is None
    assert lead["_links"]["self"]["href"] == f"http://localhost/api/v4/leads/{lead_id}"
    contact = api(client, "GET", f"/api/v4/contacts/{contact_id}", auth)
    assert (contact["name"], contact["first_name"], contact["last_name"]) == ("Иван Петров", "Иван", "Петров")
    assert contact["updated_by"] == emu.api_user_id
    # Direct state access and the rendering helper agree.
    assert emu.leads[lead_id]["price"] == 3500
    assert emu.lead_contact_ids(lead_id) == [contact_id]
    rendered = emu.lead(lead_id)
    assert rendered is not None and rendered["_embedded"]["contacts"][0]["id"] == contact_id


# --------------------------------------------------------------------------------------------------------
# Custom fields
# --------------------------------------------------------------------------------------------------------


def test_custom_field_definitions_are_listed_with_seeded_ids(
    emu: AmoCrmEmulator, client: Client, auth: dict[str, str]
) -> None:
    body = api(client, "GET", "/api/v4/contacts/custom_fields", auth)
    fields = {f["id"]: f for f in body["_embedded"]["custom_fields"]}
    assert fields[CONTACT_FIELD_PHONE]["code"] == "PHONE" and fields[CONTACT_FIELD_PHONE]["type"] == "multitext"
    assert {e["value"]: e["id"] for e in fields[CONTACT_FIELD_PHONE]["enums"]} == PHONE_ENUM_IDS
    assert fields[CONTACT_FIELD_EMAIL]["code"] == "EMAIL"
    assert {e["value"] for e in fields[CONTACT_FIELD_EMAIL]["enums"]} == {"WORK", "PRIV", "OTHER"}
    leads = api(client, "GET", "/api/v4/leads/custom_fields", auth)["_embedded"]["custom_fields"]
    source = next(f for f in leads if f["id"] == LEAD_FIELD_SOURCE)
    assert source["type"] == "select" and {e["value"]: e["id"] for e in source["enums"]} == SOURCE_ENUM_IDS
    new_id = emu.add_custom_field("leads", "Филиал", "select", enums=["Центр", "Север"])
    one = api(client, "GET", f"/api/v4/leads/custom_fields/{new_id}", auth)
    assert one["name"] == "Филиал" and [e["value"] for e in one["enums"]] == ["Центр", "Север"]
    lead = create_lead(client, auth, custom_fields_values=[{"field_id": new_id, "values": [{"value": "Север"}]}])
    assert emu.cf_value("leads", lead, new_id) == [
        {"value": "Север", "enum_id": emu.enum_id("leads", new_id, "Север"), "enum_code": None}
    ]


def test_multitext_by_field_code_and_enum_code_and_read_shape(
    emu: AmoCrmEmulator, client: Client, auth: dict[str, str]
) -> None:
    contact_id = create_contact(
        client,
        auth,
        name="Петров Иван",
        custom_fields_values=[
            {
                "field_code": "PHONE",
                "values": [
                    {"value": "+79991234567", "enum_code": "MOB"},
                    {"value": "84951234567", "enum_code": "WORK"},
                ],
            },
            {"field_code": "EMAIL", "values": [{"value": "ivan@example.com", "enum_code": "PRIV"}]},
            {"field_id": CONTACT_FIELD_MIS_PATIENT_ID, "values": [{"value": "MIS-PATIENT-000123"}]},
        ],
    )
    rows = api(client, "GET", f"/api/v4/contacts/{contact_id}", auth)["custom_fields_values"]
    by_id = {row["field_id"]: row for row in rows}
    assert by_id[CONTACT_FIELD_PHONE] == {
        "field_id": CONTACT_FIELD_PHONE,
        "field_name": "Телефон",
        "field_code": "PHONE",
        "field_type": "multitext",
        "values": [
            {"value": "+79991234567", "enum_id": PHONE_ENUM_IDS["MOB"], "enum_code": "MOB"},
            {"value": "84951234567", "enum_id": PHONE_ENUM_IDS["WORK"], "enum_code": "WORK"},
        ],
    }
    assert by_id[CONTACT_FIELD_EMAIL]["values"][0]["enum_code"] == "PRIV"
    assert by_id[CONTACT_FIELD_MIS_PATIENT_ID]["values"] == [{"value": "MIS-PATIENT-000123"}]
    assert by_id[CONTACT_FIELD_MIS_PATIENT_ID]["field_code"] is None
    # enum_id works as well; no enum at all means the first one (WORK).
    other = create_contact(
        client,
        auth,
        custom_fields_values=[
            {
                "field_id": CONTACT_FIELD_PHONE,
                "values": [{"value": "+7111", "enum_id": PHONE_ENUM_IDS["HOME"]}, {"value": "+7222"}],
            }
        ],
    )
    assert [v["enum_code"] for v in emu.cf_value("contacts", other, "PHONE") or []] == ["HOME", "WORK"]


def test_patch_replaces_sent_fields_only_and_null_or_empty_clears(
    emu: AmoCrmEmulator, client: Client, auth: dict[str, str], clock: Clock
) -> None:
    contact_id = create_contact(
        client,
        auth,
        custom_fields_values=[
            phone("+79991234567"),
            {"field_code": "EMAIL", "values": [{"value": "a@example.com", "enum_code": "WORK"}]},
            {"field_id": CONTACT_FIELD_MIS_PATIENT_ID, "values": [{"value": "P-1"}]},
        ],
    )
    clock.advance(10)
    body = api(
        client,
        "PATCH",
        f"/api/v4/contacts/{contact_id}",
        auth,
        body={"custom_fields_values": [phone("+79990000000", "HOME")]},
    )
    assert body["id"] == contact_id and body["updated_at"] == int(T0) + 10
    assert [v["value"] for v in emu.cf_value("contacts", contact_id, "PHONE") or []] == ["+79990000000"]
    assert emu.cf_value("contacts", contact_id, "EMAIL") == [
        {"value": "a@example.com", "enum_id": 1801021, "enum_code": "WORK"}
    ]
    assert emu.cf_value("contacts", contact_id, CONTACT_FIELD_MIS_PATIENT_ID) == [{"value": "P-1"}]
    api(
        client,
        "PATCH",
        f"/api/v4/contacts/{contact_id}",
        auth,
        body={
            "custom_fields_values": [
                {"field_code": "EMAIL", "values": None},
                {"field_id": CONTACT_FIELD_MIS_PATIENT_ID, "values": []},
            ]
        },
    )
    assert emu.cf_value("contacts", contact_id, "EMAIL") is None
    assert emu.cf_value("contacts", contact_id, CONTACT_FIELD_MIS_PATIENT_ID) is None
    assert [row["field_code"] for row in emu.contacts[contact_id]["custom_fields_values"]] == ["PHONE"]
    # A PATCH that changes nothing does not bump updated_at.
    clock.advance(10)
    api(
        client,
        "PATCH",
        f"/api/v4/contacts/{contact_id}",
        auth,
        body={"custom_fields_values": [phone("+79990000000", "HOME")]},
    )
    assert emu.contacts[contact_id]["updated_at"] == int(T0) + 10


def test_custom_field_validation_errors_point_at_the_path(
    client: Client, auth: dict[str, str], emu: AmoCrmEmulator
) -> None:
    response = client.post(
        "/api/v4/contacts",
        headers=auth,
        json=[
            {"name": "ok", "custom_fields_values": [phone("+7999")], "request_id": "good"},
            {
                "name": "bad",
                "request_id": "patient-2",
                "custom_fields_values": [
                    {"field_code": "PHONE", "values": [{"value": "+7999", "enum_code": "CELL"}]},
                    {"field_id": CONTACT_FIELD_MIS_PATIENT_ID, "values": [{"value": "X", "enum_code": "WORK"}]},
                    {"field_id": 1, "values": [{"value": "X"}]},
                    {"field_code": "NOPE", "values": [{"value": "X"}]},
                ],
            },
        ],
    )
    assert response.status_code == 400
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["title"] == "Bad Request" and body["status"] == 400
    assert body["type"] == "https://httpstatus.es/400" and body["detail"] == "Request validation failed"
    assert len(body["validation-errors"]) == 1
    failing = body["validation-errors"][0]
    assert failing["request_id"] == "patient-2"
    assert [(e["code"], e["path"]) for e in failing["errors"]] == [
        ("NotSupportedChoice", "custom_fields_values.0.values.0.enum_code"),
        ("FieldNotExpected", "custom_fields_values.1.values.0.enum_code"),
        ("NotSupportedChoice", "custom_fields_values.2.field_id"),
        ("NotSupportedChoice", "custom_fields_values.3.field_code"),
    ]
    assert all(e["detail"] for e in failing["errors"])
    assert emu.contacts == {}  # one bad item fails the whole request


def test_select_and_date_fields(emu: AmoCrmEmulator, client: Client, auth: dict[str, str]) -> None:
    lead = create_lead(
        client,
        auth,
        custom_fields_values=[
            {"field_id": LEAD_FIELD_SOURCE, "values": [{"enum_id": SOURCE_ENUM_IDS["МИС"]}]},
            {"field_id": LEAD_FIELD_APPOINTMENT_AT, "values": [{"value": "2026-05-12T10:30:00+03:00"}]},
        ],
    )
    assert emu.cf_value("leads", lead, LEAD_FIELD_SOURCE) == [
        {"value": "МИС", "enum_id": SOURCE_ENUM_IDS["МИС"], "enum_code": None}
    ]
    assert emu.cf_value("leads", lead, LEAD_FIELD_APPOINTMENT_AT) == [{"value": 1778571000}]
    bad = client.post(
        "/api/v4/leads",
        headers=auth,
        json=[{"custom_fields_values": [{"field_id": LEAD_FIELD_SOURCE, "values": [{"value": "Реклама"}]}]}],
    )
    assert bad.status_code == 400
    assert bad.get_json()["validation-errors"][0]["errors"][0]["path"] == "custom_fields_values.0.values.0.value"


# --------------------------------------------------------------------------------------------------------
# Pipelines and statuses
# --------------------------------------------------------------------------------------------------------


def test_seeded_pipeline_has_clinic_stages_and_system_statuses(
    emu: AmoCrmEmulator, client: Client, auth: dict[str, str]
) -> None:
    body = api(client, "GET", "/api/v4/leads/pipelines", auth)
    assert body["_total_items"] == 1
    pipeline = body["_embedded"]["pipelines"][0]
    assert pipeline["id"] == MAIN_PIPELINE_ID and pipeline["is_main"] is True
    statuses = [(s["id"], s["name"]) for s in pipeline["_embedded"]["statuses"]]
    assert statuses == [
        (STATUS_UNSORTED, "Неразобранное"),
        (STATUS_NEW_REQUEST, "Новая заявка"),
        (STATUS_IN_WORK, "Взяли в работу"),
        (STATUS_BOOKED, "Записан на прием"),
        (STATUS_VISITED, "Посетил"),
        (WON_STATUS_ID, "Успешно реализовано"),
        (LOST_STATUS_ID, "Закрыто и не реализовано"),
    ]
    assert pipeline["_embedded"]["statuses"][0]["type"] == 1
    assert all(s["pipeline_id"] == MAIN_PIPELINE_ID for s in pipeline["_embedded"]["statuses"])
    one = api(client, "GET", f"/api/v4/leads/pipelines/{MAIN_PIPELINE_ID}", auth)
    assert one["_embedded"]["statuses"] == pipeline["_embedded"]["statuses"]
    won = api(client, "GET", f"/api/v4/leads/pipelines/{MAIN_PIPELINE_ID}/statuses/142", auth)
    assert won["name"] == "Успешно реализовано" and won["is_editable"] is False
    missing = client.get("/api/v4/leads/pipelines/1", headers=auth)
    assert missing.status_code == 404
    assert missing.get_json() == {
        "title": "Not Found",
        "type": "https://httpstatus.es/404",
        "status": 404,
        "detail": "Pipeline not found",
    }


def test_added_pipelines_and_status_validation(
    emu: AmoCrmEmulator, client: Client, auth: dict[str, str], clock: Clock
) -> None:
    dms = emu.add_pipeline("ДМС", ["Гарантийное письмо", "Согласовано"])
    extra = emu.add_status(MAIN_PIPELINE_ID, "Перенос")
    names = [s["name"] for s in emu.statuses(MAIN_PIPELINE_ID)]
    assert names.index("Перенос") == names.index("Посетил") + 1 < names.index("Успешно реализовано")
    statuses = api(client, "GET", f"/api/v4/leads/pipelines/{dms}/statuses", auth)["_embedded"]["statuses"]
    assert [s["name"] for s in statuses][1:] == [
        "Гарантийное письмо",
        "Согласовано",
        "Успешно реализовано",
        "Закрыто и не реализовано",
    ]
    # A new lead lands in the first (non-unsorted) stage of its pipeline.
    lead = create_lead(client, auth, pipeline_id=dms)
    assert emu.leads[lead]["status_id"] == emu.status_id("Гарантийное письмо", dms)
    moved = create_lead(client, auth, status_id=extra)
    assert emu.leads[moved]["pipeline_id"] == MAIN_PIPELINE_ID
    # A status of another pipeline, or the unsorted stage, is not a valid choice.
    for fields in ({"status_id": STATUS_BOOKED}, {"status_id": STATUS_UNSORTED, "pipeline_id": MAIN_PIPELINE_ID}):
        bad = client.patch(f"/api/v4/leads/{lead}", headers=auth, json=fields)
        assert bad.status_code == 400
        assert bad.get_json()["validation-errors"][0]["errors"] == [
            {
                "code": "NotSupportedChoice",
                "path": "status_id",
                "detail": "The value you selected is not a valid choice.",
            }
        ]
    unknown = client.post("/api/v4/leads", headers=auth, json=[{"pipeline_id": 1}])
    assert unknown.get_json()["validation-errors"][0]["errors"][0]["path"] == "pipeline_id"
    # 142/143 close the lead; loss_reason_id only on a lost lead (non-standard 400 body).
    clock.advance(100)
    api(client, "PATCH", f"/api/v4/leads/{lead}", auth, body={"status_id": WON_STATUS_ID})
    assert emu.leads[lead]["closed_at"] == int(T0) + 100
    loss = client.patch("/api/v4/leads", headers=auth, json=[{"id": moved, "loss_reason_id": 5}])
    assert loss.status_code == 400
    assert loss.get_json()["errors"] == {str(moved): "Loss reason can be specified only for lost lead"}
    assert loss.get_json()["detail"] == "Invalid request body"
    api(client, "PATCH", "/api/v4/leads", auth, body=[{"id": moved, "status_id": LOST_STATUS_ID, "loss_reason_id": 5}])
    assert emu.leads[moved]["loss_reason_id"] == 5 and emu.leads[moved]["closed_at"] == int(T0) + 100
    # Changing pipeline without a status moves to the first stage of the new pipeline and reopens.
    api(client, "PATCH", f"/api/v4/leads/{moved}", auth, body={"pipeline_id": dms})
    assert emu.leads[moved]["status_id"] == emu.status_id("Гарантийное письмо", dms)
    assert emu.leads[moved]["closed_at"] is None


# --------------------------------------------------------------------------------------------------------
# Bulk writes and /leads/complex
# --------------------------------------------------------------------------------------------------------


def test_bulk_create_echoes_request_ids_and_bulk_patch_updates_by_id(
    emu: AmoCrmEmulator, client: Client, auth: dict[str, str], clock: Clock
) -> None:
    body = api(
        client,
        "POST",
        "/api/v4/leads",
        auth,
        body=[{"name": "A", "request_id": "appt-1"}, {"name": "B"}, {"name": "C", "request_id": "appt-3"}],
    )
    items = body["_embedded"]["leads"]
    assert [i["request_id"] for i in items] == ["appt-1", "1", "appt-3"]
    assert body["_links"]["self"]["href"] == "http://localhost/api/v4/leads"
    assert all(i["_links"]["self"]["href"].endswith(f"/api/v4/leads/{i['id']}") for i in items)
    ids = [i["id"] for i in items]
    clock.advance(5)
    patched = api(
        client,
        "PATCH",
        "/api/v4/leads",
        auth,
        body=[{"id": ids[0], "price": 100}, {"id": ids[2], "status_id": STATUS_BOOKED, "request_id": "r"}],
    )
    rows = patched["_embedded"]["leads"]
    assert [(r["id"], r["updated_at"], r["request_id"]) for r in rows] == [
        (ids[0], int(T0) + 5, "0"),
        (ids[2], int(T0) + 5, "r"),
    ]
    assert emu.leads[ids[0]]["price"] == 100 and emu.leads[ids[0]]["name"] == "A"
    assert emu.leads[ids[1]]["updated_at"] == int(T0)
    # Items without an id, or with an unknown one, fail the whole PATCH.
    bad = client.patch("/api/v4/leads", headers=auth, json=[{"id": ids[0], "price": 1}, {"price": 2}, {"id": 1}])
    assert bad.status_code == 400
    errors = {e["request_id"]: e["errors"][0] for e in bad.get_json()["validation-errors"]}
    assert errors["1"]["code"] == "FieldMissing" and errors["1"]["path"] == "id"
    assert errors["2"]["code"] == "NotFound"
    assert emu.leads[ids[0]]["price"] == 100
    # Bodies are arrays; a single PATCH of an unknown id is 404.
    assert client.post("/api/v4/leads", headers=auth, json={"name": "x"}).status_code == 400
    assert client.patch("/api/v4/leads/1", headers=auth, json={"name": "x"}).status_code == 404
    assert emu.stats()["writes"] == 2


def test_bulk_over_the_limit_is_a_504_html_and_writes_nothing(
    emu: AmoCrmEmulator, client: Client, auth: dict[str, str]
) -> None:
    ok = api(client, "POST", "/api/v4/contacts", auth, body=[{"name": f"c{i}"} for i in range(250)])
    assert len(ok["_embedded"]["contacts"]) == 250
    response = client.post("/api/v4/contacts", headers=auth, json=[{"name": f"c{i}"} for i in range(251)])
    assert response.status_code == 504
    assert response.mimetype == "text/html"
    assert "<h1>504 Gateway Timeout</h1>" in response.get_data(as_text=True)
    assert len(emu.contacts) == 250
    emu.bulk_max_items = 50  # an account that chokes earlier
    assert (
        client.patch(
            "/api/v4/contacts", headers=auth, json=[{"id": i, "name": "x"} for i in list(emu.contacts)[:51]]
        ).status_code
        == 504
    )
    assert (
        client.patch(
            "/api/v4/contacts", headers=auth, json=[{"id": i, "name": "x"} for i in list(emu.contacts)[:50]]
        ).status_code
        == 200
    )


def test_complex_creates_lead_with_contact_and_returns_a_plain_array(
    emu: AmoCrmEmulator, client: Client, auth: dict[str, str]
) -> None:
    existing = create_contact(client, auth, name="Старый пациент")
    body = api(
        client,
        "POST",
        "/api/v4/leads/complex",
        auth,
        body=[
            {
                "name": "Первичная запись",
                "status_id": STATUS_BOOKED,
                "request_id": "appt-1001",
                "_embedded": {
                    "contacts": [
                        {"first_name": "Анна", "last_name": "Смирнова", "custom_fields_values": [phone("+79161234567")]}
                    ],
                    "companies": [{"name": "ООО Работодатель"}],
                },
            },
            {"name": "Повторная", "_embedded": {"contacts": [{"id": existing}]}},
            {"name": "С сайта", "_embedded": {"metadata": {"form_id": "site"}, "contacts": [{"name": "Лид"}]}},
        ],
    )
    assert isinstance(body, list) and len(body) == 3
    first, second, third = body
    assert set(first) == {"id", "contact_id", "company_id", "request_id", "merged"}
    assert first["request_id"] == ["appt-1001"] and first["merged"] is False
    assert emu.contacts[first["contact_id"]]["name"] == "Анна Смирнова"
    assert emu.companies[first["company_id"]]["name"] == "ООО Работодатель"
    assert emu.leads[first["id"]]["status_id"] == STATUS_BOOKED
    assert emu.lead_contact_ids(first["id"]) == [first["contact_id"]]
    assert second["contact_id"] == existing and second["company_id"] is None and second["request_id"] == ["1"]
    assert emu.leads[third["id"]]["status_id"] == STATUS_UNSORTED  # metadata makes it an incoming lead
    # At most 50 leads per request, and one contact per lead.
    assert (
        client.post("/api/v4/leads/complex", headers=auth, json=[{"name": str(i)} for i in range(50)]).status_code
        == 200
    )
    too_many = client.post("/api/v4/leads/complex", headers=auth, json=[{"name": str(i)} for i in range(51)])
    assert too_many.status_code == 400 and too_many.mimetype == "application/problem+json"
    assert "50" in too_many.get_json()["detail"]
    two = client.post(
        "/api/v4/leads/complex", headers=auth, json=[{"_embedded": {"contacts": [{"id": existing}, {"id": existing}]}}]
    )
    assert two.status_code == 400
    assert two.get_json()["validation-errors"][0]["errors"][0]["path"] == "_embedded.contacts"
    bad_contact = client.post(
        "/api/v4/leads/complex", headers=auth, json=[{"_embedded": {"contacts": [{"name": "x", "bogus": 1}]}}]
    )
    assert bad_contact.get_json()["validation-errors"][0]["errors"][0]["path"] == "_embedded.contacts.0.bogus"


def test_complex_duplicate_control_merges_into_the_open_lead(client: Client) -> None:
    emu = AmoCrmEmulator(Clock(T0), duplicate_control=True)
    client = Client(emu)
    auth = {"Authorization": "Bearer " + emu.issue_tokens()["access_token"]}
    lead = {
        "name": "Запись",
        "_embedded": {"contacts": [{"name": "Анна", "custom_fields_values": [phone("+79161234567")]}]},
    }
    first = api(client, "POST", "/api/v4/leads/complex", auth, body=[{**lead, "request_id": "1"}])[0]
    again = api(
        client,
        "POST",
        "/api/v4/leads/complex",
        auth,
        body=[
            {
                **lead,
                "request_id": "2",
                "_embedded": {"contacts": [{"name": "Анна", "custom_fields_values": [phone("89161234567")]}]},
            }
        ],
    )[0]
    assert again == {
        "id": first["id"],
        "contact_id": first["contact_id"],
        "company_id": None,
        "request_id": ["2"],
        "merged": True,
    }
    assert len(emu.leads) == 1 and len(emu.contacts) == 1


def test_link_and_unlink_endpoints(emu: AmoCrmEmulator, client: Client, auth: dict[str, str]) -> None:
    lead = create_lead(client, auth, name="L")
    a = create_contact(client, auth, name="A")
    b = create_contact(client, auth, name="B")
    assert client.get(f"/api/v4/leads/{lead}/links", headers=auth).status_code == 204
    body = api(
        client,
        "POST",
        f"/api/v4/leads/{lead}/link",
        auth,
        body=[
            {"to_entity_id": a, "to_entity_type": "contacts"},
            {"to_entity_id": b, "to_entity_type": "contacts", "metadata": {"is_main": True}},
        ],
    )
    assert [row["to_entity_id"] for row in body["_embedded"]["links"]] == [a, b]
    assert emu.lead_contact_ids(lead) == [a, b]
    links = api(client, "GET", f"/api/v4/leads/{lead}/links", auth)["_embedded"]["links"]
    assert [(row["to_entity_id"], row["metadata"]["is_main"]) for row in links] == [(a, False), (b, True)]
    api(
        client,
        "POST",
        f"/api/v4/contacts/{b}/unlink",
        auth,
        expect=204,
        body=[{"to_entity_id": lead, "to_entity_type": "leads"}],
    )
    assert emu.lead_contact_ids(lead) == [a]
    bad = client.post(
        f"/api/v4/leads/{lead}/link", headers=auth, json=[{"to_entity_id": 1, "to_entity_type": "contacts"}]
    )
    assert bad.status_code == 400


# --------------------------------------------------------------------------------------------------------
# Rate limits
# --------------------------------------------------------------------------------------------------------


def test_eighth_request_in_a_second_is_429_html_without_retry_after(
    limited: AmoCrmEmulator, emu: AmoCrmEmulator, client: Client, auth: dict[str, str], clock: Clock
) -> None:
    for _ in range(7):
        assert client.get("/api/v4/account", headers=auth).status_code == 200
    limited = client.get("/api/v4/account", headers=auth)
    assert limited.status_code == 429
    assert limited.mimetype == "text/html"
    assert "429 Too Many Requests" in limited.get_data(as_text=True)
    assert "Retry-After" not in limited.headers
    clock.advance(0.5)
    assert client.get("/api/v4/account", headers=auth).status_code == 429
    clock.advance(0.5)  # the first seven leave the 1 s window
    assert client.get("/api/v4/account", headers=auth).status_code == 200
    assert emu.stats()["rate_limited_429"] == 2


def test_repeated_violations_block_the_integration_with_403_until_the_cool_down(
    limited: AmoCrmEmulator, emu: AmoCrmEmulator, client: Client, auth: dict[str, str], clock: Clock
) -> None:
    emu.limits.block_after = 5
    emu.limits.block_seconds = 600
    statuses: list[int] = []
    for _ in range(5):  # five bursts of eight within a minute: five 429s
        statuses += [client.get("/api/v4/account", headers=auth).status_code for _ in range(8)]
        clock.advance(1)
    assert statuses.count(429) == 5 and statuses.count(403) == 0
    blocked = client.get("/api/v4/account", headers=auth)
    assert blocked.status_code == 403
    assert blocked.mimetype == "text/html" and "403 Forbidden" in blocked.get_data(as_text=True)
    assert emu.blocked_until() == pytest.approx(clock.now() - 1 + 600)
    # Fresh tokens of the same integration (issued in-process here) are blocked too.
    other = {"Authorization": "Bearer " + emu.issue_tokens()["access_token"]}
    assert client.get("/api/v4/leads", headers=other).status_code == 403
    clock.advance(600)
    assert client.get("/api/v4/account", headers=auth).status_code == 200
    assert emu.stats()["blocked_403"] == 2
    # Violations spread over more than a minute do not block.
    emu.reset_limits()
    for _ in range(6):
        for _ in range(8):
            client.get("/api/v4/account", headers=auth)
        clock.advance(15)
    assert emu.blocked_until() is None


def test_a_blocked_integration_gets_403_html_on_the_token_endpoint_and_keeps_its_refresh_token(
    emu: AmoCrmEmulator, client: Client, clock: Clock
) -> None:
    pair = emu.issue_tokens()
    grant = {
        "client_id": emu.client_id,
        "client_secret": emu.client_secret,
        "grant_type": "refresh_token",
        "refresh_token": pair["refresh_token"],
        "redirect_uri": emu.redirect_uri,
    }
    emu.block(600)  # rate limiting is off in this fixture: a block still applies
    refused = client.post("/oauth2/access_token", json=grant)
    assert refused.status_code == 403
    assert refused.mimetype == "text/html" and "403 Forbidden" in refused.get_data(as_text=True)
    auth = {"Authorization": "Bearer " + pair["access_token"]}
    assert client.get("/api/v4/account", headers=auth).status_code == 403
    clock.advance(600)
    assert client.post("/oauth2/access_token", json=grant).status_code == 200  # not spent by the 403


def test_account_limit_of_50_rps_spans_integrations_and_json_block_option(
    limited: AmoCrmEmulator, emu: AmoCrmEmulator, client: Client
) -> None:
    tokens = []
    for i in range(8):
        cid = emu.register_integration(f"widget-{i}")
        tokens.append({"Authorization": "Bearer " + emu.issue_long_lived_token(days=30, client_id=cid)})
    statuses = [client.get("/api/v4/account", headers=h).status_code for h in tokens[:7] for _ in range(7)]
    assert statuses == [200] * 49
    assert client.get("/api/v4/account", headers=tokens[7]).status_code == 200  # the 50th
    assert client.get("/api/v4/account", headers=tokens[7]).status_code == 429  # its own 2nd, account's 51st
    assert emu.stats()["integrations"]["widget-7"] == 2
    emu.limits.enabled = False
    assert all(client.get("/api/v4/account", headers=tokens[0]).status_code == 200 for _ in range(20))
    emu.limits.enabled = True
    emu.limits.block_after = 1
    emu.limits.block_html = False
    emu.reset_limits()
    for _ in range(8):
        client.get("/api/v4/account", headers=tokens[0])
    blocked = client.get("/api/v4/account", headers=tokens[0])
    assert blocked.status_code == 403 and blocked.get_json()["title"] == "Forbidden"


# --------------------------------------------------------------------------------------------------------
# Webhooks
# --------------------------------------------------------------------------------------------------------


def test_one_form_post_carries_several_events_in_legacy_naming(
    emu: AmoCrmEmulator, client: Client, auth: dict[str, str], clock: Clock
) -> None:
    hook = emu.add_webhook(
        "https://sync.clinic.example/hooks/amocrm/s3cr3t",
        events=["add_lead", "update_lead", "status_lead", "update_contact", "delete_lead"],
    )
    contact = create_contact(client, auth, name="Петров Иван", custom_fields_values=[phone("89031453455", "WORK")])
    lead = create_lead(
        client,
        auth,
        name="Приём",
        price=3500,
        custom_fields_values=[
            {"field_id": LEAD_FIELD_MIS_APPOINTMENT_ID, "values": [{"value": "APPT-98765"}]},
            {"field_id": LEAD_FIELD_APPOINTMENT_AT, "values": [{"value": 1778578200}]},
        ],
        _embedded={"contacts": [{"id": contact}]},
    )
    clock.advance(30)
    emu.manager_move_lead(lead, STATUS_VISITED)
    emu.manager_update_contact(contact, name="Петров Иван Иванович")
    second = emu.manager_create_lead("С сайта")
    emu.manager_delete_lead(second)
    receiver = Recorder()
    deliveries = emu.deliver_webhooks(post=receiver)
    assert len(deliveries) == 1 and len(receiver.calls) == 1 and deliveries[0].ok
    url, _, headers = receiver.calls[0]
    assert url == "https://sync.clinic.example/hooks/amocrm/s3cr3t"
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"
    form = receiver.form()
    # Our own API create echoes back, marked with the integration user.
    assert form["leads[add][0][id]"] == str(lead)
    assert form["leads[add][0][modified_user_id]"] == str(emu.api_user_id)
    assert form["leads[add][0][status_id]"] == str(STATUS_NEW_REQUEST)
    assert form["leads[add][0][custom_fields][0][id]"] == str(LEAD_FIELD_MIS_APPOINTMENT_ID)
    assert form["leads[add][0][custom_fields][0][values][0][value]"] == "APPT-98765"
    assert form["leads[add][0][custom_fields][1][values][0]"] == "1778578200"  # dates without [value]
    assert form["leads[add][1][id]"] == str(second)
    assert "leads[add][0][old_status_id]" not in form
    # The manager's move: status + update, all values strings, legacy names.
    assert form["leads[status][0][id]"] == str(lead)
    assert form["leads[status][0][status_id]"] == str(STATUS_VISITED)
    assert form["leads[status][0][old_status_id]"] == str(STATUS_NEW_REQUEST)
    assert form["leads[status][0][pipeline_id]"] == str(MAIN_PIPELINE_ID)
    assert form["leads[status][0][old_pipeline_id]"] == str(MAIN_PIPELINE_ID)
    assert form["leads[status][0][modified_user_id]"] == str(emu.manager_user_id)
    assert form["leads[status][0][last_modified]"] == str(int(T0) + 30)
    assert form["leads[status][0][date_create]"] == str(int(T0))
    assert form["leads[status][0][price]"] == "3500"
    assert form["leads[update][0][id]"] == str(lead)
    assert form["contacts[update][0][id]"] == str(contact)
    assert form["contacts[update][0][name]"] == "Петров Иван Иванович"
    assert form["contacts[update][0][custom_fields][0][code]"] == "PHONE"
    assert form["contacts[update][0][custom_fields][0][values][0][value]"] == "89031453455"
    assert form["contacts[update][0][custom_fields][0][values][0][enum]"] == str(PHONE_ENUM_IDS["WORK"])
    assert form[f"contacts[update][0][linked_leads_id][{lead}][ID]"] == str(lead)
    assert form["leads[delete][0][id]"] == str(second)
    assert not any(k.startswith("leads[delete][0][") and k != "leads[delete][0][id]" for k in form)
    assert form["account[subdomain]"] == "clinic"
    assert form["account[id]"] == str(emu.account_id)
    assert form["account[_links][self]"] == "https://clinic.amocrm.ru"
    # Nothing left; events the hook is not subscribed to (add_contact) were never queued.
    assert emu.deliver_webhooks(post=receiver) == []
    assert ("add_contact", contact, T0) in emu.events_log
    assert emu.stats()["webhook_deliveries"] == 1
    assert {e.setting for e in deliveries[0].events} == {
        "add_lead",
        "status_lead",
        "update_lead",
        "update_contact",
        "delete_lead",
    }
    assert hook in {w.id for w in emu.webhooks}


def test_webhook_retries_follow_the_schedule_on_the_clock(emu: AmoCrmEmulator, clock: Clock) -> None:
    emu.add_webhook("https://hooks.example/a", events=["add_lead"])
    emu.manager_create_lead("A")
    receiver = Recorder(500, 502, TimeoutError("read timed out"), 503, 500)
    assert [d.attempt for d in emu.deliver_webhooks(post=receiver)] == [1]
    assert emu.scheduled_retries()[0][1:] == (2, T0 + 300)
    assert emu.deliver_webhooks(post=receiver) == []  # not due yet
    clock.advance(299)
    assert emu.deliver_webhooks(post=receiver) == []
    for delay, attempt in ((1, 2), (900, 3), (900, 4), (3600, 5)):
        clock.advance(delay)
        deliveries = emu.deliver_webhooks(post=receiver)
        assert [d.attempt for d in deliveries] == [attempt]
        assert not deliveries[0].ok
    assert receiver.calls[0][1] == receiver.calls[-1][1]  # a retry re-sends the same body
    assert emu.scheduled_retries() == []  # the fifth failure was the last attempt
    clock.advance(86400)
    assert emu.deliver_webhooks(post=receiver) == []
    assert emu.stats()["webhook_retries"] == 4 and emu.stats()["webhook_failures"] == 5


def test_client_errors_get_two_retries_and_a_success_ends_the_chain(emu: AmoCrmEmulator, clock: Clock) -> None:
    emu.add_webhook("https://hooks.example/a", events=["add_lead"])
    emu.add_webhook("https://hooks.example/b", events=["add_lead"])
    emu.manager_create_lead("A")
    a_and_b: dict[str, list[int]] = {"https://hooks.example/a": [404, 404, 404], "https://hooks.example/b": [500, 200]}
    sent: list[tuple[str, int]] = []

    def post(url: str, body: bytes, headers: dict[str, str]) -> int:
        status = a_and_b[url].pop(0)
        sent.append((url, status))
        return status

    emu.deliver_webhooks(post=post)
    clock.advance(300)
    emu.deliver_webhooks(post=post)
    clock.advance(900)
    emu.deliver_webhooks(post=post)
    clock.advance(900 + 3600)
    emu.deliver_webhooks(post=post)
    assert [s for s in sent if s[0].endswith("/a")] == [("https://hooks.example/a", 404)] * 3
    assert [s for s in sent if s[0].endswith("/b")] == [
        ("https://hooks.example/b", 500),
        ("https://hooks.example/b", 200),
    ]
    assert emu.scheduled_retries() == []


def test_webhook_is_disabled_after_too_many_failures_and_resubscribing_enables_it(
    emu: AmoCrmEmulator, client: Client, auth: dict[str, str], clock: Clock
) -> None:
    emu.webhook_disable_after = 3
    hook = emu.add_webhook("https://hooks.example/dead", events=["add_lead"])
    failing = Recorder(*([500] * 20))
    deliveries = []
    for i in range(4):
        emu.manager_create_lead(f"L{i}")
        deliveries += emu.deliver_webhooks(post=failing)
        clock.advance(60)
    assert [d.webhook_disabled for d in deliveries] == [False, False, False, True]
    assert [w.id for w in emu.disabled_webhooks()] == [hook]
    assert emu.scheduled_retries() == []
    emu.manager_create_lead("ignored")
    assert emu.pending_webhook_events() == []
    clock.advance(3600)
    assert emu.deliver_webhooks(post=failing) == []
    listed = api(client, "GET", "/api/v4/webhooks", auth)["_embedded"]["webhooks"]
    assert listed[0]["disabled"] is True and listed[0]["destination"] == "https://hooks.example/dead"
    assert emu.stats()["webhooks_disabled"] == 1
    # Re-subscribing the same destination re-enables it (and replaces its settings).
    again = api(
        client,
        "POST",
        "/api/v4/webhooks",
        auth,
        body={"destination": "https://hooks.example/dead", "settings": ["add_lead", "status_lead"]},
    )
    assert again["id"] == hook and again["disabled"] is False and again["settings"] == ["add_lead", "status_lead"]
    emu.manager_create_lead("after")
    assert [d.ok for d in emu.deliver_webhooks(post=Recorder(200))] == [True]


def test_failures_spread_beyond_two_hours_do_not_disable(emu: AmoCrmEmulator, clock: Clock) -> None:
    emu.webhook_disable_after = 3
    emu.add_webhook("https://hooks.example/slow", events=["add_lead"])
    emu.webhook_retry_delays = ()  # no retries: count first attempts only
    for i in range(6):
        emu.manager_create_lead(f"L{i}")
        emu.deliver_webhooks(post=Recorder(500))
        clock.advance(3000)
    assert emu.disabled_webhooks() == []


def test_webhooks_rest_endpoint(emu: AmoCrmEmulator, client: Client, auth: dict[str, str]) -> None:
    assert client.get("/api/v4/webhooks", headers=auth).status_code == 204
    created = api(
        client,
        "POST",
        "/api/v4/webhooks",
        auth,
        body={"destination": "https://sync.example/amo", "settings": ["add_lead", "update_contact"]},
    )
    assert set(created) >= {"id", "destination", "created_at", "account_id", "disabled", "settings", "sort"}
    api(
        client,
        "POST",
        "/api/v4/webhooks",
        auth,
        body={"destination": "https://other.example/x", "settings": ["add_lead"]},
    )
    listed = api(client, "GET", "/api/v4/webhooks", auth)
    assert listed["_total_items"] == 2
    one = client.get("/api/v4/webhooks?filter[destination]=https://sync.example/amo", headers=auth).get_json()
    assert [w["id"] for w in one["_embedded"]["webhooks"]] == [created["id"]]
    bad = client.post("/api/v4/webhooks", headers=auth, json={"destination": "not a url", "settings": ["add_leed"]})
    assert bad.status_code == 400
    assert [e["path"] for e in bad.get_json()["validation-errors"][0]["errors"]] == ["destination", "settings.0"]
    api(client, "DELETE", "/api/v4/webhooks", auth, expect=204, body={"destination": "https://other.example/x"})
    assert [w.destination for w in emu.webhooks] == ["https://sync.example/amo"]
    # The subscription works: our own API write is delivered.
    create_lead(client, auth, name="x")
    receiver = Recorder()
    emu.deliver_webhooks(post=receiver)
    assert "leads[add][0][id]" in receiver.form()


def test_drop_and_duplicate_injection(emu: AmoCrmEmulator) -> None:
    emu.add_webhook("https://hooks.example/a", events=["add_lead", "status_lead", "update_lead"])
    lead = emu.manager_create_lead("A")
    emu.drop_next_events(1, "status_lead")
    emu.duplicate_next_events(1, "update_lead")
    emu.manager_move_lead(lead, STATUS_IN_WORK)
    receiver = Recorder()
    emu.deliver_webhooks(post=receiver)
    form = receiver.form()
    assert "leads[status][0][id]" not in form
    assert form["leads[update][0][id]"] == form["leads[update][1][id]"] == str(lead)
    assert emu.stats()["webhook_events_dropped"] == 1 and len(emu.dropped_events) == 1


def test_default_poster_posts_over_http_to_a_loopback_receiver(emu: AmoCrmEmulator) -> None:
    bodies: list[bytes] = []

    def receiver(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        bodies.append(environ["wsgi.input"].read(length))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]

    with serve(receiver) as served:
        emu.add_webhook(served.base_url + "/hook", events=["add_lead"])
        emu.manager_create_lead("HTTP")
        deliveries = emu.deliver_webhooks()
    assert [d.status for d in deliveries] == [200]
    assert dict(parse_qsl(bodies[0].decode()))["leads[add][0][name]"] == "HTTP"


# --------------------------------------------------------------------------------------------------------
# Faults, stats, manager actions, threads
# --------------------------------------------------------------------------------------------------------


def test_faults_by_path_and_method_html_times_and_after_apply(
    emu: AmoCrmEmulator, client: Client, auth: dict[str, str]
) -> None:
    emu.faults.add(path_prefix="/api/v4/leads", method="GET", status=502, html=True, times=2)
    assert client.get("/api/v4/contacts", headers=auth).status_code == 204  # other path untouched
    for _ in range(2):
        response = client.get("/api/v4/leads", headers=auth)
        assert response.status_code == 502 and response.mimetype == "text/html"
        assert "502 Bad Gateway" in response.get_data(as_text=True)
    assert client.get("/api/v4/leads", headers=auth).status_code == 204
    # A lost response: the lead is created and its webhook queued, but the client sees a 500 problem.
    emu.add_webhook("https://hooks.example/a", events=["add_lead"])
    emu.faults.add(path_prefix="/api/v4/leads", method="POST", status=500, after_apply=True)
    lost = client.post("/api/v4/leads", headers=auth, json=[{"name": "lost"}])
    assert lost.status_code == 500 and lost.mimetype == "application/problem+json"
    assert lost.get_json()["status"] == 500
    assert [r["name"] for r in emu.leads.values()] == ["lost"]
    assert len(emu.pending_webhook_events()) == 1
    # 402 with a custom detail, until cleared; the OAuth endpoint can fail too.
    emu.faults.add(status=402, times=None, detail="Subscription expired")
    assert client.get("/api/v4/account", headers=auth).get_json()["detail"] == "Subscription expired"
    assert client.get("/api/v4/users", headers=auth).status_code == 402
    emu.faults.clear()
    emu.faults.add(path_prefix="/oauth2", status=503)
    assert client.post("/oauth2/access_token", json={}).status_code == 503
    stats = emu.stats()
    assert stats["faults"] == 6 and stats["writes"] == 1


def test_stats_count_requests_per_endpoint(emu: AmoCrmEmulator, client: Client, auth: dict[str, str]) -> None:
    lead = create_lead(client, auth, name="x")
    client.get(f"/api/v4/leads/{lead}", headers=auth)
    client.patch(f"/api/v4/leads/{lead}", headers=auth, json={"price": 1})
    client.get("/api/v4/leads/pipelines", headers=auth)
    assert client.delete("/api/v4/leads", headers=auth).status_code == 405
    assert client.get("/api/v4/nothing", headers=auth).status_code == 404
    stats = emu.stats()
    assert stats["requests"] == 5
    assert stats["endpoints"] == {
        "POST /api/v4/leads": 1,
        "GET /api/v4/leads/{id}": 1,
        "PATCH /api/v4/leads/{id}": 1,
        "GET /api/v4/leads/pipelines": 1,
        "DELETE /api/v4/leads": 1,
    }
    assert stats["statuses"] == {"200": 4, "405": 1}
    assert stats["writes"] == 2 and stats["entities_created"] == 1 and stats["entities_updated"] == 1
    assert stats["integrations"] == {emu.client_id: 4}  # the 405 is answered before the token is looked at
    assert set(stats) >= {"rate_limited_429", "blocked_403", "oauth_requests", "webhook_posts", "webhook_deliveries"}
    emu.reset_stats()
    assert emu.stats()["requests"] == 0


def test_manager_actions_change_state_and_are_not_counted_as_api_requests(emu: AmoCrmEmulator, clock: Clock) -> None:
    contact = emu.manager_create_contact(first_name="Анна", custom_fields_values=[phone("+79161234567")])
    lead = emu.manager_create_lead("Звонок", contact_ids=[contact], price=1000, status_id=STATUS_IN_WORK)
    clock.advance(60)
    emu.manager_move_lead(lead, LOST_STATUS_ID, loss_reason_id=7)
    assert emu.leads[lead]["status_id"] == LOST_STATUS_ID and emu.leads[lead]["closed_at"] == int(T0) + 60
    assert emu.leads[lead]["updated_by"] == emu.manager_user_id
    other = emu.add_pipeline("Лаборатория", ["Забор", "Готово"])
    emu.manager_move_lead(lead, emu.status_id("Готово", other), other)
    assert emu.leads[lead]["pipeline_id"] == other and emu.leads[lead]["closed_at"] is None
    emu.manager_update_contact(contact, last_name="Смирнова")
    assert emu.contacts[contact]["name"] == "Анна Смирнова"
    with pytest.raises(ValueError, match="NotSupportedChoice"):
        emu.manager_move_lead(lead, 123)
    with pytest.raises(KeyError):
        emu.manager_update_lead(1, price=1)
    assert [s for s, _, _ in emu.events_log] == [
        "add_contact",
        "add_lead",
        "status_lead",
        "update_lead",
        "status_lead",
        "update_lead",
        "update_contact",
    ]
    assert emu.stats()["requests"] == 0


def test_concurrent_writes_from_threads_get_unique_ids(emu: AmoCrmEmulator) -> None:
    emu.limits.enabled = False
    token = emu.issue_long_lived_token(days=1)
    errors: list[str] = []

    def worker(n: int) -> None:
        client = Client(emu)
        for i in range(10):
            response = client.post(
                "/api/v4/contacts", headers={"Authorization": f"Bearer {token}"}, json=[{"name": f"{n}-{i}"}]
            )
            if response.status_code != 200:
                errors.append(response.get_data(as_text=True))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(emu.contacts) == 80 and len({c["name"] for c in emu.contacts.values()}) == 80


# --------------------------------------------------------------------------------------------------------
# The real amocrm-api client (PyPI amocrm-api, module amocrm.v2) against the emulator on loopback
# --------------------------------------------------------------------------------------------------------


class _Loopback(HTTPAdapter):
    """Sends the client's hard-coded https://{subdomain}.amocrm.ru requests to the loopback server."""

    def __init__(self, origin: str, target: str) -> None:
        super().__init__()
        self.origin = origin
        self.target = target

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        assert request.url is not None
        request.url = self.target + request.url[len(self.origin) :]
        return super().send(request, *args, **kwargs)


@pytest.fixture
def amocrm_client(monkeypatch: pytest.MonkeyPatch) -> Iterator[AmoCrmEmulator]:
    from amocrm.v2 import interaction, tokens

    emu = AmoCrmEmulator(Clock(), rate_limit=False)  # the client checks JWT exp against the wall clock
    origin = f"https://{emu.subdomain}.amocrm.ru"
    with serve(emu) as served:
        session = interaction._session
        session.mount(origin + "/", _Loopback(origin, served.base_url))
        manager = tokens.default_token_manager
        storage = tokens.MemoryTokensStorage()
        monkeypatch.setattr(manager, "_storage", storage)
        manager(
            client_id=emu.client_id,
            client_secret=emu.client_secret,
            subdomain=emu.subdomain,
            redirect_url=emu.redirect_uri,
            storage=storage,
        )
        pair = emu.issue_tokens()
        storage.save_tokens(pair["access_token"], pair["refresh_token"])
        try:
            yield emu
        finally:
            session.adapters.pop(origin + "/", None)


def test_amocrm_api_client_reads_leads_and_contacts(amocrm_client: AmoCrmEmulator) -> None:
    from amocrm.v2 import Contact, Lead, custom_field

    emu = amocrm_client
    contact_id = emu.manager_create_contact(
        first_name="Анна", last_name="Смирнова", custom_fields_values=[phone("+79161234567")]
    )
    lead_id = emu.manager_create_lead(
        "Приём 12.05 терапевт",
        contact_ids=[contact_id],
        price=3500,
        status_id=STATUS_BOOKED,
        custom_fields_values=[{"field_id": LEAD_FIELD_MIS_APPOINTMENT_ID, "values": [{"value": "APPT-98765"}]}],
    )
    for i in range(3):
        emu.manager_create_lead(f"Другая {i}")

    class Patient(Contact):
        phone = custom_field.ContactPhoneField("Телефон", enum_code="MOB")

    class Appointment(Lead):
        mis_id = custom_field.TextCustomField("ID записи в МИС")

    lead = Appointment.objects.get(lead_id)
    assert (lead.name, lead.price, lead.mis_id) == ("Приём 12.05 терапевт", 3500, "APPT-98765")
    assert lead.status.name == "Записан на прием" and lead.pipeline.name == "Записи клиники"
    assert [c.name for c in lead.contacts] == ["Анна Смирнова"]
    patient = Patient.objects.get(contact_id)
    assert (patient.first_name, patient.phone) == ("Анна", "+79161234567")
    assert [lead.id for lead in Lead.objects.filter(query="9161234567")] == [lead_id]
    assert len(list(Lead.objects.all())) == 4
    assert [c.id for c in Contact.objects.all()] == [contact_id]
    endpoints = emu.stats()["endpoints"]
    assert endpoints["GET /api/v4/leads/{id}"] >= 1 and endpoints["GET /api/v4/contacts/{id}"] >= 1
    assert endpoints["GET /api/v4/leads"] == 2 and emu.stats()["unauthorized_401"] == 0
