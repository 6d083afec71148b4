"""The sync rules. They live here once and every CRM adapter only translates their output.

``plan_patient`` is pure: given a patient's changes, what we remember about them and what the CRM
already holds, it decides which contact and deal writes to make and what to remember afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from clinicsync.domain.config import ClinicConfig, Pipeline
from clinicsync.domain.crm_ports import ContactWrite, CrmMatches, CrmWrite, DealWrite, LeadWrite, PhoneCandidates
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.models import Appointment, AppointmentStatus, CrmObservation, Patient, PatientChanges
from clinicsync.domain.payloads import appointment_excluded, contact_fields, deal_fields, patient_excluded
from clinicsync.domain.rebooking import after_continuation, continued_deal, note_lost_continuations
from clinicsync.domain.state import AppointmentState, PatientState


@dataclass
class PatientPlan:
    patient_id: str
    writes: list[CrmWrite] = field(default_factory=list)
    next_state: PatientState | None = None  # None: nothing to remember (skipped patient)
    changed_appointments: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # record id -> reason (ids only, no PII)

    @property
    def contact_write(self) -> ContactWrite | None:
        return next((w for w in self.writes if isinstance(w, ContactWrite)), None)


def unguarded(plan: PatientPlan) -> PatientPlan:
    """The plan with its writes' guards dropped: written over records that were just read."""
    plan.writes = [
        replace(w, expect_ours=False)
        if isinstance(w, ContactWrite)
        else replace(w, expect_stage=None)
        if isinstance(w, DealWrite)
        else w
        for w in plan.writes
    ]
    return plan


# How far a visit has progressed: a manager's manual stage holds until the MIS moves past it.
_PROGRESS = {
    AppointmentStatus.BOOKED: 0,
    AppointmentStatus.RESCHEDULED: 0,
    AppointmentStatus.CONFIRMED: 1,
    AppointmentStatus.ARRIVED: 2,
    AppointmentStatus.COMPLETED: 3,
    AppointmentStatus.NO_SHOW: 3,
    AppointmentStatus.CANCELLED: 3,
}


def mis_moved_forward(status: AppointmentStatus, at_manual_move: AppointmentStatus | None) -> bool:
    return at_manual_move is None or _PROGRESS[status] > _PROGRESS[at_manual_move]


def effective_status(appointment: Appointment, known: AppointmentState) -> AppointmentStatus:
    """A booked visit whose start time moved is a reschedule: same appointment id, new time.

    It stays rescheduled while the MIS only says "booked" again. A visit the MIS reports as confirmed is
    confirmed, moved or not (the dental case: "so does confirmation of attendance"); the chaos suite found
    the earlier rule holding such a visit at rescheduled."""
    moved = known.starts_at is not None and known.starts_at != appointment.starts_at
    if appointment.status is AppointmentStatus.BOOKED and (moved or known.status is AppointmentStatus.RESCHEDULED):
        return AppointmentStatus.RESCHEDULED
    return appointment.status


def _is_repeat(first_visit_at: datetime | None, appointment: Appointment) -> bool:
    return first_visit_at is not None and first_visit_at < appointment.starts_at


def _pipeline_by_category(config: ClinicConfig, category_id: str | None) -> Pipeline | None:
    return next((p for p in config.crm.pipelines.values() if p.category_id == category_id), None)


