"""Consent: the ledger's use cases and the outputs every opt-out must reach (links: ``unsubscribe_links``;
Mailchimp members: ``audience``).

Every input (a one-click link, a Mailchimp event, a CRM opt-out field, a MIS refusal flag) goes through
``ConsentLedger``: the opt-out is recorded under the person's subject and, only if it changed something,
a ``ConsentJob`` is queued. ``ConsentOutputs`` then pushes the ledger's *current* state to the CRM
contact, the MIS and Mailchimp, marking each target done per ledger digest, so a retried job skips
finished targets and a repeated input changes nothing (that is also what stops loops). Subjects
(``keys.patient_subject``/``keys.email_subject``) name a known patient or an address we cannot tie to one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence, Set
from typing import TYPE_CHECKING, Protocol

from clinicsync.application.consent_report import ConsentReport
from clinicsync.domain.audience import MAILCHIMP_CHANNELS, AudienceEvent, MailchimpMembers, subscriber_hash
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.keys import email_subject, patient_subject, subject_patient
from clinicsync.domain.models import Channel, ConsentJob, ConsentTarget
from clinicsync.domain.output_marks import MEMBER_MOVED, OUTCOME_UNKNOWN, digest_channels, ledger_digest
from clinicsync.domain.store_ports import ConsentOutputStore, ConsentSource, LedgerStore
from clinicsync.domain.unsubscribe_links import LinkClaim
from clinicsync.observability import logger

if TYPE_CHECKING:  # the outputs' (the syncer's): the ledger's handler never writes to a CRM or a MIS
    from clinicsync.domain.crm_ports import ContactWrite, CrmGateway
    from clinicsync.domain.ports import MisConsentWriter

ALL_CHANNELS = tuple(c.value for c in Channel)
# What an e-mail unsubscribe (link or Mailchimp) refuses: e-mail, the channel the person clicked in.
EMAIL_UNSUBSCRIBE = (Channel.EMAIL.value,)
# The channels an address's own subject (``email:<HMAC>``) can hold: only a Mailchimp unsubscribe of an
# address nobody had yet is recorded there, so a sync reads no other channel of it.
ADDRESS_CHANNELS = EMAIL_UNSUBSCRIBE


# --- recording -----------------------------------------------------------------------------------------------


class ConsentQueue(Protocol):
    def send(self, jobs: Sequence[ConsentJob]) -> None: ...


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
        store: LedgerStore,
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
        new_key = self._hasher.email_key(new_email)
        had_it = self._store.subjects_by_email(new_key)  # people who had the new one
        opted_out = self._store.opted_out_many(list(dict.fromkeys(subjects + had_it)), sorted(MAILCHIMP_CHANNELS))
        unknown = [s for s in subjects if subject_patient(s) is None]
        if unknown and not any(subject_patient(s) for s in had_it):
            # An unknown person moved to an address no patient had: it is theirs as the first one was. Its
            # own subject (what a sync reads for a later holder) joins them and carries their refusal.
            alias = email_subject(new_key)
            subjects = list(dict.fromkeys([*subjects, alias]))
            carried = sorted({c for s in unknown for c in opted_out[s]} & set(ADDRESS_CHANNELS))
            if carried:  # its job is queued here
                self.opt_out([alias], carried, "mailchimp", "mailchimp:upemail", skip=("mailchimp",))
        self._store.index_emails([(new_key, s) for s in subjects])
        for s in subjects:
            self._store.note_mailchimp_member(s, subscriber_hash(new_email), moved_from=subscriber_hash(old_email))
        # Opt-outs pushed before this webhook reached the members known then (Mailchimp may move one first): a
        # refusing person's target is due again, with the moved member (or, if they had it, the new address).
        refusing = {s: () if s in subjects else (new_email,) for s, out in opted_out.items() if out}
        self.members_due(refusing, "mailchimp:upemail")
        return subjects

    def members_due(self, emails: Mapping[str, Sequence[str]], reason: str) -> None:
        """The people's Mailchimp target is due again (a member moved, a new address), these in transit."""
        self._store.mark_outputs_many({s: {"mailchimp": MEMBER_MOVED} for s in emails})
        self._enqueue(list(emails), reason, emails, ())

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
        wanted = dict.fromkeys(subjects, channels)
        return list(self.opt_out_each(wanted, source, detail, at, dict.fromkeys(subjects, emails), skip))

    def opt_out_each(
        self,
        opt_outs: Mapping[str, Sequence[str]],
        source: ConsentSource,
        detail: str,
        at: int | None = None,
        emails: Mapping[str, Sequence[str]] | None = None,
        skip: Sequence[ConsentTarget] = (),
    ) -> dict[str, list[str]]:
        """Each subject's own channels (a sync message's refusal flags): recorded in as few store requests
        as it allows, the jobs of every subject that changed sent together. Returns their changed channels."""
        when = int(at if at is not None else self._clock())
        recorded = self._store.record_opt_outs_many(opt_outs, source, when, detail)
        changed = {s: channels for s, channels in recorded.items() if channels}
        self._enqueue(list(changed), detail, emails or {}, skip)
        return changed

    def opt_in(self, subject: str, channels: Sequence[str], source: ConsentSource, at: int, detail: str) -> bool:
        lifted = self._store.record_opt_ins(subject, channels, source, at, detail)
        self._enqueue([subject] if lifted else [], detail, {}, ("mis",) if source == "mis" else (), lifted)
        return bool(lifted)

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
        self,
        subjects: Sequence[str],
        reason: str,
        emails: Mapping[str, Sequence[str]],
        skip: Sequence[ConsentTarget],
        lifted: Sequence[str] = (),
    ) -> None:
        """One send for all the subjects' jobs (the queue packs them ten to a request)."""
        if not subjects:
            return
        now = int(self._clock())
        self._queue.send(
            [
                ConsentJob(
                    clinic_id=self._clinic_id,
                    subject=s,
                    reason=reason,
                    emails=tuple(emails.get(s, ())),
                    skip=tuple(skip),
                    lifted=tuple(Channel(c) for c in lifted),
                    produced_at=now,
                )
                for s in subjects
            ]
        )


