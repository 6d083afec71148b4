"""The consent side of a sync: the patients' ledgers, a manager's opt-outs kept, the consent job's CRM
part noted as done, and the Mailchimp audience. The sync use case (``clinicsync.application.sync``)
calls these around its CRM writes."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from clinicsync.application.consent import ADDRESS_CHANNELS, ConsentLedger, CrmContactReader
from clinicsync.domain.audience import (
    MAILCHIMP_CHANNELS,
    AudienceMember,
    AudienceUpserts,
    audience_member,
    note_accepted_members,
    note_held_addresses,
)
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.crm_ports import ContactWrite, WriteOutcome
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.keys import email_subject, patient_subject
from clinicsync.domain.models import Channel, ConsentTarget, PatientChanges
from clinicsync.domain.output_marks import ledger_digest
from clinicsync.domain.payloads import audience_merge_fields, contact_fields, may_join_audience
from clinicsync.domain.rules import PatientPlan
from clinicsync.domain.store_ports import ConsentSource, SyncConsentStore
from clinicsync.observability import logger


class SyncConsent:
    def __init__(
        self,
        config: ClinicConfig,
        store: SyncConsentStore,
        hasher: KeyedHasher,
        ledger: ConsentLedger | None,
        audience: AudienceUpserts | None,
        crm_contacts: CrmContactReader | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._clock = clock  # the syncer's: a refusal flag is dated by the clock the rest of the sync runs on
        self._store = store
        self._hasher = hasher
        self._ledger = ledger
        self._audience = audience
        self._crm_contacts = crm_contacts

    @property
    def reads_contacts(self) -> bool:
        """Whether a contact update must first take in what a manager changed on it."""
        return self._crm_contacts is not None

    def subjects(self, live: Sequence[PatientChanges]) -> dict[str, list[str]]:
        """The ledger items ``ledger`` reads for ``live``, subject -> channels (the caller may read them
        ahead, with the rest of what a sync reads): a patient's every channel; an address's only those an
        address alone can refuse (``ADDRESS_CHANNELS``: a Mailchimp unsubscribe before we knew whose)."""
        return self._wanted(*self._subjects(live))

    @staticmethod
    def _wanted(subjects: Mapping[str, str], by_email: Mapping[str, str]) -> dict[str, list[str]]:
        wanted = {subject: list(ADDRESS_CHANNELS) for subject in by_email.values()}
        return wanted | {subject: [c.value for c in Channel] for subject in subjects.values()}

    def _subjects(self, live: Sequence[PatientChanges]) -> tuple[dict[str, str], dict[str, str]]:
        subjects = {item.patient.mis_id: patient_subject(item.patient.mis_id) for item in live}
        by_email = {
            item.patient.mis_id: email_subject(self._hasher.email_key(item.patient.email))
            for item in live
            if item.patient.email
        }
        return subjects, by_email

    def ledger(
        self,
        live: Sequence[PatientChanges],
        read: Mapping[str, set[str]] | None = None,
        on_record: Mapping[str, set[str]] | None = None,
    ) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
        """Record the MIS's refusal flags; return every patient's opt-outs, and the patient's own
        subject's (without the address's). The ledger is sticky: an opt-out once recorded stays,
        whatever the MIS says later. An address unsubscribed before we knew whose it was
        (``email:<HMAC>``) is the refusal of the patient who has it now: recorded as theirs, so it
        follows them to their other addresses and systems, and stays when the address changes.
        ``read``: the ledger of ``subjects(live)`` as the caller just read it (otherwise it is read here), and
        ``on_record`` the channels of those it holds any record of."""
        now = int(self._clock())
        subjects, by_email = self._subjects(live)
        if read is None:  # one read per channel set (a patient's, an address's), not one per subject
            by_channels: dict[tuple[str, ...], list[str]] = {}
            for subject, wanted in self._wanted(subjects, by_email).items():
                by_channels.setdefault(tuple(wanted), []).append(subject)
            read = {}
            for channel_set, subjects_read in by_channels.items():
                read |= self._store.opted_out_many(subjects_read, list(channel_set))
        ledger = {subject: set(read.get(subject, ())) for subject in [*subjects.values(), *by_email.values()]}
        refusals: dict[str, list[str]] = {}
        held: dict[str, list[str]] = {}  # the address's opt-outs its holder has not recorded yet
        emails: dict[str, tuple[str, ...]] = {}
        for item in live:
            pid, subject = item.patient.mis_id, subjects[item.patient.mis_id]
            new = sorted({c.value for c in item.patient.consent.opted_out()} - ledger[subject])
            address = sorted(ledger[by_email[pid]] - ledger[subject] - set(new)) if pid in by_email else []
            refusals.update({subject: new} if new else {})
            held.update({subject: address} if address else {})
            emails[subject] = (item.patient.email,) if item.patient.email else ()
        refusals = self._fresh_refusals(refusals, ledger, on_record)
        # The message's refusals together: one transaction and one job send, not one each per patient.
        self._record(refusals, "mis", "mis:refusal_flag", now, emails, skip=("mis",))
        self._record(held, "mailchimp", "mailchimp:held_address", now, emails, skip=())
        for subject, new in [*refusals.items(), *held.items()]:
            ledger[subject] |= set(new)
        merged = {
            pid: ledger[subject] | (ledger[by_email[pid]] if pid in by_email else set())
            for pid, subject in subjects.items()
        }
        return merged, {pid: ledger[subject] for pid, subject in subjects.items()}

    def _fresh_refusals(
        self,
        refusals: Mapping[str, list[str]],
        ledger: Mapping[str, set[str]],
        on_record: Mapping[str, set[str]] | None,
    ) -> dict[str, list[str]]:
        """The card's refusals that are news. A flag an opt-in lifted stays set in the MIS until the consent
        job that clears it lands; read in that window it is the old refusal, not a new one (a poll there
        undid the opt-in). Such a channel is on the ledger's record but not opted out, and the MIS output has
        not reached the ledger's state yet. It is read again when that job's write changes the card; a
        desk refusal of it in the window is lost (docs/consent.md). Reads only for cards that refuse what
        the ledger does not hold: the lifted channels (unless the sync's own read brought them), then, if any,
        the outputs' marks."""
        if not refusals:
            return {}
        if on_record is None:
            on_record = self._store.channels_on_record_many(refusals)
        lifted = {s: found for s, channels in refusals.items() if (found := on_record.get(s, set()) & set(channels))}
        if not lifted:
            return dict(refusals)
        done = self._store.outputs_done_many(list(lifted))
        fresh = {}
        for subject, channels in refusals.items():
            waiting = lifted.get(subject, set())
            if waiting and done[subject].get("mis") == ledger_digest(sorted(ledger[subject])):
                waiting = set()  # the clear has landed: a flag set now is the desk's
            if news := [c for c in channels if c not in waiting]:
                fresh[subject] = news
        return fresh

    def _record(
        self,
        opt_outs: Mapping[str, Sequence[str]],
        source: ConsentSource,
        detail: str,
        at: int,
        emails: Mapping[str, Sequence[str]],
        skip: Sequence[ConsentTarget],
    ) -> None:
        if opt_outs and self._ledger is not None:
            self._ledger.opt_out_each(opt_outs, source, detail, at, emails, skip=skip)
        elif opt_outs:
            self._store.record_opt_outs_many(opt_outs, source, at, detail)

    def keep_managers_opt_outs(
        self,
        plans: Sequence[PatientPlan],
        live: Sequence[PatientChanges],
        ledger: dict[str, set[str]],
        own_opt_outs: dict[str, set[str]],
    ) -> None:
        """Read every contact we are about to update (one list request) so that a manager's tick whose
        webhook is still on its way reaches the ledger (the CRM events' rule) and the write carries it. Any
        update counts, not only one that carries the opt-out field: after it the contact reads as last
        modified by us, and the tick's webhook would be taken for our own echo."""
        updates = {
            str(w.contact_id): plan
            for plan in plans
            for w in plan.writes
            if isinstance(w, ContactWrite) and w.contact_id
        }
        if not updates or self._crm_contacts is None:
            return
        self._crm_contacts.take_in_contacts(sorted(updates))
        # The ledger as it is now (a manager's opt-in may have lifted a channel as well).
        pids = {plan.patient_id for plan in updates.values()}
        now, now_own = self.ledger([item for item in live if item.patient.mis_id in pids])
        patients = {item.patient.mis_id: item.patient for item in live}
        for plan in updates.values():
            pid = plan.patient_id
            if now[pid] == ledger.get(pid) and now_own[pid] == own_opt_outs.get(pid):
                continue
            ledger[pid], own_opt_outs[pid] = now[pid], now_own[pid]
            fields = contact_fields(patients[pid], self._config, ledger[pid])
            plan.writes = [replace(w, fields=fields) if isinstance(w, ContactWrite) else w for w in plan.writes]
            if plan.next_state is not None:
                plan.next_state.content_hash = self._hasher.content_hash(fields)

    def note_crm_consent(
        self, plans: Sequence[PatientPlan], outcome: WriteOutcome, own_opt_outs: Mapping[str, set[str]]
    ) -> None:
        """A contact write that carried exactly the patient's ledger has done the consent job's CRM part:
        note it, so the job queued for a new MIS refusal flag does not write the same fields again (a
        backfill's refusing patients cost a second round of contact updates otherwise)."""
        done: dict[str, str] = {}
        for plan in plans:
            own = own_opt_outs.get(plan.patient_id)
            if not own or plan.next_state is None or plan.patient_id in outcome.failed:
                continue
            for write in plan.writes:
                if isinstance(write, ContactWrite) and set(write.fields.get("opt_outs") or ()) == own:
                    done[patient_subject(plan.patient_id)] = ledger_digest(sorted(own))
        if done:
            self._store.mark_outputs("crm", done)  # one request per 100 patients, not one each

    def _refusers_new_addresses(
        self,
        plans: Sequence[PatientPlan],
        live: Sequence[PatientChanges],
        ledger: Mapping[str, set[str]],
        outcome: WriteOutcome,
    ) -> None:
        """A known patient who refuses e-mail has another address in the MIS: its member (the audience may
        have had it before us) is unsubscribed too. A first sync's refusal job carries the address already."""
        given: dict[str, tuple[str]] = {}
        for plan, item in zip(plans, live, strict=True):
            state, email = plan.next_state, item.patient.email
            if state is None or state.contact_id is None or plan.patient_id in outcome.failed or not email:
                continue
            if self._hasher.email_key(email) != state.email_key and ledger[plan.patient_id] & MAILCHIMP_CHANNELS:
                given[patient_subject(plan.patient_id)] = (email,)
        if given and self._ledger is not None:
            self._ledger.members_due(given, "mis:new_address")

    def sync_audience(
        self,
        plans: Sequence[PatientPlan],
        live: Sequence[PatientChanges],
        ledger: dict[str, set[str]],
        outcome: WriteOutcome,
    ) -> int:
        """Keep consenting patients in the Mailchimp audience: one batch per message, unchanged members
        skipped by hash. A Mailchimp failure never fails the CRM sync; those members are sent next time."""
        if self._audience is None:
            return 0
        self._refusers_new_addresses(plans, live, ledger, outcome)
        wanted: list[tuple[str, str, dict[str, str], str]] = []
        for plan, item in zip(plans, live, strict=True):
            state = plan.next_state
            patient = item.patient
            if state is None or plan.patient_id in outcome.failed or not patient.email:
                continue
            if not may_join_audience(patient, self._config, ledger[plan.patient_id]):
                continue
            merges = audience_merge_fields(item, state, self._config) or {}
            digest = self._hasher.content_hash({"email": patient.email, "merges": merges})
            if digest != state.audience_hash:
                wanted.append((plan.patient_id, patient.email, merges, digest))
        if not wanted:
            return 0
        # The person's members so far: an address Mailchimp moved is never re-created (one member each).
        books = self._store.mailchimp_members_many([patient_subject(pid) for pid, *_ in wanted])
        members: dict[str, AudienceMember] = {}
        digests: dict[str, str] = {}
        for pid, email, merges, digest in wanted:
            member = audience_member(pid, email, merges, books[patient_subject(pid)])
            if member is not None:
                members[pid] = member
                digests[pid] = digest
        if not members:
            return 0
        try:
            accepted = self._audience.upsert(list(members.values()))
        except Exception as exc:  # Mailchimp down: the CRM side is done, members go next time
            logger.warning("mailchimp audience sync failed", extra={"error": type(exc).__name__})
            accepted = set()
            for plan in plans:  # the batch may have landed: a member back to its stored content is sent again
                if plan.patient_id in members and plan.next_state is not None:
                    plan.next_state.audience_hash = None
        else:
            refused = {patient_subject(pid): m for pid, m in members.items() if pid not in accepted}
            note_held_addresses(self._store, refused, books)
        note_accepted_members(self._store, {patient_subject(pid): members[pid] for pid in accepted if pid in members})
        for plan in plans:
            if plan.patient_id in accepted and plan.next_state is not None:
                plan.next_state.audience_hash = digests[plan.patient_id]
        return len(accepted)
