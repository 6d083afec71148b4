"""Case B end to end: IDENT -> Bitrix24 with the case's preset, in the local runtime.

The card and the visits are read back through Bitrix24's REST API (crm.contact.get, crm.deal.get and the
userfield lists), field by field, with each field's type. Fields IDENT has no known source for
(docs/ident.md) are never invented: they stay empty in the CRM.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clinicsync.domain.config import load_clinic_config
from clinicsync.domain.fieldmap import FIELD_PRESETS, CrmField
from clinicsync_cli.discovery import check_fields, discover_crm
from sandbox.card import CASE_B_OVERRIDES, bitrix24_rest, create_case_fields
from sandbox.local import LocalClinic
from tests.e2e.test_operator_cli import run  # the operator's CLI, as an engineer runs it

UNSOURCED_CONTACT = {"home_address": "UF_CRM_CS_HOME_ADDRESS", "family": "UF_CRM_CS_FAMILY"}
PHONE = "+7 916 555-40-17"


@pytest.fixture
def clinic(make_clinic: Callable[..., LocalClinic]) -> LocalClinic:
    clinic = make_clinic(mis="ident", patients=4, appointments=4, rate_limit=False, config_overrides=CASE_B_OVERRIDES)
    create_case_fields(clinic)  # `clinicsync check --create-fields`, before the first sync
    return clinic


def _get(client: Any, entity: str, crm_id: str) -> dict[str, Any]:
    return dict(client.call(f"crm.{entity}.get", {"id": crm_id})["result"])


def test_case_b_contact_and_deal_fields_arrive_with_their_types(clinic: LocalClinic) -> None:
    rest = bitrix24_rest(clinic)
    assert check_fields(clinic.config, discover_crm(rest)) == []  # every mapped field exists, with its type
    types = {
        entity: {f["FIELD_NAME"]: f["USER_TYPE_ID"] for f in rest.call(f"crm.{entity}.userfield.list")["result"]}
        for entity in ("contact", "deal")
    }
    ident = clinic.ident
    doctors = {d["ID"]: " ".join((d["Surname"], d["Name"], d["Patronymic"])) for d in ident.doctors()}
    [branch] = ident.rows("SELECT Address FROM Branches WHERE ID = 1")  # the card's branch (add_client)

    # The patient wrote in through the site form: an open lead with its source, before IDENT knows her.
    inquiry = clinic.crm.manager_create_inquiry(PHONE)
    assert _get(rest, "lead", inquiry)["SOURCE_ID"] == "WEB"
    patient = ident.add_client("Лебедева", PHONE, name="Ольга", patronymic="Сергеевна")
    ident.edit_card(patient, CardNumber="004512", Comment="боится анестезии")
    first_start = ident.at(1, "10:00")
    first = ident.book(patient, first_start, doctor_id=12, price="0.00", insurance_policy="ДМС 7700 000123")
    clinic.sync()
    deal = clinic.crm.deals()[str(first)]
    booked = _get(rest, "deal", deal["id"])
    assert booked["UF_CRM_CS_VISIT_TYPE"] == "Первичный"
    assert booked["UF_CRM_CS_DMS"] == "N"  # IDENT prices the visit, not the booking
    assert clinic.backfill(days=30).crm_writes == 0  # re-sent unchanged: the kept source hashes the same

    ident.clock.advance(2 * 86400)
    ident.complete(first)  # visit took place at price 0, with the policy on the card: DMS
    second_start = ident.at(3, "15:30")
    second = ident.book(patient, second_start)  # the next visit of a patient who has been: repeat
    clinic.sync()
    assert clinic.stack.queue_depth("SyncQueue", dlq=True) == 0

    deals = clinic.crm.deals()
    dms, repeat = _get(rest, "deal", deals[str(first)]["id"]), _get(rest, "deal", deals[str(second)]["id"])
    contact = _get(rest, "contact", dms["CONTACT_ID"])

    # Contact: name, phone, birth date, sex, card number, comment, doctors seen; no invented fields.
    assert (contact["LAST_NAME"], contact["NAME"], contact["SECOND_NAME"]) == ("Лебедева", "Ольга", "Сергеевна")
    assert [p["VALUE"] for p in contact["PHONE"]] == ["+79165554017"]
    assert contact["ORIGIN_ID"] == str(patient) and contact["BIRTHDATE"].startswith("1990-05-17")
    assert contact["UF_CRM_CS_SEX"] == "Женский"
    assert contact["UF_CRM_CS_CARD_NUMBER"] == "004512"
    assert contact["UF_CRM_CS_CARD_COMMENT"] == "боится анестезии"
    assert contact["UF_CRM_CS_DOCTORS_SEEN"] == doctors[12]
    for name in ("SEX", "CARD_NUMBER", "CARD_COMMENT", "DOCTORS_SEEN", "HOME_ADDRESS", "FAMILY"):
        assert types["contact"][f"UF_CRM_CS_{name}"] == "string"
    assert not any(contact.get(field) for field in UNSOURCED_CONTACT.values())  # no known IDENT source

    # Deals: the hour survives (datetime field and title), DMS flagged, branch address, doctor, visit type.
    for record, start, visit_type in ((dms, first_start, "Первичный"), (repeat, second_start, "Повторный")):
        assert record["UF_CRM_CS_VISIT_AT"] == start.isoformat()
        assert record["TITLE"] == f"Приём {start:%d.%m.%Y %H:%M}"
        assert record["BEGINDATE"][:10] == start.date().isoformat()
        assert record["UF_CRM_CS_BRANCH_ADDRESS"] == branch["Address"]
        assert record["UF_CRM_CS_VISIT_TYPE"] == visit_type
    assert (dms["UF_CRM_CS_DMS"], repeat["UF_CRM_CS_DMS"]) == ("Y", "N")
    assert (dms["UF_CRM_CS_STATUS"], repeat["UF_CRM_CS_STATUS"]) == ("completed", "booked")
    assert (dms["UF_CRM_CS_DOCTOR"], repeat["UF_CRM_CS_DOCTOR"]) == (doctors[12], doctors[11])
    assert repeat["CATEGORY_ID"] == clinic.config.pipeline(repeat=True).category_id  # the same rule's funnel
    assert (types["deal"]["UF_CRM_CS_VISIT_AT"], types["deal"]["UF_CRM_CS_DMS"]) == ("datetime", "boolean")
    for name in ("BRANCH_ADDRESS", "VISIT_TYPE", "DOCTOR", "LEAD_SOURCE", "STATUS"):
        assert types["deal"][f"UF_CRM_CS_{name}"] == "string"

    # The lead source: the adopted lead's own, kept through the visit's later update; none is invented.
    assert (dms["LEAD_ID"], dms["SOURCE_ID"], dms["UF_CRM_CS_LEAD_SOURCE"]) == (inquiry, "WEB", "WEB")
    assert not repeat.get("LEAD_ID") and not repeat.get("SOURCE_ID") and not repeat.get("UF_CRM_CS_LEAD_SOURCE")

    writes = clinic.crm.stats()["writes"]
    clinic.sync()
    assert clinic.crm.stats()["writes"] == writes  # typed values hash the same: a second sync writes nothing
    contact_list, deal_list = FIELD_PRESETS["ident_bitrix24_case_b"]
    arrived = {"full_name", "phone", "birth_date", "sex", "card_number", "card_comment", "doctors_seen"}
    assert set(contact_list) == arrived | set(UNSOURCED_CONTACT)
    assert set(deal_list) == {
        "visit_at", "branch_address", "visit_type", "doctor", "lead_source", "is_dms", "status", "mis_appointment_id",
    }  # fmt: skip


def test_init_with_the_case_b_preset_and_check_create_fields_give_every_field_its_bitrix24_type(
    make_clinic: Callable[..., LocalClinic], tmp_path: Path
) -> None:
    clinic = make_clinic(mis="ident", patients=0, appointments=0, rate_limit=False)
    path = tmp_path / "clinic.yaml"
    code, out = run(
        "init", "--clinic-id", clinic.config.clinic_id, "--mis", "ident", "--mis-url", "connector",
        "--crm", "bitrix24", "--preset", "ident_bitrix24_case_b", "--out", str(path),
    )  # fmt: skip
    assert code == 0, out
    assert "UF_CRM_CS_DOCTORS_SEEN" in out  # missing until created: the note says how
    proposed = load_clinic_config(path)
    assert proposed.fields.preset == "ident_bitrix24_case_b"
    assert proposed.fields.crm_field("deal", "visit_type") == CrmField(id="UF_CRM_CS_VISIT_TYPE", type="string")

    code, out = run("check", "-c", str(path), "--api-url", clinic.api_url, "--create-fields")
    assert code == 0, out
    rest = bitrix24_rest(clinic)
    types = {
        entity: {f["FIELD_NAME"]: f["USER_TYPE_ID"] for f in rest.call(f"crm.{entity}.userfield.list")["result"]}
        for entity in ("contact", "deal")
    }
    contact, deal = FIELD_PRESETS["ident_bitrix24_case_b"]
    natural = {"visit_at": "datetime", "is_dms": "boolean"}  # everything else of case B is a string
    for entity, names in (("contact", contact), ("deal", deal)):
        for name in set(names) - {"full_name", "phone", "birth_date", "mis_patient_id", "mis_appointment_id"}:
            assert types[entity][f"UF_CRM_CS_{name.upper()}"] == natural.get(name, "string"), name
