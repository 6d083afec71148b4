"""amoCRM phone look-up for adoption: every phone of a poll matched against the account's contacts
after normalising both sides, never with ``query`` (docs/architecture.md, "amoCRM phone look-up").

The index is stored in the table (contact ids and keyed hashes of phones) so a new container does not
read every contact again; each look-up reads only what changed since, one request. A contact matched
from an earlier read is read again by id before it is used, so its leads are current and a deleted one
drops out.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from clinicsync.adapters.amocrm.client import AmoCrmClient
from clinicsync.adapters.amocrm.client import embedded as _embedded
from clinicsync.adapters.amocrm.fields import LOST, WON, AmoFields
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.crm_ports import PhoneCandidates
from clinicsync.domain.phones import normalise_phone
from clinicsync.domain.store_ports import CrmPhoneBook


@dataclass
class _PhoneIndex:
    """The account's contacts as far as adoption needs them: normalised phones, owner, lead ids.

    Kept per account for the container's life: the first use starts from the stored index (or reads
    every contact, 250 per page, when none is stored), later uses read only contacts updated since the
    newest ``updated_at`` seen (inclusive, so writes in that same second are read again). Phones are
    held as keyed hashes when the index is stored, never in clear; nothing of it is logged.
    Linking a lead may not touch its contact's ``updated_at``, so lead ids from an earlier read are
    never trusted: the gateway re-reads such a contact before it uses it.
    """

    contacts: dict[str, tuple[frozenset[str], str | None, tuple[str, ...]]] = dataclasses.field(default_factory=dict)
    seen_to: int | None = None

    def by_phone(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for contact_id, (phones, _, _) in sorted(self.contacts.items(), key=lambda kv: int(kv[0])):
            for phone in phones:
                out.setdefault(phone, []).append(contact_id)
        return out


# One index per client: wiring keeps one client per container, so the index survives warm invocations.
_INDEXES: weakref.WeakKeyDictionary[AmoCrmClient, _PhoneIndex] = weakref.WeakKeyDictionary()


class PhoneLookup(AmoFields):
    def __init__(
        self,
        client: AmoCrmClient,
        config: ClinicConfig,
        phone_book: CrmPhoneBook | None,
        phone_key: Callable[[str], str] | None,
    ) -> None:
        self._client = client
        self._config = config
        self._book = phone_book
        self._phone_keys = phone_key

    def by_phones(self, phones: Sequence[str]) -> dict[str, PhoneCandidates]:
        """Match ``phones`` (E.164) against the account's contacts, however many there are."""
        index, fresh = self._phone_index()
        keys = {phone: self._phone_key(phone) for phone in phones}
        wanted = set(keys.values())
        stale = [cid for cid, (numbers, _, _) in index.contacts.items() if numbers & wanted and cid not in fresh]
        if stale:
            # Read earlier: their links may have changed without touching them, or they may be gone.
            rows = self._client.rows_by_id("/api/v4/contacts", "contacts", stale, [("with", "leads")])
            before = {cid: index.contacts[cid][0] for cid in stale}
            found = {self._index_row(index, row, advance=False) for row in rows}
            for cid in set(stale) - found:  # forgotten only once the whole re-read has answered
                del index.contacts[cid]
            self._persist(before, index)
        owners = index.by_phone()
        matched: dict[str, list[tuple[str, str | None]]] = {}
        lead_ids: dict[str, str] = {}  # lead id -> phone
        for phone in phones:
            for contact_id in owners.get(keys[phone], []):
                _, owner, leads = index.contacts[contact_id]
                matched.setdefault(phone, []).append((contact_id, owner))
                lead_ids.update(dict.fromkeys(leads, phone))
        deals = self._adoptable_leads(lead_ids)
        return {
            phone: PhoneCandidates(contacts=tuple(matched.get(phone, [])), deals=tuple(deals.get(phone, [])))
            for phone in set(matched) | set(deals)
        }

    def _phone_key(self, e164: str) -> str:
        return self._phone_keys(e164) if self._phone_keys else e164

    def _phone_index(self) -> tuple[_PhoneIndex, set[str]]:
        """The index brought up to date, and the ids of the contacts this call read (current links).

        A container's first use starts from the stored index (ids and keyed hashes, ``clinicsync.adapters.aws.store``)
        and reads only what changed since it was stored; with none stored, every contact once."""
        index = _INDEXES.get(self._client)
        if index is None:
            index = _INDEXES.setdefault(self._client, _PhoneIndex())
            if self._book is not None:
                index.seen_to, stored = self._book.crm_phone_index()
                for cid, phone_keys in stored.items():
                    # Owner and links unknown: a match is re-read by id before it is used.
                    index.contacts[cid] = (frozenset(phone_keys), None, ())
        seen_to = index.seen_to
        rows = list(self._client.rows_since("/api/v4/contacts", "contacts", seen_to or 0, [("with", "leads")]))
        before = {str(row["id"]): index.contacts.get(str(row["id"]), (frozenset(),))[0] for row in rows}
        fresh = {self._index_row(index, row) for row in rows}
        self._persist(before, index)
        if self._book is not None and index.seen_to is not None and index.seen_to != seen_to:
            self._book.advance_crm_phones(index.seen_to)  # after the entries it covers are stored
        return index, fresh

    def _persist(self, before: Mapping[str, frozenset[str]], index: _PhoneIndex) -> None:
        """Store what changed in the phone keys of the contacts in ``before`` (a contact gone: all of them)."""
        if self._book is None:
            return
        add: list[tuple[str, str]] = []
        drop: list[tuple[str, str]] = []
        for cid, old in before.items():
            new = index.contacts[cid][0] if cid in index.contacts else frozenset()
            add += [(cid, key) for key in sorted(new - old)]
            drop += [(cid, key) for key in sorted(old - new)]
        self._book.update_crm_phones(add, drop)

    def _index_row(self, index: _PhoneIndex, row: Mapping[str, Any], *, advance: bool = True) -> str:
        """Put one contact row in the index. Only rows of the ``updated_at`` scan move ``seen_to``: a
        contact re-read by id may be newer than others changed meanwhile that the next scan must read."""
        region = self._config.matching.default_region
        phones = frozenset(
            self._phone_key(n) for v in self._values(row, code="PHONE") if (n := normalise_phone(v, region))
        )
        leads = tuple(str(lead["id"]) for lead in _embedded(row, "leads"))
        contact_id = str(row["id"])
        index.contacts[contact_id] = (phones, self._value(row, self._field("mis_patient_id")) or None, leads)
        updated = row.get("updated_at")
        if advance and isinstance(updated, int):
            index.seen_to = max(index.seen_to or updated, updated)
        return contact_id

    def _adoptable_leads(self, lead_ids: Mapping[str, str]) -> dict[str, list[tuple[str, str, str]]]:
        """Open, unowned leads in an adoptable status among ``lead_ids`` (lead id -> phone), by phone."""
        adoptable = set(self._config.matching.adopt_deal_stages)
        out: dict[str, list[tuple[str, str, str]]] = {}
        for row in self._client.rows_by_id("/api/v4/leads", "leads", sorted(lead_ids, key=int)):
            status = str(row.get("status_id"))
            if status in (WON, LOST) or self._value(row, self._field("mis_appointment_id")):
                continue
            if status in adoptable and str(row["id"]) in lead_ids:
                out.setdefault(lead_ids[str(row["id"])], []).append(
                    (str(row["id"]), str(row.get("pipeline_id")), status)
                )
        return out
