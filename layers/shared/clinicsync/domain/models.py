"""Canonical domain models: what every MIS is translated into and every CRM is written from.

Models are strict (no silent coercion) and frozen: adapters build them once at the boundary,
rules only read them. Anything a MIS sends that we do not understand is rejected by the adapter,
not guessed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from clinicsync.domain.keys import SUBJECT_PATTERN

MisId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")


class BuiltOnUse(Strict):
    """A model only some handlers validate: its validator is built where it is first used, not at import.
    A handler that validates it on every invocation builds it with its import instead (``build_now``), so
    that work stays in Lambda's init rather than moving to the first call."""

    model_config = ConfigDict(defer_build=True)


def build_now(*models: type[BaseModel]) -> None:
    """Build deferred models now, the nested before the ones that hold them (a built model's schema is reused)."""
    for model in models:
        model.model_rebuild()


def lean_json(model: BaseModel) -> str:
    """A queue message's body: None fields left out, the reader's defaults give them back (no field of a
    message defaults to anything but None where None is allowed): a MIS patient's change set is 2-3x smaller."""
    return model.model_dump_json(exclude_none=True)


class AppointmentStatus(StrEnum):
    """The canonical appointment lifecycle; every MIS vocabulary maps onto it via the clinic config."""

    BOOKED = "booked"
    CONFIRMED = "confirmed"
    ARRIVED = "arrived"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    NO_SHOW = "no_show"
    RESCHEDULED = "rescheduled"


class Channel(StrEnum):
    EMAIL = "email"
    SMS = "sms"
    CALL = "call"
    MARKETING = "marketing"


class Consent(Strict):
    """Opt-outs as the source states them. ``True`` means the person refused that channel."""

    email_opt_out: bool = False
    sms_opt_out: bool = False
    call_opt_out: bool = False
    marketing_opt_out: bool = False

    def opted_out(self) -> frozenset[Channel]:
        flags = {
            Channel.EMAIL: self.email_opt_out,
            Channel.SMS: self.sms_opt_out,
            Channel.CALL: self.call_opt_out,
            Channel.MARKETING: self.marketing_opt_out,
        }
        return frozenset(channel for channel, refused in flags.items() if refused)


class Patient(BuiltOnUse):
    mis_id: MisId
    last_name: str = ""
    first_name: str = ""
    middle_name: str = ""
    phone: str | None = Field(default=None, description="E.164, normalised by the adapter")
    email: str | None = None
    birth_date: str | None = Field(default=None, pattern=r"^\d{4}-\d{2}-\d{2}$")
    sex: str | None = Field(default=None, pattern=r"^[mf]$")
    consent: Consent = Consent()
    city: str | None = None
    refused_data_processing: bool = False
    archived: bool = False
    version: int = Field(ge=0, description="Monotonic per record, e.g. the MIS updatedAt in unix seconds")
    # Optional card fields of the InfoClinica->amoCRM case; sent only if the clinic's field map asks.
    representative: str | None = None
    residence: str | None = None
    card_comment: str | None = None
    patient_status: str | None = None
    guarantee_letter: bool | None = None
    policy_number: str | None = None
    policy_valid_until: str | None = None
    cancellation_date: str | None = None
    # Optional card fields of the IDENT->Bitrix24 case (docs/ident.md says where each comes from); none
    # is sent unless the clinic's field map asks. The card's comment is card_comment above.
    card_number: str | None = None
    home_address: str | None = None
    family: tuple[str, ...] = ()  # relatives who also visit the clinic (their MIS patient ids)
    doctors_seen: tuple[str, ...] = ()  # full names of the doctors of the patient's past visits


class Appointment(BuiltOnUse):
    mis_id: MisId
    patient_id: MisId
    status: AppointmentStatus
    starts_at: AwareDatetime
    duration_min: int = Field(default=30, ge=0, le=24 * 60)
    doctor_id: str | None = None
    branch_id: str | None = None
    price: Decimal | None = None
    insurance_policy: str | None = None
    anonymous: bool = False
    version: int = Field(ge=0)
    # Optional visit fields of the InfoClinica->amoCRM case; sent only if the clinic's field map asks.
    doctor_name: str | None = None
    doctor_specialty: str | None = None
    branch_name: str | None = None
    booked_by: str | None = None
    booked_at: AwareDatetime | None = None
    service_codes: tuple[str, ...] = ()
    comment: str | None = None
    assignment_id: str | None = None
    patient_status: str | None = None
    visit_category: str | None = None
    charged: Decimal | None = None
    discount: Decimal | None = None
    paid: Decimal | None = None
    # Optional visit fields of the IDENT->Bitrix24 case; sent only if the clinic's field map asks.
    branch_address: str | None = None
    lead_source: str | None = None

    @property
    def is_dms(self) -> bool:
        """Voluntary-insurance visit: zero price plus a policy number (the dental case's rule)."""
        return self.price is not None and self.price == 0 and bool(self.insurance_policy)


