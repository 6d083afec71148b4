"""The funnel rules, tested directly: they are pure, so every case is one call."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from clinicsync.domain.crm_ports import ContactWrite, CrmMatches, DealMatch, DealWrite
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.deal_stages import deal_observation, stage_read_observation, stage_to_check
from clinicsync.domain.models import AppointmentStatus as S
from clinicsync.domain.models import PatientChanges
from clinicsync.domain.rules import apply_observation, plan_patient
from clinicsync.domain.state import AppointmentState, PatientState
from tests.helpers import T0, appointment, days, demo_config, patient

HASHER = KeyedHasher(b"k" * 32)
CONFIG = demo_config()


def plan(changes: PatientChanges, state: PatientState | None = None, matches: CrmMatches | None = None, **kw):
    return plan_patient(
        changes, state or PatientState(patient_id=changes.patient.mis_id), matches or CrmMatches(), CONFIG, HASHER, **kw
    )


def deals(p) -> list[DealWrite]:
    return [w for w in p.writes if isinstance(w, DealWrite)]


def test_new_patient_creates_contact_and_deal_in_mapped_stage() -> None:
    p = plan(PatientChanges(patient=patient(), appointments=(appointment(),)))
    contact = p.contact_write
    assert isinstance(contact, ContactWrite) and contact.contact_id is None
    assert contact.fields["phone"] == "+79161234567"
    [deal] = deals(p)
    assert deal.deal_id is None and deal.category_id == "0" and deal.stage == "PREPARATION"
    assert p.next_state is not None and p.next_state.appointments["a1"].stage == "PREPARATION"


def test_each_status_lands_in_its_stage() -> None:
    expected = {
        S.BOOKED: "PREPARATION",
        S.CONFIRMED: "PREPAYMENT_INVOICE",
        S.ARRIVED: "EXECUTING",
        S.COMPLETED: "FINAL_INVOICE",
        S.CANCELLED: "LOSE",
        S.NO_SHOW: "UC_NOSHOW",
        S.RESCHEDULED: "PREPARATION",
    }
    for status, stage in expected.items():
        [deal] = deals(plan(PatientChanges(patient=patient(), appointments=(appointment(status=status),))))
        assert deal.stage == stage, status


def test_unchanged_patient_and_visit_make_no_write() -> None:
    first = plan(PatientChanges(patient=patient(), appointments=(appointment(),)))
    state = first.next_state
    assert state is not None
    state.contact_id = "10"
    state.appointments["a1"].deal_id = "20"
    again = plan(PatientChanges(patient=patient(), appointments=(appointment(),)), state)
    assert again.writes == []
    assert set(again.skipped.values()) == {"unchanged"}


def test_status_change_updates_the_known_deal_only() -> None:
    state = PatientState(patient_id="p1", contact_id="10", version=1)
    first = plan(PatientChanges(patient=patient(), appointments=(appointment(),)), state)
    state = first.next_state
    assert state is not None
    state.content_hash = first.next_state.content_hash
    state.appointments["a1"].deal_id = "20"
    confirmed = plan(
        PatientChanges(patient=patient(), appointments=(appointment(status=S.CONFIRMED, version=2),)), state
    )
    [deal] = deals(confirmed)
    assert deal.deal_id == "20" and deal.stage == "PREPAYMENT_INVOICE"
    assert confirmed.contact_write is None  # the contact did not change


def test_stale_event_never_regresses_a_stage() -> None:
    state = PatientState(patient_id="p1", contact_id="10", version=5)
    state.appointments["a1"] = AppointmentState(appointment_id="a1", deal_id="20", version=5, stage="EXECUTING")
    p = plan(PatientChanges(patient=patient(version=4), appointments=(appointment(version=3),)), state)
    assert p.writes == []
    assert p.skipped == {"p1": "stale_patient", "a1": "stale"}


def test_closed_deal_is_never_reopened() -> None:
    state = PatientState(patient_id="p1", contact_id="10", version=1)
    state.appointments["a1"] = AppointmentState(appointment_id="a1", deal_id="20", version=1, stage="LOSE", closed=True)
    p = plan(PatientChanges(patient=patient(), appointments=(appointment(status=S.BOOKED, version=2),)), state)
    assert deals(p) == []
    assert p.skipped["a1"] == "deal_closed"


def test_closed_deal_found_in_crm_is_never_reopened() -> None:
    matches = CrmMatches(deals={"a1": DealMatch(deal_id="20", category_id="0", stage="WON", closed=True)})
    p = plan(PatientChanges(patient=patient(), appointments=(appointment(),)), matches=matches)
    assert deals(p) == []


def test_lost_create_response_is_found_by_mis_id_and_updated_not_duplicated() -> None:
    matches = CrmMatches(
        contacts={"p1": "10"}, deals={"a1": DealMatch(deal_id="20", category_id="0", stage="NEW", closed=False)}
    )
    p = plan(PatientChanges(patient=patient(), appointments=(appointment(),)), matches=matches)
    assert p.contact_write is not None and p.contact_write.contact_id == "10"
    [deal] = deals(p)
    assert deal.deal_id == "20"


def test_reschedule_keeps_the_deal_and_moves_the_date() -> None:
    state = PatientState(patient_id="p1", contact_id="10", version=1)
    first = plan(PatientChanges(patient=patient(), appointments=(appointment(),)), state)
    state = first.next_state
    assert state is not None
    state.appointments["a1"].deal_id = "20"
    moved = plan(PatientChanges(patient=patient(), appointments=(appointment(start=T0 + days(2), version=2),)), state)
    [deal] = deals(moved)
    assert deal.deal_id == "20"
    assert deal.fields["status"] == "rescheduled"
    assert deal.fields["visit_at"].startswith((T0 + days(2)).date().isoformat())


def test_a_rescheduled_visit_stays_rescheduled_until_the_mis_confirms_it() -> None:
    # Found by the chaos run: a confirmation after a reschedule was held at "rescheduled" for good.
    state = PatientState(patient_id="p1", contact_id="10", version=1)
    state = plan(PatientChanges(patient=patient(), appointments=(appointment(),)), state).next_state
    assert state is not None
    state.appointments["a1"].deal_id = "20"
    moved = plan(PatientChanges(patient=patient(), appointments=(appointment(start=T0 + days(2), version=2),)), state)
    assert moved.next_state is not None
    again = plan(
        PatientChanges(patient=patient(), appointments=(appointment(start=T0 + days(2), version=3),)),
        moved.next_state,
    )
    assert again.next_state is None or again.next_state.appointments["a1"].status is S.RESCHEDULED
    confirmed = plan(
        PatientChanges(
            patient=patient(), appointments=(appointment(start=T0 + days(2), status=S.CONFIRMED, version=4),)
        ),
        moved.next_state,
    )
    [deal] = deals(confirmed)
    assert deal.stage == "PREPAYMENT_INVOICE" and deal.fields["status"] == "confirmed"


def test_repeat_visit_after_a_completed_one_goes_to_the_repeat_funnel() -> None:
    visits = (
        appointment("a1", status=S.COMPLETED, start=T0 - days(30)),
        appointment("a2", status=S.BOOKED, start=T0),
    )
    p = plan(PatientChanges(patient=patient(), appointments=visits))
    by_id = {d.appointment_id: d for d in deals(p)}
    assert by_id["a1"].category_id == "0" and by_id["a1"].stage == "FINAL_INVOICE"
    assert by_id["a2"].category_id == "1" and by_id["a2"].stage == "C1:PREPARATION"


def test_dms_visit_is_flagged() -> None:
    dms = appointment(price=Decimal("0.00"), insurance_policy="ДМС-123")
    paid = appointment("a2", price=Decimal("0.00"))
    [d1, d2] = deals(plan(PatientChanges(patient=patient(), appointments=(dms, paid))))
    flags = {d1.appointment_id: d1.fields["is_dms"], d2.appointment_id: d2.fields["is_dms"]}
    assert flags == {"a1": True, "a2": False}


def test_refused_data_processing_sends_nothing() -> None:
    p = plan(PatientChanges(patient=patient(refused_data_processing=True), appointments=(appointment(),)))
    assert p.writes == [] and p.next_state is None
    assert p.skipped == {"p1": "refused_data_processing"}


def test_anonymous_and_filtered_visits_are_skipped() -> None:
    config = CONFIG.model_copy(update={"filters": CONFIG.filters.model_copy(update={"branches": frozenset({"b2"})})})
    changes = PatientChanges(patient=patient(), appointments=(appointment(anonymous=True), appointment("a2")))
    p = plan_patient(changes, PatientState(patient_id="p1"), CrmMatches(), config, HASHER)
    assert deals(p) == []
    assert p.skipped == {"a1": "anonymous", "a2": "branch_filtered"}


def test_minimal_payload_never_carries_more_than_configured() -> None:
    p = plan(PatientChanges(patient=patient(birth_date="1990-01-01"), appointments=(appointment(),)))
    assert p.contact_write is not None
    assert set(p.contact_write.fields) == {"full_name", "phone", "email", "mis_patient_id"}
    [deal] = deals(p)
    assert set(deal.fields) == {"visit_at", "status", "is_dms", "mis_appointment_id", "title"}
    assert "Иванова" not in deal.fields["title"]


def test_ledger_opt_outs_are_sticky_in_the_contact_payload() -> None:
    config = CONFIG.model_copy(
        update={"fields": CONFIG.fields.model_copy(update={"contact": ("full_name", "opt_outs")})}
    )
    p = plan_patient(
        PatientChanges(patient=patient(), appointments=()),
        PatientState(patient_id="p1"),
        CrmMatches(),
        config,
        HASHER,
        ledger_opt_outs={"email"},
    )
    assert p.contact_write is not None and p.contact_write.fields["opt_outs"] == ["email"]


def test_the_cases_sixteen_plus_sixteen_fields_are_available_when_configured() -> None:
    from clinicsync.domain.fieldmap import CONTACT_FIELDS, DEAL_FIELDS

    everything = CONFIG.model_copy(
        update={
            "fields": CONFIG.fields.model_copy(
                update={
                    "contact": tuple(sorted(CONTACT_FIELDS - {"mis_patient_id"})),
                    "deal": tuple(sorted(DEAL_FIELDS - {"mis_appointment_id"})),
                }
            )
        }
    )
    rich = patient(birth_date="1990-05-17", representative="мать", policy_number="ДМС-1", guarantee_letter=True)
    visit = appointment(doctor_name="Петров П. П.", service_codes=("A01", "B02"), charged=Decimal("2500"))
    p = plan_patient(
        PatientChanges(patient=rich, appointments=(visit,)),
        PatientState(patient_id="p1"),
        CrmMatches(),
        everything,
        HASHER,
    )
    assert p.contact_write is not None
    # Case C's 16 + 16 (+ our DMS flag), plus case B's 4 contact and 3 deal fields.
    assert len(CONTACT_FIELDS) == 16 + 4 and len(DEAL_FIELDS) == 17 + 3
    assert set(p.contact_write.fields) == CONTACT_FIELDS
    assert p.contact_write.fields["representative"] == "мать" and p.contact_write.fields["age"] >= 36
    [deal] = deals(p)
    assert set(deal.fields) == DEAL_FIELDS - {"lead_source"} | {"title"}  # no adopted lead: no source
    assert deal.fields["service_codes"] == "A01,B02" and deal.fields["doctor"] == "Петров П. П."
    assert not any("diagnos" in name for name in (*deal.fields, *p.contact_write.fields))


def test_a_refusal_can_be_sent_without_any_marketing_when_the_clinic_says_so() -> None:
    config = CONFIG.model_copy(
        update={
            "filters": CONFIG.filters.model_copy(update={"refused_processing": "send_without_marketing"}),
            "fields": CONFIG.fields.model_copy(update={"contact": ("full_name", "opt_outs")}),
        }
    )
    refused = patient(refused_data_processing=True)
    p = plan_patient(
        PatientChanges(patient=refused, appointments=(appointment(),)),
        PatientState(patient_id="p1"),
        CrmMatches(),
        config,
        HASHER,
    )
    assert p.contact_write is not None
    assert p.contact_write.fields["opt_outs"] == ["call", "email", "marketing", "sms"]
    assert len(deals(p)) == 1


# --- a manager's move the sync has not heard of yet -----------------------------------------------------

PRIMARY = CONFIG.pipeline(repeat=False)
STATUSES = st.sampled_from(list(S))
CRM_STAGES = st.sampled_from(sorted({*PRIMARY.stages.values(), *PRIMARY.closed_stages}))


def _synced(status: S) -> PatientState:
    """A patient whose visit we wrote as ``status`` into deal 20 (what the state remembers after a sync)."""
    first = plan(PatientChanges(patient=patient(), appointments=(appointment(status=status),)))
    state = first.next_state
    assert state is not None
    state.contact_id = "10"
    state.appointments["a1"].deal_id = "20"
    return state


def _deal_ends_at(crm_stage: str, p) -> str:
    """Where deal 20 stands after the plan's writes, starting from ``crm_stage``."""
    for write in deals(p):
        if write.deal_id == "20" and write.stage is not None:
            crm_stage = write.stage
    return crm_stage


