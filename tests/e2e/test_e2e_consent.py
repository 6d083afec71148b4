"""Consent end to end in the local runtime: every input (one-click POST, Mailchimp unsubscribe, upemail
then unsubscribe of the new address, a manager's CRM opt-out field, a MIS refusal flag) reaches every
output (the CRM contact's opt-out field, the MIS "do not send" flag, the Mailchimp member's status),
the opt-out survives a re-run of the MIS sync with old "subscribed" data, and bad links change nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import boto3
import pytest

from sandbox.local import LocalClinic
from tests.helpers import HTTP


@pytest.fixture(params=["bitrix24", "amocrm"])
def clinic(request: pytest.FixtureRequest, make_clinic: Callable[..., LocalClinic]) -> LocalClinic:
    clinic = make_clinic(crm=request.param, patients=10, appointments=10, mailchimp=True, rate_limit=False)
    clinic.sync()
    clinic.deliver_webhooks()  # our own writes come back as CRM events: echoes, ignored
    assert clinic.mismatches() == []
    return clinic


def _member(clinic: LocalClinic) -> tuple[str, str, str]:
    """A synced patient with an e-mail, in the audience and in the CRM: (patient id, contact id, e-mail)."""
    assert clinic.mailchimp is not None
    for client in clinic.medods.all_clients():
        email = client["email"]
        if not email or any(client[f] for f in ("denyEmail", "denyWhatsappMessages", "denyDataProcessing")):
            continue
        contact = clinic.crm.contact_of_patient(str(client["id"]))
        member = clinic.mailchimp.member(email)
        if contact and member and member["status"] == "subscribed":
            return str(client["id"]), contact, email
    raise LookupError("no subscribed patient in the sample")


def _ledger(clinic: LocalClinic, patient_id: str) -> dict[str, dict[str, Any]]:
    table = boto3.resource("dynamodb").Table(clinic.stack.table_name)
    items = table.query(
        KeyConditionExpression="pk = :pk", ExpressionAttributeValues={":pk": f"CONSENT#pat:{patient_id}"}
    )
    return {str(i["sk"]): i for i in items["Items"]}


def _assert_everywhere(clinic: LocalClinic, patient_id: str, contact: str, email: str, source: str) -> None:
    assert clinic.mailchimp is not None
    ledger = _ledger(clinic, patient_id)
    assert ledger["CH#email"]["opted_out"] is True and ledger["CH#email"]["source"] == source
    assert any(sk.startswith("AUDIT#") and item["event"] == "opt_out" for sk, item in ledger.items())
    assert "email" in clinic.crm.contact_opt_outs(contact)  # the CRM contact's opt-out field
    assert clinic.medods.client(int(patient_id))["denyEmail"] is True  # the MIS "do not send" flag
    member = clinic.mailchimp.member(email)
    assert member is not None and member["status"] == "unsubscribed"  # the Mailchimp member
    assert clinic.stack.queue_depth("ConsentQueue", dlq=True) == 0


def test_audience_sync_adds_consenting_patients_with_merge_fields_and_never_the_refusing(
    clinic: LocalClinic,
) -> None:
    assert clinic.mailchimp is not None
    # A patient with a visit behind them, made here: whether the sample has one moves with the calendar.
    email = "anna.belova.visited@example.ru"
    client_id = clinic.medods.add_client("Белова", "Анна", phone="+7 903 444-55-66", email=email)
    clinic.medods.complete(clinic.mis.book(client_id, clinic.mis.at(-2, "10:00")))
    clinic.sync()
    members = {m["email_address"]: m for m in clinic.mailchimp.members()}
    for client in clinic.medods.all_clients():
        if not client["email"] or client["denyDataProcessing"]:
            continue
        refused = client["denyEmail"] or client["denyWhatsappMessages"] or client["denySmsDispatches"]
        assert (client["email"] in members) is not refused, client["id"]
    assert all(m["merge_fields"]["VISITTYPE"] in ("first", "repeat") for m in members.values())
    assert any(m["merge_fields"].get("BRANCH") for m in members.values())
    assert members[email]["merge_fields"].get("LASTVISIT")
    before = clinic.mailchimp.stats()["requests"]
    clinic.sync()  # nothing changed: no Mailchimp request at all
    assert clinic.mailchimp.stats()["requests"] == before


def test_one_click_post_reaches_every_output_and_the_old_mis_data_does_not_undo_it(clinic: LocalClinic) -> None:
    patient_id, contact, email = _member(clinic)
    captured = _capture_sync_message(clinic, patient_id)
    response = clinic.one_click(clinic.unsubscribe_token(patient_id))
    assert response.status_code == 200 and "no-store" in response.headers["cache-control"]
    clinic.stack.drain_all()
    _assert_everywhere(clinic, patient_id, contact, email, "link")
    # The MIS sync runs again with the old "subscribed" record: the opt-out holds everywhere.
    _replay(clinic, captured)
    clinic.stack.drain_all()
    clinic.deliver_webhooks()
    _assert_everywhere(clinic, patient_id, contact, email, "link")
    # A second click changes nothing and queues nothing.
    assert clinic.one_click(clinic.unsubscribe_token(patient_id)).status_code == 200
    assert clinic.stack.queue_depth("ConsentQueue") == 0


def test_rfc_8058_one_click_sent_as_multipart_form_data_reaches_every_output(clinic: LocalClinic) -> None:
    """Regression: RFC 8058 §8.3's own example posts the one-click body as multipart/form-data; it got a
    400 and nothing was recorded. Any other content type is still refused whole."""
    patient_id, contact, email = _member(clinic)
    url = f"{clinic.api_url}/unsubscribe/{clinic.unsubscribe_token(patient_id)}"
    refused = HTTP.post(url, content='{"List-Unsubscribe": "One-Click"}', headers={"content-type": "application/json"})
    assert refused.status_code == 415 and "Nothing changed" in refused.text
    assert _ledger(clinic, patient_id) == {} and clinic.stack.queue_depth("ConsentQueue") == 0
    body = (
        b"-----FormBoundaryjWmhtjORrn\r\n"
        b'Content-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
        b"One-Click\r\n"
        b"-----FormBoundaryjWmhtjORrn--\r\n"
    )
    multipart = {"content-type": "multipart/form-data; boundary=---FormBoundaryjWmhtjORrn"}
    assert HTTP.post(url, content=body, headers=multipart).status_code == 200
    clinic.stack.drain_all()
    _assert_everywhere(clinic, patient_id, contact, email, "link")


def test_mailchimp_unsubscribe_reaches_the_crm_and_the_mis(clinic: LocalClinic) -> None:
    assert clinic.mailchimp is not None
    patient_id, contact, email = _member(clinic)
    clinic.mailchimp.member_unsubscribes(email)
    assert clinic.deliver_mailchimp() == 1
    _assert_everywhere(clinic, patient_id, contact, email, "mailchimp")
    # Our own API writes never come back as events (the webhook has the api source off).
    assert clinic.mailchimp.pending_events() == []


def test_upemail_then_unsubscribe_of_the_new_address(clinic: LocalClinic) -> None:
    assert clinic.mailchimp is not None
    patient_id, contact, email = _member(clinic)
    new = "new.address@example.net"
    clinic.mailchimp.member_changes_email(email, new)
    clinic.deliver_mailchimp()
    assert clinic.crm.contact_opt_outs(contact) == set()  # an address change is not an opt-out
    clinic.mailchimp.member_unsubscribes(new)
    clinic.deliver_mailchimp()
    _assert_everywhere(clinic, patient_id, contact, new, "mailchimp")


def test_crm_opt_out_field_set_by_a_manager(clinic: LocalClinic) -> None:
    patient_id, contact, email = _member(clinic)
    clinic.crm.manager_set_opt_outs(contact, "email")
    clinic.deliver_webhooks()
    _assert_everywhere(clinic, patient_id, contact, email, "crm")


def test_mis_refusal_flag(clinic: LocalClinic) -> None:
    patient_id, contact, email = _member(clinic)
    clinic.medods.update_client(int(patient_id), denyEmail=True)
    clinic.sync()
    clinic.deliver_webhooks()
    _assert_everywhere(clinic, patient_id, contact, email, "mis")


def test_mailchimp_webhook_answers_fast_even_for_unknown_addresses(clinic: LocalClinic) -> None:

    secret = clinic.clinic_secret["mailchimp_webhook_secret"]
    url = f"{clinic.api_url}/webhooks/mailchimp/{secret}"
    assert HTTP.get(url).status_code == 200  # Mailchimp's validation check
    assert clinic.mailchimp is not None
    body = (
        f"type=unsubscribe&fired_at=2026-01-01+10%3A00%3A00&data%5Baction%5D=unsub&data%5Breason%5D=manual"
        f"&data%5Bemail%5D=stranger%40example.org&data%5Blist_id%5D={clinic.mailchimp.list_id}"
    )
    form = {"content-type": "application/x-www-form-urlencoded"}
    answer = HTTP.post(url, content=body, headers=form)
    assert (answer.status_code, answer.json()["status"]) == (200, "recorded_unknown")
    wrong = secret[:-1] + ("y" if secret.endswith("x") else "x")  # always differs from the real one
    assert HTTP.post(url.replace(secret, wrong), content=body, headers=form).status_code == 401
    assert HTTP.post(url, content="type=unsubscribe&data[email]=x", headers=form).status_code == 400


def test_an_unsubscribe_for_a_look_alike_address_never_opts_out_the_real_patient(clinic: LocalClinic) -> None:
    """Regression: e-mails were keyed with ``lower()``, which turns the Kelvin sign (U+212A) into "k", so
    an unsubscribe for the look-alike address opted the real patient out."""
    assert clinic.mailchimp is not None
    patient_id, contact, _ = _member(clinic)
    real = f"kelvin.{patient_id}@example.org"
    clinic.medods.update_client(int(patient_id), email=real)
    clinic.sync()
    clinic.deliver_webhooks()
    assert _mailchimp_unsubscribe(clinic, "\u212a" + real[1:]) == "recorded_unknown"
    clinic.stack.drain_all()
    assert "CH#email" not in _ledger(clinic, patient_id)
    assert clinic.crm.contact_opt_outs(contact) == set()
    assert _mailchimp_unsubscribe(clinic, real.upper()) == "recorded"  # the real address, in any case, still is


def _mailchimp_unsubscribe(clinic: LocalClinic, email: str) -> str:
    assert clinic.mailchimp is not None
    secret = clinic.clinic_secret["mailchimp_webhook_secret"]
    body = urlencode({"type": "unsubscribe", "data[email]": email, "data[list_id]": clinic.mailchimp.list_id})
    answer = HTTP.post(
        f"{clinic.api_url}/webhooks/mailchimp/{secret}",
        content=body,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert answer.status_code == 200
    return str(answer.json()["status"])


@pytest.mark.parametrize("kind", ["forged", "expired", "tampered", "garbage"])
def test_bad_links_get_a_plain_4xx_and_change_nothing(clinic: LocalClinic, kind: str) -> None:
    from clinicsync.domain.unsubscribe_links import UnsubscribeTokens

    patient_id, contact, _ = _member(clinic)
    good = clinic.unsubscribe_token(patient_id)
    token = {
        "forged": UnsubscribeTokens(b"not-the-clinic-key-at-all!").issue(patient_id),
        "expired": clinic.unsubscribe_token(patient_id, ttl=-10),
        "tampered": _tamper(good),
        "garbage": "abc.def.ghi",
    }[kind]
    table = boto3.resource("dynamodb").Table(clinic.stack.table_name)
    before = table.scan()["Items"]
    for answer in (clinic.one_click(token), _get(clinic, token)):
        assert answer.status_code == {"forged": 403, "expired": 410, "tampered": 403, "garbage": 400}[kind]
        assert "Nothing changed" in answer.text and "<script" not in answer.text
    assert clinic.stack.queue_depth("ConsentQueue") == 0
    assert _ledger(clinic, patient_id) == {}
    assert sorted(map(str, before)) == sorted(map(str, table.scan()["Items"]))
    assert clinic.crm.contact_opt_outs(contact) == set()


def test_the_confirmation_page_never_unsubscribes_and_tracks_nothing(clinic: LocalClinic) -> None:
    patient_id, contact, _ = _member(clinic)
    page = _get(clinic, clinic.unsubscribe_token(patient_id))
    assert page.status_code == 200
    assert "Отписаться" in page.text and "Unsubscribe" in page.text
    for tracker in ("<img", "<script", "http://", "https://", "<link"):
        assert tracker not in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    clinic.stack.drain_all()
    assert _ledger(clinic, patient_id) == {} and clinic.crm.contact_opt_outs(contact) == set()
    missing = clinic.one_click(clinic.unsubscribe_token(patient_id), body="")
    assert missing.status_code == 400  # RFC 8058: the POST must say List-Unsubscribe=One-Click


def test_unsubscribe_to_crm_latency_is_measured_through_the_event_sources(clinic: LocalClinic) -> None:
    patient_id, contact, _ = _member(clinic)
    seconds = clinic.unsubscribe_to_crm_seconds(patient_id, timeout=30)
    assert seconds > 0 and "email" in clinic.crm.contact_opt_outs(contact)


# --- helpers ------------------------------------------------------------------------------------------------


def _get(clinic: LocalClinic, token: str) -> Any:

    return HTTP.get(f"{clinic.api_url}/unsubscribe/{token}")


def _tamper(token: str) -> str:
    head, mac = token.split(".")
    flipped = head[:-2] + ("A" if head[-2] != "A" else "B") + head[-1]
    return f"{flipped}.{mac}"


def _capture_sync_message(clinic: LocalClinic, patient_id: str) -> str:
    """The patient's current MIS record as the poller enqueues it ("subscribed"), kept for a replay."""
    sqs = boto3.client("sqs")
    clinic.medods.update_client(int(patient_id), denyEmail=False)  # touched: the next poll carries it
    clinic.stack.run_schedule(name="Poll")
    bodies = []
    while True:
        got = sqs.receive_message(QueueUrl=clinic.stack.queue_url, MaxNumberOfMessages=10).get("Messages", [])
        if not got:
            break
        for message in got:
            bodies.append(message["Body"])
            sqs.delete_message(QueueUrl=clinic.stack.queue_url, ReceiptHandle=message["ReceiptHandle"])
    for body in bodies:
        for change in json.loads(body)["changes"]:
            if change["patient"]["mis_id"] == patient_id:
                assert change["patient"]["consent"]["email_opt_out"] is False
                return body
    raise LookupError("the poll did not carry the patient")


