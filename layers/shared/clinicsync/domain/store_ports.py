"""Ports of the store: what the use cases keep between runs, one protocol per seam they really have.

``adapters/aws`` implements each on the table (``DynamoStore`` composes them) and
``clinicsync_cli.memory_store`` in memory; both pass tests/adapters/test_store_contract.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

from clinicsync.domain.audience import MemberBook
from clinicsync.domain.state import PatientState

if TYPE_CHECKING:
    from clinicsync.domain.ports import Cursor

ConsentSource = Literal["mis", "crm", "link", "mailchimp"]


@dataclass
class ClaimRelease:
    """A sync's claims and the create intents it settled, to release with its last write if they fit."""

    patients: list[str]
    intents: list[str] = field(default_factory=list)
    done: bool = False  # released with the states: the caller must not release them again


class OptInsSeen(NamedTuple):
    """What an observation of a contact's opt-in field taught: the channels it gained, and when the field was
    last seen without them (None: the first sighting): a gain happened after that, whoever saved it."""

    gained: list[str]
    last_seen_at: int | None = None


class Claimed(set[str]):
    """The patients claimed. ``taken_over``: those whose claim another owner had left behind (it died with
    it, or could not store its failure's mark): that attempt may have written anything for them."""

    def __init__(self, claimed: Iterable[str] = (), taken_over: Iterable[str] = ()) -> None:
        super().__init__(claimed)
        self.taken_over = set(taken_over)


class PatientStates(Protocol):
    """What we remember per patient (CRM ids, versions, hashes), never older over newer."""

    def load_patients(self, wanted: Mapping[str, Sequence[str]]) -> dict[str, PatientState]:
        """Each patient's state with the named appointments (patient id -> appointment ids)."""
        ...

    def save_patients(
        self,
        saves: Sequence[tuple[PatientState, Sequence[str]]],
        loaded: Mapping[str, PatientState],
        release: ClaimRelease | None = None,
    ) -> None:
        """Persist after the CRM accepted the writes; an item stored with a newer version is kept. With
        ``release``, the claims and settled intents go in the same atomic write when they fit (then
        ``release.done``); never before a state they guard is stored."""
        ...

    def mark_unsure(self, patient_ids: Sequence[str]) -> None:
        """Raise each stored patient's ``write_epoch``, alone (an atomic add: nothing else of the state is
        written): its stored digests no longer prove what the CRM holds. A patient never stored has none."""
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


class PollLeases(Protocol):
    """A feed's poll: one at a time (a lease, as ``Leases``), reading and storing the feed's cursor.

    ``take_poll`` takes the lease, ``poll_cursor`` gives the stored cursor, ``store_poll_cursor`` stores
    a page's (only after the page is on the queue), ``release_poll`` lets the next poll in. A store may
    skip the read when the cursor it stored at its own last release is provably still the stored one.
    """

    def take_poll(self, source: str, owner: str, seconds: int, now: int) -> bool: ...

    def poll_cursor(self, source: str) -> Cursor | None: ...

    def store_poll_cursor(self, source: str, cursor: Cursor) -> None: ...

    def release_poll(self, source: str, owner: str) -> None: ...


class Claims(Protocol):
    """The syncer's claims: a patient written by one invocation at a time, a CRM record adopted once."""

    def claim_patients(self, patient_ids: Sequence[str], owner: str, now: int, seconds: int) -> Claimed:
        """The patients claimed; the rest are held by another live owner. A claim outlives its expiry
        until it is released or taken over, so a take-over is known (``Claimed.taken_over``)."""
        ...

    def release_claims(self, patient_ids: Sequence[str], settled_intents: Sequence[str] = ()) -> None:
        """Release the claims; with them, forget create intents whose records and states are stored
        (``CreateIntents.clear_intents``) in the same requests."""
        ...

    def claim_adoptions(self, claims: Mapping[str, str], now: int, seconds: int) -> set[str]:
        """Claim CRM records (key -> adopting appointment); returns the keys another appointment holds."""
        ...


class PhoneIndex(Protocol):
    """Phone key (keyed HMAC) -> patients: family members who share a phone see each other. The poll
    adds a page's entries (``PollIndexes.index_contacts``); a sync moves a patient's changed phone."""

    def index_phone(self, phone_key: str, patient_id: str, previous_key: str | None) -> None: ...

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
    ) -> OptInsSeen:
        """The channels the mapped contact's opt-in field gained since it was last seen or written."""
        ...

    def opted_out_many(self, subjects: Sequence[str], channels: Sequence[str]) -> dict[str, set[str]]: ...

    def channels_on_record(self, subject: str, channels: Sequence[str]) -> set[str]:
        """The channels the ledger holds anything for (an opt-out, lifted or not): never recorded = absent."""
        ...

    def channels_on_record_many(self, wanted: Mapping[str, Sequence[str]]) -> dict[str, set[str]]:
        """``channels_on_record`` for many subjects (subject -> channels) in one read; every subject is in it."""
        ...

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

    def note_mailchimp_address(self, subject: str, member: str) -> None:
        """The member at an address the subject has had, though not theirs in the audience (it was another
        member's when theirs should have moved onto it): listed, so an opt-out still reaches it."""
        ...


@dataclass
class SyncReads:
    """What a sync reads before it plans, answered together (``SyncReader``)."""

    states: dict[str, PatientState] = field(default_factory=dict)
    intents: dict[str, int] = field(default_factory=dict)
    opted_out: dict[str, set[str]] = field(default_factory=dict)
    on_record: dict[str, set[str]] = field(default_factory=dict)  # channels with any record, lifted or not


class SyncReader(Protocol):
    """A sync's reads of three seams in one pass: the table answers them in the same batched requests."""

    def read_for_sync(
        self,
        wanted: Mapping[str, Sequence[str]],
        intent_keys: Sequence[str],
        ledger: Mapping[str, Sequence[str]],
    ) -> SyncReads:
        """``load_patients(wanted)``, ``load_intents(intent_keys)`` and ``opted_out_many`` of each subject's
        channels (``ledger``: subject -> channels) at once, in as few requests as the store allows."""
        ...


# What each use case takes: the union of the seams it uses, nothing more.


class PollIndexes(PhoneIndex, EmailIndex, Protocol):
    def index_contacts(self, phones: Sequence[tuple[str, str]], emails: Sequence[tuple[str, str]]) -> None:
        """A poll page's (phone key, patient id) and (e-mail key, subject) entries, one request while they
        fit; the only way a batch of phone entries is added. Repeated entries are written once."""
        ...


class PollStore(PollLeases, PollIndexes, Protocol): ...


class SyncLookupStore(CreateIntents, PhoneIndex, Protocol): ...


class SyncConsentStore(ConsentRecords, ConsentOutputMarks, MemberStore, Protocol): ...


class SyncStore(PatientStates, Claims, SyncLookupStore, SyncConsentStore, SyncReader, Protocol): ...


class CrmEventStore(CrmIdMaps, PhoneIndex, ConsentRecords, Protocol): ...


class LedgerStore(ConsentRecords, ConsentOutputMarks, EmailIndex, MemberStore, Protocol): ...


class ConsentOutputStore(PatientStates, ConsentRecords, ConsentOutputMarks, MemberStore, Protocol): ...


class Store(SyncStore, PollStore, Cursors, Leases, CrmEventStore, LedgerStore, CrmPhoneBook, Protocol):
    """Every store port: what ``DynamoStore`` and ``MemoryStore`` implement."""
