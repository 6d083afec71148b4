"""What the CRM tells us: webhook events and the catch-up for the ones that never arrived.

Events carry only an entity and an id. The processor re-fetches them in batches, ignores echoes of
our own writes, and turns what managers did into observations for the patient's shard (so the
patient's state keeps a single writer), or into consent-ledger entries. Only records that carry our
MIS id flow back; everything else in the CRM is left alone.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from clinicsync.application.consent import ConsentLedger
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.crm_ports import CrmGateway, CrmPaused, CrmUnavailable
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.deal_stages import deal_observation
from clinicsync.domain.keys import patient_subject, shard_of
from clinicsync.domain.models import Channel, CrmEvent, CrmObservation, SyncMessage
from clinicsync.domain.store_ports import CrmEventStore, Cursors, OptInsSeen
from clinicsync.observability import logger

if TYPE_CHECKING:  # the sync queue's port; the poller's use case itself is not the syncer's
    from clinicsync.application.poll import ChangeQueue

CATCHUP_CURSOR = "crm-catchup"
CATCHUP_OVERLAP = timedelta(seconds=120)  # DATE_MODIFY has one-second resolution and lags a little
CATCHUP_LIMIT = 2000  # per entity and run; the next run continues from the cursor


@dataclass
class EventReport:
    events: int = 0
    echoes: int = 0
    not_ours: int = 0
    manual_moves: int = 0
    leads_for_patients: int = 0
    ambiguous_leads: int = 0
    opt_outs: int = 0
    opt_ins: int = 0
    foreign_contacts: int = 0  # carry a MIS id but are not the contact we map to that patient
    paused: bool = False  # the CRM throttled or failed the catch-up: the cursor stays, the next run reads it again
    observations: list[CrmObservation] = field(default_factory=list)


class CrmEventProcessor:
    def __init__(
        self,
        config: ClinicConfig,
        store: CrmEventStore,
        gateway: CrmGateway,
        hasher: KeyedHasher,
        queue: ChangeQueue,
        ledger: ConsentLedger,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ledger = ledger
        self._config = config
        self._store = store
        self._gateway = gateway
        self._hasher = hasher
        self._queue = queue
        self._clock = clock
        self._snapshots: dict[tuple[str, str], dict[str, str]] = {}

    def prefetch(self, events: Sequence[CrmEvent]) -> None:
        """Fetch every entity the batch mentions in as few CRM requests as the batch size allows.

        A bulk edit of 10 000 deals becomes 10 000 events; duplicates in a batch are fetched once.
        """
        for event in events:
            if event.snapshot is not None:
                self._snapshots[(event.entity, event.crm_id)] = event.snapshot
        for entity in ("deal", "lead", "contact"):
            ids = sorted({e.crm_id for e in events if e.entity == entity and (entity, e.crm_id) not in self._snapshots})
            if ids:
                for crm_id, snapshot in self._gateway.fetch(entity, ids).items():
                    self._snapshots[(entity, crm_id)] = snapshot

    def handle(self, event: CrmEvent, report: EventReport) -> None:
        """Decide what one event means. Observations are collected and sent by ``flush``."""
        report.events += 1
        snapshot = self._snapshots.get((event.entity, event.crm_id))
        if snapshot is None:
            if (event.entity, event.crm_id) not in self._snapshots:
                self.prefetch([event])
            snapshot = self._snapshots.get((event.entity, event.crm_id))
        if snapshot is None:
            report.not_ours += 1  # deleted since, or never visible to the integration user
            return
        if snapshot.get("modified_by") and snapshot["modified_by"] == self._gateway.integration_user():
            report.echoes += 1  # saved under our integration user: our own write, or a manager using its login
            if event.entity == "contact" and snapshot.get("owner"):
                mapped = functools.cache(lambda: self._mapped_subject(snapshot))  # one mapping read for both
                self._unrecorded_opt_outs(snapshot, mapped, report)
                self._opt_ins_under_our_login(snapshot, mapped, report)
            return
        if event.entity == "deal":
            self._deal(snapshot, report)
        elif event.entity == "lead":
            self._lead(snapshot, report)
        else:
            self._contact(snapshot, report)

    def _deal(self, snapshot: dict[str, str], report: EventReport) -> None:
        mapping = self._store.patient_for_crm("deal", snapshot["id"]) if snapshot.get("owner") else None
        if mapping is None:
            report.not_ours += 1
            return
        report.manual_moves += 1
        report.observations.append(deal_observation(snapshot, mapping["patient_id"], mapping.get("appointment_id")))

    def _lead(self, snapshot: dict[str, str], report: EventReport) -> None:
        if snapshot.get("contact_id") or not snapshot.get("phone"):
            report.not_ours += 1
            return
        adoptable = {*self._config.matching.adopt_lead_statuses, *self._config.matching.adopt_deal_stages}
        if snapshot.get("status") not in adoptable:
            report.not_ours += 1
            return
        patients = self._store.patients_by_phone(self._hasher.phone_key(snapshot["phone"]))
        if len(patients) != 1:
            # Nobody, or a family sharing the phone: the first new deal of a patient without one yet
            # adopts it (see rules.Adoption); nobody's contact is guessed here.
            report.ambiguous_leads += len(patients) > 1
            return
        report.leads_for_patients += 1
        report.observations.append(
            CrmObservation(kind="lead_for_patient", patient_id=patients[0], crm_id=snapshot["id"])
        )

    def _unrecorded_opt_outs(
        self, snapshot: dict[str, str], mapped: Callable[[], str | None], report: EventReport
    ) -> None:
        """An echo's opt-out field. Our writes list only channels the ledger already holds, so a channel it
        has no record of was ticked by a manager working under the integration's login (amoCRM acts as the
        user who granted the token): an opt-out like any other. A channel the ledger holds, lifted or not,
        is not taken from an echo: the field may be one we have not rewritten since an opt-in lifted it."""
        listed = _channels(snapshot, "opt_outs")
        subject = mapped() if listed else None
        if subject is None:
            return
        fresh = sorted(set(listed) - self._store.channels_on_record(subject, listed))
        if fresh and self._ledger.opt_out([subject], fresh, "crm", "crm:opt_out_field"):
            report.opt_outs += len(fresh)

    def _opt_ins_under_our_login(
        self, snapshot: dict[str, str], mapped: Callable[[], str | None], report: EventReport
    ) -> None:
        """An echo's opt-in field. We never write that field, so a channel it gained was ticked by a manager
        working under the integration's login. The save's time may be a later write of ours, so the opt-in is
        dated when the field was last seen without it: never later than the tick, it lifts only an opt-out
        older than that sighting (an opt-out since stands, as the rules want of any doubt)."""
        subject = patient_subject(snapshot["owner"])  # the field as saved is the new baseline either way
        seen = self._opt_in_field_changes(subject, snapshot, held=_channels(snapshot, "opt_outs"))
        if not seen.gained or seen.last_seen_at is None or mapped() is None:
            return
        if self._ledger.opt_in(subject, seen.gained, "crm", seen.last_seen_at, "crm:opt_in_field:echo"):
            report.opt_ins += len(seen.gained)

    def _mapped_subject(self, snapshot: dict[str, str]) -> str | None:
        """The patient's consent subject if this is the contact we map to them: only that contact speaks for
        their consent, never a duplicate a manager made by hand with the same MIS id."""
        owner = snapshot.get("owner")
        mapped = self._store.patient_for_crm("contact", snapshot["id"]) if owner else None
        return patient_subject(owner) if owner and mapped and mapped.get("patient_id") == owner else None

    def _contact(self, snapshot: dict[str, str], report: EventReport) -> None:
        if not snapshot.get("owner"):
            report.not_ours += 1  # only contacts that carry a MIS id flow back
            return
        subject = self._mapped_subject(snapshot)
        if subject is None:
            report.foreign_contacts += 1
            return
        channels = _channels(snapshot, "opt_outs")
        if channels and self._ledger.opt_out([subject], channels, "crm", "crm:opt_out_field"):
            report.opt_outs += len(channels)
        # An opt-in counts only when the field itself changed to it, never because the record was touched
        # (its modification time moves with any edit); it then lifts only an older opt-out.
        opt_ins = self._opt_in_field_changes(subject, snapshot, held=channels).gained
        modified = snapshot.get("modified_at")
        if opt_ins and modified:
            at = int(datetime.fromisoformat(modified).timestamp())
            if self._ledger.opt_in(subject, opt_ins, "crm", at, "crm:opt_in_field"):
                report.opt_ins += len(opt_ins)

    def _opt_in_field_changes(self, subject: str, snapshot: dict[str, str], held: Sequence[str] = ()) -> OptInsSeen:
        """Channels the contact's opt-in field gained since we last saw or wrote it (see the store); a
        channel the opt-out field still lists waits until that field is cleared."""
        modified = snapshot.get("modified_at")
        if not modified:
            return OptInsSeen([])
        at = int(datetime.fromisoformat(modified).timestamp())
        return self._store.observe_crm_opt_ins(subject, snapshot["id"], _channels(snapshot, "opt_ins"), at, held)

    def take_in_contacts(self, contact_ids: Sequence[str]) -> EventReport:
        """Read contacts now (one list request per batch) and take in what managers changed on them, as
        their webhooks would. The consent job calls this before it writes opt-out fields, so a manager's
        tick whose webhook is still on its way reaches the ledger first and is kept, not overwritten."""
        report = EventReport()
        received = int(self._clock())
        events = [
            CrmEvent.model_validate(
                {
                    "crm": self._gateway.kind,
                    "event": "CONSENT_READ",
                    "entity": "contact",
                    "crm_id": crm_id,
                    "source": "consent",
                    "received_at": received,
                    "snapshot": row,
                }
            )
            for crm_id, row in self._gateway.fetch("contact", contact_ids).items()
        ]
        self.prefetch(events)
        for event in events:
            self.handle(event, report)
        self.flush(report)
        return report

    def flush(self, report: EventReport) -> None:
        """Send the observations to each patient's shard; the syncer applies them there."""
        by_shard: dict[int, list[CrmObservation]] = {}
        for obs in report.observations:
            by_shard.setdefault(shard_of(obs.patient_id, self._config.shards), []).append(obs)
        now = datetime.now(UTC)
        messages = [
            SyncMessage(clinic_id=self._config.clinic_id, shard=shard, produced_at=now, observations=tuple(group))
            for shard, group in sorted(by_shard.items())
        ]
        if messages:
            self._queue.send(messages)
        report.observations.clear()


