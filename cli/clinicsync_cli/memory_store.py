"""Every store port in memory (``domain.ports.Store``): for unit tests and the dry-run ``plan``.

It keeps the table's rules, not its shape: versions never go backwards, claims and leases are free,
expired or their owner's, opt-outs are sticky and only a newer MIS or CRM opt-in lifts one. The
contract suite (``tests/adapters/test_store_contract.py``) runs the same cases on it and on
``DynamoStore``.

Built over ``below`` (another store, read only), a read the memory cannot answer yet is asked below
once and remembered; every write stays here and is counted in ``writes``. So ``plan`` runs the real
syncer on the clinic's stored state and writes nowhere. Coordination (leases, claims) is never read
through: a dry run contends with nobody. The ledger read through knows a channel's flag, not its source.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from clinicsync.domain.audience import MemberBook, is_subscriber_hash
from clinicsync.domain.keys import poll_lease_name
from clinicsync.domain.ports import Cursor
from clinicsync.domain.state import AppointmentState, PatientState
from clinicsync.domain.store_ports import Claimed, ClaimRelease, ConsentSource, OptInsSeen, Store, SyncReads

_SEEN = "-"  # the CRM opt-in field as seen, with no channel


@dataclass
class _Channel:
    opted_out: bool
    source: str
    at: int


@dataclass(frozen=True)
class AuditEntry:
    subject: str
    channel: str
    event: str
    source: str
    at: int
    detail: str


class MemoryStore:
    def __init__(self, below: Store | None = None) -> None:
        self._below = below
        self._asked: set[tuple[str, ...]] = set()  # what ``below`` was asked already
        self.writes = 0
        self._states: dict[str, PatientState] = {}  # STATE: a patient without appointments
        self._appointments: dict[tuple[str, str], AppointmentState] = {}
        self._maps: dict[tuple[str, str], dict[str, str]] = {}
        self._intents: dict[str, int] = {}
        self._cursors: dict[str, str] = {}
        self._leases: dict[str, tuple[str, int]] = {}
        self._claims: dict[str, tuple[str, int]] = {}
        self._adoptions: dict[str, tuple[str, int]] = {}
        self._phones: set[tuple[str, str]] = set()
        self._crm_phones: set[tuple[str, str]] = set()
        self._crm_phones_to: int | None = None
        self._channels: dict[tuple[str, str], _Channel] = {}
        self.audit: list[AuditEntry] = []
        self.identities: dict[str, dict[str, str]] = {}
        self._outputs: dict[str, dict[str, str]] = {}
        self._seen: dict[str, tuple[str, str, int]] = {}
        self._emails: set[tuple[str, str]] = set()
        self._members: dict[str, MemberBook] = {}

    def _ask(self, *key: str) -> Store | None:
        """The store below, the first time a key is read (None: no store below, or asked already)."""
        if self._below is None or key in self._asked:
            return None
        self._asked.add(key)
        return self._below

    def _wrote(self) -> None:
        self.writes += 1

    # --- PatientStates, CrmIdMaps, CreateIntents --------------------------------------------------------

    def load_patients(self, wanted: Mapping[str, Sequence[str]]) -> dict[str, PatientState]:
        missing: dict[str, list[str]] = {}
        for pid, aids in wanted.items():
            state_asked = self._ask("state", pid) is not None
            absent = [aid for aid in dict.fromkeys(aids) if self._ask("appt", pid, aid) is not None]
            if state_asked or absent:
                missing[pid] = absent
        if missing and self._below is not None:
            for pid, found in self._below.load_patients(missing).items():
                if found.version >= 0 or found.contact_id is not None:
                    self._states.setdefault(pid, found.model_copy(update={"appointments": {}}, deep=True))
                for aid in missing[pid]:
                    if aid in found.appointments:
                        self._appointments.setdefault((pid, aid), found.appointments[aid].model_copy(deep=True))
        states = {}
        for pid, aids in wanted.items():
            stored = self._states.get(pid)
            state = stored.model_copy(deep=True) if stored else PatientState(patient_id=pid)
            for aid in dict.fromkeys(aids):
                if (appt := self._appointments.get((pid, aid))) is not None:
                    state.appointments[aid] = appt.model_copy(deep=True)
            states[pid] = state
        return states

    def read_for_sync(
        self,
        wanted: Mapping[str, Sequence[str]],
        intent_keys: Sequence[str],
        ledger: Mapping[str, Sequence[str]],
    ) -> SyncReads:
        opted_out: dict[str, set[str]] = {}
        for subject, channels in ledger.items():
            opted_out |= self.opted_out_many([subject], channels)
        on_record = self.channels_on_record_many(ledger)
        return SyncReads(self.load_patients(wanted), self.load_intents(intent_keys), opted_out, on_record)

    def save_patients(
        self,
        saves: Sequence[tuple[PatientState, Sequence[str]]],
        loaded: Mapping[str, PatientState],
        release: ClaimRelease | None = None,
    ) -> None:
        self._save_patients(saves, loaded)
        if release is not None:  # the states and the release as one write
            self.release_claims(release.patients, release.intents)
            release.done = True

    def _save_patients(
        self, saves: Sequence[tuple[PatientState, Sequence[str]]], loaded: Mapping[str, PatientState]
    ) -> None:
        self._wrote()
        for state, changed in saves:  # read through first: a version is compared with what is stored
            self.load_patients({state.patient_id: changed})
        versioned: list[tuple[PatientState, str | None]] = []
        fresh: list[tuple[PatientState, str | None]] = []
        for state, changed in saves:
            before = loaded.get(state.patient_id, PatientState(patient_id=state.patient_id))
            (versioned if before.version >= 0 else fresh).append((state, None))
            for aid in dict.fromkeys(changed):
                (versioned if before.appointment(aid).version >= 0 else fresh).append((state, aid))
        for state, item in versioned:  # items that existed when loaded: never older over newer
            self._put_patient_item(state, item, only_if_not_older=True)
        for state, item in fresh:
            self._put_patient_item(state, item, only_if_not_older=False)
        for state, changed in saves:  # reverse maps: written when the id is new to the loaded state
            before = loaded.get(state.patient_id, PatientState(patient_id=state.patient_id))
            for aid in dict.fromkeys(changed):
                deal_id = state.appointments[aid].deal_id
                if deal_id and aid not in state.continued and before.appointment(aid).deal_id != deal_id:
                    self._maps[("deal", deal_id)] = {"patient_id": state.patient_id, "appointment_id": aid}
            if state.contact_id and state.contact_id != before.contact_id:
                self._maps[("contact", state.contact_id)] = {"patient_id": state.patient_id}

    def _put_patient_item(self, state: PatientState, aid: str | None, only_if_not_older: bool) -> None:
        pid = state.patient_id
        if aid is None:
            stored_state = self._states.get(pid)
            if not (only_if_not_older and stored_state is not None and stored_state.version > state.version):
                self._states[pid] = state.model_copy(update={"appointments": {}}, deep=True)
            return
        new = state.appointments[aid]
        stored = self._appointments.get((pid, aid))
        if not (only_if_not_older and stored is not None and stored.version > new.version):
            self._appointments[(pid, aid)] = new.model_copy(deep=True)

    def mark_unsure(self, patient_ids: Sequence[str]) -> None:
        self._wrote()
        for pid in dict.fromkeys(patient_ids):
            self.load_patients({pid: []})  # read through: a state stored below is marked too
            if (stored := self._states.get(pid)) is not None:
                stored.write_epoch += 1

    def delete_patient(self, patient_id: str) -> None:
        self._wrote()
        self._asked.add(("state", patient_id))  # gone: nothing below speaks for it any more
        state = self._states.pop(patient_id, None)
        for pid, aid in [key for key in self._appointments if key[0] == patient_id]:
            appt = self._appointments.pop((pid, aid))
            if appt.deal_id:
                self._maps.pop(("deal", appt.deal_id), None)
        if state is not None and state.contact_id:
            self._maps.pop(("contact", state.contact_id), None)
        if state is not None and state.phone_key:
            self._phones.discard((state.phone_key, patient_id))

    def patient_for_crm(self, entity: str, crm_id: str) -> dict[str, str] | None:
        below = self._ask("map", entity, crm_id)
        if below is not None and (found := below.patient_for_crm(entity, crm_id)) is not None:
            self._maps.setdefault((entity, crm_id), found)
        found = self._maps.get((entity, crm_id))
        return dict(found) if found is not None else None

    def write_intents(self, intent_keys: Sequence[str], at: int) -> None:
        self._wrote()
        self._intents.update(dict.fromkeys(intent_keys, at))

    def load_intents(self, intent_keys: Sequence[str]) -> dict[str, int]:
        ask = [k for k in dict.fromkeys(intent_keys) if self._ask("intent", k) is not None]
        if ask and self._below is not None:
            for key, at in self._below.load_intents(ask).items():
                self._intents.setdefault(key, at)
        return {k: self._intents[k] for k in dict.fromkeys(intent_keys) if k in self._intents}

    def clear_intents(self, intent_keys: Sequence[str]) -> None:
        self._wrote()
        for key in intent_keys:
            self._asked.add(("intent", key))
            self._intents.pop(key, None)

    # --- Cursors -------------------------------------------------------------------------------------------

    def get_cursor(self, source: str) -> Cursor | None:
        below = self._ask("cursor", source)
        if below is not None and (found := below.get_cursor(source)) is not None:
            self._cursors.setdefault(source, json.dumps(dict(found)))
        text = self._cursors.get(source)
        return json.loads(text) if text is not None else None

    def put_cursor(self, source: str, cursor: Cursor) -> None:
        self._wrote()
        self._cursors[source] = json.dumps(dict(cursor))  # a copy, as stored

    # --- Leases, Claims -----------------------------------------------------------------------------------

    @staticmethod
    def _take(held: dict[str, tuple[str, int]], key: str, owner: str, now: int, seconds: int) -> bool:
        current = held.get(key)
        if current is not None and current[1] >= now and current[0] != owner:
            return False
        held[key] = (owner, now + seconds)
        return True

    def acquire_lease(self, name: str, owner: str, seconds: int, now: int) -> bool:
        self._wrote()
        return self._take(self._leases, name, owner, now, seconds)

    def release_lease(self, name: str, owner: str) -> None:
        self._wrote()
        if name in self._leases and self._leases[name][0] == owner:
            del self._leases[name]

    # A feed's poll: its lease and cursor, named as on the table (nothing to save in memory).
    def take_poll(self, source: str, owner: str, seconds: int, now: int) -> bool:
        return self.acquire_lease(poll_lease_name(source), owner, seconds, now)

    def poll_cursor(self, source: str) -> Cursor | None:
        return self.get_cursor(source)

    def store_poll_cursor(self, source: str, cursor: Cursor) -> None:
        self.put_cursor(source, cursor)

    def release_poll(self, source: str, owner: str) -> None:
        self.release_lease(poll_lease_name(source), owner)

    def claim_patients(self, patient_ids: Sequence[str], owner: str, now: int, seconds: int) -> Claimed:
        """As on the table: a claim stays until released, so taking over one left behind is known."""
        self._wrote()
        found = {pid for pid in patient_ids if pid in self._claims and self._claims[pid][0] != owner}
        claimed = {pid for pid in dict.fromkeys(patient_ids) if self._take(self._claims, pid, owner, now, seconds)}
        return Claimed(claimed, found & claimed)

    def release_claims(self, patient_ids: Sequence[str], settled_intents: Sequence[str] = ()) -> None:
        self._wrote()
        for pid in patient_ids:
            self._claims.pop(pid, None)
        for key in settled_intents:
            self._asked.add(("intent", key))
            self._intents.pop(key, None)

    def claim_adoptions(self, claims: Mapping[str, str], now: int, seconds: int) -> set[str]:
        self._wrote()
        return {key for key, aid in claims.items() if not self._take(self._adoptions, key, aid, now, seconds)}

    # --- PhoneIndex, CrmPhoneBook ---------------------------------------------------------------------------

    def index_phone(self, phone_key: str, patient_id: str, previous_key: str | None) -> None:
        self._wrote()
        if previous_key and previous_key != phone_key:
            self._phones.discard((previous_key, patient_id))
        self._phones.add((phone_key, patient_id))

    def index_contacts(self, phones: Sequence[tuple[str, str]], emails: Sequence[tuple[str, str]]) -> None:
        self._wrote()
        self._phones.update(phones)
        self._emails.update(emails)

    def patients_by_phone(self, phone_key: str) -> list[str]:
        if (below := self._ask("phone", phone_key)) is not None:
            self._phones.update((phone_key, pid) for pid in below.patients_by_phone(phone_key))
        return sorted(pid for key, pid in self._phones if key == phone_key)

    def crm_phone_index(self) -> tuple[int | None, dict[str, set[str]]]:
        if (below := self._ask("crm_phones")) is not None:
            seen_to, contacts = below.crm_phone_index()
            self._crm_phones.update((cid, key) for cid, keys in contacts.items() for key in keys)
            self._crm_phones_to = seen_to
        contacts_now: dict[str, set[str]] = {}
        for cid, key in self._crm_phones:
            contacts_now.setdefault(cid, set()).add(key)
        return self._crm_phones_to, contacts_now

    def update_crm_phones(self, add: Sequence[tuple[str, str]], drop: Sequence[tuple[str, str]]) -> None:
        self._wrote()
        self._crm_phones.difference_update(drop)
        self._crm_phones.update(add)

    def advance_crm_phones(self, seen_to: int) -> None:
        self._wrote()
        if self._crm_phones_to is None or self._crm_phones_to < seen_to:
            self._crm_phones_to = seen_to

    # --- ConsentRecords, ConsentOutputMarks -----------------------------------------------------------------

    def _read_channels(self, subjects: Iterable[str], channels: Sequence[str]) -> None:
        ask = [s for s in dict.fromkeys(subjects) if self._ask("consent", s, *channels) is not None]
        if ask and self._below is not None:
            for subject, out in self._below.opted_out_many(ask, channels).items():
                for channel in channels:  # only the flag is known below: its time is the earliest
                    self._channels.setdefault((subject, channel), _Channel(channel in out, "below", 0))

    def _audit(self, subject: str, channel: str, event: str, source: str, at: int, detail: str) -> None:
        self.audit.append(AuditEntry(subject, channel, event, source, at, detail))

    def record_opt_outs(
        self, subject: str, channels: Sequence[str], source: ConsentSource, at: int, detail: str = ""
    ) -> list[str]:
        self._wrote()
        wanted = list(dict.fromkeys(channels))
        self._read_channels([subject], wanted)
        changed = []
        for channel in wanted:
            current = self._channels.get((subject, channel))
            if current is None or (not current.opted_out and current.at <= at):
                self._channels[(subject, channel)] = _Channel(True, source, at)
                self._audit(subject, channel, "opt_out", source, at, detail)
                changed.append(channel)
        return changed

    def record_opt_outs_many(
        self, opt_outs: Mapping[str, Sequence[str]], source: ConsentSource, at: int, detail: str = ""
    ) -> dict[str, list[str]]:
        return {s: self.record_opt_outs(s, channels, source, at, detail) for s, channels in opt_outs.items()}

    def record_opt_ins(
        self, subject: str, channels: Sequence[str], source: ConsentSource, at: int, detail: str = ""
    ) -> list[str]:
        if source not in ("mis", "crm"):
            raise ValueError("only the MIS or the CRM can record an opt-in")
        self._wrote()
        self._read_channels([subject], list(channels))
        changed = []
        for channel in channels:
            current = self._channels.get((subject, channel))
            if current is not None and current.opted_out and current.at < at:
                self._channels[(subject, channel)] = _Channel(False, source, at)
                self._audit(subject, channel, "opt_in", source, at, detail)
                changed.append(channel)
        return changed

    def observe_crm_opt_ins(
        self, subject: str, contact_id: str, opt_ins: Sequence[str], at: int, held: Sequence[str] = ()
    ) -> OptInsSeen:
        self._wrote()
        old = self._seen.get(subject)
        same = old is not None and old[0] == contact_id
        if old is not None and same and old[2] > at:
            return OptInsSeen([])  # older than what we already saw
        before = set(old[1].split(",")) if old is not None and same else set(opt_ins)
        gained = set(opt_ins) - before
        waiting = gained & set(held)
        self._seen[subject] = (contact_id, ",".join(sorted(set(opt_ins) - waiting)) or _SEEN, at)
        return OptInsSeen(sorted(gained - waiting), old[2] if old is not None and same else None)

    def channels_on_record(self, subject: str, channels: Sequence[str]) -> set[str]:
        ours = {c for c in channels if (found := self._channels.get((subject, c))) and found.source != "below"}
        rest = [c for c in channels if c not in ours]  # the store below keeps only flags: ask it itself
        return ours | (self._below.channels_on_record(subject, rest) if rest and self._below is not None else set())

    def channels_on_record_many(self, wanted: Mapping[str, Sequence[str]]) -> dict[str, set[str]]:
        return {subject: self.channels_on_record(subject, channels) for subject, channels in wanted.items()}

    def opted_out_many(self, subjects: Sequence[str], channels: Sequence[str]) -> dict[str, set[str]]:
        self._read_channels(subjects, channels)
        return {
            s: {c for c in channels if (found := self._channels.get((s, c))) is not None and found.opted_out}
            for s in subjects
        }

    def note_identity(self, subject: str, keys: Mapping[str, str | None]) -> None:
        self._wrote()
        self.identities.setdefault(subject, {}).update({k: v for k, v in keys.items() if v})

    def note_identities(self, identities: Mapping[str, Mapping[str, str | None]]) -> None:
        for subject, keys in identities.items():
            self.note_identity(subject, keys)

    def output_done(self, subject: str) -> dict[str, str]:
        return dict(self._outputs.get(subject, {}))

    def outputs_done_many(self, subjects: Sequence[str]) -> dict[str, dict[str, str]]:
        return {s: self.output_done(s) for s in subjects}

    def mark_output(self, subject: str, target: str, digest: str) -> None:
        self._wrote()
        self._outputs.setdefault(subject, {})[target] = digest

    def mark_outputs(self, target: str, digests: Mapping[str, str]) -> None:
        for subject, digest in digests.items():
            self.mark_output(subject, target, digest)

    def mark_outputs_many(self, marks: Mapping[str, Mapping[str, str]]) -> None:
        for subject, done in marks.items():
            for target, digest in done.items():
                self.mark_output(subject, target, digest)

    # --- EmailIndex, MemberStore -------------------------------------------------------------------------------

    def index_emails(self, entries: Sequence[tuple[str, str]]) -> None:
        self._wrote()
        self._emails.update(entries)

    def subjects_by_email(self, email_key: str) -> list[str]:
        if (below := self._ask("email", email_key)) is not None:
            self._emails.update((email_key, s) for s in below.subjects_by_email(email_key))
        return sorted(s for key, s in self._emails if key == email_key)

    def mailchimp_members_many(self, subjects: Sequence[str]) -> dict[str, MemberBook]:
        ask = [s for s in dict.fromkeys(subjects) if self._ask("members", s) is not None]
        if ask and self._below is not None:
            for subject, book in self._below.mailchimp_members_many(ask).items():
                self._members.setdefault(subject, book)
        books = {}
        for s in subjects:
            book = self._members.get(s) or MemberBook()
            books[s] = MemberBook(book.current, dict(book.moved), set(book.known))
        return books

    def note_mailchimp_address(self, subject: str, member: str) -> None:
        if not is_subscriber_hash(member):
            raise ValueError("not a subscriber hash")
        self._wrote()
        self.mailchimp_members_many([subject])  # read through first: old members stay listed
        self._members.setdefault(subject, MemberBook()).known.add(member)

    def note_mailchimp_member(self, subject: str, member: str, moved_from: str | None = None) -> None:
        if not all(is_subscriber_hash(h) for h in (member, moved_from) if h):
            raise ValueError("not a subscriber hash")
        self._wrote()
        self.mailchimp_members_many([subject])  # read through first: old members stay listed
        book = self._members.setdefault(subject, MemberBook())
        book.current = member
        book.known.add(member)
        book.moved.pop(member, None)
        if moved_from and moved_from != member:
            book.known.add(moved_from)
            book.moved[moved_from] = member


def _checked(store: MemoryStore) -> Store:
    return store  # mypy proves here that the memory store implements every port
