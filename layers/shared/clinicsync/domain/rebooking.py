"""Case C's re-booking rule (docs/statuses.md): which deal a new booking continues, and when a visit
whose deal was continued is a visit of its own again. Pure, like the rest of the sync rules."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from clinicsync.domain.config import Pipeline
from clinicsync.domain.crm_ports import DealMatch
from clinicsync.domain.models import Appointment, AppointmentStatus
from clinicsync.domain.state import AppointmentState, LatestDeal, PatientState

ACTIVE_STATUSES = frozenset({AppointmentStatus.BOOKED, AppointmentStatus.CONFIRMED})
# A visit the MIS has booked again (a reschedule included): it wants a deal of its own.
BOOKED_AGAIN = ACTIVE_STATUSES | {AppointmentStatus.RESCHEDULED}


def note_lost_continuations(state: PatientState, found: Mapping[str, DealMatch]) -> None:
    """A look-up by MIS id that finds a visit under the deal we hold for another visit of the patient: a
    re-booking took that deal over in an attempt whose response was lost (only a continuation writes one
    visit's id on another's deal; it notes an intent, so the retry looks the re-booking up). Noted as the
    continuation it is, as that attempt would have, so the old visit's events go through
    ``after_continuation`` (booked again: a deal of its own), and no other booking continues that deal
    again (``continued_deal``): the deal stays under the visit the CRM shows it under.

    The other way round: a visit whose deal was continued, found under a deal other than the one it handed
    on, was booked again in an attempt whose response was lost and got that deal of its own (its create
    intent made it looked up). It is a visit of its own again, as that attempt would have stored, so its
    later events (a no-show again) move that deal rather than being skipped as ``deal_continued``."""
    # A continuation takes a funnel's latest deal, and the syncer loads only the visits its message carries:
    # the no-show holding that deal is known by the patient's latest deals even when its visit is not loaded.
    held = [(latest.deal_id, latest.appointment_id) for latest in state.kept_deals()]
    held += [(a.deal_id, aid) for aid, a in state.appointments.items()]
    holders = {deal_id: aid for deal_id, aid in held if deal_id and aid not in state.continued}
    for aid, match in found.items():
        holder = holders.get(match.deal_id)
        if holder is not None and holder != aid:
            state.continued[holder] = aid
            _latest_moved_on(state, match, aid)
    # After those: a visit just noted as handing its deal on may have been booked again since, in another
    # lost attempt, and be found under a deal of its own.
    for aid, match in found.items():
        if aid in state.continued and match.deal_id != state.appointment(aid).deal_id:
            _own_visit_again(state, aid)


def _latest_moved_on(state: PatientState, match: DealMatch, taker: str) -> None:
    """The funnel's latest deal is the re-booking's now, at the stage the CRM shows: a visit planned in this
    pass that holds that deal takes nothing over from the old visit, and nothing continues it again unless
    the CRM shows it at a continuing stage."""

    def moved_on(latest: LatestDeal) -> LatestDeal:
        if latest.deal_id != match.deal_id or latest.appointment_id == taker:
            return latest
        return latest.model_copy(
            update={"appointment_id": taker, "stage": match.stage or latest.stage, "closed": match.closed}
        )

    for category, latest in state.latest_deals.items():
        state.latest_deals[category] = moved_on(latest)
    for start in state.run_starts.values():
        start.latest = moved_on(start.latest)


def after_continuation(appointment: Appointment, state: PatientState) -> str | None:
    """A visit whose deal a re-booking continued is done with that deal: its later events (the no-show
    again, a redelivery, a cancellation) are skipped. Only a newer event that books it again (the MIS
    moved the no-show to a new time) makes it a visit of its own again, with a deal of its own: never
    the continued one, which is the later visit's now. Returns the skip reason, or None."""
    aid = appointment.mis_id
    if aid not in state.continued:
        return None
    known = state.appointment(aid)
    if appointment.version <= known.version or appointment.status not in BOOKED_AGAIN:
        return "deal_continued"
    _own_visit_again(state, aid)
    return None