def _channels(snapshot: dict[str, str], name: str) -> list[str]:
    known = {c.value for c in Channel}
    return sorted({c.strip() for c in snapshot.get(name, "").split(",")} & known)


class CrmCatchUp:
    """The CRM never retries an event, so a schedule reads what changed since the last run."""

    def __init__(self, store: Cursors, gateway: CrmGateway, processor: CrmEventProcessor) -> None:
        self._store = store
        self._gateway = gateway
        self._processor = processor

    def run(self, now: datetime | None = None) -> EventReport:
        now = now or datetime.now(UTC)
        cursor = self._store.get_cursor(CATCHUP_CURSOR)
        since = datetime.fromisoformat(str(cursor["since"])) if cursor else now - timedelta(hours=1)
        report = EventReport()
        received = int(now.timestamp())
        try:
            newest = self._read(since, received, report)
        except (CrmPaused, CrmUnavailable) as exc:
            # A throttle or an outage that outlasted the retries is no failed run: what was handled is sent,
            # the cursor stays where it was, and the next scheduled run reads the same window again
            # (handling an event twice changes nothing). CrmCatchUpPaused counts these runs.
            report.paused = True
            self._processor.flush(report)
            reason = "rate_limit" if isinstance(exc, CrmPaused) else "unavailable"
            logger.warning("crm catch-up paused", extra={"reason": reason, "events": report.events})
            return report
        self._processor.flush(report)
        self._store.put_cursor(CATCHUP_CURSOR, {"since": newest.isoformat()})
        logger.info("crm catch-up finished", extra={"events": report.events, "manual_moves": report.manual_moves})
        return report

    def _read(self, since: datetime, received: int, report: EventReport) -> datetime:
        """Handle every entity changed since ``since``; the newest modification time seen."""
        newest = since
        for entity in ("deal", "lead", "contact"):
            rows = self._gateway.changed_since(entity, (since - CATCHUP_OVERLAP).isoformat(), CATCHUP_LIMIT)
            events = [
                CrmEvent.model_validate(
                    {
                        "crm": self._gateway.kind,
                        "event": "CATCHUP",
                        "entity": entity,
                        "crm_id": row["id"],
                        "source": "catchup",
                        "received_at": received,
                        "snapshot": row,
                    }
                )
                for row in rows
            ]
            self._processor.prefetch(events)
            for event in events:
                self._processor.handle(event, report)
            for row in rows:
                if row.get("modified_at"):
                    newest = max(newest, datetime.fromisoformat(row["modified_at"]))
        return newest
