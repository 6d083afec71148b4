"""Consent: the ledger's use cases, one-click unsubscribe tokens and the outputs every opt-out must reach.

Every input (a one-click link, a Mailchimp event, a CRM opt-out field, a MIS refusal flag) goes through
``ConsentLedger``: the opt-out is recorded under the person's subject and, only if it changed something,
a ``ConsentJob`` is queued. ``ConsentOutputs`` then pushes the ledger's *current* state to the CRM
contact, the MIS and Mailchimp, marking each target done per ledger digest, so a retried job skips
finished targets and a repeated input changes nothing (that is also what stops loops).

Subjects (``keys.patient_subject``/``keys.email_subject``) name a known patient or an address we cannot tie to one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
import time
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Literal, Protocol
from urllib.parse import urlsplit

from clinicsync.config import ClinicConfig
from clinicsync.crypto import KeyedHasher
from clinicsync.emails import lower_keeping_look_alikes
from clinicsync.keys import email_subject, patient_subject, subject_patient
from clinicsync.models import Channel, ConsentJob, ConsentTarget
from clinicsync.observability import logger
from clinicsync.ports import ConsentSource, ContactWrite, CrmGateway, MisConsentWriter
from clinicsync.store import DynamoStore, MemberBook

ALL_CHANNELS = tuple(c.value for c in Channel)
# What an e-mail unsubscribe (link or Mailchimp) refuses: e-mail, the channel the person clicked in.
EMAIL_UNSUBSCRIBE = (Channel.EMAIL.value,)
# Mailchimp must stop mailing anyone who refused e-mail or marketing.
MAILCHIMP_CHANNELS = frozenset({Channel.EMAIL.value, Channel.MARKETING.value})


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
    are updated, the address the person chose stays."""

    patient_id: str
    email: str
    merge_fields: Mapping[str, str]
    member: str | None = None
    keep_address: bool = False


def audience_member(
    patient_id: str, email: str, merge_fields: Mapping[str, str], book: MemberBook
) -> AudienceMember | None:
    """The one rule for the audience sync: a person has one member. An address Mailchimp moved away is
    never re-created (the person's current member gets the merge fields); an address the MIS changed
    moves the person's member to it (its status, an unsubscribe included, stays)."""
    own = subscriber_hash(email)
    if own in book.moved:
        current = book.current if book.current != own else None
        return AudienceMember(patient_id, email, merge_fields, current, keep_address=True) if current else None
    if book.current and book.current != own:
        return AudienceMember(patient_id, email, merge_fields, book.current)
    return AudienceMember(patient_id, email, merge_fields)


class MemberStore(Protocol):
    def mailchimp_members_many(self, subjects: Sequence[str]) -> dict[str, MemberBook]: ...

    def note_mailchimp_member(self, subject: str, member: str, moved_from: str | None = None) -> None: ...


def note_accepted_members(store: MemberStore, accepted: Mapping[str, AudienceMember]) -> None:
    """Remember each subject's member (subscriber hashes only) once Mailchimp accepted it."""
    for subject, m in accepted.items():
        if not m.keep_address:
            store.note_mailchimp_member(subject, subscriber_hash(m.email), moved_from=m.member)


def ledger_digest(opted_out: Sequence[str]) -> str:
    return ",".join(sorted(set(opted_out))) or "-"


# --- one-click links (RFC 8058) --------------------------------------------------------------------------


