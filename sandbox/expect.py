"""The oracle: what the CRM must hold, computed straight from the MIS emulator's raw records.

It deliberately does not call the sync rules. It re-derives the expected deal for every appointment
from the clinic config, so a rule that drifts shows up as a difference.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from clinicsync.domain.config import ClinicConfig, Pipeline
from clinicsync.domain.models import AppointmentStatus
from clinicsync.domain.statuses import canonical_status
from sandbox.mis_views import MisView

Json = dict[str, Any]


# The MIS has the visit booked (again): it needs a deal naming it, whatever happened to an earlier one.
BOOKED = frozenset({AppointmentStatus.BOOKED, AppointmentStatus.CONFIRMED, AppointmentStatus.RESCHEDULED})


@dataclass(frozen=True)
class ExpectedDeal:
    appointment_id: str
    patient_id: str
    category_id: str
    stage: str
    booked: bool = False


def expected_deals(
    view: MisView, config: ClinicConfig, created_in: Mapping[str, str] | None = None
) -> dict[str, ExpectedDeal]:
    """Every visit the MIS feed covers, of a patient who may be sent, in the stage its raw status maps to;
    the funnel is 'repeat' when the patient had a completed visit before it.

    A deal keeps the funnel it was created in (docs/statuses.md): ``created_in`` maps appointment ids to
    the funnel (category id) this oracle expected when their deal first appeared, and those stay put."""
    pipelines = {p.category_id: p for p in config.crm.pipelines.values()}
    created_in = created_in or {}
    clients = {c["id"]: c for c in view.clients()}
    visits = view.visits()
    kind = view.kind

    def status(row: Json) -> AppointmentStatus:
        return canonical_status(kind, row["status"], config.mis.statuses)

    completed: dict[str, list[datetime]] = {}
    for row in visits:
        if status(row) is AppointmentStatus.COMPLETED and view.in_feed(row["start"]):
            completed.setdefault(row["client_id"], []).append(row["start"])
    expected = {}
    for row in visits:
        client = clients[row["client_id"]]
        if client["refused_processing"] or client["archived"] or row["anonymous"] or not view.in_feed(row["start"]):
            continue
        repeat = any(start < row["start"] for start in completed.get(row["client_id"], []))
        pipeline = pipelines.get(created_in.get(row["id"], ""), config.pipeline(repeat=repeat))
        expected[row["id"]] = ExpectedDeal(
            row["id"], row["client_id"], pipeline.category_id, pipeline.stages[status(row)], status(row) in BOOKED
        )
    return expected


def continued_visits(
    expected: Mapping[str, ExpectedDeal],
    crm_deals_by_origin: Mapping[str, Json],
    appointment_history: Mapping[str, list[str]],
) -> set[str]:
    """Visits without a deal because a re-booking took their deal over (docs/statuses.md), as the CRM's
    own record shows: a deal that named the visit now names another visit of the same patient. Never a
    visit the MIS has booked again: that one needs a deal of its own. Which visit may continue which is
    the product's rule, and when it applied depends on what each poll saw, so the oracle does not guess
    it from start times; it only checks that the deal stayed with the patient."""
    holders = {str(deal["id"]): aid for aid, deal in crm_deals_by_origin.items()}
    continued = set()
    for deal_id, named in appointment_history.items():
        holder = expected.get(holders.get(deal_id, ""))
        if holder is None:
            continue
        for aid in set(named) - {holder.appointment_id}:
            want = expected.get(aid)
            if want and aid not in crm_deals_by_origin and want.patient_id == holder.patient_id and not want.booked:
                continued.add(aid)
    return continued


def kept_in_first_funnel(
    expected: Mapping[str, ExpectedDeal], crm_deals_by_origin: Mapping[str, Json], pipelines: Mapping[str, Pipeline]
) -> set[str]:
    """Deals in another funnel than the oracle expects, at the stage of the same status there. A deal keeps
    the funnel it was created in (docs/statuses.md); under faults, a deal may be created before an earlier
    visit's completion reaches the sync (its message dead-lettered and replayed later), so it starts in the
    primary funnel. Only the chaos run allows these; everywhere else ``created_in`` pins the funnel."""
    kept = set()
    for aid, want in expected.items():
        got = crm_deals_by_origin.get(aid)
        if got is None or got["category"] == want.category_id or got["category"] not in pipelines:
            continue
        statuses = [s for s, stage in pipelines[want.category_id].stages.items() if stage == want.stage]
        if got["stage"] in {pipelines[got["category"]].stages[s] for s in statuses}:
            kept.add(aid)
    return kept


def mismatches(
    expected: Mapping[str, ExpectedDeal],
    crm_deals_by_origin: Mapping[str, Json],
    appointment_history: Mapping[str, list[str]],
    kept: Collection[str] = (),
) -> list[str]:
    """Human-readable differences (ids only, never PII). Deals and their appointment history come from
    ``sandbox.crm_views``; ``kept`` are deals allowed in the funnel they started in (``kept_in_first_funnel``)."""
    problems = []
    continued = continued_visits(expected, crm_deals_by_origin, appointment_history)
    for aid, want in expected.items():
        got = crm_deals_by_origin.get(aid)
        if got is None:
            if aid not in continued:
                problems.append(f"appointment {aid}: no deal")
        elif aid not in kept and (got["category"], got["stage"]) != (want.category_id, want.stage):
            problems.append(
                f"appointment {aid}: deal in {got['category']}/{got['stage']}, expected {want.category_id}/{want.stage}"
            )
    extra = set(crm_deals_by_origin) - set(expected)
    problems.extend(f"appointment {aid}: deal exists but must not" for aid in sorted(extra))
    return problems
