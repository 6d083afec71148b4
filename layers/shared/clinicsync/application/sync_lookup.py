"""The read side of a sync: what it knows of its patients (``Known``), one look-up per message (by MIS id
before any create, by phone for adoption), the create intents that make a lost create findable, and who may
adopt what a phone found."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from clinicsync.domain.crm_ports import (
    ContactWrite,
    CrmGateway,
    CrmMatches,
    CrmWrite,
    DealWrite,
    LookupInWrites,
    WriteOutcome,
)
from clinicsync.domain.crypto import KeyedHasher
from clinicsync.domain.deal_stages import held_stage
from clinicsync.domain.keys import contact_intent, deal_intent
from clinicsync.domain.models import PatientChanges
from clinicsync.domain.rules import Adoption, changed_multifields
from clinicsync.domain.state import PatientState
from clinicsync.domain.store_ports import SyncLookupStore, SyncStore


@dataclass
class Known:
    """What a sync knows of its patients before it writes, kept as it learns more: their states (the CRM's
    observations applied), their opt-outs (``ledger``: with their address's; ``own_opt_outs``: their own
    subject's), the visits whose manager's move was recorded (``observed``: stored even without a write),
    and the create intents read for the look-up."""

    states: dict[str, PatientState]
    ledger: dict[str, set[str]]
    own_opt_outs: dict[str, set[str]]
    observed: dict[str, list[str]]
    intents: dict[str, int]


class SyncLookup:
    def __init__(
        self,
        store: SyncLookupStore,
        gateway: CrmGateway,
        hasher: KeyedHasher,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._store = store
        self._gateway = gateway
        self._hasher = hasher

    def intent_keys(self, live: Sequence[PatientChanges]) -> list[str]:
        """Every intent ``look_up`` may read for ``live`` (every patient's and visit's), for a caller that
        reads them ahead with the patients' states; none if the gateway's look-ups need none."""
        if not self._gateway.lookups_need_intents:
            return []
        patients = [contact_intent(c.patient.mis_id) for c in live]
        return patients + [deal_intent(a.mis_id) for c in live for a in c.appointments]

    def look_up(
        self,
        live: Sequence[PatientChanges],
        states: dict[str, PatientState],
        read: Mapping[str, int] | None = None,
        *,
        defer_phones: bool = False,
    ) -> CrmMatches:
        """One look-up per message. By MIS id before creating (a create whose response was lost must not
        repeat), by phone for patients without a deal yet (adopt open leads and deals, never duplicate),
        and the phone/e-mail entry ids of contacts whose phone or e-mail changed.

        A gateway whose look-ups by MIS id cost requests of their own (``lookups_need_intents``) looks up
        only what may exist unknown to us: visits with an intent (noted before every create and every write
        of a deal our table holds under another visit, such as a continuation; looked up whatever deal our
        stale state holds for them) and
        everything of a patient we know no contact of (new, or whose state was dropped; their look-up by
        phone goes out anyway). A known patient's new visit then costs no look-up."""
        unknown_patients = [c.patient.mis_id for c in live if states[c.patient.mis_id].contact_id is None]
        unknown_appointments = [
            a.mis_id for c in live for a in c.appointments if states[c.patient.mis_id].own_deal(a.mis_id) is None
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
        since = None
        if self._gateway.lookups_need_intents:
            # Every visit's intent: a create whose response was lost is looked up even when the (stale)
            # state holds another deal for that visit (a re-booking took its old one over, also lost).
            visits = [a.mis_id for c in live for a in c.appointments]
            keys = [contact_intent(p) for p in unknown_patients] + [deal_intent(a) for a in visits]
            if read is None:
                read = self._store.load_intents(keys) if keys else {}
            intents = {k: read[k] for k in keys if k in read}
            since = min(intents.values()) if intents else None
            new, unknown = set(unknown_patients), set(unknown_appointments)
            unknown_appointments = [
                a.mis_id
                for c in live
                for a in c.appointments
                if (a.mis_id in unknown and c.patient.mis_id in new) or deal_intent(a.mis_id) in intents
            ]
        if not (unknown_patients or unknown_appointments or changed_contacts or phones):
            return CrmMatches()
        if defer_phones and isinstance(self._gateway, LookupInWrites):  # their patients are planned later
            args = (unknown_patients, unknown_appointments, phones, changed_contacts, since)
            return self._gateway.find_deferring_phones(*args)
        return self._gateway.find(unknown_patients, unknown_appointments, phones, changed_contacts, since)

    def record_intents(self, writes: Sequence[CrmWrite]) -> list[str]:
        """Before any create is sent, note it; a lost response is then found by MIS id on the retry. So too a
        write that puts a visit's id on a deal our table holds under another visit or none (a re-booking's
        continuation, ``DealWrite.new_to_visit``): its retry finds the deal under the visit the CRM put it
        under, rather than planning from the stale state (another booking would take that deal over)."""
        if not self._gateway.lookups_need_intents:
            return []
        keys = [contact_intent(w.patient_id) for w in writes if isinstance(w, ContactWrite) and w.contact_id is None]
        keys += [
            deal_intent(w.appointment_id)
            for w in writes
            if isinstance(w, DealWrite) and (w.deal_id is None or w.new_to_visit)
        ]
        if keys:
            self._store.write_intents(keys, int(self._clock()))
        return keys

    def phones_in_batch(self, live: Sequence[PatientChanges]) -> dict[str, set[str]]:
        owners: dict[str, set[str]] = {}
        for item in live:
            if item.patient.phone:
                owners.setdefault(item.patient.phone, set()).add(item.patient.mis_id)
        return owners

    def adoption(
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


def settled_intents(intents: Sequence[str], writes: Sequence[CrmWrite], outcome: WriteOutcome) -> list[str]:
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


def load_holders(store: SyncStore, checks: dict[str, tuple[str, DealWrite]], states: dict[str, PatientState]) -> None:
    """A re-booking's deal is held by an earlier visit this message may not carry: load it, so a close
    the stage read finds is learnt on that visit (one read, only for such a continuation)."""
    wanted: dict[str, list[str]] = {}
    for pid, write in checks.values():
        held = held_stage(write, states[pid])
        if held is not None and held[0] not in states[pid].appointments:
            wanted.setdefault(pid, []).append(held[0])
    for pid, loaded in (store.load_patients(wanted) if wanted else {}).items():
        for aid in wanted[pid]:
            if aid in loaded.appointments:
                states[pid].appointments[aid] = loaded.appointments[aid]