def _replay(clinic: LocalClinic, body: str) -> None:
    message = json.loads(body)
    group = f"shard-{message['shard']}"
    boto3.client("sqs").send_message(
        QueueUrl=clinic.stack.queue_url, MessageBody=body, MessageGroupId=group, MessageDeduplicationId="replay"
    )


def test_only_an_explicit_newer_crm_opt_in_lifts_an_opt_out(make_clinic: Callable[..., LocalClinic]) -> None:
    clinic = make_clinic(patients=6, appointments=6, mailchimp=True, rate_limit=False)
    clinic.sync()
    patient_id, contact, _ = _member(clinic)
    assert clinic.one_click(clinic.unsubscribe_token(patient_id)).status_code == 200
    clinic.stack.drain_all()
    clinic.deliver_webhooks()
    assert clinic.bitrix is not None
    clinic.bitrix.manager_update_contact(int(contact), UF_CRM_CS_OPT_OUTS="")  # cleared, but no opt-in
    clinic.deliver_webhooks()
    assert _ledger(clinic, patient_id)["CH#email"]["opted_out"] is True
    # The explicit opt-in, a minute later: in the same second as the click it would not be newer (the CRM's
    # modification times have a resolution of one second), and the test would pass or fail by the clock.
    clinic.crm.advance_clock(60)
    clinic.bitrix.manager_update_contact(int(contact), UF_CRM_CS_OPT_INS="email")
    clinic.deliver_webhooks()
    ledger = _ledger(clinic, patient_id)
    assert ledger["CH#email"]["opted_out"] is False and ledger["CH#email"]["source"] == "crm"
    assert any(i.get("event") == "opt_in" for i in ledger.values())


