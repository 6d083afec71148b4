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


class RunStart(BaseModel):
    """A funnel's latest deal as it was when a poll run began, kept while that run's messages come in: a
    re-booking in any of them is judged against it, not against a deal an earlier message of the same run
    made (docs/statuses.md). What the run has brought so far that outranks it is kept with it."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    run: datetime
    latest: LatestDeal
    first_new_at: datetime | None = Field(
        default=None, description="The earliest start, after ``latest``'s, of a visit the run gave another deal"
    )
    first_new_id: str | None = Field(default=None, description="That visit's id (ties are ordered by id)")
    moved_past: bool = Field(
        default=False, description="The run moved a visit that held a deal from before it past ``latest``'s"
    )

    def outranked(self, starts_at: datetime, appointment_id: str) -> bool:
        """Whether the run brought a deal of a visit between ``latest``'s and this one (or moved one past it)."""
        if self.moved_past:
            return True
        if self.first_new_at is None:
            return False
        return (self.first_new_at, self.first_new_id or "") < (starts_at, appointment_id)


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
    run_starts: dict[str, RunStart] = Field(
        default_factory=dict, description="Category id -> that funnel's latest deal when the current poll run began"
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

    def kept_deals(self, category_id: str | None = None) -> list[LatestDeal]:
        """Each funnel's latest deal, and the one its current poll run began with (a re-booking may take that
        one over after an earlier message of the run made another the latest)."""
        kept = [d for c, d in self.latest_deals.items() if category_id in (None, c)]
        kept += [s.latest for c, s in self.run_starts.items() if category_id in (None, c)]
        return kept

    def run_start(self, category_id: str, polled_at: datetime | None) -> RunStart | None:
        """The funnel's run start if it is this poll run's (an older run's says nothing of this one)."""
        start = self.run_starts.get(category_id)
        return start if start is not None and polled_at is not None and start.run == polled_at else None

    def run_starts_to_keep(self) -> dict[str, RunStart]:
        """The run starts that say more than ``latest_deals``: a run start whose deal is still the funnel's
        latest, with nothing the run brought outranking it, is what the next message would note anyway."""
        return {
            category: start
            for category, start in self.run_starts.items()
            if start.moved_past or start.first_new_at is not None or start.latest != self.latest_deals.get(category)
        }

    def track_deal(
        self, appt: AppointmentState, polled_at: datetime | None = None, was_at: datetime | None = None
    ) -> None:
        """Keep each funnel's latest deal: the later visit, or the same deal under its new appointment;
        ``polled_at`` is the poll run that made it the latest (the same deal keeps its first run). What a run
        brings is noted against the latest deal the run began with (``run_starts``); ``was_at`` is where a
        visit that held a deal before this message started then (the MIS moved it)."""
        category = appt.category_id
        if category is None or appt.starts_at is None or appt.appointment_id in self.continued:
            return
        current = self.latest_deals.get(category)
        self._note_in_run(category, appt, current, polled_at, was_at)
        same = current is not None and (
            current.appointment_id == appt.appointment_id
            or (appt.deal_id is not None and appt.deal_id == current.deal_id)
        )
        if current is None or same or current.starts_at is None or appt.starts_at >= current.starts_at:
            self.latest_deals[category] = LatestDeal(
                appointment_id=appt.appointment_id,
                deal_id=appt.deal_id,
                stage=appt.stage,
                closed=appt.closed,
                starts_at=appt.starts_at,
                since=current.since if same and current is not None else polled_at,
            )

    def _note_in_run(
        self,
        category: str,
        appt: AppointmentState,
        current: LatestDeal | None,
        polled_at: datetime | None,
        was_at: datetime | None,
    ) -> None:
        start = self.run_starts.get(category)
        if polled_at is not None and (start is None or start.run != polled_at):
            # The run's first deal in this funnel: the latest one now is the one the run began with.
            self.run_starts.pop(category, None)
            if current is None or current.deal_id is None or current.since == polled_at:
                return  # nothing a re-booking could continue (or a state kept before run starts were)
            start = self.run_starts[category] = RunStart(run=polled_at, latest=current)
        if start is None or appt.starts_at is None:
            return
        held = start.latest
        if appt.appointment_id == held.appointment_id or appt.deal_id == held.deal_id:
            moved = {"appointment_id": appt.appointment_id, "stage": appt.stage, "closed": appt.closed}
            start.latest = held.model_copy(update={**moved, "starts_at": appt.starts_at})
        elif polled_at is not None and held.starts_at is not None and appt.starts_at > held.starts_at:
            if was_at is not None and was_at <= held.starts_at:
                start.moved_past = True  # a deal from before the run is the latest now (docs/statuses.md)
            elif start.first_new_at is None or (appt.starts_at, appt.appointment_id) < (
                start.first_new_at,
                start.first_new_id or "",
            ):
                start.first_new_at, start.first_new_id = appt.starts_at, appt.appointment_id


STATE_MODELS: tuple[type[BaseModel], ...] = (AppointmentState, LatestDeal, RunStart, PatientState)  # the nested first
