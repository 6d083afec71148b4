"""One connector run: read what changed, translate, filter, batch, push, then move the cursor.

The cursor moves only after every batch of the run was accepted, so a run that dies half-way is simply
repeated; the stack applies a batch twice without effect (records carry their IDENT versions).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from clinicsync.adapters.ident.contract import MAX_BATCH_BYTES, ConnectorBatch
from clinicsync.domain.config import Filters
from clinicsync.domain.models import Appointment, Patient, PatientChanges
from clinicsync.domain.payloads import appointment_excluded, patient_excluded
from clinicsync_ident.db import IdentDatabase
from clinicsync_ident.push import StackClient, StackUnavailable
from clinicsync_ident.state import ConnectorState
from clinicsync_ident.translate import (
    appointment_from_booking,
    appointment_from_walk_in,
    doctors_seen,
    no_show_due,
    patient_from_row,
)

NO_SHOW_LOOKBACK = timedelta(days=2)  # a booking's start precedes its due time by its length plus grace


@dataclass
class RunReport:
    patients: int = 0
    appointments: int = 0
    batches: int = 0
    excluded: dict[str, int] = field(default_factory=dict)
    rejected: int = 0
    no_shows: int = 0
    settings_from_cache: bool = False

    def exclude(self, reason: str) -> None:
        self.excluded[reason] = self.excluded.get(reason, 0) + 1


@dataclass(frozen=True)
class ClinicSettings:
    tz: ZoneInfo
    region: str
    grace: timedelta
    filters: Filters

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> ClinicSettings:
        return cls(
            tz=ZoneInfo(str(reply["timezone"])),
            region=str(reply.get("default_region") or "RU"),
            grace=timedelta(minutes=int(reply.get("no_show_grace_minutes", 120))),
            filters=Filters.model_validate(reply.get("filters") or {}),
        )


class Connector:
    def __init__(
        self,
        connector_id: str,
        database: IdentDatabase,
        stack: StackClient,
        state: ConnectorState,
        save_state: Callable[[ConnectorState], None],
        *,
        clock: Callable[[], float] = time.time,
        first_sync_days: int = 90,
        overlap_seconds: int = 120,
        patients_per_batch: int = 100,
    ) -> None:
        self._id = connector_id
        self._db = database
        self._stack = stack
        self._state = state
        self._save = save_state
        self._clock = clock
        self._first_sync = timedelta(days=first_sync_days)
        self._overlap = timedelta(seconds=overlap_seconds)
        self._per_batch = patients_per_batch

    @property
    def state(self) -> ConnectorState:
        return self._state

    def close(self) -> None:
        self._db.close()

    def settings(self, report: RunReport) -> ClinicSettings:
        """The clinic's filters and time zone from the stack; the last good answer if it is unreachable.
        Without any answer nothing is sent: the connector never guesses what the clinic excludes."""
        try:
            reply = self._stack.settings()
        except StackUnavailable:
            if self._state.settings is None:
                raise
            report.settings_from_cache = True
            return ClinicSettings.from_reply(self._state.settings)
        self._state.settings = reply
        return ClinicSettings.from_reply(reply)

    def run_once(self, resync_days: int | None = None) -> RunReport:
        report = RunReport()
        clinic = self.settings(report)
        now_local = datetime.fromtimestamp(self._clock(), clinic.tz).replace(tzinfo=None, microsecond=0)
        if resync_days is not None:
            since = now_local - timedelta(days=resync_days)
        elif self._state.changed_since is None:
            since = now_local - self._first_sync
        else:
            since = self._state.changed_since - self._overlap
        changed = self._db.changed_since(since)
        bookings = set(changed.bookings)
        patients = set(changed.patients)
        # Bookings that turned into no-shows since the last sweep: nothing in IDENT changes for them.
        swept_from = self._state.no_show_checked_until or since
        sweep_to = now_local
        for row in self._db.due_bookings(swept_from - NO_SHOW_LOOKBACK, sweep_to):
            due = no_show_due(row, clinic.grace)
            if due is not None and swept_from < due <= sweep_to:
                bookings.add(int(row["ID_Receptions"]))
                patients.add(int(row["ID_Patients"]))
                report.no_shows += 1
        sets = self._change_sets(patients, bookings, changed.receptions, clinic, now_local, report)
        if resync_days is None:
            sets = self._not_sent_yet(sets)
        for batch in self._batches(sets, now_local, report):
            self._stack.push(batch)
            report.batches += 1
        self._remember(sets, int((now_local - self._overlap).replace(tzinfo=clinic.tz).timestamp()))
        self._state.changed_since = now_local
        self._state.no_show_checked_until = sweep_to
        self._state.batches_sent += report.batches
        self._save(self._state)
        return report

    def _not_sent_yet(self, sets: Sequence[PatientChanges]) -> list[PatientChanges]:
        """The overlap re-reads the last minutes before the cursor; what was sent then is not sent again."""
        recent = self._state.recent
        out = []
        for item in sets:
            visits = tuple(a for a in item.appointments if recent.get(f"A#{a.mis_id}") != a.version)
            if visits or recent.get(f"P#{item.patient.mis_id}") != item.patient.version:
                out.append(item.model_copy(update={"appointments": visits}))
        return out

    def _remember(self, sent: Sequence[PatientChanges], horizon: int) -> None:
        recent = {k: v for k, v in self._state.recent.items() if v >= horizon}
        for item in sent:
            recent[f"P#{item.patient.mis_id}"] = item.patient.version
            recent.update({f"A#{a.mis_id}": a.version for a in item.appointments})
        self._state.recent = {k: v for k, v in recent.items() if v >= horizon}

    def _change_sets(
        self,
        patient_ids: set[int],
        booking_ids: set[int],
        reception_ids: set[int],
        clinic: ClinicSettings,
        now_local: datetime,
        report: RunReport,
    ) -> list[PatientChanges]:
        visits: dict[str, list[Appointment]] = {}
        # A reception row completes the booking with the same id; other receptions are walk-ins.
        for row in self._db.bookings(booking_ids | reception_ids):
            try:
                appt = appointment_from_booking(row, clinic.tz, now_local, clinic.grace)
            except ValueError:
                report.rejected += 1
                continue
            visits.setdefault(appt.patient_id, []).append(appt)
        for row in self._db.walk_ins(reception_ids):
            try:
                appt = appointment_from_walk_in(row, clinic.tz)
            except ValueError:
                report.rejected += 1
                continue
            visits.setdefault(appt.patient_id, []).append(appt)
        out: list[PatientChanges] = []
        seen = doctors_seen(self._db.doctors_seen(patient_ids))
        for row in self._db.patients(patient_ids):
            try:
                patient = patient_from_row(row, clinic.tz, clinic.region, seen.get(str(row["ID_Patients"]), ()))
            except ValueError:
                report.rejected += 1
                continue
            kept = self._filtered(patient, visits.get(patient.mis_id, []), clinic.filters, report)
            if kept is not None:
                out.append(kept)
        return sorted(out, key=lambda c: int(c.patient.mis_id))

    def _filtered(
        self, patient: Patient, visits: list[Appointment], filters: Filters, report: RunReport
    ) -> PatientChanges | None:
        """The clinic's filters, applied here so that excluded records never leave the clinic."""
        reason = patient_excluded(patient, filters)
        if reason is not None:
            report.exclude(reason)
            return None
        kept = []
        for appt in visits:
            why = appointment_excluded(appt, filters)
            if why is None:
                kept.append(appt)
            else:
                report.exclude(why)
        report.patients += 1
        report.appointments += len(kept)
        return PatientChanges(patient=patient, appointments=tuple(sorted(kept, key=lambda a: a.mis_id)))

    def _batches(self, sets: Sequence[PatientChanges], now_local: datetime, report: RunReport) -> Iterator[bytes]:
        """Batches of at most ``patients_per_batch`` patients and one SQS message in size."""
        envelope = 512  # batch id, connector id, timestamps
        groups: list[list[PatientChanges]] = []
        size = 0
        for item in sets:
            item_size = len(item.model_dump_json()) + 1
            if not groups or len(groups[-1]) >= self._per_batch or size + item_size + envelope > MAX_BATCH_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += item_size
        for serial, items in enumerate(groups):
            digest = hashlib.sha256(b"".join(i.model_dump_json().encode() for i in items)).hexdigest()[:16]
            batch = ConnectorBatch(
                batch_id=f"{now_local:%Y%m%dT%H%M%S}.{serial}.{digest}",
                connector_id=self._id,
                produced_at=datetime.now(UTC),
                changes=tuple(items),
                rejected=report.rejected if serial == 0 else 0,
            )
            yield batch.model_dump_json().encode()
