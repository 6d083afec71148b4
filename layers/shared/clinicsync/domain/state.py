"""What we remember per patient between syncs: CRM ids, versions and content hashes, never PII."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from clinicsync.domain.models import AppointmentStatus

# Built where first used (the syncer builds them with its import: ``STATE_MODELS``); the poller and the
# HTTP handlers never read a patient's state.


class AppointmentState(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    appointment_id: str
    deal_id: str | None = None
    version: int = -1
    content_hash: str | None = None
    epoch: int = 0  # the patient's ``write_epoch`` when ``content_hash`` was stored
    status: AppointmentStatus | None = None
    category_id: str | None = None
    stage: str | None = None
    closed: bool = False
    starts_at: datetime | None = None
    lead_source: str | None = None  # the adopted CRM lead's SOURCE_ID (a code, no PII): kept on later updates
    # A manager moved the deal by hand while the MIS said ``manual_status``; the sync leaves that
    # stage alone until the MIS status moves forward.
    manual_stage: str | None = None
    manual_status: AppointmentStatus | None = None


class LatestDeal(BaseModel):
    """A funnel's latest deal (by visit start), kept in the patient's STATE: a re-booking reads it."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    appointment_id: str
    deal_id: str | None = None
    stage: str | None = None
    closed: bool = False
    starts_at: datetime | None = None
    since: datetime | None = Field(
        default=None, description="The poll run in which this deal became the latest (None: before it was kept)"
    )


class PatientState(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)

    patient_id: str
    contact_id: str | None = None
    version: int = -1
    content_hash: str | None = None
    contact_epoch: int = Field(default=0, description="The write_epoch when the contact's content_hash was stored")
    write_epoch: int = Field(
        default=0,
        description="Raised when an attempt's CRM writes may have landed unrecorded (a failure after a write"
        " was sent, a claim left by a crash): a content hash stored in an earlier epoch no longer proves what"
        " the CRM holds, so that record is written again (checked as usual) rather than skipped as unchanged",
    )
    phone_key: str | None = Field(default=None, description="HMAC of the E.164 phone, for the phone index")
    email_key: str | None = Field(default=None, description="HMAC of the e-mail: tells a changed e-mail")
    first_visit_at: datetime | None = Field(default=None, description="Earliest completed visit: repeat funnel")
    last_visit_at: datetime | None = Field(default=None, description="Latest completed visit (audience field)")
    audience_hash: str | None = Field(default=None, description="HMAC of the Mailchimp member we last sent")
    has_deal: bool = Field(
        default=False, description="A deal was planned for a visit: the first new deal's adoption by phone is over"
    )
    appointments: dict[str, AppointmentState] = Field(default_factory=dict)
    latest_deals: dict[str, LatestDeal] = Field(
        default_factory=dict, description="Category id -> that funnel's latest deal (re-booked no-shows)"
    )
    continued: dict[str, str] = Field(
        default_factory=dict, description="Appointment id -> the later appointment that took over its deal"
    )

    def unsure(self, stored_epoch: int) -> bool:
        """A record whose digest was stored before the latest attempt of unknown outcome (``write_epoch``)."""
        return stored_epoch != self.write_epoch

    def appointment(self, appointment_id: str) -> AppointmentState:
        return self.appointments.get(appointment_id) or AppointmentState(appointment_id=appointment_id)

    def own_deal(self, appointment_id: str) -> str | None:
        """The deal of this visit, or None: also for a visit whose deal a re-booking continued (that deal is
        the later visit's), so a deal it is given again is looked up by MIS id before it is created."""
        return None if appointment_id in self.continued else self.appointment(appointment_id).deal_id

    def track_deal(self, appt: AppointmentState, polled_at: datetime | None = None) -> None:
        """Keep each funnel's latest deal: the later visit, or the same deal under its new appointment;
        ``polled_at`` is the poll run that made it the latest (the same deal keeps its first run)."""
        if appt.category_id is None or appt.starts_at is None or appt.appointment_id in self.continued:
            return
        current = self.latest_deals.get(appt.category_id)
        same = current is not None and (
            current.appointment_id == appt.appointment_id
            or (appt.deal_id is not None and appt.deal_id == current.deal_id)
        )
        if current is None or same or current.starts_at is None or appt.starts_at >= current.starts_at:
            self.latest_deals[appt.category_id] = LatestDeal(
                appointment_id=appt.appointment_id,
                deal_id=appt.deal_id,
                stage=appt.stage,
                closed=appt.closed,
                starts_at=appt.starts_at,
                since=current.since if same and current is not None else polled_at,
            )


STATE_MODELS: tuple[type[BaseModel], ...] = (AppointmentState, LatestDeal, PatientState)  # the nested first
