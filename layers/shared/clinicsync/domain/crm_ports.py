"""The CRM port: what the use cases need from a CRM, independent of any vendor (the MIS's: ``ports``).

It is shaped for batching: look-ups and writes take whole lists so an adapter can pack them into as few
requests as its API allows (Bitrix24 ``batch`` of 50, amoCRM bulk of 50). Apart from ``ports`` so that a
handler that never talks to a CRM (the poller's polls, the unsubscribe pages) does not build its types.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from clinicsync.domain.config import Pipeline


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
    # Numbers not looked up yet: their look-up rides in the first write request (``LookupInWrites``), and
    # the patients who have them are planned when it has answered.
    deferred_phones: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ContactWrite:
    patient_id: str
    contact_id: str | None  # None: create
    fields: Mapping[str, Any]
    # On update, PHONE/EMAIL are multifields: a changed value edits our entry by its id (or is appended).
    changed_multifields: frozenset[str] = frozenset()  # {"phone", "email"}
    multifield_ids: Mapping[str, str] = field(default_factory=dict)  # {"phone": entry id}
    expect_ours: bool = False  # write only if we are still its last modifier (``guards_writes``)


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
    expect_stage: str | None = None  # write only if the deal is open at this stage or at ``stage``
    # The deal is not this visit's in our table (a re-booking continues another visit's deal, a deal adopted
    # by phone or found by MIS id): like a create, the write puts the visit's id where our table does not
    # know it, so an intent is noted before it and a lost response is looked up by MIS id on the retry.
    new_to_visit: bool = False


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


def missing_stages(name: str, pipeline: Pipeline, known: Collection[str], stage_word: str) -> list[str]:
    """What the start-up check says of each stage the clinic config maps in ``pipeline`` that the CRM's
    funnel (its ids in ``known``) does not have; ``stage_word`` is the CRM's name for a stage."""
    return [
        f"pipeline {name!r} maps {status.value} to {stage_word} {stage!r}, which pipeline "
        f"{pipeline.category_id} does not have (known: {', '.join(sorted(known))})"
        for status, stage in sorted(pipeline.stages.items())
        if stage not in known
    ]


# A guarded write found its record changed since we wrote it (none of the patient's creates ran): read, plan again.
CHANGED_SINCE_READ = "changed_since_read"


@dataclass
class WriteOutcome:
    contact_ids: dict[str, str] = field(default_factory=dict)  # patient id -> contact id
    deal_ids: dict[str, str] = field(default_factory=dict)  # appointment id -> deal id
    failed: dict[str, str] = field(default_factory=dict)  # patient id -> reason (no PII)

    def merge(self, more: WriteOutcome) -> None:
        self.contact_ids.update(more.contact_ids)
        self.deal_ids.update(more.deal_ids)
        self.failed.update(more.failed)


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
    # True when a look-up by MIS id costs requests of its own: the syncer then records create intents, and
    # looks up only ids with an intent (a lost response) or of a patient new to us (``sync_lookup``).
    lookups_need_intents: bool
    # True when ``apply`` checks ``expect_ours``/``expect_stage`` in the write's own request: no read first.
    guards_writes: bool

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


@runtime_checkable
class LookupInWrites(Protocol):
    """A gateway that can send the tail of a look-up in the first write request instead of a part-filled
    request of its own (Bitrix24: the findbycomm commands past the look-up's last full ``batch``)."""

    def find_deferring_phones(
        self,
        patient_ids: Sequence[str],
        appointment_ids: Sequence[str],
        phones: Sequence[str],
        multifield_contacts: Sequence[str],
        intended_since: int | None,
    ) -> CrmMatches:
        """``find``, except that numbers whose look-up would only part-fill a last request are left out and
        named in ``deferred_phones`` (everything by MIS id is always looked up here)."""
        ...

    def apply_then(
        self,
        writes: Sequence[CrmWrite],
        matches: CrmMatches,
        more: Callable[[CrmMatches | None], Sequence[CrmWrite]],
    ) -> WriteOutcome:
        """``apply(writes)`` with the look-up of ``matches.deferred_phones`` in its first request; when that
        has answered, ``more`` gets the matches completed (None if the look-up failed) and returns the writes
        of the patients it held back, which are applied in the same stream of batches."""
        ...


@runtime_checkable
class VerifiesInLookUp(Protocol):
    def verify_in_look_up(self, pipelines: Mapping[Any, Pipeline]) -> Callable[[], frozenset[str]]:
        """``verify_pipelines`` with its reads carried by the gateway's next look-up (a container's first
        sync pays no request of its own for them); call the result for the won/lost stages."""
        ...
