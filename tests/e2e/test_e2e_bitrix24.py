"""Bitrix24-only end-to-end behaviour: multifield phone edits, deal-only inquiries, contact adoption,
the webhook receiver's checks and the start-up stage check. The funnel scenarios shared by every CRM
are in test_e2e_scenarios.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import boto3
import httpx
import pytest

from clinicsync_cli.connect import Credentials, bitrix24_client
from clinicsync_cli.discovery import check_fields, create_bitrix24_fields, discover_crm
from sandbox.local import LOCAL_API_TIMEOUT, LocalClinic
from tests.helpers import ROOT


@pytest.fixture
def clinic(make_clinic: Callable[..., LocalClinic]) -> LocalClinic:
    clinic = make_clinic(patients=12, appointments=12)
    clinic.sync()
    clinic.bitrix.clear_pending_events()  # the backfill's own echoes are tested separately
    assert clinic.mismatches() == []
    return clinic


def _deal(clinic: LocalClinic, appointment_id: int) -> dict[str, Any]:
    return clinic.crm.deals()[str(appointment_id)]


# --- bookings and the funnel --------------------------------------------------------------------------


def test_changed_phone_edits_the_entry_instead_of_appending(clinic: LocalClinic) -> None:
    client = clinic.mis.add_client("Белова", "+7 903 111-22-35")
    appointment = clinic.mis.book(client, clinic.mis.at(7, "10:00"))
    clinic.sync()
    contact_id = int(_deal(clinic, appointment)["contact_id"])
    clinic.medods.update_client(client, phone="8 (926) 000-11-22")
    clinic.sync()
    phones = [p["VALUE"] for p in clinic.bitrix.contacts[contact_id]["PHONE"]]
    assert phones == ["+79260001122"]


# --- lead adoption by phone ---------------------------------------------------------------------------


def test_open_deal_found_by_phone_moves_by_itself(clinic: LocalClinic) -> None:
    # The amoCRM case's promise: the deal that already exists for that phone moves by itself.
    contact = clinic.bitrix.manager_create_contact(NAME="Анна", PHONE=[{"VALUE": "8 916 765-43-21"}])
    inquiry = clinic.bitrix.manager_create_deal(TITLE="Обращение из WhatsApp", CONTACT_ID=contact, STAGE_ID="NEW")
    deals_before = len(clinic.bitrix.deals)
    client = clinic.mis.add_client("Белова", "+79167654321")
    appointment = clinic.mis.book(client, clinic.mis.at(7, "10:00"))
    clinic.sync()
    deal = _deal(clinic, appointment)
    assert deal["id"] == str(inquiry) and deal["stage"] == "PREPARATION"
    assert clinic.bitrix.contacts[contact]["ORIGIN_ID"] == str(client)  # the manager's contact is adopted
    assert len(clinic.bitrix.deals) == deals_before


def test_crm_opt_out_on_a_contact_with_a_mis_id_reaches_the_ledger(clinic: LocalClinic) -> None:
    appointment = clinic.open_booking()
    deal = _deal(clinic, appointment)
    client = clinic.medods.appointment(appointment)["clientId"]
    foreign = clinic.bitrix.manager_create_contact(NAME="Партнёр", UF_CRM_CS_OPT_OUTS="email")
    clinic.bitrix.manager_update_contact(int(deal["contact_id"]), UF_CRM_CS_OPT_OUTS="email,sms")
    clinic.deliver_webhooks()
    table = boto3.resource("dynamodb").Table(clinic.stack.table_name)
    from_crm = {(i["pk"], i["sk"]) for i in table.scan()["Items"] if i.get("source") == "crm" and "CH#" in i["sk"]}
    # Only our patient's two channels: the foreign contact (no MIS id) never flows back.
    assert from_crm == {(f"CONSENT#pat:{client}", "CH#email"), (f"CONSENT#pat:{client}", "CH#sms")}
    assert foreign not in [int(i) for i in clinic.crm.contacts() if clinic.crm.contacts()[i]["origin"]]


# --- the webhook receiver -----------------------------------------------------------------------------


def _post(clinic: LocalClinic, body: str, content_type: str = "application/x-www-form-urlencoded") -> httpx.Response:
    api = clinic.servers[-1].base_url
    return httpx.post(
        f"{api}/webhooks/bitrix24", content=body, headers={"content-type": content_type}, timeout=LOCAL_API_TIMEOUT
    )


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
    record: dict[str, Any] = event["Records"][0]
    record["eventSourceARN"] = clinic.stack.env["SYNC_QUEUE_ARN"]  # the syncer routes by the configured ARN
    return record


def test_the_visit_hour_reaches_bitrix24_in_a_datetime_field(make_clinic: Callable[..., LocalClinic]) -> None:
    """Case B's reminders are sent from the CRM, so the hour must be there: BEGINDATE is date-only, the
    visit's date and time go to the datetime field `check --create-fields` creates (UF_CRM_CS_VISIT_AT)."""
    clinic = make_clinic(patients=2, appointments=2, rate_limit=False)
    assert clinic.bitrix is not None
    creds = Credentials({"webhook_url": clinic.bitrix.webhook_url(clinic.crm_url)})
    client = bitrix24_client(creds, httpx.Client(timeout=30.0))
    assert "UF_CRM_CS_VISIT_AT" in create_bitrix24_fields(client, clinic.config, discover_crm(client))
    assert check_fields(clinic.config, discover_crm(client)) == []

    visit = clinic.mis.at(7, "10:00")  # Moscow time
    patient = clinic.mis.add_client("Белова", "+7 903 111-22-36")
    appointment = clinic.mis.book(patient, visit)
    clinic.sync()
    deal = client.call("crm.deal.get", {"id": _deal(clinic, appointment)["id"]})["result"]
    assert deal["UF_CRM_CS_VISIT_AT"] == f"{visit:%Y-%m-%d}T10:00:00+03:00"
    assert deal["BEGINDATE"][:10] == f"{visit:%Y-%m-%d}"  # the date stays where Bitrix24 shows it
    assert deal["TITLE"] == f"Приём {visit:%d.%m.%Y} 10:00"


