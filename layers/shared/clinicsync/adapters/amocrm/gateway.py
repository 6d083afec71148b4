"""amoCRM gateway: the domain's look-ups and writes in amoCRM API v4 terms.

- A new patient with a new visit is one item of ``POST /api/v4/leads/complex`` (≤50 per request); so is
  a new visit on a contact we already know (an ``{id}`` reference), so a poll's creates share requests.
- Other creates (a new patient's further visits, which need its new contact id) and all updates are bulk
  ``POST``/``PATCH`` of up to 50 leads or contacts.
- The MIS ids live in custom fields (``fields.crm_fields.contact.mis_patient_id`` and
  ``fields.crm_fields.deal.mis_appointment_id``; field ids are per entity). amoCRM cannot filter by them
  in bulk, so a look-up by MIS id scans what changed since the earliest recorded create intent (see
  ``lookups_need_intents``).
- Phones are never searched with ``query``: how it tokenises a stored ``8 (916) 111 22 33`` is
  undocumented, and on a raw-substring search no one string finds every way a person types a number.
  Every phone of a poll, one or a thousand, is matched against the account's contacts after
  normalising both sides (``_PhoneIndex``): the index is stored in the table (contact ids and keyed
  hashes of phones) so a new container does not read every contact again; each look-up reads only
  what changed since, one request. A contact matched from an earlier read is read again by id before
  it is used, so its leads are current and a deleted one drops out (docs/architecture.md, "amoCRM
  phone look-up").

No rule lives here: stages, funnels and adoption are decided by ``clinicsync.domain.rules``.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from clinicsync.adapters.amocrm.client import PAGE_LIMIT as PAGE
from clinicsync.adapters.amocrm.client import AmoCrmClient, AmoCrmError, AmoCrmOutcomeUnknown, main_contact
from clinicsync.adapters.amocrm.client import embedded as _embedded
from clinicsync.domain.config import ClinicConfig, Pipeline
from clinicsync.domain.fieldtypes import FieldValueError, crm_value, default_type
from clinicsync.domain.phones import normalise_phone
from clinicsync.domain.ports import (
    ContactWrite,
    CrmMatches,
    CrmPhoneBook,
    CrmWrite,
    DealMatch,
    DealWrite,
    LeadWrite,
    OpenLead,
    PhoneCandidates,
    PipelineMismatch,
    WriteOutcome,
)

UTM_CODES = ("SOURCE", "MEDIUM", "CAMPAIGN", "TERM", "CONTENT")  # amoCRM tracking fields UTM_<code>
WON, LOST = "142", "143"  # the same in every pipeline
BULK = 50  # amoCRM accepts up to 250 per write, recommends 50, and answers 504 to what it cannot handle
SCAN_OVERLAP = 120  # seconds before the earliest intent that the MIS-id scan starts from
NATIVE = {"title": "name", "price": "price"}
NOT_WRITTEN = {"full_name", "phone", "email", "mis_patient_id", "mis_appointment_id"}


@dataclass(frozen=True)
class _Person:
    phone: str | None
    email: str | None
    full_name: str | None


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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


class AmoCrmGateway:
    kind = "amocrm"
    lookups_need_intents = True

    def __init__(
        self,
        client: AmoCrmClient,
        config: ClinicConfig,
        user_id: str = "",
        phone_book: CrmPhoneBook | None = None,
        phone_key: Callable[[str], str] | None = None,
    ) -> None:
        """``phone_book`` keeps the phone index between containers, under ``phone_key`` (a keyed hash):
        without it the index lives in the container only."""
        if phone_book is not None and phone_key is None:
            raise ValueError("a stored phone index needs a keyed hash for its phones")
        self._client = client
        self._config = config
        self._user = user_id
        self._book = phone_book
        self._phone_keys = phone_key
        missing = [n for n in ("mis_patient_id", "mis_appointment_id") if self._field(n) is None]
        if missing:
            raise ValueError(f"amoCRM needs custom field ids in fields.crm_fields for: {', '.join(missing)}")

    def requests_made(self) -> int:
        return self._client.requests

    def integration_user(self) -> str:
        return self._user

    def _field(self, name: str, entity: str | None = None) -> int | None:
        """A custom field's id; the MIS appointment id is a lead field, the other look-up fields are contacts'."""
        entity = entity or ("deal" if name == "mis_appointment_id" else "contact")
        mapped = self._config.fields.crm_field("deal" if entity == "deal" else "contact", name)
        return int(mapped.id) if mapped is not None and mapped.id.isdigit() else None

    # --- start-up check ----------------------------------------------------------------------------

    def verify_pipelines(self, pipelines: Mapping[Any, Pipeline]) -> frozenset[str]:
        body = self._client.request("GET", "/api/v4/leads/pipelines")
        known = {str(p["id"]): {str(s["id"]) for s in _embedded(p, "statuses")} for p in _embedded(body, "pipelines")}
        problems = []
        for name, pipeline in pipelines.items():
            statuses = known.get(pipeline.category_id)
            if statuses is None:
                problems.append(f"pipeline {name!r}: amoCRM has no pipeline {pipeline.category_id}")
                continue
            for status, stage in sorted(pipeline.stages.items()):
                if stage not in statuses:
                    problems.append(
                        f"pipeline {name!r} maps {status.value} to status {stage}, which pipeline "
                        f"{pipeline.category_id} does not have (known: {', '.join(sorted(statuses))})"
                    )
        if problems:
            raise PipelineMismatch(problems)
        return frozenset({WON, LOST})

    # --- look-ups ----------------------------------------------------------------------------------

    def find(
        self,
        patient_ids: Sequence[str],
        appointment_ids: Sequence[str],
        phones: Sequence[str] = (),
        multifield_contacts: Sequence[str] = (),  # noqa: ARG002 - amoCRM replaces PHONE per field, no entry ids
        intended_since: int | None = None,
    ) -> CrmMatches:
        contacts: dict[str, str] = {}
        deals: dict[str, DealMatch] = {}
        if intended_since is not None:
            # An earlier create may have landed with its response lost: find it by its MIS id.
            since = intended_since - SCAN_OVERLAP
            wanted_patients, wanted_visits = set(patient_ids), set(appointment_ids)
            for row in self._scan("contacts", since):
                owner = self._value(row, self._field("mis_patient_id"))
                if owner in wanted_patients:
                    contacts.setdefault(owner, str(row["id"]))
            for row in self._scan("leads", since):
                owner = self._value(row, self._field("mis_appointment_id"))
                if owner in wanted_visits:
                    deals.setdefault(owner, _deal_match(row))
        wanted = list(dict.fromkeys(phones))
        candidates = self._by_phones(wanted) if wanted else {}
        return CrmMatches(contacts=contacts, deals=deals, phones=candidates)

    def _by_phones(self, phones: Sequence[str]) -> dict[str, PhoneCandidates]:
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

    def _scan(self, entity: str, since: int) -> Iterator[dict[str, Any]]:
        return self._client.rows_since(f"/api/v4/{entity}", entity, since)

    # --- reading back what managers changed --------------------------------------------------------

    def fetch(self, entity: str, crm_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        path = "contacts" if entity == "contact" else "leads"
        for row in self._client.rows_by_id(f"/api/v4/{path}", path, crm_ids, [("with", "contacts")]):
            out[str(row["id"])] = self._canonical(entity, row)
        if entity == "lead":
            self._add_lead_phones(out)
        return out

    def contact_emails(self, contact_ids: Sequence[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for row in self._client.rows_by_id("/api/v4/contacts", "contacts", contact_ids):
            out[str(row["id"])] = self._values(row, code="EMAIL")
        return out

    def _add_lead_phones(self, leads: dict[str, dict[str, str]]) -> None:
        """A new amoCRM lead's phone is on its contact: read those contacts in one request."""
        wanted = {row["contact_id"]: lead_id for lead_id, row in leads.items() if row.get("contact_id")}
        if not wanted:
            return
        region = self._config.matching.default_region
        for row in self._client.rows_by_id("/api/v4/contacts", "contacts", list(wanted)):
            numbers = [n for v in self._values(row, code="PHONE") if (n := normalise_phone(v, region))]
            lead = leads[wanted[str(row["id"])]]
            lead["phone"] = numbers[0] if numbers else ""
            # The lead's contact is not a patient's contact yet: the processor may attach it.
            lead["contact_id"] = "" if not self._value(row, self._field("mis_patient_id")) else lead["contact_id"]

    def changed_since(self, entity: str, since: str, limit: int) -> list[dict[str, str]]:
        from datetime import datetime

        path = "contacts" if entity == "contact" else "leads"
        start = int(datetime.fromisoformat(since).timestamp())
        out = []
        for row in self._scan(path, start):
            if str(row.get("updated_by", "")) == self._user:
                continue  # our own writes
            out.append(self._canonical(entity, row))
            if len(out) >= limit:
                break
        return out

    def _canonical(self, entity: str, row: Mapping[str, Any]) -> dict[str, str]:
        from datetime import UTC, datetime

        owner_field = self._field("mis_patient_id" if entity == "contact" else "mis_appointment_id")
        updated = row.get("updated_at")
        out = {
            "entity": entity,
            "id": str(row["id"]),
            "owner": self._value(row, owner_field),
            "modified_by": str(row.get("updated_by") or ""),
            "modified_at": datetime.fromtimestamp(int(updated), UTC).isoformat() if updated else "",
        }
        if entity == "contact":
            for name in ("opt_outs", "opt_ins"):
                fid = self._field(name)
                out[name] = ",".join(self._values(row, field_id=fid)) if fid else ""
        else:
            status = str(row.get("status_id") or "")
            out |= {
                "stage": status,
                "category": str(row.get("pipeline_id") or ""),
                "closed": "Y" if status in (WON, LOST) else "N",
                "status": status,
                "contact_id": main_contact(row) or "",
            }
        return out

    @staticmethod
    def _values(row: Mapping[str, Any], *, code: str | None = None, field_id: int | None = None) -> list[str]:
        out = []
        for field in row.get("custom_fields_values") or []:
            if (code and field.get("field_code") == code) or (field_id and field.get("field_id") == field_id):
                out += [str(v.get("value")) for v in field.get("values") or [] if v.get("value") is not None]
        return out

    def _value(self, row: Mapping[str, Any], field_id: int | None) -> str:
        values = self._values(row, field_id=field_id) if field_id else []
        return values[0] if values else ""

    # --- IDENT tickets -----------------------------------------------------------------------------

    def open_leads(self, created_from: datetime, created_to: datetime, limit: int, offset: int) -> list[OpenLead]:
        """Leads of the primary pipeline in an adoptable status created in the window and not ours, then
        their main contacts (name, phone, e-mail) in one more request per 250."""
        pipeline = self._config.pipeline(repeat=False).category_id
        statuses = [
            param
            for n, status in enumerate(self._config.matching.adopt_deal_stages)
            for param in (
                (f"filter[statuses][{n}][pipeline_id]", pipeline),
                (f"filter[statuses][{n}][status_id]", status),
            )
        ]
        params: list[tuple[str, Any]] = [
            ("filter[created_at][from]", int(created_from.timestamp())),
            ("filter[created_at][to]", int(created_to.timestamp())),
            *statuses,
            ("order[created_at]", "asc"),
            ("with", "contacts"),
        ]
        skip = offset % PAGE
        pages = self._client.rows("/api/v4/leads", "leads", params, first_page=offset // PAGE + 1)
        rows = list(itertools.islice(pages, skip + limit))
        owned = self._field("mis_appointment_id")
        leads = [r for r in rows[skip:] if not self._value(r, owned)][:limit]
        contacts = self._ticket_contacts(leads)
        out = []
        for row in leads:
            main = main_contact(row)
            contact = contacts.get(main) if main else None
            out.append(
                OpenLead(
                    crm_id=str(row["id"]),
                    created_at=datetime.fromtimestamp(int(row["created_at"]), UTC),
                    phone=contact.phone if contact else None,
                    email=contact.email if contact else None,
                    full_name=contact.full_name if contact else None,
                    form_name=self._first(row, "FORMNAME") or str(row.get("name") or "") or None,
                    comment=None,
                    utm={key.lower(): v for key in UTM_CODES if (v := self._first(row, f"UTM_{key}"))},
                    referer=self._first(row, "REFERRER"),
                )
            )
        return out

    def _ticket_contacts(self, leads: Sequence[Mapping[str, Any]]) -> dict[str, _Person]:
        ids = list(dict.fromkeys(main for row in leads if (main := main_contact(row))))
        region = self._config.matching.default_region
        found: dict[str, _Person] = {}
        for row in self._client.rows_by_id("/api/v4/contacts", "contacts", ids):
            phones = [n for v in self._values(row, code="PHONE") if (n := normalise_phone(v, region))]
            emails = [v.strip() for v in self._values(row, code="EMAIL") if v.strip()]
            found[str(row["id"])] = _Person(
                phone=phones[0] if phones else None,
                email=emails[0] if emails else None,
                full_name=str(row.get("name") or "") or None,
            )
        return found

    def _first(self, row: Mapping[str, Any], code: str) -> str | None:
        values = self._values(row, code=code)
        return values[0] if values else None

    # --- writes ------------------------------------------------------------------------------------

    def apply(self, writes: Sequence[CrmWrite]) -> WriteOutcome:
        outcome = WriteOutcome()
        contacts = {w.patient_id: w for w in writes if isinstance(w, ContactWrite)}
        deals = [w for w in writes if isinstance(w, DealWrite)]
        # A new patient's first new visit goes with its contact in one complex item; a known patient's new
        # visit (its contact untouched here) rides in the same request by reference: one create request.
        complex_items: list[tuple[ContactWrite | None, DealWrite]] = []
        paired: set[str] = set()
        for deal in deals:
            if deal.deal_id is not None:
                continue
            contact = contacts.get(deal.patient_id)
            if contact is None and deal.contact_id is not None:
                complex_items.append((None, deal))
            elif contact and contact.contact_id is None and deal.patient_id not in paired:
                complex_items.append((contact, deal))
                paired.add(deal.patient_id)
        self._complex(complex_items, outcome)
        self._contacts([c for pid, c in contacts.items() if pid not in paired], outcome)
        done = {d.appointment_id for _, d in complex_items}
        remaining = [d for d in deals if d.appointment_id not in done and d.patient_id not in outcome.failed]
        self._leads([d for d in remaining if d.deal_id is None], outcome, create=True)
        self._leads([d for d in remaining if d.deal_id is not None], outcome, create=False)
        self._link_leads([w for w in writes if isinstance(w, LeadWrite)], outcome)
        return outcome

    def _send(self, method: str, path: str, items: list[tuple[str, str, dict[str, Any]]], outcome: WriteOutcome) -> Any:
        """items: (request_id, patient_id, body). Returns the reply for the items that were applied.

        amoCRM validates a bulk request as a whole and applies nothing when it answers 400. So the items it
        names are failed (with the field and the code it gave), and the others are sent again at once:
        one patient's bad field never holds back the rest. A 400 that names none is bisected."""
        if not items:
            return None
        try:
            return self._client.request(method, path, json=[body for _, _, body in items])
        except AmoCrmOutcomeUnknown:
            for _, pid, _ in items:
                outcome.failed.setdefault(pid, "outcome_unknown")  # the retry looks them up first
        except AmoCrmError as exc:
            if exc.status != 400:
                for _, pid, _ in items:
                    outcome.failed.setdefault(pid, f"refused: HTTP {exc.status}")
                return None
            blamed: set[str] = set()
            for ref, codes in exc.invalid.items():
                index = next((i for i, (rid, _, _) in enumerate(items) if rid == ref), None)
                if index is None and ref.isdigit() and int(ref) < len(items):
                    index = int(ref)  # PATCH items carry no request_id: amoCRM names them by position
                if index is not None:
                    _, pid, body = items[index]
                    blamed.add(pid)
                    outcome.failed.setdefault(pid, "refused: " + self._explain(codes, body))
            rest = [item for item in items if item[1] not in blamed and item[1] not in outcome.failed]
            if blamed:
                return self._send(method, path, rest, outcome)
            if len(rest) > 1:
                half = len(rest) // 2
                return _merge(
                    self._send(method, path, rest[:half], outcome), self._send(method, path, rest[half:], outcome)
                )
            for _, pid, _ in rest:
                outcome.failed.setdefault(pid, f"refused: {exc.detail[:120] or 'HTTP 400'}")
        return None

    def _explain(self, codes: Sequence[str], body: Mapping[str, Any]) -> str:
        """amoCRM's codes with the canonical field each one is about (ids and names only, no values)."""
        names = {
            (entity, str(mapped.id)): name
            for entity, fields in (
                ("contact", self._config.fields.crm_fields.contact),
                ("deal", self._config.fields.crm_fields.deal),
            )
            for name, mapped in fields.items()
        }
        out = []
        for code in codes[:5]:
            kind, _, where = code.partition(":")
            parts = where.split(".")
            label = where
            if "custom_fields_values" in parts:
                at = parts.index("custom_fields_values")
                holder: Any = body
                for part in parts[:at]:
                    holder = (
                        holder[int(part)] if isinstance(holder, list) and part.isdigit() else (holder or {}).get(part)
                    )
                try:
                    fid = str(holder["custom_fields_values"][int(parts[at + 1])]["field_id"])
                except (KeyError, IndexError, TypeError, ValueError):
                    fid = "?"
                entity = "contact" if "contacts" in parts[:at] else "deal"
                label = f"field {names.get((entity, fid)) or names.get(('contact', fid)) or fid} ({fid})"
            out.append(f"{kind} on {label}")
        return "; ".join(out)

    def _complex(self, pairs: list[tuple[ContactWrite | None, DealWrite]], outcome: WriteOutcome) -> None:
        """``(new contact, its deal)`` items, or ``(None, deal)`` for a deal on a known contact (an ``{id}``
        reference, which amoCRM's complex add takes as well as a new contact)."""
        for chunk in _chunks(pairs, BULK):
            items = []
            new_contact: set[str] = set()
            for contact, deal in chunk:
                try:
                    body = self._lead_body(deal)
                    if contact is None:
                        body["_embedded"] = {"contacts": [{"id": int(str(deal.contact_id)), "is_main": True}]}
                    else:
                        body["_embedded"] = {"contacts": [self._contact_body(contact)]}
                        new_contact.add(f"d:{deal.appointment_id}")
                except FieldValueError as exc:
                    outcome.failed.setdefault(deal.patient_id, f"invalid_field: {exc}")
                    continue
                items.append(
                    (f"d:{deal.appointment_id}", deal.patient_id, {**body, "request_id": f"d:{deal.appointment_id}"})
                )
            reply = self._send("POST", "/api/v4/leads/complex", items, outcome)
            patients = {rid: pid for rid, pid, _ in items}
            for row in reply if isinstance(reply, list) else []:
                # A plain array; request_id is a list when duplicate control merged several items.
                request_ids = row.get("request_id")
                for request_id in request_ids if isinstance(request_ids, list) else [request_ids]:
                    if request_id in patients:
                        outcome.deal_ids[str(request_id).removeprefix("d:")] = str(row["id"])
                        if request_id in new_contact:
                            outcome.contact_ids[patients[request_id]] = str(row["contact_id"])

    def _contacts(self, writes: list[ContactWrite], outcome: WriteOutcome) -> None:
        for create in (True, False):
            items = []
            for w in writes:
                if (w.contact_id is None) != create:
                    continue
                try:
                    items.append((f"c:{w.patient_id}", w.patient_id, self._contact_body(w), w.contact_id))
                except FieldValueError as exc:
                    outcome.failed.setdefault(w.patient_id, f"invalid_field: {exc}")
            self._bulk("contacts", items, outcome.contact_ids, create, outcome)

    def _leads(self, writes: list[DealWrite], outcome: WriteOutcome, create: bool) -> None:
        items = []
        for w in writes:
            if w.patient_id in outcome.failed:
                continue
            try:
                body = self._lead_body(w)
            except FieldValueError as exc:
                outcome.failed.setdefault(w.patient_id, f"invalid_field: {exc}")
                continue
            contact = w.contact_id or outcome.contact_ids.get(w.patient_id)
            if (create or w.link_contact) and contact:
                body["_embedded"] = {"contacts": [{"id": int(contact), "is_main": True}]}
            items.append((f"d:{w.appointment_id}", w.patient_id, body, w.deal_id))
        self._bulk("leads", items, outcome.deal_ids, create, outcome)

    def _bulk(
        self,
        entity: str,
        items: list[tuple[str, str, dict[str, Any], str | None]],
        ids: dict[str, str],
        create: bool,
        outcome: WriteOutcome,
    ) -> None:
        """Bulk POST (create, matched back by request_id) or PATCH (by id) of ``(key, patient, body, id)``
        items, 50 per request; ``ids`` receives key-without-prefix -> CRM id."""
        for chunk in _chunks(items, BULK):
            payload = [
                (key, pid, {**body, "request_id": key} if create else {**body, "id": int(str(crm_id))})
                for key, pid, body, crm_id in chunk
            ]
            reply = self._send("POST" if create else "PATCH", f"/api/v4/{entity}", payload, outcome)
            if reply is None:
                continue
            if create:
                for row in _embedded(reply, entity):
                    ids[str(row.get("request_id", "")).split(":", 1)[-1]] = str(row["id"])
            else:
                for key, pid, _, crm_id in chunk:
                    if pid not in outcome.failed:
                        ids[key.split(":", 1)[1]] = str(crm_id)

    def _link_leads(self, writes: list[LeadWrite], outcome: WriteOutcome) -> None:
        items = []
        for w in writes:
            contact = w.contact_id or outcome.contact_ids.get(w.patient_id)
            if contact:
                body = {"id": int(w.lead_id), "_embedded": {"contacts": [{"id": int(contact), "is_main": True}]}}
                items.append((f"l:{w.lead_id}", w.patient_id, body))
        for chunk in _chunks(items, BULK):
            self._send("PATCH", "/api/v4/leads", list(chunk), outcome)

    def _contact_body(self, write: ContactWrite) -> dict[str, Any]:
        src = write.fields
        body: dict[str, Any] = {}
        if "full_name" in src:
            name = src["full_name"]
            body.update(
                first_name=name["first"],
                last_name=name["last"],
                name=" ".join(p for p in (name["last"], name["first"], name["middle"]) if p),
            )
        fields: list[dict[str, Any]] = [self._cf("contact", "mis_patient_id", write.patient_id)]
        creating = write.contact_id is None
        for kind, code, enum in (("phone", "PHONE", "MOB"), ("email", "EMAIL", "PRIV")):
            if src.get(kind) and (creating or kind in write.changed_multifields):
                fields.append({"field_code": code, "values": [{"value": src[kind], "enum_code": enum}]})
        fields += [self._cf("contact", n, v) for n, v in src.items() if n not in NOT_WRITTEN and self._field(n)]
        body["custom_fields_values"] = fields
        return body

    def _lead_body(self, write: DealWrite) -> dict[str, Any]:
        src = write.fields
        body: dict[str, Any] = {"pipeline_id": int(write.category_id)}
        if write.stage is not None:
            body["status_id"] = int(write.stage)
        for name, key in NATIVE.items():
            if src.get(name) is not None:
                body[key] = int(float(src[name])) if key == "price" else src[name]
        fields = [self._cf("deal", "mis_appointment_id", write.appointment_id)]
        fields += [
            self._cf("deal", n, v)
            for n, v in src.items()
            if n not in NOT_WRITTEN | set(NATIVE) and self._field(n, "deal")
        ]
        body["custom_fields_values"] = fields
        return body

    def _cf(self, entity: str, name: str, value: Any) -> dict[str, Any]:
        """One custom field in the shape its amoCRM type takes (``clinicsync.domain.fieldtypes``)."""
        field_id = self._field(name, entity)
        mapped = self._config.fields.crm_field("deal" if entity == "deal" else "contact", name)
        if value is None or value in ([], ""):
            return {"field_id": field_id, "values": None}  # clears the field
        field_type = (mapped.type if mapped else None) or default_type("amocrm", name)
        if name in ("opt_outs", "opt_ins") and field_type in ("text", "textarea"):
            value = ",".join(value) if isinstance(value, list | tuple) else value  # the consent code reads it back
        converted = crm_value("amocrm", name, field_type, value, self._config.tz, mapped.values if mapped else None)
        values = converted if isinstance(converted, list) else [converted]
        return {"field_id": field_id, "values": [{"value": v} for v in values]}


def _merge(first: Any, second: Any) -> Any:
    """Two replies of a bisected bulk request as one: a plain array (complex) or ``_embedded`` lists."""
    if first is None or second is None:
        return first if second is None else second
    if isinstance(first, list) and isinstance(second, list):
        return [*first, *second]
    if isinstance(first, dict) and isinstance(second, dict):
        embedded = {
            key: [*(first.get("_embedded") or {}).get(key, []), *(second.get("_embedded") or {}).get(key, [])]
            for key in {*(first.get("_embedded") or {}), *(second.get("_embedded") or {})}
        }
        return {**first, "_embedded": embedded}
    return first


def _deal_match(row: Mapping[str, Any]) -> DealMatch:
    status = str(row.get("status_id"))
    return DealMatch(str(row["id"]), str(row.get("pipeline_id")), status, status in (WON, LOST))
