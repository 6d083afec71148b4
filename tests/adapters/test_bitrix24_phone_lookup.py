"""Adoption by phone on Bitrix24: what a look-up finds for each number equals an independent model of the
portal's records, whether the read-back rides in the look-up's batch by ``$result`` references (one
request) or goes separately (a portal that substitutes a reference otherwise)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sandbox.emulators.bitrix24 as emulator_module
from clinicsync.adapters.bitrix24.client import Bitrix24Client
from clinicsync.adapters.bitrix24.gateway import Bitrix24Gateway
from clinicsync.adapters.http.pacing import Pacer
from clinicsync.domain.crm_ports import ContactWrite, CrmMatches, CrmWrite, PhoneCandidates
from sandbox.emulators.base import ServedApp
from sandbox.emulators.bitrix24 import Bitrix24Emulator
from tests.helpers import demo_config

CONFIG = demo_config()
OURS = CONFIG.crm.originator_id
POOL = [f"+7999000{i:04d}" for i in range(8)]  # numbers records may carry
WRITTEN = {0: lambda n: n, 1: lambda n: "8" + n[2:], 2: lambda n: f"+7 ({n[2:5]}) {n[5:8]}-{n[8:10]}-{n[10:]}"}
LEAD_STATUSES = ["NEW", "IN_PROCESS", "CONVERTED", "JUNK"]
DEAL_STAGES = ["NEW", "PREPARATION", "WON", "C1:NEW"]


@dataclass(frozen=True)
class Lead:
    phones: tuple[int, ...]
    status: str
    source: str


@dataclass(frozen=True)
class Contact:
    phone: int
    owner: str | None  # a MIS id when the contact is one of ours


@dataclass(frozen=True)
class Deal:
    contact: int  # index into the contacts
    stage: str
    ours: bool


leads_st = st.builds(
    Lead,
    phones=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=2, unique=True).map(tuple),
    status=st.sampled_from(LEAD_STATUSES),
    source=st.sampled_from(["", "WEB", "CALL"]),
)
contacts_st = st.builds(
    Contact, phone=st.integers(0, len(POOL) - 1), owner=st.one_of(st.none(), st.sampled_from(["p1", "p2"]))
)


@st.composite
def portals(draw: st.DrawFn) -> tuple[list[Lead], list[Contact], list[Deal], list[int], int]:
    leads = draw(st.lists(leads_st, max_size=6))
    contacts = draw(st.lists(contacts_st, max_size=5))
    deals = (
        draw(
            st.lists(
                st.builds(
                    Deal,
                    contact=st.integers(0, len(contacts) - 1),
                    stage=st.sampled_from(DEAL_STAGES),
                    ours=st.booleans(),
                ),
                max_size=5,
            )
        )
        if contacts
        else []
    )
    asked = draw(st.lists(st.integers(0, len(POOL) - 1), min_size=1, unique=True))
    unmatched = draw(st.integers(0, 45))  # more numbers that match nothing: up to 3 findbycomm commands
    return leads, contacts, deals, asked, unmatched


def _seed(
    client: Bitrix24Client, leads: list[Lead], contacts: list[Contact], deals: list[Deal], style: int
) -> dict[str, Any]:
    """The portal's records, made through its REST API; returns their ids for the model."""

    def phones(indexes: tuple[int, ...]) -> list[dict[str, str]]:
        return [{"VALUE": WRITTEN[(style + i) % 3](POOL[i]), "VALUE_TYPE": "WORK"} for i in indexes]

    lead_ids = [
        int(client.call("crm.lead.add", {"fields": {"TITLE": "x", "STATUS_ID": lead.status, "SOURCE_ID": lead.source,
                                                     "PHONE": phones(lead.phones)}})["result"])
        for lead in leads
    ]  # fmt: skip
    contact_ids = []
    for contact in contacts:
        fields: dict[str, Any] = {"NAME": "x", "PHONE": phones((contact.phone,))}
        if contact.owner:
            fields |= {"ORIGINATOR_ID": OURS, "ORIGIN_ID": contact.owner}
        contact_ids.append(int(client.call("crm.contact.add", {"fields": fields})["result"]))
    deal_ids = []
    for n, deal in enumerate(deals):
        category = "1" if deal.stage.startswith("C1:") else "0"
        fields = {
            "TITLE": "x",
            "CATEGORY_ID": category,
            "STAGE_ID": deal.stage,
            "CONTACT_ID": contact_ids[deal.contact],
        }
        if deal.ours:
            fields |= {"ORIGINATOR_ID": OURS, "ORIGIN_ID": f"a{n}"}
        deal_ids.append(int(client.call("crm.deal.add", {"fields": fields})["result"]))
    return {"leads": lead_ids, "contacts": contact_ids, "deals": deal_ids}