# --- the catch-up ------------------------------------------------------------------------------------


def test_a_throttled_catch_up_pauses_and_the_next_run_resumes_from_its_cursor(
    make_clinic: Callable[..., LocalClinic],
) -> None:
    """A 429 OPERATION_TIME_LIMIT during the catch-up is no failed run: it reports a pause, keeps its
    cursor, and the next scheduled run hears the manager's move the webhook never delivered."""
    clinic = make_clinic(patients=0, appointments=0, rate_limit=False)
    client = clinic.mis.add_client("Белова", "+7 903 555-01-77")
    appointment = clinic.mis.book(client, clinic.mis.at(7, "10:00"))
    clinic.sync()
    clinic.deliver_webhooks()
    deal = _deal(clinic, appointment)
    clinic.crm.drop_next_stage_event()  # the CRM lost the move's webhook
    clinic.crm.manager_move(deal["id"], clinic.crm.won_stage(deal["category"]))
    clinic.deliver_webhooks()
    # The method's block has already lapsed by the next run (a reset time long past; no sleeping).
    blocked = {"error": "OPERATION_TIME_LIMIT", "error_description": "blocked", "time": {"operating_reset_at": 1}}
    clinic.bitrix.faults.add(status=429, body=json.dumps(blocked))

    paused = clinic.catch_up()
    assert paused["paused"] is True and paused["manual_moves"] == 0

    resumed = clinic.catch_up()
    assert resumed["paused"] is False and resumed["manual_moves"] == 1
    clinic.medods.confirm(appointment)
    clinic.sync()
    assert _deal(clinic, appointment)["stage"] == clinic.crm.won_stage(deal["category"])  # the move was heard
