"""IDENT end to end in the local runtime: a CRM lead becomes an IDENT ticket, the front desk books it in
IDENT's database, the connector pushes the booking, the poller and the syncer adopt the lead and stage the
deal, and a reception row moves it to visited. Also IDENT's own calls (key, date offsets, paging,
timetable) and the connector routes' signature checks, with the request shapes IDENT and the connector send.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import boto3
import pytest
import yaml
from typer.testing import CliRunner

from clinicsync.adapters.http.signing import sign_request
from clinicsync.adapters.ident.contract import ConnectorBatch
from clinicsync.domain.models import AppointmentStatus as S
from clinicsync_ident.cli import app as connector_cli
from sandbox.local import LocalClinic
from sandbox.seed import CLINIC_TZ
from tests.helpers import HTTP

MSK = CLINIC_TZ


@pytest.fixture(params=["bitrix24", "amocrm"])
def clinic(request: pytest.FixtureRequest, make_clinic: Callable[..., LocalClinic]) -> LocalClinic:
    clinic = make_clinic(mis="ident", crm=request.param, patients=12, appointments=12)
    clinic.sync()
    assert clinic.mismatches() == []
    return clinic


@pytest.fixture
def bitrix_clinic(make_clinic: Callable[..., LocalClinic]) -> LocalClinic:
    clinic = make_clinic(mis="ident", patients=6, appointments=6)
    clinic.sync()
    return clinic


def _stage(clinic: LocalClinic, status: S, repeat: bool = False) -> str:
    return clinic.config.pipeline(repeat=repeat).stages[status]


def _window(hours: int = 2) -> tuple[datetime, datetime]:
    now = datetime.now(MSK)
    return now - timedelta(hours=hours), now + timedelta(hours=hours)


def _tickets(clinic: LocalClinic, **kwargs: Any) -> list[dict[str, Any]]:
    assert clinic.ident_client is not None
    response = clinic.ident_client.get_tickets(*_window(), **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return list(response.json())


# --- the accepted story -------------------------------------------------------------------------------


def test_lead_becomes_ticket_then_booking_adopts_it_and_a_reception_moves_it_to_visited(clinic: LocalClinic) -> None:
    inquiry = clinic.crm.manager_create_inquiry("+7 916 555-44-33")
    clinic.deliver_webhooks()

    ticket = next(t for t in _tickets(clinic) if t["Id"] == inquiry)  # IDENT pulls the call-centre lead
    assert ticket["ClientPhone"] == "+79165554433"
    assert datetime.fromisoformat(ticket["DateAndTime"]).tzinfo is not None

    # The administrator opens the ticket in IDENT and books the visit for that caller.
    deals_before = len(clinic.crm.deals())
    patient = clinic.ident.add_client("Белова", ticket["ClientPhone"])
    visit = clinic.ident.book(patient, clinic.ident.at(3, "10:00"))
    clinic.ident.clock.advance(60)
    clinic.sync()  # connector -> HTTP API -> inbox -> poller -> sync queue -> syncer -> CRM

    deal = clinic.crm.deals()[str(visit)]
    assert clinic.crm.adopted(inquiry, deal)
    assert deal["stage"] == _stage(clinic, S.BOOKED)
    assert len(clinic.crm.deals()) == deals_before + 1  # the booking's deal (the adopted one in amoCRM)
    assert inquiry not in {t["Id"] for t in _tickets(clinic)}  # booked: no longer a ticket

    clinic.ident.clock.advance(3 * 86400)
    clinic.ident.complete(visit)  # the doctor opens the visit: a row in Receptions
    clinic.sync()
    assert clinic.crm.deals()[str(visit)]["stage"] == _stage(clinic, S.COMPLETED)
    assert clinic.mismatches() == []


def test_booking_left_past_its_end_and_grace_becomes_a_no_show_without_any_row_changing(clinic: LocalClinic) -> None:
    patient = clinic.ident.add_client("Орлова", "+7 926 111-00-99")
    start = (clinic.ident.now_local() + timedelta(hours=1)).replace(tzinfo=MSK)
    visit = clinic.ident.book(patient, start, length=30)
    clinic.sync()
    assert clinic.crm.deals()[str(visit)]["stage"] == _stage(clinic, S.BOOKED)

    grace = clinic.config.mis.no_show_grace_minutes
    clinic.ident.clock.advance(3600 + 30 * 60 + grace * 60 - 60)  # a minute before it is due
    clinic.sync()
    assert clinic.crm.deals()[str(visit)]["stage"] == _stage(clinic, S.BOOKED)
    clinic.ident.clock.advance(120)
    clinic.sync()
    assert clinic.crm.deals()[str(visit)]["stage"] == _stage(clinic, S.NO_SHOW)
    writes = clinic.sync().crm_writes
    assert writes == 0  # swept once, never re-sent


def test_cancellation_and_reschedule_in_ident_move_the_deal(bitrix_clinic: LocalClinic) -> None:
    clinic = bitrix_clinic
    patient = clinic.ident.add_client("Зайцева", "+7 903 222-33-44")
    first = clinic.ident.book(patient, clinic.ident.at(5, "11:00"))
    second = clinic.ident.book(patient, clinic.ident.at(6, "12:00"))
    clinic.sync()
    clinic.ident.clock.advance(60)
    clinic.ident.cancel(first)
    clinic.ident.reschedule(second, clinic.ident.at(9, "15:30"))
    clinic.sync()
    deals = clinic.crm.deals()
    assert deals[str(first)]["stage"] == _stage(clinic, S.CANCELLED)
    assert clinic.bitrix is not None
    moved = clinic.bitrix.deals[int(deals[str(second)]["id"])]
    assert moved["STAGE_ID"] == _stage(clinic, S.BOOKED)
    assert clinic.mismatches() == []


def test_a_dms_visit_is_flagged_when_it_took_place_at_zero_price_with_a_policy_on_the_card(
    clinic: LocalClinic,
) -> None:
    """Case B: IDENT does not mark DMS visits; a zero price at "visit took place" plus a policy on the card
    does. Both reach the CRM from IDENT's own tables through the connector."""
    patient = clinic.mis.add_client("Белова", "+7 903 111-22-34")
    dms = clinic.mis.book(patient, clinic.mis.at(1, "10:00"), price="0.00", insurance_policy="ДМС 7700 000123")
    paid = clinic.mis.book(patient, clinic.mis.at(2, "10:00"), price="3500.00")
    clinic.sync()
    assert clinic.crm.deals()[str(dms)]["is_dms"] in (False, None)  # nothing is priced before the visit

    clinic.ident.clock.advance(3 * 86400)
    clinic.ident.complete(dms)
    clinic.ident.complete(paid)
    clinic.sync()
    deals = clinic.crm.deals()
    assert deals[str(dms)]["is_dms"] is True
    assert deals[str(paid)]["is_dms"] is False
    assert clinic.mismatches() == []