def _model(
    leads: list[Lead], contacts: list[Contact], deals: list[Deal], ids: dict[str, Any], asked: list[int]
) -> dict[str, PhoneCandidates]:
    """What adoption may take for each number asked, from the records as made (not from the portal)."""
    out: dict[str, PhoneCandidates] = {}
    for i in asked:
        open_leads = [
            ids["leads"][n] for n, lead in enumerate(leads) if i in lead.phones and lead.status in ("NEW", "IN_PROCESS")
        ]
        holders = [n for n, contact in enumerate(contacts) if contact.phone == i]
        open_deals = [
            (ids["deals"][n], "1" if d.stage.startswith("C1:") else "0", d.stage)
            for n, d in enumerate(deals)
            if d.contact in holders and d.stage in ("NEW", "C1:NEW") and not d.ours
        ]
        found = PhoneCandidates(
            leads=tuple(str(x) for x in sorted(open_leads)),
            contacts=tuple((str(ids["contacts"][n]), contacts[n].owner) for n in holders),
            deals=tuple((str(d), c, s) for d, c, s in sorted(open_deals)),
            lead_sources={str(ids["leads"][n]): lead.source for n, lead in enumerate(leads) if lead.source
                          and ids["leads"][n] in open_leads},
        )  # fmt: skip
        if found.leads or found.contacts or found.deals:
            out[POOL[i]] = found
    return out


@contextmanager
def _portal(substitutes_lists: bool) -> Iterator[tuple[Bitrix24Emulator, Bitrix24Client]]:
    emulator = Bitrix24Emulator()
    server = ServedApp(emulator).start()
    client = Bitrix24Client(emulator.webhook_url(server.base_url), pacer=Pacer(rate=1000, burst=1000), backoff=0.0)
    original = emulator_module._substitute
    if not substitutes_lists:  # a portal that left a reference to a list as text

        def literal_lists(value: Any, sections: Any) -> Any:
            resolved = original(value, sections)
            return value if isinstance(resolved, list) and isinstance(value, str) else resolved

        emulator_module._substitute = literal_lists
    try:
        yield emulator, client
    finally:
        emulator_module._substitute = original
        server.stop()


@settings(max_examples=40, deadline=None)
@given(portal=portals(), style=st.integers(0, 2), substitutes_lists=st.booleans())
def test_each_number_finds_exactly_its_open_leads_contacts_and_unowned_open_deals(
    portal: tuple[list[Lead], list[Contact], list[Deal], list[int], int], style: int, substitutes_lists: bool
) -> None:
    leads, contacts, deals, asked, unmatched = portal
    with _portal(substitutes_lists) as (emulator, client):
        ids = _seed(client, leads, contacts, deals, style)
        gateway = Bitrix24Gateway(client, CONFIG)
        emulator.reset_stats()
        phones = [POOL[i] for i in asked] + [f"+7988{n:07d}" for n in range(unmatched)]
        matches = gateway.find(["p9"], ["a9"], phones=phones)
        requests = emulator.stats()["requests"]
    expected = _model(leads, contacts, deals, ids, asked)
    assert {n: (c.leads, c.contacts, c.deals, dict(c.lead_sources)) for n, c in matches.phones.items()} == {
        n: (c.leads, c.contacts, c.deals, dict(c.lead_sources)) for n, c in expected.items()
    }
    matched = (
        bool(expected)
        or any(c.phone in asked for c in contacts)
        or any(set(lead.phones) & set(asked) for lead in leads)
    )
    # The look-up fits one batch here: the read-back rides in it, unless the portal left the list as text.
    assert requests == (1 if substitutes_lists or not matched else 2)