@dataclass
class Adoption:
    """Open CRM records found by the phone of a patient without a deal yet, and what this sync claimed.

    ``claimed`` is shared by every patient planned in one sync, so one lead, deal or contact is
    adopted by one patient only. A lead or deal is claimed only by a new deal actually planned: a
    family member without an eligible booking never uses it up. Each patient adopts at most once, with
    their first new deal. ``phone_shared`` is set when another patient has the same phone (a family):
    contacts are then never adopted, so two patients never merge into one contact.
    """

    candidates: PhoneCandidates
    claimed: set[str]
    phone_shared: bool = False
    used: bool = False  # this patient's first new deal has had its pick

    def claim_contact(self) -> str | None:
        if self.phone_shared:
            return None
        for contact_id, owner in self.candidates.contacts:
            if owner is None and f"C{contact_id}" not in self.claimed:
                self.claimed.add(f"C{contact_id}")
                return contact_id
        return None

    def claim_for_new_deal(self, config: ClinicConfig) -> tuple[str | None, str | None, tuple[str, str, str] | None]:
        """(lead id, the lead's source, (deal id, category, stage)) the patient's first new deal takes over,
        each or None."""
        if self.used:
            return None, None, None
        self.used = True
        lead_id = None
        if config.matching.adopt_open_leads:
            lead_id = next((lid for lid in self.candidates.leads if f"L{lid}" not in self.claimed), None)
            if lead_id:
                self.claimed.add(f"L{lead_id}")
        categories = {p.category_id for p in config.crm.pipelines.values()}
        deal = next((d for d in self.candidates.deals if f"D{d[0]}" not in self.claimed and d[1] in categories), None)
        if deal:
            self.claimed.add(f"D{deal[0]}")
        return lead_id, self.candidates.lead_sources.get(lead_id) if lead_id else None, deal


def changed_multifields(patient: Patient, state: PatientState, hasher: KeyedHasher) -> frozenset[str]:
    """Phone or e-mail that differs from what we last wrote (known only by its keyed hash)."""
    changed = set()
    if patient.phone and state.phone_key and hasher.phone_key(patient.phone) != state.phone_key:
        changed.add("phone")
    if patient.email and state.email_key and hasher.email_key(patient.email) != state.email_key:
        changed.add("email")
    return frozenset(changed)


def plan_patient(
    changes: PatientChanges,
    state: PatientState,
    matches: CrmMatches,
    config: ClinicConfig,
    hasher: KeyedHasher,
    ledger_opt_outs: Iterable[str] = (),
    adoption: Adoption | None = None,
) -> PatientPlan:
    patient = changes.patient
    plan = PatientPlan(patient_id=patient.mis_id)
    excluded = patient_excluded(patient, config.filters)
    if excluded:
        plan.skipped[patient.mis_id] = excluded
        return plan

    next_state = state.model_copy(deep=True)
    contact_id = state.contact_id or matches.contacts.get(patient.mis_id)
    if contact_id is None and adoption is not None:
        # Look-up order: MIS appointment id, MIS patient id, then the phone (adopt, never duplicate).
        contact_id = adoption.claim_contact()
        if contact_id:
            plan.skipped[f"contact:{contact_id}"] = "adopted_contact"
    next_state.contact_id = contact_id

    if patient.version < state.version:
        plan.skipped[patient.mis_id] = "stale_patient"
    else:
        fields = contact_fields(patient, config, ledger_opt_outs)
        digest = hasher.content_hash(fields)
        if contact_id is not None and digest == state.content_hash and not state.unsure(state.contact_epoch):
            plan.skipped[patient.mis_id] = "unchanged"
        else:
            changed = changed_multifields(patient, state, hasher)
            ids = matches.multifields.get(contact_id, {}) if contact_id else {}
            plan.writes.append(ContactWrite(patient.mis_id, contact_id, fields, changed, ids))
        next_state.version = patient.version
        next_state.content_hash = digest
        next_state.contact_epoch = state.write_epoch

    polled = {a.mis_id: a for a in changes.appointments}
    note_lost_continuations(next_state, matches.deals)
    at = changes.polled_at  # the poll run that read these changes
    for appointment in sorted(changes.appointments, key=lambda a: (a.starts_at, a.mis_id)):
        _plan_deal(appointment, plan, state, next_state, matches, config, hasher, contact_id, adoption, polled, at)
        if appointment.mis_id in next_state.appointments:
            known = state.appointment(appointment.mis_id)
            was_at = known.starts_at if known.deal_id is not None else None
            next_state.track_deal(next_state.appointments[appointment.mis_id], at, was_at)

    plan.next_state = next_state
    return plan


