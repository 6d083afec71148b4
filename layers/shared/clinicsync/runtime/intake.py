"""What the receiver does with a request its sender checks let through: queue it or store it, and count it.
Webhooks are only queued, never fetched here, so the CRM is answered fast (Bitrix24 slows down slow
receivers); only IDENT's GetTickets reads the CRM, because IDENT asks for the leads themselves.

IDENT's models and use cases are imported in its routes: a clinic whose MIS is not IDENT never calls them."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from clinicsync.observability import logger
from clinicsync.runtime import wiring
from clinicsync.runtime.observe import Counted, observe

if TYPE_CHECKING:
    from clinicsync.adapters.ident.contract import ConnectorBatch, TicketQuery, TimeTable
    from clinicsync.domain.models import CrmEvent


def crm_events(events: list[CrmEvent]) -> int:
    """Queues the webhook's events (amoCRM batches several; an event we do not sync gives none)."""
    if events:
        wiring.container().event_queue().send(events)
    observe(Counted({"WebhooksQueued": len(events)}))
    logger.info(
        "webhooks queued", extra={"crm_events": [e.event for e in events], "crm_ids": [e.crm_id for e in events]}
    )
    return len(events)


def tickets_json(query: TicketQuery) -> str:
    """IDENT's tickets as the JSON array it reads (Cyrillic kept as is)."""
    from clinicsync.adapters.ident.contract import tickets_of
    from clinicsync.application import ident

    gateway = wiring.container().crm_gateway(wiring.container().clinic_config())
    found = tickets_of(ident.open_leads(gateway, query.date_time_from, query.date_time_to, query.limit, query.offset))
    observe(Counted({"IdentTicketsServed": len(found)}))
    return json.dumps([t.model_dump(mode="json", exclude_none=True) for t in found], ensure_ascii=False)


def timetable(table: TimeTable) -> None:
    from clinicsync.adapters.ident.contract import directory_names

    busy = sum(1 for i in table.Intervals if i.IsBusy)
    wiring.container().ident_directory().save(
        directory_names(table.Doctors), directory_names(table.Branches), len(table.Intervals), busy, int(time.time())
    )
    counts = {"doctors": len(table.Doctors), "branches": len(table.Branches), "intervals": len(table.Intervals)}
    logger.info("IDENT timetable stored", extra=counts)


def connector_settings() -> dict[str, Any]:
    """What the IDENT connector asks for at start: the clinic's sync settings (no secret)."""
    from clinicsync.application import ident

    return ident.connector_settings(wiring.container().clinic_config())


def connector_batch(batch: ConnectorBatch) -> dict[str, Any]:
    """A batch the inbox took: counted, and the receipt the connector logs."""
    observe(Counted({"ConnectorBatchesQueued": 1}))
    logger.info("connector batch queued", extra={"batch_id": batch.batch_id, "patients": len(batch.changes)})
    return {"status": "queued", "batch_id": batch.batch_id, "patients": len(batch.changes)}