@pytest.mark.parametrize("matched_command", [0, 11, 12])
def test_a_look_up_chains_the_read_back_of_as_many_numbers_as_its_batch_has_room_for(matched_command: int) -> None:
    """13 findbycomm commands and two look-ups by MIS id leave room for 11 commands' chained reads (three
    each) in the one batch: a number they cover costs no more request, one of the last two a separate
    read-back (a backfill's last invocation: most of its read-back rides in its look-up)."""
    with _portal(substitutes_lists=True) as (emulator, client):
        client.call("crm.lead.add", {"fields": {"TITLE": "x", "STATUS_ID": "NEW", "PHONE": [{"VALUE": POOL[0]}]}})
        emulator.reset_stats()
        phones = [f"+7988{n:07d}" for n in range(13 * 20)]
        phones[matched_command * 20 + 7] = POOL[0]
        matches = Bitrix24Gateway(client, CONFIG).find(["p9"], ["a9"], phones=phones)
        requests, commands = emulator.stats()["requests"], sum(emulator.stats()["batch_commands"].values())
    assert set(matches.phones) == {POOL[0]}
    assert matches.phones[POOL[0]].leads
    assert requests == (1 if matched_command < 11 else 2)
    assert commands == 2 + 13 + 3 * 11 + (0 if matched_command < 11 else 1)  # a lead's read-back: one command


def test_a_look_up_too_big_for_one_batch_reads_back_separately() -> None:
    """A look-up that spans two batches chains nothing (a findbycomm and its reads must share a batch):
    findbycomm, then one read of what it found."""
    with _portal(substitutes_lists=True) as (emulator, client):
        client.call("crm.lead.add", {"fields": {"TITLE": "x", "STATUS_ID": "NEW", "PHONE": [{"VALUE": POOL[0]}]}})
        emulator.reset_stats()
        phones = [POOL[0]] + [f"+7988{n:07d}" for n in range(50 * 20)]  # 51 findbycomm commands
        matches = Bitrix24Gateway(client, CONFIG).find([], [], phones=phones)
        assert set(matches.phones) == {POOL[0]}
        assert emulator.stats()["requests"] == 3


@pytest.mark.parametrize("substitutes_lists", [True, False])
def test_a_number_that_matched_nothing_ignores_whatever_its_chained_reads_returned(substitutes_lists: bool) -> None:
    """A findbycomm that found nothing leaves ``$result[pN][CONTACT]`` pointing at nothing: the portal then
    substitutes what it reached (an empty list: a filter that may match every record). Those rows adopt nothing."""
    with _portal(substitutes_lists) as (_, client):
        client.call("crm.contact.add", {"fields": {"NAME": "x", "PHONE": [{"VALUE": POOL[1]}]}})
        client.call("crm.lead.add", {"fields": {"TITLE": "x", "STATUS_ID": "NEW", "PHONE": [{"VALUE": POOL[2]}]}})
        matches = Bitrix24Gateway(client, CONFIG).find([], [], phones=[POOL[0]])
    assert matches.phones == {}


def _contacts(first: int, count: int) -> list[CrmWrite]:
    return [
        ContactWrite(f"p{n}", None, {"full_name": {"last": "Т", "first": "Т", "middle": ""}})
        for n in range(first, first + count)
    ]


