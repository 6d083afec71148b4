"""The amoCRM client and gateway against the emulator on loopback: token rotation without losing a
write, pacing under the 7 rps limit with no 403, the circuit breaker, 204s and lost responses."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import boto3
import httpx
import phonenumbers
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from moto import mock_aws

from clinicsync.adapters.amocrm.client import AmoCrmBlocked, AmoCrmClient, MemoryCircuitBreaker
from clinicsync.adapters.amocrm.gateway import AmoCrmGateway
from clinicsync.adapters.amocrm.oauth import AmoCrmOAuth, AmoCrmTokens, parse_tokens
from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.adapters.http.pacing import Pacer
from clinicsync.domain.config import Pipeline
from clinicsync.domain.crm_ports import ContactWrite, DealWrite, PipelineMismatch
from clinicsync.domain.crypto import KeyedHasher
from sandbox.emulators.amocrm import (
    CONTACT_FIELD_MIS_PATIENT_ID,
    LEAD_FIELD_MIS_APPOINTMENT_ID,
    LOST_STATUS_ID,
    MAIN_PIPELINE_ID,
    STATUS_BOOKED,
    STATUS_IN_WORK,
    STATUS_NEW_REQUEST,
    AmoCrmEmulator,
)
from sandbox.emulators.base import Clock, ServedApp
from tests.helpers import demo_config, template_table_spec

FAST = Pacer(rate=1000, burst=1000)


class MemoryTokens:
    """The clinic's CRM secret, shared by every 'container' of a test."""

    def __init__(self, tokens: AmoCrmTokens) -> None:
        self.tokens = tokens
        self.lock = threading.Lock()

    def load(self) -> AmoCrmTokens:
        return self.tokens

    def save(self, tokens: AmoCrmTokens) -> None:
        self.tokens = tokens


@pytest.fixture
def amo() -> Iterator[tuple[AmoCrmEmulator, str]]:
    emulator = AmoCrmEmulator()
    server = ServedApp(emulator).start()
    yield emulator, server.base_url
    server.stop()


def _config() -> Any:
    base = demo_config()
    names = {
        "mis_patient_id": str(CONTACT_FIELD_MIS_PATIENT_ID),
        "mis_appointment_id": str(LEAD_FIELD_MIS_APPOINTMENT_ID),
    }
    return base.model_copy(update={"fields": base.fields.model_copy(update={"crm_names": names})})


def _store(emulator: AmoCrmEmulator, base: str) -> MemoryTokens:
    secret = {
        **emulator.issue_tokens(),
        "base_url": base,
        "client_id": emulator.client_id,
        "client_secret": emulator.client_secret,
        "redirect_uri": emulator.redirect_uri,
    }
    return MemoryTokens(parse_tokens(secret))


def _session(store: MemoryTokens) -> AmoCrmOAuth:
    return AmoCrmOAuth(store, httpx.Client(), lock=lambda: store.lock)  # one lock: the shared lease


def _writes(start: int, n: int) -> list[ContactWrite | DealWrite]:
    visit = datetime(2026, 12, 1, 10, 0, tzinfo=ZoneInfo("Europe/Moscow")).isoformat()
    out: list[ContactWrite | DealWrite] = []
    for i in range(start, start + n):
        out.append(ContactWrite(f"p{i}", None, {"full_name": {"last": "Тест", "first": "Т", "middle": ""}}))
        out.append(
            DealWrite(
                f"a{i}", f"p{i}", None, str(MAIN_PIPELINE_ID), str(STATUS_BOOKED), {"visit_at": visit, "title": "Приём"}
            )
        )
    return out


def test_a_new_patient_and_visit_is_one_complex_item(amo: tuple[AmoCrmEmulator, str]) -> None:
    emulator, base = amo
    gateway = AmoCrmGateway(AmoCrmClient(_session(_store(emulator, base)), httpx.Client(), FAST), _config())
    outcome = gateway.apply(_writes(0, 60))
    assert outcome.failed == {}
    assert emulator.stats()["endpoints"].get("POST /api/v4/leads/complex") == 2  # 60 items, 50 per request
    for appointment, lead_id in outcome.deal_ids.items():
        assert emulator.lead_contact_ids(int(lead_id)) == [int(outcome.contact_ids[appointment.replace("a", "p")])]


