"""The sync rules. They live here once and every CRM adapter only translates their output.

``plan_patient`` is pure: given a patient's changes, what we remember about them and what the CRM
already holds, it decides which contact and deal writes to make and what to remember afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from clinicsync.config import ClinicConfig, Pipeline
from clinicsync.crypto import KeyedHasher
from clinicsync.models import Appointment, AppointmentStatus, Patient, PatientChanges
from clinicsync.ports import ContactWrite, CrmMatches, CrmWrite, DealWrite
from clinicsync.state import AppointmentState, PatientState

ACTIVE_STATUSES = frozenset({AppointmentStatus.BOOKED, AppointmentStatus.CONFIRMED})


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


def patient_excluded(patient: Patient, config: ClinicConfig) -> str | None:
    """Why a patient must not reach the CRM at all (152-FZ: refused processing), or None."""
    if patient.refused_data_processing and config.filters.skip_refused_data_processing:
        return "refused_data_processing"
    return None


def appointment_excluded(appointment: Appointment, config: ClinicConfig) -> str | None:
    filters = config.filters
    if appointment.anonymous and filters.skip_anonymous:
        return "anonymous"
    if filters.branches is not None and appointment.branch_id not in filters.branches:
        return "branch_filtered"
    if filters.doctors is not None and appointment.doctor_id not in filters.doctors:
        return "doctor_filtered"
    return None


def contact_fields(patient: Patient, config: ClinicConfig, opt_outs: Iterable[str]) -> dict[str, Any]:
    """The contact payload in canonical names, cut to the clinic's field map (minimal by default)."""
    available: dict[str, Any] = {
        "full_name": {"last": patient.last_name, "first": patient.first_name, "middle": patient.middle_name},
        "phone": patient.phone,
        "email": patient.email,
        "birth_date": patient.birth_date,
        "sex": patient.sex,
        "opt_outs": sorted(set(opt_outs) | {c.value for c in patient.consent.opted_out()}),
    }
    fields = {name: available[name] for name in config.fields.contact if name in available}
    fields["mis_patient_id"] = patient.mis_id  # always: it is how we find the contact again
    return fields


def deal_fields(appointment: Appointment, status: AppointmentStatus, config: ClinicConfig) -> dict[str, Any]:
    local_start = appointment.starts_at.astimezone(config.tz)
    available: dict[str, Any] = {
        "visit_at": local_start.isoformat(),
        "status": status.value,
        "is_dms": appointment.is_dms,
        "doctor": appointment.doctor_id,
        "branch": appointment.branch_id,
        "price": str(appointment.price) if appointment.price is not None else None,
    }
    fields = {name: available[name] for name in config.fields.deal if name in available}
    fields["mis_appointment_id"] = appointment.mis_id
    fields["title"] = f"Приём {local_start:%d.%m.%Y %H:%M}"  # no patient name in a deal title
    return fields


def effective_status(appointment: Appointment, known: AppointmentState) -> AppointmentStatus:
    """A booked visit whose start time moved is a reschedule: same appointment id, new time."""
    moved = known.starts_at is not None and known.starts_at != appointment.starts_at
    if appointment.status in ACTIVE_STATUSES and moved:
        return AppointmentStatus.RESCHEDULED
    if appointment.status in ACTIVE_STATUSES and known.status is AppointmentStatus.RESCHEDULED and not moved:
        return AppointmentStatus.RESCHEDULED  # stays rescheduled until the visit moves on
    return appointment.status


def _is_repeat(first_visit_at: datetime | None, appointment: Appointment) -> bool:
    return first_visit_at is not None and first_visit_at < appointment.starts_at


def _pipeline_by_category(config: ClinicConfig, category_id: str | None) -> Pipeline | None:
    return next((p for p in config.crm.pipelines.values() if p.category_id == category_id), None)


def plan_patient(
    changes: PatientChanges,
    state: PatientState,
    matches: CrmMatches,
    config: ClinicConfig,
    hasher: KeyedHasher,
    ledger_opt_outs: Iterable[str] = (),
) -> PatientPlan:
    patient = changes.patient
    plan = PatientPlan(patient_id=patient.mis_id)
    excluded = patient_excluded(patient, config)
    if excluded:
        plan.skipped[patient.mis_id] = excluded
        return plan

    next_state = state.model_copy(deep=True)
    contact_id = state.contact_id or matches.contacts.get(patient.mis_id)
    next_state.contact_id = contact_id

    if patient.version < state.version:
        plan.skipped[patient.mis_id] = "stale_patient"
    else:
        fields = contact_fields(patient, config, ledger_opt_outs)
        digest = hasher.content_hash(fields)
        if contact_id is not None and digest == state.content_hash:
            plan.skipped[patient.mis_id] = "unchanged"
        else:
            plan.writes.append(ContactWrite(patient.mis_id, contact_id, fields))
        next_state.version = patient.version
        next_state.content_hash = digest

    for appointment in sorted(changes.appointments, key=lambda a: (a.starts_at, a.mis_id)):
        _plan_deal(appointment, plan, next_state, matches, config, hasher, contact_id)

    plan.next_state = next_state
    return plan


def _plan_deal(
    appointment: Appointment,
    plan: PatientPlan,
    next_state: PatientState,
    matches: CrmMatches,
    config: ClinicConfig,
    hasher: KeyedHasher,
    contact_id: str | None,
) -> None:
    aid = appointment.mis_id
    # Visit history counts every completed visit, also those that are never sent (anonymous, filtered).
    repeat = _is_repeat(next_state.first_visit_at, appointment)
    if appointment.status is AppointmentStatus.COMPLETED and (
        next_state.first_visit_at is None or appointment.starts_at < next_state.first_visit_at
    ):
        next_state.first_visit_at = appointment.starts_at

    reason = appointment_excluded(appointment, config)
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
    status = effective_status(appointment, known)

    pipeline = _pipeline_by_category(config, category_id) if category_id else None
    pipeline = pipeline or config.pipeline(repeat=repeat)
    category_id = category_id or pipeline.category_id
    stage = pipeline.stages[status]

    updated = known.model_copy(
        update={"version": appointment.version, "status": status, "starts_at": appointment.starts_at}
    )
    if deal_id is not None and closed:
        # Won or lost deals are never reopened; a later visit gets its own appointment and deal.
        plan.skipped[aid] = "deal_closed"
        next_state.appointments[aid] = updated.model_copy(update={"deal_id": deal_id, "closed": True})
        plan.changed_appointments.append(aid)
        return

    fields = deal_fields(appointment, status, config)
    digest = hasher.content_hash({"fields": fields, "stage": stage, "category": category_id})
    if deal_id is not None and digest == known.content_hash:
        plan.skipped[aid] = "unchanged"
        return
    plan.writes.append(DealWrite(aid, next_state.patient_id, deal_id, category_id, stage, fields, contact_id))
    next_state.appointments[aid] = updated.model_copy(
        update={
            "deal_id": deal_id,
            "content_hash": digest,
            "category_id": category_id,
            "stage": stage,
            "closed": stage in pipeline.closed_stages,
        }
    )
    plan.changed_appointments.append(aid)
