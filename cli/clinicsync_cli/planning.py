"""``clinicsync plan``: what the next sync would write to the CRM, decided by the real syncer, written nowhere.

The MIS is read from the stored cursor (or a window) without moving it; the changes go through the same
``Syncer`` the stack runs, with two stand-ins: a gateway that looks up for real but records writes instead
of sending them, and an in-memory store that reads the table through and keeps every write to itself
(``MemoryStore(below=...)``). So the plan is the rules' own decision, not a copy of them. Values shown
are masked: names by initials, phones and e-mails by a few characters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from clinicsync.adapters.aws.store import DynamoStore
from clinicsync.application.sync import Syncer
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.crm_ports import (
    ContactWrite,
    CrmGateway,
    CrmMatches,
    CrmWrite,
    DealWrite,
    LeadWrite,
    OpenLead,
    WriteOutcome,
)
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.models import PatientChanges
from clinicsync.domain.ports import MisSource
from clinicsync_cli.memory_store import MemoryStore

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table


# --- the non-writing stand-ins -------------------------------------------------------------------------


class DryRunGateway:
    """A CRM gateway that looks up for real and records writes instead of sending them."""

    def __init__(self, inner: CrmGateway) -> None:
        self._inner = inner
        self.kind = inner.kind
        self.lookups_need_intents = inner.lookups_need_intents
        self.guards_writes = False  # a dry run reads, as a gateway without guards would
        self.writes: list[CrmWrite] = []
        self.matches: list[CrmMatches] = []
        self._new = 0

    def find(
        self,
        patient_ids: Sequence[str],
        appointment_ids: Sequence[str],
        phones: Sequence[str] = (),
        multifield_contacts: Sequence[str] = (),
        intended_since: int | None = None,
    ) -> CrmMatches:
        found = self._inner.find(patient_ids, appointment_ids, phones, multifield_contacts, intended_since)
        self.matches.append(found)
        return found

    def apply(self, writes: Sequence[CrmWrite]) -> WriteOutcome:
        self.writes.extend(writes)
        outcome = WriteOutcome()
        for write in writes:
            if isinstance(write, ContactWrite):
                outcome.contact_ids[write.patient_id] = write.contact_id or self._placeholder()
            elif isinstance(write, DealWrite):
                outcome.deal_ids[write.appointment_id] = write.deal_id or self._placeholder()
        return outcome

    def _placeholder(self) -> str:
        self._new += 1
        return f"new-{self._new}"

    def requests_made(self) -> int:
        return self._inner.requests_made()

    def verify_pipelines(self, pipelines: Mapping[Any, Any]) -> frozenset[str]:
        return self._inner.verify_pipelines(pipelines)

    def fetch(self, entity: str, crm_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        return self._inner.fetch(entity, crm_ids)

    def changed_since(self, entity: str, since: str, limit: int) -> list[dict[str, str]]:
        return self._inner.changed_since(entity, since, limit)

    def integration_user(self) -> str:
        return self._inner.integration_user()

    def open_leads(self, created_from: datetime, created_to: datetime, limit: int, offset: int) -> list[OpenLead]:
        return self._inner.open_leads(created_from, created_to, limit, offset)

    def contact_emails(self, contact_ids: Sequence[str]) -> dict[str, list[str]]:  # noqa: ARG002
        return {}  # e-mails are never read for a plan


# --- masking -------------------------------------------------------------------------------------------


def mask_name(value: Mapping[str, str]) -> str:
    parts = [value.get("last", ""), value.get("first", ""), value.get("middle", "")]
    return " ".join(f"{p[0]}." for p in parts if p) or "-"


def mask_phone(value: str) -> str:
    digits = [c for c in value if c.isdigit()]
    return f"+{digits[0]}…{''.join(digits[-2:])}" if len(digits) >= 4 else "…"


def mask_email(value: str) -> str:
    local, _, domain = value.partition("@")
    tld = domain.rsplit(".", 1)[-1] if "." in domain else ""
    return f"{local[:1]}…@…{('.' + tld) if tld else ''}"


MASKS: dict[str, Callable[[Any], str]] = {"full_name": mask_name, "phone": mask_phone, "email": mask_email}
HIDDEN = {"representative", "residence", "card_comment", "comment", "policy_number", "birth_date"}


def masked_fields(fields: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in fields.items():
        if value is None or value in ("", [], ()):
            continue
        if name in MASKS:
            out[name] = MASKS[name](value)
        elif name in HIDDEN:
            out[name] = "•••"
        elif isinstance(value, list | tuple):
            out[name] = ",".join(str(v) for v in value)
        else:
            out[name] = str(value)
    return out


# --- the plan ------------------------------------------------------------------------------------------


@dataclass
class PlannedWrite:
    action: str  # create, update, move, adopt, link
    entity: str  # contact, deal, lead
    mis_id: str
    crm_id: str | None
    stage_from: str | None = None
    stage_to: str | None = None
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    patients: int = 0
    appointments: int = 0
    writes: list[PlannedWrite] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    crm_reads: int = 0
    dropped_store_writes: int = 0

    def count(self, action: str, entity: str) -> int:
        return sum(1 for w in self.writes if w.action == action and w.entity == entity)


def verified(config: ClinicConfig, gateway: CrmGateway) -> ClinicConfig:
    """As the stack does at start-up: the CRM's won/lost stages count as closed (and stages must exist)."""
    return config.with_crm_closed_stages(gateway.verify_pipelines(config.crm.pipelines))


