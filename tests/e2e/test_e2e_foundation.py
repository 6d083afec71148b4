"""End to end in the local runtime: MEDODS emulator -> poller -> SQS (moto) -> syncer -> Bitrix24 emulator.

The real handlers run with real-shaped events; the expected CRM state comes from an independent
oracle over the MIS emulator's raw records (sandbox/expect.py).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any

import boto3
import pytest

from sandbox.local import LocalClinic, RunSummary, start_local_clinic
from sandbox.runtime import ClinicStack, LocalAws
from tests.helpers import ROOT

EVENTS = ROOT / "events"


@dataclass
class DemoRun:
    clinic: LocalClinic
    first: RunSummary
    second: RunSummary
    output: str  # every log line and EMF metric line the handlers printed


@pytest.fixture(scope="module")
def demo_run(local_aws: LocalAws) -> Iterator[DemoRun]:
    """A demo-sized clinic (300 patients, 400 appointments) synced twice, with all handler output captured."""
    from clinicsync.observability import logger

    sink = io.StringIO()
    previous = [h.setStream(sink) for h in logger.handlers]  # type: ignore[attr-defined]
    clinic = start_local_clinic(aws=local_aws, clinic_id="demo-e2e")
    try:
        with contextlib.redirect_stdout(sink):
            first = clinic.sync()
            second = clinic.sync()
        yield DemoRun(clinic, first, second, sink.getvalue())
    finally:
        for handler, stream in zip(logger.handlers, previous, strict=True):
            handler.setStream(stream)  # type: ignore[attr-defined]
        clinic.close()


def test_every_appointment_lands_in_its_mapped_stage(demo_run: DemoRun) -> None:
    expected = demo_run.clinic.expected_deals()
    assert len(expected) > 300  # the oracle is not trivially empty
    assert demo_run.clinic.mismatches() == []
    assert demo_run.first.throttled == 0


def test_no_duplicate_contacts_and_one_per_synced_patient(demo_run: DemoRun) -> None:
    contacts = demo_run.clinic.crm.contacts_by_origin()
    assert max(contacts.values()) == 1
    patients_with_deals = {d.patient_id for d in demo_run.clinic.expected_deals().values()}
    assert patients_with_deals <= set(contacts)


def test_second_run_makes_zero_crm_writes(demo_run: DemoRun) -> None:
    assert demo_run.first.crm_writes > 600
    assert demo_run.second.crm_writes == 0
    assert demo_run.second.crm_requests == 0


def test_backfill_batches_crm_writes(demo_run: DemoRun) -> None:
    # 649 write commands and a look-up per message fit in 25 requests of up to 50 commands.
    assert demo_run.first.crm_requests <= demo_run.first.crm_writes / 20


def _pii(clinic: LocalClinic) -> list[str]:
    # Very short strings (e.g. a three-letter first name) would match inside unrelated words.
    return sorted({s for s in clinic.sample.all_pii_strings() if len(s) >= 4})


def _decoded_lines(output: str) -> str:
    """JSON log lines escape Cyrillic; decode them so a name cannot hide behind \\u escapes."""
    lines = []
    for line in output.splitlines():
        try:
            lines.append(json.dumps(json.loads(line), ensure_ascii=False))
        except ValueError:
            lines.append(line)
    return "\n".join(lines)


def test_logs_and_metrics_carry_no_pii(demo_run: DemoRun) -> None:
    output = _decoded_lines(demo_run.output)
    assert "message synced" in output and "poll finished" in output  # the capture really has the logs
    leaked = [s for s in _pii(demo_run.clinic) if s in output]
    assert leaked == []


def test_no_table_item_holds_pii_in_clear(demo_run: DemoRun) -> None:
    table = boto3.resource("dynamodb").Table(demo_run.clinic.stack.table_name)
    items: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {}
    while True:
        page = table.scan(**kwargs)
        items.extend(page["Items"])
        if "LastEvaluatedKey" not in page:
            break
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
    assert len(items) > 1000  # mappings for every patient and appointment are there
    dump = json.dumps(items, ensure_ascii=False, default=str)
    leaked = [s for s in _pii(demo_run.clinic) if s in dump]
    assert leaked == []
    assert any(str(i["pk"]).startswith("PHONE#") for i in items)  # the phone index exists, keyed


# --- the lifecycle of one appointment, on a small clinic --------------------------------------------


@pytest.fixture
def small(make_clinic: Callable[..., LocalClinic]) -> LocalClinic:
    clinic = make_clinic(patients=20, appointments=20)
    clinic.sync()
    assert clinic.mismatches() == []
    return clinic


def test_status_lifecycle_moves_the_same_deal_at_one_request_per_move(small: LocalClinic) -> None:
    aid = small.open_booking()
    deal_id = small.crm.deals()[str(aid)]["id"]
    for change, stage_key in [
        (small.medods.confirm, "confirmed"),
        (small.medods.arrive, "arrived"),
        (small.medods.complete, "completed"),
    ]:
        stage_before = small.crm.deals()[str(aid)]["stage"]
        change(aid)
        run = small.sync()
        deal = small.crm.deals()[str(aid)]
        assert deal["id"] == deal_id
        want = small.expected_deals()[str(aid)]
        assert (deal["category"], deal["stage"]) == (want.category_id, want.stage), stage_key
        # One request: a move checks the deal's stage (a manager may have closed it) in the write's batch.
        assert (run.crm_requests, deal["stage"] != stage_before) == (1, True)
    assert small.mismatches() == []


@pytest.mark.parametrize("change", ["cancel", "no_show"])
def test_cancel_and_no_show(small: LocalClinic, change: str) -> None:
    aid = small.open_booking()
    getattr(small.medods, change)(aid)
    small.sync()
    stage = small.crm.deals()[str(aid)]["stage"]
    assert stage.endswith("LOSE" if change == "cancel" else "UC_NOSHOW")
    assert small.mismatches() == []


def test_reschedule_keeps_the_deal_and_updates_its_date(small: LocalClinic) -> None:
    aid = small.open_booking()
    before = small.crm.deals()[str(aid)]
    row = small.medods.appointment(aid)
    new_start = small.medods.at(5, "16:30")
    small.medods.reschedule(aid, new_start)
    small.sync()
    after = small.crm.deals()[str(aid)]
    assert after["id"] == before["id"]
    assert after["visit_at"][:10] == new_start.date().isoformat() != row["date"]
    assert after["status"] == "rescheduled"
    assert len(small.bitrix.deals) == len(small.expected_deals())


def test_closed_deal_is_not_reopened_and_a_new_visit_opens_a_new_deal(small: LocalClinic) -> None:
    aid = small.open_booking()
    deal = small.crm.deals()[str(aid)]
    small.medods.cancel(aid)
    small.sync()
    lost = small.crm.deals()[str(aid)]
    assert lost["stage"].endswith("LOSE") and lost["closed"] is True
    small.medods.set_status(aid, "approved")  # the MIS flips back; the lost deal must stay lost
    row = small.medods.appointment(aid)
    new_aid = small.medods.book(row["clientId"], row["userId"], row["clinicId"], small.medods.at(14, "11:00"))
    run = small.sync()
    deals = small.crm.deals()
    assert deals[str(aid)]["stage"] == lost["stage"]
    assert deals[str(aid)]["modified"] == lost["modified"]  # not touched at all
    assert deals[str(new_aid)]["id"] != deal["id"]
    assert run.crm_writes == 1  # only the new deal


def test_a_visit_after_a_completed_one_opens_a_deal_in_the_repeat_funnel(small: LocalClinic) -> None:
    aid = small.open_booking()
    small.medods.complete(aid)
    row = small.medods.appointment(aid)
    later = small.medods.book(row["clientId"], row["userId"], row["clinicId"], small.medods.at(30, "11:00"))
    small.sync()
    deals = small.crm.deals()
    assert (deals[str(later)]["category"], deals[str(later)]["stage"]) == ("1", "C1:PREPARATION")
    assert small.mismatches() == []


def test_lost_create_response_does_not_duplicate(make_clinic: Callable[..., LocalClinic]) -> None:
    clinic = make_clinic(patients=15, appointments=15)
    # The first write batch is applied by Bitrix24 but its response is lost (the worst case).
    clinic.bitrix.faults.add(method="crm.contact.add", status=502, html=True, times=1, after_apply=True)
    run = clinic.sync()
    assert run.drain["failed"] >= 1  # the message was retried
    assert clinic.mismatches() == []
    assert max(clinic.crm.contacts_by_origin().values()) == 1
    assert len(clinic.bitrix.deals) == len(clinic.expected_deals())


@pytest.mark.parametrize("lost", [False, True])
def test_a_known_patients_new_visit_is_looked_up_by_mis_id_only_after_a_lost_create(
    small: LocalClinic, lost: bool
) -> None:
    """A visit we never tried to create cannot exist in the CRM: a known patient's new booking costs one
    request, its create. A create whose response was lost left its intent, so the retry looks the deal
    up by MIS id and finds it: never a second deal."""
    client = int(next(r["client_id"] for r in small.mis.visits() if r["id"] == str(small.open_booking())))
    if lost:
        small.bitrix.faults.add(method="crm.deal.add", status=502, html=True, times=1, after_apply=True)
    aid = str(small.mis.book(client, small.mis.at(5, "11:00")))
    run = small.sync()
    assert small.crm.deals_by_origin()[aid] == 1 and small.mismatches() == []
    if lost:
        assert run.drain["failed"] >= 1  # retried, and found by MIS id
    else:
        assert run.crm_requests == 1


def test_archived_patient_leaves_no_state(small: LocalClinic) -> None:
    aid = small.open_booking()
    pid = int(small.medods.appointment(aid)["clientId"])
    table = boto3.resource("dynamodb").Table(small.stack.table_name)
    assert table.get_item(Key={"pk": f"PAT#{pid}", "sk": "STATE"}).get("Item")
    small.medods.archive_client(pid)
    small.sync()
    assert table.get_item(Key={"pk": f"PAT#{pid}", "sk": "STATE"}).get("Item") is None
    assert table.get_item(Key={"pk": f"PAT#{pid}", "sk": f"APPT#{aid}"}).get("Item") is None


def test_refused_processing_is_never_sent(small: LocalClinic) -> None:
    aid = small.open_booking()
    row = small.medods.appointment(aid)
    client = small.medods.add_client(
        "Орлова",
        "Вера",
        second_name="Павловна",
        sex="female",
        birthdate=date(1979, 2, 3),
        phone="+7 926 555-00-11",
        denyDataProcessing=True,
    )
    hidden = small.medods.book(client, row["userId"], row["clinicId"], small.medods.at(3, "09:00"))
    small.sync()
    assert str(hidden) not in small.crm.deals()
    assert str(client) not in small.crm.contacts_by_origin()


def test_unchanged_poll_costs_no_crm_request(small: LocalClinic) -> None:
    run = small.sync()
    assert (run.crm_requests, run.crm_writes, run.poll["patients"]) == (0, 0, 0)


# --- the real handlers with the files in events/ --------------------------------------------------


def _event(name: str, stack: ClinicStack | None = None) -> dict[str, Any]:
    """A sample event; SQS samples name demo-dental's queues, so they are re-addressed to ``stack``'s (the
    stage syncer reads only the queue ARNs it is configured with)."""
    text = (EVENTS / f"{name}.json").read_text(encoding="utf-8")
    if stack is not None:
        text = text.replace(":clinicsync-demo-dental-", f":{stack.stack_name}-")
    return dict(json.loads(text))


def test_poller_handles_the_sample_schedule_events(small: LocalClinic) -> None:
    for name in ("mis_poller_schedule", "mis_poller_resync"):
        report = small.stack.invoke("MisPollerFunction", _event(name))
        assert {"pages", "patients", "messages"} <= set(report)
    small.stack.drain_queue()
    assert small.mismatches() == []


def test_poller_handles_the_sample_backfill_event_and_resumes_to_done(small: LocalClinic) -> None:
    """`clinicsync backfill` invokes the poller with this event until the checkpoint says done."""
    step = small.stack.invoke("MisPollerFunction", _event("mis_poller_backfill"))
    for _ in range(20):
        if step["done"]:
            break
        step = small.stack.invoke("MisPollerFunction", _event("mis_poller_backfill"))
    assert step["done"] is True and step["window_days"] == 365 and step["pages"] >= 1
    small.stack.drain_all()
    assert small.mismatches() == []


def test_syncer_handles_the_sample_sqs_batch(small: LocalClinic) -> None:
    response = small.stack.invoke("StageSyncerFunction", _event("stage_syncer_sqs_batch", small.stack))
    assert response == {"batchItemFailures": []}
    deals = small.crm.deals()
    assert deals["70001"]["stage"] == "PREPARATION"
    assert deals["70002"]["is_dms"] is True  # zero price plus a policy: a DMS visit
    # Redelivery of the same message is harmless: nothing is created twice.
    small.stack.invoke("StageSyncerFunction", _event("stage_syncer_sqs_batch", small.stack))
    assert small.crm.contacts_by_origin()["90001"] == 1


def test_a_malformed_message_ends_in_the_dlq_and_good_ones_still_sync(small: LocalClinic) -> None:
    event = _event("stage_syncer_sqs_batch", small.stack)
    good, bad = event["Records"][0], dict(event["Records"][0], messageId="bad-1", body='{"changes":"nope"}')
    response = small.stack.invoke("StageSyncerFunction", {"Records": [good, bad]})
    assert response == {"batchItemFailures": [{"itemIdentifier": "bad-1"}]}
    assert "70001" in small.crm.deals()

    sqs = boto3.client("sqs")
    sqs.send_message(
        QueueUrl=small.stack.queue_url,
        MessageBody='{"kind":"mis_changes"}',
        MessageGroupId="shard-0",
        MessageDeduplicationId="poison",
    )
    small.stack.drain_queue()
    assert small.stack.queue_depth() == 0
    assert small.stack.queue_depth(dlq=True) == 1  # after maxReceiveCount (5) receives


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("unsubscribe_mailchimp_validate", 200),  # Mailchimp's GET check needs no secret
        ("unsubscribe_mailchimp_event", 401),  # the sample's path secret is not this clinic's
        ("unsubscribe_link_get", 403),  # the sample token is signed with another key
        ("unsubscribe_link_post", 403),
    ],
)
def test_unsubscribe_samples_are_answered_and_foreign_ones_refused(small: LocalClinic, name: str, status: int) -> None:
    response = small.stack.invoke("UnsubscribeFunction", _event(name))
    assert response["statusCode"] == status
    assert small.stack.queue_depth("ConsentQueue") == 0


def test_syncer_handles_the_sample_consent_job_batch(small: LocalClinic) -> None:
    # An unknown patient: nothing to write anywhere, the job is done (not retried forever).
    response = small.stack.invoke("StageSyncerFunction", _event("stage_syncer_consent_jobs", small.stack))
    assert response == {"batchItemFailures": []}


def test_syncer_handles_the_sample_crm_event_batch(small: LocalClinic) -> None:
    # The sample's ids do not exist in this portal: each event is judged and dropped, none fails.
    response = small.stack.invoke("StageSyncerFunction", _event("stage_syncer_crm_events", small.stack))
    assert response == {"batchItemFailures": []}
    assert small.stack.queue_depth() == 0  # nothing was sent on to a patient's shard


@pytest.mark.parametrize("name", ["crm_webhook_bitrix24", "crm_webhook_amocrm"])
def test_webhook_samples_with_foreign_secrets_are_refused_and_not_queued(small: LocalClinic, name: str) -> None:
    response = small.stack.invoke("CrmWebhookFunction", _event(name))
    assert response["statusCode"] == 401
    assert small.stack.queue_depth("CrmEventQueue") == 0
