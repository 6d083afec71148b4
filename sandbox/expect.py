"""The oracle: what the CRM must hold, computed straight from the MIS emulator's raw records.

It deliberately does not call the sync rules. It re-derives the expected deal for every appointment
from the clinic config, so a rule that drifts shows up as a difference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.models import AppointmentStatus
from clinicsync.domain.statuses import canonical_status
from sandbox.mis_views import MisView

Json = dict[str, Any]


@dataclass(frozen=True)
class ExpectedDeal:
    appointment_id: str
    patient_id: str
    category_id: str
    stage: str
    may_continue: str | None = None  # the no-show visit before it, whose deal a re-booking takes over


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
    previous: dict[tuple[str, str], ExpectedDeal] = {}  # (client, funnel) -> its latest visit so far
    for row in sorted(visits, key=lambda r: (r["start"], r["id"])):
        client = clients[row["client_id"]]
        if client["refused_processing"] or client["archived"] or row["anonymous"] or not view.in_feed(row["start"]):
            continue
        repeat = any(start < row["start"] for start in completed.get(row["client_id"], []))
        pipeline = pipelines.get(created_in.get(row["id"], ""), config.pipeline(repeat=repeat))
        before = previous.get((row["client_id"], pipeline.category_id))
        # A visit after a no-show may have continued its deal (docs/statuses.md): whether it did depends on
        # when the sync saw the two, so the oracle accepts either outcome (see ``mismatches``).
        continues = before.appointment_id if before and before.stage in pipeline.continuing_stages else None
        want = ExpectedDeal(row["id"], row["client_id"], pipeline.category_id, pipeline.stages[status(row)], continues)
        expected[row["id"]] = previous[(row["client_id"], pipeline.category_id)] = want
    return expected


def continued_visits(expected: dict[str, ExpectedDeal], crm_deals_by_origin: dict[str, Json]) -> set[str]:
    """Visits whose deal now carries a later visit's id: re-booked no-shows (possibly re-booked again)."""
    successor = {want.may_continue: aid for aid, want in expected.items() if want.may_continue}

    def continued(aid: str) -> bool:
        later = successor.get(aid)
        while later is not None:
            if later in crm_deals_by_origin:
                return True
            later = successor.get(later)
        return False

    return {aid for aid in expected if aid not in crm_deals_by_origin and continued(aid)}


def mismatches(expected: dict[str, ExpectedDeal], crm_deals_by_origin: dict[str, Json]) -> list[str]:
    """Human-readable differences (ids only, never PII). Deals come from ``sandbox.crm_views``."""
    problems = []
    continued = continued_visits(expected, crm_deals_by_origin)
    for aid, want in expected.items():
        got = crm_deals_by_origin.get(aid)
        if got is None:
            if aid not in continued:
                problems.append(f"appointment {aid}: no deal")
        elif (got["category"], got["stage"]) != (want.category_id, want.stage):
            problems.append(
                f"appointment {aid}: deal in {got['category']}/{got['stage']}, expected {want.category_id}/{want.stage}"
            )
    extra = set(crm_deals_by_origin) - set(expected)
    problems.extend(f"appointment {aid}: deal exists but must not" for aid in sorted(extra))
    return problems
