"""Bitrix24 end to end in the local runtime: the scenarios of the IDENT->Bitrix24 and
InfoClinica->amoCRM cases, driven through the MEDODS emulator, the real handlers, the HTTP API and
the Bitrix24 emulator (whose outbound webhooks really POST to the local HTTP endpoint)."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date
from decimal import Decimal
from typing import Any

import boto3
import httpx
import pytest

from sandbox.local import LocalClinic
from tests.helpers import ROOT


@pytest.fixture
def clinic(make_clinic: Callable[..., LocalClinic]) -> LocalClinic:
    clinic = make_clinic(patients=12, appointments=12)
    clinic.sync()
    clinic.bitrix.clear_pending_events()  # the backfill's own echoes are tested separately
    assert clinic.mismatches() == []
    return clinic


def _deal(clinic: LocalClinic, appointment_id: int) -> dict[str, Any]:
    return clinic.deals_by_origin()[str(appointment_id)]


def _new_patient(clinic: LocalClinic, phone: str, surname: str = "Белова") -> int:
    return clinic.medods.add_client(
        surname, "Анна", second_name="Игоревна", sex="female", birthdate=date(1991, 6, 1), phone=phone
    )


def _book(clinic: LocalClinic, client_id: int, days: int = 7, **kw: Any) -> int:
    doctor = clinic.sample.doctors[0]
    return clinic.medods.book(client_id, doctor.id, doctor.branch_ids[0], clinic.medods.at(days, "10:00"), **kw)


def _appointment_state(clinic: LocalClinic, appointment_id: int) -> dict[str, Any]:
    row = clinic.medods.appointment(appointment_id)
    table = boto3.resource("dynamodb").Table(clinic.stack.table_name)
    return table.get_item(Key={"pk": f"PAT#{row['clientId']}", "sk": f"APPT#{appointment_id}"})["Item"]


# --- bookings and the funnel --------------------------------------------------------------------------


def test_new_booking_creates_contact_and_deal_in_the_booked_stage(clinic: LocalClinic) -> None:
    client = _new_patient(clinic, "+7 903 111-22-33")
    appointment = _book(clinic, client)
    run = clinic.sync()
    deal = _deal(clinic, appointment)
    assert deal["STAGE_ID"] == "PREPARATION" and deal["CATEGORY_ID"] == "0"
    contact = clinic.bitrix.contacts[int(deal["CONTACT_ID"])]
    assert contact["ORIGIN_ID"] == str(client)
    assert [p["VALUE"] for p in contact["PHONE"]] == ["+79031112233"]  # E.164, whatever the MIS stored
    assert run.crm_requests <= 3  # look-up (MIS id + phone) and one write batch


def test_dms_visit_is_flagged(clinic: LocalClinic) -> None:
    client = _new_patient(clinic, "+7 903 111-22-34")
    dms = _book(clinic, client, price="0.00", insurance_policy="ДМС 7700 000123")
    paid = _book(clinic, client, days=9, price="3500.00")
    clinic.sync()
    assert _deal(clinic, dms)["UF_CRM_CS_DMS"] == "Y"
    assert _deal(clinic, paid)["UF_CRM_CS_DMS"] == "N"
    assert Decimal(_deal(clinic, paid)["OPPORTUNITY"]) == 0  # the price is not in the minimal field map


def test_changed_phone_edits_the_entry_instead_of_appending(clinic: LocalClinic) -> None:
    client = _new_patient(clinic, "+7 903 111-22-35")
    appointment = _book(clinic, client)
    clinic.sync()
    contact_id = int(_deal(clinic, appointment)["CONTACT_ID"])
    clinic.medods.update_client(client, phone="8 (926) 000-11-22")
    clinic.sync()
    phones = [p["VALUE"] for p in clinic.bitrix.contacts[contact_id]["PHONE"]]
    assert phones == ["+79260001122"]


# --- lead adoption by phone ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lead_phone", "mis_phone"),
    [("+7 916 123-45-67", "89161234567"), ("89161234567", "9161234567"), ("9161234567", "+7 916 123-45-67")],
)
def test_open_lead_is_adopted_not_duplicated(clinic: LocalClinic, lead_phone: str, mis_phone: str) -> None:
    lead = clinic.bitrix.manager_create_lead(
        TITLE="Заявка с сайта", NAME="Анна", PHONE=[{"VALUE": lead_phone, "VALUE_TYPE": "MOBILE"}], SOURCE_ID="WEB"
    )
    leads_before, contacts_before = len(clinic.bitrix.leads), len(clinic.bitrix.contacts)
    client = _new_patient(clinic, mis_phone)
    appointment = _book(clinic, client)
    clinic.sync()
    deal = _deal(clinic, appointment)
    adopted = clinic.bitrix.leads[lead]
    assert deal["LEAD_ID"] == str(lead)  # the deal keeps the lead's origin for analytics
    assert adopted["STATUS_ID"] == "CONVERTED"
    assert adopted["CONTACT_ID"] == deal["CONTACT_ID"]
    assert len(clinic.bitrix.leads) == leads_before
    assert len(clinic.bitrix.contacts) == contacts_before + 1


def test_open_deal_found_by_phone_moves_by_itself(clinic: LocalClinic) -> None:
    # The amoCRM case's promise: the deal that already exists for that phone moves by itself.
    contact = clinic.bitrix.manager_create_contact(NAME="Анна", PHONE=[{"VALUE": "8 916 765-43-21"}])
    inquiry = clinic.bitrix.manager_create_deal(TITLE="Обращение из WhatsApp", CONTACT_ID=contact, STAGE_ID="NEW")
    deals_before = len(clinic.bitrix.deals)
    client = _new_patient(clinic, "+79167654321")
    appointment = _book(clinic, client)
    clinic.sync()
    deal = _deal(clinic, appointment)
    assert deal["ID"] == str(inquiry) and deal["STAGE_ID"] == "PREPARATION"
    assert clinic.bitrix.contacts[contact]["ORIGIN_ID"] == str(client)  # the manager's contact is adopted
    assert len(clinic.bitrix.deals) == deals_before


def test_family_sharing_a_phone_stays_two_contacts(clinic: LocalClinic) -> None:
    lead = clinic.bitrix.manager_create_lead(TITLE="Звонок", PHONE=[{"VALUE": "+7 925 000-00-07"}])
    contact = clinic.bitrix.manager_create_contact(NAME="Ольга", PHONE=[{"VALUE": "+7 925 000-00-07"}])
    mother = _new_patient(clinic, "89250000007", surname="Соколова")
    child = _new_patient(clinic, "+7 (925) 000-00-07", surname="Соколов")
    first, second = _book(clinic, mother), _book(clinic, child, days=8)
    clinic.sync()
    contacts = clinic.contacts_by_origin()
    assert contacts[str(mother)] == 1 and contacts[str(child)] == 1
    assert _deal(clinic, first)["CONTACT_ID"] != _deal(clinic, second)["CONTACT_ID"]
    assert not clinic.bitrix.contacts[contact].get("ORIGIN_ID")  # ambiguous: never merged into one
    lead_deals = [d for d in (_deal(clinic, first), _deal(clinic, second)) if d.get("LEAD_ID") == str(lead)]
    assert len(lead_deals) == 1  # the lead is adopted once


# --- what managers do in the CRM ----------------------------------------------------------------------


def test_our_own_writes_come_back_as_webhooks_and_are_ignored(make_clinic: Callable[..., LocalClinic]) -> None:
    clinic = make_clinic(patients=8, appointments=8)
    clinic.sync()
    pending = len(clinic.bitrix.pending_events())
    assert pending >= 8  # every write fired an event, ours included
    before = clinic.bitrix.stats()
    delivered = clinic.deliver_webhooks()
    assert delivered == pending
    after = clinic.bitrix.stats()
    assert after["writes"] == before["writes"]  # no loop: nothing was written back
    assert after["requests"] - before["requests"] <= 3  # the echoes were re-fetched in batches
    items = boto3.resource("dynamodb").Table(clinic.stack.table_name).scan()["Items"]
    assert not [i for i in items if i.get("manual_stage")]


def test_manual_stage_move_is_respected_until_the_mis_moves_forward(clinic: LocalClinic) -> None:
    appointment = clinic.open_booking()
    deal = _deal(clinic, appointment)
    prefix = "C1:" if deal["CATEGORY_ID"] == "1" else ""
    clinic.bitrix.manager_update_deal(int(deal["ID"]), STAGE_ID=f"{prefix}EXECUTING")
    clinic.deliver_webhooks()
    assert _appointment_state(clinic, appointment)["manual_stage"] == f"{prefix}EXECUTING"

    clinic.medods.reschedule(appointment, clinic.medods.at(9, "12:00"))  # not a forward move
    clinic.sync()
    moved = _deal(clinic, appointment)
    assert moved["STAGE_ID"] == f"{prefix}EXECUTING"  # the manager's stage holds
    assert moved["BEGINDATE"][:10] == clinic.medods.at(9, "12:00").date().isoformat()  # the date still syncs

    clinic.medods.complete(appointment)  # the MIS moves forward: the sync takes over again
    clinic.sync()
    assert _deal(clinic, appointment)["STAGE_ID"] == f"{prefix}FINAL_INVOICE"


def test_repeat_visit_after_a_won_deal(clinic: LocalClinic) -> None:
    appointment = clinic.open_booking()
    clinic.medods.complete(appointment)
    clinic.sync()
    deal = _deal(clinic, appointment)
    prefix = "C1:" if deal["CATEGORY_ID"] == "1" else ""
    clinic.bitrix.manager_update_deal(int(deal["ID"]), STAGE_ID=f"{prefix}WON")
    clinic.deliver_webhooks()

    row = clinic.medods.appointment(appointment)
    clinic.medods.set_status(appointment, "arrived")  # the MIS moves backwards: a won deal stays won
    later = clinic.medods.book(row["clientId"], row["userId"], row["clinicId"], clinic.medods.at(20, "15:00"))
    clinic.sync()
    assert _deal(clinic, appointment)["STAGE_ID"] == f"{prefix}WON"
    new = _deal(clinic, later)
    assert new["ID"] != deal["ID"]
    assert (new["CATEGORY_ID"], new["STAGE_ID"]) == ("1", "C1:PREPARATION")


def test_missed_webhook_is_caught_up(clinic: LocalClinic) -> None:
    appointment = clinic.open_booking()
    deal = _deal(clinic, appointment)
    prefix = "C1:" if deal["CATEGORY_ID"] == "1" else ""
    clinic.bitrix.drop_next_events(1, "ONCRMDEALUPDATE")  # Bitrix24 lost it and never retries
    clinic.bitrix.manager_update_deal(int(deal["ID"]), STAGE_ID=f"{prefix}WON")
    assert clinic.deliver_webhooks() == 0
    assert "manual_stage" not in _appointment_state(clinic, appointment)

    result = clinic.catch_up()
    assert result["manual_moves"] == 1, result
    assert _appointment_state(clinic, appointment)["closed"] is True
    clinic.medods.confirm(appointment)
    clinic.sync()
    assert _deal(clinic, appointment)["STAGE_ID"] == f"{prefix}WON"  # never reopened


def test_crm_opt_out_on_a_contact_with_a_mis_id_reaches_the_ledger(clinic: LocalClinic) -> None:
    appointment = clinic.open_booking()
    deal = _deal(clinic, appointment)
    client = clinic.medods.appointment(appointment)["clientId"]
    foreign = clinic.bitrix.manager_create_contact(NAME="Партнёр", UF_CRM_CS_OPT_OUTS="email")
    clinic.bitrix.manager_update_contact(int(deal["CONTACT_ID"]), UF_CRM_CS_OPT_OUTS="email,sms")
    clinic.deliver_webhooks()
    table = boto3.resource("dynamodb").Table(clinic.stack.table_name)
    consent = {i["sk"] for i in table.scan()["Items"] if str(i["pk"]).startswith("CONSENT#")}
    ours = {i["sk"] for i in table.scan()["Items"] if i["pk"] == f"CONSENT#pat:{client}"}
    assert {"CH#email", "CH#sms"} <= ours
    assert not any(str(foreign) in str(s) for s in consent)  # a contact without a MIS id never flows back


# --- the webhook receiver -----------------------------------------------------------------------------


def _post(clinic: LocalClinic, body: str, content_type: str = "application/x-www-form-urlencoded") -> httpx.Response:
    api = clinic.servers[-1].base_url
    return httpx.post(f"{api}/webhooks/bitrix24", content=body, headers={"content-type": content_type})


def _form(
    clinic: LocalClinic, token: str | None = None, member: str | None = None, event: str = "ONCRMDEALUPDATE"
) -> str:
    return httpx.QueryParams(
        {
            "event": event,
            "event_handler_id": "3",
            "data[FIELDS][ID]": "1",
            "ts": "1763888406",
            "auth[domain]": "clinic.bitrix24.ru",
            "auth[member_id]": member or clinic.bitrix.member_id,
            "auth[application_token]": token or clinic.bitrix.application_token,
        }
    ).__str__()


@pytest.mark.parametrize(
    ("kind", "status"),
    [("good", 200), ("bad_token", 401), ("other_portal", 403), ("malformed", 400), ("no_id", 400)],
)
def test_webhook_receiver_checks_the_sender(clinic: LocalClinic, kind: str, status: int) -> None:
    body = {
        "good": _form(clinic),
        "bad_token": _form(clinic, token="forged"),
        "other_portal": _form(clinic, member="someone-else"),
        "malformed": "event=ONCRMDEALUPDATE&data[FIELDS]][ID]=1&%%%",
        "no_id": _form(clinic).replace("data%5BFIELDS%5D%5BID%5D=1&", ""),
    }[kind]
    response = _post(clinic, body)
    assert response.status_code == status, response.text
    assert clinic.stack.queue_depth("CrmEventQueue") == (1 if kind == "good" else 0)


def test_webhook_for_an_event_we_do_not_sync_is_acknowledged_and_dropped(clinic: LocalClinic) -> None:
    response = _post(clinic, _form(clinic, event="ONTASKADD"))
    assert (response.status_code, response.json()) == (200, {"status": "ignored"})
    assert clinic.stack.queue_depth("CrmEventQueue") == 0


def test_stages_are_checked_against_the_crm_at_start_up(make_clinic: Callable[..., LocalClinic]) -> None:
    clinic = make_clinic(
        patients=3, appointments=3, config_overrides={"crm.pipelines.primary.stages.confirmed": "UC_GONE"}
    )
    with pytest.raises(Exception, match="UC_GONE"):
        clinic.stack.invoke("StageSyncerFunction", {"Records": [_fifo_record(clinic)]})


def _fifo_record(clinic: LocalClinic) -> dict[str, Any]:
    event = json.loads((ROOT / "events" / "stage_syncer_sqs_batch.json").read_text(encoding="utf-8"))
    return event["Records"][0]
