"""One view over either CRM emulator, so the end-to-end scenarios are written once and run for both.

A deal is ``{"id", "origin", "category", "stage", "closed", "contact_id", "visit_at", "status",
"is_dms", "lead_id"}``; a contact is ``{"id", "origin", "phones"}``. Manager actions go through the
emulator's own manager helpers, so they fire the CRM's webhooks like a person in the UI would.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any, Protocol

from sandbox.emulators.amocrm import (
    LOST_STATUS_ID,
    MAIN_PIPELINE_ID,
    STATUS_NEW_REQUEST,
    WON_STATUS_ID,
    AmoCrmEmulator,
)
from sandbox.emulators.bitrix24 import Bitrix24Emulator

Deal = dict[str, Any]


class CrmView(Protocol):
    kind: str

    def deals(self) -> dict[str, Deal]: ...  # by MIS appointment id (ORIGIN)
    def contacts(self) -> dict[str, dict[str, Any]]: ...  # by CRM id
    def contacts_by_origin(self) -> Counter[str]: ...
    def deals_by_origin(self) -> Counter[str]: ...  # raw count per MIS appointment id: >1 is a duplicate
    def appointment_history(self) -> dict[str, list[str]]: ...  # deal id -> MIS appointment ids it named, in order
    def stats(self) -> dict[str, int]: ...
    def won_stage(self, category: str) -> str: ...
    # as_integration: the manager works under the integration's own login (amoCRM acts as the user who
    # granted the token; a small clinic may share one Bitrix24 login), so the CRM records our user as modifier.
    def manager_move(self, deal_id: str, stage: str, *, as_integration: bool = False) -> None: ...
    def manager_create_inquiry(self, phone: str) -> str: ...  # an open lead/deal for a phone, as a call makes
    def manager_create_contact(self, phone: str) -> str: ...
    def manager_create_deal(self, contact_id: str, stage: str | None = None) -> str: ...
    def manager_set_opt_outs(self, contact_id: str, channels: str) -> None: ...
    def manager_set_opt_ins(self, contact_id: str, channels: str, *, as_integration: bool = False) -> None: ...
    def manager_set_consent_fields(  # both fields in one save
        self, contact_id: str, opt_outs: str, opt_ins: str, *, as_integration: bool = False
    ) -> None: ...
    def manager_touch_contact(self, contact_id: str) -> None: ...  # an unrelated edit (a comment)
    def manager_duplicate_contact(self, contact_id: str) -> str: ...  # a copy carrying the same MIS id
    def advance_clock(self, seconds: float) -> None: ...
    def contact_of_patient(self, patient_id: str) -> str | None: ...
    def contact_opt_outs(self, contact_id: str) -> set[str]: ...
    def adopted(self, inquiry_id: str, deal: Deal) -> bool: ...
    def pending_events(self) -> int: ...
    def drop_next_stage_event(self) -> None: ...
    def stage_name(self, stage: str) -> str: ...
    def lose_next_create_response(self) -> None: ...  # applied, but the response never arrives
    def manual_stage(self, category: str) -> str: ...  # an open stage the sync would not pick itself


class Bitrix24View:
    kind = "bitrix24"

    def __init__(self, emulator: Bitrix24Emulator) -> None:
        self.emu = emulator

    def deals(self) -> dict[str, Deal]:
        return {
            str(d["ORIGIN_ID"]): {
                "id": str(d["ID"]),
                "origin": str(d["ORIGIN_ID"]),
                "category": str(d.get("CATEGORY_ID")),
                "stage": str(d.get("STAGE_ID")),
                "closed": d.get("CLOSED") == "Y",
                "contact_id": str(d.get("CONTACT_ID") or ""),
                "visit_at": str(d.get("UF_CRM_CS_VISIT_AT") or d.get("BEGINDATE") or ""),
                "status": d.get("UF_CRM_CS_STATUS"),
                "is_dms": {"Y": True, "N": False}.get(str(d.get("UF_CRM_CS_DMS"))),
                "lead_id": str(d.get("LEAD_ID") or ""),
                "modified": str(d.get("DATE_MODIFY")),
            }
            for d in self.emu.deals.values()
            if d.get("ORIGIN_ID")
        }

    def contacts(self) -> dict[str, dict[str, Any]]:
        return {
            str(cid): {
                "id": str(cid),
                "origin": str(c.get("ORIGIN_ID") or ""),
                "phones": [p["VALUE"] for p in c.get("PHONE") or []],
            }
            for cid, c in self.emu.contacts.items()
        }

    def contacts_by_origin(self) -> Counter[str]:
        return Counter(c["origin"] for c in self.contacts().values() if c["origin"])

    def deals_by_origin(self) -> Counter[str]:
        return Counter(str(d["ORIGIN_ID"]) for d in self.emu.deals.values() if d.get("ORIGIN_ID"))

    def appointment_history(self) -> dict[str, list[str]]:
        return {
            str(did): [str(v) for v in self.emu.field_history("deal", did, "ORIGIN_ID") if v] for did in self.emu.deals
        }

    def stats(self) -> dict[str, int]:
        s = self.emu.stats()
        return {
            "requests": s["requests"],
            "writes": s["writes"],
            "throttled": s["rate_limited_503"] + s["rate_limited_429"],
        }

    def won_stage(self, category: str) -> str:
        return "WON" if category == "0" else f"C{category}:WON"

    def manager_move(self, deal_id: str, stage: str, *, as_integration: bool = False) -> None:
        user = self.emu.user_id if as_integration else None  # the inbound webhook's user is the integration's
        self.emu.manager_update("deal", int(deal_id), {"STAGE_ID": stage}, user_id=user)

    def manager_create_inquiry(self, phone: str) -> str:
        return str(
            self.emu.manager_create_lead(
                TITLE="Заявка с сайта", NAME="Анна", SOURCE_ID="WEB", PHONE=[{"VALUE": phone, "VALUE_TYPE": "MOBILE"}]
            )
        )

    def manager_create_contact(self, phone: str) -> str:
        return str(self.emu.manager_create_contact(NAME="Анна", PHONE=[{"VALUE": phone}]))

    def manager_create_deal(self, contact_id: str, stage: str | None = None) -> str:
        return str(self.emu.manager_create_deal(TITLE="Обращение", CONTACT_ID=int(contact_id), STAGE_ID=stage or "NEW"))

    def manager_set_opt_outs(self, contact_id: str, channels: str) -> None:
        self.emu.manager_update_contact(int(contact_id), UF_CRM_CS_OPT_OUTS=channels)

    def manager_set_opt_ins(self, contact_id: str, channels: str, *, as_integration: bool = False) -> None:
        user = self.emu.user_id if as_integration else None
        self.emu.manager_update("contact", int(contact_id), {"UF_CRM_CS_OPT_INS": channels}, user_id=user)

    def manager_set_consent_fields(
        self, contact_id: str, opt_outs: str, opt_ins: str, *, as_integration: bool = False
    ) -> None:
        fields = {"UF_CRM_CS_OPT_OUTS": opt_outs, "UF_CRM_CS_OPT_INS": opt_ins}
        user = self.emu.user_id if as_integration else None
        self.emu.manager_update("contact", int(contact_id), fields, user_id=user)

    def manager_touch_contact(self, contact_id: str) -> None:
        self.emu.manager_update_contact(int(contact_id), COMMENTS=f"звонок {self.emu.clock.now():.0f}")

    def manager_duplicate_contact(self, contact_id: str) -> str:
        original = self.emu.record("contact", int(contact_id)) or {}
        copied = {k: original[k] for k in ("NAME", "LAST_NAME", "ORIGINATOR_ID", "ORIGIN_ID") if original.get(k)}
        return str(self.emu.manager_create_contact(**copied))

    def advance_clock(self, seconds: float) -> None:
        self.emu.clock.advance(seconds)

    def contact_of_patient(self, patient_id: str) -> str | None:
        for cid, c in list(self.emu.contacts.items()):
            if str(c.get("ORIGIN_ID") or "") == patient_id:
                return str(cid)
        return None

    def contact_opt_outs(self, contact_id: str) -> set[str]:
        value = (self.emu.record("contact", int(contact_id)) or {}).get("UF_CRM_CS_OPT_OUTS") or ""
        return {v.strip() for v in str(value).split(",") if v.strip()}

    def adopted(self, inquiry_id: str, deal: Deal) -> bool:
        lead = self.emu.leads[int(inquiry_id)]
        return (
            deal["lead_id"] == inquiry_id
            and lead["STATUS_ID"] == "CONVERTED"
            and (str(lead.get("CONTACT_ID")) == deal["contact_id"])
        )

    def pending_events(self) -> int:
        return len(self.emu.pending_events())

    def drop_next_stage_event(self) -> None:
        self.emu.drop_next_events(1, "ONCRMDEALUPDATE")

    def lose_next_create_response(self) -> None:
        self.emu.faults.add(method="crm.contact.add", status=502, html=True, times=1, after_apply=True)

    def manual_stage(self, category: str) -> str:
        return "EXECUTING" if category == "0" else f"C{category}:EXECUTING"

    def stage_name(self, stage: str) -> str:
        with self.emu._lock:  # sandbox-only peek at the emulator's stage table
            names = {s["STATUS_ID"]: s["NAME"] for s in self.emu._statuses if s["ENTITY_ID"].startswith("DEAL_STAGE")}
        return str(names.get(stage, "?"))


class AmoCrmView:
    kind = "amocrm"

    def __init__(self, emulator: AmoCrmEmulator, fields: dict[str, int]) -> None:
        self.emu = emulator
        self.fields = fields  # canonical name -> custom field id

    def _cf(self, record: dict[str, Any], name: str) -> Any:
        for field in record.get("custom_fields_values") or []:
            if field.get("field_id") == self.fields.get(name):
                values = field.get("values") or []
                return values[0].get("value") if values else None
        return None

    def deals(self) -> dict[str, Deal]:
        out = {}
        for lead_id, lead in self.emu.leads.items():
            origin = self._cf(lead, "mis_appointment_id")
            if not origin:
                continue
            # A deal hangs on its main contact; an adopted inquiry keeps the form's contact linked beside it.
            linked = (self.emu.lead(lead_id) or {}).get("_embedded", {}).get("contacts") or []
            main = next((str(c["id"]) for c in linked if c.get("is_main")), "")
            visit = self._cf(lead, "visit_at")
            out[str(origin)] = {
                "id": str(lead_id),
                "origin": str(origin),
                "category": str(lead.get("pipeline_id")),
                "stage": str(lead.get("status_id")),
                "closed": lead.get("status_id") in (WON_STATUS_ID, LOST_STATUS_ID),
                "contact_id": main,
                "visit_at": datetime.fromtimestamp(visit, UTC).isoformat() if isinstance(visit, int) else str(visit),
                "status": self._cf(lead, "status"),
                "is_dms": self._cf(lead, "is_dms"),
                "lead_id": str(lead_id),
                "modified": str(lead.get("updated_at")),
            }
        return out

    def contacts(self) -> dict[str, dict[str, Any]]:
        out = {}
        for cid, contact in self.emu.contacts.items():
            phones = [
                v["value"]
                for f in contact.get("custom_fields_values") or []
                if f.get("field_code") == "PHONE"
                for v in f.get("values") or []
            ]
            out[str(cid)] = {"id": str(cid), "origin": str(self._cf(contact, "mis_patient_id") or ""), "phones": phones}
        return out

    def contacts_by_origin(self) -> Counter[str]:
        return Counter(c["origin"] for c in self.contacts().values() if c["origin"])

    def deals_by_origin(self) -> Counter[str]:
        origins = (self._cf(lead, "mis_appointment_id") for lead in self.emu.leads.values())
        return Counter(str(o) for o in origins if o)

    def appointment_history(self) -> dict[str, list[str]]:
        field_id = self.fields["mis_appointment_id"]
        return {
            str(lid): [str(v) for v in self.emu.field_history("leads", lid, field_id) if v] for lid in self.emu.leads
        }

    def stats(self) -> dict[str, int]:
        s = self.emu.stats()
        return {"requests": s["requests"], "writes": s["writes"], "throttled": s.get("rate_limited_429", 0)}

    def won_stage(self, category: str) -> str:
        return str(WON_STATUS_ID)

    def manager_move(self, deal_id: str, stage: str, *, as_integration: bool = False) -> None:
        user = self.emu.api_user_id if as_integration else None  # the user who granted our token
        self.emu.manager_move_lead(int(deal_id), int(stage), user_id=user)

    def manager_create_inquiry(self, phone: str) -> str:
        # In amoCRM an inquiry is a lead at «Новая заявка» with the caller's contact.
        contact = self.manager_create_contact(phone)
        return self.manager_create_deal(contact)

    def manager_create_contact(self, phone: str) -> str:
        return str(
            self.emu.manager_create_contact(
                name="Анна",
                custom_fields_values=[{"field_code": "PHONE", "values": [{"value": phone, "enum_code": "MOB"}]}],
            )
        )

    def manager_create_deal(self, contact_id: str, stage: str | None = None) -> str:
        status = int(stage) if stage else STATUS_NEW_REQUEST
        return str(
            self.emu.manager_create_lead(
                "Обращение из WhatsApp", contact_ids=[int(contact_id)], status_id=status, pipeline_id=MAIN_PIPELINE_ID
            )
        )

    def manager_set_opt_outs(self, contact_id: str, channels: str) -> None:
        field = {"field_id": self.fields["opt_outs"], "values": [{"value": channels}]}
        self.emu.manager_update_contact(int(contact_id), custom_fields_values=[field])

    def manager_set_opt_ins(self, contact_id: str, channels: str, *, as_integration: bool = False) -> None:
        field = {"field_id": self.fields["opt_ins"], "values": [{"value": channels}]}
        user = self.emu.api_user_id if as_integration else None
        self.emu.manager_update_contact(int(contact_id), custom_fields_values=[field], user_id=user)

    def manager_set_consent_fields(
        self, contact_id: str, opt_outs: str, opt_ins: str, *, as_integration: bool = False
    ) -> None:
        fields = [
            {"field_id": self.fields[name], "values": [{"value": value}] if value else None}  # None clears it
            for name, value in (("opt_outs", opt_outs), ("opt_ins", opt_ins))
        ]
        user = self.emu.api_user_id if as_integration else None
        self.emu.manager_update_contact(int(contact_id), custom_fields_values=fields, user_id=user)

    def manager_touch_contact(self, contact_id: str) -> None:
        self.emu.manager_update_contact(int(contact_id), name=f"Анна (звонок {self.emu.clock.now():.0f})")

    def manager_duplicate_contact(self, contact_id: str) -> str:
        pid = self._cf(self.emu.contacts[int(contact_id)], "mis_patient_id")
        field = {"field_id": self.fields["mis_patient_id"], "values": [{"value": pid}]}
        return str(self.emu.manager_create_contact(name="Анна", custom_fields_values=[field]))

    def advance_clock(self, seconds: float) -> None:
        self.emu.clock.advance(seconds)

    def contact_of_patient(self, patient_id: str) -> str | None:
        for cid, contact in list(self.emu.contacts.items()):
            if str(self._cf(contact, "mis_patient_id") or "") == patient_id:
                return str(cid)
        return None

    def contact_opt_outs(self, contact_id: str) -> set[str]:
        value = self._cf(self.emu.contacts.get(int(contact_id)) or {}, "opt_outs") or ""
        return {v.strip() for v in str(value).split(",") if v.strip()}

    def adopted(self, inquiry_id: str, deal: Deal) -> bool:
        return deal["id"] == inquiry_id  # the open lead itself moves; nothing new is created

    def pending_events(self) -> int:
        return len(self.emu.pending_webhook_events())

    def drop_next_stage_event(self) -> None:
        self.emu.drop_next_events(1, "status_lead")
        self.emu.drop_next_events(1, "update_lead")

    def lose_next_create_response(self) -> None:
        self.emu.faults.add(path_prefix="/api/v4/leads/complex", status=504, html=True, times=1, after_apply=True)

    def manual_stage(self, category: str) -> str:
        return str(STATUS_NEW_REQUEST)

    def stage_name(self, stage: str) -> str:
        names = {str(s["id"]): s["name"] for s in self.emu.statuses(MAIN_PIPELINE_ID)}
        return str(names.get(stage, "?"))