@given(visits=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=90))
@example(visits=[3] * 60)  # 60 first visits, 120 further ones: 4 requests, not 2 complex + 3 bulk
@example(visits=[1] * 50 + [4] * 10)  # only the last request's patients have further visits: none ready
def test_a_new_patients_further_visits_top_up_the_part_filled_complex_request(visits: list[int]) -> None:
    """Backfill near the floor: the creates of new patients and their visits go out in full requests of
    50 items, the last complex request topped up with further visits whose contact an earlier one made;
    every lead hangs on its own patient's contact."""
    emulator = AmoCrmEmulator()
    server = ServedApp(emulator).start()
    try:
        visit = datetime(2026, 12, 1, 10, 0, tzinfo=ZoneInfo("Europe/Moscow")).isoformat()
        writes: list[ContactWrite | DealWrite] = []
        for i, n in enumerate(visits):
            writes.append(ContactWrite(f"p{i}", None, {"full_name": {"last": "Тест", "first": "Т", "middle": ""}}))
            writes += [
                DealWrite(f"a{i}_{k}", f"p{i}", None, str(MAIN_PIPELINE_ID), str(STATUS_BOOKED), {"visit_at": visit})
                for k in range(n)
            ]
        store = _store(emulator, server.base_url)
        gateway = AmoCrmGateway(AmoCrmClient(_session(store), httpx.Client(), FAST), _config())
        before = sum(emulator.stats()["endpoints"].values())
        outcome = gateway.apply(writes)
        requests = sum(emulator.stats()["endpoints"].values()) - before
    finally:
        server.stop()
    assert outcome.failed == {}
    first, further = len(visits), sum(visits) - len(visits)
    # Complex requests of 50 until the first visits are sent, then the further visits left, 50 a request.
    complex_requests = -(-first // 50)
    earlier = visits[: 50 * (complex_requests - 1)]  # patients whose contact exists before the last one
    topped_up = min(complex_requests * 50 - first, sum(earlier) - len(earlier))
    assert requests == complex_requests + -(-(further - topped_up) // 50)
    for appointment, lead_id in outcome.deal_ids.items():
        patient = appointment.split("_")[0].replace("a", "p")
        assert emulator.lead_contact_ids(int(lead_id)) == [int(outcome.contact_ids[patient])]


def test_a_polls_new_visits_of_known_and_new_patients_are_created_in_one_request(
    amo: tuple[AmoCrmEmulator, str],
) -> None:
    """A known patient's new visit goes by contact reference into the complex request that creates the
    new patients: one create request for the poll, each lead on its own patient's contact."""
    emulator, base = amo
    known = emulator.manager_create_contact(first_name="Постоянная")
    writes = _writes(0, 2)
    visit = datetime(2026, 12, 2, 11, 0, tzinfo=ZoneInfo("Europe/Moscow")).isoformat()
    writes += [
        DealWrite(f"k{i}", "pk", None, str(MAIN_PIPELINE_ID), str(STATUS_BOOKED), {"visit_at": visit}, str(known))
        for i in range(2)
    ]
    gateway = AmoCrmGateway(AmoCrmClient(_session(_store(emulator, base)), httpx.Client(), FAST), _config())
    before = dict(emulator.stats()["endpoints"])
    outcome = gateway.apply(writes)
    after = emulator.stats()["endpoints"]
    assert outcome.failed == {}
    sent = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    assert sent == {"POST /api/v4/leads/complex": 1}
    assert "pk" not in outcome.contact_ids  # a known contact is referenced, not written
    for i in range(2):
        assert emulator.lead_contact_ids(int(outcome.deal_ids[f"k{i}"])) == [known]
        assert emulator.lead_contact_ids(int(outcome.deal_ids[f"a{i}"])) == [int(outcome.contact_ids[f"p{i}"])]


def test_a_reused_refresh_token_is_recovered_without_losing_a_write(amo: tuple[AmoCrmEmulator, str]) -> None:
    emulator, base = amo
    store = _store(emulator, base)
    first, second = _session(store), _session(store)  # two containers sharing one secret
    gateway_a = AmoCrmGateway(AmoCrmClient(first, httpx.Client(), FAST), _config())
    gateway_b = AmoCrmGateway(AmoCrmClient(second, httpx.Client(), FAST), _config())
    gateway_a.apply(_writes(0, 1))
    gateway_b.apply(_writes(1, 1))  # both have the pair cached now
    emulator.expire_access_tokens()
    assert gateway_a.apply(_writes(2, 1)).failed == {}  # A refreshes: the old refresh token is now spent
    # B still holds the spent pair. Its 401 leads it to the store (A's new pair), not to a reuse.
    outcome = gateway_b.apply(_writes(3, 1))
    assert outcome.failed == {}
    assert set(emulator.contacts) and len(emulator.leads) == 4  # every write landed, none twice
    assert first.refreshes + second.refreshes == 1
    assert emulator.stats()["token_refreshes"] == 1


def test_the_pacer_keeps_two_containers_under_the_limit_with_no_403(amo: tuple[AmoCrmEmulator, str]) -> None:
    emulator, base = amo
    store = _store(emulator, base)
    shared = Pacer(rate=6, burst=1)  # what the shared DynamoDB bucket gives every container together
    clients = [AmoCrmClient(_session(store), httpx.Client(), shared) for _ in range(2)]

    def work(client: AmoCrmClient) -> None:
        for _ in range(9):
            client.request("GET", "/api/v4/leads/pipelines")

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = emulator.stats()
    assert stats["requests"] >= 18
    assert stats["rate_limited_429"] == 0 and stats["blocked_403"] == 0


def test_unpaced_bursts_get_429_then_the_breaker_stops_everything(amo: tuple[AmoCrmEmulator, str]) -> None:
    emulator, base = amo
    emulator.clock = Clock()
    breaker = MemoryCircuitBreaker()
    client = AmoCrmClient(_session(_store(emulator, base)), httpx.Client(), FAST, breaker, backoff=0.0, max_attempts=50)
    with pytest.raises(AmoCrmBlocked):
        for _ in range(200):
            client.request("GET", "/api/v4/leads/pipelines")
    assert emulator.stats()["rate_limited_429"] >= 5 and breaker.is_open()
    before = emulator.stats()["requests"]
    with pytest.raises(AmoCrmBlocked):
        client.request("GET", "/api/v4/leads")
    assert emulator.stats()["requests"] == before  # an open breaker sends nothing at all


def test_204_is_an_empty_answer_not_an_error(amo: tuple[AmoCrmEmulator, str]) -> None:
    emulator, base = amo
    client = AmoCrmClient(_session(_store(emulator, base)), httpx.Client(), FAST)
    assert client.request("GET", "/api/v4/leads", params=[("query", "nobody")]) is None


def test_a_lost_complex_response_is_reported_and_found_by_the_intent_scan(amo: tuple[AmoCrmEmulator, str]) -> None:
    emulator, base = amo
    gateway = AmoCrmGateway(AmoCrmClient(_session(_store(emulator, base)), httpx.Client(), FAST), _config())
    emulator.faults.add(path_prefix="/api/v4/leads/complex", status=504, html=True, times=1, after_apply=True)
    since = int(emulator.clock.now())
    outcome = gateway.apply(_writes(0, 2))
    assert outcome.failed == {"p0": "outcome_unknown", "p1": "outcome_unknown"}
    assert len(emulator.leads) == 2  # applied once, never resent
    found = gateway.find(["p0", "p1"], ["a0", "a1"], intended_since=since)
    assert set(found.contacts) == {"p0", "p1"} and set(found.deals) == {"a0", "a1"}


def test_an_intent_scan_reads_only_the_entities_whose_ids_are_wanted(amo: tuple[AmoCrmEmulator, str]) -> None:
    """A re-booking's lost continuation is retried with its visit's intent only: its patient is known, so
    the scan reads the leads changed since the intent and not the contacts (one request, not two)."""
    emulator, base = amo
    gateway = AmoCrmGateway(AmoCrmClient(_session(_store(emulator, base)), httpx.Client(), FAST), _config())
    since = int(emulator.clock.now())
    gateway.apply(_writes(0, 1))
    before = gateway.requests_made()
    found = gateway.find([], ["a0"], intended_since=since)
    assert set(found.deals) == {"a0"} and found.contacts == {}
    assert gateway.requests_made() - before == 1
    assert [path for path, _ in emulator.list_reads()[-1:]] == ["/api/v4/leads"]


def test_a_phone_look_up_never_puts_the_phone_in_a_url(
    amo: tuple[AmoCrmEmulator, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Phones are matched on our side, so no URL (and no httpx log line) carries one."""
    emulator, base = amo
    gateway = AmoCrmGateway(AmoCrmClient(_session(_store(emulator, base)), httpx.Client(), FAST), _config())
    with caplog.at_level(logging.INFO, logger="httpx"):
        gateway.find([], [], phones=["+79161234567"])
    urls = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert any("/api/v4/contacts" in u for u in urls)  # the look-up really was logged by httpx
    assert not any("9161234567" in u or "123-45-67" in u for u in urls)
    assert [args for _, args in emulator.list_reads() if "query" in args] == []


def test_many_phones_are_matched_against_the_contacts_read_once_then_only_what_changed(
    amo: tuple[AmoCrmEmulator, str],
) -> None:
    """A backfill's phones are not searched one ``query`` each: the account's contacts are read in pages
    of 250 and matched after normalising; the next look-up reads only contacts changed since."""
    emulator, base = amo
    config = _config()
    config = config.model_copy(
        update={"matching": config.matching.model_copy(update={"adopt_deal_stages": [str(STATUS_NEW_REQUEST)]})}
    )
    for n in range(300):  # other people's contacts: two pages
        emulator.manager_create_contact(first_name=f"Другой {n}")
    emulator.clock.advance(5)
    typed = emulator.manager_create_contact(
        first_name="Анна", custom_fields_values=[{"field_code": "PHONE", "values": [{"value": "8 (916) 123-45-67"}]}]
    )
    lead = emulator.manager_create_lead("Заявка с сайта", contact_ids=[typed], status_id=STATUS_NEW_REQUEST)
    gateway = AmoCrmGateway(AmoCrmClient(_session(_store(emulator, base)), httpx.Client(), FAST), config)
    phones = [f"+7916000000{n}" for n in range(5)] + ["+79161234567"]

    before = emulator.stats()["requests"]
    matches = gateway.find([], [], phones=phones)
    assert set(matches.phones) == {"+79161234567"}
    assert matches.phones["+79161234567"].contacts == ((str(typed), None),)
    assert matches.phones["+79161234567"].deals == ((str(lead), str(MAIN_PIPELINE_ID), str(STATUS_NEW_REQUEST)),)
    assert emulator.stats()["requests"] - before == 3  # two pages of contacts, one read of their leads

    emulator.clock.advance(5)
    later = emulator.manager_create_contact(
        first_name="Ольга", custom_fields_values=[{"field_code": "PHONE", "values": [{"value": "+7 916 000-00-03"}]}]
    )
    before = emulator.stats()["requests"]
    matches = gateway.find([], [], phones=phones)
    assert matches.phones["+79160000003"].contacts == ((str(later), None),)
    assert matches.phones["+79161234567"].deals == ((str(lead), str(MAIN_PIPELINE_ID), str(STATUS_NEW_REQUEST)),)
    # What changed since (one page; the scan is inclusive, so Анна, written in its first second, is in it
    # with her current links and is not read again by id), and the leads.
    assert emulator.stats()["requests"] - before == 2


def _unlimited(emulator: AmoCrmEmulator) -> None:
    emulator.limits.enabled = False  # these tests count rows and requests, not the 7 rps window


def _gateway(emulator: AmoCrmEmulator, base: str, config: Any = None) -> AmoCrmGateway:
    return AmoCrmGateway(AmoCrmClient(_session(_store(emulator, base)), httpx.Client(), FAST), config or _config())


def _contact_with_email(emulator: AmoCrmEmulator, n: int) -> int:
    email = {"field_code": "EMAIL", "values": [{"value": f"p{n}@example.org"}]}
    return emulator.manager_create_contact(first_name=f"Пациент {n}", custom_fields_values=[email])


def test_contact_emails_for_an_opt_out_read_every_contact_past_the_default_page_of_50(
    amo: tuple[AmoCrmEmulator, str],
) -> None:
    """The consent job asks for the e-mails of up to 250 contacts at once; amoCRM pages at 50 unless told
    otherwise, so without ``limit`` the 51st contact's address never reached Mailchimp."""
    emulator, base = amo
    _unlimited(emulator)
    ids = [_contact_with_email(emulator, n) for n in range(300)]
    gateway = _gateway(emulator, base)
    emails = gateway.contact_emails([str(i) for i in ids])
    assert emails == {str(i): [f"p{n}@example.org"] for n, i in enumerate(ids)}
    fetched = gateway.fetch("contact", [str(i) for i in ids])
    assert set(fetched) == {str(i) for i in ids}


def test_every_amocrm_list_read_sends_limit(amo: tuple[AmoCrmEmulator, str]) -> None:
    """Every list read of the gateway, through every path that reads one, asks for a page size."""
    emulator, base = amo
    _unlimited(emulator)
    config = _config()
    config = config.model_copy(
        update={"matching": config.matching.model_copy(update={"adopt_deal_stages": [str(STATUS_NEW_REQUEST)]})}
    )
    since = int(emulator.clock.now())
    phone = {"field_code": "PHONE", "values": [{"value": "8 (916) 123-45-67"}]}
    typed = emulator.manager_create_contact(first_name="Анна", custom_fields_values=[phone])
    lead = emulator.manager_create_lead("Заявка с сайта", contact_ids=[typed], status_id=STATUS_NEW_REQUEST)
    gateway = _gateway(emulator, base, config)
    gateway.apply(_writes(0, 3))
    gateway.find(["p0"], ["a0"], phones=["+79161234567"], intended_since=since)
    gateway.find([], [], phones=[f"+7916000000{n}" for n in range(5)])
    gateway.fetch("lead", [str(lead)])
    gateway.fetch("contact", [str(typed)])
    gateway.contact_emails([str(typed)])
    gateway.changed_since("lead", datetime.fromtimestamp(since, ZoneInfo("UTC")).isoformat(), 10)
    window = datetime.fromtimestamp(since - 60, ZoneInfo("UTC")), datetime.fromtimestamp(since + 60, ZoneInfo("UTC"))
    gateway.open_leads(*window, limit=10, offset=0)
    reads = emulator.list_reads()
    assert {path for path, _ in reads} == {"/api/v4/leads", "/api/v4/contacts"}
    assert [args for _, args in reads if str(args.get("limit")) != "250"] == []


def _adopting(config: Any) -> Any:
    return config.model_copy(
        update={"matching": config.matching.model_copy(update={"adopt_deal_stages": [str(STATUS_NEW_REQUEST)]})}
    )


def _typed_phone(value: str) -> list[dict[str, Any]]:
    return [{"field_code": "PHONE", "values": [{"value": value}]}]


def _assigned(national: str) -> bool:
    return phonenumbers.is_valid_number(phonenumbers.parse("+7" + national))


@st.composite
def _stored_formats(draw: st.DrawFn) -> tuple[str, str]:
    """A Russian mobile number as a person might have typed it into amoCRM, and its E.164 form.

    Only numbers phonenumbers holds valid: a few ranges of 9xx are unassigned (``+7 930 00…``), and such a
    number is no phone on either side (``normalise_phone`` gives None for it, as for the MIS's copy)."""
    national = draw(st.text("0123456789", min_size=9, max_size=9).map("9".__add__).filter(_assigned))
    prefix = draw(st.sampled_from(["+7", "8", "7", ""]))
    groups = draw(st.sampled_from([(3, 3, 2, 2), (3, 3, 4), (3, 7)]))
    parts, at = [], 0
    for size in groups:
        parts.append(national[at : at + size])
        at += size
    lead_sep = draw(st.sampled_from(["", " ", "-"])) if prefix else ""
    sep = draw(st.sampled_from(["", " ", "-"]))
    area = f"({parts[0]})" if draw(st.booleans()) else parts[0] + sep
    extension = draw(st.sampled_from(["", " доб. 45", " ext. 12", " доб 123"]))
    return prefix + lead_sep + area + sep.join(parts[1:]) + extension, "+7" + national


NAMED_FORMATS = [
    "8 (916) 111 22 33",
    "+7 916 111 22 33",
    "7 916 111 22 33",
    "+7(916)1112233",
    "8-916-111-22-33",
    "89161112233",
    "9161112233",
    "+7 (916) 111-22-33 доб. 12",
]


@pytest.fixture(scope="module")
def shared_amo() -> Iterator[tuple[AmoCrmEmulator, str]]:
    """One served account for every example of a property test (each example cleans up after itself), on a
    pinned clock: no example depends on the wall clock's second, only on the test's own advances."""
    emulator = AmoCrmEmulator(Clock(1_767_258_000.0))
    _unlimited(emulator)
    server = ServedApp(emulator).start()
    yield emulator, server.base_url
    server.stop()


@given(stored=_stored_formats(), others=st.integers(min_value=0, max_value=6))
@example(stored=("8 (916) 111 22 33", "+79161112233"), others=0)
@example(stored=("+7 916 700 11 22", "+79167001122"), others=1)
@example(stored=("7 916 111 22 35", "+79161112235"), others=2)
def test_a_phone_is_found_in_any_stored_format_whatever_the_poll_size(
    shared_amo: tuple[AmoCrmEmulator, str], stored: tuple[str, str], others: int
) -> None:
    """amoCRM's ``query`` is assumed to match raw substrings only (the emulator does): a contact typed
    as ``8 (916) 111 22 33`` and its open lead are still found, alone in a poll or with other phones."""
    emulator, base = shared_amo
    typed, e164 = stored
    contact = emulator.manager_create_contact(first_name="Анна", custom_fields_values=_typed_phone(typed))
    lead = emulator.manager_create_lead("Заявка с сайта", contact_ids=[contact], status_id=STATUS_NEW_REQUEST)
    try:
        phones = [e164] + [f"+7903000000{n}" for n in range(others)]
        match = _gateway(emulator, base, _adopting(_config())).find([], [], phones=phones).phones.get(e164)
        assert match is not None, typed
        assert match.contacts == ((str(contact), None),)
        assert match.deals == ((str(lead), str(MAIN_PIPELINE_ID), str(STATUS_NEW_REQUEST)),)
    finally:
        emulator.manager_delete_lead(lead)
        emulator.manager_delete_contact(contact)


def test_the_named_formats_of_one_number_all_match_it(amo: tuple[AmoCrmEmulator, str]) -> None:
    emulator, base = amo
    _unlimited(emulator)
    ids = {
        emulator.manager_create_contact(first_name="Член семьи", custom_fields_values=_typed_phone(t))
        for t in NAMED_FORMATS
    }
    match = _gateway(emulator, base).find([], [], phones=["+79161112233"]).phones["+79161112233"]
    assert {int(cid) for cid, _ in match.contacts} == ids


def test_a_lead_linked_later_to_a_contact_read_earlier_is_still_found(amo: tuple[AmoCrmEmulator, str]) -> None:
    """Linking a lead does not touch the contact, so the ``updated_at`` scan cannot see the new link."""
    emulator, base = amo
    _unlimited(emulator)
    contact = emulator.manager_create_contact(first_name="Анна", custom_fields_values=_typed_phone("8 916 111 22 33"))
    gateway = _gateway(emulator, base, _adopting(_config()))
    assert gateway.find([], [], phones=["+79161112233"]).phones["+79161112233"].deals == ()
    emulator.clock.advance(60)
    lead = emulator.manager_create_lead("Звонок", status_id=STATUS_NEW_REQUEST)
    emulator.manager_link(lead, contact, is_main=True)
    match = gateway.find([], [], phones=["+79161112233"]).phones["+79161112233"]
    assert match.deals == ((str(lead), str(MAIN_PIPELINE_ID), str(STATUS_NEW_REQUEST)),)


def test_a_contact_deleted_after_it_was_read_is_no_candidate(amo: tuple[AmoCrmEmulator, str]) -> None:
    emulator, base = amo
    _unlimited(emulator)
    gone = emulator.manager_create_contact(first_name="Дубль", custom_fields_values=_typed_phone("+7 916 111-22-33"))
    kept = emulator.manager_create_contact(first_name="Анна", custom_fields_values=_typed_phone("89161112233"))
    gateway = _gateway(emulator, base)
    assert len(gateway.find([], [], phones=["+79161112233"]).phones["+79161112233"].contacts) == 2
    emulator.manager_delete_contact(gone)
    match = gateway.find([], [], phones=["+79161112233"]).phones["+79161112233"]
    assert match.contacts == ((str(kept), None),)


class _Swappable:
    """One loopback server whose account is replaced per example (a fresh clock and state each time)."""

    def __init__(self) -> None:
        self.app = AmoCrmEmulator()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def swappable() -> Iterator[tuple[_Swappable, str]]:
    swap = _Swappable()
    server = ServedApp(swap).start()
    yield swap, server.base_url
    server.stop()


@given(
    seconds=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=5),
    changes=st.lists(st.tuples(st.integers(min_value=0, max_value=4), st.integers(min_value=0)), max_size=6),
)
@example(seconds=[1, 250], changes=[(0, 0)])  # the first row edited after page 1: row 251 slid into page 1
def test_an_updated_at_read_misses_no_row_that_others_change_while_it_pages(
    swappable: tuple[_Swappable, str], seconds: list[int], changes: list[tuple[int, int]]
) -> None:
    """The phone index and the intent scan read "updated since" in pages. Another container's write
    during the read moves a row to the end; every row must still be read (with page numbers alone, the
    row that slid back into a page already read was skipped). ``seconds``: rows written per second."""
    swap, base = swappable
    clock = Clock(1_767_258_000.0)
    emulator = swap.app = AmoCrmEmulator(clock)
    _unlimited(emulator)
    ids: list[int] = []
    for size in seconds:
        ids += [emulator.manager_create_contact(first_name=f"c{len(ids) + n}") for n in range(size)]
        clock.advance(1)
    touch: dict[int, list[int]] = {}  # after the n-th page: contacts another container edits
    for after, pick in changes:
        touch.setdefault(after, []).append(ids[pick % len(ids)])
    pages = [0]

    def others_write(response: httpx.Response) -> None:
        if response.request.url.path == "/api/v4/contacts":
            for contact in touch.get(pages[0], []):
                clock.advance(1)
                emulator.manager_update_contact(contact, first_name=f"edited {clock.now()}")
            pages[0] += 1

    with httpx.Client(timeout=5.0, event_hooks={"response": [others_write]}) as http:
        client = AmoCrmClient(_session(_store(emulator, base)), http, FAST)
        read = [int(row["id"]) for row in client.rows_since("/api/v4/contacts", "contacts", 0)]
    assert set(read) == set(ids)
    if not changes:  # whole pages of one second are never read twice
        assert pages[0] <= -(-len(ids) // 250) + len(seconds)


def test_a_leads_contact_is_its_main_contact_not_the_first_listed(amo: tuple[AmoCrmEmulator, str]) -> None:
    """A lead may have several contacts (an adopted inquiry keeps the form's contact beside the patient's);
    the new lead's phone a webhook is judged by is its main contact's, wherever amoCRM lists that one."""
    emulator, base = amo
    _unlimited(emulator)
    other = emulator.manager_create_contact(first_name="Коллега", custom_fields_values=_typed_phone("+79160000001"))
    caller = emulator.manager_create_contact(first_name="Анна", custom_fields_values=_typed_phone("+79161112233"))
    lead = emulator.manager_create_lead("Звонок", contact_ids=[other], status_id=STATUS_NEW_REQUEST)
    emulator.manager_link(lead, caller, is_main=True)
    listed = (emulator.lead(lead) or {})["_embedded"]["contacts"]
    assert [(c["id"], c["is_main"]) for c in listed] == [(other, False), (caller, True)]
    gateway = _gateway(emulator, base, _adopting(_config()))
    assert gateway.fetch("lead", [str(lead)])[str(lead)]["phone"] == "+79161112233"


@pytest.fixture
def table_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[DynamoStore]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        resource = boto3.resource("dynamodb", region_name="eu-central-1")
        yield DynamoStore(resource.create_table(**template_table_spec()))


HASHER = KeyedHasher(b"clinic-key-for-the-tests")


def _container(emulator: AmoCrmEmulator, base: str, book: DynamoStore, config: Any = None) -> AmoCrmGateway:
    """A new container: its own client (so its own in-memory index), the clinic's table and key."""
    client = AmoCrmClient(_session(_store(emulator, base)), httpx.Client(), FAST)
    return AmoCrmGateway(client, config or _adopting(_config()), "", book, HASHER.phone_key)


def test_a_new_container_reads_only_what_changed_since_the_stored_phone_index(
    amo: tuple[AmoCrmEmulator, str], table_store: DynamoStore
) -> None:
    """The first container reads every contact once; a later cold container starts from the stored
    index and reads only the contacts changed since, yet finds an old contact and its open lead."""
    emulator, base = amo
    _unlimited(emulator)
    for n in range(600):  # three pages of other people's contacts
        emulator.manager_create_contact(first_name=f"Другой {n}")
    emulator.clock.advance(5)
    typed = emulator.manager_create_contact(first_name="Анна", custom_fields_values=_typed_phone("8 (916) 123-45-67"))
    lead = emulator.manager_create_lead("Заявка", contact_ids=[typed], status_id=STATUS_NEW_REQUEST)
    emulator.clock.advance(5)

    before = emulator.stats()["requests"]
    assert _container(emulator, base, table_store).find([], [], phones=["+79160000001"]).phones == {}
    assert emulator.stats()["requests"] - before == 3  # none stored yet: every contact, 250 per page

    before = emulator.stats()["requests"]
    cold = _container(emulator, base, table_store)
    assert cold.find([], [], phones=["+79160000001"]).phones == {}
    assert emulator.stats()["requests"] - before == 1  # only what changed since the stored cursor
    match = _container(emulator, base, table_store).find([], [], phones=["+79161234567"]).phones["+79161234567"]
    assert match.contacts == ((str(typed), None),)
    assert match.deals == ((str(lead), str(MAIN_PIPELINE_ID), str(STATUS_NEW_REQUEST)),)


def test_the_stored_phone_index_follows_phone_changes_and_deletions_and_holds_no_phone(
    amo: tuple[AmoCrmEmulator, str], table_store: DynamoStore
) -> None:
    emulator, base = amo
    _unlimited(emulator)
    moved = emulator.manager_create_contact(first_name="Анна", custom_fields_values=_typed_phone("+7 916 111-22-33"))
    gone = emulator.manager_create_contact(first_name="Дубль", custom_fields_values=_typed_phone("89161112233"))
    assert (
        len(
            _container(emulator, base, table_store)
            .find([], [], phones=["+79161112233"])
            .phones["+79161112233"]
            .contacts
        )
        == 2
    )
    emulator.clock.advance(5)
    emulator.manager_update_contact(moved, custom_fields_values=_typed_phone("8 916 700 11 22"))
    emulator.manager_delete_contact(gone)
    cold = _container(emulator, base, table_store)
    assert cold.find([], [], phones=["+79161112233"]).phones == {}
    again = _container(emulator, base, table_store)
    assert again.find([], [], phones=["+79167001122"]).phones["+79167001122"].contacts == ((str(moved), None),)
    cursor, stored = table_store.crm_phone_index()
    assert cursor is not None
    assert stored == {str(moved): {HASHER.phone_key("+79167001122")}}  # the old phone and the deleted contact dropped
    items = table_store._table.scan()["Items"]
    assert not any(digits in str(item) for item in items for digits in ("9161112233", "9167001122"))


@pytest.fixture(scope="module")
def shared_table() -> Iterator[DynamoStore]:
    """One moto table for every example of a property test (the index partition is the account's)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
        patch.delenv("AWS_ENDPOINT_URL", raising=False)
        with mock_aws():
            resource = boto3.resource("dynamodb", region_name="eu-central-1")
            yield DynamoStore(resource.create_table(**template_table_spec()))


@given(stored=_stored_formats(), others=st.integers(min_value=0, max_value=6))
@example(stored=("8 (916) 111 22 33", "+79161112233"), others=0)
@example(stored=("+7 916 700 11 22", "+79167001122"), others=1)
@example(stored=("7 916 111 22 35", "+79161112235"), others=2)
def test_a_new_container_finds_a_phone_in_any_stored_format_from_the_stored_index(
    shared_amo: tuple[AmoCrmEmulator, str], shared_table: DynamoStore, stored: tuple[str, str], others: int
) -> None:
    """Indexed by one container, found by another that read nothing but what changed since: the stored
    keyed hash is of the normalised number, so the spelling typed into amoCRM does not matter."""
    emulator, base = shared_amo
    typed, e164 = stored
    contact = emulator.manager_create_contact(first_name="Анна", custom_fields_values=_typed_phone(typed))
    lead = emulator.manager_create_lead("Заявка с сайта", contact_ids=[contact], status_id=STATUS_NEW_REQUEST)
    try:
        phones = [e164] + [f"+7903000000{n}" for n in range(others)]
        first = _container(emulator, base, shared_table)
        first.find([], [], phones=phones)  # indexes and stores it
        emulator.clock.advance(2)
        filler = emulator.manager_create_contact(first_name="Другой")
        first.find([], [], phones=["+79030000099"])  # the stored cursor moves past Анна's second
        emulator.manager_delete_contact(filler)
        reads = len(emulator.list_reads())
        match = _container(emulator, base, shared_table).find([], [], phones=phones).phones.get(e164)
        by_id = [
            args
            for path, args in emulator.list_reads()[reads:]
            if "contacts" in path and "id" in args.get("filter", {})
        ]
        assert match is not None, typed  # first: a number indexed nowhere also makes no re-read
        assert by_id, "found through the stored index, then re-read by id"
        assert match.contacts == ((str(contact), None),)
        assert match.deals == ((str(lead), str(MAIN_PIPELINE_ID), str(STATUS_NEW_REQUEST)),)
    finally:
        emulator.manager_delete_lead(lead)
        emulator.manager_delete_contact(contact)


def test_a_config_stage_the_amocrm_pipeline_lacks_is_refused_by_name(amo: tuple[AmoCrmEmulator, str]) -> None:
    """The start-up check names the pipeline, the MIS status and the missing status id, and passes the
    pipelines amoCRM has (the same wording as Bitrix24's check, `crm_ports.missing_stages`)."""
    emulator, base = amo
    _unlimited(emulator)
    config = _config()
    gateway = _gateway(emulator, base, config)
    booked, kept = str(STATUS_BOOKED), {"no_show": str(STATUS_IN_WORK), "cancelled": str(LOST_STATUS_ID)}
    stages = {
        "booked": booked,
        "rescheduled": booked,
        "confirmed": booked,
        "arrived": booked,
        "completed": booked,
        **kept,
    }
    primary = Pipeline.model_validate({"category_id": str(MAIN_PIPELINE_ID), "stages": stages})
    pipelines = {"primary": primary, "repeat": primary}
    gateway.verify_pipelines(pipelines)
    broken = Pipeline.model_validate(
        {"category_id": str(MAIN_PIPELINE_ID), "stages": {**stages, "confirmed": "999999"}}
    )
    with pytest.raises(PipelineMismatch) as refused:
        gateway.verify_pipelines({**pipelines, "primary": broken})
    [problem] = refused.value.problems
    assert problem.startswith(
        f"pipeline 'primary' maps confirmed to status '999999', which pipeline {primary.category_id} does not have"
    )
    known = problem.split("(known: ")[1].rstrip(")").split(", ")
    assert "999999" not in known and set(primary.stages.values()) - {"999999"} <= set(known)