def read_changes(source: MisSource, cursor: Mapping[str, Any] | None, max_pages: int) -> list[PatientChanges]:
    changes: list[PatientChanges] = []
    for _ in range(max_pages):
        page = source.fetch_changes(cursor)  # never acknowledged, the cursor is not stored
        changes.extend(page.changes)
        cursor = page.cursor
        if not page.more:
            break
    return changes


def plan_sync(
    config: ClinicConfig,
    changes: Sequence[PatientChanges],
    table: Table,
    gateway: CrmGateway,
    hasher: KeyedHasher,
) -> Plan:
    dry = DryRunGateway(gateway)
    stored = DynamoStore(table)
    store = MemoryStore(below=stored)
    syncer = Syncer(verified(config, gateway), store, dry, hasher, claim_wait=0.0)
    reads_before = gateway.requests_made()
    plan = Plan(patients=len(changes), appointments=sum(len(c.appointments) for c in changes))
    size = config.patients_per_message
    for start in range(0, len(changes), size):
        report = syncer.sync(changes[start : start + size])
        for reason, count in report.skipped.items():
            plan.skipped[reason] = plan.skipped.get(reason, 0) + count
    deals = {aid: m for found in dry.matches for aid, m in found.deals.items()}
    wanted: dict[str, list[str]] = {}
    for write in dry.writes:
        if isinstance(write, DealWrite):
            wanted.setdefault(write.patient_id, []).append(write.appointment_id)
    states = stored.load_patients(wanted) if wanted else {}  # as before the plan
    for write in dry.writes:
        plan.writes.append(_planned(write, deals, states))
    plan.crm_reads = gateway.requests_made() - reads_before
    plan.dropped_store_writes = store.writes
    return plan


def _planned(write: CrmWrite, deals: Mapping[str, Any], states: Mapping[str, Any]) -> PlannedWrite:
    if isinstance(write, ContactWrite):
        action = "create" if write.contact_id is None else "update"
        return PlannedWrite(action, "contact", write.patient_id, write.contact_id, fields=masked_fields(write.fields))
    if isinstance(write, LeadWrite):
        return PlannedWrite("adopt" if write.convert else "link", "lead", write.patient_id, write.lead_id)
    current = deals.get(write.appointment_id)
    stage_from = current.stage if current is not None else None
    if stage_from is None and write.patient_id in states:
        stage_from = states[write.patient_id].appointment(write.appointment_id).stage
    if write.deal_id is None:
        action = "create"
    elif write.stage is not None and write.stage != stage_from:
        action = "move"
    else:
        action = "update"
    return PlannedWrite(
        action,
        "deal",
        write.appointment_id,
        write.deal_id,
        stage_from=stage_from if write.deal_id else None,
        stage_to=write.stage,
        fields=masked_fields(write.fields),
    )