# --- IDENT's calls: key, dates, paging, fields ---------------------------------------------------------


def test_wrong_or_missing_key_is_refused_in_plain_text_and_reads_nothing(bitrix_clinic: LocalClinic) -> None:
    clinic = bitrix_clinic
    base = clinic.servers[-1].base_url
    start, end = _window()
    query = f"dateTimeFrom={quote(start.isoformat(), safe='')}&dateTimeTo={quote(end.isoformat(), safe='')}"
    assert clinic.bitrix is not None
    requests_before = clinic.crm.stats()["requests"]
    wrong = HTTP.get(f"{base}/ident/GetTickets?{query}", headers={"IDENT-Integration-Key": "guess"})
    missing = HTTP.get(f"{base}/ident/GetTickets?{query}")
    timetable = HTTP.post(f"{base}/ident/PostTimeTable", json={"Doctors": []}, headers={"IDENT-Integration-Key": ""})
    assert (wrong.status_code, missing.status_code, timetable.status_code) == (403, 401, 401)
    for response in (wrong, missing, timetable):
        assert response.headers["content-type"].startswith("text/plain")
        assert "IDENT-Integration-Key" in response.text
    assert clinic.crm.stats()["requests"] == requests_before  # refused before any CRM read


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda d: quote(d.isoformat(), safe=""), id="encoded +03:00"),
        pytest.param(lambda d: quote(d.strftime("%Y-%m-%dT%H:%M:%S%z"), safe=""), id="offset without colon"),
        pytest.param(lambda d: d.isoformat(), id="unencoded plus arrives as a space"),
        pytest.param(lambda d: quote(d.astimezone(MSK).isoformat(timespec="milliseconds"), safe=""), id="millis"),
        pytest.param(lambda d: d.astimezone(tz=None).strftime("%Y-%m-%dT%H:%M:%SZ"), id="utc Z"),
    ],
)
def test_date_offsets_are_parsed_in_every_shape_ident_sends(
    bitrix_clinic: LocalClinic, encode: Callable[[datetime], str]
) -> None:
    clinic = bitrix_clinic
    inquiry = clinic.crm.manager_create_inquiry("+7 916 000-12-34")
    base = clinic.servers[-1].base_url
    start, end = _window()
    if "Z" in encode(start):
        start, end = start.astimezone(tz=None), end.astimezone(tz=None)
    url = f"{base}/ident/GetTickets?dateTimeFrom={encode(start)}&dateTimeTo={encode(end)}&limit=500&offset=0"
    assert clinic.ident_client is not None
    response = HTTP.get(url, headers={"IDENT-Integration-Key": _key(clinic)})
    assert response.status_code == 200, response.text
    assert inquiry in {t["Id"] for t in response.json()}
    # A window that ended before the lead was created does not list it: the offset was honoured.
    earlier = HTTP.get(
        f"{base}/ident/GetTickets?dateTimeFrom={encode(start - timedelta(days=2))}"
        f"&dateTimeTo={encode(start - timedelta(days=1))}",
        headers={"IDENT-Integration-Key": _key(clinic)},
    )
    assert earlier.status_code == 200 and inquiry not in {t["Id"] for t in earlier.json()}


