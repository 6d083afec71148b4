"""Ports: what the use cases need from a MIS, a CRM and the store, independent of any vendor.

The CRM port is shaped for batching: look-ups and writes take whole lists so an adapter can pack
them into as few requests as its API allows (Bitrix24 ``batch`` of 50, amoCRM bulk of 50).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from clinicsync.domain.audience import MemberBook
from clinicsync.domain.config import Pipeline
from clinicsync.domain.models import PatientChanges
from clinicsync.domain.state import PatientState

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
class PhoneCandidates:
    """Open CRM records that carry a phone, found before creating a new patient's contact.

    Ids only; a contact's ``owner`` is the MIS id it already belongs to (ORIGIN_ID), if any.
    """

    leads: tuple[str, ...] = ()  # open leads in an adoptable status, oldest first
    contacts: tuple[tuple[str, str | None], ...] = ()  # (contact id, owner)
    deals: tuple[tuple[str, str, str], ...] = ()  # (deal id, category id, stage): open, unowned, adoptable
    lead_sources: Mapping[str, str] = field(default_factory=dict)  # lead id -> its SOURCE_ID (Bitrix24)


@dataclass(frozen=True)
class CrmMatches:
    """What the CRM already holds for the MIS ids, phones and contacts we asked about."""

    contacts: Mapping[str, str] = field(default_factory=dict)  # patient mis id -> contact id
    deals: Mapping[str, DealMatch] = field(default_factory=dict)  # appointment mis id -> deal
    phones: Mapping[str, PhoneCandidates] = field(default_factory=dict)  # E.164 -> candidates
    multifields: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # contact -> {PHONE: entry id}


@dataclass(frozen=True)
class ContactWrite:
    patient_id: str
    contact_id: str | None  # None: create
    fields: Mapping[str, Any]
    # On update, PHONE/EMAIL are multifields: a changed value edits our entry by its id (or is appended).
    changed_multifields: frozenset[str] = frozenset()  # {"phone", "email"}
    multifield_ids: Mapping[str, str] = field(default_factory=dict)  # {"phone": entry id}


@dataclass(frozen=True)
class DealWrite:
    appointment_id: str
    patient_id: str
    deal_id: str | None  # None: create
    category_id: str
    stage: str | None  # None: leave the stage as it is
    fields: Mapping[str, Any]
    contact_id: str | None = None  # known contact; None means "the contact written in this plan"
    lead_id: str | None = None  # the lead this deal grew from (adoption keeps the lead's origin)
    link_contact: bool = False  # an adopted deal is linked to the patient's contact
    lead_source: str | None = None  # the adopted lead's source, copied once with lead_id (Bitrix24 SOURCE_ID)


@dataclass(frozen=True)
class LeadWrite:
    """Attach an open lead to the patient's contact (and close it as converted, when adopted)."""

    lead_id: str
    patient_id: str
    contact_id: str | None  # None means "the contact written in this plan"
    convert: bool


CrmWrite = ContactWrite | DealWrite | LeadWrite


class CrmPaused(Exception):
    """The CRM refused a request whole until ``until`` (epoch seconds): nothing ran, so a later retry is safe."""

    def __init__(self, message: str, until: float) -> None:
        super().__init__(message)
        self.until = until


class CrmUnavailable(Exception):
    """The CRM kept failing requests that never ran (5xx, limits, timeouts) until retries ran out: a later
    retry is safe, but this run cannot finish."""


