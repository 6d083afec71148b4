"""amoCRM gateway: the domain's look-ups and writes in amoCRM API v4 terms.

- Writes (complex creates, bulk POST and PATCH) are in ``clinicsync.adapters.amocrm.writes``.
- The MIS ids live in custom fields (``fields.crm_fields.contact.mis_patient_id`` and
  ``fields.crm_fields.deal.mis_appointment_id``; field ids are per entity). amoCRM cannot filter by them
  in bulk, so a look-up by MIS id scans what changed since the earliest recorded create intent (see
  ``lookups_need_intents``).
- Phones are never searched with ``query``: how it tokenises a stored ``8 (916) 111 22 33`` is
  undocumented, and on a raw-substring search no one string finds every way a person types a number.
  Every phone of a poll is matched against the account's contacts after normalising both sides
  (``clinicsync.adapters.amocrm.phones``).

No rule lives here: stages, funnels and adoption are decided by ``clinicsync.domain.rules``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from clinicsync.adapters.amocrm.client import PAGE_LIMIT as PAGE
from clinicsync.adapters.amocrm.client import AmoCrmClient, main_contact
from clinicsync.adapters.amocrm.client import embedded as _embedded
from clinicsync.adapters.amocrm.fields import LOST, WON, AmoFields, deal_match
from clinicsync.adapters.amocrm.phones import PhoneLookup
from clinicsync.adapters.amocrm.writes import AmoCrmWriter
from clinicsync.domain.config import ClinicConfig, Pipeline
from clinicsync.domain.crm_ports import (
    CrmMatches,
    CrmWrite,
    DealMatch,
    OpenLead,
    PipelineMismatch,
    WriteOutcome,
    missing_stages,
)
from clinicsync.domain.phones import normalise_phone
from clinicsync.domain.store_ports import CrmPhoneBook

UTM_CODES = ("SOURCE", "MEDIUM", "CAMPAIGN", "TERM", "CONTENT")  # amoCRM tracking fields UTM_<code>
SCAN_OVERLAP = 120  # seconds before the earliest intent that the MIS-id scan starts from


@dataclass(frozen=True)
class _Person:
    phone: str | None
    email: str | None
    full_name: str | None


class AmoCrmGateway(AmoFields):
    kind = "amocrm"
    lookups_need_intents = True
    guards_writes = False  # no conditional update in API v4: the syncer reads before it writes

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
        self._phones = PhoneLookup(client, config, phone_book, phone_key)
        self._writer = AmoCrmWriter(client, config)
        missing = [n for n in ("mis_patient_id", "mis_appointment_id") if self._field(n) is None]
        if missing:
            raise ValueError(f"amoCRM needs custom field ids in fields.crm_fields for: {', '.join(missing)}")

    def requests_made(self) -> int:
        return self._client.requests

    def integration_user(self) -> str:
        return self._user

    def apply(self, writes: Sequence[CrmWrite]) -> WriteOutcome:
        """The writes in complex, bulk POST and PATCH requests (``clinicsync.adapters.amocrm.writes``)."""
        return self._writer.apply(writes)

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
            problems += missing_stages(name, pipeline, statuses, "status")
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
            # An entity none of whose ids is wanted is not scanned (a re-booking's retry wants only its lead).
            for row in self._scan("contacts", since) if wanted_patients else ():
                owner = self._value(row, self._field("mis_patient_id"))
                if owner in wanted_patients:
                    contacts.setdefault(owner, str(row["id"]))
            for row in self._scan("leads", since) if wanted_visits else ():
                owner = self._value(row, self._field("mis_appointment_id"))
                if owner in wanted_visits:
                    deals.setdefault(owner, deal_match(row))
        wanted = list(dict.fromkeys(phones))
        candidates = self._phones.by_phones(wanted) if wanted else {}
        return CrmMatches(contacts=contacts, deals=deals, phones=candidates)

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
