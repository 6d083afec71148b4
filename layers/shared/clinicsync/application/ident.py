"""IDENT use cases behind the stack's ``/ident/*`` routes (IDENT's wire shapes stay in
``adapters.ident.contract``; the routes parse and shape them).

- Tickets: open CRM leads, so a call-centre lead reaches the MIS without being retyped. Leads are read
  from the CRM when IDENT asks (PII is served, never stored here).
- The directory: IDENT's doctors and branches are kept to name the visits the connector sends without
  names; free and busy intervals are counted, not kept (nothing books slots).
- Connector batches: put on the IDENT inbox queue that the poller's ``IdentSource`` reads.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.crm_ports import CrmGateway, OpenLead
from clinicsync.domain.ident import ConnectorQueue, IdentNames, fill_names
from clinicsync.domain.models import PatientChanges


def open_leads(
    gateway: CrmGateway, created_from: datetime, created_to: datetime, limit: int, offset: int
) -> list[OpenLead]:
    """The CRM's open leads created in the window, one page of them: what IDENT books from."""
    return gateway.open_leads(created_from, created_to, limit, offset)


class IdentDirectory:
    """Names the visits the connector sends without names, from IDENT's last timetable."""

    def __init__(self, names: IdentNames) -> None:
        self._names = names

    def save(
        self, doctors: Mapping[str, str], branches: Mapping[str, str], intervals: int, busy: int, now: int
    ) -> None:
        self._names.save(doctors, branches, intervals, busy, now)

    def enrich(self, changes: Sequence[PatientChanges]) -> list[PatientChanges]:
        if not any(a.doctor_name is None or a.branch_name is None for c in changes for a in c.appointments):
            return list(changes)
        doctors, branches = self._names.load()
        return fill_names(changes, doctors, branches)


class ConnectorInbox:
    """Puts a checked connector batch where the poller reads it."""

    def __init__(self, queue: ConnectorQueue) -> None:
        self._queue = queue

    def accept(self, body: str, batch_id: str) -> None:
        self._queue.send(body, batch_id)


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
