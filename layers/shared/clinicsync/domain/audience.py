"""A person's Mailchimp audience membership: the subscriber hash, the one-member-per-person rule and what
Mailchimp's audience webhook says. Plain data and rules: the ledger (``consent``), the audience sync
(``sync``, ``directory``) and the Mailchimp adapter all speak these types."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from clinicsync.domain.emails import lower_keeping_look_alikes
from clinicsync.domain.models import Channel

if TYPE_CHECKING:  # the port names MemberBook, defined here
    from clinicsync.domain.store_ports import MemberStore


@dataclass
class MemberBook:
    """A person's Mailchimp members by subscriber hash (MD5 of the address, what Mailchimp keys by)."""

    current: str | None = None
    moved: dict[str, str] = field(default_factory=dict)  # old hash -> the hash Mailchimp moved it to
    known: set[str] = field(default_factory=set)  # every hash the person ever had, moved ones included


# Mailchimp must stop mailing anyone who refused e-mail or marketing.
MAILCHIMP_CHANNELS = frozenset({Channel.EMAIL.value, Channel.MARKETING.value})


def is_subscriber_hash(value: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{32}", value) is not None


def subscriber_hash(email: str) -> str:
    """Mailchimp's member id: MD5 of the trimmed, lower-cased address (never stored by us). A look-alike
    character keeps its case (``str.lower()`` turns the Kelvin sign into ``k``, which would address the
    real person's member)."""
    return hashlib.md5(lower_keeping_look_alikes(email.strip()).encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class AudienceMember:
    """One person for an audience; the e-mail lives only in memory and in the request.

    ``member``: the subscriber hash to write when it is not the address's own (the person's member under
    another address). ``keep_address``: Mailchimp moved that member (``upemail``): only its merge fields
    are updated, the address the person chose stays. ``new``: the person has no member yet; only then is
    one created. A member the person has is only updated, so one Mailchimp moved before its ``upemail``
    webhook reached us (or deleted) is never re-created."""

    patient_id: str
    email: str
    merge_fields: Mapping[str, str]
    member: str | None = None
    keep_address: bool = False
    new: bool = True


def audience_member(
    patient_id: str, email: str, merge_fields: Mapping[str, str], book: MemberBook
) -> AudienceMember | None:
    """The one rule for the audience sync: a person has one member. An address Mailchimp moved away is
    never re-created (the person's current member gets the merge fields); an address the MIS changed
    moves the person's member to it (its status, an unsubscribe included, stays). Only a person without
    a member gets a new one: Mailchimp may move a member before its ``upemail`` webhook reaches us."""
    own = subscriber_hash(email)
    if own in book.moved:
        current = book.current if book.current != own else None
        return (
            AudienceMember(patient_id, email, merge_fields, current, keep_address=True, new=False) if current else None
        )
    if book.current and book.current != own:
        return AudienceMember(patient_id, email, merge_fields, book.current, new=False)
    return AudienceMember(patient_id, email, merge_fields, new=book.current is None)


def note_held_addresses(
    store: MemberStore, refused: Mapping[str, AudienceMember], books: Mapping[str, MemberBook]
) -> None:
    """A person's member Mailchimp would not move to their new address (the address was already another
    member's, such as one imported before us): the member at that address is listed too, since the
    address is the person's, so their opt-out reaches it (docs/consent.md)."""
    for subject, m in refused.items():
        own = subscriber_hash(m.email)
        if not m.new and not m.keep_address and m.member not in (None, own) and own not in books[subject].known:
            store.note_mailchimp_address(subject, own)


def note_accepted_members(store: MemberStore, accepted: Mapping[str, AudienceMember]) -> None:
    """Remember each subject's member (subscriber hashes only) once Mailchimp accepted it."""
    for subject, m in accepted.items():
        if not m.keep_address:
            store.note_mailchimp_member(subject, subscriber_hash(m.email), moved_from=m.member)


AudienceKind = Literal["unsubscribe", "cleaned", "upemail", "profile", "subscribe", "campaign"]


@dataclass(frozen=True)
class AudienceEvent:
    """What a Mailchimp audience webhook says (``email`` is the old address of an ``upemail``)."""

    kind: AudienceKind
    list_id: str = ""
    email: str = ""
    new_email: str = ""
    reason: str = ""


class AudienceUpserts(Protocol):
    def upsert(self, members: Sequence[AudienceMember]) -> set[str]:
        """Create or update the members (never re-subscribing one); the patient ids Mailchimp accepted."""
        ...


class MailchimpMembers(Protocol):
    def unsubscribe_member(self, member: str) -> bool:
        """PATCH the member (its subscriber hash) to ``unsubscribed``; False when it is not in the audience."""
        ...