@pytest.mark.parametrize(
    "query",
    [
        "dateTimeFrom=2026-11-01T10%3A00%3A00&dateTimeTo=2026-11-02T10%3A00%3A00%2B03%3A00",  # no offset
        "dateTimeFrom=yesterday&dateTimeTo=2026-11-02T10%3A00%3A00%2B03%3A00",
        "dateTimeTo=2026-11-02T10%3A00%3A00%2B03%3A00",  # from missing
        "dateTimeFrom=2026-11-01T10%3A00%3A00Z&dateTimeTo=2026-11-02T10%3A00%3A00Z&limit=5000",
        "dateTimeFrom=2026-11-01T10%3A00%3A00Z&dateTimeTo=2026-11-02T10%3A00%3A00Z&offset=-1",
        "dateTimeFrom=2026-13-01T10%3A00%3A00Z&dateTimeTo=2026-11-02T10%3A00%3A00Z",  # month 13
    ],
)
def test_bad_ticket_queries_get_a_plain_400(bitrix_clinic: LocalClinic, query: str) -> None:
    base = bitrix_clinic.servers[-1].base_url
    response = HTTP.get(f"{base}/ident/GetTickets?{query}", headers={"IDENT-Integration-Key": _key(bitrix_clinic)})
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/plain")
    assert "invalid query parameters" in response.text


def test_ticket_fields_and_paging(bitrix_clinic: LocalClinic) -> None:
    clinic = bitrix_clinic
    assert clinic.bitrix is not None
    ids = [
        str(
            clinic.bitrix.manager_create_lead(
                TITLE="Заявка с сайта",
                NAME="Ольга",
                LAST_NAME=f"Тестова{n}",
                SOURCE_ID="WEBFORM",
                SOURCE_DESCRIPTION="Форма «Запись на консультацию»",
                COMMENTS="Болит зуб справа",
                UTM_SOURCE="yandex",
                UTM_MEDIUM="cpc",
                UTM_CAMPAIGN="implants",
                PHONE=[{"VALUE": f"8 (916) 700-00-0{n}", "VALUE_TYPE": "MOBILE"}],
                EMAIL=[{"VALUE": f"olga{n}@example.ru", "VALUE_TYPE": "WORK"}],
            )
        )
        for n in range(3)
    ]
    converted = clinic.bitrix.manager_create_lead(TITLE="Уже записан", STATUS_ID="CONVERTED")
    tickets = {t["Id"]: t for t in _tickets(clinic)}
    assert set(ids) <= set(tickets) and str(converted) not in tickets
    first = tickets[ids[0]]
    assert first["ClientPhone"] == "+79167000000"
    assert first["ClientEmail"] == "olga0@example.ru"
    assert first["ClientFullName"] == "Тестова0 Ольга"
    assert first["FormName"] == "Форма «Запись на консультацию»"
    assert first["Comment"] == "Болит зуб справа"
    assert (first["UtmSource"], first["UtmMedium"], first["UtmCampaign"]) == ("yandex", "cpc", "implants")
    all_ids = [t["Id"] for t in _tickets(clinic)]
    page1 = [t["Id"] for t in _tickets(clinic, limit=2, offset=0)]
    page2 = [t["Id"] for t in _tickets(clinic, limit=2, offset=2)]
    assert page1 + page2 == all_ids[:4]
    assert len(page1) == 2 and not set(page1) & set(page2)


