"""amoCRM writes: the domain's contact, deal and lead writes in API v4 requests.

- A new patient with a new visit is one item of ``POST /api/v4/leads/complex`` (≤50 per request); so is
  a new visit on a contact we already know (an ``{id}`` reference), so a poll's creates share requests.
- A new patient's further visits need its new contact's id: they top up the last complex request, which
  has room, once an earlier request made that contact; the rest, and all updates, are bulk
  ``POST``/``PATCH`` of up to 50 leads or contacts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from clinicsync.adapters.amocrm.client import AmoCrmClient, AmoCrmError, AmoCrmOutcomeUnknown
from clinicsync.adapters.amocrm.client import embedded as _embedded
from clinicsync.adapters.amocrm.fields import AmoFields, chunks
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.crm_ports import ContactWrite, CrmWrite, DealWrite, LeadWrite, WriteOutcome
from clinicsync.domain.fieldtypes import FieldValueError, crm_value, default_type

BULK = 50  # amoCRM accepts up to 250 per write, recommends 50, and answers 504 to what it cannot handle
NATIVE = {"title": "name", "price": "price"}
NOT_WRITTEN = {"full_name", "phone", "email", "mis_patient_id", "mis_appointment_id"}


class AmoCrmWriter(AmoFields):
    def __init__(self, client: AmoCrmClient, config: ClinicConfig) -> None:
        self._client = client
        self._config = config

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
        # A new patient's further visits need its new contact's id: they top up the last, part-filled
        # complex request once an earlier request gave that id (the rest go in bulk below).
        first = {d.appointment_id for _, d in complex_items}
        later = [d for d in deals if d.deal_id is None and d.patient_id in paired and d.appointment_id not in first]
        unpaired = [c for pid, c in contacts.items() if pid not in paired]
        with self._client.expecting(_planned_requests(complex_items, unpaired, deals, writes)):
            done = self._complex(complex_items, later, outcome)
            self._contacts(unpaired, outcome)
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

    def _complex(
        self, pairs: list[tuple[ContactWrite | None, DealWrite]], later: list[DealWrite], outcome: WriteOutcome
    ) -> set[str]:
        """``(new contact, its deal)`` items, or ``(None, deal)`` for a deal on a known contact (an ``{id}``
        reference, which amoCRM's complex add takes as well as a new contact). A request with room left
        takes ``later`` deals whose contact an earlier request created. Returns the visits sent."""
        sent: set[str] = set()
        queue = list(pairs)
        while queue:
            chunk, queue = queue[:BULK], queue[BULK:]
            ready = [d for d in later if d.patient_id in outcome.contact_ids and d.patient_id not in outcome.failed]
            for deal in ready[: BULK - len(chunk)]:
                later.remove(deal)
                chunk.append((None, replace(deal, contact_id=outcome.contact_ids[deal.patient_id])))
            sent |= {deal.appointment_id for _, deal in chunk}
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
        return sent

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
        for chunk in chunks(items, BULK):
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
        for chunk in chunks(items, BULK):
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


def _planned_requests(
    complex_items: Sequence[object],
    contacts: Sequence[ContactWrite],
    deals: Sequence[DealWrite],
    writes: Sequence[CrmWrite],
) -> int:
    """The requests ``apply`` will send at least (a new patient's later visits may need one more): the
    complex creates, contact creates and updates, lead updates and links, 50 a request."""

    def requests(n: int) -> int:
        return -(-n // BULK)

    new_contacts = sum(1 for c in contacts if c.contact_id is None)
    return (
        requests(len(complex_items))
        + requests(new_contacts)
        + requests(len(contacts) - new_contacts)
        + requests(sum(1 for d in deals if d.deal_id is not None))
        + requests(sum(1 for w in writes if isinstance(w, LeadWrite)))
    )


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
