"""IDENT use cases behind the stack's ``/ident/*`` routes.

- ``GetTickets``: open CRM leads become IDENT tickets, so a call-centre lead reaches the MIS without
  being retyped. Leads are read from the CRM when IDENT asks (PII is served, never stored here).
- ``PostTimeTable``: IDENT's doctors and branches are kept as a directory that names the visits the
  connector sends without names; free and busy intervals are counted, not kept (nothing books slots).
- Connector batches: checked, then put on the IDENT inbox queue that the poller's ``IdentSource`` reads.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from clinicsync.adapters.ident.contract import (
    MAX_BATCH_BYTES,
    ConnectorBatch,
    Ticket,
    TicketQuery,
    TimeTable,
    directory_names,
    fill_names,
)
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.ident import ConnectorQueue, IdentNames
from clinicsync.domain.models import PatientChanges
from clinicsync.domain.ports import CrmGateway


class BatchTooLarge(ValueError):
    pass


def tickets(gateway: CrmGateway, query: TicketQuery) -> list[Ticket]:
    leads = gateway.open_leads(query.date_time_from, query.date_time_to, query.limit, query.offset)
    return [
        Ticket(
            id=lead.crm_id,
            date_and_time=lead.created_at,
            client_phone=lead.phone,
            client_email=lead.email,
            client_full_name=lead.full_name,
            form_name=lead.form_name,
            comment=lead.comment,
            utm_source=lead.utm.get("source"),
            utm_medium=lead.utm.get("medium"),
            utm_campaign=lead.utm.get("campaign"),
            utm_term=lead.utm.get("term"),
            utm_content=lead.utm.get("content"),
            http_referer=lead.referer,
        )
        for lead in leads
    ]


class IdentDirectory:
    """Names the visits the connector sends without names, from IDENT's last timetable."""

    def __init__(self, names: IdentNames) -> None:
        self._names = names

    def save(self, timetable: TimeTable, now: int) -> dict[str, int]:
        busy = sum(1 for i in timetable.Intervals if i.IsBusy)
        doctors, branches = directory_names(timetable.Doctors), directory_names(timetable.Branches)
        self._names.save(doctors, branches, len(timetable.Intervals), busy, now)
        return {
            "doctors": len(timetable.Doctors),
            "branches": len(timetable.Branches),
            "intervals": len(timetable.Intervals),
        }

    def enrich(self, changes: Sequence[PatientChanges]) -> list[PatientChanges]:
        if not any(a.doctor_name is None or a.branch_name is None for c in changes for a in c.appointments):
            return list(changes)
        doctors, branches = self._names.load()
        return fill_names(changes, doctors, branches)


class ConnectorInbox:
    """Checks a connector batch and puts it where the poller reads it."""

    def __init__(self, queue: ConnectorQueue) -> None:
        self._queue = queue

    def accept(self, body: bytes) -> ConnectorBatch:
        """Validate and enqueue; raises ``BatchTooLarge`` or pydantic's ``ValidationError``."""
        if len(body) > MAX_BATCH_BYTES:
            raise BatchTooLarge(f"batch is {len(body)} bytes; the limit is {MAX_BATCH_BYTES}, send smaller batches")
        batch = ConnectorBatch.model_validate_json(body)
        self._queue.send(body.decode(), batch.batch_id)
        return batch


def connector_settings(config: ClinicConfig, now: float | None = None) -> dict[str, Any]:
    """What the connector applies at the clinic before anything leaves it: the clinic's own filters,
    time zone, phone region and no-show grace, so these live in one place (the clinic config)."""
    return {
        "clinic_id": config.clinic_id,
        "timezone": config.timezone,
        "default_region": config.matching.default_region,
        "no_show_grace_minutes": config.mis.no_show_grace_minutes,
        "filters": config.filters.model_dump(mode="json"),
        "served_at": datetime.fromtimestamp(now if now is not None else time.time()).astimezone().isoformat(),
    }