def test_timetable_keeps_doctor_and_branch_names_for_the_sync(bitrix_clinic: LocalClinic) -> None:
    clinic = bitrix_clinic
    assert clinic.ident_client is not None
    response = clinic.ident_client.post_timetable(clinic.ident, days=3)
    assert response.status_code == 200 and response.text == "OK"
    table = boto3.resource("dynamodb").Table(clinic.stack.table_name)
    with clinic.stack.environment():
        items = table.query(KeyConditionExpression="pk = :pk", ExpressionAttributeValues={":pk": "IDENT#DIRECTORY"})
    names = {i["sk"]: i.get("name") for i in items["Items"]}
    doctor = clinic.ident.doctors()[0]
    assert names[f"DOCTOR#{doctor['ID']}"].startswith(doctor["Surname"])
    assert names[f"BRANCH#{clinic.ident.branches()[0]['ID']}"] == clinic.ident.branches()[0]["Name"]
    timetable = next(i for i in items["Items"] if i["sk"] == "TIMETABLE")
    assert int(timetable["intervals"]) == len(clinic.ident.doctors()) * 3 * 8
    bad = HTTP.post(
        f"{clinic.servers[-1].base_url}/ident/PostTimeTable",
        content=b'{"Doctors": [{"Name": "no id"}]}',
        headers={"IDENT-Integration-Key": _key(clinic), "Content-Type": "application/json"},
    )
    assert bad.status_code == 400 and bad.headers["content-type"].startswith("text/plain")


def test_ident_routes_answer_404_for_a_clinic_on_another_mis(make_clinic: Callable[..., LocalClinic]) -> None:
    clinic = make_clinic(patients=3, appointments=3)  # MEDODS
    response = HTTP.get(
        f"{clinic.servers[-1].base_url}/ident/GetTickets?dateTimeFrom=x&dateTimeTo=y",
        headers={"IDENT-Integration-Key": "anything"},
    )
    assert response.status_code == 404 and "not this clinic's MIS" in response.text


# --- the connector's routes ---------------------------------------------------------------------------


def _key(clinic: LocalClinic) -> str:
    return str(_mis_secret(clinic)["integration_key"])


def _mis_secret(clinic: LocalClinic) -> dict[str, Any]:
    with clinic.stack.environment():
        sm = boto3.client("secretsmanager")
        return dict(json.loads(sm.get_secret_value(SecretId=clinic.stack.parameters["MisSecretArn"])["SecretString"]))


