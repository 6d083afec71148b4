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
from typing import TYPE_CHECKING, Any

from boto3.dynamodb.conditions import Key

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
from clinicsync.domain.models import PatientChanges
from clinicsync.domain.ports import CrmGateway

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table
    from mypy_boto3_sqs.client import SQSClient

DIRECTORY_PK = "IDENT#DIRECTORY"


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
    """Doctors' and branches' names from IDENT's timetable (staff and branch names, no patient data)."""

    def __init__(self, table: Table) -> None:
        self._table = table

    def save(self, timetable: TimeTable, now: int) -> dict[str, int]:
        names = {
            **{f"DOCTOR#{k}": v for k, v in directory_names(timetable.Doctors).items()},
            **{f"BRANCH#{k}": v for k, v in directory_names(timetable.Branches).items()},
        }
        with self._table.batch_writer(overwrite_by_pkeys=["pk", "sk"]) as batch:
            for sk, name in names.items():
                batch.put_item(Item={"pk": DIRECTORY_PK, "sk": sk, "name": name, "updated_at": now})
            busy = sum(1 for i in timetable.Intervals if i.IsBusy)
            batch.put_item(
                Item={
                    "pk": DIRECTORY_PK,
                    "sk": "TIMETABLE",
                    "intervals": len(timetable.Intervals),
                    "busy": busy,
                    "updated_at": now,
                }
            )
        return {
            "doctors": len(timetable.Doctors),
            "branches": len(timetable.Branches),
            "intervals": len(timetable.Intervals),
        }

    def names(self) -> tuple[dict[str, str], dict[str, str]]:
        doctors: dict[str, str] = {}
        branches: dict[str, str] = {}
        kwargs: dict[str, Any] = {"KeyConditionExpression": Key("pk").eq(DIRECTORY_PK)}
        while True:
            page = self._table.query(**kwargs)
            for item in page.get("Items", []):
                sk = str(item["sk"])
                if sk.startswith("DOCTOR#"):
                    doctors[sk.removeprefix("DOCTOR#")] = str(item["name"])
                elif sk.startswith("BRANCH#"):
                    branches[sk.removeprefix("BRANCH#")] = str(item["name"])
            if "LastEvaluatedKey" not in page:
                return doctors, branches
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def enrich(self, changes: Sequence[PatientChanges]) -> list[PatientChanges]:
        if not any(a.doctor_name is None or a.branch_name is None for c in changes for a in c.appointments):
            return list(changes)
        doctors, branches = self.names()
        return fill_names(changes, doctors, branches)


class ConnectorInbox:
    """Where verified connector batches wait for the poller (one SQS message per batch)."""

    def __init__(self, sqs: SQSClient, queue_url: str) -> None:
        self._sqs = sqs
        self._queue_url = queue_url

    def accept(self, body: bytes) -> ConnectorBatch:
        """Validate and enqueue; raises ``BatchTooLarge`` or pydantic's ``ValidationError``."""
        if len(body) > MAX_BATCH_BYTES:
            raise BatchTooLarge(f"batch is {len(body)} bytes; the limit is {MAX_BATCH_BYTES}, send smaller batches")
        batch = ConnectorBatch.model_validate_json(body)
        self._sqs.send_message(
            QueueUrl=self._queue_url,
            MessageBody=body.decode(),
            MessageAttributes={"batch_id": {"DataType": "String", "StringValue": batch.batch_id}},
        )
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