# --- outputs -------------------------------------------------------------------------------------------------


class CrmContactReader(Protocol):
    def take_in_contacts(self, contact_ids: Sequence[str]) -> object:
        """Read the contacts and record what managers changed on them (``CrmEventProcessor``'s rule)."""
        ...


def consent_contact_write(patient_id: str, contact_id: str, opted_out: Sequence[str]) -> ContactWrite:
    """The one rule for every CRM: the contact's opt-out field holds exactly the ledger's opt-outs."""
    from clinicsync.domain.crm_ports import ContactWrite

    channels = sorted(set(opted_out))
    return ContactWrite(patient_id, contact_id, {"mis_patient_id": patient_id, "opt_outs": channels or None})


class ConsentOutputs:
    """Pushes the ledger's state for a batch of subjects to every configured system.

    CRM writes for the whole batch go in one ``apply`` (one Bitrix24 ``batch`` / amoCRM bulk PATCH);
    e-mails for Mailchimp come from the job (in transit) or from the CRM contacts in one read.
    """

    def __init__(
        self,
        config: ClinicConfig,
        store: ConsentOutputStore,
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
        done = self._store.outputs_done_many(subjects)  # one read for the batch, not one per job
        # What each target reached, written together at the end (one request per 100 subjects); a job
        # cut short before that is pushed again, and every output is safe to repeat.
        marks: dict[str, dict[str, str]] = {}
        try:
            self._push(by_subject, ledger, done, marks, report)
        finally:
            if marks:
                self._store.mark_outputs_many(marks)
        return report

    def _push(
        self,
        by_subject: Mapping[str, Sequence[ConsentJob]],
        ledger: dict[str, set[str]],
        done: dict[str, dict[str, str]],
        marks: dict[str, dict[str, str]],
        report: ConsentReport,
    ) -> None:
        subjects = list(by_subject)
        digests = {s: ledger_digest(sorted(ledger[s])) for s in subjects}
        skips = {s: set.intersection(*(set(j.skip) for j in js)) for s, js in by_subject.items()}
        for s in subjects:
            # Mailchimp is many members: the one that sent the event shows it, the person's others do not.
            for target in skips[s] - {"mailchimp"}:
                if target == "mis" and digest_channels(done[s].get("mis")) - ledger[s]:
                    continue  # the MIS still shows a flag an opt-in lifted: this job clears it
                if done[s].get(target) != digests[s]:
                    marks.setdefault(s, {})[target] = digests[s]  # the source already shows it
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
        # Who each subject is, for the audit: ids and keyed hashes only.
        identities = {
            s: {
                "mis_id": pid,
                "crm_contact_id": states[pid].contact_id,
                "phone_key": states[pid].phone_key,
                "email_key": states[pid].email_key,
            }
            for s, pid in patients.items()
        }
        if identities:
            self._store.note_identities(identities)
        self._crm(subjects, ledger, done, digests, contacts, marks, report)
        lifted = {s: {c.value for j in js for c in j.lifted} for s, js in by_subject.items()}
        self._mis_flags(patients, ledger, lifted, done, digests, marks, report)
        emails = {s: [e for j in js for e in j.emails] for s, js in by_subject.items()}
        from_mailchimp = {s for s in subjects if "mailchimp" in skips[s]}
        self._mailchimp_members(subjects, ledger, done, digests, contacts, emails, from_mailchimp, marks, report)

    def _crm(
        self,
        subjects: Sequence[str],
        ledger: Mapping[str, set[str]],
        done: Mapping[str, Mapping[str, str]],
        digests: Mapping[str, str],
        contacts: Mapping[str, str | None],
        marks: dict[str, dict[str, str]],
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
            failed = outcome.failed.get(write.patient_id)
            marks.setdefault(s, {})["crm"] = OUTCOME_UNKNOWN if failed else digests[s]
            report.crm_written += not failed
            if failed:
                report.failed[s] = f"crm:{failed}"

    def _mis_flags(
        self,
        patients: Mapping[str, str],
        ledger: Mapping[str, set[str]],
        lifted: Mapping[str, set[str]],
        done: Mapping[str, Mapping[str, str]],
        digests: Mapping[str, str],
        marks: dict[str, dict[str, str]],
        report: ConsentReport,
    ) -> None:
        """The ledger's opt-outs as the MIS's flags; a flag an opt-in lifted (by these jobs, or one the last
        mark shows that the ledger no longer holds) is cleared; a desk flag not yet polled stays."""
        for s, pid in patients.items():
            if done[s].get("mis") == digests[s]:
                continue
            if self._mis is None:
                report.skip("mis_not_writable")
                continue
            writable = self._mis.writable_channels & ledger[s]
            shown = digest_channels(done[s].get("mis"))
            cleared = self._mis.writable_channels & ((lifted[s] | shown) - ledger[s])
            try:
                if writable or cleared:
                    self._mis.write_opt_outs(pid, sorted(writable), sorted(cleared))
                    report.mis_written += 1
            except Exception as exc:  # retried with the job; the other subjects go on
                report.failed[s] = f"mis:{type(exc).__name__}"
                marks.setdefault(s, {})["mis"] = OUTCOME_UNKNOWN
                continue
            marks.setdefault(s, {})["mis"] = digests[s]

    def _mailchimp_members(
        self,
        subjects: Sequence[str],
        ledger: Mapping[str, set[str]],
        done: Mapping[str, Mapping[str, str]],
        digests: Mapping[str, str],
        contacts: Mapping[str, str | None],
        emails: Mapping[str, list[str]],
        from_mailchimp: set[str],
        marks: dict[str, dict[str, str]],
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
                    marks.setdefault(s, {})["mailchimp"] = OUTCOME_UNKNOWN
                    continue
                if not members and s not in from_mailchimp:
                    report.skip("mailchimp_no_address")
            marks.setdefault(s, {})["mailchimp"] = digests[s]
        if report.failed:
            logger.warning("consent outputs failed", extra={"failed": sorted(set(report.failed.values()))})