@given(before=STATUSES, after=STATUSES, moved=st.booleans())
def test_a_deal_update_for_a_newer_mis_version_carries_its_stage_checked_against_the_deal_first(
    before: S, after: S, moved: bool
) -> None:
    """Also a stage we remember writing: an attempt whose outcome was unknown may have left the deal at
    another one (``_stage_to_send``). Checked first, it never undoes a manager's move not heard of yet."""
    state = _synced(before)
    start = T0 + days(1) if moved else T0  # a new date is written whether or not the stage changes
    p = plan(
        PatientChanges(patient=patient(), appointments=(appointment(status=after, version=2, start=start),)), state
    )
    assert p.next_state is not None
    written, planned = state.appointments["a1"].stage, p.next_state.appointments["a1"].stage
    assert deals(p) or not moved or state.appointments["a1"].closed  # closed deals are never written
    assert written is not None
    for write in deals(p):
        assert write.stage == planned, (write.stage, written, planned)
        assert stage_to_check(write, state) == "20"


@given(before=STATUSES, after=STATUSES, crm_stage=CRM_STAGES)
def test_the_read_before_a_stage_change_respects_a_manager_as_the_webhook_would(
    before: S, after: S, crm_stage: str
) -> None:
    """A manager moved deal 20 to ``crm_stage``; its webhook comes after the MIS change's sync (late, or
    never). The stage read before the write must leave the deal where hearing the webhook first would,
    and a closed deal closed."""
    changes = PatientChanges(patient=patient(), appointments=(appointment(status=after, version=2),))
    snapshot = {"id": "20", "stage": crm_stage, "closed": "Y" if crm_stage in PRIMARY.closed_stages else "N"}

    heard_first = _synced(before)
    apply_observation(heard_first, deal_observation(snapshot, "p1", "a1"), CONFIG)
    expected = _deal_ends_at(crm_stage, plan(changes, heard_first))

    state = _synced(before)
    p = plan(changes, state)
    for write in deals(p):
        if stage_to_check(write, state) == "20":
            observation = stage_read_observation(write, state, snapshot)
            if observation is not None and apply_observation(state, observation, CONFIG):
                p = plan(changes, state)
    assert _deal_ends_at(crm_stage, p) == expected
    if crm_stage in PRIMARY.closed_stages:
        assert _deal_ends_at(crm_stage, p) == crm_stage  # never reopened


