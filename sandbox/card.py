"""One synced card, read back through amoCRM's own API: every field of a contact and of its deal, with
each field's CRM type (the demo prints it for the InfoClinica→amoCRM case)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx
from rich.table import Table

if TYPE_CHECKING:
    from sandbox.local import LocalClinic

CASE_C_OVERRIDES = {"fields.preset": "infoclinica_amocrm_case_c", "fields.contact": None, "fields.deal": None}
_DATES = {"date", "birthday", "date_time"}


def _get(clinic: LocalClinic, token: str, path: str, **params: Any) -> Any:
    response = httpx.get(f"{clinic.crm_url}{path}", params=params, headers={"Authorization": f"Bearer {token}"})
    response.raise_for_status()
    return response.json() if response.content else {}


def _labels(clinic: LocalClinic, token: str, entity: str) -> dict[int, tuple[str, str]]:
    rows = _get(clinic, token, f"/api/v4/{entity}/custom_fields", limit=250)["_embedded"]["custom_fields"]
    return {int(f["id"]): (str(f["name"]), str(f["type"])) for f in rows}


def _rows(
    clinic: LocalClinic, record: dict[str, Any], labels: dict[int, tuple[str, str]]
) -> list[tuple[str, str, str]]:
    out = []
    for field in record.get("custom_fields_values") or []:
        name, kind = labels.get(int(field["field_id"]), (str(field.get("field_name")), "?"))
        values = [v["value"] for v in field.get("values") or []]
        if kind in _DATES:
            shown = [datetime.fromtimestamp(int(v), clinic.config.tz).strftime("%d.%m.%Y %H:%M") for v in values]
        else:
            shown = [str(v) for v in values]
        out.append((name, kind, ", ".join(shown)))
    return out


def amocrm_card(clinic: LocalClinic) -> Table | None:
    """The contact with the most filled fields among those with a deal, and its latest deal."""
    if clinic.amocrm is None:
        return None
    token = str(clinic.amocrm.issue_tokens()["access_token"])
    contacts: list[dict[str, Any]] = []
    page = 1
    while (
        rows := (_get(clinic, token, "/api/v4/contacts", limit=250, page=page, **{"with": "leads"}) or {})
        .get("_embedded", {})
        .get("contacts")
    ):
        contacts += rows
        page += 1
    with_deals = [c for c in contacts if (c.get("_embedded") or {}).get("leads")]
    if not with_deals:
        return None
    contact = max(with_deals, key=lambda c: (len(c.get("custom_fields_values") or []), -int(c["id"])))
    lead_id = max(int(lead["id"]) for lead in contact["_embedded"]["leads"])
    lead = _get(clinic, token, f"/api/v4/leads/{lead_id}")
    table = Table(title=f"One synced card, read through amoCRM's API (contact {contact['id']}, lead {lead_id})")
    for column in ("Entity", "amoCRM field", "Type", "Value"):
        table.add_column(column)
    table.add_row("contact", "name", "native", str(contact.get("name")))
    for name, kind, value in _rows(clinic, contact, _labels(clinic, token, "contacts")):
        table.add_row("contact", name, kind, value)
    table.add_row("deal", "name", "native", str(lead.get("name")))
    table.add_row("deal", "price", "native", str(lead.get("price")))
    for name, kind, value in _rows(clinic, lead, _labels(clinic, token, "leads")):
        table.add_row("deal", name, kind, value)
    return table
