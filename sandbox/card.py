"""One synced card, read back through the CRM's own API: every field of a contact and of its deals, with
each field's CRM type (the demo prints it for the InfoClinica→amoCRM case C and the IDENT→Bitrix24 case B)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import httpx
from rich.table import Table

from clinicsync.adapters.bitrix24.client import Bitrix24Client
from clinicsync_cli.connect import Credentials, bitrix24_client
from clinicsync_cli.discovery import create_bitrix24_fields, discover_crm

if TYPE_CHECKING:
    from sandbox.local import LocalClinic

CASE_C_OVERRIDES = {"fields.preset": "infoclinica_amocrm_case_c", "fields.contact": None, "fields.deal": None}
# Case B on the portal: the preset, with the portal's own words for the two choice fields.
CASE_B_OVERRIDES = {
    "fields.preset": "ident_bitrix24_case_b",
    "fields.contact": None,
    "fields.deal": None,
    "fields.crm_fields": {
        "contact": {"sex": {"id": "UF_CRM_CS_SEX", "type": "string", "values": {"m": "Мужской", "f": "Женский"}}},
        "deal": {
            "visit_type": {
                "id": "UF_CRM_CS_VISIT_TYPE",
                "type": "string",
                "values": {"primary": "Первичный", "repeat": "Повторный"},
            }
        },
    },
}
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


# --- Bitrix24 (case B) -----------------------------------------------------------------------------------


def bitrix24_rest(clinic: LocalClinic) -> Bitrix24Client:
    """The portal's REST API through an incoming webhook, as an admin's script or `clinicsync` reads it."""
    assert clinic.bitrix is not None
    return bitrix24_client(Credentials({"webhook_url": clinic.bitrix.webhook_url(clinic.crm_url)}), httpx.Client())


def create_case_fields(clinic: LocalClinic) -> list[str]:
    """What `clinicsync check --create-fields` does before the first sync: the config's UF_CRM_… fields,
    each with its type."""
    client = bitrix24_rest(clinic)
    return create_bitrix24_fields(client, clinic.config, discover_crm(client))


def case_b_patient(clinic: LocalClinic) -> int:
    """A card as case B describes it, made before the first import: the patient wrote in through the site
    (a Bitrix24 lead with its source), came for a DMS visit (price 0 and a policy on the card) and is
    booked again for a repeat visit at 15:30."""
    ident = clinic.ident
    patient = ident.add_client("Лебедева", "+7 916 555-77-31", name="Ольга", patronymic="Сергеевна")
    ident.edit_card(patient, CardNumber="004512", Comment="Боится анестезии, звонить после 18:00")
    clinic.crm.manager_create_inquiry("+7 916 555-77-31")
    dms = ident.book(patient, ident.at(-2, "10:00"), doctor_id=12, price="0.00", insurance_policy="ДМС 7700 000123")
    ident.complete(dms)
    ident.book(patient, ident.at(5, "15:30"))
    return patient


def bitrix24_card(clinic: LocalClinic, patient_id: int) -> Table:
    """The patient's contact and deals, read through crm.contact.list / crm.deal.list, with field types."""
    client = bitrix24_rest(clinic)
    types = {
        entity: {
            str(f["FIELD_NAME"]): str(f["USER_TYPE_ID"]) for f in client.call(f"crm.{entity}.userfield.list")["result"]
        }
        for entity in ("contact", "deal")
    }
    origin = {"ORIGINATOR_ID": clinic.config.crm.originator_id, "ORIGIN_ID": str(patient_id)}
    [contact] = client.call("crm.contact.list", {"filter": origin, "select": ["*", "UF_*", "PHONE"]})["result"]
    deals = client.call(
        "crm.deal.list", {"filter": {"CONTACT_ID": contact["ID"]}, "select": ["*", "UF_*"], "order": {"ID": "ASC"}}
    )["result"]
    table = Table(title=f"One synced card, read through Bitrix24's REST API (contact {contact['ID']})")
    for column in ("Entity", "Bitrix24 field", "Type", "Value"):
        table.add_column(column)
    phones = ", ".join(str(p.get("VALUE")) for p in contact.get("PHONE") or [])
    for name, value in (
        (
            "LAST_NAME NAME SECOND_NAME",
            " ".join(str(contact.get(k) or "") for k in ("LAST_NAME", "NAME", "SECOND_NAME")),
        ),
        ("PHONE", phones),
        ("BIRTHDATE", contact.get("BIRTHDATE")),
    ):
        table.add_row("contact", name, "native", str(value or ""))
    for name, field_type in sorted(types["contact"].items()):
        table.add_row("contact", name, field_type, _shown(contact.get(name)))
    for deal in deals:
        entity = f"deal {deal['ID']}"
        for name in ("TITLE", "BEGINDATE", "CATEGORY_ID", "STAGE_ID", "LEAD_ID", "SOURCE_ID"):
            table.add_row(entity, name, "native", _shown(deal.get(name)))
        for name, field_type in sorted(types["deal"].items()):
            table.add_row(entity, name, field_type, _shown(deal.get(name)))
    return table


def _shown(value: Any) -> str:
    return "—" if value in (None, "", []) else str(value)
