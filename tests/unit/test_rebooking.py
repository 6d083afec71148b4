"""Case C's funnel: a no-show is called back and re-booked in the MIS, and the sync updates THE SAME deal
(new appointment id, date and time, stage "booked"); it never opens a second one (docs/statuses.md).

The rule is pure, so it is tested against a tiny CRM model: writes land on deals by id, a look-up by
MIS id reads the deals' origin, and a lost response means the write landed but nothing was remembered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.crm_ports import CrmMatches, DealMatch, DealWrite, PhoneCandidates
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.models import Appointment, CrmObservation, PatientChanges
from clinicsync.domain.models import AppointmentStatus as S
from clinicsync.domain.rules import Adoption, apply_observation, plan_patient
from clinicsync.domain.state import PatientState
from tests.helpers import T0, appointment, days, demo_config, examples, patient

HASHER = KeyedHasher(b"k" * 32)
CONFIG = demo_config()
NO_SHOW = CONFIG.pipeline(repeat=False).stages[S.NO_SHOW]
BOOKED = CONFIG.pipeline(repeat=False).stages[S.BOOKED]


@dataclass
class Crm:
    """Deals by id: origin (the MIS appointment id written last), stage, closed, and the writes seen; every
    write that moved a deal from one visit to another, with what the MIS (``mis``, when given) said of the
    visit it left."""

    deals: dict[str, dict[str, object]] = field(default_factory=dict)
    writes: list[DealWrite] = field(default_factory=list)
    intents: set[str] = field(default_factory=set)  # the syncer's intents (our table, not the CRM's)
    mis: dict[str, Appointment] = field(default_factory=dict)
    moves: list[tuple[str, str, str, S | None]] = field(default_factory=list)  # deal, from, to, from's status

    def find(self, appointment_ids: list[str]) -> CrmMatches:
        found = {
            str(d["origin"]): DealMatch(did, str(d["category"]), str(d["stage"]), bool(d["closed"]))
            for did, d in self.deals.items()
            if d["origin"] in appointment_ids
        }
        return CrmMatches(contacts={"p1": "c1"}, deals=found)

    def apply(self, writes: list[DealWrite], config: ClinicConfig) -> dict[str, str]:
        ids = {}
        for w in writes:
            self.writes.append(w)
            deal_id = w.deal_id or str(len(self.deals) + 1)
            deal = self.deals.setdefault(deal_id, {"category": w.category_id, "closed": False})
            assert not deal["closed"], "a closed deal was written again"
            origin = w.fields["mis_appointment_id"]
            left = str(deal.get("origin"))
            if deal.get("origin") not in (None, origin):
                self.moves.append((deal_id, left, origin, self.mis[left].status if left in self.mis else None))
            deal["origin"] = origin
            deal["visit_at"] = w.fields["visit_at"]
            if w.stage is not None:
                deal["stage"] = w.stage
                deal["closed"] = w.stage in config.pipeline(repeat=False).closed_stages
            ids[w.appointment_id] = deal_id
        return ids


def sync(
    crm: Crm,
    state: PatientState,
    visits: list[Appointment],
    *,
    lose: bool = False,
    look_up: bool = True,
    every_unknown: bool = False,
    config: ClinicConfig = CONFIG,
    adoption: Adoption | None = None,
    landed: int | None = None,
    polled_at: datetime | None = None,
) -> PatientState:
    """One syncer pass for one patient, as application/sync.py and sync_lookup.py make it with Bitrix24 and
    amoCRM: load the patient's STATE with the polled visits only, look up by MIS id the visits with an intent
    (``every_unknown``: also every visit without a deal of its own, as for a patient new to us), plan, note
    the intents (a create, or a write of a deal that is not the visit's: a continuation), write, store the
    changed visits and clear the intents (unless the response is lost: the writes landed, the state and the
    intents are the old ones, its digests marked unsure; ``landed``: the attempt failed after its first
    writes)."""
    polled = {a.mis_id for a in visits}
    loaded = state.model_copy(update={"appointments": {k: v for k, v in state.appointments.items() if k in polled}})
    without_own_deal = {a.mis_id for a in visits if state.own_deal(a.mis_id) is None} if every_unknown else set()
    unknown = [a.mis_id for a in visits if a.mis_id in crm.intents or a.mis_id in without_own_deal]
    matches = crm.find(unknown) if look_up else CrmMatches(contacts={"p1": "c1"})
    changes = PatientChanges(patient=patient(), appointments=tuple(visits), polled_at=polled_at)
    plan = plan_patient(changes, loaded, matches, config, HASHER, adoption=adoption)
    deal_writes = [w for w in plan.writes if isinstance(w, DealWrite)]
    noted = {w.appointment_id for w in deal_writes if w.deal_id is None or w.new_to_visit}
    crm.intents |= noted
    ids = crm.apply(deal_writes[:landed], config)
    if lose or landed is not None:  # as the syncer's failure path: the stored digests are marked unsure
        return state.model_copy(update={"write_epoch": state.write_epoch + 1})
    crm.intents -= noted & set(ids)
    assert plan.next_state is not None
    new = plan.next_state
    for write in plan.writes:
        if isinstance(write, DealWrite):
            new.appointments[write.appointment_id].deal_id = ids[write.appointment_id]
            new.track_deal(new.appointments[write.appointment_id], polled_at)
    stored = {aid: new.appointments[aid] for aid in plan.changed_appointments}  # the items the syncer saves
    kept = new.run_starts_to_keep()  # as the table stores the STATE item
    return new.model_copy(update={"appointments": {**state.appointments, **stored}, "run_starts": kept})


def no_show_then_rebooked(crm: Crm) -> tuple[PatientState, Appointment, Appointment]:
    first = appointment("a1", start=T0)
    state = sync(crm, PatientState(patient_id="p1", contact_id="c1"), [first])
    no_show = appointment("a1", status=S.NO_SHOW, start=T0, version=2)
    state = sync(crm, state, [no_show])
    rebooked = appointment("a2", start=T0 + days(3) + timedelta(hours=6))
    return state, no_show, rebooked


def test_a_rebooked_no_show_continues_its_deal() -> None:
    crm = Crm()
    state, _, rebooked = no_show_then_rebooked(crm)
    state = sync(crm, state, [rebooked])
    [(deal_id, deal)] = crm.deals.items()
    assert deal["origin"] == "a2" and deal["stage"] == BOOKED
    assert deal["visit_at"] == rebooked.starts_at.astimezone(CONFIG.tz).isoformat()
    assert state.appointments["a2"].deal_id == deal_id
    assert state.continued == {"a1": "a2"}


def test_the_old_visits_later_events_never_move_the_continued_deal() -> None:
    crm = Crm()
    state, no_show, rebooked = no_show_then_rebooked(crm)
    state = sync(crm, state, [rebooked])
    writes = len(crm.writes)
    for late in (no_show, no_show.model_copy(update={"version": 7}), appointment("a1", status=S.CANCELLED, version=9)):
        state = sync(crm, state, [late])
    assert len(crm.writes) == writes
    assert [d["origin"] for d in crm.deals.values()] == ["a2"]


def test_the_no_show_and_the_rebooking_in_one_poll_make_one_write_to_one_deal() -> None:
    crm = Crm()
    state = sync(crm, PatientState(patient_id="p1", contact_id="c1"), [appointment("a1", start=T0)])
    before = len(crm.writes)
    no_show = appointment("a1", status=S.NO_SHOW, start=T0, version=2)
    state = sync(crm, state, [no_show, appointment("a2", start=T0 + days(2))])
    assert [w.appointment_id for w in crm.writes[before:]] == ["a2"]
    assert [(d["origin"], d["stage"]) for d in crm.deals.values()] == [("a2", BOOKED)]


def test_a_closed_no_show_deal_is_never_continued() -> None:
    crm = Crm()
    state, _, rebooked = no_show_then_rebooked(crm)
    deal_id = state.appointments["a1"].deal_id
    assert deal_id is not None
    lost = "LOSE"  # the manager gave up on the patient
    crm.deals[deal_id] |= {"stage": lost, "closed": True}
    obs = CrmObservation(kind="deal_stage", patient_id="p1", appointment_id="a1", crm_id=deal_id, stage=lost)
    apply_observation(state, obs, CONFIG)
    state = sync(crm, state, [rebooked])
    assert sorted(str(d["origin"]) for d in crm.deals.values()) == ["a1", "a2"]
    assert state.continued == {}


def test_only_the_configured_stages_continue() -> None:
    primary = CONFIG.crm.pipelines["primary"].model_copy(update={"continue_stages": frozenset()})
    crm_cfg = CONFIG.crm.model_copy(update={"pipelines": {**CONFIG.crm.pipelines, "primary": primary}})
    off = CONFIG.model_copy(update={"crm": crm_cfg})
    crm = Crm()
    state, _, rebooked = no_show_then_rebooked(crm)
    sync(crm, state, [rebooked], config=off)
    assert len(crm.deals) == 2  # the rule is off: the re-booking opens its own deal

    crm = Crm()  # a deal still at "booked" is not a no-show: a second booking gets its own deal
    state = sync(crm, PatientState(patient_id="p1", contact_id="c1"), [appointment("a1", start=T0)])
    sync(crm, state, [appointment("a2", start=T0 + days(7))])
    assert len(crm.deals) == 2


def test_an_earlier_or_finished_visit_does_not_continue_the_no_show() -> None:
    for later in (appointment("a2", start=T0 - days(1)), appointment("a2", status=S.COMPLETED, start=T0 + days(1))):
        crm = Crm()
        state, _, _ = no_show_then_rebooked(crm)
        sync(crm, state, [later])
        assert len(crm.deals) == 2, later.status


EVENTS = st.lists(st.sampled_from(["old_booked", "old_no_show", "rebooked", "old_cancelled"]), max_size=6)


@settings(max_examples=examples(40), deadline=None)
@given(adopt=st.booleans(), failed=st.lists(st.integers(min_value=0, max_value=2), max_size=2))
def test_a_no_show_and_its_rebooking_first_seen_in_one_poll_keep_two_deals(adopt: bool, failed: list[int]) -> None:
    """Shrunk by the model-based test (amoCRM and MEDODS): only a deal that a visit held before this poll is
    continued. A no-show that first appears with its re-booking keeps a deal of its own, also when that
    deal is an open one it adopted by phone (an amoCRM inquiry), and also when the poll's message is
    retried after an attempt that wrote only some of its deals (the retry finds those by MIS id)."""
    crm = Crm()
    if adopt:  # an inquiry a manager opened before the patient's first visit: an open deal with no MIS id
        crm.deals["7"] = {"category": "0", "stage": "NEW", "closed": False, "origin": None}
    visits = [appointment("a1", status=S.NO_SHOW, start=T0, version=2), appointment("a2", start=T0 + days(2))]
    state = PatientState(patient_id="p1", contact_id="c1")
    for landed in [*failed, None]:  # failed attempts wrote their first `landed` deals; the last one succeeds
        unowned = adopt and crm.deals["7"]["origin"] is None  # the phone finds only a deal nobody owns
        adoption = Adoption(PhoneCandidates(deals=(("7", "0", "NEW"),)), set()) if unowned else None
        state = sync(crm, state, visits, adoption=adoption, landed=landed)
    assert sorted(str(d["origin"]) for d in crm.deals.values()) == ["a1", "a2"]
    assert state.continued == {}
    assert all(state.appointments[a].deal_id for a in ("a1", "a2"))


@settings(max_examples=examples(30), deadline=None)
@given(pages=st.permutations([[0], [1]]) | st.just([[0, 1]]), between=st.integers(min_value=0, max_value=3))
def test_a_no_show_and_its_rebooking_first_seen_in_one_poll_run_keep_two_deals_whichever_messages_carry_them(
    pages: list[list[int]], between: int
) -> None:
    """Regression (the 20k and 50k imports): a first import of more than one page carried a patient's no-show
    and its re-booking in different messages; the re-booking then took over the no-show's deal, made by the
    earlier message, and 217 of 18,601 visits (every one a no-show) had no deal. One poll run stamps its
    messages alike, and a deal that became the latest in that same run is not continued: two deals, as when
    one message carries both, whatever the pages, their order and the other patients' messages between."""
    run = T0 - days(30)  # the import's poll run
    visits = [appointment("a1", status=S.NO_SHOW, start=T0, version=2), appointment("a2", start=T0 + days(2))]
    crm = Crm()
    state = PatientState(patient_id="p1", contact_id="c1")
    for page in pages:
        for _ in range(between):  # other messages of the run change nothing of this patient
            state = sync(crm, state, [], polled_at=run)
        state = sync(crm, state, [visits[i] for i in page], polled_at=run)
    assert sorted(str(d["origin"]) for d in crm.deals.values()) == ["a1", "a2"]
    assert state.continued == {}


def test_a_rebooking_polled_in_a_later_run_than_the_no_show_still_continues_its_deal() -> None:
    crm = Crm()
    state = sync(crm, PatientState(patient_id="p1", contact_id="c1"), [appointment("a1", start=T0)], polled_at=T0)
    no_show = appointment("a1", status=S.NO_SHOW, start=T0, version=2)
    state = sync(crm, state, [no_show], polled_at=T0 + days(1))
    state = sync(crm, state, [appointment("a2", start=T0 + days(3))], polled_at=T0 + days(2))
    assert [d["origin"] for d in crm.deals.values()] == ["a2"] and state.continued == {"a1": "a2"}


@settings(max_examples=examples(60), deadline=None)
@given(
    lost=st.lists(st.booleans(), min_size=1, max_size=4),
    look_up=st.booleans(),
    later=EVENTS,
)
def test_a_rebooking_keeps_one_deal_whatever_the_lost_responses_and_redeliveries(
    lost: list[bool], look_up: bool, later: list[str]
) -> None:
    """Lost responses (retried with or without a look-up by MIS id, as Bitrix24 and amoCRM do) and any
    redelivery of the old visit's events end the same way: one deal, the new visit's, at "booked"."""
    crm = Crm()
    state, no_show, rebooked = no_show_then_rebooked(crm)
    events = {
        "old_booked": appointment("a1", start=T0),  # version 1: older than the no-show
        "old_no_show": no_show,
        "rebooked": rebooked,
        "old_cancelled": appointment("a1", status=S.CANCELLED, start=T0, version=5),
    }
    for lose in [*lost, False]:  # every attempt but the last loses its response
        state = sync(crm, state, [rebooked], lose=lose, look_up=look_up)
    for name in later:
        state = sync(crm, state, [events[name]], look_up=look_up)
    assert [(d["origin"], d["stage"]) for d in crm.deals.values()] == [("a2", BOOKED)]
    assert {w.deal_id for w in crm.writes if w.appointment_id == "a2"} == {next(iter(crm.deals))}
    assert state.latest_deals["0"].appointment_id == "a2"


def test_a_continued_no_show_booked_again_gets_a_deal_of_its_own() -> None:
    """Found by `make chaos --seed 4242` (both CRMs): a re-booking took over the no-show's deal, then the
    front desk moved the no-show itself to a new time. That visit is booked again, so it needs a deal; the
    continued one stays with the re-booking. Its older events stay skipped."""
    crm = Crm()
    state, no_show, rebooked = no_show_then_rebooked(crm)
    state = sync(crm, state, [rebooked])
    [continued_id] = crm.deals
    moved = appointment("a1", start=T0 + days(9), version=3)  # MEDODS: a reschedule is "approved" again
    state = sync(crm, state, [moved])
    assert crm.deals[continued_id]["origin"] == "a2"
    own = state.appointments["a1"].deal_id
    assert own is not None and own != continued_id and crm.deals[own]["origin"] == "a1"
    assert crm.deals[own]["stage"] in {BOOKED, CONFIG.pipeline(repeat=False).stages[S.RESCHEDULED]}
    assert state.continued == {}
    writes = len(crm.writes)
    sync(crm, state, [no_show, rebooked])  # a redelivery of what was already synced
    assert len(crm.writes) == writes


@settings(max_examples=examples(40), deadline=None)
@given(moved_to=st.integers(min_value=-2, max_value=12), same_poll=st.booleans())
def test_a_no_show_booked_again_keeps_its_deal_whichever_visit_is_planned_first(moved_to: int, same_poll: bool) -> None:
    """The no-show is moved to a new time and another visit is booked, in one poll or moved first: the
    moved visit keeps its deal and the other booking gets its own (seen by seed 4242 with the move after
    the booking, which is planned second). One poll or two, the outcome is the same."""
    crm = Crm()
    state, _, rebooked = no_show_then_rebooked(crm)
    first_deal = state.appointments["a1"].deal_id
    moved = appointment("a1", start=T0 + days(moved_to) + timedelta(hours=1), version=3)
    polls = [[moved, rebooked]] if same_poll else [[moved], [rebooked]]
    for poll in polls:
        state = sync(crm, state, poll)
    assert crm.deals[str(first_deal)]["origin"] == "a1"
    assert sorted(str(d["origin"]) for d in crm.deals.values()) == ["a1", "a2"]
    assert state.continued == {}


STEPS = st.lists(
    st.tuples(st.sampled_from(["a1", "a2", "a3"]), st.sampled_from(["book", "no_show", "move"]), st.booleans()),
    min_size=1,
    max_size=12,
)


def _replay(
    steps: list[tuple[str, str, bool]], lost: frozenset[int] = frozenset(), every_unknown: bool = False
) -> tuple[Crm, dict[str, Appointment]]:
    """Events of three visits, polled when a step says so (the ``lost`` polls' responses are lost: the writes
    landed, nothing was remembered, the message comes again), then a last poll; the CRM and the MIS.
    ``every_unknown``: each poll also looks up every visit without a deal of its own (``sync``)."""
    crm = Crm()
    state = PatientState(patient_id="p1", contact_id="c1")
    mis = crm.mis  # what the MIS says now (the CRM model notes what it said of a visit a deal moved from)
    pending: dict[str, Appointment] = {}
    for version, (aid, event, poll) in enumerate(steps, start=1):
        known = mis.get(aid)
        if event == "no_show" and known is None:
            continue
        start = (known.starts_at if known else T0 + days(int(aid[1]) * 2)) + (days(3) if event == "move" else days(0))
        status = S.NO_SHOW if event == "no_show" else S.BOOKED
        mis[aid] = pending[aid] = appointment(aid, status=status, start=start, version=version)
        if poll:
            state = sync(crm, state, list(pending.values()), lose=version in lost, every_unknown=every_unknown)
            pending = pending if version in lost else {}
    sync(crm, state, list(pending.values()), every_unknown=every_unknown)
    return crm, mis


def _booked_visits_without_a_deal_of_their_own(crm: Crm, mis: dict[str, Appointment]) -> set[str]:
    origins = [str(d["origin"]) for d in crm.deals.values()]
    assert len(origins) == len(set(origins)), f"a visit with two deals: {origins}"
    return {aid for aid, a in mis.items() if a.status is S.BOOKED} - set(origins)


# Shrunk by the property below (a CI flake): a re-booking's continuation whose response was lost, retried with
# another booking of the patient in the same poll.
_LOST_CONTINUATION_RETRIED_WITH_ANOTHER_BOOKING = [("a1", "book", False)] * 4 + [
    ("a1", "no_show", True),
    ("a3", "book", True),
    ("a2", "book", False),
]


@settings(max_examples=examples(150), deadline=None)
@given(steps=STEPS, lost=st.frozensets(st.integers(min_value=1, max_value=12)))
@example(steps=_LOST_CONTINUATION_RETRIED_WITH_ANOTHER_BOOKING, lost=frozenset({1, 6}))
def test_every_visit_the_mis_has_booked_is_carried_by_a_deal_of_its_own(
    steps: list[tuple[str, str, bool]], lost: frozenset[int]
) -> None:
    """Over any history of bookings, no-shows and moves of three visits, polled in any batches, any poll's
    response lost: after the last poll every visit the MIS holds as booked has one deal naming it, and no
    deal names two visits. (A no-show's deal may have moved on to a re-booking: only a visit booked again
    must have one; `make chaos --seed 4242` found one that had none.)"""
    crm, mis = _replay(steps, lost)
    assert _booked_visits_without_a_deal_of_their_own(crm, mis) == set()


@settings(max_examples=examples(150), deadline=None)
@given(steps=STEPS, lost=st.frozensets(st.integers(min_value=1, max_value=12)), every_unknown=st.booleans())
@example(steps=_LOST_CONTINUATION_RETRIED_WITH_ANOTHER_BOOKING, lost=frozenset({1, 6}), every_unknown=False)
def test_a_deal_the_crm_holds_under_a_visit_moves_to_another_only_from_a_no_show(
    steps: list[tuple[str, str, bool]], lost: frozenset[int], every_unknown: bool
) -> None:
    """Over any history of bookings, no-shows and moves of three visits, any poll's response lost: a deal the
    CRM holds under one visit is written under another only by a re-booking's continuation of a no-show (the
    visit it leaves is one when it moves). A manager who saw a deal under a re-booking never sees it jump to
    another booking: a continuation whose response was lost notes an intent, so its retry finds the deal
    under the re-booking and leaves it there (it had planned from the stale state, and a booking planned
    first took the deal over again)."""
    crm, _ = _replay(steps, lost, every_unknown)
    assert [move for move in crm.moves if move[3] is not S.NO_SHOW] == []


@pytest.mark.parametrize("again", ["book", "move"])
def test_a_no_show_booked_again_after_its_continuation_response_was_lost_gets_one_deal_of_its_own(again: str) -> None:
    """Shrunk by the property above once lost responses were added: a2 is a no-show and a1 is booked after
    it in one poll, a1 takes a2's deal over, the response is lost; before the retry a2 is booked again. The
    retry's look-up finds a1 under a2's deal: the continuation is noted, so a2 (at its old time) is not left
    without a deal. Moved later, a2's new deal's response is lost too: its create intent makes the retry
    look a2 up by MIS id although the stale state holds a2's old deal, so no second one is created."""
    steps = [("a2", "book", True), ("a1", "move", False), ("a2", "no_show", True), ("a2", again, again == "move")]
    crm, mis = _replay(steps, lost=frozenset({3, 4}))
    assert _booked_visits_without_a_deal_of_their_own(crm, mis) == set()


def test_a_booking_polled_with_the_retry_of_a_lost_continuation_gets_a_deal_of_its_own() -> None:
    """Shrunk by the property above: a1 is first seen as a no-show (deal 1); a3 is booked and continues deal 1,
    but that response is lost; a2 is booked (earlier than a3) and the retry carries a3 and a2 together. The
    look-up shows deal 1 under a3: a3 owns it, and a2, planned first, must not take it over again (it did, then
    a3 took it back and a2 was left with no write at all). a2 gets a deal of its own, created once."""
    crm, mis = _replay(_LOST_CONTINUATION_RETRIED_WITH_ANOTHER_BOOKING, lost=frozenset({1, 6}))
    assert _booked_visits_without_a_deal_of_their_own(crm, mis) == set()
    assert {did: d["origin"] for did, d in crm.deals.items()} == {"1": "a3", "2": "a2"}
    assert [(w.appointment_id, w.deal_id) for w in crm.writes if w.appointment_id == "a2"] == [("a2", None)]


def _moved_when_booked_again(steps: list[tuple[str, str, bool]]) -> list[tuple[str, str, bool]]:
    """The steps with every booking of a visit the MIS already holds made a move to a new time, as MEDODS
    does (a no-show is booked again by a reschedule): the visit's content changes with its status."""
    seen: set[str] = set()
    moved = []
    for aid, event, poll in steps:
        moved.append((aid, "move" if event == "book" and aid in seen else event, poll))
        seen |= {aid} if event != "no_show" else set()
    return moved


@settings(max_examples=examples(150), deadline=None)
@given(steps=STEPS, lost=st.frozensets(st.integers(min_value=1, max_value=12)))
def test_every_deal_is_at_the_stage_of_the_visit_it_names_whatever_lost_responses_were_overtaken(
    steps: list[tuple[str, str, bool]], lost: frozenset[int]
) -> None:
    """Over any history of bookings, no-shows and moves, any poll's response lost and its message overtaken
    by later events (the writes landed, nothing was stored, the retry carries the newer versions): after the
    last poll every deal is at the stage of the MIS status of the visit it names. `make chaos` (seed 2026,
    Bitrix24) found a deal left at "no-show" for a visit moved to a new time: the move's stage was the one
    the stale state remembered, so it was not sent. (A visit booked again with exactly the content we last
    stored is the property below.)"""
    _assert_deals_at_their_visits_stages(*_replay(_moved_when_booked_again(steps), lost))


# Two visits, each step polled, polled with its response lost, or not polled: a visit's return to the content
# last stored (booked, a no-show whose response is lost, booked again at the same time) comes up often.
RETURNS = st.lists(
    st.tuples(
        st.sampled_from(["a1", "a2"]),
        st.sampled_from(["book", "no_show", "move"]),
        st.sampled_from(["", "poll", "lost"]),
    ),
    min_size=1,
    max_size=8,
)


# Shrunk by the property below: a continued no-show booked again in an attempt whose response was lost (it got a
# deal of its own), then a no-show again before the retry.
_BOOKED_AGAIN_LOST_THEN_NO_SHOW = [
    ("a1", "book", ""),
    ("a1", "no_show", "poll"),
    ("a2", "book", "poll"),
    ("a1", "book", "lost"),
    ("a1", "no_show", ""),
]


# Drawn by the property below (a helper's run, 2026-12-07): a2's continuation of a1's deal is lost, then a1 is
# booked again with its own deal and that response is lost too, then a1 is a no-show again.
_LOST_CONTINUATION_THEN_OWN_DEAL_LOST = [
    ("a1", "book", "poll"),
    ("a2", "book", ""),
    ("a1", "no_show", "lost"),
    ("a1", "book", "lost"),
    ("a1", "no_show", ""),
]


@settings(max_examples=examples(300), deadline=None)
@given(steps=RETURNS)
@example(steps=[("a1", "book", "poll"), ("a1", "no_show", "lost"), ("a1", "book", "")])
@example(steps=_BOOKED_AGAIN_LOST_THEN_NO_SHOW)
@example(steps=_LOST_CONTINUATION_THEN_OWN_DEAL_LOST)
def test_every_deal_is_at_its_visits_stage_also_when_a_visit_returns_to_the_content_we_last_stored(
    steps: list[tuple[str, str, str]],
) -> None:
    """As above, with a visit booked again at its old time: X -> Y (response lost, message overtaken) -> X,
    the newer event's content exactly the one whose digest the stale state holds. The failed attempt marks
    the patient's stored digests unsure, so X is sent again rather than skipped as unchanged."""
    lost = frozenset(version for version, (_, _, poll) in enumerate(steps, start=1) if poll == "lost")
    _assert_deals_at_their_visits_stages(*_replay([(aid, event, poll != "") for aid, event, poll in steps], lost))


def test_a_booking_whose_no_show_response_was_lost_booked_again_at_its_old_time_is_sent() -> None:
    """Shrunk by the property above: booked (stored), a no-show whose response is lost, booked again at the
    same time before any retry stored the no-show. The deal is at "booked", not left at "no-show"."""
    crm, mis = _replay([("a1", "book", True), ("a1", "no_show", True), ("a1", "book", False)], frozenset({2}))
    assert [(d["origin"], d["stage"]) for d in crm.deals.values()] == [("a1", BOOKED)]
    assert mis["a1"].status is S.BOOKED


def test_a_continued_no_show_booked_again_with_a_lost_response_then_a_no_show_again_moves_its_own_deal() -> None:
    """Shrunk by the property above: a2 continued a1's no-show deal (deal 1); a1 is booked again and gets
    deal 2, but the response is lost, so our state still says a1 handed its deal on; a1 is then a no-show
    again. The retry's look-up (a1's create intent) finds a1 under deal 2, not the deal it handed on: a1 is a
    visit of its own again, and deal 2 moves to "no-show" instead of staying at "booked" (skipped as
    ``deal_continued``). Deal 1 stays a2's."""
    steps = [(aid, event, poll != "") for aid, event, poll in _BOOKED_AGAIN_LOST_THEN_NO_SHOW]
    crm, mis = _replay(steps, frozenset({4}))
    assert {did: (d["origin"], d["stage"]) for did, d in crm.deals.items()} == {
        "1": ("a2", BOOKED),
        "2": ("a1", NO_SHOW),
    }
    _assert_deals_at_their_visits_stages(crm, mis)


def test_a_no_show_whose_continuation_and_own_booking_were_both_lost_moves_its_own_deal() -> None:
    """Drawn by the property above: a1 is booked (deal 1); in one lost attempt a1 is a no-show and a2's
    re-booking continues deal 1; in another a1 is booked again and gets deal 2; then a1 is a no-show again.
    The retry finds a2 under deal 1 and a1 under deal 2. Noting a2's continuation once made a1 hand its deal
    on after the check that a visit found under a deal of its own is one again, so a1's no-show was skipped
    as ``deal_continued`` and deal 2 stayed at "booked". Now deal 2 moves to "no-show"; deal 1 stays a2's."""
    steps = [(aid, event, poll != "") for aid, event, poll in _LOST_CONTINUATION_THEN_OWN_DEAL_LOST]
    crm, mis = _replay(steps, frozenset({3, 4}))
    assert {did: (d["origin"], d["stage"]) for did, d in crm.deals.items()} == {
        "1": ("a2", BOOKED),
        "2": ("a1", NO_SHOW),
    }
    _assert_deals_at_their_visits_stages(crm, mis)


def _assert_deals_at_their_visits_stages(crm: Crm, mis: dict[str, Appointment]) -> None:
    for deal in crm.deals.values():
        visit = mis[str(deal["origin"])]
        stages = {CONFIG.pipeline(repeat=False).stages[visit.status]}
        if visit.status is S.BOOKED:
            stages.add(CONFIG.pipeline(repeat=False).stages[S.RESCHEDULED])
        assert deal["stage"] in stages, (deal, visit.status)


@settings(max_examples=examples(40), deadline=None)
@given(moved_to=st.integers(min_value=4, max_value=12), same_poll=st.booleans(), moved_first=st.booleans())
def test_a_booking_after_a_no_show_gets_its_own_deal_when_another_visit_moved_past_the_no_show(
    moved_to: int, same_poll: bool, moved_first: bool
) -> None:
    """Shrunk by the model-based test (amoCRM and MEDODS, large profile: "took over the deal of …, the model
    says a deal of its own"): a patient's deal at the no-show is the funnel's latest until the MIS moves
    another visit of theirs past it; a booking after the no-show, in the same poll as that move, then
    continued the no-show's deal, since the funnel's latest was judged as before the poll. By what the MIS
    says now the latest deal is the moved visit's, not at a continue stage: the booking gets its own deal,
    in one poll or two, whichever is planned first."""
    crm = Crm()
    state, _, _ = no_show_then_rebooked(crm)
    state = sync(crm, state, [appointment("a3", start=T0 - days(2))])  # an earlier visit, a deal of its own
    moved = appointment("a3", start=T0 + days(moved_to) + timedelta(hours=2), version=2)
    booked = appointment("a2", start=T0 + days(3))  # after the no-show, before the moved visit
    ordered = [moved, booked] if moved_first else [booked, moved]
    polls = [ordered] if same_poll else [[moved], [booked]]
    for poll in polls:
        state = sync(crm, state, poll)
    assert sorted(str(d["origin"]) for d in crm.deals.values()) == ["a1", "a2", "a3"]
    assert state.continued == {}
