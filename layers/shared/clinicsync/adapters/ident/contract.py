"""IDENT (dental MIS): its inverted HTTP contract, and the connector's change batches.

IDENT exports no appointments over HTTP. It is the HTTP *client*: it pulls tickets (requests for an
appointment) from us with ``GET /GetTickets`` and pushes its timetable with ``POST /PostTimeTable``,
sending the ``IDENT-Integration-Key`` header. Appointments reach us from a connector at the clinic that
reads IDENT's SQL Server tables and pushes signed batches of canonical change sets; the receiver puts
each batch on the IDENT inbox queue, and ``ident_source.IdentSource`` (the poller's ``MisSource``) reads
it. This module is the wire contract only (pydantic, no AWS), so the connector at the clinic shares it.

Shapes follow the public servers that implement IDENT's contract (``../shared/reference`` §1.1):
tickets ``Id, DateAndTime, ClientPhone, ClientEmail, ClientFullName, FormName, Comment, PlanStart,
Utm*, HttpReferer``; timetable ``Doctors[{Id,Name}], Branches[{Id,Name}], Intervals[{DoctorId,
BranchId, StartDateTime, LengthInMinutes, IsBusy}]``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field

from clinicsync.domain.crm_ports import OpenLead
from clinicsync.domain.models import PatientChanges

KEY_HEADER = "IDENT-Integration-Key"
# IDENT's shared key guards patients' leads: at least 32 random bytes as url-safe text (secrets.token_urlsafe(32)).
INTEGRATION_KEY_MIN_CHARS = 43
_KEY_MIN_DISTINCT = 16  # a long run of few characters is not random


def weak_integration_key(key: object) -> str | None:
    """Why ``key`` is too weak to serve IDENT with, or None when it is strong enough (the reason names no value)."""
    text = key if isinstance(key, str) else ""
    if len(text) < INTEGRATION_KEY_MIN_CHARS:
        return f"integration_key must be at least {INTEGRATION_KEY_MIN_CHARS} characters (secrets.token_urlsafe(32))"
    if len(set(text)) < _KEY_MIN_DISTINCT:
        return "integration_key is not random enough (secrets.token_urlsafe(32))"
    return None


MAX_TICKETS_PER_CALL = 500  # IDENT asks for 500; public servers cap at 500-1000

# ISO 8601 with a UTC offset, as IDENT sends it: "+03:00", "+0300", "Z", or a "+" that arrived as a
# space because the caller did not URL-encode it. Up to 7 fractional digits (.NET ticks).
_IDENT_DATETIME = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})[T ](?P<time>\d{2}:\d{2}(?::\d{2})?)(?:[.,](?P<frac>\d{1,7}))?"
    r"\s*(?P<offset>Z|[+\- ]\d{2}:?\d{2})$"
)


def parse_ident_datetime(raw: str) -> datetime:
    """An aware datetime from IDENT's query string; a value without an offset is refused, not guessed."""
    match = _IDENT_DATETIME.match(raw.strip()) if len(raw) <= 48 else None
    if match is None:
        raise ValueError(f"not an ISO 8601 date-time with a UTC offset: {raw[:48]!r}")
    offset = match["offset"]
    if offset == "Z":
        offset = "+00:00"
    else:
        sign = "-" if offset[0] == "-" else "+"
        digits = offset[1:].replace(":", "")
        offset = f"{sign}{digits[:2]}:{digits[2:]}"
    hh_mm_ss = match["time"] if match["time"].count(":") == 2 else match["time"] + ":00"
    frac = f".{match['frac'][:6]:0<6}" if match["frac"] else ""
    try:
        return datetime.fromisoformat(f"{match['date']}T{hh_mm_ss}{frac}{offset}")
    except ValueError as exc:  # e.g. month 13, or an offset beyond ±24h
        raise ValueError(f"not a valid date-time: {raw[:48]!r}") from exc


# --- GET /GetTickets ------------------------------------------------------------------------------


