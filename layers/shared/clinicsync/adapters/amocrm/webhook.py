"""amoCRM's webhooks as they arrive: a PHP-style form (``leads[status][0][id]``, ``account[id]``), several
entities per POST. ``ACTIONS`` is the one list of what the stack syncs: the receiver reads these and
``discovery`` registers ``EVENTS``, derived from it. ``add_contact`` is not among them (as Bitrix24's
ONCRMCONTACTADD): only the contact we created and mapped speaks for a patient's consent, and our own
creations come back as echoes, so a contact a manager adds can never change anything."""

from __future__ import annotations

from typing import Any, Literal

from clinicsync.domain.models import CrmEvent

# A new lead may belong to a known patient (adoption by phone).
ACTIONS: dict[tuple[str, str], Literal["deal", "lead", "contact"]] = {
    ("leads", "add"): "lead",
    ("leads", "update"): "deal",
    ("leads", "status"): "deal",
    ("contacts", "update"): "contact",
}


def event_name(group: str, action: str) -> str:
    """amoCRM's name for a webhook event, as its settings list it (``status_lead``)."""
    return f"{action}_{group.rstrip('s')}"


EVENTS = tuple(event_name(group, action) for group, action in ACTIONS)


def account_id(form: dict[str, Any]) -> str:
    account = form.get("account")
    return str((account.get("id") if isinstance(account, dict) else None) or "")


def crm_events(form: dict[str, Any], received_at: int) -> list[CrmEvent]:
    """Every event of the POST; ValueError when an entry is not a list of entities with numeric ids."""
    events: list[CrmEvent] = []
    for (group, action), entity in ACTIONS.items():
        items = form.get(group, {}).get(action, {}) if isinstance(form.get(group), dict) else {}
        if not isinstance(items, dict):
            raise ValueError(f"{group}[{action}] is not a list of entities")
        for item in items.values():
            crm_id = item.get("id") if isinstance(item, dict) else None
            if not isinstance(crm_id, str) or not (crm_id.isascii() and crm_id.isdigit()):
                raise ValueError(f"{group}[{action}] item without a numeric id")
            event = event_name(group, action)
            events.append(CrmEvent(crm="amocrm", event=event, entity=entity, crm_id=crm_id, received_at=received_at))
    return events
