"""Bitrix24's outbound events as they arrive: a PHP-style form (``event``, ``data[FIELDS][ID]``, ``auth[...]``).

``EVENTS`` is the one list of events the stack understands: the receiver queues these and nothing else, and
``discovery`` binds exactly these. ONCRMCONTACTADD is not among them: only a contact we created and mapped
speaks for a patient's consent, and our own creations come back as echoes, so a contact a manager adds
can never change anything; queueing it would only spend the portal's request budget on re-fetches.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from clinicsync.adapters.http.forms import parse_php_form
from clinicsync.domain.models import CrmEvent

Entity = Literal["deal", "lead", "contact"]

EVENTS: dict[str, Entity] = {
    "ONCRMDEALADD": "deal",
    "ONCRMDEALUPDATE": "deal",
    "ONCRMLEADADD": "lead",
    "ONCRMLEADUPDATE": "lead",
    "ONCRMCONTACTUPDATE": "contact",
}


class Bitrix24Auth(BaseModel):
    model_config = ConfigDict(extra="ignore")
    application_token: str = Field(min_length=1, max_length=256)
    member_id: str = Field(min_length=1, max_length=256)


class Bitrix24Fields(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ID: str = Field(pattern=r"^[0-9]{1,18}$")


class Bitrix24Data(BaseModel):
    model_config = ConfigDict(extra="ignore")
    FIELDS: Bitrix24Fields


class Bitrix24Event(BaseModel):
    """An outbound Bitrix24 event: the event name, the changed entity's ID, and the portal's auth."""

    model_config = ConfigDict(extra="ignore")
    event: str = Field(min_length=1, max_length=64)
    data: Bitrix24Data
    auth: Bitrix24Auth

    def crm_events(self, received_at: int) -> list[CrmEvent]:
        """The event to queue; none for an event we do not sync."""
        name = self.event.upper()
        entity = EVENTS.get(name)
        if entity is None:
            return []
        return [
            CrmEvent(crm="bitrix24", event=name, entity=entity, crm_id=self.data.FIELDS.ID, received_at=received_at)
        ]


def parse_event(body: bytes) -> Bitrix24Event:
    """Raises FormError for a body that is not a form, ValidationError for a form that is not an event."""
    return Bitrix24Event.model_validate(parse_php_form(body))