def _inbox_depth(clinic: LocalClinic) -> int:
    with clinic.stack.environment():
        sqs = boto3.client("sqs")
        attrs = sqs.get_queue_attributes(
            QueueUrl=clinic.stack.physical["IdentInboxQueue"],
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def _batch(patient_id: str = "4242") -> bytes:
    body = {
        "batch_id": "20261123T100000.0.abc",
        "connector_id": "test",
        "produced_at": "2026-11-23T10:00:00+00:00",
        "changes": [{"patient": {"mis_id": patient_id, "version": 1}}],
    }
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("unsigned", "missing signature headers"),
        ("forged", "bad signature"),
        ("body changed", "bad signature"),
        ("other route", "bad signature"),
        ("expired", "timestamp outside the allowed window"),
    ],
)
def test_connector_batches_need_a_fresh_valid_signature(bitrix_clinic: LocalClinic, tamper: str, reason: str) -> None:
    clinic = bitrix_clinic
    url = f"{clinic.servers[-1].base_url}/ident/connector/batches"
    key = str(_mis_secret(clinic)["connector_key"]).encode()
    body = _batch()
    now = int(time.time())
    headers = sign_request(key, now, "POST", "/ident/connector/batches", body)
    if tamper == "unsigned":
        headers = {}
    elif tamper == "forged":
        headers = sign_request(b"x" * 48, now, "POST", "/ident/connector/batches", body)
    elif tamper == "body changed":
        body = _batch("4243")
    elif tamper == "other route":
        headers = sign_request(key, now, "GET", "/ident/connector/settings", body)
    elif tamper == "expired":
        headers = sign_request(key, now - 3600, "POST", "/ident/connector/batches", body)
    response = HTTP.post(url, content=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("text/plain") and reason in response.text
    assert _inbox_depth(clinic) == 0


def test_a_signed_batch_is_queued_and_a_signed_bad_one_is_refused_whole(bitrix_clinic: LocalClinic) -> None:
    clinic = bitrix_clinic
    url = f"{clinic.servers[-1].base_url}/ident/connector/batches"
    key = str(_mis_secret(clinic)["connector_key"]).encode()
    good = _batch()
    accepted = HTTP.post(
        url, content=good, headers=sign_request(key, int(time.time()), "POST", "/ident/connector/batches", good)
    )
    assert accepted.status_code == 202 and accepted.json()["patients"] == 1
    assert _inbox_depth(clinic) == 1
    ConnectorBatch.model_validate_json(good)  # the shape the poller reads
    bad = json.dumps({"batch_id": "x", "connector_id": "test", "produced_at": "now", "changes": []}).encode()
    refused = HTTP.post(
        url, content=bad, headers=sign_request(key, int(time.time()), "POST", "/ident/connector/batches", bad)
    )
    assert refused.status_code == 400 and "not a valid change batch" in refused.text
    assert _inbox_depth(clinic) == 1


# --- the packaged command ---------------------------------------------------------------------------


def test_connector_command_runs_once_from_its_config_file(bitrix_clinic: LocalClinic, tmp_path: Path) -> None:
    clinic = bitrix_clinic
    key_file = tmp_path / "connector.key"
    key_file.write_text(str(_mis_secret(clinic)["connector_key"]), encoding="utf-8")
    config = tmp_path / "ident.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "connector_id": "front-desk-pc",
                "stack_url": clinic.servers[-1].base_url,
                "key_file": str(key_file),
                "state_file": str(tmp_path / "state.json"),
                "database": {"driver": "sqlite", "dsn": str(clinic.ident.path)},
            }
        ),
        encoding="utf-8",
    )
    runner = CliRunner()
    checked = runner.invoke(connector_cli, ["check", "--config", str(config)])
    assert checked.exit_code == 0, checked.output
    assert "key accepted" in checked.output
    ran = runner.invoke(connector_cli, ["run", "--config", str(config), "--once"])
    assert ran.exit_code == 0, ran.output
    assert "batches" in ran.output and (tmp_path / "state.json").exists()
    assert _inbox_depth(clinic) >= 1
    for pii in ("Белова", "+7", "@"):
        assert pii not in ran.output


# --- the sample events in events/ -------------------------------------------------------------------


def _sample(name: str) -> dict[str, Any]:
    return dict(json.loads((Path(__file__).resolve().parents[2] / "events" / f"{name}.json").read_text("utf-8")))


def test_sample_events_are_refused_with_foreign_keys_and_served_with_the_clinics_own(
    bitrix_clinic: LocalClinic,
) -> None:
    clinic = bitrix_clinic
    tickets, timetable = _sample("crm_webhook_ident_get_tickets"), _sample("crm_webhook_ident_post_timetable")
    batch = _sample("crm_webhook_ident_connector_batch")
    assert clinic.stack.invoke("CrmWebhookFunction", tickets)["statusCode"] == 403  # the sample's key is not ours
    assert clinic.stack.invoke("CrmWebhookFunction", timetable)["statusCode"] == 403
    stale = clinic.stack.invoke("CrmWebhookFunction", batch)
    assert stale["statusCode"] == 401 and _inbox_depth(clinic) == 0

    for event in (tickets, timetable):
        event["headers"]["ident-integration-key"] = _key(clinic)
    served = clinic.stack.invoke("CrmWebhookFunction", tickets)
    assert served["statusCode"] == 200 and isinstance(json.loads(served["body"]), list)
    stored = clinic.stack.invoke("CrmWebhookFunction", timetable)
    assert (stored["statusCode"], stored["body"]) == (200, "OK")
    key = str(_mis_secret(clinic)["connector_key"]).encode()
    batch["headers"] |= {
        k.lower(): v
        for k, v in sign_request(key, int(time.time()), "POST", batch["rawPath"], batch["body"].encode()).items()
    }
    queued = clinic.stack.invoke("CrmWebhookFunction", batch)
    assert queued["statusCode"] == 202 and _inbox_depth(clinic) == 1
