"""The oracle: what the CRM must hold, computed straight from the MIS emulator's raw records.

It deliberately does not call the sync rules. It re-derives the expected deal for every appointment
from the clinic config, so a rule that drifts shows up as a difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from clinicsync.config import ClinicConfig
from clinicsync.models import AppointmentStatus
from clinicsync.statuses import canonical_status

Json = dict[str, Any]


@dataclass(frozen=True)
class ExpectedDeal:
    appointment_id: str
    patient_id: str
    category_id: str
    stage: str


def _start(row: Json) -> datetime:
    return datetime.fromisoformat(f"{row['date']}T{row['time']}")


def expected_deals(clients: list[Json], appointments: list[Json], config: ClinicConfig) -> dict[str, ExpectedDeal]:
    by_id = {str(c["id"]): c for c in clients}
    live = [a for a in appointments if a.get("deletedAt") is None]
    completed: dict[str, list[datetime]] = {}
    for row in live:
        status = canonical_status("medods", row["status"], config.mis.statuses)
        if status is AppointmentStatus.COMPLETED:
            completed.setdefault(str(row["clientId"]), []).append(_start(row))
    expected = {}
    for row in live:
        client = by_id[str(row["clientId"])]
        if client.get("denyDataProcessing") or client.get("archived") or row.get("anonymous"):
            continue
        pid = str(row["clientId"])
        repeat = any(start < _start(row) for start in completed.get(pid, []))
        pipeline = config.pipeline(repeat=repeat)
        status = canonical_status("medods", row["status"], config.mis.statuses)
        expected[str(row["id"])] = ExpectedDeal(str(row["id"]), pid, pipeline.category_id, pipeline.stages[status])
    return expected


def mismatches(expected: dict[str, ExpectedDeal], crm_deals_by_origin: dict[str, Json]) -> list[str]:
    """Human-readable differences (ids only, never PII). Deals come from ``sandbox.crm_views``."""
    problems = []
    for aid, want in expected.items():
        got = crm_deals_by_origin.get(aid)
        if got is None:
            problems.append(f"appointment {aid}: no deal")
        elif (got["category"], got["stage"]) != (want.category_id, want.stage):
            problems.append(
                f"appointment {aid}: deal in {got['category']}/{got['stage']}, expected {want.category_id}/{want.stage}"
            )
    extra = set(crm_deals_by_origin) - set(expected)
    problems.extend(f"appointment {aid}: deal exists but must not" for aid in sorted(extra))
    return problems