class TokenError(ValueError):
    """A link we refuse; ``reason`` is plain text safe to show, ``status`` the HTTP answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class LinkClaim:
    patient_id: str
    channel: Channel
    expires_at: int  # 0: never


_LINK_FORMAT_VERSION = 1
_CHANNEL_CODES = {c: i for i, c in enumerate(Channel)}
_MAC_BYTES = 16
MAX_TOKEN_CHARS = 160


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not text or any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in text):
        raise ValueError("not base64url")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    # Canonical only: base64 ignores a last character's unused low bits, so an edited token could
    # decode to the same bytes (and verify). Exactly one spelling per token is accepted.
    if _b64(raw) != text:
        raise ValueError("not canonical base64url")
    return raw


class UnsubscribeTokens:
    """``<payload>.<mac>``, both base64url. The payload is version, list (channel), expiry and the MIS
    patient id: no name, phone or e-mail. The MAC is HMAC-SHA256 under the clinic's link key, cut to
    128 bits, so a forged or edited token fails and nothing needs storing to check one."""

    def __init__(self, key: bytes, ttl_seconds: int | None = None, clock: Callable[[], float] = time.time) -> None:
        if len(key) < 16:
            raise ValueError("link key must be at least 16 bytes")
        self._key = key
        self._ttl = ttl_seconds
        self._clock = clock

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, b"unsubscribe-link\x00" + payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, patient_id: str, channel: Channel = Channel.EMAIL) -> str:
        expires = int(self._clock()) + self._ttl if self._ttl else 0
        pid = patient_id.encode()
        if not 0 < len(pid) <= 64:
            raise ValueError("patient id must be 1..64 bytes")
        payload = struct.pack(">BBI", _LINK_FORMAT_VERSION, _CHANNEL_CODES[channel], expires) + pid
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def verify(self, token: str) -> LinkClaim:
        if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
            raise TokenError(400, "malformed link")
        head, tail = token.split(".")
        try:
            payload, mac = _unb64(head), _unb64(tail)
        except ValueError as exc:
            raise TokenError(400, "malformed link") from exc
        if len(payload) < 7 or len(mac) != _MAC_BYTES:
            raise TokenError(400, "malformed link")
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise TokenError(403, "this link was not issued by us or has been altered")
        version, code, expires = struct.unpack(">BBI", payload[:6])
        channels = list(Channel)
        if version != _LINK_FORMAT_VERSION or code >= len(channels):
            raise TokenError(400, "unsupported link version")
        if expires and expires < self._clock():
            raise TokenError(410, "this link has expired")
        try:
            patient_id = payload[6:].decode()
        except UnicodeDecodeError as exc:
            raise TokenError(400, "malformed link") from exc
        return LinkClaim(patient_id, channels[code], expires)


def list_unsubscribe_headers(base_url: str, token: str, mailto: str | None = None) -> dict[str, str]:
    """The two RFC 8058 headers for one recipient. The URL must be HTTPS (loopback HTTP only for the
    local runtime); keep the header on one line: folding it broke DKIM checks for some senders."""
    parts = urlsplit(base_url)
    loopback = parts.hostname in ("127.0.0.1", "localhost")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise ValueError("List-Unsubscribe needs an https URL")
    targets = [f"<{base_url.rstrip('/')}/unsubscribe/{token}>"]
    if mailto:
        targets.append(f"<mailto:{mailto}?subject=unsubscribe>")
    return {"List-Unsubscribe": ", ".join(targets), "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


# --- recording -----------------------------------------------------------------------------------------------


class ConsentQueue(Protocol):
    def send(self, jobs: Sequence[ConsentJob]) -> None: ...


AudienceKind = Literal["unsubscribe", "cleaned", "upemail", "profile", "subscribe", "campaign"]


@dataclass(frozen=True)
class AudienceEvent:
    """What a Mailchimp audience webhook says (``email`` is the old address of an ``upemail``)."""

    kind: AudienceKind
    list_id: str = ""
    email: str = ""
    new_email: str = ""
    reason: str = ""


def our_audiences(config: ClinicConfig) -> set[str]:
    """The Mailchimp audiences whose events speak for this clinic's people (the lab has two)."""
    audiences = {config.mailchimp.list_id} if config.mailchimp is not None else set()
    if config.directory is not None and config.directory.mailchimp is not None:
        audiences |= {config.directory.mailchimp.doctors_list_id, config.directory.mailchimp.organisations_list_id}
    return audiences


