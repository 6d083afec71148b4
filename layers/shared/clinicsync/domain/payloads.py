"""What we send, in canonical names: the CRM contact and deal payloads and the Mailchimp merge fields, cut to
the clinic's field map (minimal by default; never a diagnosis). The CRM gateways only translate them."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from clinicsync.domain.audience import MAILCHIMP_CHANNELS
from clinicsync.domain.config import ClinicConfig, Filters
from clinicsync.domain.models import Appointment, AppointmentStatus, Channel, Patient, PatientChanges
from clinicsync.domain.state import PatientState


def _money(value: Decimal | None) -> str | None:
    return str(value) if value is not None else None


def _age(birth_date: str | None, today: date) -> int | None:
    if not birth_date:
        return None
    born = date.fromisoformat(birth_date)
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


def _refusal(patient: Patient) -> set[str]:
    """A patient who refused processing but is sent (as the clinic chose) gets no marketing at all."""
    return {c.value for c in Channel} if patient.refused_data_processing else set()


def patient_opt_outs(patient: Patient, opt_outs: Iterable[str]) -> set[str]:
    """Every channel the patient refused: the ledger's, the MIS card's flags and a refusal of processing."""
    return set(opt_outs) | {c.value for c in patient.consent.opted_out()} | _refusal(patient)


def contact_fields(
    patient: Patient, config: ClinicConfig, opt_outs: Iterable[str], today: date | None = None
) -> dict[str, Any]:
    """The contact payload in canonical names, cut to the clinic's field map (minimal by default).

    The 16 contact fields of the InfoClinica->amoCRM case are all available; none is a diagnosis.
    """
    available: dict[str, Any] = {
        "full_name": {"last": patient.last_name, "first": patient.first_name, "middle": patient.middle_name},
        "phone": patient.phone,
        "email": patient.email,
        "birth_date": patient.birth_date,
        "age": _age(patient.birth_date, today or datetime.now(config.tz).date()),
        "sex": patient.sex,
        "representative": patient.representative,
        "residence": patient.residence,
        "card_comment": patient.card_comment,
        "patient_status": patient.patient_status,
        "guarantee_letter": patient.guarantee_letter,
        "policy_number": patient.policy_number,
        "policy_valid_until": patient.policy_valid_until,
        "cancellation_date": patient.cancellation_date,
        "card_number": patient.card_number,
        "home_address": patient.home_address,
        "family": list(patient.family) or None,
        "doctors_seen": list(patient.doctors_seen) or None,
        "opt_outs": sorted(patient_opt_outs(patient, opt_outs)),
    }
    fields = {name: available[name] for name in config.fields.contact if name in available}
    if available["opt_outs"]:
        fields["opt_outs"] = available["opt_outs"]  # consent always reaches the CRM, whatever the field map
    fields["mis_patient_id"] = patient.mis_id  # always: it is how we find the contact again
    return fields


def deal_fields(
    appointment: Appointment,
    status: AppointmentStatus,
    config: ClinicConfig,
    *,
    repeat: bool,
    lead_source: str | None = None,
) -> dict[str, Any]:
    """The deal payload in canonical names, cut to the clinic's field map (the case's 16 fields at most).

    ``repeat`` is the rule that picks the repeat funnel (``_is_repeat``); ``lead_source`` the SOURCE_ID of
    the CRM lead this visit's deal adopted, if any."""
    local_start = appointment.starts_at.astimezone(config.tz)
    available: dict[str, Any] = {
        "visit_at": local_start.isoformat(),
        "status": status.value,
        "is_dms": appointment.is_dms,
        "doctor": appointment.doctor_name or appointment.doctor_id,
        "branch": appointment.branch_name or appointment.branch_id,
        "price": _money(appointment.price),
        "booked_by": appointment.booked_by,
        "booked_at": appointment.booked_at.astimezone(config.tz).isoformat() if appointment.booked_at else None,
        "service_codes": ",".join(appointment.service_codes) or None,
        "comment": appointment.comment,
        "assignment_id": appointment.assignment_id,
        "patient_status": appointment.patient_status,
        "visit_category": appointment.visit_category,
        "charged": _money(appointment.charged),
        "discount": _money(appointment.discount),
        "paid": _money(appointment.paid),
        "branch_address": appointment.branch_address,
        "visit_type": "repeat" if repeat else "primary",
        "lead_source": lead_source or appointment.lead_source,
    }
    fields = {name: available[name] for name in config.fields.deal if name in available}
    if "lead_source" in fields and fields["lead_source"] is None:
        del fields["lead_source"]  # the CRM's own data: copied from an adopted lead, never blanked or invented
    fields["mis_appointment_id"] = appointment.mis_id
    fields["title"] = f"Приём {local_start:%d.%m.%Y %H:%M}"  # no patient name in a deal title
    return fields


def audience_merge_fields(changes: PatientChanges, state: PatientState, config: ClinicConfig) -> dict[str, str] | None:
    """The Mailchimp member for a patient who may get marketing e-mail, or None (never added).

    Segmentation fields of the lab case: city, first or repeat patient, last visit date, the doctor's
    specialty and the branch; a field without a value is left out (never blanked).
    """
    if config.mailchimp is None:
        return None
    patient = changes.patient
    latest = max(changes.appointments, key=lambda a: a.starts_at, default=None)
    values = {
        "city": patient.city,
        "visit_type": "repeat" if state.first_visit_at is not None else "first",
        "last_visit": state.last_visit_at.astimezone(config.tz).date().isoformat() if state.last_visit_at else None,
        "specialty": latest.doctor_specialty if latest else None,
        "branch": (latest.branch_name or latest.branch_id) if latest else None,
    }
    return {tag: str(values[name]) for name, tag in config.mailchimp.merge_fields.items() if values.get(name)}


def patient_excluded(patient: Patient, filters: Filters) -> str | None:
    """Why a patient must not reach the CRM at all (152-FZ: refused processing), or None.

    The IDENT connector applies the same filters at the clinic, so excluded records never leave it."""
    if patient.refused_data_processing and filters.refused_processing == "skip":
        return "refused_data_processing"
    return None


def appointment_excluded(appointment: Appointment, filters: Filters) -> str | None:
    if appointment.anonymous and filters.skip_anonymous:
        return "anonymous"
    if filters.branches is not None and appointment.branch_id not in filters.branches:
        return "branch_filtered"
    if filters.doctors is not None and appointment.doctor_id not in filters.doctors:
        return "doctor_filtered"
    return None


def may_join_audience(patient: Patient, config: ClinicConfig, opted_out: Iterable[str]) -> bool:
    """Only patients with an e-mail who refused neither e-mail nor marketing, anywhere, ever."""
    if not patient.email or patient_excluded(patient, config.filters) is not None:
        return False
    return not patient_opt_outs(patient, opted_out) & MAILCHIMP_CHANNELS
