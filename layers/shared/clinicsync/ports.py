"""Ports: what the domain needs from a MIS, a CRM and the store, independent of any vendor.

The CRM port is shaped for batching: look-ups and writes take whole lists so an adapter can pack
them into as few requests as its API allows (Bitrix24 ``batch`` of 50, amoCRM bulk of 50).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from clinicsync.models import PatientChanges
from clinicsync.state import PatientState

Cursor = Mapping[str, Any]


# --- MIS -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChangePage:
    """One read from a MIS feed.

    ``cursor`` is opaque to the poller: an updated-since watermark, the ids of an acknowledged
    change queue, or a date window with its content hashes. ``more`` says the feed has more now.
    """

    changes: Sequence[PatientChanges]
    cursor: Cursor
    more: bool = False
    rejected: int = 0  # records the adapter could not translate (reported, never guessed)


class MisSource(Protocol):
    kind: str

    def fetch_changes(self, cursor: Cursor | None) -> ChangePage: ...

    def resync_cursor(self, window_seconds: int, now: float) -> Cursor:
        """A cursor that re-reads the last ``window_seconds`` in full (deep resync repairs drift)."""
        ...

    def acknowledge(self, page: ChangePage) -> None:
        """Called once the page's changes are safely enqueued (change-queue feeds confirm here)."""
        ...


# --- CRM -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DealMatch:
    deal_id: str
    category_id: str
    stage: str
    closed: bool


@dataclass(frozen=True)
class CrmMatches:
    """What the CRM already holds for the MIS ids we asked about."""

    contacts: Mapping[str, str] = field(default_factory=dict)  # patient mis id -> contact id
    deals: Mapping[str, DealMatch] = field(default_factory=dict)  # appointment mis id -> deal


@dataclass(frozen=True)
class ContactWrite:
    patient_id: str
    contact_id: str | None  # None: create
    fields: Mapping[str, Any]
    previous_phone: str | None = None  # lets an adapter replace, not append, a changed phone


@dataclass(frozen=True)
class DealWrite:
    appointment_id: str
    patient_id: str
    deal_id: str | None  # None: create
    category_id: str
    stage: str | None  # None: leave the stage as it is
    fields: Mapping[str, Any]
    contact_id: str | None = None  # known contact; None means "the contact written in this plan"


CrmWrite = ContactWrite | DealWrite


@dataclass
class WriteOutcome:
    contact_ids: dict[str, str] = field(default_factory=dict)  # patient id -> contact id
    deal_ids: dict[str, str] = field(default_factory=dict)  # appointment id -> deal id
    failed: dict[str, str] = field(default_factory=dict)  # patient id -> reason (no PII)


class CrmGateway(Protocol):
    kind: str

    def find_by_mis_ids(self, patient_ids: Sequence[str], appointment_ids: Sequence[str]) -> CrmMatches: ...

    def apply(self, writes: Sequence[CrmWrite]) -> WriteOutcome: ...

    def requests_made(self) -> int: ...


# --- Store -----------------------------------------------------------------------------------------

ConsentSource = Literal["mis", "crm", "link", "mailchimp"]


class StateStore(Protocol):
    def load_patients(self, patient_ids: Sequence[str]) -> dict[str, PatientState]: ...

    def save_patient(self, state: PatientState, changed_appointments: Sequence[str]) -> None: ...

    def delete_patient(self, patient_id: str) -> None: ...

    def get_cursor(self, source: str) -> Cursor | None: ...

    def put_cursor(self, source: str, cursor: Cursor) -> None: ...

    def index_phone(self, phone_key: str, patient_id: str, previous_key: str | None) -> None: ...

    def patients_by_phone(self, phone_key: str) -> list[str]: ...

    def record_opt_outs(self, subject: str, channels: Sequence[str], source: ConsentSource, at: int) -> None: ...

    def opted_out(self, subject: str) -> set[str]: ...