@given(
    before=STATUSES,
    after=STATUSES,
    crm_stage=CRM_STAGES,
    modifier=st.sampled_from(["7", "8"]),
    unsure=st.booleans(),
)
def test_a_stage_read_on_an_open_deal_we_modified_last_is_ours_only_after_a_write_of_unknown_outcome(
    before: S, after: S, crm_stage: str, modifier: str, unsure: bool
) -> None:
    """The read before a stage change finds deal 20 at ``crm_stage``, last modified by ``modifier``; we are
    user 7. Told by content, not by modifier: only when a write of unknown outcome touched the patient since
    the held stage was stored (``unsure``) can that stage be our own write, never stored, and it is not a
    manager's move. Otherwise every write of ours left the held stage, so another one is a manager's move
    made under the integration's login, learnt as anyone's; a closed deal stays closed whoever closed it."""
    closed = crm_stage in PRIMARY.closed_stages
    snapshot = {"id": "20", "stage": crm_stage, "closed": "Y" if closed else "N", "modified_by": modifier}
    changes = PatientChanges(patient=patient(), appointments=(appointment(status=after, version=2),))
    state = _synced(before)
    if unsure:
        state.write_epoch += 1  # an attempt's response was lost after the state above was stored
    for write in deals(plan(changes, state)):
        if stage_to_check(write, state) != "20":
            continue
        anyones = stage_read_observation(write, state, snapshot)
        ours = stage_read_observation(write, state, snapshot, ours="7")
        assert ours == (None if modifier == "7" and not closed and unsure else anyones)


def test_regression_a_managers_open_stage_under_the_integration_login_holds_against_a_reschedule() -> None:
    """A manager working under the integration's login moves the booked deal to "in work"; the MIS then
    reschedules the visit (no move forward). Every write of ours was stored, so the stage is the manager's
    and holds; it was once taken for our own lost write and overwritten with "rescheduled"."""
    state = _synced(S.BOOKED)
    in_work = PRIMARY.stages[S.NO_SHOW]
    assert in_work not in (PRIMARY.stages[S.BOOKED], PRIMARY.stages[S.RESCHEDULED])
    snapshot = {"id": "20", "stage": in_work, "closed": "N", "modified_by": "7"}
    changes = PatientChanges(patient=patient(), appointments=(appointment(version=2, start=T0 + days(1)),))
    p = plan(changes, state)
    [write] = [w for w in deals(p) if stage_to_check(w, state) == "20"]
    observation = stage_read_observation(write, state, snapshot, ours="7")
    assert observation is not None and apply_observation(state, observation, CONFIG) == ["a1"]
    assert _deal_ends_at(in_work, plan(changes, state)) == in_work