def _note_visit(appointment: Appointment, state: PatientState) -> None:
    """Visit history: the first completed visit picks the funnel, the latest feeds the audience."""
    if appointment.status is not AppointmentStatus.COMPLETED:
        return
    if state.first_visit_at is None or appointment.starts_at < state.first_visit_at:
        state.first_visit_at = appointment.starts_at
    if state.last_visit_at is None or appointment.starts_at > state.last_visit_at:
        state.last_visit_at = appointment.starts_at


def _plan_deal(
    appointment: Appointment,
    plan: PatientPlan,
    state: PatientState,
    next_state: PatientState,
    matches: CrmMatches,
    config: ClinicConfig,
    hasher: KeyedHasher,
    contact_id: str | None,
    adoption: Adoption | None,
    polled: Mapping[str, Appointment],
    polled_at: datetime | None,
) -> None:
    aid = appointment.mis_id
    # Visit history counts every completed visit, also those that are never sent (anonymous, filtered).
    repeat = _is_repeat(next_state.first_visit_at, appointment)
    _note_visit(appointment, next_state)

    reason = appointment_excluded(appointment, config.filters) or after_continuation(appointment, next_state)
    if reason:
        plan.skipped[aid] = reason
        return
    known = next_state.appointment(aid)
    if appointment.version < known.version:
        plan.skipped[aid] = "stale"  # an older event arrived late: never regress a stage
        return

    match = matches.deals.get(aid)
    deal_id = known.deal_id or (match.deal_id if match else None)
    category_id = known.category_id or (match.category_id if match else None)
    closed = known.closed or (match.closed if match else False)
    lead_id = lead_source = None
    adopted_deal = False
    if deal_id is None and adoption is not None:
        # The first new deal for the phone takes over the open lead and deal found by it; claimed only
        # here, past the exclusions, so a visit that is never sent leaves them to the next new deal.
        lead_id, lead_source, deal = adoption.claim_for_new_deal(config)
        if deal is not None:
            deal_id, category_id, _ = deal
            adopted_deal = True
            plan.skipped[f"deal:{deal_id}"] = "adopted_deal"
    next_state.has_deal = True  # a card synced before its first booking still adopts with that booking
    status = effective_status(appointment, known)

    pipeline = _pipeline_by_category(config, category_id) if category_id else None
    pipeline = pipeline or config.pipeline(repeat=repeat)
    category_id = category_id or pipeline.category_id
    deal_id = _continue_deal(appointment, status, pipeline, deal_id, plan, state, next_state, polled, polled_at)
    stage: str | None = pipeline.stages[status]

    updated = known.model_copy(
        update={"version": appointment.version, "status": status, "starts_at": appointment.starts_at}
    )
    if deal_id is not None and closed:
        # Won or lost deals are never reopened; a later visit gets its own appointment and deal.
        plan.skipped[aid] = "deal_closed"
        next_state.appointments[aid] = updated.model_copy(update={"deal_id": deal_id, "closed": True})
        plan.changed_appointments.append(aid)
        return
    if known.manual_stage is not None:
        if mis_moved_forward(status, known.manual_status):
            updated = updated.model_copy(update={"manual_stage": None, "manual_status": None})
        else:
            stage = None  # a manager's stage holds until the MIS status moves forward
            plan.skipped[f"stage:{aid}"] = "manual_stage_kept"

    fields = deal_fields(appointment, status, config, repeat=repeat, lead_source=lead_source or known.lead_source)
    digest = hasher.content_hash({"fields": fields, "stage": stage, "category": category_id})
    unsure = next_state.unsure(known.epoch)  # an attempt of unknown outcome may have written it since
    if deal_id is not None and digest == known.content_hash and not unsure:
        plan.skipped[aid] = "unchanged"
        return
    plan.writes.append(
        DealWrite(
            aid,
            next_state.patient_id,
            deal_id,
            category_id,
            _stage_to_send(stage, known, deal_id, appointment.version, unsure),
            fields,
            contact_id,
            lead_id,
            adopted_deal,
            lead_source,
            new_to_visit=deal_id is not None and deal_id != known.deal_id,
        )
    )
    if lead_id is not None:
        plan.writes.append(LeadWrite(lead_id, next_state.patient_id, contact_id, convert=True))
    current = stage if stage is not None else known.manual_stage
    next_state.appointments[aid] = updated.model_copy(
        update={
            "deal_id": deal_id,
            "content_hash": digest,
            "epoch": next_state.write_epoch,
            "category_id": category_id,
            "stage": current,
            "closed": current in pipeline.closed_stages,
            "lead_source": fields.get("lead_source"),  # a mapped source is kept on later updates
        }
    )
    plan.changed_appointments.append(aid)


