"""What we remember per patient between syncs: CRM ids, versions and content hashes, never PII."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from clinicsync.models import AppointmentStatus


class AppointmentState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    appointment_id: str
    deal_id: str | None = None
    version: int = -1
    content_hash: str | None = None
    status: AppointmentStatus | None = None
    category_id: str | None = None
    stage: str | None = None
    closed: bool = False
    starts_at: datetime | None = None
    # A manager moved the deal by hand while the MIS said ``manual_status``; the sync leaves that
    # stage alone until the MIS status moves forward.
    manual_stage: str | None = None
    manual_status: AppointmentStatus | None = None


class PatientState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patient_id: str
    contact_id: str | None = None
    version: int = -1
    content_hash: str | None = None
    phone_key: str | None = Field(default=None, description="HMAC of the E.164 phone, for the phone index")
    email_key: str | None = Field(default=None, description="HMAC of the e-mail: tells a changed e-mail")
    first_visit_at: datetime | None = Field(default=None, description="Earliest completed visit: repeat funnel")
    last_visit_at: datetime | None = Field(default=None, description="Latest completed visit (audience field)")
    audience_hash: str | None = Field(default=None, description="HMAC of the Mailchimp member we last sent")
    has_deal: bool = Field(
        default=False, description="A deal was planned for a visit: the first new deal's adoption by phone is over"
    )
    appointments: dict[str, AppointmentState] = Field(default_factory=dict)

    def appointment(self, appointment_id: str) -> AppointmentState:
        return self.appointments.get(appointment_id) or AppointmentState(appointment_id=appointment_id)
