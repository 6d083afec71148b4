"""The clinic's funnel for the report: lead -> booked -> visited -> won, by lead source, DMS visits excluded.

An *entry* is a CRM lead created in the window, or a booking that came without a lead (the patient called
the front desk). A booking is a deal clinicsync created from a MIS appointment; it counts for its lead's
source. Visited means the deal reached the arrived/completed stage of its pipeline or a won stage; won
means a won stage. Deals marked DMS (voluntary insurance) are left out, with the leads they came from.
Only ids, stages and sources are read: no names, phones or e-mails.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from clinicsync.adapters.amocrm.client import AmoCrmClient
from clinicsync.adapters.bitrix24.client import Bitrix24Client
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.models import AppointmentStatus as S
from clinicsync_cli.discovery import CrmDiscovery, bitrix24_field_name, discover_crm

NO_LEAD = "no lead (direct booking)"
STEPS = ("entries", "booked", "visited", "won")


@dataclass
class FunnelRow:
    source: str
    entries: int = 0
    booked: int = 0
    visited: int = 0
    won: int = 0

    def step(self, name: str) -> int:
        return int(getattr(self, name))


@dataclass
class Funnel:
    since: datetime
    until: datetime
    rows: list[FunnelRow] = field(default_factory=list)
    dms_excluded: int = 0

    def total(self) -> FunnelRow:
        total = FunnelRow("all sources")
        for row in self.rows:
            for step in STEPS:
                setattr(total, step, total.step(step) + row.step(step))
        return total


@dataclass(frozen=True)
class _Deal:
    lead_id: str | None
    source: str | None
    stage: str
    dms: bool


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("y", "1", "true", "yes", "да")


def build_funnel(
    since: datetime,
    until: datetime,
    leads: Mapping[str, str],  # lead id -> source, created in the window
    deals: Iterable[_Deal],
    visited_stages: set[str],
    won_stages: set[str],
    source_names: Mapping[str, str],
) -> Funnel:
    rows: dict[str, FunnelRow] = {}
    funnel = Funnel(since, until)

    def row(source: str | None) -> FunnelRow:
        name = source_names.get(source or "", source or "") or "unknown source"
        return rows.setdefault(name, FunnelRow(name))

    dms_leads: set[str] = set()
    booked_leads: set[str] = set()
    for deal in deals:
        if deal.dms:
            funnel.dms_excluded += 1
            if deal.lead_id:
                dms_leads.add(deal.lead_id)
            continue
        if deal.lead_id and deal.lead_id in leads:
            target = row(leads[deal.lead_id])
            booked_leads.add(deal.lead_id)
        elif deal.lead_id:
            target = row(deal.source)  # a lead from before the window: counted as its own entry
            target.entries += 1
        else:
            target = rows.setdefault(NO_LEAD, FunnelRow(NO_LEAD))
            target.entries += 1
        target.booked += 1
        target.visited += deal.stage in visited_stages or deal.stage in won_stages
        target.won += deal.stage in won_stages
    for lead_id, source in leads.items():
        if lead_id not in dms_leads:
            row(source).entries += 1
    funnel.rows = sorted(rows.values(), key=lambda r: (-r.entries, r.source))
    return funnel


def _stage_sets(config: ClinicConfig, crm: CrmDiscovery) -> tuple[set[str], set[str]]:
    visited = {p.stages[s] for p in config.crm.pipelines.values() for s in (S.ARRIVED, S.COMPLETED)}
    won = {s.id for p in crm.pipelines for s in p.stages if s.semantics == "won"}
    return visited, won


def _bitrix_list(client: Bitrix24Client, method: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    start: int | None = 0
    while start is not None:
        body = client.call(method, {**params, "start": start})
        rows += [r for r in body.get("result") or [] if isinstance(r, dict)]
        start = int(body["next"]) if body.get("next") else None
    return rows


def bitrix24_funnel(
    client: Bitrix24Client, config: ClinicConfig, days: int = 30, now: datetime | None = None
) -> Funnel:
    until = now or datetime.now(UTC)
    since = until - timedelta(days=days)
    crm = discover_crm(client)
    since_text = since.astimezone(config.tz).isoformat(timespec="seconds")
    leads = {
        str(r["ID"]): str(r.get("SOURCE_ID") or "")
        for r in _bitrix_list(
            client, "crm.lead.list", {"filter": {">=DATE_CREATE": since_text}, "select": ["ID", "SOURCE_ID"]}
        )
    }
    mapped = config.fields.crm_field("deal", "is_dms")
    dms_field = mapped.id if mapped else bitrix24_field_name("is_dms", {})
    rows = _bitrix_list(
        client,
        "crm.deal.list",
        {
            "filter": {"ORIGINATOR_ID": config.crm.originator_id, ">=DATE_CREATE": since_text},
            "select": ["ID", "LEAD_ID", "SOURCE_ID", "STAGE_ID", dms_field],
        },
    )
    deals = [
        _Deal(
            str(r["LEAD_ID"]) if r.get("LEAD_ID") else None,
            str(r.get("SOURCE_ID") or ""),
            str(r.get("STAGE_ID")),
            _truthy(r.get(dms_field)),
        )
        for r in rows
    ]
    sources = {
        str(r["STATUS_ID"]): str(r.get("NAME", ""))
        for r in _bitrix_list(client, "crm.status.list", {"filter": {"ENTITY_ID": "SOURCE"}})
    }
    visited, won = _stage_sets(config, crm)
    return build_funnel(since, until, leads, deals, visited, won, sources)


def _amo_value(row: Mapping[str, Any], field_id: str | None) -> str:
    for cf in row.get("custom_fields_values") or []:
        if field_id and str(cf.get("field_id")) == field_id:
            values = cf.get("values") or [{}]
            return str(values[0].get("value", ""))
    return ""


def amocrm_funnel(client: AmoCrmClient, config: ClinicConfig, days: int = 30, now: datetime | None = None) -> Funnel:
    until = now or datetime.now(UTC)
    since = until - timedelta(days=days)
    crm = discover_crm(client)
    names = {n: f.id for n in ("mis_appointment_id", "is_dms") if (f := config.fields.crm_field("deal", n))}
    source_field = next((f.key for f in crm.fields if f.entity == "deal" and "источник" in f.name.lower()), None)
    leads: dict[str, str] = {}
    deals: list[_Deal] = []
    for r in client.rows("/api/v4/leads", "leads", [("filter[created_at][from]", int(since.timestamp()))]):
        source = _amo_value(r, source_field)
        if _amo_value(r, names.get("mis_appointment_id")):
            deals.append(_Deal(None, source, str(r.get("status_id")), _truthy(_amo_value(r, names.get("is_dms")))))
        else:
            leads[str(r["id"])] = source
    visited, won = _stage_sets(config, crm)
    # amoCRM books on the lead itself: a booked lead is its own entry, counted with its source.
    funnel = build_funnel(since, until, leads, [_Deal(None, d.source, d.stage, d.dms) for d in deals], visited, won, {})
    for row in funnel.rows:
        if row.source == NO_LEAD:
            row.source = "booked leads without a source"
    return funnel


def crm_funnel(client: Bitrix24Client | AmoCrmClient, config: ClinicConfig, days: int = 30) -> Funnel:
    if isinstance(client, Bitrix24Client):
        return bitrix24_funnel(client, config, days)
    return amocrm_funnel(client, config, days)
