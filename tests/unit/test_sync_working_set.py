"""The sync's working set (``SyncWork``), the patients held for the phone look-up, and the step that plans
again what a guard refused.

A guard that finds a manager's change (``CHANGED_SINCE_READ``) sends the syncer back to read the deal, plan
the patient again and write unguarded; if the sync stops while that write runs, its patients' digests are
doubted like every write sent. A patient held for the look-up in the write request is written, then stored
with the rest. The working set's rules are checked as properties."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clinicsync.application.sync import Syncer
from clinicsync.application.sync_writes import HeldPlans, SyncWork
from clinicsync.domain.crm_ports import (
    CHANGED_SINCE_READ,
    ContactWrite,
    CrmMatches,
    CrmWrite,
    DealWrite,
    LeadWrite,
    WriteOutcome,
)
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.models import AppointmentStatus, PatientChanges
from clinicsync.domain.rules import PatientPlan
from clinicsync_cli.memory_store import MemoryStore
from tests.helpers import appointment, demo_config, patient

MANAGERS_STAGE = "MANAGER_CALLED"  # a stage no MIS status maps to: only a manager puts a deal there


@dataclass
class GuardingCrm:
    """A CRM that checks guarded writes as Bitrix24 does: a deal whose stage is neither the one expected nor
    the one written fails its patient's writes whole (``CHANGED_SINCE_READ``). With ``lose_answer_of`` the
    answer of that numbered ``apply`` is lost after the writes landed."""

    kind: str = "fake"
    lookups_need_intents: bool = False
    guards_writes: bool = True
    stages: dict[str, str] = field(default_factory=dict)  # deal id -> stage
    applied: list[list[CrmWrite]] = field(default_factory=list)
    fetched: list[list[str]] = field(default_factory=list)
    lose_answer_of: int | None = None
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(100))

    def find(self, *args: Any, **kwargs: Any) -> CrmMatches:
        return CrmMatches()

    def apply(self, writes: Sequence[CrmWrite]) -> WriteOutcome:
        self.applied.append(list(writes))
        outcome = WriteOutcome()
        refused = {
            w.patient_id
            for w in writes
            if isinstance(w, DealWrite)
            and w.expect_stage is not None
            and self.stages.get(str(w.deal_id)) not in (w.expect_stage, w.stage)
        }
        outcome.failed.update(dict.fromkeys(refused, CHANGED_SINCE_READ))
        for w in writes:
            if w.patient_id in refused:
                continue
            if isinstance(w, ContactWrite):
                outcome.contact_ids[w.patient_id] = w.contact_id or f"C{next(self.ids)}"
            elif isinstance(w, DealWrite):
                deal_id = w.deal_id or f"D{next(self.ids)}"
                self.stages[deal_id] = w.stage or self.stages.get(deal_id, "")
                outcome.deal_ids[w.appointment_id] = deal_id
        if self.lose_answer_of == len(self.applied):
            raise TimeoutError("the write request's answer was lost")
        return outcome

    def fetch(self, entity: str, crm_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        self.fetched.append(list(crm_ids))
        return {i: {"id": i, "stage": self.stages[i], "closed": "N", "modified_by": "manager"} for i in crm_ids}

    def integration_user(self) -> str:
        return "integration"

    def requests_made(self) -> int:
        return 0


def _visit(status: AppointmentStatus, version: int) -> list[PatientChanges]:
    return [PatientChanges(patient=patient("p1"), appointments=(appointment("a1", "p1", status, version),))]


def _moved_by_a_manager(crm: GuardingCrm) -> tuple[MemoryStore, Syncer, str]:
    """p1's visit synced once (its deal at the booked stage), then moved to another stage by a manager."""
    store = MemoryStore()
    syncer = Syncer(demo_config(), store, crm, KeyedHasher(b"k" * 32))  # type: ignore[arg-type]
    syncer.sync(_visit(AppointmentStatus.BOOKED, 1))
    (deal_id,) = crm.stages
    crm.stages[deal_id] = MANAGERS_STAGE
    return store, syncer, deal_id


def test_a_write_a_guard_refused_is_read_planned_again_and_written_unguarded() -> None:
    crm = GuardingCrm()
    store, syncer, deal_id = _moved_by_a_manager(crm)
    booked_stage = store.load_patients({"p1": ["a1"]})["p1"].appointments["a1"].stage
    report = syncer.sync(_visit(AppointmentStatus.ARRIVED, 2))  # the MIS moved past the manager's move
    refused, rewritten = crm.applied[-2:]
    assert [w.expect_stage for w in refused if isinstance(w, DealWrite)] == [booked_stage]
    assert crm.fetched == [[deal_id]]  # the refused deal read once, after the refusal
    assert rewritten and all(w.expect_stage is None for w in rewritten if isinstance(w, DealWrite))
    assert report.skipped.get("manual_move_recorded") == 1  # the manager's move learnt from the read
    stored = store.load_patients({"p1": ["a1"]})["p1"].appointments["a1"]
    assert stored.stage == crm.stages[deal_id] != MANAGERS_STAGE  # then written over: the MIS moved past it