def test_an_unrelated_crm_edit_does_not_undo_a_fresh_one_click_opt_out(clinic: LocalClinic) -> None:
    """Issue 15 defect 7: the contact keeps an old opt-in value; a manager edits a comment after the click
    but before the consent job wrote the CRM. The touched record is not a newer opt-in."""
    patient_id, contact, email = _member(clinic)
    clinic.crm.manager_set_opt_ins(contact, "email")  # long ago, while the patient was subscribed
    clinic.deliver_webhooks()
    assert clinic.one_click(clinic.unsubscribe_token(patient_id)).status_code == 200  # job queued, not run
    clinic.crm.advance_clock(120)  # the comment is clearly later than the click
    clinic.crm.manager_touch_contact(contact)
    clinic.deliver_webhooks()  # the CRM event is handled before the queued consent job
    clinic.deliver_webhooks()  # our writes' echoes
    _assert_everywhere(clinic, patient_id, contact, email, "link")
    # Setting the opt-in field again (cleared, then set) is a real change, and a newer one: it counts.
    clinic.crm.manager_set_opt_ins(contact, "")
    clinic.crm.manager_set_opt_outs(contact, "")
    clinic.deliver_webhooks()  # events are re-fetched: each state must be seen to count as a change
    assert _ledger(clinic, patient_id)["CH#email"]["opted_out"] is True
    clinic.crm.advance_clock(60)
    clinic.crm.manager_set_opt_ins(contact, "email")
    clinic.deliver_webhooks()
    assert _ledger(clinic, patient_id)["CH#email"]["opted_out"] is False