def _stage_to_send(
    stage: str | None, known: AppointmentState, deal_id: str | None, version: int, unsure: bool
) -> str | None:
    """A stage we wrote before is not sent again for the same MIS version: a field-only update never moves
    a deal a manager moved (or closed) since. A newer version sends its stage even when we remember the
    deal there: an attempt whose outcome was unknown (a lost response, a crash) may have written another
    stage that no retry stored, its message overtaken by this event (a chaos run's deal left at a no-show
    after the visit was moved). Either way a stage change is checked against the deal first
    (``stage_to_check``), and a stage read there that we wrote ourselves is no manager's move. A record
    whose digest is ``unsure`` sends its stage too: the same version's content may have been overwritten by a
    newer one whose outcome was unknown (X -> Y lost -> X again)."""
    same = stage == known.stage and deal_id == known.deal_id and version == known.version
    if stage is not None and same and not unsure:
        return None
    return stage


def _continue_deal(
    appointment: Appointment,
    status: AppointmentStatus,
    pipeline: Pipeline,
    deal_id: str | None,
    plan: PatientPlan,
    before: PatientState,
    state: PatientState,
    polled: Mapping[str, Appointment],
    polled_at: datetime | None,
) -> str | None:
    """The deal this visit writes: its own, or the re-booked no-show's it continues."""
    continued = (
        None if deal_id is not None else continued_deal(state, before, pipeline, appointment, status, polled, polled_at)
    )
    if continued is not None:
        deal_id = continued.deal_id
    for held in state.kept_deals(pipeline.category_id):
        if deal_id is not None and held.deal_id == deal_id and held.appointment_id != appointment.mis_id:
            # This visit took over the deal (now, or in an attempt whose response was lost): the old
            # visit is done with it, and its own write in this plan, if any, is superseded.
            state.continued[held.appointment_id] = appointment.mis_id
            plan.writes = [w for w in plan.writes if not (isinstance(w, DealWrite) and w.deal_id == deal_id)]
            plan.skipped[held.appointment_id] = "deal_continued"
            break
    return deal_id


def apply_observation(state: PatientState, observation: CrmObservation, config: ClinicConfig) -> list[str]:
    """Teach the patient's state what a manager did in the CRM. Returns the appointments changed."""
    if observation.kind != "deal_stage" or observation.appointment_id is None or observation.stage is None:
        return []
    known = state.appointment(observation.appointment_id)
    if known.deal_id not in (None, observation.crm_id) or known.stage == observation.stage:
        return []  # not our deal, or nothing moved (our own write echoed back)
    pipeline = _pipeline_by_category(config, known.category_id)
    closed = observation.closed or (pipeline is not None and observation.stage in pipeline.closed_stages)
    state.appointments[observation.appointment_id] = known.model_copy(
        update={
            "deal_id": observation.crm_id,
            "stage": observation.stage,
            "closed": known.closed or closed,
            "manual_stage": observation.stage,
            "manual_status": known.status,
        }
    )
    state.track_deal(state.appointments[observation.appointment_id])
    return [observation.appointment_id]