def test_a_sync_stopped_while_the_unguarded_rewrite_runs_doubts_its_patients_digests() -> None:
    crm = GuardingCrm()
    store, syncer, _ = _moved_by_a_manager(crm)
    epoch = store.load_patients({"p1": []})["p1"].write_epoch
    crm.lose_answer_of = len(crm.applied) + 2  # this sync's second request: the re-plan's write
    with pytest.raises(TimeoutError):
        syncer.sync(_visit(AppointmentStatus.ARRIVED, 2))
    assert store.load_patients({"p1": []})["p1"].write_epoch == epoch + 1
    assert store.claim_patients(["p1"], "next", 0, 60) == {"p1"}  # the claim was released


@dataclass
class DeferringCrm(GuardingCrm):
    """A gateway whose phone look-up rides in its first write request (``LookupInWrites``): every patient with
    a phone and no deal yet is held, and planned once the write request has answered."""

    def find_deferring_phones(
        self,
        patient_ids: Sequence[str],
        appointment_ids: Sequence[str],
        phones: Sequence[str],
        multifield_contacts: Sequence[str],
        intended_since: int | None,
    ) -> CrmMatches:
        return CrmMatches(deferred_phones=frozenset(phones))

    def apply_then(
        self,
        writes: Sequence[CrmWrite],
        matches: CrmMatches,
        more: Callable[[CrmMatches | None], Sequence[CrmWrite]],
    ) -> WriteOutcome:
        outcome = self.apply(writes)
        outcome.merge(self.apply(more(replace(matches, deferred_phones=frozenset()))))
        return outcome


def test_a_patient_held_for_the_phone_look_up_is_written_and_stored_with_the_rest() -> None:
    crm = DeferringCrm()
    store = MemoryStore()
    syncer = Syncer(demo_config(), store, crm, KeyedHasher(b"k" * 32))  # type: ignore[arg-type]
    alone = PatientChanges(patient=patient("p2", phone=None), appointments=(appointment("a2", "p2"),))
    report = syncer.sync([*_visit(AppointmentStatus.BOOKED, 1), alone])
    held_writes = {w.patient_id for w in crm.applied[1]}
    assert {w.patient_id for w in crm.applied[0]} == {"p2"} and held_writes == {"p1"}  # p1 held, then written
    assert (report.contacts_created, report.deals_created) == (2, 2)
    stored = store.load_patients({"p1": ["a1"], "p2": ["a2"]})
    assert stored["p1"].contact_id is not None and stored["p1"].appointments["a1"].deal_id is not None
    assert stored["p2"].contact_id is not None and stored["p2"].appointments["a2"].deal_id is not None


# --- the working set, as properties ------------------------------------------------------------------------

PIDS = st.sampled_from(["p1", "p2", "p3", "p4"])
WRITE: st.SearchStrategy[CrmWrite] = st.one_of(
    st.builds(LeadWrite, st.just("L1"), PIDS, st.none(), st.booleans()),
    st.builds(ContactWrite, PIDS, st.none(), st.just({})),
)
WRITES = st.lists(WRITE, max_size=4)


def _changes(pids: list[str]) -> list[PatientChanges]:
    return [PatientChanges(patient=patient(pid), appointments=()) for pid in pids]


@st.composite
def working_sets(draw: st.DrawFn) -> SyncWork:
    """A working set after its writes ran: the held patients' share filled (their look-up answered) or not."""
    pids = draw(st.lists(PIDS, unique=True, max_size=4))
    cut = draw(st.integers(0, len(pids)))
    live, held = pids[:cut], pids[cut:]
    work = SyncWork(_changes(live), _changes(held), CrmMatches(deferred_phones=frozenset({"+7"})))
    work.plans = [PatientPlan(pid) for pid in live]
    work.writes = draw(WRITES)
    work.intents = draw(st.lists(st.sampled_from(["P#p1", "D#a1"]), max_size=2))
    if draw(st.booleans()):
        work.added = HeldPlans(CrmMatches(), [PatientPlan(pid) for pid in held], draw(WRITES), ["P#p9"])
    else:
        work.added = HeldPlans(writes=draw(WRITES))  # the look-up failed, or the sync stopped before it answered
    return work


@given(working_sets())
def test_every_write_sent_is_doubted_whether_the_held_patients_joined_or_not(work: SyncWork) -> None:
    sent = {w.patient_id for w in [*work.writes, *work.added.writes]}
    assert set(work.maybe_sent()) == sent
    work.join_held()
    assert set(work.maybe_sent()) == sent


@given(working_sets())
def test_the_held_patients_join_after_the_others_only_if_their_look_up_answered(work: SyncWork) -> None:
    live, held, plans, writes, intents, matches = (
        list(work.live),
        list(work.held),
        list(work.plans),
        list(work.writes),
        list(work.intents),
        work.matches,
    )
    work.join_held()
    if work.added.matches is None:
        assert (work.live, work.plans, work.writes, work.intents) == (live, plans, writes, intents)
        assert work.matches is matches
        return
    assert work.live == live + held
    assert [p.patient_id for p in work.plans] == [c.patient.mis_id for c in work.live]  # persisted side by side
    assert work.writes == writes + work.added.writes
    assert work.intents == intents + work.added.intents
    assert work.matches is work.added.matches
