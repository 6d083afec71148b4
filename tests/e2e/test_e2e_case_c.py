"""Case C end to end: InfoClinica -> amoCRM with the case's preset (16 contact and 16 deal fields).

The card and the visits are read back through amoCRM's own API, field by field, with each value's type.
Fields InfoClinica's API has no known source for (docs/fields.md, with the evidence) are never invented:
they must stay empty in the CRM.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, time, timedelta
from typing import Any

import httpx
import pytest

from clinicsync.domain.fieldmap import FIELD_PRESETS
from sandbox.local import LocalClinic
from sandbox.seed import CLINIC_TZ

UNSOURCED_CONTACT = {
    "representative",
    "card_comment",
    "patient_status",
    "guarantee_letter",
    "policy_number",
    "policy_valid_until",
    "cancellation_date",
}
UNSOURCED_DEAL = {
    "booked_by",
    "service_codes",
    "comment",
    "assignment_id",
    "patient_status",
    "visit_category",
    "charged",
    "discount",
    "paid",
}


@pytest.fixture
def clinic(make_clinic: Callable[..., LocalClinic]) -> LocalClinic:
    return make_clinic(
        mis="infoclinica",
        crm="amocrm",
        patients=4,
        appointments=4,
        config_overrides={"fields.preset": "infoclinica_amocrm_case_c", "fields.contact": None, "fields.deal": None},
    )


def _api(clinic: LocalClinic, path: str) -> Any:
    assert clinic.amocrm is not None
    token = clinic.amocrm.issue_tokens()["access_token"]
    response = httpx.get(f"{clinic.crm_url}{path}", headers={"Authorization": f"Bearer {token}"})
    response.raise_for_status()
    return response.json()


def _fields(clinic: LocalClinic, entity: str, record: dict[str, Any]) -> dict[str, list[Any]]:
    """A record's custom fields by canonical name, through the clinic's own map."""
    mapped = clinic.config.fields.crm_fields.contact if entity == "contact" else clinic.config.fields.crm_fields.deal
    by_id = {int(f.id): name for name, f in mapped.items()}
    for name in ("mis_patient_id", "opt_outs") if entity == "contact" else ("mis_appointment_id", "visit_at", "status"):
        if (legacy := clinic.config.fields.crm_names.get(name)) is not None:
            by_id[int(legacy)] = name
    return {
        by_id.get(f["field_id"], f.get("field_code") or str(f["field_id"])): [v["value"] for v in f["values"]]
        for f in record.get("custom_fields_values") or []
    }


def test_case_c_contact_and_deal_fields_arrive_with_their_types(clinic: LocalClinic) -> None:
    ic = clinic.mis.emulator
    today = clinic.mis.at(0, "00:00").date()
    # A child of nine (day capped at 28: on 29 February nine years back has no such day).
    born = today.replace(year=today.year - 9, day=min(today.day, 28)) - timedelta(days=40)
    child = ic.add_client(
        "Смирнова", "Алиса", midname="Игоревна", gender=2, bdate=born, phone="8 (916) 555-12-34", REFUSESMS=True
    )
    ic.update_client(child, PMAIL="Parent.Smirnova@example.ru", PADDR="г. Москва, ул. Чехова, д. 5, кв. 12")
    dms_start, paid_start = clinic.mis.at(2, "10:30"), clinic.mis.at(3, "15:00")
    dms = clinic.mis.book(child, dms_start, insurance_policy="7700 1234 5678 9012")
    paid = clinic.mis.book(child, paid_start, price="4200.00")
    clinic.sync()
    assert clinic.stack.queue_depth("SyncQueue", dlq=True) == 0  # the full preset never dead-letters

    contact_id = clinic.crm.contact_of_patient(str(child))
    assert contact_id is not None
    contact = _api(clinic, f"/api/v4/contacts/{contact_id}")
    got = _fields(clinic, "contact", contact)
    assert (contact["last_name"], contact["first_name"], contact["name"]) == (
        "Смирнова",
        "Алиса",
        "Смирнова Алиса Игоревна",
    )
    assert got["PHONE"] == ["+79165551234"] and got["EMAIL"] == ["parent.smirnova@example.ru"]
    assert got["mis_patient_id"] == [str(child)]
    assert got["age"] == ["9"]  # numeric field
    assert got["sex"] == ["Женский"]  # the select's own option
    assert got["birth_date"] == [int(datetime.combine(born, time(0, 0), CLINIC_TZ).timestamp())]  # birthday: Unix
    assert got["residence"] == ["г. Москва, ул. Чехова, д. 5, кв. 12"]
    assert got["opt_outs"] == ["sms"]
    assert not UNSOURCED_CONTACT & set(got)  # no known InfoClinica source: left empty, never invented

    deals = clinic.crm.deals()
    for visit, start, price in ((dms, dms_start, 0), (paid, paid_start, 4200)):
        lead = _api(clinic, f"/api/v4/leads/{deals[str(visit)]['id']}")
        fields = _fields(clinic, "deal", lead)
        created = ic.visit(visit)["CREATEDATE"]
        assert lead["price"] == price  # the list price; 0 marks the DMS visit
        assert fields["mis_appointment_id"] == [str(visit)]
        assert fields["visit_at"] == [int(start.timestamp())]  # date_time: Unix, the hour kept
        assert fields["booked_at"] == [int(created.replace(tzinfo=CLINIC_TZ).timestamp())]
        assert fields["status"] == ["booked"]
        assert fields["doctor"] and fields["doctor"][0].count(" ") == 2  # surname, name, patronymic
        assert fields["branch"] and fields["branch"][0] == ic._branches[ic.visit(visit)["FILIAL"]]["FNAME"]
        assert not UNSOURCED_DEAL & set(fields)
    writes = clinic.crm.stats()["writes"]
    clinic.sync()
    assert clinic.crm.stats()["writes"] == writes  # typed values hash the same: a second sync writes nothing
    contact_list, deal_list = FIELD_PRESETS["infoclinica_amocrm_case_c"]
    arrived = {"full_name", "phone", "email", "age", "sex", "mis_patient_id", "birth_date", "residence", "opt_outs"}
    assert set(contact_list) == arrived | UNSOURCED_CONTACT
    assert set(deal_list) == {"booked_at", "visit_at", "doctor", "branch", "status", "mis_appointment_id", "price"} | (
        UNSOURCED_DEAL
    )
