"""The lab case end to end in the local runtime (clinic_cases.md §A): the LIS's referring doctors and
funds/clinics two-way with vTiger (only records with a LIS id flow back), one-way into two Mailchimp
audiences, and a Mailchimp unsubscribe ticking the LIS's "do not send marketing" flag.

Every step goes through the real handlers: the scheduled poll (MisPollerFunction), the Mailchimp webhook
(UnsubscribeFunction) and the consent queue (StageSyncerFunction), against moto and the emulators.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import boto3
import pytest

from clinicsync.adapters.aws.store import DynamoStore
from sandbox.lab import LocalLab, start_local_lab
from sandbox.runtime import LocalAws
from tests.conftest import LogCapture
from tests.helpers import ROOT

_ids = iter(range(1, 10**6))


@pytest.fixture
def make_lab(local_aws: LocalAws) -> Iterator[Callable[..., LocalLab]]:
    made: list[LocalLab] = []

    def make(**kwargs: Any) -> LocalLab:
        lab = start_local_lab(aws=local_aws, clinic_id=f"lab-{next(_ids)}", doctors=12, **kwargs)
        made.append(lab)
        return lab

    yield make
    for lab in made:
        lab.close()


@pytest.fixture
def lab(make_lab: Callable[..., LocalLab]) -> LocalLab:
    lab = make_lab()
    first = lab.sync()
    assert first["failed"] == {} and first["crm_created"] == 12 + 6
    return lab


def _mailable_doctor(lab: LocalLab) -> dict[str, Any]:
    return next(d for d in lab.lis.all("doctor") if d["email"] and not d["do_not_send_marketing"])


def test_a_new_doctor_in_the_lis_appears_in_vtiger_and_mailchimp(lab: LocalLab) -> None:
    clinic = next(o for o in lab.lis.all("organisation") if o["type"] == "clinic")
    new = lab.lis.add_doctor(
        first_name="Веселина",
        last_name="Димитрова",
        specialty="Акушер-гинеколог",
        region="Пловдив",
        city="Пловдив",
        phone="0888 123 456",
        email="v.dimitrova@example.bg",
        organisation_id=clinic["id"],
    )
    report = lab.sync()
    assert (report["lis_changed"], report["crm_created"], report["failed"]) == (1, 1, {})
    contact = lab.crm_record("Contacts", new)
    account = lab.crm_record("Accounts", clinic["id"])
    assert contact is not None and account is not None
    assert (contact["firstname"], contact["lastname"], contact["cf_specialty"]) == (
        "Веселина",
        "Димитрова",
        "Акушер-гинеколог",
    )
    assert contact["mobile"] == "+359888123456"  # E.164, whatever format the LIS stored
    assert contact["account_id"] == account["id"]  # the doctor is linked to the clinic's Account
    assert contact["emailoptout"] == "0"
    assert contact["modifiedby"] != lab.vtiger.admin_id  # written as our integration user
    member = lab.doctors_audience.member("v.dimitrova@example.bg")
    assert member is not None and member["status"] == "subscribed"
    assert member["merge_fields"] | {"EMAIL": ""} == {
        "EMAIL": "",
        "FNAME": "Веселина",
        "LNAME": "Димитрова",
        "SPECIALTY": "Акушер-гинеколог",
        "REGION": "Пловдив",
        "CITY": "Пловдив",
    }
    assert lab.organisations_audience.member("v.dimitrova@example.bg") is None  # doctors' list only
    orgs = {m["merge_fields"]["ORGNAME"]: m for m in lab.organisations_audience.members()}
    assert orgs[clinic["name"]]["merge_fields"]["ORGTYPE"] == "clinic"
    # Nothing changed since: no write anywhere, no Mailchimp request.
    before = (lab.vtiger.stats()["writes"], lab.lis.stats()["writes"], lab.doctors_audience.stats()["requests"])
    again = lab.sync()
    assert (again["crm_created"], again["crm_updated"], again["lis_updated"]) == (0, 0, 0)
    after = (lab.vtiger.stats()["writes"], lab.lis.stats()["writes"], lab.doctors_audience.stats()["requests"])
    assert after == before


def test_a_phone_fixed_in_vtiger_reaches_the_lis(lab: LocalLab) -> None:
    doctor = lab.lis.all("doctor")[3]
    contact = lab.crm_record("Contacts", doctor["id"])
    assert contact is not None
    lab.vtiger.manager_update(contact["id"], mobile="+359 87 765 4321")
    lis_writes = lab.lis.stats()["writes"]
    report = lab.sync()
    assert (report["crm_changed"], report["lis_updated"], report["conflicts"]) == (1, 1, 0)
    assert lab.lis.get("doctor", doctor["id"])["phone"] == "+359877654321"
    assert lab.lis.stats()["writes"] == lis_writes + 1
    # Our own write comes back on the LIS feed and vTiger's: an echo, nothing is written again.
    writes = (lab.vtiger.stats()["writes"], lab.lis.stats()["writes"])
    echo = lab.sync()
    assert (echo["crm_updated"], echo["lis_updated"]) == (0, 0)
    assert (lab.vtiger.stats()["writes"], lab.lis.stats()["writes"]) == writes


def test_a_manager_working_under_the_integrations_user_is_heard_and_our_echo_still_writes_nothing(
    lab: LocalLab,
) -> None:
    """The lab's office set vTiger up with one login, which the integration uses too. A phone fixed by a
    manager under that login carries our user in ``modifiedby``; it is told from our echo by content."""
    doctor = lab.lis.all("doctor")[5]
    contact = lab.crm_record("Contacts", doctor["id"])
    assert contact is not None
    integration_user = contact["modifiedby"]  # we created the Contact
    assert integration_user != lab.vtiger.admin_id
    lab.vtiger.manager_update(contact["id"], as_user=integration_user, mobile="+359 87 111 2233")
    report = lab.sync()
    assert (report["crm_changed"], report["lis_updated"]) == (1, 1)
    assert lab.lis.get("doctor", doctor["id"])["phone"] == "+359871112233"
    writes = (lab.vtiger.stats()["writes"], lab.lis.stats()["writes"])
    echo = lab.sync()  # our LIS write comes back on the LIS feed; vTiger's row still holds what we synced
    assert (echo["crm_changed"], echo["crm_updated"], echo["lis_updated"]) == (0, 0, 0)
    assert (lab.vtiger.stats()["writes"], lab.lis.stats()["writes"]) == writes


def test_a_vtiger_only_contact_person_stays_out_of_the_lis(lab: LocalLab) -> None:
    clinic = next(o for o in lab.lis.all("organisation") if o["type"] == "clinic")
    account = lab.crm_record("Accounts", clinic["id"])
    assert account is not None
    lis_before = {k: lab.lis.all(k) for k in ("doctor", "organisation")}
    person = lab.vtiger.manager_create(
        "Contacts", firstname="Радост", lastname="Петкова", mobile="0899 000 111", account_id=account["id"]
    )
    typo = lab.vtiger.manager_create("Contacts", lastname="Стоев", cf_lis_id="D9999")  # a LIS id the LIS lacks
    report = lab.sync()
    assert report["crm_only_ignored"] == 1 and report["unknown_lis_id"] == 1
    assert (report["lis_updated"], report["failed"]) == (0, {})
    assert {k: lab.lis.all(k) for k in ("doctor", "organisation")} == lis_before  # the LIS is untouched
    assert lab.vtiger.record(person)["lastname"] == "Петкова"  # and the CRM keeps its extra records
    assert lab.vtiger.record(typo)["cf_lis_id"] == "D9999"
    assert lab.sync()["lis_updated"] == 0


def test_a_conflict_is_resolved_by_the_configured_owner_and_logged(
    make_lab: Callable[..., LocalLab], captured_logs: LogCapture
) -> None:
    lab = make_lab(field_owners={"phone": "crm", "city": "lis"})
    lab.sync()
    doctor = _mailable_doctor(lab)
    contact = lab.crm_record("Contacts", doctor["id"])
    assert contact is not None
    # Both sides change the phone and the city before the next sync.
    lab.lis.edit("doctor", doctor["id"], phone="0888 555 001", city="Пловдив")
    lab.vtiger.manager_update(contact["id"], mobile="0888 555 002", mailingcity="Варна")
    report = lab.sync()
    assert report["conflicts"] == 2 and report["failed"] == {}
    lis_row = lab.lis.get("doctor", doctor["id"])
    crm_row = lab.vtiger.record(contact["id"])
    assert crm_row is not None
    assert lis_row["phone"] == "+359888555002" and crm_row["mobile"] in (
        "0888 555 002",
        "+359888555002",
    )  # vTiger owns it
    assert lis_row["city"] == crm_row["mailingcity"] == "Пловдив"  # the LIS owns the city
    logged = [line for line in captured_logs.text.splitlines() if "directory conflict resolved" in line]
    assert len(logged) == 2
    assert any('"field":"phone"' in line and '"winner":"crm"' in line for line in logged)
    assert any('"field":"city"' in line and '"winner":"lis"' in line for line in logged)
    for secret in ("555001", "555002", "555 00", "Варна"):
        assert secret not in captured_logs.text  # values never reach the logs
    # Resolved once: the next run sees both sides equal.
    assert lab.sync()["conflicts"] == 0


def test_a_mailchimp_unsubscribe_ticks_the_lis_flag_and_vtiger_follows(lab: LocalLab) -> None:
    doctor = _mailable_doctor(lab)
    assert lab.doctors_audience.member(doctor["email"])["status"] == "subscribed"
    lab.doctors_audience.member_unsubscribes(doctor["email"])
    assert lab.deliver_mailchimp() == 1
    assert lab.lis.get("doctor", doctor["id"])["do_not_send_marketing"] is True  # the LIS flag is ticked
    table = boto3.resource("dynamodb").Table(lab.stack.table_name)
    ledger = table.get_item(Key={"pk": f"CONSENT#pat:doctor:{doctor['id']}", "sk": "CH#email"})["Item"]
    assert ledger["opted_out"] is True and ledger["source"] == "mailchimp"
    assert lab.stack.queue_depth("ConsentQueue", dlq=True) == 0
    lab.sync()  # the flag reaches vTiger as the contact's e-mail opt-out
    contact = lab.crm_record("Contacts", doctor["id"])
    assert contact is not None and contact["emailoptout"] == "1"
    assert lab.doctors_audience.member(doctor["email"])["status"] == "unsubscribed"  # never re-subscribed
    assert lab.doctors_audience.pending_events() == []  # our API writes fire no webhook back


def test_the_lis_flag_set_by_a_clerk_unsubscribes_the_member(lab: LocalLab) -> None:
    doctor = _mailable_doctor(lab)
    lab.lis.edit("doctor", doctor["id"], do_not_send_marketing=True)
    report = lab.sync()
    assert report["opt_outs_recorded"] == 1
    assert lab.doctors_audience.member(doctor["email"])["status"] == "unsubscribed"
    contact = lab.crm_record("Contacts", doctor["id"])
    assert contact is not None and contact["emailoptout"] == "1"


def test_a_lost_create_response_does_not_duplicate_the_contact(lab: LocalLab) -> None:
    new = lab.lis.add_doctor(first_name="Мартин", last_name="Колев", phone="0877 100 200")
    lab.vtiger.lose_next_create_response()
    first = lab.sync()
    assert list(first["failed"]) == [f"doctor:{new}"]
    second = lab.sync()  # looked up by LIS id before creating: adopted, not created again
    assert second["failed"] == {} and second["crm_created"] == 0
    assert lab.crm_record("Contacts", new) is not None  # exactly one (crm_record asserts it)


def test_an_expired_vtiger_session_is_renewed_once(lab: LocalLab) -> None:
    logins = lab.vtiger.stats()["logins"]
    lab.vtiger.expire_sessions()
    doctor = lab.lis.all("doctor")[0]
    lab.lis.edit("doctor", doctor["id"], specialty="Кардиолог")
    report = lab.sync()
    assert report["failed"] == {} and report["crm_updated"] == 1
    assert lab.vtiger.stats()["logins"] == logins + 1
    contact = lab.crm_record("Contacts", doctor["id"])
    assert contact is not None and contact["cf_specialty"] == "Кардиолог"


def test_no_name_phone_email_or_secret_in_our_table_or_logs(lab: LocalLab, captured_logs: LogCapture) -> None:
    doctor = _mailable_doctor(lab)
    contact = lab.crm_record("Contacts", doctor["id"])
    assert contact is not None
    lab.vtiger.manager_update(contact["id"], mobile="+359 87 765 4321")
    lab.sync()
    lab.doctors_audience.member_unsubscribes(doctor["email"])
    lab.deliver_mailchimp()
    lab.sync()
    pii: set[str] = {"+359877654321", "765 4321"}
    for kind, names in (("doctor", ("first_name", "last_name", "email", "phone")), ("organisation", ("name", "email"))):
        for row in lab.lis.all(kind):
            pii |= {str(row[n]) for n in names if row.get(n)}
            if row.get("phone"):
                pii.add("".join(c for c in str(row["phone"]) if c.isdigit())[-9:])  # any format of the number
    crm = json.loads(
        boto3.client("secretsmanager").get_secret_value(SecretId=lab.stack.parameters["CrmSecretArn"])["SecretString"]
    )
    secrets = {lab.clinic_secret["mailchimp_api_key"], lab.clinic_secret["hash_key"], lab.lis.api_key}
    secrets.add(crm["access_key"])
    table = boto3.resource("dynamodb").Table(lab.stack.table_name)
    items, kwargs = [], {}
    while True:
        page = table.scan(**kwargs)
        items += page["Items"]
        if "LastEvaluatedKey" not in page:
            break
        kwargs = {"ExclusiveStartKey": page["LastEvaluatedKey"]}
    stored = repr(items)
    assert any(str(i["pk"]).startswith("DIR#doctor#") for i in items)  # the directory state is there
    leaked = sorted(s for s in pii | secrets if s in stored)
    assert leaked == [], f"in clear in DynamoDB: {len(leaked)} values"
    logged = sorted(s for s in pii | secrets if s in captured_logs.text)
    assert "directory sync" in captured_logs.text and logged == [], f"in the logs: {len(logged)} values"


def test_the_sample_directory_unsubscribe_event_through_the_real_handler(lab: LocalLab) -> None:
    sample = json.loads((ROOT / "events" / "unsubscribe_mailchimp_directory_event.json").read_text(encoding="utf-8"))
    assert lab.stack.invoke("UnsubscribeFunction", sample)["statusCode"] == 401  # not this lab's path secret
    doctor = _mailable_doctor(lab)
    secret = lab.clinic_secret["mailchimp_webhook_secret"]
    body = sample["body"].replace("ivan.dimitrov3%40example.bg", quote(doctor["email"], safe=""))
    event = json.loads(json.dumps(sample).replace("local-demo-mailchimp-secret", secret)) | {"body": body}
    answer = lab.stack.invoke("UnsubscribeFunction", event)
    assert answer["statusCode"] == 200 and json.loads(answer["body"])["status"] == "recorded"
    lab.stack.drain_all()
    assert lab.lis.get("doctor", doctor["id"])["do_not_send_marketing"] is True
    other = json.loads(json.dumps(event).replace("d0c7025", "a6b5da1054"))  # an audience that is not the lab's
    assert json.loads(lab.stack.invoke("UnsubscribeFunction", other)["body"])["status"] == "other_audience"


def test_an_opt_out_ticked_in_vtiger_reaches_the_lis_and_mailchimp(lab: LocalLab) -> None:
    doctor = _mailable_doctor(lab)
    contact = lab.crm_record("Contacts", doctor["id"])
    assert contact is not None and contact["emailoptout"] == "0"
    lab.vtiger.manager_update(contact["id"], emailoptout="1")
    report = lab.sync()  # the poll records it in the ledger; the consent job ticks the LIS flag
    assert report["opt_outs_recorded"] == 1 and report["failed"] == {}
    assert lab.lis.get("doctor", doctor["id"])["do_not_send_marketing"] is True
    assert lab.doctors_audience.member(doctor["email"])["status"] == "unsubscribed"
    assert (lab.vtiger.record(contact["id"]) or {})["emailoptout"] == "1"  # not reverted by our write
    writes = lab.vtiger.stats()["writes"]
    again = lab.sync()
    assert (again["opt_outs_recorded"], again["crm_updated"]) == (0, 0)
    assert lab.vtiger.stats()["writes"] == writes


def test_one_run_at_a_time(lab: LocalLab) -> None:
    store = DynamoStore(boto3.resource("dynamodb").Table(lab.stack.table_name))
    assert store.acquire_lease("directory", "a-long-run", 300, int(time.time()))
    new = lab.lis.add_doctor(first_name="Калина", last_name="Янева")
    busy = lab.sync()
    assert busy["skipped_busy"] is True and lab.crm_record("Contacts", new) is None
    store.release_lease("directory", "a-long-run")
    done = lab.sync()
    assert done["skipped_busy"] is False and lab.crm_record("Contacts", new) is not None


def test_a_lost_vtiger_update_is_not_copied_back_into_the_lis(lab: LocalLab) -> None:
    """The LIS's city goes X -> Y; our vTiger update of Y runs, but its answers (the first try and the
    retries) are lost. The clerk puts X back. The Contact's Y is our own write, not a manager's edit: the LIS
    keeps X and vTiger is written back to X (the state's ``unsure`` hashes, stored in DynamoDB)."""
    doctor = lab.lis.all("doctor")[2]
    contact = lab.crm_record("Contacts", doctor["id"])
    assert contact is not None
    original = doctor["city"]
    lab.lis.edit("doctor", doctor["id"], city="Габрово")
    lab.vtiger.lose_update_responses(3)  # the client's attempts at a write of unknown outcome
    lost = lab.sync()
    assert list(lost["failed"]) == [f"doctor:{doctor['id']}"]
    assert lab.vtiger.record(contact["id"])["mailingcity"] == "Габрово"  # it ran
    lab.lis.edit("doctor", doctor["id"], city=original)
    back = lab.sync()
    assert (back["failed"], back["lis_updated"], back["conflicts"]) == ({}, 0, 0)
    assert lab.lis.get("doctor", doctor["id"])["city"] == original
    assert lab.vtiger.record(contact["id"])["mailingcity"] == original
    settled = lab.sync()
    assert (settled["crm_changed"], settled["crm_updated"], settled["lis_updated"]) == (0, 0, 0)
