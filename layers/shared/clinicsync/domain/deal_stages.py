"""What the CRM tells us about a deal's stage: a snapshot as an observation (webhooks, the catch-up), and
the read before a stage change (which deal to read, and what the stage found there teaches). The state
learns an observation in ``rules.apply_observation``."""

from __future__ import annotations

from collections.abc import Mapping

from clinicsync.domain.crm_ports import CrmWrite, DealWrite
from clinicsync.domain.models import CrmObservation
from clinicsync.domain.state import PatientState


def deal_observation(snapshot: Mapping[str, str], patient_id: str, appointment_id: str | None) -> CrmObservation:
    """A deal as the CRM shows it now (``CrmGateway.fetch``), as an observation of its stage."""
    return CrmObservation(
        kind="deal_stage",
        patient_id=patient_id,
        appointment_id=appointment_id,
        crm_id=snapshot["id"],
        stage=snapshot.get("stage") or None,
        closed=snapshot.get("closed") == "Y",
    )


def stage_to_check(write: CrmWrite, state: PatientState) -> str | None:
    """The deal whose current stage must be read before this write (None: no read needed).

    A stage change over a deal we wrote before: a manager may have moved or closed it since, and the
    webhook saying so may come late or never (Bitrix24 does not retry; the catch-up runs every 10
    minutes). New and adopted deals were just read by the look-up; a write without a stage moves nothing."""
    if not isinstance(write, DealWrite) or write.stage is None:
        return None
    return write.deal_id if held_stage(write, state) is not None else None


def held_stage(write: DealWrite, state: PatientState) -> tuple[str, str] | None:
    """(the visit holding the write's deal, the stage we last wrote on it), for a deal we wrote before: the
    visit's own, or the funnel's latest deal that a re-booking takes over (a manager may have closed it
    before its webhook, and a closed deal is never continued)."""
    if write.deal_id is None:
        return None
    known = state.appointment(write.appointment_id)
    if known.deal_id == write.deal_id and known.stage is not None:
        return write.appointment_id, known.stage
    for latest in state.kept_deals():
        if (
            latest.deal_id == write.deal_id
            and latest.stage is not None
            and latest.appointment_id != write.appointment_id
        ):
            return latest.appointment_id, latest.stage
    return None


def stage_read_observation(
    write: DealWrite, state: PatientState, snapshot: Mapping[str, str] | None, ours: str | None = None
) -> CrmObservation | None:
    """What the read before a stage change teaches: a stage that is neither the one we last wrote nor the
    one we are about to write is a manager's move, respected exactly as its webhook would be
    (``apply_observation``). A deal gone from the CRM, or at either of those stages, teaches nothing.

    An open deal last modified by us (``ours``, the integration user) is told by its content, not its
    modifier: its stage can be our own write only if a write of unknown outcome touched the patient since
    the held stage was stored (``PatientState.unsure``); that stage is then ours, one no retry stored, and
    is rewritten. Otherwise every write of ours since is known and left the held stage, so another stage is
    a manager's move made under the integration's login, and is respected like anyone's."""
    stage = snapshot.get("stage") if snapshot is not None else None
    held = held_stage(write, state)
    if snapshot is None or held is None or not stage or stage in (held[1], write.stage):
        return None
    if (
        ours
        and snapshot.get("modified_by") == ours
        and snapshot.get("closed") != "Y"  # a deal we closed stays closed, whoever learns it
        and state.unsure(state.appointment(held[0]).epoch)
    ):
        return None
    return deal_observation(snapshot, state.patient_id, held[0])  # the manager's move, on the visit holding it