class ConsentLedger:
    """Records what an input says and queues the outputs, once per real change."""

    def __init__(
        self,
        store: DynamoStore,
        queue: ConsentQueue,
        clinic_id: str,
        hasher: KeyedHasher,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._queue = queue
        self._clinic_id = clinic_id
        self._hasher = hasher
        self._clock = clock

    def subjects_for_email(self, email: str) -> list[str]:
        key = self._hasher.email_key(email)
        return self._store.subjects_by_email(key) or [email_subject(key)]

    def address_moved(self, old_email: str, new_email: str) -> list[str]:
        """Mailchimp ``upemail``: the person keeps their consent and their member under the new address;
        the old address is theirs for good (an opt-out still reaches it) and is never re-created."""
        subjects = self.subjects_for_email(old_email)
        self._store.index_emails([(self._hasher.email_key(new_email), s) for s in subjects])
        for s in subjects:
            self._store.note_mailchimp_member(s, subscriber_hash(new_email), moved_from=subscriber_hash(old_email))
        return subjects

    def opt_out(
        self,
        subjects: Sequence[str],
        channels: Sequence[str],
        source: ConsentSource,
        detail: str,
        at: int | None = None,
        emails: Sequence[str] = (),
        skip: Sequence[ConsentTarget] = (),
    ) -> list[str]:
        """Returns the subjects whose state changed; only those get a job."""
        when = int(at if at is not None else self._clock())
        changed = [s for s in dict.fromkeys(subjects) if self._store.record_opt_outs(s, channels, source, when, detail)]
        self._enqueue(changed, detail, emails, skip)
        return changed

    def opt_in(self, subject: str, channels: Sequence[str], source: ConsentSource, at: int, detail: str) -> bool:
        changed = bool(self._store.record_opt_ins(subject, channels, source, at, detail))
        self._enqueue([subject] if changed else [], detail, (), ())
        return changed

    def unsubscribe_link(self, claim: LinkClaim) -> bool:
        """A one-click unsubscribe (RFC 8058): the link's patient refuses the link's channel."""
        return bool(self.opt_out([patient_subject(claim.patient_id)], [claim.channel.value], "link", "link:one-click"))

    def audience_event(self, event: AudienceEvent, audiences: Set[str]) -> str:
        """A Mailchimp webhook; the outcome Mailchimp is answered with (200 for every one, so it never retries)."""
        if event.kind in ("subscribe", "campaign"):
            return "ignored"  # a subscribe in Mailchimp never lifts an opt-out (only the MIS or the CRM can)
        if event.list_id not in audiences:
            return "other_audience"
        if event.kind in ("unsubscribe", "cleaned"):
            subjects = self.subjects_for_email(event.email)
            detail = f"mailchimp:{event.kind}:{event.reason}"[:64]
            changed = self.opt_out(subjects, EMAIL_UNSUBSCRIBE, "mailchimp", detail, skip=("mailchimp",))
            known = any(subject_patient(s) is not None for s in subjects)
            return "recorded" if changed and known else "recorded_unknown" if changed else "unchanged"
        if event.kind == "upemail":
            self.address_moved(event.email, event.new_email)  # consent and member follow the person
            return "linked"
        return "ignored"  # profile: merge fields only, nothing about consent

    def _enqueue(
        self, subjects: Sequence[str], reason: str, emails: Sequence[str], skip: Sequence[ConsentTarget]
    ) -> None:
        if not subjects:
            return
        now = int(self._clock())
        self._queue.send(
            [
                ConsentJob(
                    clinic_id=self._clinic_id,
                    subject=s,
                    reason=reason,
                    emails=tuple(emails),
                    skip=tuple(skip),
                    produced_at=now,
                )
                for s in subjects
            ]
        )


# --- outputs -------------------------------------------------------------------------------------------------


class MailchimpMembers(Protocol):
    def unsubscribe_member(self, member: str) -> bool:
        """PATCH the member (its subscriber hash) to ``unsubscribed``; False when it is not in the audience."""
        ...


class CrmContactReader(Protocol):
    def take_in_contacts(self, contact_ids: Sequence[str]) -> object:
        """Read the contacts and record what managers changed on them (``CrmEventProcessor``'s rule)."""
        ...


def consent_contact_write(patient_id: str, contact_id: str, opted_out: Sequence[str]) -> ContactWrite:
    """The one rule for every CRM: the contact's opt-out field holds exactly the ledger's opt-outs."""
    channels = sorted(set(opted_out))
    return ContactWrite(patient_id, contact_id, {"mis_patient_id": patient_id, "opt_outs": channels or None})


@dataclass
class ConsentReport:
    jobs: int = 0
    crm_written: int = 0
    mis_written: int = 0
    mailchimp_unsubscribed: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # subject -> reason (no PII)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


class ConsentOutputs:
    """Pushes the ledger's state for a batch of subjects to every configured system.

    CRM writes for the whole batch go in one ``apply`` (one Bitrix24 ``batch`` / amoCRM bulk PATCH);
    e-mails for Mailchimp come from the job (in transit) or from the CRM contacts in one read.
    """

    def __init__(
        self,
        config: ClinicConfig,
        store: DynamoStore,
        gateway: CrmGateway | None,
        mis: MisConsentWriter | None,
        mailchimp: MailchimpMembers | None,
        crm_contacts: CrmContactReader | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._gateway = gateway
        self._mis = mis
        self._mailchimp = mailchimp
        self._crm_contacts = crm_contacts

    def push(self, jobs: Sequence[ConsentJob]) -> ConsentReport:
        report = ConsentReport(jobs=len(jobs))
        by_subject: dict[str, list[ConsentJob]] = {}
        for job in jobs:
            by_subject.setdefault(job.subject, []).append(job)
        subjects = list(by_subject)
        ledger = self._store.opted_out_many(subjects, ALL_CHANNELS)
        done = {s: self._store.output_done(s) for s in subjects}
        digests = {s: ledger_digest(sorted(ledger[s])) for s in subjects}
        skips = {s: set.intersection(*(set(j.skip) for j in js)) for s, js in by_subject.items()}
        for s in subjects:
            # Mailchimp is many members: the one that sent the event shows it, the person's others do not.
            for target in skips[s] - {"mailchimp"}:
                if done[s].get(target) != digests[s]:
                    self._store.mark_output(s, target, digests[s])  # the source already shows it
                    done[s][target] = digests[s]
        patients = {s: pid for s in subjects if (pid := subject_patient(s))}
        states = self._store.load_patients({pid: [] for pid in patients.values()}) if patients else {}
        contacts = {s: states[pid].contact_id for s, pid in patients.items() if states[pid].contact_id}
        to_write = [c for s, c in contacts.items() if c and done[s].get("crm") != digests[s]]
        if to_write and self._gateway is not None and self._crm_contacts is not None:
            # Our write replaces the whole field: a manager's tick not yet heard of goes to the ledger first
            # (a CRM opt-out, by the CRM events' rule), so the field we write keeps it. Every target then
            # gets the ledger as it is now (the skips above hold only for the state the source showed).
            self._crm_contacts.take_in_contacts(to_write)
            ledger = self._store.opted_out_many(subjects, ALL_CHANNELS)
            digests = {s: ledger_digest(sorted(ledger[s])) for s in subjects}
        for s, pid in patients.items():
            state = states[pid]  # who the subject is, for the audit: ids and keyed hashes only
            keys = {"mis_id": pid, "crm_contact_id": state.contact_id}
            self._store.note_identity(s, keys | {"phone_key": state.phone_key, "email_key": state.email_key})
        self._crm(subjects, ledger, done, digests, contacts, report)
        self._mis_flags(patients, ledger, done, digests, report)
        emails = {s: [e for j in js for e in j.emails] for s, js in by_subject.items()}
        from_mailchimp = {s for s in subjects if "mailchimp" in skips[s]}
        self._mailchimp_members(subjects, ledger, done, digests, contacts, emails, from_mailchimp, report)
        return report

    def _crm(
        self,
        subjects: Sequence[str],
        ledger: Mapping[str, set[str]],
        done: Mapping[str, Mapping[str, str]],
        digests: Mapping[str, str],
        contacts: Mapping[str, str | None],
        report: ConsentReport,
    ) -> None:
        if self._gateway is None:
            return
        writes: dict[str, ContactWrite] = {}
        for s in subjects:
            if done[s].get("crm") == digests[s]:
                continue
            contact = contacts.get(s)
            if contact is None:
                # No contact yet: the sync that creates it sends the ledger's opt-outs with it.
                report.skip("crm_no_contact")
                continue
            pid = str(subject_patient(s))
            writes[s] = consent_contact_write(pid, contact, sorted(ledger[s]))
        if not writes:
            return
        outcome = self._gateway.apply(list(writes.values()))
        for s, write in writes.items():
            if write.patient_id in outcome.failed:
                report.failed[s] = f"crm:{outcome.failed[write.patient_id]}"
            else:
                self._store.mark_output(s, "crm", digests[s])
                report.crm_written += 1

    def _mis_flags(
        self,
        patients: Mapping[str, str],
        ledger: Mapping[str, set[str]],
        done: Mapping[str, Mapping[str, str]],
        digests: Mapping[str, str],
        report: ConsentReport,
    ) -> None:
        for s, pid in patients.items():
            if done[s].get("mis") == digests[s]:
                continue
            if self._mis is None:
                report.skip("mis_not_writable")
                continue
            writable = self._mis.writable_channels & ledger[s]
            try:
                if writable:
                    self._mis.write_opt_outs(pid, sorted(writable))
                    report.mis_written += 1
            except Exception as exc:  # retried with the job; the other subjects go on
                report.failed[s] = f"mis:{type(exc).__name__}"
                continue
            self._store.mark_output(s, "mis", digests[s])

    def _mailchimp_members(
        self,
        subjects: Sequence[str],
        ledger: Mapping[str, set[str]],
        done: Mapping[str, Mapping[str, str]],
        digests: Mapping[str, str],
        contacts: Mapping[str, str | None],
        emails: Mapping[str, list[str]],
        from_mailchimp: set[str],
        report: ConsentReport,
    ) -> None:
        """Every member the person ever had (each address we or Mailchimp gave them, as subscriber
        hashes) is unsubscribed, plus the addresses in the job or on the CRM contact."""
        if self._mailchimp is None:
            return
        todo = [s for s in subjects if done[s].get("mailchimp") != digests[s]]
        refusing = [s for s in todo if ledger[s] & MAILCHIMP_CHANNELS]
        books = self._store.mailchimp_members_many(refusing) if refusing else {}
        lookup = [
            str(contacts[s]) for s in refusing if not emails.get(s) and contacts.get(s) and s not in from_mailchimp
        ]
        from_crm = self._gateway.contact_emails(lookup) if lookup and self._gateway is not None else {}
        for s in todo:
            if s in refusing:
                addresses = emails.get(s) or from_crm.get(str(contacts.get(s)), [])
                members = dict.fromkeys([*map(subscriber_hash, addresses), *sorted(books[s].known)])
                try:
                    report.mailchimp_unsubscribed += sum(self._mailchimp.unsubscribe_member(m) for m in members)
                except Exception as exc:
                    report.failed[s] = f"mailchimp:{type(exc).__name__}"
                    continue
                if not members and s not in from_mailchimp:
                    report.skip("mailchimp_no_address")
            self._store.mark_output(s, "mailchimp", digests[s])
        if report.failed:
            logger.warning("consent outputs failed", extra={"failed": sorted(set(report.failed.values()))})