def _own_visit_again(state: PatientState, aid: str) -> None:
    """The visit no longer hands its deal on: its funnel, time and status stay (a moved booking reads as
    rescheduled); its own deal is to be made, or is the one a look-up by MIS id found."""
    del state.continued[aid]
    known = state.appointment(aid)
    state.appointments[aid] = AppointmentState(
        appointment_id=aid,
        version=known.version,
        status=known.status,
        category_id=known.category_id,
        starts_at=known.starts_at,
        lead_source=known.lead_source,
    )


def latest_before_run(state: PatientState, category_id: str, polled_at: datetime | None) -> LatestDeal | None:
    """The funnel's latest deal as it was when this poll run began: the one a re-booking of the run may
    continue, whichever of the run's messages made newer deals first."""
    start = state.run_start(category_id, polled_at)
    return start.latest if start is not None else state.latest_deals.get(category_id)


def continued_deal(
    state: PatientState,
    before: PatientState,
    pipeline: Pipeline,
    appointment: Appointment,
    status: AppointmentStatus,
    polled: Mapping[str, Appointment],
    polled_at: datetime | None = None,
) -> LatestDeal | None:
    """The deal a new booking continues (case C: a no-show is called back and re-booked), or None.

    Only the patient's latest deal in the funnel the booking goes to, only while it is open at one of
    the pipeline's continue stages (default: no-show), and only for a later visit that is active. When
    the same poll brings a newer event of the latest visit, that visit is judged by what the MIS says
    now (a no-show booked again keeps its own deal), whichever of the two is planned first.

    "The same poll" is the poll run (``polled_at``), whichever of its messages carry the visits: the latest
    deal is the one the run began with (``latest_before_run``), and a deal the run has brought so far for a
    visit between that one's and the booking's outranks it (``RunStart.outranked``), as it would in one
    message planned in start order. So a no-show first seen with its re-booking keeps a deal of its own,
    also one it adopts by phone now, or one an earlier attempt at this poll's message created and a retry
    finds by MIS id; and a first import of more than one page keeps both deals however it splits them.

    Nor a deal the CRM already shows under another re-booking (``note_lost_continuations``: an attempt
    whose response was lost continued it): a no-show's deal moves on to one re-booking only, and another
    booking of the same poll gets a deal of its own rather than taking that one over again."""
    category = pipeline.category_id
    latest = latest_before_run(state, category, polled_at)
    if status not in ACTIVE_STATUSES or latest is None or latest.deal_id is None or latest.closed:
        return None
    if latest.appointment_id in state.continued:
        return None  # its deal moved on to a re-booking already (a lost response's, the look-up showed)
    held = latest_before_run(before, category, polled_at)
    if held is None or held.deal_id != latest.deal_id:
        return None
    if held.since is not None and polled_at is not None and held.since >= polled_at:
        return None  # became the latest in this run (kept from before the run's start was noted)
    start = state.run_start(category, polled_at)
    if start is not None and start.outranked(appointment.starts_at, appointment.mis_id):
        return None
    if latest.appointment_id == appointment.mis_id or latest.stage not in pipeline.continuing_stages:
        return None
    latest_start = latest.starts_at
    now = polled.get(latest.appointment_id)
    if now is not None and now.version > state.appointment(now.mis_id).version:
        if pipeline.stages[now.status] not in pipeline.continuing_stages:
            return None
        latest_start = now.starts_at
    if latest_start is not None and appointment.starts_at <= latest_start:
        return None
    skip = {appointment.mis_id, latest.appointment_id}
    if latest_start is not None and _moved_past(state, pipeline, polled, latest_start, skip):
        return None  # another visit's deal is the funnel's latest now: the MIS moved that visit past the no-show
    return latest


def _moved_past(
    state: PatientState, pipeline: Pipeline, polled: Mapping[str, Appointment], start: datetime, skip: set[str]
) -> bool:
    """Whether this poll brings a visit holding a deal of the funnel at a start later than ``start``: by what
    the MIS says now, that deal is the funnel's latest, though it is tracked as such only once planned (in
    start order, so after the booking judged here)."""
    for aid, now in polled.items():
        known = state.appointment(aid)
        if (
            aid not in skip
            and aid not in state.continued
            and known.deal_id is not None
            and known.category_id == pipeline.category_id
            and now.starts_at > start
        ):
            return True
    return False