class Ticket(BaseModel):
    """One IDENT ticket (заявка): a CRM lead that has no appointment yet. Only Id and DateAndTime are
    always present; IDENT shows the rest to the administrator who books the visit."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, serialize_by_alias=True)

    id: str = Field(alias="Id")
    date_and_time: AwareDatetime = Field(alias="DateAndTime")
    client_phone: str | None = Field(default=None, alias="ClientPhone")
    client_email: str | None = Field(default=None, alias="ClientEmail")
    client_full_name: str | None = Field(default=None, alias="ClientFullName")
    form_name: str | None = Field(default=None, alias="FormName")
    comment: str | None = Field(default=None, alias="Comment")
    plan_start: AwareDatetime | None = Field(default=None, alias="PlanStart")
    utm_source: str | None = Field(default=None, alias="UtmSource")
    utm_medium: str | None = Field(default=None, alias="UtmMedium")
    utm_campaign: str | None = Field(default=None, alias="UtmCampaign")
    utm_term: str | None = Field(default=None, alias="UtmTerm")
    utm_content: str | None = Field(default=None, alias="UtmContent")
    http_referer: str | None = Field(default=None, alias="HttpReferer")


class TicketQuery(BaseModel):
    """GetTickets' query string: a window of lead creation times and a page of it."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    date_time_from: Annotated[datetime, BeforeValidator(parse_ident_datetime)] = Field(alias="dateTimeFrom")
    date_time_to: Annotated[datetime, BeforeValidator(parse_ident_datetime)] = Field(alias="dateTimeTo")
    limit: int = Field(default=MAX_TICKETS_PER_CALL, ge=1, le=MAX_TICKETS_PER_CALL)
    offset: int = Field(default=0, ge=0, le=1_000_000)


# --- POST /PostTimeTable --------------------------------------------------------------------------

IdentId = Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, int) and not isinstance(v, bool) else v)]


class NamedItem(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    Id: IdentId = Field(min_length=1, max_length=64)
    Name: str = Field(default="", max_length=512)


class Interval(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    DoctorId: IdentId = Field(min_length=1, max_length=64)
    BranchId: IdentId | None = None
    StartDateTime: datetime
    LengthInMinutes: int = Field(ge=0, le=24 * 60)
    IsBusy: bool = False


class TimeTable(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    Doctors: tuple[NamedItem, ...] = Field(default=(), max_length=10_000)
    Branches: tuple[NamedItem, ...] = Field(default=(), max_length=1_000)
    Intervals: tuple[Interval, ...] = Field(default=(), max_length=200_000)


# --- the connector's batches ----------------------------------------------------------------------


class ConnectorBatch(BaseModel):
    """What the connector pushes: canonical change sets, already filtered at the clinic.

    ``batch_id`` is the connector's (cursor position + content hash), so a re-sent batch is recognisable;
    re-applying one is harmless anyway because every record carries its IDENT ``DateTimeChanged`` version.
    """

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    batch_id: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")
    connector_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    produced_at: AwareDatetime
    changes: tuple[PatientChanges, ...] = Field(min_length=1, max_length=500)
    rejected: int = Field(default=0, ge=0)


MAX_BATCH_BYTES = 240_000  # one SQS message (256 KiB) with room for attributes


def directory_names(items: Sequence[NamedItem]) -> dict[str, str]:
    return {item.Id: item.Name for item in items if item.Name}


class BatchTooLarge(ValueError):
    pass


def parse_connector_batch(body: bytes) -> ConnectorBatch:
    """A connector batch from its request body; raises ``BatchTooLarge`` or pydantic's ``ValidationError``."""
    if len(body) > MAX_BATCH_BYTES:
        raise BatchTooLarge(f"batch is {len(body)} bytes; the limit is {MAX_BATCH_BYTES}, send smaller batches")
    return ConnectorBatch.model_validate_json(body)


def tickets_of(leads: Sequence[OpenLead]) -> list[Ticket]:
    """Open CRM leads as IDENT's tickets."""
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