class PipelineMismatch(Exception):
    """The clinic config names stages the CRM does not have (checked at start-up)."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


@dataclass
class WriteOutcome:
    contact_ids: dict[str, str] = field(default_factory=dict)  # patient id -> contact id
    deal_ids: dict[str, str] = field(default_factory=dict)  # appointment id -> deal id
    failed: dict[str, str] = field(default_factory=dict)  # patient id -> reason (no PII)


@dataclass(frozen=True)
class OpenLead:
    """A CRM lead that has no appointment yet, as an IDENT ticket shows it to the front desk.

    It carries PII on purpose (IDENT needs it to book the visit); it is served, never logged or stored.
    """

    crm_id: str
    created_at: datetime
    phone: str | None = None
    email: str | None = None
    full_name: str | None = None
    form_name: str | None = None
    comment: str | None = None
    utm: Mapping[str, str] = field(default_factory=dict)  # source, medium, campaign, term, content
    referer: str | None = None


class CrmGateway(Protocol):
    kind: str
    # True when a look-up by MIS id costs a request per id (amoCRM): the syncer then records create
    # intents, and only ids with an intent (an earlier attempt whose response may be lost) are looked up.
    lookups_need_intents: bool

    def find(
        self,
        patient_ids: Sequence[str],
        appointment_ids: Sequence[str],
        phones: Sequence[str] = (),
        multifield_contacts: Sequence[str] = (),
        intended_since: int | None = None,
    ) -> CrmMatches:
        """One look-up for a whole plan: records by MIS id, open records by phone (for adoption),
        and the PHONE/EMAIL entry ids of contacts whose phone or e-mail changed. ``intended_since`` is
        the earliest recorded create intent among the ids (None: no create was ever attempted)."""
        ...

    def apply(self, writes: Sequence[CrmWrite]) -> WriteOutcome: ...

    def requests_made(self) -> int: ...

    def verify_pipelines(self, pipelines: Mapping[Any, Pipeline]) -> frozenset[str]:
        """Raise PipelineMismatch for stages the CRM lacks; return the CRM's closed (won/lost) stages."""
        ...

    def fetch(self, entity: str, crm_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        """Current non-PII fields of CRM records (re-fetch after a webhook), with the phone normalised."""
        ...

    def changed_since(self, entity: str, since: str, limit: int) -> list[dict[str, str]]:
        """Records changed after ``since`` by anyone but us (the catch-up for missed webhooks)."""
        ...

    def integration_user(self) -> str:
        """The CRM user our writes are made as: a change by this user is an echo of our own write."""
        ...

    def open_leads(self, created_from: datetime, created_to: datetime, limit: int, offset: int) -> list[OpenLead]:
        """Open leads (in an adoptable status, not ours) created in the window, oldest first, one page."""
        ...

    def contact_emails(self, contact_ids: Sequence[str]) -> dict[str, list[str]]:
        """The e-mail addresses of contacts, read in bulk, used in memory only (Mailchimp opt-outs)."""
        ...


class MisConsentWriter(Protocol):
    """Writes a patient's "do not send" flags into the MIS, where its API allows it."""

    writable_channels: frozenset[str]

    def write_opt_outs(self, patient_id: str, channels: Sequence[str]) -> None: ...


# --- Store -----------------------------------------------------------------------------------------

ConsentSource = Literal["mis", "crm", "link", "mailchimp"]


# One protocol per seam the use cases really have; ``adapters/aws`` implements each on the table
# (``DynamoStore`` composes them) and ``adapters/memory`` in memory. Both pass tests/adapters/test_store_contract.py.


class PatientStates(Protocol):
    """What we remember per patient (CRM ids, versions, hashes), never older over newer."""

    def load_patients(self, wanted: Mapping[str, Sequence[str]]) -> dict[str, PatientState]:
        """Each patient's state with the named appointments (patient id -> appointment ids)."""
        ...

    def save_patients(
        self, saves: Sequence[tuple[PatientState, Sequence[str]]], loaded: Mapping[str, PatientState]
    ) -> None:
        """Persist after the CRM accepted the writes; an item stored with a newer version is kept."""
        ...

    def delete_patient(self, patient_id: str) -> None: ...


class CrmIdMaps(Protocol):
    """Reverse maps written with the patient state: which patient (and visit) a CRM record is."""

    def patient_for_crm(self, entity: str, crm_id: str) -> dict[str, str] | None: ...


class CreateIntents(Protocol):
    """A create about to be sent: if its response is lost, the retry knows to look it up."""

    def write_intents(self, intent_keys: Sequence[str], at: int) -> None: ...

    def load_intents(self, intent_keys: Sequence[str]) -> dict[str, int]: ...

    def clear_intents(self, intent_keys: Sequence[str]) -> None: ...


class Cursors(Protocol):
    def get_cursor(self, source: str) -> Cursor | None: ...

    def put_cursor(self, source: str, cursor: Cursor) -> None: ...


class Leases(Protocol):
    """At most one holder per name; an expired lease is taken over, its owner may take it again."""

    def acquire_lease(self, name: str, owner: str, seconds: int, now: int) -> bool: ...

    def release_lease(self, name: str, owner: str) -> None: ...


class Claims(Protocol):
    """The syncer's claims: a patient written by one invocation at a time, a CRM record adopted once."""

    def claim_patients(self, patient_ids: Sequence[str], owner: str, now: int, seconds: int) -> set[str]:
        """The patients claimed; the rest are held by another live owner."""
        ...

    def release_claims(self, patient_ids: Sequence[str]) -> None: ...

    def claim_adoptions(self, claims: Mapping[str, str], now: int, seconds: int) -> set[str]:
        """Claim CRM records (key -> adopting appointment); returns the keys another appointment holds."""
        ...


class PhoneIndex(Protocol):
    """Phone key (keyed HMAC) -> patients: family members who share a phone see each other."""

    def index_phone(self, phone_key: str, patient_id: str, previous_key: str | None) -> None: ...

    def index_phones(self, entries: Sequence[tuple[str, str]]) -> None: ...

    def patients_by_phone(self, phone_key: str) -> list[str]: ...


class CrmPhoneBook(Protocol):
    """The CRM account's contacts by phone key (amoCRM cannot search phones), and how far it was read."""

    def crm_phone_index(self) -> tuple[int | None, dict[str, set[str]]]: ...

    def update_crm_phones(self, add: Sequence[tuple[str, str]], drop: Sequence[tuple[str, str]]) -> None: ...

    def advance_crm_phones(self, seen_to: int) -> None:
        """Forward only: a slower container never moves it back."""
        ...


class ConsentRecords(Protocol):
    """The consent ledger: opt-outs are sticky, only a newer MIS or CRM opt-in lifts one; each change audited."""

    def record_opt_outs(
        self, subject: str, channels: Sequence[str], source: ConsentSource, at: int, detail: str = ""
    ) -> list[str]:
        """The channels that changed (they need outputs)."""
        ...

    def record_opt_outs_many(
        self, opt_outs: Mapping[str, Sequence[str]], source: ConsentSource, at: int, detail: str = ""
    ) -> dict[str, list[str]]:
        """``record_opt_outs`` for many subjects (subject -> channels) in as few requests as the store allows;
        every subject asked about -> the channels that changed."""
        ...

    def record_opt_ins(
        self, subject: str, channels: Sequence[str], source: ConsentSource, at: int, detail: str = ""
    ) -> list[str]: ...

    def observe_crm_opt_ins(
        self, subject: str, contact_id: str, opt_ins: Sequence[str], at: int, held: Sequence[str] = ()
    ) -> list[str]:
        """The channels the mapped contact's opt-in field gained since it was last seen or written."""
        ...

    def opted_out_many(self, subjects: Sequence[str], channels: Sequence[str]) -> dict[str, set[str]]: ...

    def note_identity(self, subject: str, keys: Mapping[str, str | None]) -> None: ...

    def note_identities(self, identities: Mapping[str, Mapping[str, str | None]]) -> None:
        """``note_identity`` for many subjects (subject -> keys) in as few requests as the store allows."""
        ...


class ConsentOutputMarks(Protocol):
    """Per subject and output (crm, mis, mailchimp), the ledger digest it last reached."""

    def output_done(self, subject: str) -> dict[str, str]: ...

    def outputs_done_many(self, subjects: Sequence[str]) -> dict[str, dict[str, str]]:
        """``output_done`` for many subjects in one read (every subject asked about is in the answer)."""
        ...

    def mark_output(self, subject: str, target: str, digest: str) -> None: ...

    def mark_outputs(self, target: str, digests: Mapping[str, str]) -> None: ...

    def mark_outputs_many(self, marks: Mapping[str, Mapping[str, str]]) -> None:
        """Subject -> {target: digest}, every target of a subject in one update, few requests in all."""
        ...


class EmailIndex(Protocol):
    """E-mail key -> consent subjects: a Mailchimp event names an address, the ledger needs the person."""

    def index_emails(self, entries: Sequence[tuple[str, str]]) -> None: ...

    def subjects_by_email(self, email_key: str) -> list[str]: ...


class MemberStore(Protocol):
    """The Mailchimp members (subscriber hashes) a subject has had."""

    def mailchimp_members_many(self, subjects: Sequence[str]) -> dict[str, MemberBook]: ...

    def note_mailchimp_member(self, subject: str, member: str, moved_from: str | None = None) -> None: ...


# What each use case takes: the union of the seams it uses, nothing more.


class PollStore(Cursors, Leases, PhoneIndex, EmailIndex, Protocol): ...


class SyncLookupStore(CreateIntents, PhoneIndex, Protocol): ...


class SyncConsentStore(ConsentRecords, ConsentOutputMarks, MemberStore, Protocol): ...


class SyncStore(PatientStates, Claims, SyncLookupStore, SyncConsentStore, Protocol): ...


class CrmEventStore(CrmIdMaps, PhoneIndex, ConsentRecords, Protocol): ...


class LedgerStore(ConsentRecords, ConsentOutputMarks, EmailIndex, MemberStore, Protocol): ...


class ConsentOutputStore(PatientStates, ConsentRecords, ConsentOutputMarks, MemberStore, Protocol): ...


class Store(SyncStore, PollStore, CrmEventStore, LedgerStore, CrmPhoneBook, Protocol):
    """Every store port: what ``DynamoStore`` and ``MemoryStore`` implement."""
