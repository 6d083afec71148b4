"""Use case: poll a MIS into the sync queue (incremental feed, resync window, first import).

Each page is enqueued before its cursor is stored, so a crash never skips a change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from clinicsync.domain.backfill import BackfillCheckpoint, BackfillState
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.keys import patient_subject, shard_of
from clinicsync.domain.models import PatientChanges, SyncMessage, lean_json
from clinicsync.domain.ports import ChangePage, MisSource
from clinicsync.domain.store_ports import PollStore
from clinicsync.observability import logger

# A message body stays under SQS's 256 KiB (the queue adapter refuses above 240,000 bytes): whatever
# the patient count, a message is cut before its changes pass this many bytes.
MESSAGE_BYTES = 230_000
ENVELOPE_BYTES = 200  # kind, shard, timestamp and the JSON around the changes, besides the clinic id


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
        self,
        config: ClinicConfig,
        source: MisSource,
        store: PollStore,
        queue: ChangeQueue,
        hasher: KeyedHasher,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._clock = clock
        self._source = source
        self._store = store
        self._queue = queue
        self._hasher = hasher

    def poll(self, remaining_ms: Callable[[], int], owner: str = "poller", max_pages: int = 1000) -> PollReport:
        kind = self._source.kind
        if not self._store.take_poll(kind, owner, remaining_ms() // 1000 + 1, int(self._clock())):
            logger.info("previous poll still running; skipping this run")
            return PollReport(skipped_busy=True)
        try:
            return self._poll(remaining_ms, max_pages)
        finally:
            self._store.release_poll(kind, owner)

    def _poll(self, remaining_ms: Callable[[], int], max_pages: int) -> PollReport:
        report = PollReport()
        run = self._run_at(self._clock())
        cursor = self._store.poll_cursor(self._source.kind)
        for _ in range(max_pages):
            page = self._source.fetch_changes(cursor)
            self._enqueue(page, report, run=run)  # raises if SQS refuses: the cursor then stays where it was
            self._source.acknowledge(page)
            self._store.store_poll_cursor(self._source.kind, page.cursor)
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
        run = self._run_at(self._clock())
        cursor = self._source.resync_cursor(window_seconds, self._clock())
        while True:
            page = self._source.fetch_changes(cursor)
            self._enqueue(page, report, bulk=True, run=run)
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
            state = BackfillState(window_days=window_days, started_at=int(self._clock()))
            state.cursor = dict(self._source.resync_cursor(window_days * 86400, self._clock()))
            checkpoint.save(state)
        elif not state.done:
            state.resumed = state.pages > 0
        for _ in range(max_pages):
            if state.done:
                break
            report = PollReport()
            page = self._source.fetch_changes(state.cursor)
            self._enqueue(page, report, bulk=True, run=self._run_at(state.started_at))  # one run, resumed or not
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

    @staticmethod
    def _run_at(started: float) -> datetime:
        """Every message of one poll run carries its start as ``produced_at``: the syncer tells by it what
        one run read (a no-show and its re-booking first seen in one run keep two deals, whichever pages
        they came in), and the lag it reports runs from the poll that read the change."""
        return datetime.fromtimestamp(started, UTC)

    def _enqueue(self, page: ChangePage, report: PollReport, bulk: bool = False, *, run: datetime) -> None:
        """``bulk`` (resync, first import): bigger messages, so the import takes fewer syncer invocations
        and pays their fixed costs (look-ups, part-filled last batches) fewer times; an incremental
        poll keeps small messages for latency."""
        report.pages += 1
        report.rejected += page.rejected
        size = self._config.bulk_patients_per_message if bulk else self._config.patients_per_message
        messages = self._pack(page.changes, size, run)
        # Index phones before anyone syncs: family members in different shards then see each other,
        # so neither adopts a contact found by their shared phone. A Mailchimp event names an address:
        # the ledger must find the patient behind it.
        self._store.index_contacts(
            [(self._hasher.phone_key(c.patient.phone), c.patient.mis_id) for c in page.changes if c.patient.phone],
            [
                (self._hasher.email_key(c.patient.email), patient_subject(c.patient.mis_id))
                for c in page.changes
                if c.patient.email
            ],
        )
        if messages:
            self._queue.send(messages)
        report.messages += len(messages)
        report.patients += len(page.changes)
        report.appointments += sum(len(c.appointments) for c in page.changes)

    def _pack(self, changes: Sequence[PatientChanges], size: int, run: datetime) -> list[SyncMessage]:
        by_shard: dict[int, list[PatientChanges]] = {}
        for item in changes:
            by_shard.setdefault(shard_of(item.patient.mis_id, self._config.shards), []).append(item)
        return [
            SyncMessage(clinic_id=self._config.clinic_id, shard=shard, produced_at=run, changes=tuple(chunk))
            for shard, group in sorted(by_shard.items())
            for chunk in _chunks(group, size, self._config.clinic_id)
        ]


def _chunks(group: Sequence[PatientChanges], size: int, clinic_id: str) -> list[list[PatientChanges]]:
    """In order: at most ``size`` patients and MESSAGE_BYTES of changes per chunk (one patient alone may
    exceed it: the queue then refuses that message loudly rather than losing it)."""
    chunks: list[list[PatientChanges]] = []
    chunk: list[PatientChanges] = []
    envelope = ENVELOPE_BYTES + len(clinic_id.encode())
    used = envelope
    for item in group:
        weight = len(lean_json(item).encode()) + 1
        if chunk and (len(chunk) == size or used + weight > MESSAGE_BYTES):
            chunks.append(chunk)
            chunk, used = [], envelope
        chunk.append(item)
        used += weight
    if chunk:
        chunks.append(chunk)
    return chunks
