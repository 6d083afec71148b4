"""IDENT tickets from Bitrix24: the window's open leads as the domain's ``OpenLead``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from clinicsync.adapters.bitrix24.client import PAGE_SIZE, Command
from clinicsync.domain.crm_ports import OpenLead
from clinicsync.domain.phones import normalise_phone

UTM_FIELDS = ("UTM_SOURCE", "UTM_MEDIUM", "UTM_CAMPAIGN", "UTM_TERM", "UTM_CONTENT")
TICKET_SELECT = [
    "ID", "DATE_CREATE", "TITLE", "NAME", "LAST_NAME", "SECOND_NAME", "PHONE", "EMAIL", "COMMENTS",
    "SOURCE_DESCRIPTION", *UTM_FIELDS,
]  # fmt: skip


def open_lead_pages(
    statuses: Sequence[str], created_from: datetime, created_to: datetime, limit: int, offset: int
) -> tuple[dict[str, Command], int]:
    """The ``crm.lead.list`` pages holding the window's open leads from ``offset`` on, ``limit`` of them, and
    how many rows of the first page come before ``offset``: Bitrix24 rounds ``start`` down to a multiple of 50."""
    params: dict[str, Any] = {
        "filter": {
            ">=DATE_CREATE": created_from.isoformat(),
            "<=DATE_CREATE": created_to.isoformat(),
            "@STATUS_ID": list(statuses),
        },
        "select": TICKET_SELECT,
        "order": {"DATE_CREATE": "ASC", "ID": "ASC"},
    }
    first = offset // PAGE_SIZE * PAGE_SIZE
    skip = offset - first
    pages = -(-(skip + limit) // PAGE_SIZE)
    return {f"t{n}": ("crm.lead.list", {**params, "start": first + n * PAGE_SIZE}) for n in range(pages)}, skip


def open_lead(row: Mapping[str, Any], region: str) -> OpenLead:
    phones = [normalise_phone(str(p.get("VALUE", "")), region) for p in row.get("PHONE") or []]
    emails = [str(e.get("VALUE", "")).strip() for e in row.get("EMAIL") or []]
    name = " ".join(str(row.get(k) or "").strip() for k in ("LAST_NAME", "NAME", "SECOND_NAME")).strip()
    return OpenLead(
        crm_id=str(row["ID"]),
        created_at=datetime.fromisoformat(str(row["DATE_CREATE"])),
        phone=next((p for p in phones if p), None),
        email=next((e for e in emails if e), None),
        full_name=name or None,
        # A CRM form's lead carries the form in SOURCE_DESCRIPTION; otherwise the lead's title.
        form_name=str(row.get("SOURCE_DESCRIPTION") or row.get("TITLE") or "") or None,
        comment=str(row.get("COMMENTS") or "") or None,
        utm={k.removeprefix("UTM_").lower(): str(row[k]) for k in UTM_FIELDS if row.get(k)},
    )
