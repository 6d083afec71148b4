"""Mailchimp's audience webhooks as they arrive: a PHP-style form (``type``, ``data[email]``, ...)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from clinicsync.adapters.http.forms import parse_php_form
from clinicsync.domain.audience import AudienceEvent


class _Data(BaseModel):
    model_config = ConfigDict(extra="ignore")
    list_id: str = Field(min_length=1, max_length=64)


class UnsubscribeData(_Data):
    email: str = Field(min_length=3, max_length=254, pattern=r"@")
    action: str = Field(default="unsub", max_length=16)
    reason: str = Field(default="manual", max_length=32)


class CleanedData(_Data):
    email: str = Field(min_length=3, max_length=254, pattern=r"@")
    reason: str = Field(default="hard", max_length=32)


class UpemailData(_Data):
    old_email: str = Field(min_length=3, max_length=254, pattern=r"@")
    new_email: str = Field(min_length=3, max_length=254, pattern=r"@")


class ProfileData(_Data):
    email: str = Field(min_length=3, max_length=254, pattern=r"@")


class MailchimpEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["unsubscribe", "cleaned", "upemail", "profile", "subscribe", "campaign"]
    fired_at: str = Field(default="", max_length=32)
    data: dict[str, Any]


def parse_event(body: bytes) -> AudienceEvent:
    """Raises FormError for a body that is not a form, ValidationError for an event we cannot read.
    Subscribes and campaigns are not read further: nothing about them matters to consent."""
    event = MailchimpEvent.model_validate(parse_php_form(body))
    if event.type in ("subscribe", "campaign"):
        return AudienceEvent(event.type)
    if event.type == "upemail":
        moved = UpemailData.model_validate(event.data)
        return AudienceEvent("upemail", moved.list_id, moved.old_email, moved.new_email)
    models: dict[str, type[UnsubscribeData | CleanedData | ProfileData]] = {
        "unsubscribe": UnsubscribeData,
        "cleaned": CleanedData,
        "profile": ProfileData,
    }
    read = models[event.type].model_validate(event.data)
    return AudienceEvent(event.type, read.list_id, read.email, reason=getattr(read, "reason", ""))
