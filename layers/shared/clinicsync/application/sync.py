"""Use case: sync queued change sets into the CRM through the rules, ports and store; no vendor here."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from clinicsync.application.consent import ConsentLedger, CrmContactReader
from clinicsync.application.sync_claims import claim_patients, mark_unsure
from clinicsync.application.sync_consent import SyncConsent
from clinicsync.application.sync_lookup import Known, SyncLookup, load_holders, settled_intents
from clinicsync.application.sync_writes import SyncWork, apply_with_held
from clinicsync.domain.audience import AudienceUpserts
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.crm_ports import (
    CHANGED_SINCE_READ,
    ContactWrite,
    CrmGateway,
    CrmMatches,
    CrmWrite,
    DealWrite,
    LeadWrite,
    LookupInWrites,
    WriteOutcome,
)
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.deal_stages import held_stage, stage_read_observation, stage_to_check
from clinicsync.domain.models import CrmObservation, PatientChanges, merge_by_patient
from clinicsync.domain.rules import PatientPlan, apply_observation, plan_patient, unguarded
from clinicsync.domain.state import PatientState
from clinicsync.domain.store_ports import ClaimRelease, SyncStore
from clinicsync.observability import logger

# A claim outlives the syncer's Lambda timeout (300 s), so a live invocation never loses it, and ends
# before the sync queue's visibility timeout (1800 s), so a killed invocation's retry finds it expired.
CLAIM_SECONDS = 600
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
        audience: AudienceUpserts | None = None,
        claim_wait: float = CLAIM_WAIT_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
        crm_contacts: CrmContactReader | None = None,
        clock: Callable[[], float] = time.time,
        verify: Callable[[], ClinicConfig] | None = None,
    ) -> None:
        self._config = config
        # A container's first sync: ``verify`` gives ``config`` checked against the CRM, by its look-up's reads.
        self._verify = verify
        self._clock = clock
        self._store = store
        self._gateway = gateway
        self._hasher = hasher
        self._lookup = SyncLookup(store, gateway, hasher, clock)
        self._consent = SyncConsent(config, store, hasher, ledger, audience, crm_contacts, clock)
        self._claim_wait = claim_wait
        self._sleep = sleep

    def sync(self, changes: Sequence[PatientChanges], observations: Sequence[CrmObservation] = ()) -> SyncReport:
        """Sync one message. Each patient is claimed first (single writer, whatever delivered the
        message); a patient another invocation holds is deferred: the message is retried for it."""
        merged = merge_by_patient(changes)
        wanted = list(dict.fromkeys([c.patient.mis_id for c in merged] + [o.patient_id for o in observations]))
        owner = uuid.uuid4().hex
        claimed = claim_patients(self._store, wanted, owner, CLAIM_SECONDS, self._clock, self._sleep, self._claim_wait)
        release = ClaimRelease(sorted(claimed))  # with the states' write if it fits, else after it
        try:
            if claimed.taken_over:  # their last attempt died holding them: it may have written anything
                mark_unsure(self._store, sorted(claimed.taken_over), release)
            busy = {pid: BUSY for pid in wanted if pid not in claimed}
            if busy:
                logger.warning("patients held by another sync; deferred", extra={"patients": len(busy)})
            report = self._sync(
                [c for c in merged if c.patient.mis_id in claimed],
                [o for o in observations if o.patient_id in claimed],
                busy,
                release,
            )
        finally:
            if claimed and not release.done:
                self._store.release_claims(release.patients, release.intents)
        report.patients = len(changes)
        return report

    def _sync(
        self,
        changes: Sequence[PatientChanges],
        observations: Sequence[CrmObservation],
        busy: dict[str, str],
        release: ClaimRelease,
    ) -> SyncReport:
        """The claimed patients' sync, in steps: read, look up, plan, check before writing (guards or a read),
        write, plan again what a guard refused, consent and audience, persist (``release`` goes with it)."""
        report = SyncReport(patients=len(changes))
        requests_before = self._gateway.requests_made()
        live = self._drop_archived(list(changes), report)
        known = self._read(live, observations, report)
        work = self._look_up(live, known)
        work.plans = self._plan(work.live, known.states, work.matches, known.ledger)
        work.links = self._lead_links(observations, known.states)
        self._check_before_writing(work, known, report)
        work.intents = self._lookup.record_intents(work.writes)  # before any create is sent
        try:
            outcome = self._apply(work, known)
            self._replan_refused(work, outcome, known, report)
            report.audience_members += self._consent.sync_audience(work.plans, work.live, known.ledger, outcome)
            self._consent.note_crm_consent(work.plans, outcome, known.own_opt_outs)
            self._persist(work, outcome, known, report, release)  # the sync's last write
        except BaseException:  # whatever stops it, the claims are released (finally): doubt the digests first
            release.intents = []  # states not stored: the intents stay, so the retry looks the creates up
            with contextlib.suppress(Exception):  # the error that stopped the sync is the one raised
                mark_unsure(self._store, work.maybe_sent(), release)
            raise
        report.crm_requests = self._gateway.requests_made() - requests_before
        if outcome.failed or busy:
            raise SyncIncomplete({**busy, **outcome.failed})
        return report

    def _read(self, live: list[PatientChanges], observations: Sequence[CrmObservation], report: SyncReport) -> Known:
        """States, create intents and consent ledgers in one batched read, not one request (or more) each;
        then the MIS's refusals recorded in the ledger and the message's CRM observations applied."""
        wanted: dict[str, list[str]] = {c.patient.mis_id: [a.mis_id for a in c.appointments] for c in live}
        for obs in observations:
            wanted.setdefault(obs.patient_id, []).extend([obs.appointment_id] if obs.appointment_id else [])
        read = self._store.read_for_sync(wanted, self._lookup.intent_keys(live), self._consent.subjects(live))
        ledger, own_opt_outs = self._consent.ledger(live, read.opted_out, read.on_record)
        observed = self._observe(observations, read.states, report)
        return Known(read.states, ledger, own_opt_outs, observed, read.intents)

    def _look_up(self, live: list[PatientChanges], known: Known) -> SyncWork:
        """One look-up per message. A gateway that guards its writes and can carry the look-up's last phones
        in its first write request defers them: their patients are held, planned when it answers (``_apply``)."""
        overlap = self._gateway.guards_writes and isinstance(self._gateway, LookupInWrites)
        matches = self._lookup.look_up(live, known.states, known.intents, defer_phones=overlap)
        held = [item for item in live if item.patient.phone in matches.deferred_phones]
        live = [item for item in live if item.patient.phone not in matches.deferred_phones]
        return SyncWork(live, held, matches)

    def _check_before_writing(self, work: SyncWork, known: Known, report: SyncReport) -> None:
        """A manager's change is never written over: a gateway that guards its writes carries the checks in
        the write request (no read before it); any other reads the records first and plans again."""
        if self._gateway.guards_writes:
            work.plans = [self._guarded(plan, known.states[plan.patient_id]) for plan in work.plans]
        else:
            work.plans = self._read_then_plan(work.live, work.plans, work.matches, known, report)
        work.writes = [w for plan in work.plans for w in plan.writes] + work.links

    def _apply(self, work: SyncWork, known: Known) -> WriteOutcome:
        """The writes. Patients held for their phones' look-up are planned (guarded) when it answers; their
        share fills ``work.added`` as the writes run, and joins the working set if the look-up answered."""
        if not (work.held and isinstance(gateway := self._gateway, LookupInWrites)):
            return self._gateway.apply(work.writes) if work.writes else WriteOutcome()

        def plan(items: list[PatientChanges], found: CrmMatches) -> list[PatientPlan]:
            plans = self._plan(items, known.states, found, known.ledger)
            return [self._guarded(plan, known.states[plan.patient_id]) for plan in plans]

        record = self._lookup.record_intents
        outcome = apply_with_held(gateway, work.writes, work.matches, work.held, record, plan, work.added)
        work.join_held()
        return outcome

    def _replan_refused(self, work: SyncWork, outcome: WriteOutcome, known: Known, report: SyncReport) -> None:
        """A guard found a manager's change (``CHANGED_SINCE_READ``): read those records, plan those patients
        again respecting it, and write them unguarded (the records were just read)."""
        changed = sorted(pid for pid, why in outcome.failed.items() if why == CHANGED_SINCE_READ)
        if not changed:
            return
        ids = set(changed)
        for pid in changed:
            del outcome.failed[pid]
        again = [item for item in work.live if item.patient.mis_id in ids]
        old = [unguarded(plan) for plan in work.plans if plan.patient_id in ids]
        new = self._read_then_plan(again, old, work.matches, known, report)
        more = [w for plan in new for w in plan.writes] + [w for w in work.links if w.patient_id in ids]
        work.writes += more  # before they are sent: the failure path and the settled intents see every write
        outcome.merge(self._gateway.apply(more) if more else WriteOutcome())
        by_patient = {plan.patient_id: plan for plan in new}
        work.plans = [by_patient.get(plan.patient_id, plan) for plan in work.plans]

    def _verified(self) -> None:
        # Two callers, not one after the look-up: a message's observations are applied before it and need the
        # CRM's closed stages (the check then goes alone); _plan's call comes after it (test_first_sync_check.py).
        if self._verify is not None:
            self._config, self._verify = self._verify(), None

    def _plan(
        self,
        live: Sequence[PatientChanges],
        states: dict[str, PatientState],
        matches: CrmMatches,
        ledger: dict[str, set[str]],
    ) -> list[PatientPlan]:
        """Plan every patient; a lead or deal that another invocation adopted first is left out and the
        batch planned again (each round takes at least one record away, so this ends)."""
        self._verified()  # after the look-up, which carried the stages' reads
        taken: set[str] = set()
        phone_owners = self._lookup.phones_in_batch(live)
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
                    self._lookup.adoption(item, states, matches, claimed, phone_owners),
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
            lost = self._store.claim_adoptions(adoptions, int(self._clock()), ADOPTION_CLAIM_SECONDS) - taken
            if not lost:
                return plans
            logger.info("records adopted by another sync; planning without them", extra={"records": len(lost)})
            taken |= lost

    def _read_then_plan(
        self,
        live: Sequence[PatientChanges],
        plans: list[PatientPlan],
        matches: CrmMatches,
        known: Known,
        report: SyncReport,
    ) -> list[PatientPlan]:
        """Read what a manager may have changed on the records the plans write over, and plan again if
        they did (a gateway that cannot check in its write request, or a guard that failed)."""
        moved = self._read_stages(plans, known.states, report)
        if moved:  # a manager moved or closed a deal we were about to move: plan again, respecting it
            for pid, appointment_ids in moved.items():
                known.observed.setdefault(pid, []).extend(appointment_ids)
            plans = self._plan(live, known.states, matches, known.ledger)
        self._consent.keep_managers_opt_outs(plans, live, known.ledger, known.own_opt_outs)
        return plans

    def _guarded(self, plan: PatientPlan, state: PatientState) -> PatientPlan:
        """The plan's updates made conditional on finding their records as we left them: a stage change
        on the deal's stage (``stage_to_check``), a contact update on our being its last modifier."""
        writes: list[CrmWrite] = []
        for write in plan.writes:
            if isinstance(write, DealWrite) and stage_to_check(write, state):
                writes.append(replace(write, expect_stage=held[1]) if (held := held_stage(write, state)) else write)
            elif isinstance(write, ContactWrite) and write.contact_id and self._consent.reads_contacts:
                writes.append(replace(write, expect_ours=True))
            else:
                writes.append(write)
        plan.writes = writes
        return plan

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
        load_holders(self._store, checks, states)
        current = self._gateway.fetch("deal", sorted(checks))
        ours = self._gateway.integration_user()
        observations = [
            observation
            for deal_id, (pid, write) in checks.items()
            if (observation := stage_read_observation(write, states[pid], current.get(deal_id), ours)) is not None
        ]
        return self._observe(observations, states, report)

    def _observe(
        self, observations: Sequence[CrmObservation], states: dict[str, PatientState], report: SyncReport
    ) -> dict[str, list[str]]:
        changed: dict[str, list[str]] = {}
        if observations:
            self._verified()
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

    def _persist(
        self, work: SyncWork, outcome: WriteOutcome, known: Known, report: SyncReport, release: ClaimRelease
    ) -> None:
        """The states' write, with the create intents it settles (their records exist and are stored)."""
        release.intents = settled_intents(work.intents, work.writes, outcome) if work.intents else []
        if outcome.failed:  # writes of unknown outcome: their digests are doubted before the claims go
            mark_unsure(self._store, sorted(outcome.failed), release)
        saves: list[tuple[PatientState, list[str]]] = []
        planned = {plan.patient_id for plan in work.plans}
        for pid, appointment_ids in known.observed.items():
            if pid not in planned and pid not in outcome.failed:
                saves.append((known.states[pid], appointment_ids))
        for plan, item in zip(work.plans, work.live, strict=True):
            for reason in plan.skipped.values():
                report.skipped[reason] = report.skipped.get(reason, 0) + 1
            if plan.next_state is None or plan.patient_id in outcome.failed:
                continue  # failed patients are retried with the message; nothing half-applied is stored
            state = plan.next_state
            for write in plan.writes:
                if isinstance(write, DealWrite):
                    created = write.deal_id is None
                    state.appointments[write.appointment_id].deal_id = outcome.deal_ids.get(write.appointment_id)
                    state.track_deal(state.appointments[write.appointment_id], item.polled_at)  # a new deal's id
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
            previous_key = known.states[plan.patient_id].phone_key
            # A first phone was indexed by the poller before it queued the change; a changed one moves here.
            if new_key and previous_key and new_key != previous_key:
                self._store.index_phone(new_key, plan.patient_id, previous_key)
            state.phone_key = new_key
            state.email_key = self._hasher.email_key(item.patient.email) if item.patient.email else None
            saves.append((state, plan.changed_appointments + known.observed.get(plan.patient_id, [])))
        if saves:
            self._store.save_patients(saves, known.states, release)
