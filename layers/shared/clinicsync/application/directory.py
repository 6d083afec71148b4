"""The lab's directory (case A): referring doctors and funds/clinics, two-way between the LIS and vTiger,
one-way into two Mailchimp audiences.

The use case (the field-by-field merge itself is ``domain.directory_records.merge_fields``):

- LIS -> CRM: every doctor becomes a Contact, every organisation an Account; a doctor's Contact is linked
  to their organisation's Account. The LIS's "do not send marketing" flag becomes the record's e-mail
  opt-out. The CRM record is looked up by LIS id before it is created (a lost create response).
- CRM -> LIS: edits to mapped fields of CRM records that carry a LIS id flow back. A CRM record without a
  LIS id (a contact person at a clinic) never reaches the LIS, and we never create LIS records.
- A field changed on both sides since the last sync is a conflict: the clinic config names the owner of
  each field (the LIS by default); the owner's value wins and the conflict is logged (ids and field names,
  never values).
- "Changed since the last sync" is judged against the last synced value's keyed hash, kept per field in
  DynamoDB: no name, phone or e-mail is stored in clear. Our own writes come back equal to that hash, so
  they are never mistaken for edits (no loops); vTiger's feed also drops our integration user's edits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from clinicsync.application.consent import ConsentLedger
from clinicsync.domain.audience import AudienceMember, MemberBook, audience_member, note_accepted_members
from clinicsync.domain.config import ClinicConfig, DirectorySettings
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.directory_records import (
    KINDS,
    OPT_OUT_KEY,
    TWO_WAY,
    AudienceSink,
    CrmRecord,
    CrmWriteSpec,
    DirectoryCrm,
    DirectoryRecord,
    DirectorySource,
    DirectoryState,
    DirectoryStateStore,
    Kind,
    directory_subject,
    is_echo,
    merge_fields,
    opt_out_hash,
    synced_hashes,
    unsure_hashes,
)
from clinicsync.domain.ports import Cursor
from clinicsync.domain.store_ports import Cursors, Leases, MemberStore
from clinicsync.observability import logger

# --- the rule ------------------------------------------------------------------------------------------


# --- state ---------------------------------------------------------------------------------------------


# --- the use case --------------------------------------------------------------------------------------


@dataclass
class DirectoryReport:
    lis_changed: int = 0
    crm_changed: int = 0
    crm_only_ignored: int = 0  # CRM records without a LIS id: never synced back
    unknown_lis_id: int = 0  # a CRM record names a LIS id the LIS does not have
    crm_created: int = 0
    crm_updated: int = 0
    lis_updated: int = 0
    conflicts: int = 0
    rejected: int = 0
    audience_upserted: int = 0
    opt_outs_recorded: int = 0
    skipped_busy: bool = False  # another run still holds the lease
    failed: dict[str, str] = field(default_factory=dict)  # "<kind>:<lis id>" -> reason (no PII)


LEASE = "directory"


class DirectorySync:
    """One scheduled run: read both feeds, merge, write both sides, then the audiences."""

    def __init__(
        self,
        config: ClinicConfig,
        settings: DirectorySettings,
        lis: DirectorySource,
        crm: DirectoryCrm,
        states: DirectoryStateStore,
        cursors: Cursors,
        hasher: KeyedHasher,
        ledger: ConsentLedger | None = None,
        audiences: AudienceSink | None = None,
        opted_out: Callable[[Sequence[str]], Mapping[str, set[str]]] | None = None,
        index_emails: Callable[[Sequence[tuple[str, str]]], None] | None = None,
        clock: Callable[[], float] = time.time,
        max_pages: int = 50,
        leases: Leases | None = None,
        members: MemberStore | None = None,
    ) -> None:
        self._leases = leases
        self._members = members
        self._config = config
        self._settings = settings
        self._lis = lis
        self._crm = crm
        self._states = states
        self._cursors = cursors
        self._hasher = hasher
        self._ledger = ledger
        self._audiences = audiences
        self._opted_out = opted_out
        self._index_emails = index_emails
        self._clock = clock
        self._max_pages = max_pages

    def _digest(self, value: str | None) -> str:
        return self._hasher.content_hash(["directory-field", value])

    def run(self, full: bool = False, owner: str = "run", lease_seconds: int = 900) -> DirectoryReport:
        """``full``: read both sides from the start (the deep resync); unchanged records cost no write.
        One run at a time (a long run and the next schedule must not both create the same Contact)."""
        report = DirectoryReport()
        now = int(self._clock())
        if self._leases is not None and not self._leases.acquire_lease(LEASE, owner, lease_seconds, now):
            report.skipped_busy = True
            return report
        try:
            for kind in KINDS:
                self._run_kind(kind, report, full)
        finally:
            if self._leases is not None:
                self._leases.release_lease(LEASE, owner)
        if report.conflicts or report.failed:
            logger.info(
                "directory sync finished", extra={"conflicts": report.conflicts, "failed": sorted(report.failed)}
            )
        return report

    def _read_lis(
        self, kind: Kind, report: DirectoryReport, full: bool
    ) -> tuple[dict[str, DirectoryRecord], Cursor | None]:
        cursor = None if full else self._cursors.get_cursor(f"lis:{kind}")
        records: dict[str, DirectoryRecord] = {}
        for _ in range(self._max_pages):
            page = self._lis.changed(kind, cursor)
            report.rejected += page.rejected
            records.update({r.lis_id: r for r in page.records})
            cursor = page.cursor
            if not page.more:
                break
        return records, cursor

    def _run_kind(self, kind: Kind, report: DirectoryReport, full: bool) -> None:
        lis_changed, lis_cursor = self._read_lis(kind, report, full)
        crm_cursor_in = None if full else self._cursors.get_cursor(f"vtiger:{kind}")
        since = str(crm_cursor_in["modifiedtime"]) if crm_cursor_in else None
        crm_rows, crm_cursor = self._crm.changed_since(kind, since)
        crm_read: dict[str, CrmRecord] = {}
        for row in crm_rows:
            if row.lis_id:
                crm_read[row.lis_id] = row
            else:
                report.crm_only_ignored += 1
        read = list(dict.fromkeys([*lis_changed, *crm_read]))
        loaded = self._states.load(kind, read) if read else {}
        # Our own writes come back on vTiger's feed: recognised by content (whoever saved the row last).
        crm_changed = {k: row for k, row in crm_read.items() if not is_echo(row, loaded.get(k), self._digest)}
        report.lis_changed += len(lis_changed)
        report.crm_changed += len(crm_changed)
        keys = list(dict.fromkeys([*lis_changed, *crm_changed]))
        if keys:
            missing_lis = [k for k in keys if k not in lis_changed]
            lis_now = {**lis_changed, **(self._lis.get(kind, missing_lis) if missing_lis else {})}
            report.unknown_lis_id += sum(1 for k in missing_lis if k not in lis_now)
            missing_crm = [k for k in keys if k not in crm_read and k in lis_now]
            crm_now = {**crm_read, **(self._crm.find(kind, missing_crm) if missing_crm else {})}
            states = {k: loaded[k] for k in keys if k in lis_now}
            org_states = self._organisation_states(kind, lis_now)
            for lis_id, state in states.items():
                try:
                    lis_now[lis_id] = self._sync_one(
                        kind, lis_now[lis_id], crm_now.get(lis_id), state, org_states, report
                    )
                except Exception as exc:  # one bad record never blocks the register; retried next run
                    report.failed[f"{kind}:{lis_id}"] = type(exc).__name__
            try:
                self._audience(kind, [lis_now[k] for k in states], states, report)
            except Exception as exc:  # Mailchimp down: the CRM and LIS writes stand; the run is read again
                report.failed[f"{kind}:audience"] = type(exc).__name__
            self._states.save(list(states.values()), int(self._clock()))
        if any(k.startswith(f"{kind}:") for k in report.failed):
            return  # cursors stay: the failed records are read again next run
        if lis_cursor is not None:
            self._cursors.put_cursor(f"lis:{kind}", lis_cursor)
        if crm_cursor is not None:
            self._cursors.put_cursor(f"vtiger:{kind}", {"modifiedtime": crm_cursor})

    def _organisation_states(self, kind: Kind, lis_now: Mapping[str, DirectoryRecord]) -> dict[str, DirectoryState]:
        if kind != "doctor":
            return {}
        orgs = sorted({r.organisation_id for r in lis_now.values() if r.organisation_id})
        return self._states.load("organisation", orgs) if orgs else {}

    def _sync_one(
        self,
        kind: Kind,
        lis: DirectoryRecord,
        crm: CrmRecord | None,
        state: DirectoryState,
        orgs: Mapping[str, DirectoryState],
        report: DirectoryReport,
    ) -> DirectoryRecord:
        merge = merge_fields(kind, lis, crm, state.hashes, self._digest, self._settings.owner, state.unsure)
        for conflict in merge.conflicts:
            report.conflicts += 1
            logger.info(
                "directory conflict resolved",
                extra={"kind": kind, "lis_id": lis.lis_id, "field": conflict.field, "winner": conflict.winner},
            )
        if merge.to_lis:
            self._lis.update(kind, lis.lis_id, merge.to_lis)
            report.lis_updated += 1
        opted_out = lis.do_not_mail or self._crm_opt_out(kind, lis, crm, state, report)
        account = None
        if kind == "doctor" and lis.organisation_id:
            org = orgs.get(lis.organisation_id)
            account = org.crm_id if org else None
        needs_write = (
            crm is None
            or any(crm.fields.get(n) != merge.values[n] for n in TWO_WAY[kind] if n not in crm.invalid)
            or any(merge.values[n] is not None for n in crm.invalid)
            or crm.do_not_mail != opted_out
            or (kind == "doctor" and (crm.account_id or None) != account)
        )
        hashes = synced_hashes(kind, merge.values, opted_out, account, self._digest)
        if needs_write:
            spec = CrmWriteSpec(kind, lis.lis_id, crm.crm_id if crm else None, merge.values, opted_out, account)
            try:
                state.crm_id = self._crm.write(spec)
            except Exception:
                # It may have run: what it sent must not come back as a manager's edit (saved with the state).
                state.unsure = unsure_hashes(hashes, crm, self._digest)
                raise
            if crm is None:
                report.crm_created += 1
            else:
                report.crm_updated += 1
        else:
            state.crm_id = crm.crm_id if crm else state.crm_id
        state.hashes = hashes
        state.unsure = {}  # vTiger holds ``hashes`` now: written, or read equal to them
        # The LIS now holds the merged values: the audience sees the CRM's fix too.
        return lis.model_copy(update={"fields": {**lis.fields, **merge.values}}) if merge.to_lis else lis

    def _crm_opt_out(
        self, kind: Kind, lis: DirectoryRecord, crm: CrmRecord | None, state: DirectoryState, report: DirectoryReport
    ) -> bool:
        """A manager ticked the e-mail opt-out in vTiger (it is set there and was not at the last sync): an
        opt-out like any other, recorded in the ledger, whose outputs tick the LIS flag and unsubscribe the
        Mailchimp member. Unticking it in vTiger lifts nothing (the ledger is sticky). A tick our own write of
        unknown outcome may have set is not a manager's: it came from the LIS flag, whose own rule records it."""
        ticked = opt_out_hash(True, self._digest)
        ours = ticked == state.hashes.get(OPT_OUT_KEY) or ticked in state.unsure.get(OPT_OUT_KEY, ())
        if crm is None or not crm.do_not_mail or ours:
            return False
        if self._ledger is None:
            return False  # nowhere to record it: the LIS's flag stays the truth
        email = lis.fields.get("email")
        changed = self._ledger.opt_out(
            [directory_subject(kind, lis.lis_id)],
            ["marketing"],
            "crm",
            "vtiger:emailoptout",
            emails=[email] if email else [],
            skip=("crm",),
        )
        report.opt_outs_recorded += len(changed)
        return True

    # --- Mailchimp ---------------------------------------------------------------------------------------

    def _audience(
        self,
        kind: Kind,
        records: Sequence[DirectoryRecord],
        states: Mapping[str, DirectoryState],
        report: DirectoryReport,
    ) -> None:
        with_email = [r for r in records if r.fields.get("email")]
        subjects = {r.lis_id: directory_subject(kind, r.lis_id) for r in with_email}
        if self._index_emails is not None and with_email:
            self._index_emails(
                [(self._hasher.email_key(str(r.fields["email"])), subjects[r.lis_id]) for r in with_email]
            )
        refused = self._opted_out(list(subjects.values())) if self._opted_out and subjects else {}
        for r in with_email:
            if r.do_not_mail and self._ledger is not None and not refused.get(subjects[r.lis_id]):
                # The LIS flag is an opt-out like a MIS refusal: the ledger records it, Mailchimp is told.
                changed = self._ledger.opt_out(
                    [subjects[r.lis_id]],
                    ["marketing"],
                    "mis",
                    "lis:do_not_mail",
                    emails=[str(r.fields["email"])],
                    skip=("mis",),
                )
                report.opt_outs_recorded += len(changed)
        if self._audiences is None or self._settings.mailchimp is None:
            return
        tags = (
            self._settings.mailchimp.doctor_merge_fields
            if kind == "doctor"
            else self._settings.mailchimp.organisation_merge_fields
        )
        wanted: list[tuple[DirectoryRecord, Mapping[str, str], str]] = []
        for r in with_email:
            if r.do_not_mail or refused.get(subjects[r.lis_id]):
                continue
            merges = {tag: str(r.fields.get(name) or "") for name, tag in tags.items()}
            digest = self._hasher.content_hash(["audience", r.fields.get("email"), merges])
            if states[r.lis_id].audience != digest:
                wanted.append((r, merges, digest))
        if not wanted:
            return
        # One member per person: an address Mailchimp moved is never re-created (see consent.audience_member).
        books = self._members.mailchimp_members_many([subjects[r.lis_id] for r, *_ in wanted]) if self._members else {}
        members: dict[str, AudienceMember] = {}
        digests: dict[str, str] = {}
        for r, fields, digest in wanted:
            book = books.get(subjects[r.lis_id]) or MemberBook()
            member = audience_member(r.lis_id, str(r.fields["email"]), fields, book)
            if member is not None:
                members[r.lis_id] = member
                digests[r.lis_id] = digest
        if not members:
            return
        try:
            accepted = self._audiences.upsert(kind, list(members.values()))
        except Exception:
            # The batch may have run: the stored digests no longer say what the audience holds, so content
            # returning to one of them is sent again (saved with the states, no extra request).
            for lis_id in members:
                states[lis_id].audience = None
            raise
        if self._members is not None:
            note_accepted_members(self._members, {subjects[i]: members[i] for i in accepted if i in members})
        for lis_id, digest in digests.items():
            # A member not accepted may still be applied later (a batch still running): its digest is unsure.
            states[lis_id].audience = digest if lis_id in accepted else None
        report.audience_upserted += len(accepted)
