"""Adopt, never duplicate: an open lead or unowned deal that a phone finds is taken over at most once,
by the first new deal for that phone, whatever the order, batches and invocations the family lands in.

The real syncer and rules run against moto and a small in-memory CRM; the expected adopter comes from
an independent model that walks the same deliveries.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import boto3
import pytest
from hypothesis import given
from hypothesis import strategies as st
from moto import mock_aws

from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.application.sync import Syncer, SyncIncomplete
from clinicsync.domain.crm_ports import (
    ContactWrite,
    CrmMatches,
    CrmWrite,
    DealMatch,
    DealWrite,
    LeadWrite,
    PhoneCandidates,
    WriteOutcome,
)
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.models import PatientChanges
from tests.helpers import T0, appointment, demo_config, patient, template_table_spec

PHONE = "+79250000008"
LEAD, DEAL, FORM_CONTACT = "L1", "D1", "C1"  # what a website form left in the CRM before the cards


@dataclass
class FamilyCrm:
    """A CRM holding one open lead, one open unowned deal and one unowned contact for the family's phone.

    It records every write, so the test judges what the sync asked the CRM to do. With ``stale_reads``
    a phone look-up still sees the lead and deal open after their adoption: an invocation that read the
    CRM while another one, running at the same time, was adopting them."""

    stale_reads: bool = False
    kind: str = "fake"
    lookups_need_intents: bool = False
    guards_writes: bool = False
    lead_open: bool = True
    deal_owner: str | None = None  # appointment id once adopted
    contacts: dict[str, str | None] = field(default_factory=lambda: {FORM_CONTACT: None})  # id -> owner
    deals: dict[str, str] = field(default_factory=dict)  # appointment id -> deal id
    lead_takers: list[str] = field(default_factory=list)  # appointment ids of deals that carry the lead
    deal_takers: list[str] = field(default_factory=list)  # appointment ids that took the open deal over
    conversions: int = 0
    creates: list[str] = field(default_factory=list)  # appointment ids of deals created
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(100))

    def find(
        self,
        patient_ids: Sequence[str],
        appointment_ids: Sequence[str],
        phones: Sequence[str] = (),
        multifield_contacts: Sequence[str] = (),
        intended_since: int | None = None,
    ) -> CrmMatches:
        contacts = {owner: cid for cid, owner in self.contacts.items() if owner in patient_ids}
        deals = {
            aid: DealMatch(self.deals[aid], "0", "NEW", closed=False) for aid in appointment_ids if aid in self.deals
        }
        found = PhoneCandidates(
            leads=(LEAD,) if self.lead_open or self.stale_reads else (),
            contacts=tuple(self.contacts.items()),
            deals=((DEAL, "0", "NEW"),) if self.deal_owner is None or self.stale_reads else (),
        )
        return CrmMatches(contacts=contacts, deals=deals, phones={PHONE: found} if PHONE in phones else {})

    def apply(self, writes: Sequence[CrmWrite]) -> WriteOutcome:
        outcome = WriteOutcome()
        for w in writes:
            if isinstance(w, ContactWrite):
                cid = w.contact_id or f"C{next(self.ids)}"
                assert self.contacts.get(cid) in (None, w.patient_id), "two patients merged into one contact"
                self.contacts[cid] = w.patient_id
                outcome.contact_ids[w.patient_id] = cid
            elif isinstance(w, DealWrite):
                if w.deal_id is None:
                    self.creates.append(w.appointment_id)
                elif w.deal_id == DEAL and self.deal_owner != w.appointment_id:
                    self.deal_takers.append(w.appointment_id)
                    self.deal_owner = w.appointment_id
                self.deals[w.appointment_id] = w.deal_id or f"D{next(self.ids)}"
                outcome.deal_ids[w.appointment_id] = self.deals[w.appointment_id]
                if w.lead_id == LEAD:
                    self.lead_takers.append(w.appointment_id)
            elif isinstance(w, LeadWrite) and w.convert:
                self.conversions += 1
                self.lead_open = False
        return outcome

    def requests_made(self) -> int:
        return 0

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


@dataclass
class DeferringFamilyCrm(FamilyCrm):
    """A gateway that looks phones up in its first write request (Bitrix24's overlap, ``LookupInWrites``):
    the family, all on one phone, is planned after the rest of the message's writes went out. With
    ``lookup_fails`` that look-up fails."""

    guards_writes: bool = True
    lookup_fails: bool = False
    deferred_lookups: int = 0

    def find_deferring_phones(
        self,
        patient_ids: Sequence[str],
        appointment_ids: Sequence[str],
        phones: Sequence[str],
        multifield_contacts: Sequence[str],
        intended_since: int | None,
    ) -> CrmMatches:
        found = self.find(patient_ids, appointment_ids, (), multifield_contacts, intended_since)
        return replace(found, deferred_phones=frozenset(phones))

    def apply_then(
        self,
        writes: Sequence[CrmWrite],
        matches: CrmMatches,
        more: Callable[[CrmMatches | None], Sequence[CrmWrite]],
    ) -> WriteOutcome:
        outcome = self.apply(writes)
        self.deferred_lookups += 1
        phones = self.find([], [], sorted(matches.deferred_phones)).phones
        completed = None if self.lookup_fails else replace(matches, phones=phones, deferred_phones=frozenset())
        later = self.apply(more(completed))
        outcome.contact_ids.update(later.contact_ids)
        outcome.deal_ids.update(later.deal_ids)
        return outcome


@dataclass(frozen=True)
class Member:
    pid: str
    refused: bool
    card_batch: int  # the poll that first carries the card
    visits: tuple[tuple[str, bool, int, int], ...]  # (appointment id, anonymous, day, poll that carries it)


@st.composite
def families(draw: st.DrawFn) -> tuple[list[Member], list[list[str]], set[int], bool, int]:
    """One to three family members, their visits, which poll carries each card and visit, the order of
    the cards within each poll, which polls' messages are delivered twice, whether the syncs run at the
    same time (each reads the CRM before the others write), and how many patients a message holds."""
    polls = draw(st.integers(1, 3))
    members = []
    for m in range(draw(st.integers(1, 3))):
        card = draw(st.integers(0, polls - 1))
        visits = tuple(
            (f"a{m}{v}", draw(st.booleans()), draw(st.integers(1, 5)), draw(st.integers(card, polls - 1)))
            for v in range(draw(st.integers(0, 2)))
        )
        members.append(Member(f"p{m}", draw(st.integers(0, 4)) == 0, card, visits))
    orders = [draw(st.permutations([m.pid for m in members])) for _ in range(polls)]
    twice = draw(st.sets(st.integers(0, polls - 1)))
    return members, orders, twice, draw(st.booleans()), draw(st.integers(1, 3))


def batches(members: list[Member], orders: list[list[str]]) -> list[list[PatientChanges]]:
    by_id = {m.pid: m for m in members}
    out = []
    for n, order in enumerate(orders):
        batch = []
        for pid in order:
            m = by_id[pid]
            visits = tuple(
                appointment(aid, pid, start=T0 + timedelta(days=day), anonymous=anonymous)
                for aid, anonymous, day, at in m.visits
                if at == n
            )
            if m.card_batch == n or (visits and m.card_batch < n):
                card = patient(pid, phone=PHONE, email=None, refused_data_processing=m.refused)
                batch.append(PatientChanges(patient=card, appointments=visits))
        out.append(batch)
    return out


def first_new_deal(members: list[Member], orders: list[list[str]]) -> str | None:
    """The model: in delivery order, the first visit that becomes a deal (its patient is sent, it is not
    anonymous); within one patient's batch, the earliest visit first."""
    by_id = {m.pid: m for m in members}
    for n, order in enumerate(orders):
        for pid in order:
            m = by_id[pid]
            if m.refused:
                continue
            sent = sorted((day, aid) for aid, anonymous, day, at in m.visits if at == n and not anonymous)
            if sent:
                return sent[0][1]
    return None


@pytest.fixture
def table_factory(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    names = itertools.count()
    with mock_aws():
        dynamodb = boto3.resource("dynamodb", region_name="eu-central-1")

        def make() -> DynamoStore:
            spec = template_table_spec(f"adoption-{next(names)}")
            return DynamoStore(dynamodb.create_table(**spec))

        yield make


def run(
    store: DynamoStore,
    members: list[Member],
    orders: list[list[str]],
    twice: set[int],
    concurrent: bool = False,
    per_message: int = 50,
    crm_type: type[FamilyCrm] = FamilyCrm,
) -> FamilyCrm:
    crm = crm_type(stale_reads=concurrent)
    hasher = KeyedHasher(b"k" * 32)
    syncer = Syncer(demo_config(), store, crm, hasher)  # type: ignore[arg-type]
    for n, batch in enumerate(batches(members, orders)):
        # The poller indexes a page's phones before anyone syncs it.
        store.index_contacts([(hasher.phone_key(PHONE), c.patient.mis_id) for c in batch], [])
        for start in range(0, len(batch), per_message):
            for _ in range(2 if n in twice else 1):
                syncer.sync(batch[start : start + per_message])
    return crm


@pytest.mark.parametrize("crm_type", [FamilyCrm, DeferringFamilyCrm])
@given(family=families())
def test_the_first_new_deal_for_a_phone_adopts_its_open_lead_and_deal_once(
    table_factory: Any, family: tuple[list[Member], list[list[str]], set[int], bool, int], crm_type: type[FamilyCrm]
) -> None:
    """Also when the phone's look-up rides in the first write request and the family is planned after it."""
    members, orders, twice, concurrent, per_message = family
    crm = run(table_factory(), members, orders, twice, concurrent, per_message, crm_type)
    adopter = first_new_deal(members, orders)
    expected = [adopter] if adopter else []
    assert crm.lead_takers == expected  # at most once, and only by the first new deal
    assert crm.deal_takers == expected
    assert crm.conversions == len(expected)
    assert len(crm.creates) == len(set(crm.creates))  # redelivery never creates a second deal
    owners = [o for o in crm.contacts.values() if o is not None]
    assert len(owners) == len(set(owners))  # one contact per member, never shared


def test_a_member_without_a_booking_planned_first_leaves_the_lead_to_the_one_with_it(table_factory: Any) -> None:
    mother = Member("p0", refused=False, card_batch=0, visits=())
    son = Member("p1", refused=False, card_batch=0, visits=(("a10", False, 1, 0),))
    crm = run(table_factory(), [mother, son], [["p0", "p1"]], set())
    assert crm.lead_takers == ["a10"] and crm.deal_takers == ["a10"] and crm.conversions == 1


@pytest.mark.parametrize("why", ["refused", "anonymous"])
def test_a_booking_that_is_never_sent_leaves_the_lead_to_the_next_new_deal(table_factory: Any, why: str) -> None:
    first = Member("p0", refused=why == "refused", card_batch=0, visits=(("a00", why == "anonymous", 1, 0),))
    second = Member("p1", refused=False, card_batch=0, visits=(("a10", False, 2, 0),))
    crm = run(table_factory(), [first, second], [["p0", "p1"]], set())
    assert crm.lead_takers == ["a10"] and crm.deal_takers == ["a10"]


def test_a_card_synced_before_its_first_booking_still_adopts_with_that_booking(table_factory: Any) -> None:
    mother = Member("p0", refused=False, card_batch=0, visits=(("a00", False, 1, 1),))
    crm = run(table_factory(), [mother], [["p0"], ["p0"]], set())
    assert crm.lead_takers == ["a00"] and crm.deal_takers == ["a00"]


def test_a_patient_stored_before_the_deal_flag_keeps_the_old_rule(table_factory: Any) -> None:
    """Items written before ``has_deal`` existed: a known contact meant the adoption was over."""
    store = table_factory()
    store._table.put_item(Item={"pk": "PAT#old", "sk": "STATE", "contact_id": "C9", "version": 1})
    store._table.put_item(Item={"pk": "PAT#new", "sk": "STATE", "version": 1})
    states = store.load_patients({"old": [], "new": []})
    assert states["old"].has_deal and not states["new"].has_deal


def test_family_members_synced_at_the_same_time_in_two_shards_adopt_once(table_factory: Any) -> None:
    """Both invocations find the lead and the deal open; the first to claim them adopts, the other makes
    a plain deal, and a redelivery of either message changes nothing."""
    mother = Member("p0", refused=False, card_batch=0, visits=(("a00", False, 1, 0),))
    son = Member("p1", refused=False, card_batch=1, visits=(("a10", False, 1, 1),))
    crm = run(table_factory(), [mother, son], [["p0"], ["p1"]], {0, 1}, concurrent=True)
    assert crm.lead_takers == ["a00"] and crm.deal_takers == ["a00"] and crm.conversions == 1
    assert sorted(crm.deals) == ["a00", "a10"] and crm.creates == ["a10"]


def test_an_adoption_claim_is_the_appointments_own_and_expires(table_factory: Any) -> None:
    store = table_factory()
    assert store.claim_adoptions({"L1": "a1", "D1": "a1"}, now=1000, seconds=60) == set()
    assert store.claim_adoptions({"L1": "a2", "D2": "a2"}, now=1010, seconds=60) == {"L1"}
    assert store.claim_adoptions({"L1": "a1"}, now=1020, seconds=60) == set()  # a redelivery, a retry
    assert store.claim_adoptions({"L1": "a2"}, now=1081, seconds=60) == set()  # expired: the CRM tells now


def test_a_failed_deferred_phone_look_up_fails_only_the_patients_it_held(table_factory: Any) -> None:
    """The patients whose phone look-up rode in the write request and failed are not written and fail the
    message (retried for them); the others are written and stored."""
    store = table_factory()
    crm = DeferringFamilyCrm(lookup_fails=True)
    syncer = Syncer(demo_config(), store, crm, KeyedHasher(b"k" * 32))  # type: ignore[arg-type]
    alone = PatientChanges(patient=patient("p9", phone=None, email=None), appointments=(appointment("a9", "p9"),))
    family = PatientChanges(patient=patient("p0", phone=PHONE, email=None), appointments=(appointment("a0", "p0"),))
    with pytest.raises(SyncIncomplete) as failed:
        syncer.sync([alone, family])
    assert failed.value.failed == {"p0": "lookup_failed"}
    assert crm.deferred_lookups == 1
    assert crm.creates == ["a9"] and "p0" not in crm.contacts.values()
    stored = store.load_patients({"p9": ["a9"], "p0": ["a0"]})
    assert stored["p9"].contact_id is not None
    assert "p0" not in stored or stored["p0"].contact_id is None
    crm.lookup_fails = False
    syncer.sync([alone, family])
    assert crm.creates == ["a9"]  # the retry's p9 is known: not created again
    assert crm.lead_takers == ["a0"] and crm.deal_takers == ["a0"]  # the family's visit adopts, once


@dataclass
class LostAnswerDeferringCrm(DeferringFamilyCrm):
    """The held patients' writes go out with the rest; then the request's answer is lost."""

    def apply_then(
        self,
        writes: Sequence[CrmWrite],
        matches: CrmMatches,
        more: Callable[[CrmMatches | None], Sequence[CrmWrite]],
    ) -> WriteOutcome:
        super().apply_then(writes, matches, more)
        raise TimeoutError("the write request's answer was lost")


def test_a_sync_that_fails_after_the_held_patients_writes_went_out_doubts_their_digests(table_factory: Any) -> None:
    """A patient held for the phone look-up in the write request is planned and written while that request
    runs; if the sync then fails, those writes are of unknown outcome like the others: the patient's stored
    digests are doubted (``write_epoch``) before its claim goes."""
    store = table_factory()
    card = patient("p0", phone=PHONE, email=None)
    Syncer(demo_config(), store, FamilyCrm(), KeyedHasher(b"k" * 32)).sync(  # type: ignore[arg-type]
        [PatientChanges(patient=card, appointments=())]  # the card before its first booking: no deal yet
    )
    before = store.load_patients({"p0": []})["p0"]
    assert before.contact_id is not None and not before.has_deal
    crm = LostAnswerDeferringCrm()
    syncer = Syncer(demo_config(), store, crm, KeyedHasher(b"k" * 32))  # type: ignore[arg-type]
    with pytest.raises(TimeoutError):
        syncer.sync([PatientChanges(patient=card, appointments=(appointment("a0", "p0"),))])
    assert crm.deferred_lookups == 1 and crm.deal_takers == ["a0"]  # held, then written (adopting the deal)
    assert store.load_patients({"p0": []})["p0"].write_epoch == before.write_epoch + 1