def test_consent_changes_only_from_the_contact_mapped_to_the_patient(clinic: LocalClinic) -> None:
    """Issue 15 defect 8: a duplicate a manager made by hand carries the patient's MIS id; its opt-out
    field says nothing about the patient. The mapped contact's does."""
    assert clinic.mailchimp is not None
    patient_id, contact, email = _member(clinic)
    duplicate = clinic.crm.manager_duplicate_contact(contact)
    clinic.deliver_webhooks()
    clinic.crm.manager_set_opt_outs(duplicate, "email")
    clinic.deliver_webhooks()
    assert "CH#email" not in _ledger(clinic, patient_id)
    assert clinic.crm.contact_opt_outs(contact) == set()
    assert clinic.mailchimp.member(email)["status"] == "subscribed"  # type: ignore[index]
    clinic.crm.manager_set_opt_outs(contact, "email")
    clinic.deliver_webhooks()
    _assert_everywhere(clinic, patient_id, contact, email, "crm")


def test_an_opt_out_reaches_every_mailchimp_member_the_person_had_and_moved_addresses_stay_gone(
    clinic: LocalClinic,
) -> None:
    """Issue 15 defect 4: the member changes address in Mailchimp (upemail) while the MIS keeps the old
    one. The audience sync must not re-create the old address, the person keeps one subscribed member,
    and their unsubscribe under the new address leaves nothing of theirs subscribed."""
    assert clinic.mailchimp is not None
    patient_id, contact, old = _member(clinic)
    new = f"moved.{patient_id}@example.net"
    clinic.mailchimp.member_changes_email(old, new)
    clinic.deliver_mailchimp()
    # A completed visit changes the patient's merge fields: the audience sync sends them again.
    visit = clinic.mis.book(int(patient_id), clinic.mis.at(5, "10:00"))
    clinic.medods.complete(visit)
    clinic.sync()
    clinic.deliver_webhooks()
    theirs = [m for m in clinic.mailchimp.members() if m["email_address"] in (old, new)]
    assert clinic.mailchimp.member(old) is None  # the moved address was not re-created
    assert [m["email_address"] for m in theirs if m["status"] == "subscribed"] == [new]
    assert clinic.mailchimp.member(new)["merge_fields"]["LASTVISIT"]  # type: ignore[index]
    clinic.mailchimp.member_unsubscribes(new)
    clinic.deliver_mailchimp()
    assert [
        m for m in clinic.mailchimp.members() if m["status"] == "subscribed" and m["email_address"] in (old, new)
    ] == []
    _assert_everywhere(clinic, patient_id, contact, new, "mailchimp")
    clinic.sync()  # the MIS still says the old address, "not refused": nothing is subscribed again
    assert clinic.mailchimp.member(old) is None