@pytest.mark.parametrize(("ahead", "behind", "requests"), [(60, 20, 4), (37, 0, 3), (0, 5, 4)])
def test_a_look_up_past_one_batch_sends_its_last_findbycomm_commands_in_the_first_write_batch(
    ahead: int, behind: int, requests: int
) -> None:
    """63 look-up commands (2 by MIS id, 61 findbycomm) would take a full batch and one of 13: those 13
    findbycomm commands ride in the first write batch instead, and the writes of the patients they hold back
    (planned when they have answered, here the lead one found) join the same batches: every request full
    but the last when the first is (the look-up, its read-back, then the writes in (13 + writes) / 50 batches):
    one request fewer than look-up and writes apart (2, 1, 2; 2, 1, 1) unless no writes fill the first."""
    with _portal(substitutes_lists=True) as (emulator, client):
        client.call("crm.lead.add", {"fields": {"TITLE": "x", "STATUS_ID": "NEW", "PHONE": [{"VALUE": POOL[0]}]}})
        emulator.reset_stats()
        phones = [f"+7988{n:07d}" for n in range(61 * 20)]
        phones[-1] = POOL[0]  # in the last findbycomm command: deferred
        gateway = Bitrix24Gateway(client, CONFIG)
        matches = gateway.find_deferring_phones(["p0"], ["a0"], phones, [], None)
        assert emulator.stats()["requests"] == 1
        assert matches.deferred_phones == frozenset(phones[48 * 20 :])
        assert not matches.phones
        seen: list[CrmMatches | None] = []

        def more(completed: CrmMatches | None) -> list[CrmWrite]:
            seen.append(completed)
            return _contacts(ahead, behind)

        outcome = gateway.apply_then(_contacts(0, ahead), matches, more)
        stats = emulator.stats()
    assert len(seen) == 1 and seen[0] is not None
    assert set(seen[0].phones) == {POOL[0]} and seen[0].phones[POOL[0]].leads
    assert not seen[0].deferred_phones
    assert set(outcome.contact_ids) == {f"p{n}" for n in range(ahead + behind)} and not outcome.failed
    commands = sum(stats["batch_commands"].values())
    assert commands == 63 + 1 + ahead + behind  # the lead's read-back: one command, in its own request
    assert stats["requests"] == requests


def test_a_findbycomm_the_first_write_batch_did_not_answer_is_sent_on_its_own() -> None:
    """A write batch refused whole (a lost answer: outcome unknown) carried the deferred look-up too: the
    look-up is sent again on its own (a read, safe to repeat) before the held patients are planned."""
    with _portal(substitutes_lists=True) as (emulator, client):
        client.call("crm.lead.add", {"fields": {"TITLE": "x", "STATUS_ID": "NEW", "PHONE": [{"VALUE": POOL[0]}]}})
        phones = [f"+7988{n:07d}" for n in range(61 * 20)]
        phones[-1] = POOL[0]
        gateway = Bitrix24Gateway(client, CONFIG)
        matches = gateway.find_deferring_phones(["p0"], ["a0"], phones, [], None)
        emulator.faults.add("crm.contact.add", 500, times=None)
        seen: list[CrmMatches | None] = []

        def more(completed: CrmMatches | None) -> list[CrmWrite]:
            seen.append(completed)
            return []

        outcome = gateway.apply_then(_contacts(0, 3), matches, more)
    assert outcome.failed == dict.fromkeys(("p0", "p1", "p2"), "outcome_unknown")
    assert len(seen) == 1 and seen[0] is not None and seen[0].phones[POOL[0]].leads


def test_a_deferred_look_up_that_fails_plans_nothing_held() -> None:
    """A findbycomm refused (here with no write to ride with: it goes as a look-up of its own) hands the
    caller no matches: the patients held for it are not planned, so nothing of theirs is written."""
    with _portal(substitutes_lists=True) as (emulator, client):
        phones = [f"+7988{n:07d}" for n in range(61 * 20)]
        gateway = Bitrix24Gateway(client, CONFIG)
        matches = gateway.find_deferring_phones(["p0"], ["a0"], phones, [], None)
        emulator.faults.add("crm.duplicate.findbycomm", 400, times=None, error="INVALID_ARG_VALUE")
        seen: list[CrmMatches | None] = []

        def more(completed: CrmMatches | None) -> list[CrmWrite]:
            seen.append(completed)
            return _contacts(10, 2) if completed is not None else []

        outcome = gateway.apply_then([], matches, more)
    assert seen == [None]
    assert not outcome.contact_ids and not outcome.failed  # the syncer fails the held patients (lookup_failed)