class PatientChanges(BuiltOnUse):
    """Everything that changed for one patient in one poll: the unit the syncer plans CRM writes for."""

    patient: Patient
    appointments: tuple[Appointment, ...] = ()
    # The poll run that read it (its message's ``produced_at``), set by the syncer from the message and
    # never sent itself: a re-booking continues only a deal an earlier run made (domain/rebooking.py).
    polled_at: datetime | None = None


class CrmObservation(BuiltOnUse):
    """Something a manager did in the CRM that the patient's state must learn (from a webhook or the
    catch-up). It travels in the patient's shard group, so only one writer ever touches a patient."""

    kind: Literal["deal_stage", "lead_for_patient"]
    patient_id: MisId
    appointment_id: MisId | None = None
    crm_id: str
    stage: str | None = None
    closed: bool = False


class SyncMessage(BuiltOnUse):
    """One SQS message: many patients' change sets from one shard, so one Lambda batch fills CRM batches."""

    kind: str = Field(default="mis_changes", pattern=r"^mis_changes$")
    clinic_id: str
    shard: int = Field(ge=0)
    produced_at: datetime
    changes: tuple[PatientChanges, ...] = ()
    observations: tuple[CrmObservation, ...] = ()

    @model_validator(mode="after")
    def _not_empty(self) -> SyncMessage:
        if not self.changes and not self.observations:
            raise ValueError("a sync message carries changes or observations")
        return self


class CrmEvent(BuiltOnUse):
    """A CRM entity that changed, as the webhook receiver or the catch-up saw it: ids only, no PII.

    ``snapshot`` holds the entity's non-PII fields when the reader already fetched them (catch-up, or
    the consent job's read before it writes a contact), so the syncer does not fetch them again.
    """

    crm: Literal["bitrix24", "amocrm"]
    event: str = Field(max_length=64)
    entity: Literal["deal", "lead", "contact"]
    crm_id: str = Field(pattern=r"^[0-9]{1,18}$")
    source: Literal["webhook", "catchup", "consent"] = "webhook"
    received_at: int = Field(ge=0)
    snapshot: dict[str, str] | None = None


# A sync queue message and the models it holds, the nested first (the order ``build_now`` wants).
SYNC_MESSAGE_MODELS: tuple[type[BuiltOnUse], ...] = (Patient, Appointment, PatientChanges, CrmObservation, SyncMessage)

ConsentTarget = Literal["crm", "mis", "mailchimp"]


class ConsentJob(Strict):
    """A subject's consent changed: push the ledger's current state to every output.

    ``emails`` travel only in this (encrypted, short-lived) message, for Mailchimp; ``skip`` names the
    system the change came from, which already shows it (no write back to the source, no loop).
    """

    kind: Literal["consent"] = "consent"
    clinic_id: str
    subject: str = Field(pattern=SUBJECT_PATTERN)
    reason: str = Field(max_length=64)
    emails: tuple[str, ...] = Field(default=(), max_length=5)
    skip: tuple[ConsentTarget, ...] = ()
    lifted: tuple[Channel, ...] = ()  # an opt-in lifted these: a "do not send" flag we set in the MIS is cleared
    produced_at: int = Field(ge=0)


def merge_by_patient(changes: Sequence[PatientChanges]) -> list[PatientChanges]:
    """Several messages may carry the same patient; keep the newest patient record and every visit."""
    merged: dict[str, PatientChanges] = {}
    for item in changes:
        pid = item.patient.mis_id
        current = merged.get(pid)
        if current is None:
            merged[pid] = item
            continue
        patient = item.patient if item.patient.version >= current.patient.version else current.patient
        visits = {a.mis_id: a for a in current.appointments}
        for appt in item.appointments:
            if appt.mis_id not in visits or appt.version >= visits[appt.mis_id].version:
                visits[appt.mis_id] = appt
        runs = [at for at in (current.polled_at, item.polled_at) if at is not None]
        merged[pid] = PatientChanges(
            patient=patient, appointments=tuple(visits.values()), polled_at=min(runs) if runs else None
        )
    return list(merged.values())
