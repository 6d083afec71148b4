"""Use cases: poll a MIS into the queue, and sync queued change sets into the CRM.

Handlers call these; these call the rules, the ports and the store. Nothing here knows a vendor.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from clinicsync.adapters.http.retrying import exponential, poll
from clinicsync.application.backfill import BackfillCheckpoint, BackfillState
from clinicsync.application.consent import ConsentLedger, CrmContactReader, ledger_digest
from clinicsync.domain.audience import AudienceMember, audience_member, note_accepted_members
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.keys import contact_intent, deal_intent, email_subject, patient_subject, shard_of
from clinicsync.domain.models import Channel, CrmObservation, PatientChanges, SyncMessage
from clinicsync.domain.payloads import audience_merge_fields, contact_fields, may_join_audience
from clinicsync.domain.ports import (
    ChangePage,
    ContactWrite,
    CrmGateway,
    CrmMatches,
    CrmWrite,
    DealWrite,
    LeadWrite,
    MisSource,
    PollStore,
    SyncStore,
    WriteOutcome,
)
from clinicsync.domain.rules import (
    Adoption,
    PatientPlan,
    apply_observation,
    changed_multifields,
    plan_patient,
    stage_read_observation,
    stage_to_check,
)
from clinicsync.domain.state import PatientState
from clinicsync.observability import logger

if TYPE_CHECKING:  # the Mailchimp client (and httpx) load where wiring builds them
    from clinicsync.adapters.mailchimp.client import MailchimpAudience

# A claim outlives the syncer's Lambda timeout (120 s), so a live invocation never loses it, and ends
# before the sync queue's visibility timeout (720 s), so a killed invocation's retry finds it expired.
CLAIM_SECONDS = 300
CLAIM_WAIT_SECONDS = 3.0  # how long to wait for another invocation to finish a patient before deferring it
# An adoption claim outlives its message, a redrive from the DLQ (14 days) included; by the time it
# expires, the CRM itself shows the lead converted or the deal ours, or nobody wrote it and it is free.
ADOPTION_CLAIM_SECONDS = 15 * 24 * 3600
BUSY = "patient_busy"


class SyncIncomplete(Exception):
    """Some patients could not be written; the message is retried and finished patients are skipped."""

    def __init__(self, failed: dict[str, str]) -> None:
        super().__init__(f"{len(failed)} patient(s) failed: {sorted(set(failed.values()))}")
        self.failed = failed


@dataclass
class SyncReport:
    patients: int = 0
    contacts_created: int = 0
    contacts_updated: int = 0
    deals_created: int = 0
    deals_updated: int = 0
    leads_adopted: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    removed: int = 0
    crm_requests: int = 0
    audience_members: int = 0


class Syncer:
    def __init__(
        self,
        config: ClinicConfig,
        store: SyncStore,
        gateway: CrmGateway,
        hasher: KeyedHasher,
        ledger: ConsentLedger | None = None,
        audience: MailchimpAudience | None = None,
        claim_wait: float = CLAIM_WAIT_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
        crm_contacts: CrmContactReader | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._gateway = gateway
        self._hasher = hasher
        self._ledger = ledger
        self._audience = audience
        self._crm_contacts = crm_contacts
        self._claim_wait = claim_wait
        self._sleep = sleep

    def sync(self, changes: Sequence[PatientChanges], observations: Sequence[CrmObservation] = ()) -> SyncReport:
        """Sync one message. Each patient is claimed first (single writer, whatever delivered the
        message); a patient another invocation holds is deferred: the message is retried for it."""
        merged = _merge_by_patient(changes)
        wanted = list(dict.fromkeys([c.patient.mis_id for c in merged] + [o.patient_id for o in observations]))
        owner = uuid.uuid4().hex
        claimed = self._claim(wanted, owner)
        try:
            busy = {pid: BUSY for pid in wanted if pid not in claimed}
            if busy:
                logger.warning("patients held by another sync; deferred", extra={"patients": len(busy)})
            report = self._sync(
                [c for c in merged if c.patient.mis_id in claimed],
                [o for o in observations if o.patient_id in claimed],
                busy,
            )
        finally:
            if claimed:
                self._store.release_claims(sorted(claimed))
        report.patients = len(changes)
        return report

    def _claim(self, patient_ids: list[str], owner: str) -> set[str]:
        claimed: set[str] = set()

        def claim_pending() -> set[str]:
            pending = [pid for pid in patient_ids if pid not in claimed]
            if pending:
                try:
                    claimed.update(self._store.claim_patients(pending, owner, int(time.time()), CLAIM_SECONDS))
                except Exception:
                    if claimed:  # ours from an earlier round: they must not stay held for CLAIM_SECONDS
                        self._store.release_claims(sorted(claimed))
                    raise
            return claimed

        return poll(
            claim_pending,
            until=lambda held: len(held) == len(patient_ids),
            wait=exponential(0.1, cap=1.0),
            sleep=self._sleep,
            stop=lambda waited: waited >= self._claim_wait,
        )

    def _sync(
        self, changes: Sequence[PatientChanges], observations: Sequence[CrmObservation], busy: dict[str, str]
    ) -> SyncReport:
        report = SyncReport(patients=len(changes))
        requests_before = self._gateway.requests_made()
        live = self._drop_archived(list(changes), report)
        ledger, own_opt_outs = self._consent_ledger(live)
        wanted: dict[str, list[str]] = {c.patient.mis_id: [a.mis_id for a in c.appointments] for c in live}
        for obs in observations:
            wanted.setdefault(obs.patient_id, []).extend([obs.appointment_id] if obs.appointment_id else [])
        states = self._store.load_patients(wanted)
        observed = self._observe(observations, states, report)

        matches = self._look_up(live, states)
        plans = self._plan(live, states, matches, ledger)
        moved = self._read_stages(plans, states, report)
        if moved:  # a manager moved or closed a deal we were about to move: plan again, respecting it
            for pid, appointment_ids in moved.items():
                observed.setdefault(pid, []).extend(appointment_ids)
            plans = self._plan(live, states, matches, ledger)
        self._keep_managers_opt_outs(plans, live, ledger, own_opt_outs)
        writes = [w for plan in plans for w in plan.writes] + self._lead_links(observations, states)
        intents = self._record_intents(writes)
        outcome = self._gateway.apply(writes) if writes else WriteOutcome()
        self._sync_audience(plans, live, ledger, outcome, report)
        self._persist(plans, live, states, outcome, report, observed)
        self._note_crm_consent(plans, outcome, own_opt_outs)
        if intents:
            self._store.clear_intents(_settled_intents(intents, writes, outcome))
        report.crm_requests = self._gateway.requests_made() - requests_before
        if outcome.failed or busy:
            raise SyncIncomplete({**busy, **outcome.failed})
        return report

    def _plan(
        self,
        live: Sequence[PatientChanges],
        states: dict[str, PatientState],
        matches: CrmMatches,
        ledger: dict[str, set[str]],
    ) -> list[PatientPlan]:
        """Plan every patient; a lead or deal that another invocation adopted first is left out and the
        batch planned again (each round takes at least one record away, so this ends)."""
        taken: set[str] = set()
        phone_owners = self._phones_in_batch(live)
        while True:
            claimed = set(taken)
            plans = [
                plan_patient(
                    item,
                    states[item.patient.mis_id],
                    matches,
                    self._config,
                    self._hasher,
                    ledger[item.patient.mis_id],
                    self._adoption(item, states, matches, claimed, phone_owners),
                )
                for item in live
            ]
            adoptions = {
                key: w.appointment_id
                for plan in plans
                for w in plan.writes
                if isinstance(w, DealWrite)
                for key in ([f"L{w.lead_id}"] if w.lead_id else []) + ([f"D{w.deal_id}"] if w.link_contact else [])
            }
            if not adoptions:
                return plans
            lost = self._store.claim_adoptions(adoptions, int(time.time()), ADOPTION_CLAIM_SECONDS) - taken
            if not lost:
                return plans
            logger.info("records adopted by another sync; planning without them", extra={"records": len(lost)})
            taken |= lost

    def _read_stages(
        self, plans: Sequence[PatientPlan], states: dict[str, PatientState], report: SyncReport
    ) -> dict[str, list[str]]:
        """Read the current stage of every deal this sync would move, in one list read (a sync without
        stage changes reads nothing), and learn the managers' moves its webhooks have not told us yet."""
        checks = {
            deal_id: (plan.patient_id, write)
            for plan in plans
            for write in plan.writes
            if isinstance(write, DealWrite) and (deal_id := stage_to_check(write, states[plan.patient_id]))
        }
        if not checks:
            return {}
        current = self._gateway.fetch("deal", sorted(checks))
        observations = [
            observation
            for deal_id, (pid, write) in checks.items()
            if (observation := stage_read_observation(write, states[pid], current.get(deal_id))) is not None
        ]
        return self._observe(observations, states, report)

    def _look_up(self, live: Sequence[PatientChanges], states: dict[str, PatientState]) -> CrmMatches:
        """One look-up per message. Always by MIS id before creating (a create whose response was lost
        must not repeat), by phone for patients without a deal yet (adopt open leads and deals, never
        duplicate), and the phone/e-mail entry ids of contacts whose phone or e-mail changed."""
        unknown_patients = [c.patient.mis_id for c in live if states[c.patient.mis_id].contact_id is None]
        unknown_appointments = [
            a.mis_id
            for c in live
            for a in c.appointments
            if states[c.patient.mis_id].appointment(a.mis_id).deal_id is None
        ]
        phones = [
            c.patient.phone
            for c in live
            if c.patient.phone and not states[c.patient.mis_id].has_deal and c.appointments
        ]
        changed_contacts = [
            str(states[c.patient.mis_id].contact_id)
            for c in live
            if states[c.patient.mis_id].contact_id
            and changed_multifields(c.patient, states[c.patient.mis_id], self._hasher)
        ]
        if not (unknown_patients or unknown_appointments or changed_contacts or phones):
            return CrmMatches()
        since = None
        if self._gateway.lookups_need_intents:
            keys = [contact_intent(p) for p in unknown_patients] + [deal_intent(a) for a in unknown_appointments]
            intents = self._store.load_intents(keys) if keys else {}
            since = min(intents.values()) if intents else None
        return self._gateway.find(unknown_patients, unknown_appointments, phones, changed_contacts, since)

    def _record_intents(self, writes: Sequence[CrmWrite]) -> list[str]:
        """Before any create is sent, note it; a lost response is then found by MIS id on the retry."""
        if not self._gateway.lookups_need_intents:
            return []
        keys = [contact_intent(w.patient_id) for w in writes if isinstance(w, ContactWrite) and w.contact_id is None]
        keys += [deal_intent(w.appointment_id) for w in writes if isinstance(w, DealWrite) and w.deal_id is None]
        if keys:
            self._store.write_intents(keys, int(time.time()))
        return keys

    def _phones_in_batch(self, live: Sequence[PatientChanges]) -> dict[str, set[str]]:
        owners: dict[str, set[str]] = {}
        for item in live:
            if item.patient.phone:
                owners.setdefault(item.patient.phone, set()).add(item.patient.mis_id)
        return owners

    def _adoption(
        self,
        item: PatientChanges,
        states: dict[str, PatientState],
        matches: CrmMatches,
        claimed: set[str],
        phone_owners: dict[str, set[str]],
    ) -> Adoption | None:
        phone = item.patient.phone
        if not phone or phone not in matches.phones or states[item.patient.mis_id].has_deal:
            return None  # adoption is for the patient's first new deal only
        pid = item.patient.mis_id
        # A family shares one phone: then no contact is adopted, so two patients never merge.
        others = phone_owners.get(phone, set()) | set(self._store.patients_by_phone(self._hasher.phone_key(phone)))
        return Adoption(matches.phones[phone], claimed, phone_shared=bool(others - {pid}))

    def _observe(
        self, observations: Sequence[CrmObservation], states: dict[str, PatientState], report: SyncReport
    ) -> dict[str, list[str]]:
        changed: dict[str, list[str]] = {}
        for obs in observations:
            touched = apply_observation(states[obs.patient_id], obs, self._config)
            if touched:
                changed.setdefault(obs.patient_id, []).extend(touched)
                report.skipped["manual_move_recorded"] = report.skipped.get("manual_move_recorded", 0) + 1
        return changed

    def _lead_links(self, observations: Sequence[CrmObservation], states: dict[str, PatientState]) -> list[CrmWrite]:
        """A new lead from a known patient's phone is attached to that patient's contact."""
        return [
            LeadWrite(obs.crm_id, obs.patient_id, states[obs.patient_id].contact_id, convert=False)
            for obs in observations
            if obs.kind == "lead_for_patient" and states[obs.patient_id].contact_id
        ]

    def _drop_archived(self, changes: list[PatientChanges], report: SyncReport) -> list[PatientChanges]:
        live = []
        for item in changes:
            if item.patient.archived:
                # A patient deleted or archived in the MIS leaves no state behind in our store.
                self._store.delete_patient(item.patient.mis_id)
                report.removed += 1
            else:
                live.append(item)
        return live

    def _consent_ledger(self, live: Sequence[PatientChanges]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
        """Record the MIS's refusal flags; return every patient's opt-outs, and the patient's own
        subject's (without the address's). The ledger is sticky: an opt-out once recorded stays,
        whatever the MIS says later. An address unsubscribed before we knew whose it was
        (``email:<HMAC>``) counts for the patient who has it now."""
        now = int(time.time())
        subjects = {item.patient.mis_id: patient_subject(item.patient.mis_id) for item in live}
        by_email = {
            item.patient.mis_id: email_subject(self._hasher.email_key(item.patient.email))
            for item in live
            if item.patient.email
        }
        channels = [c.value for c in Channel]
        ledger = self._store.opted_out_many([*subjects.values(), *by_email.values()], channels)
        for item in live:
            subject = subjects[item.patient.mis_id]
            new = sorted({c.value for c in item.patient.consent.opted_out()} - ledger[subject])
            if not new:
                continue
            emails = (item.patient.email,) if item.patient.email else ()
            if self._ledger is not None:
                self._ledger.opt_out([subject], new, "mis", "mis:refusal_flag", now, emails, skip=("mis",))
            else:
                self._store.record_opt_outs(subject, new, "mis", now, "mis:refusal_flag")
            ledger[subject] |= set(new)
        merged = {
            pid: ledger[subject] | (ledger[by_email[pid]] if pid in by_email else set())
            for pid, subject in subjects.items()
        }
        return merged, {pid: ledger[subject] for pid, subject in subjects.items()}

    def _keep_managers_opt_outs(
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
        now, now_own = self._consent_ledger([item for item in live if item.patient.mis_id in pids])
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

    def _note_crm_consent(
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

    def _sync_audience(
        self,
        plans: Sequence[PatientPlan],
        live: Sequence[PatientChanges],
        ledger: dict[str, set[str]],
        outcome: WriteOutcome,
        report: SyncReport,
    ) -> None:
        """Keep consenting patients in the Mailchimp audience: one batch per message, unchanged members
        skipped by hash. A Mailchimp failure never fails the CRM sync; those members are sent next time."""
        if self._audience is None:
            return
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
            return
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
            return
        try:
            accepted = self._audience.upsert(list(members.values()))
        except Exception as exc:  # Mailchimp down: the CRM side is done, members go next time
            logger.warning("mailchimp audience sync failed", extra={"error": type(exc).__name__})
            accepted = set()
        note_accepted_members(self._store, {patient_subject(pid): members[pid] for pid in accepted if pid in members})
        for plan in plans:
            if plan.patient_id in accepted and plan.next_state is not None:
                plan.next_state.audience_hash = digests[plan.patient_id]
        report.audience_members += len(accepted)

    def _persist(
        self,
        plans: Sequence[PatientPlan],
        live: Sequence[PatientChanges],
        states: dict[str, PatientState],
        outcome: WriteOutcome,
        report: SyncReport,
        observed: dict[str, list[str]],
    ) -> None:
        saves: list[tuple[PatientState, list[str]]] = []
        first_keys: list[tuple[str, str]] = []
        planned = {plan.patient_id for plan in plans}
        for pid, appointment_ids in observed.items():
            if pid not in planned and pid not in outcome.failed:
                saves.append((states[pid], appointment_ids))
        for plan, item in zip(plans, live, strict=True):
            for reason in plan.skipped.values():
                report.skipped[reason] = report.skipped.get(reason, 0) + 1
            if plan.next_state is None or plan.patient_id in outcome.failed:
                continue  # failed patients are retried with the message; nothing half-applied is stored
            state = plan.next_state
            for write in plan.writes:
                if isinstance(write, DealWrite):
                    created = write.deal_id is None
                    state.appointments[write.appointment_id].deal_id = outcome.deal_ids.get(write.appointment_id)
                    state.track_deal(state.appointments[write.appointment_id])  # a new deal's id, for re-bookings
                    report.deals_created += created
                    report.deals_updated += not created
                elif isinstance(write, ContactWrite):
                    created = write.contact_id is None
                    state.contact_id = outcome.contact_ids.get(plan.patient_id, state.contact_id)
                    report.contacts_created += created
                    report.contacts_updated += not created
                else:
                    report.leads_adopted += write.convert
            phone = item.patient.phone
            new_key = self._hasher.phone_key(phone) if phone else None
            previous_key = states[plan.patient_id].phone_key
            if new_key and new_key != previous_key:
                if previous_key:
                    self._store.index_phone(new_key, plan.patient_id, previous_key)  # the old key goes too
                else:
                    first_keys.append((new_key, plan.patient_id))
            state.phone_key = new_key
            state.email_key = self._hasher.email_key(item.patient.email) if item.patient.email else None
            saves.append((state, plan.changed_appointments + observed.get(plan.patient_id, [])))
        if first_keys:
            self._store.index_phones(first_keys)  # a patient's first phone: batched, nothing to remove
        if saves:
            self._store.save_patients(saves, states)


def _settled_intents(intents: Sequence[str], writes: Sequence[CrmWrite], outcome: WriteOutcome) -> list[str]:
    """Create intents that may be forgotten: the record exists and its patient's state was stored.

    A patient who failed is retried from an unknown state, so the creates that did land for them must
    stay findable by MIS id: their intents are kept (the chaos suite found the duplicate otherwise)."""
    done = {w.patient_id for w in writes if w.patient_id not in outcome.failed}
    created = {contact_intent(pid) for pid in outcome.contact_ids if pid in done}
    created |= {
        deal_intent(w.appointment_id)
        for w in writes
        if isinstance(w, DealWrite) and w.appointment_id in outcome.deal_ids and w.patient_id in done
    }
    return [k for k in intents if k in created]


def _merge_by_patient(changes: Sequence[PatientChanges]) -> list[PatientChanges]:
    """Several messages may carry the same patient; keep the newest patient record and every visit."""
    merged: dict[str, PatientChanges] = {}
    for item in changes:
        pid = item.patient.mis_id
        current = merged.get(pid)
        if current is None:
            merged[pid] = item
            continue
        patient = item.patient if item.patient.version >= current.patient.version else current.patient
        visits = {a.mis_id: a for a in current.appointments}
        for appt in item.appointments:
            if appt.mis_id not in visits or appt.version >= visits[appt.mis_id].version:
                visits[appt.mis_id] = appt
        merged[pid] = PatientChanges(patient=patient, appointments=tuple(visits.values()))
    return list(merged.values())


class ChangeQueue(Protocol):
    def send(self, messages: Sequence[SyncMessage]) -> None: ...


@dataclass
class PollReport:
    pages: int = 0
    patients: int = 0
    appointments: int = 0
    messages: int = 0
    rejected: int = 0
    stopped_early: bool = False
    skipped_busy: bool = False  # another poll still holds the lease


class Poller:
    """Reads a MIS feed page by page; each page is enqueued before its cursor is stored."""

    SAFETY_MS = 20_000  # stop this long before the Lambda deadline; the next run resumes

    def __init__(
        self, config: ClinicConfig, source: MisSource, store: PollStore, queue: ChangeQueue, hasher: KeyedHasher
    ) -> None:
        self._config = config
        self._source = source
        self._store = store
        self._queue = queue
        self._hasher = hasher

    def poll(self, remaining_ms: Callable[[], int], owner: str = "poller", max_pages: int = 1000) -> PollReport:
        lease = f"poll:{self._source.kind}"
        if not self._store.acquire_lease(lease, owner, remaining_ms() // 1000 + 1, int(time.time())):
            logger.info("previous poll still running; skipping this run")
            return PollReport(skipped_busy=True)
        try:
            return self._poll(remaining_ms, max_pages)
        finally:
            self._store.release_lease(lease, owner)

    def _poll(self, remaining_ms: Callable[[], int], max_pages: int) -> PollReport:
        report = PollReport()
        cursor = self._store.get_cursor(self._source.kind)
        for _ in range(max_pages):
            page = self._source.fetch_changes(cursor)
            self._enqueue(page, report)  # raises if SQS refuses: the cursor then stays where it was
            self._source.acknowledge(page)
            self._store.put_cursor(self._source.kind, page.cursor)
            cursor = page.cursor
            if not page.more:
                break
            if remaining_ms() < self.SAFETY_MS:
                report.stopped_early = True
                logger.info("poll stopped before the deadline", extra={"pages": report.pages})
                break
        return report

    def resync(self, remaining_ms: Callable[[], int], window_seconds: int = 3 * 24 * 3600) -> PollReport:
        """Re-read a whole recent window, whatever the feed style; unchanged records cost no CRM write.

        The regular cursor is left alone, so a resync never makes the incremental feed skip anything.
        """
        report = PollReport()
        cursor = self._source.resync_cursor(window_seconds, time.time())
        while True:
            page = self._source.fetch_changes(cursor)
            self._enqueue(page, report)
            cursor = page.cursor
            if not page.more or remaining_ms() < self.SAFETY_MS:
                report.stopped_early = page.more
                return report

    def backfill(
        self,
        remaining_ms: Callable[[], int],
        checkpoint: BackfillCheckpoint,
        window_days: int,
        restart: bool = False,
        max_pages: int = 1000,
    ) -> BackfillState:
        """The first full import: the resync read over ``window_days``, its cursor checkpointed after each
        enqueued page, so an interrupted import (deadline, crash, operator) resumes where it stopped."""
        state = None if restart else checkpoint.load()
        if state is None:
            state = BackfillState(window_days=window_days, started_at=int(time.time()))
            state.cursor = dict(self._source.resync_cursor(window_days * 86400, time.time()))
            checkpoint.save(state)
        elif not state.done:
            state.resumed = state.pages > 0
        for _ in range(max_pages):
            if state.done:
                break
            report = PollReport()
            page = self._source.fetch_changes(state.cursor)
            self._enqueue(page, report)
            state.cursor = dict(page.cursor)
            state.pages += 1
            state.patients += report.patients
            state.step_patients += report.patients
            state.appointments += report.appointments
            state.messages += report.messages
            state.done = not page.more
            checkpoint.save(state)
            if remaining_ms() < self.SAFETY_MS:
                break
        return state

    def _enqueue(self, page: ChangePage, report: PollReport) -> None:
        report.pages += 1
        report.rejected += page.rejected
        messages = self._pack(page.changes)
        # Index phones before anyone syncs: family members in different shards then see each other,
        # so neither adopts a contact found by their shared phone.
        self._store.index_phones(
            [(self._hasher.phone_key(c.patient.phone), c.patient.mis_id) for c in page.changes if c.patient.phone]
        )
        # A Mailchimp event names an address: the ledger must find the patient behind it.
        self._store.index_emails(
            [
                (self._hasher.email_key(c.patient.email), patient_subject(c.patient.mis_id))
                for c in page.changes
                if c.patient.email
            ]
        )
        if messages:
            self._queue.send(messages)
        report.messages += len(messages)
        report.patients += len(page.changes)
        report.appointments += sum(len(c.appointments) for c in page.changes)

    def _pack(self, changes: Sequence[PatientChanges]) -> list[SyncMessage]:
        by_shard: dict[int, list[PatientChanges]] = {}
        for item in changes:
            by_shard.setdefault(shard_of(item.patient.mis_id, self._config.shards), []).append(item)
        now = datetime.now(UTC)
        size = self._config.patients_per_message
        return [
            SyncMessage(
                clinic_id=self._config.clinic_id,
                shard=shard,
                produced_at=now,
                changes=tuple(group[i : i + size]),
            )
            for shard, group in sorted(by_shard.items())
            for i in range(0, len(group), size)
        ]
